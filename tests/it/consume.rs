//! The group consumer behind every consuming stage (`tally_core::consume::Group`) against the
//! real broker, while partition states load slowly: what is polled meanwhile is kept in order
//! and in bounds, and partitions paused for the bound fetch again after a rebalance.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tally_core::consume::{BatchLimits, Group, Loaded, PartitionState};
use tally_core::kafka;
use tally_core::KafkaArgs;

/// Records per partition, and their payload size.
const RECORDS: usize = 300;
const SIZE: usize = 1024;
/// The stash bound the tests set: a small part of what is written.
const LIMIT: u64 = 16 * 1024;

/// A state whose load takes `load_for`, serving the group meanwhile; `during` runs once, in the
/// first load.
struct Slow {
    load_for: Duration,
    during: Option<Box<dyn FnOnce()>>,
}

impl PartitionState for Slow {
    fn load(&mut self, _: i32, keep_alive: &mut dyn FnMut() -> bool) -> anyhow::Result<Loaded> {
        let until = Instant::now() + self.load_for;
        let mut during = self.during.take();
        while Instant::now() < until {
            if !keep_alive() {
                return Ok(Loaded::Interrupted);
            }
            if until - Instant::now() < self.load_for / 2 {
                if let Some(during) = during.take() {
                    during();
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Loaded::Ready)
    }
}

/// A two-partition input topic with [`RECORDS`] records of [`SIZE`] bytes in each.
fn filled(name: &str) -> (KafkaArgs, String) {
    let args = KafkaArgs::plaintext(
        &tally_testkit::services().kafka_bootstrap,
        &tally_testkit::unique(name),
    );
    let topic = crate::liveness::input_topic(&args);
    let producer: BaseProducer = kafka::base_config(&args).create().unwrap();
    for i in 0..RECORDS {
        for partition in 0..2 {
            let payload = format!("{partition}:{i}:{}", "x".repeat(SIZE));
            let record = || {
                BaseRecord::<(), _>::to(&topic)
                    .partition(partition)
                    .payload(&payload[..SIZE])
            };
            while let Err((error, _)) = producer.send(record()) {
                assert!(format!("{error}").contains("Queue full"), "{error}");
                producer.poll(Duration::from_millis(10));
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    (args, topic)
}

fn group(args: &KafkaArgs, topic: &str) -> Group {
    let liveness =
        tally_core::liveness::Liveness::start_with("test", args, Duration::from_secs(600), |_| {});
    let group = Group::new(
        "test",
        &kafka::consumer_config(args, &format!("{}.group", args.topic_prefix)),
        topic,
        liveness,
        tally_core::shutdown::CancellationToken::new(),
    )
    .unwrap()
    .with_stash_limit(LIMIT);
    group.subscribe().unwrap();
    group
}

const LIMITS: BatchLimits = BatchLimits {
    records: 100,
    weight: u64::MAX,
    idle: Duration::from_millis(200),
    max_wait: Duration::from_secs(1),
    wait_for_open: false,
    read_through: false,
    end_at_watermark: false,
};

/// Collects until every partition's last record came; the offsets read of each partition.
fn read_all(group: &mut Group, state: &mut Slow) -> BTreeMap<i32, Vec<i64>> {
    let mut read: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let last = RECORDS as i64 - 1;
    while (0..2).any(|p| read.get(&p).and_then(|o| o.last()) != Some(&last)) {
        assert!(
            Instant::now() < deadline,
            "not every record came: {:?}",
            read.iter()
                .map(|(p, o)| (p, o.len(), o.last()))
                .collect::<Vec<_>>()
        );
        for message in group.collect(LIMITS, state).unwrap() {
            read.entry(message.partition())
                .or_default()
                .push(message.offset());
        }
    }
    read
}

#[test]
fn records_polled_while_states_load_come_once_in_order_within_the_stash_bound() {
    let (args, topic) = filled("stash");
    let mut group = group(&args, &topic);
    let mut state = Slow {
        load_for: Duration::from_millis(1500),
        during: None,
    };
    let read = read_all(&mut group, &mut state);
    let every: Vec<i64> = (0..RECORDS as i64).collect();
    for partition in 0..2 {
        assert_eq!(read[&partition], every, "partition {partition}");
    }
    assert!(group.all_heard());
    let peak = group.stash_peak();
    assert!(peak > 0, "nothing was polled while the states loaded");
    // Past the bound by a record of each partition at most: the one that filled it, and the
    // first of a partition not heard of until then.
    assert!(
        peak <= LIMIT + 2 * SIZE as u64,
        "the stash held {peak} bytes, bound {LIMIT}"
    );
    group.leave();
}

/// A partition paused for the stash bound and revoked while paused fetches again when it is
/// assigned anew: librdkafka keeps an application's pause past a revocation.
#[test]
fn partitions_paused_for_the_bound_fetch_again_after_a_rebalance() {
    let (args, topic) = filled("held");
    let mut group = group(&args, &topic);
    // A second member joins during the first load (the stash is full by then), reads a while,
    // and leaves: two rebalances while partitions are held.
    let config = kafka::consumer_config(&args, &format!("{}.group", args.topic_prefix));
    let joiner_topic = topic.clone();
    let mut state = Slow {
        load_for: Duration::from_millis(3000),
        during: Some(Box::new(move || {
            std::thread::spawn(move || {
                let other: BaseConsumer = config.create().unwrap();
                other.subscribe(&[&joiner_topic]).unwrap();
                let until = Instant::now() + Duration::from_secs(8);
                while Instant::now() < until {
                    let _ = other.poll(Duration::from_millis(100));
                }
                other.unsubscribe();
            });
        })),
    };
    let read = read_all(&mut group, &mut state);
    assert!(group.stash_peak() >= LIMIT, "the bound was not reached");
    // Read again from the start after each assignment (nothing is committed here): each
    // partition ends with all its records in order.
    for (partition, offsets) in read {
        let tail = &offsets[offsets.len() - RECORDS..];
        assert_eq!(
            tail,
            (0..RECORDS as i64).collect::<Vec<_>>(),
            "partition {partition}"
        );
    }
    group.leave();
}

/// A batch stops before the record that would take it past its weight (that record opens the
/// next batch); a batch read again from the committed offsets (a transaction aborted) starts
/// there, not with that record: each record comes once more, in order.
#[test]
fn a_batch_within_its_weight_then_rewound_reads_every_record_again_in_order() {
    let (args, topic) = filled("rewind");
    let mut group = group(&args, &topic);
    let mut state = Slow {
        load_for: Duration::ZERO,
        during: None,
    };
    let limits = BatchLimits {
        weight: 10 * SIZE as u64 + SIZE as u64 / 2,
        ..LIMITS
    };
    let mut first = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.is_empty() {
        assert!(Instant::now() < deadline, "no record came");
        first = group.collect(limits, &mut state).unwrap();
    }
    let weight: usize = first
        .iter()
        .map(|m| m.payload().map_or(0, <[u8]>::len))
        .sum();
    assert!(
        weight as u64 <= limits.weight,
        "a batch of {} records weighs {weight}, past its {}",
        first.len(),
        limits.weight
    );
    // Nothing was committed: the rewind goes back to each partition's start.
    group
        .rewind(&first.iter().map(|m| m.partition()).collect())
        .unwrap();
    let read = read_all(&mut group, &mut state);
    let every: Vec<i64> = (0..RECORDS as i64).collect();
    for partition in first.iter().map(|m| m.partition()) {
        assert_eq!(read[&partition], every, "partition {partition}");
    }
    group.leave();
}
