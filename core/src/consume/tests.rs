//! The consume loop's logic without services: an in-memory input (partitions of records, a
//! committed offset each, rewinds) and an in-memory commit that fails on request.

use std::collections::{BTreeMap, HashSet, VecDeque};

use rdkafka::message::{Message, OwnedMessage, Timestamp};

use super::*;

/// Partitions of records; a batch is what lies past each position, `limits.records` at most.
struct Memory {
    records: BTreeMap<i32, Vec<OwnedMessage>>,
    position: BTreeMap<i32, usize>,
    committed: BTreeMap<i32, usize>,
    rewinds: usize,
    /// Partitions assigned by the next collect (their state is loaded first).
    assign: VecDeque<i32>,
    shutdown: CancellationToken,
    /// Cancels `shutdown` once this many collects returned nothing.
    idle_collects_left: usize,
}

impl Memory {
    fn new(partitions: &[(i32, usize)], shutdown: &CancellationToken) -> Self {
        let mut records = BTreeMap::new();
        for &(p, n) in partitions {
            let list = (0..n)
                .map(|o| {
                    OwnedMessage::new(
                        Some(format!("{p}:{o}").into_bytes()),
                        None,
                        "in".to_owned(),
                        Timestamp::NotAvailable,
                        p,
                        o as i64,
                        None,
                    )
                })
                .collect();
            records.insert(p, list);
        }
        Self {
            position: records.keys().map(|p| (*p, 0)).collect(),
            committed: records.keys().map(|p| (*p, 0)).collect(),
            records,
            rewinds: 0,
            assign: VecDeque::new(),
            shutdown: shutdown.clone(),
            idle_collects_left: 2,
        }
    }
}

impl Input for Memory {
    fn collect(
        &mut self,
        limits: BatchLimits,
        state: &mut dyn PartitionState,
    ) -> anyhow::Result<Vec<OwnedMessage>> {
        while let Some(p) = self.assign.pop_front() {
            match state.load(p, &mut || true)? {
                Loaded::ReadyAt(rdkafka::Offset::Offset(o)) => {
                    self.position.insert(p, o as usize);
                }
                Loaded::Ready | Loaded::ReadyAt(_) => {}
                Loaded::Interrupted => self.assign.push_back(p),
            }
        }
        let mut batch = Vec::new();
        for (p, list) in &self.records {
            let at = self.position[p];
            for m in list.iter().skip(at) {
                if batch.len() == limits.records {
                    break;
                }
                batch.push(m.clone());
            }
        }
        for m in &batch {
            self.position.insert(m.partition(), m.offset() as usize + 1);
        }
        if batch.is_empty() {
            self.idle_collects_left = self.idle_collects_left.saturating_sub(1);
            if self.idle_collects_left == 0 {
                self.shutdown.cancel();
            }
        }
        Ok(batch)
    }

    fn rewind(&mut self, partitions: &HashSet<i32>) -> anyhow::Result<()> {
        self.rewinds += 1;
        for p in partitions {
            self.position.insert(*p, self.committed[p]);
        }
        Ok(())
    }
}

/// Records what it committed; fails the next writes as told.
#[derive(Default)]
struct Book {
    /// Records committed, in order, as `partition:offset`.
    written: Vec<String>,
    /// Failures to return from the next writes, in order.
    fail: VecDeque<Failure>,
    recovery: Option<Recovery>,
    committed_calls: usize,
    /// Offsets the stage keeps itself (returned by `load`).
    own_offsets: BTreeMap<i32, i64>,
    loads: Vec<i32>,
}

impl PartitionState for Book {
    fn load(
        &mut self,
        partition: i32,
        _keep_alive: &mut dyn FnMut() -> bool,
    ) -> anyhow::Result<Loaded> {
        self.loads.push(partition);
        Ok(match self.own_offsets.get(&partition) {
            Some(o) => Loaded::ReadyAt(rdkafka::Offset::Offset(*o)),
            None => Loaded::Ready,
        })
    }
}

impl Commit<Memory> for Book {
    type Output = Vec<String>;

    fn what(&self) -> &'static str {
        "an in-memory commit"
    }

    fn write(&mut self, input: &Memory, batch: &[OwnedMessage]) -> Result<Vec<String>, Failure> {
        let _ = input;
        if let Some(failure) = self.fail.pop_front() {
            return Err(failure);
        }
        Ok(batch
            .iter()
            .map(|m| String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
            .collect())
    }

    fn committed(&mut self, _input: &Memory, output: Vec<String>) {
        self.committed_calls += 1;
        self.written.extend(output);
    }

    fn recover(&mut self, failure: Failure) -> anyhow::Result<Recovery> {
        let _ = failure;
        Ok(self.recovery.unwrap_or(Recovery::Retry))
    }
}

fn limits(records: usize) -> BatchLimits {
    BatchLimits {
        records,
        weight: u64::MAX,
        idle: Duration::ZERO,
        max_wait: Duration::ZERO,
        wait_for_open: false,
        read_through: false,
        end_at_watermark: false,
    }
}

fn run(input: Memory, book: Book, records: usize) -> (anyhow::Result<()>, Memory, Book, u64) {
    let shutdown = input.shutdown.clone();
    let mut consume = ConsumeLoop::new(
        "parser",
        limits(records),
        input,
        book,
        Liveness::unwatched("parser"),
        shutdown,
    );
    // The backoff after a failure is at most a fraction of a second in these tests.
    let result = consume.run();
    let failures = consume.failures();
    let (input, book) = consume.into_parts();
    (result, input, book, failures)
}

fn all(partitions: &[(i32, usize)]) -> Vec<String> {
    let mut all = Vec::new();
    for &(p, n) in partitions {
        all.extend((0..n).map(|o| format!("{p}:{o}")));
    }
    all
}

#[test]
fn every_record_is_committed_once_in_batches_of_the_bound() {
    let shutdown = CancellationToken::new();
    let parts = [(0, 7), (1, 3)];
    let (result, _, book, failures) = run(Memory::new(&parts, &shutdown), Book::default(), 4);
    result.unwrap();
    let mut written = book.written.clone();
    written.sort();
    let mut expected = all(&parts);
    expected.sort();
    assert_eq!(written, expected);
    assert_eq!(
        book.committed_calls, 3,
        "10 records in batches of at most 4"
    );
    assert_eq!(failures, 0);
}

#[test]
fn a_retried_batch_stays_in_hand_and_commits_once() {
    let shutdown = CancellationToken::new();
    let parts = [(0, 5)];
    let book = Book {
        fail: VecDeque::from([
            Failure::Other(anyhow::anyhow!("database down")),
            Failure::Other(anyhow::anyhow!("still down")),
        ]),
        recovery: Some(Recovery::Retry),
        ..Book::default()
    };
    let (result, input, book, failures) = run(Memory::new(&parts, &shutdown), book, 10);
    result.unwrap();
    assert_eq!(book.written, all(&parts), "once each, in order");
    assert_eq!(failures, 2);
    assert_eq!(input.rewinds, 0, "a retry re-reads nothing");
}

#[test]
fn a_rewound_batch_is_read_again_from_the_committed_offsets() {
    let shutdown = CancellationToken::new();
    let parts = [(0, 3), (1, 2)];
    let book = Book {
        fail: VecDeque::from([Failure::Abort("redo".into())]),
        recovery: Some(Recovery::Rewind),
        ..Book::default()
    };
    let (result, input, book, failures) = run(Memory::new(&parts, &shutdown), book, 10);
    result.unwrap();
    let mut written = book.written.clone();
    written.sort();
    assert_eq!(
        written,
        all(&parts),
        "the aborted batch counted once, later"
    );
    assert_eq!((failures, input.rewinds), (1, 1));
}

#[test]
fn a_stop_ends_the_loop_with_its_error_and_commits_nothing() {
    let shutdown = CancellationToken::new();
    let book = Book {
        fail: VecDeque::from([Failure::Stop(anyhow::anyhow!("a gap: an operator decides"))]),
        ..Book::default()
    };
    let (result, _, book, _) = run(Memory::new(&[(0, 3)], &shutdown), book, 10);
    let error = result.unwrap_err();
    assert!(error.to_string().contains("a gap"), "{error}");
    assert!(book.written.is_empty());
}

#[test]
fn a_partition_resumes_where_the_stage_keeps_its_offset() {
    let shutdown = CancellationToken::new();
    let mut input = Memory::new(&[(0, 6), (1, 2)], &shutdown);
    input.assign.extend([0, 1]);
    let book = Book {
        own_offsets: BTreeMap::from([(0, 4)]),
        ..Book::default()
    };
    let (result, _, book, _) = run(input, book, 10);
    result.unwrap();
    assert_eq!(book.loads, vec![0, 1]);
    let mut written = book.written.clone();
    written.sort();
    assert_eq!(written, ["0:4", "0:5", "1:0", "1:1"]);
}

#[test]
fn shutdown_during_a_retry_ends_the_loop_without_a_commit() {
    let shutdown = CancellationToken::new();
    let book = Book {
        fail: (0..1000)
            .map(|_| Failure::Other(anyhow::anyhow!("down")))
            .collect(),
        ..Book::default()
    };
    let canceller = shutdown.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        canceller.cancel();
    });
    let (result, _, book, failures) = run(Memory::new(&[(0, 2)], &shutdown), book, 10);
    stopper.join().unwrap();
    result.unwrap();
    assert!(book.written.is_empty());
    assert!(failures >= 1);
}

#[test]
fn a_seek_refused_before_the_fetcher_starts_is_told_apart_from_other_errors() {
    use anyhow::Context;
    use rdkafka::error::KafkaError;
    // The text librdkafka gives RD_KAFKA_RESP_ERR__STATE, as seen in the stages' logs.
    let refused = Err::<(), _>(KafkaError::Seek("Local: Erroneous state".into()))
        .context("cannot move partition 0 to Beginning")
        .unwrap_err();
    assert!(load::is_not_ready(&refused));
    for other in [
        KafkaError::Seek("Local: Unknown partition".into()),
        KafkaError::Seek("Local: Timed out".into()),
        KafkaError::Canceled,
    ] {
        let other = Err::<(), _>(other).context("seek").unwrap_err();
        assert!(!load::is_not_ready(&other), "{other:#}");
    }
    assert!(!load::is_not_ready(&anyhow::anyhow!(
        "Local: Erroneous state"
    )));
}

/// A partition assigned but never heard of (neither a record nor its end: librdkafka dropped
/// the start of its fetch) keeps a liveness step open, which the watchdog restarts the process
/// on; a record or the end of each partition closes it, and so does a revocation.
#[test]
fn an_assigned_partition_never_heard_of_is_an_open_step() {
    let liveness = crate::liveness::Liveness::unwatched("test");
    let mut intake = intake::Intake::new("test", "in", liveness.clone());
    assert!(!liveness.has_open_step());
    intake.assigned(&[0, 1, 2]);
    assert!(liveness.has_open_step());
    intake.heard(0);
    intake.push(OwnedMessage::new(
        Some(b"x".to_vec()),
        None,
        "in".to_owned(),
        Timestamp::NotAvailable,
        1,
        0,
        None,
    ));
    assert!(liveness.has_open_step(), "partition 2 was not heard of");
    intake.revoked(&[2]);
    assert!(!liveness.has_open_step());
    intake.assigned(&[2]);
    assert!(liveness.has_open_step());
    intake.heard(2);
    assert!(!liveness.has_open_step());
    assert!(intake.all_heard());
    assert_eq!(intake.pop().map(|m| m.partition()), Some(1));
    assert!(intake.is_empty());
}
