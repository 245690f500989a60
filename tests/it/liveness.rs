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

#[test]
fn waiting_records_and_no_progress_is_a_stall_idle_is_not() {
    let args = kafka_args(&tally_testkit::services().kafka_bootstrap);
    let topic = format!("{}.in", args.topic_prefix);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(kafka::ensure_topics(
            &args,
            &[TopicSpec {
                name: topic.clone(),
                partitions: 2,
                compacted: false,
                retention: None,
            }],
        ))
        .unwrap();
    let producer: BaseProducer = kafka::base_config(&args).create().unwrap();
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
