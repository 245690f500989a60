//! The liveness watchdog against the real broker: a step that does not finish, or records that
//! wait while nothing is completed, count as a stall only while the broker answers; an idle
//! stage (nothing waits) is left alone. The action here records the reason; in the stages it
//! restarts the process in place (`tests/faults.rs` shows the stages resuming after broker
//! kills).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tally_core::kafka::{self, TopicSpec};
use tally_core::liveness::Liveness;
use tally_core::KafkaArgs;

fn kafka_args(bootstrap: &str) -> KafkaArgs {
    KafkaArgs::plaintext(bootstrap, &tally_testkit::unique("liveness"))
}

/// A watchdog with a 2 s limit whose action records the reasons.
fn watched(args: &KafkaArgs) -> (Liveness, Arc<Mutex<Vec<String>>>) {
    let stalls = Arc::new(Mutex::new(Vec::new()));
    let record = stalls.clone();
    let liveness = Liveness::start_with("test", args, Duration::from_secs(2), move |reason| {
        record.lock().unwrap().push(reason.to_owned());
    });
    (liveness, stalls)
}

/// Creates the pipeline's input topic `<prefix>.in`, two partitions; its name.
pub(crate) fn input_topic(args: &KafkaArgs) -> String {
    let topic = format!("{}.in", args.topic_prefix);
    two_partitions(args, &topic);
    topic
}

/// Creates `topic` with two partitions (if it does not exist).
pub(crate) fn two_partitions(args: &KafkaArgs, topic: &str) {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(kafka::ensure_topics(
            args,
            &[TopicSpec {
                name: topic.to_owned(),
                partitions: 2,
                compacted: false,
                retention: None,
            }],
        ))
        .unwrap();
}

/// Waits up to `within` for a stall to be reported; returns the first reason.
fn first_stall(stalls: &Mutex<Vec<String>>, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(reason) = stalls.lock().unwrap().first() {
            return Some(reason.clone());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn a_step_that_does_not_finish_is_a_stall_while_the_broker_answers() {
    let args = kafka_args(&tally_testkit::services().kafka_bootstrap);
    let (liveness, stalls) = watched(&args);
    let step = liveness.step("load the done-set");
    let reason = first_stall(&stalls, Duration::from_secs(15)).expect("a stall");
    assert!(reason.contains("load the done-set"), "{reason}");
    drop(step);
}

#[test]
fn no_stall_is_acted_on_while_the_broker_does_not_answer() {
    // Nothing listens on port 1: a restart could not help, so the watchdog only waits.
    let (liveness, stalls) = watched(&kafka_args("127.0.0.1:1"));
    let _step = liveness.step("init_transactions");
    liveness.set_input("t", vec![(0, 0)]);
    assert_eq!(first_stall(&stalls, Duration::from_secs(8)), None);
}

/// The input topic with five records in partition 1.
fn topic_with_records_in_partition_1(args: &KafkaArgs) -> String {
    let topic = input_topic(args);
    let producer: BaseProducer = kafka::base_config(args).create().unwrap();
    for i in 0..5 {
        producer
            .send(
                BaseRecord::<(), _>::to(&topic)
                    .partition(1)
                    .payload(&format!("{i}")),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    topic
}

#[test]
fn waiting_records_and_no_progress_is_a_stall_idle_is_not() {
    let args = kafka_args(&tally_testkit::services().kafka_bootstrap);
    let topic = topic_with_records_in_partition_1(&args);

    // Caught up on both partitions: idle, however long nothing is completed.
    let (idle, idle_stalls) = watched(&args);
    idle.set_input(&topic, vec![(0, 0), (1, 5)]);
    assert_eq!(first_stall(&idle_stalls, Duration::from_secs(8)), None);

    // Five records wait in partition 1 and nothing moves: a stall.
    let (stuck, stalls) = watched(&args);
    stuck.set_input(&topic, vec![(0, 0), (1, 0)]);
    let reason = first_stall(&stalls, Duration::from_secs(15)).expect("a stall");
    assert!(reason.starts_with("5 records wait"), "{reason}");
}

/// A member that holds no partition: stalled while records wait in partitions that no other
/// member of its group holds; not while another member holds them (a surplus member), nor when
/// nothing waits (idle).
#[test]
fn a_member_without_partitions_is_stalled_only_while_work_is_unheld() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let args = kafka_args(&tally_testkit::services().kafka_bootstrap);
    let topic = input_topic(&args);
    let group = format!("{}.group", args.topic_prefix);
    // In a transaction, as the stages write: its end marker follows the records.
    let producer: BaseProducer = kafka::transactional_producer_config(
        &args,
        &format!("{group}.tx"),
        Duration::from_secs(60),
    )
    .create()
    .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    producer.begin_transaction().unwrap();
    for i in 0..5 {
        let payload = format!("{i}");
        let record = BaseRecord::<(), _>::to(&topic)
            .partition(1)
            .payload(&payload);
        producer.send(record).unwrap();
    }
    producer
        .commit_transaction(Duration::from_secs(30))
        .unwrap();
    let member_of = |client_id: &str| {
        let (liveness, stalls) = watched(&args);
        liveness.set_member(&group, &topic, client_id);
        liveness.set_input(&topic, vec![]);
        (liveness, stalls)
    };
    // The group exists, empty, with partition 1 committed at 0: five records wait, unheld.
    let offsets = kafka::reader(&args, &group, kafka::Ends::Silent).unwrap();
    let commit = |next: i64| {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 1, Offset::Offset(next))
            .unwrap();
        offsets.commit(&tpl, CommitMode::Sync).unwrap();
    };
    commit(0);
    let (_left_out, stalls) = member_of("tally-test-left-out");
    let reason = first_stall(&stalls, Duration::from_secs(20)).expect("a stall");
    assert!(reason.contains("no member of"), "{reason}");
    assert!(reason.contains("(up to 6)"), "{reason}");

    // Another member holds both partitions: this one is a surplus, not stalled.
    let mut config = kafka::consumer_config(&args, &group);
    config.set("client.id", "tally-test-holder");
    let holder: BaseConsumer = config.create().unwrap();
    holder.subscribe(&[&topic]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while holder.assignment().unwrap().count() < 2 {
        assert!(Instant::now() < deadline, "the holder got no assignment");
        let _ = holder.poll(Duration::from_millis(100));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let polling = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = holder.poll(Duration::from_millis(100));
            }
            holder.unsubscribe();
        })
    };
    let (_surplus, surplus_stalls) = member_of("tally-test-surplus");
    assert_eq!(first_stall(&surplus_stalls, Duration::from_secs(10)), None);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    polling.join().unwrap();

    // Nothing waits (committed past the last record: only the transaction's marker is left),
    // nobody holds anything: idle.
    commit(5);
    let (_idle, idle_stalls) = member_of("tally-test-idle");
    assert_eq!(first_stall(&idle_stalls, Duration::from_secs(10)), None);
}

/// A step allowed longer than the limit (the db-client's write of a large batch) is busy, not
/// stalled, until its allowance has passed, though records wait and nothing is completed
/// meanwhile; past it, it is a stall like any step.
#[test]
fn a_step_is_busy_within_its_allowance_and_stalled_past_it() {
    let args = kafka_args(&tally_testkit::services().kafka_bootstrap);
    let topic = topic_with_records_in_partition_1(&args);
    let (liveness, stalls) = watched(&args);
    liveness.set_input(&topic, vec![(0, 0), (1, 0)]);
    let began = Instant::now();
    let _write = liveness.step_within("a database transaction", Duration::from_secs(8));
    let reason = first_stall(&stalls, Duration::from_secs(20)).expect("a stall");
    assert!(
        began.elapsed() >= Duration::from_secs(8),
        "stalled within the allowance, after {:?}: {reason}",
        began.elapsed()
    );
    assert!(reason.contains("a database transaction"), "{reason}");
}
