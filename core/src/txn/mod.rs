//! Kafka transactions as the commit of the consume loop ([`crate::consume`]): the
//! consume-transform-produce pattern (KIP-447) of the parser (work units → sums) and the
//! aggregator (sums → totals), each with its own [`Handler`].
//!
//! One transaction per batch: begin, let the handler write its output into it
//! ([`Handler::process`]), add the batch's consumed offsets (fenced by the consumer's group
//! metadata) and commit. A crash redoes at most the one open batch: that is the checkpoint.
//! When anything fails, the transaction is aborted (or the producer replaced when it is fenced
//! or broken) and the loop reads the batch again from the committed offsets; the handler hears
//! of a batch only through [`Handler::committed`] once it is in.

pub mod producer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::Producer;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

pub use crate::consume::{
    BatchLimits, Commit, ConsumeLoop, Failure, Group, Loaded, PartitionState, Recovery, Settings,
};
pub use producer::TxnProducer;

use crate::args::KafkaArgs;
use crate::backoff::Backoff;
use crate::kafka::{self, TxnErrorKind};
use crate::liveness::{self, Liveness};
use crate::shutdown::CancellationToken;

/// What a stage does with its batches inside a Kafka transaction.
pub trait Handler: PartitionState {
    /// What a committed batch leaves for the handler to remember.
    type Output;

    /// Writes the output of `batch` into the open transaction of `producer`. The batch's
    /// offsets are added by the commit.
    fn process(
        &mut self,
        producer: &TxnProducer,
        batch: &[OwnedMessage],
    ) -> Result<Self::Output, Failure>;

    /// The batch that produced `output` is committed.
    fn committed(&mut self, output: Self::Output) {
        let _ = output;
    }

    /// Called between transactions (at least every half second while idle): housekeeping that
    /// may run a transaction of its own.
    fn between(&mut self, group: &Group, producer: &TxnProducer) {
        let _ = (group, producer);
    }
}

/// The transactional producer of a stage.
#[derive(Debug, Clone)]
pub struct Transactions {
    /// `transactional.id` prefix; the id is `<prefix>.<instance>`.
    pub prefix: String,
    /// Kafka's transaction timeout.
    pub timeout: Duration,
}

/// A Kafka transaction per batch, around a [`Handler`].
pub struct KafkaTxn<H> {
    kafka: KafkaArgs,
    input: String,
    /// Shared with a helper thread while it sends the offsets (see [`send_offsets`]).
    producer: Arc<TxnProducer>,
    transactional_id: String,
    timeout: Duration,
    handler: H,
    shutdown: CancellationToken,
    /// Names each phase of a transaction as a step of its own, so that a stall says which.
    liveness: Liveness,
}

impl<H> KafkaTxn<H> {
    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }
}

impl<H: Handler> PartitionState for KafkaTxn<H> {
    fn load(
        &mut self,
        partition: i32,
        keep_alive: &mut dyn FnMut() -> bool,
    ) -> anyhow::Result<Loaded> {
        self.handler.load(partition, keep_alive)
    }

    fn revoked(&mut self, partitions: &[i32]) {
        self.handler.revoked(partitions);
    }

    fn weight(&self, message: &OwnedMessage) -> u64 {
        self.handler.weight(message)
    }

    fn upstream_drained(&mut self) -> bool {
        self.handler.upstream_drained()
    }
}

impl<H: Handler> Commit<Group> for KafkaTxn<H> {
    type Output = H::Output;

    fn what(&self) -> &'static str {
        "a Kafka transaction"
    }

    fn write(&mut self, group: &Group, batch: &[OwnedMessage]) -> Result<H::Output, Failure> {
        self.producer.begin_transaction()?;
        let output = {
            let _phase = self.liveness.step("send the transaction's records");
            self.handler.process(&self.producer, batch)?
        };
        let mut next: HashMap<i32, i64> = HashMap::new();
        for message in batch {
            let e = next.entry(message.partition()).or_insert(0);
            *e = (*e).max(message.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in &next {
            tpl.add_partition_offset(&self.input, *partition, Offset::Offset(*offset))?;
        }
        let metadata = group.group_metadata().ok_or(Failure::NotInGroup)?;
        {
            let _phase = self.liveness.step("send the offsets to the transaction");
            send_offsets(&self.producer, tpl, metadata, Duration::from_secs(30))?;
        }
        let _phase = self.liveness.step("commit the transaction");
        commit_within(&self.producer, self.timeout + Duration::from_secs(10))?;
        tracing::debug!(records = batch.len(), "transaction committed");
        Ok(output)
    }

    fn committed(&mut self, _group: &Group, output: H::Output) {
        self.handler.committed(output);
    }

    /// Aborts the transaction (or replaces a fenced or broken producer); the batch is read
    /// again from the committed offsets.
    fn recover(&mut self, failure: Failure) -> anyhow::Result<Recovery> {
        let kind = match &failure {
            Failure::Kafka(e) => {
                let kind = kafka::classify_txn_error(e);
                tracing::warn!(error = %e, ?kind, "transaction failed");
                kind
            }
            Failure::Abort(reason) => {
                tracing::info!(reason, "transaction aborted, batch redone");
                TxnErrorKind::Abortable
            }
            Failure::Other(error) | Failure::Stop(error) => {
                tracing::warn!(error = format!("{error:#}"), "transaction failed");
                TxnErrorKind::Abortable
            }
            Failure::NotInGroup => TxnErrorKind::Abortable,
            Failure::Stuck(reason) => {
                tracing::warn!(reason, "transaction stuck; replacing the producer");
                TxnErrorKind::Fatal
            }
        };
        let aborted =
            kind != TxnErrorKind::Fatal && self.producer.abort_transaction(Timeout::Never).is_ok();
        if !aborted {
            tracing::warn!("recreating the transactional producer");
            let (kafka, id, timeout) = (&self.kafka, &self.transactional_id, self.timeout);
            self.producer = liveness::retry(
                &self.shutdown,
                "recreate the transactional producer",
                || producer::create(kafka, id, timeout).map(Arc::new),
            )?;
        }
        Ok(Recovery::Rewind)
    }

    fn between(&mut self, group: &Group) {
        self.handler.between(group, &self.producer);
    }
}

/// The consume loop of a transactional stage.
pub type TxnLoop<H> = ConsumeLoop<Group, KafkaTxn<H>>;

/// Creates the group consumer, the handler (`make`, which may ask the group for metadata),
/// joins the group and initialises the transactional producer.
pub fn start<H: Handler>(
    kafka: &KafkaArgs,
    settings: Settings,
    transactions: Transactions,
    liveness: Liveness,
    shutdown: CancellationToken,
    make: impl FnOnce(&Group) -> anyhow::Result<H>,
) -> anyhow::Result<TxnLoop<H>> {
    let group = Group::open(kafka, &settings, liveness.clone(), shutdown.clone())?;
    let handler = make(&group)?;
    group.subscribe()?;
    let instance = settings
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("{:016x}", random_u64()));
    let transactional_id = format!("{}.{instance}", transactions.prefix);
    let producer = Arc::new(producer::create(
        kafka,
        &transactional_id,
        transactions.timeout,
    )?);
    tracing::info!(
        stage = settings.stage,
        transactional_id,
        "transactional loop started"
    );
    let commit = KafkaTxn {
        kafka: kafka.clone(),
        input: settings.input.clone(),
        producer,
        transactional_id,
        timeout: transactions.timeout,
        handler,
        shutdown: shutdown.clone(),
        liveness: liveness.clone(),
    };
    Ok(ConsumeLoop::new(
        settings.stage,
        settings.limits,
        group,
        commit,
        liveness,
        shutdown,
    ))
}

/// Runs a transactional stage until `shutdown` is cancelled: its watchdog (the stall limit is
/// never below the transaction timeout plus 30 s: past the broker's own timeout a transaction
/// is dead anyway), `start` retried through broker outages (also after the watchdog restarted
/// the process during one), the loop, then leaving the group; `stopped` logs the handler's
/// counts and the aborts. Blocking: call it on its own thread.
pub fn run_stage<H: Handler>(
    stage: &'static str,
    kafka: &KafkaArgs,
    liveness: &crate::LivenessArgs,
    transaction_timeout: Duration,
    shutdown: &CancellationToken,
    start: impl Fn(Liveness) -> anyhow::Result<TxnLoop<H>>,
    stopped: impl FnOnce(&H, u64),
) -> anyhow::Result<()> {
    let liveness = Liveness::start(
        stage,
        kafka,
        liveness,
        transaction_timeout + Duration::from_secs(30),
    )?;
    let what = format!("start the {stage}");
    let step = liveness.step("start the stage");
    let mut stage_loop = liveness::retry(shutdown, &what, || start(liveness.clone()))?;
    drop(step);
    let result = stage_loop.run();
    stage_loop.input().leave();
    stopped(stage_loop.commit().handler(), stage_loop.failures());
    result
}

/// Commits the open transaction, retrying what is retriable (a flush timeout) a few times,
/// after the backoff policy's delays.
pub fn commit(producer: &TxnProducer) -> Result<(), KafkaError> {
    let mut tries = 0;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        match kafka::commit_transaction(producer, Timeout::Never) {
            Ok(()) => return Ok(()),
            Err(e) if kafka::classify_txn_error(&e) == TxnErrorKind::Retriable && tries < 10 => {
                tries += 1;
                tracing::warn!(error = %e, tries, "commit failed, retrying");
                std::thread::sleep(backoff.next_delay());
            }
            Err(e) => return Err(e),
        }
    }
}

/// `send_offsets_to_transaction` on a thread of its own, given up on 10 s past its `timeout`:
/// the call can block far past its timeout while the group's coordinator broker is gone
/// (librdkafka issues 5456 and 5511: a coordinator request that is never retried once the
/// cached coordinator's broker was decommissioned; seen as a stage stuck for 150 s after one
/// broker of three was killed). Given up on, it is [`Failure::Stuck`]: the stage replaces its
/// producer (fencing this one) and redoes the batch; the thread, holding the old producer,
/// ends whenever the call returns.
fn send_offsets(
    producer: &Arc<TxnProducer>,
    offsets: TopicPartitionList,
    metadata: rdkafka::consumer::ConsumerGroupMetadata,
    timeout: Duration,
) -> Result<(), Failure> {
    let (tx, rx) = std::sync::mpsc::channel();
    let held = producer.clone();
    std::thread::Builder::new()
        .name("tally-send-offsets".into())
        .spawn(move || {
            let _ = tx.send(held.send_offsets_to_transaction(&offsets, &metadata, timeout));
        })
        .map_err(|e| Failure::Other(e.into()))?;
    let within = timeout + Duration::from_secs(10);
    match rx.recv_timeout(within) {
        Ok(sent) => Ok(sent?),
        Err(_) => Err(Failure::Stuck(format!(
            "sending the offsets to the transaction has not returned in {within:?} (the \
             group's coordinator broker gone?)"
        ))),
    }
}

/// Commits the open transaction, waiting at most `within` (a little more than the transaction
/// timeout: past it the broker has aborted the transaction anyway). A commit that times out is
/// resumed by calling it again (librdkafka's contract), as is any retriable error; one that has
/// not finished by then is [`Failure::Stuck`] (seen after a broker was killed: a commit that
/// never returned, until the watchdog restarted the stage).
pub fn commit_within(producer: &TxnProducer, within: Duration) -> Result<(), Failure> {
    let deadline = std::time::Instant::now() + within;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(Failure::Stuck(format!(
                "the commit did not finish within {within:?}"
            )));
        }
        match kafka::commit_transaction(producer, Timeout::After(left.min(Duration::from_secs(10))))
        {
            Ok(()) => return Ok(()),
            Err(e) if kafka::classify_txn_error(&e) == TxnErrorKind::Retriable => {
                tracing::debug!(error = %e, "commit not finished yet, resuming it");
                std::thread::sleep(backoff.next_delay().min(left));
            }
            Err(e) => return Err(Failure::Kafka(e)),
        }
    }
}

/// A random 64-bit number (instance names), without a dependency.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler whose partition state differs from every default.
    struct Unusual;

    impl PartitionState for Unusual {
        fn load(
            &mut self,
            _partition: i32,
            _keep_alive: &mut dyn FnMut() -> bool,
        ) -> anyhow::Result<Loaded> {
            Ok(Loaded::Interrupted)
        }

        fn weight(&self, _message: &OwnedMessage) -> u64 {
            7
        }

        fn upstream_drained(&mut self) -> bool {
            false
        }
    }

    impl Handler for Unusual {
        type Output = ();

        fn process(&mut self, _: &TxnProducer, _: &[OwnedMessage]) -> Result<(), Failure> {
            Ok(())
        }
    }

    /// The loop asks the transaction wrapper, not the handler: a method of `PartitionState`
    /// the wrapper does not pass on would silently take its default (the aggregator's view of
    /// its parsers was lost that way once).
    #[test]
    fn the_transaction_wrapper_passes_the_partition_state_on() {
        let kafka = KafkaArgs::plaintext("127.0.0.1:9", "test");
        let producer: TxnProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .create()
            .unwrap();
        let mut txn = KafkaTxn {
            kafka,
            input: "in".to_owned(),
            producer: Arc::new(producer),
            transactional_id: "test".to_owned(),
            timeout: Duration::from_secs(1),
            handler: Unusual,
            shutdown: CancellationToken::new(),
            liveness: Liveness::unwatched("test"),
        };
        assert!(matches!(
            txn.load(0, &mut || true).unwrap(),
            Loaded::Interrupted
        ));
        let message = OwnedMessage::new(
            None,
            None,
            "in".to_owned(),
            rdkafka::Timestamp::NotAvailable,
            0,
            0,
            None,
        );
        assert_eq!(txn.weight(&message), 7);
        assert!(!txn.upstream_drained());
    }
}
