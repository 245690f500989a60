//! When a drained batch of the consume loop ends, against the broker: at once, unless a
//! writer's transaction is open upstream; with `end_at_watermark`, without waiting for the
//! partitions' end to be told, unless the stage knows of work left upstream (the aggregator:
//! units its parsers have not committed yet).

use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tally_core::consume::{BatchLimits, Group, PartitionState};
use tally_core::{kafka, KafkaArgs};

/// No state to load for a partition.
struct Nothing;
impl PartitionState for Nothing {}

/// Kafka settings with a topic prefix of their own, named after `what`, and their input topic.
fn input(what: &str) -> (KafkaArgs, String) {
    let args = KafkaArgs::plaintext(
        &tally_testkit::services().kafka_bootstrap,
        &tally_testkit::unique(what),
    );
    let topic = crate::liveness::input_topic(&args);
    (args, topic)
}

/// A transactional producer named `name` under `args`' prefix, its transactions initialised.
fn writer(args: &KafkaArgs, name: &str) -> BaseProducer {
    let producer: BaseProducer = kafka::transactional_producer_config(
        args,
        &format!("{}.{name}", args.topic_prefix),
        Duration::from_secs(60),
    )
    .create()
    .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    producer
}

/// A member of the prefix's group on `topic`, its consumer set with `options` too, subscribed.
fn member(args: &KafkaArgs, topic: &str, options: &[(&str, &str)]) -> Group {
    let liveness =
        tally_core::liveness::Liveness::start_with("test", args, Duration::from_secs(600), |_| {});
    let mut config = kafka::consumer_config(args, &format!("{}.group", args.topic_prefix));
    for (key, value) in options {
        config.set(*key, *value);
    }
    let group = Group::new(
        "test",
        &config,
        topic,
        liveness,
        tally_core::shutdown::CancellationToken::new(),
    )
    .unwrap();
    group.subscribe().unwrap();
    group
}

/// Sends `payload` to `partition` of `topic` (queued, not flushed).
fn send_to(producer: &BaseProducer, topic: &str, partition: i32, payload: &str) {
    producer
        .send(
            BaseRecord::<(), _>::to(topic)
                .partition(partition)
                .payload(payload),
        )
        .unwrap();
}

/// One committed transaction of `producer` with `payload` on each of `topic`'s two partitions.
fn commit_to_both(producer: &BaseProducer, topic: &str, payload: &str) {
    producer.begin_transaction().unwrap();
    for partition in 0..2 {
        send_to(producer, topic, partition, payload);
    }
    producer
        .commit_transaction(Duration::from_secs(30))
        .unwrap();
}

/// Drained means nothing more will come: while a writer's transaction is open on a partition
/// held (the high watermark past the last stable offset), a batch waits for it, up to its
/// `max_wait`, so the sums of two parsers finishing close together are merged once, not
/// written twice. Once no transaction is open, a drained batch ends at once.
#[test]
fn a_batch_waits_for_a_transaction_open_upstream_then_ends_at_once() {
    let (args, topic) = input("drain");
    let send = |producer: &BaseProducer, partition: i32, payload: &str| {
        send_to(producer, &topic, partition, payload);
        producer.flush(Duration::from_secs(10)).unwrap();
    };
    let (first, second) = (writer(&args, "first"), writer(&args, "second"));
    let mut group = member(&args, &topic, &[]);
    let limits = BatchLimits {
        records: 1000,
        weight: u64::MAX,
        idle: Duration::from_secs(20),
        max_wait: Duration::from_secs(20),
        wait_for_open: true,
        read_through: false,
        end_at_watermark: false,
    };
    // The next batch with records in it (an empty poll ends an empty one).
    let mut next_batch = || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let batch = group.collect(limits, &mut Nothing).unwrap();
            if !batch.is_empty() {
                return batch;
            }
            assert!(Instant::now() < deadline, "no records");
        }
    };
    // Joined and at the (empty) end: a first committed record on each partition comes back at
    // once (the member knows its position in both now).
    first.begin_transaction().unwrap();
    send(&first, 0, "a");
    send(&first, 1, "a");
    first.commit_transaction(Duration::from_secs(30)).unwrap();
    let mut got = next_batch().len();
    if got < 2 {
        got += next_batch().len();
    }
    assert_eq!(got, 2);

    // `second` opens a transaction on partition 1 and holds it; `first` commits another record
    // on partition 0. The batch with it waits for `second`, which commits 3 s later.
    second.begin_transaction().unwrap();
    send(&second, 1, "open");
    first.begin_transaction().unwrap();
    send(&first, 0, "b");
    first.commit_transaction(Duration::from_secs(30)).unwrap();
    let committer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        second.commit_transaction(Duration::from_secs(30)).unwrap();
        (second, Instant::now())
    });
    let started = Instant::now();
    let batch = next_batch();
    let took = started.elapsed();
    let (second, committed) = committer.join().unwrap();
    // The broker does not end a read_committed fetch's long poll at this commit: the records
    // come when the fetch wait runs out (librdkafka's default 500 ms; tally's consumers 50).
    let late = Instant::now().saturating_duration_since(committed);
    assert_eq!(
        batch.len(),
        2,
        "the batch ended after {took:?} without the open transaction's record"
    );
    assert!(
        took < Duration::from_secs(15),
        "{took:?}: waited out max_wait"
    );
    assert!(
        late < Duration::from_millis(300),
        "the batch ended {late:?} after the open transaction committed: a fetch wait on the \
         critical path"
    );

    // Nothing open: a drained batch ends at once.
    second.begin_transaction().unwrap();
    send(&second, 1, "c");
    second.commit_transaction(Duration::from_secs(30)).unwrap();
    let started = Instant::now();
    assert_eq!(next_batch().len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    group.leave();
}

/// A batch with `end_at_watermark` (the db-client's) ends once its partitions are read up to
/// the high watermark the client last heard of, not when their end is told: librdkafka tells
/// it with the next fetch response, which the broker holds for `fetch.wait.max.ms` (10 s
/// here), when no record comes.
#[test]
fn a_batch_read_to_the_watermark_ends_without_the_next_fetch() {
    let (args, topic) = input("watermark");
    let producer = writer(&args, "writer");
    // One committed transaction with a record on each partition.
    let commit = |payload: &str| commit_to_both(&producer, &topic, payload);
    let mut group = member(&args, &topic, &[("fetch.wait.max.ms", "10000")]);
    let limits = BatchLimits {
        records: 1000,
        weight: u64::MAX,
        idle: Duration::from_secs(60),
        max_wait: Duration::from_secs(60),
        wait_for_open: true,
        read_through: false,
        end_at_watermark: true,
    };
    // Batches until `want` records came; how long that took.
    let mut collect = |want: usize| {
        let started = Instant::now();
        let mut got = 0;
        while got < want {
            got += group.collect(limits, &mut Nothing).unwrap().len();
            assert!(started.elapsed() < Duration::from_secs(120), "no records");
        }
        assert_eq!(got, want);
        started.elapsed()
    };
    commit("a");
    collect(2);
    for round in 0..3 {
        commit("b");
        let took = collect(2);
        assert!(
            took < Duration::from_secs(5),
            "round {round}: the batch took {took:?}: it waited for the end to be told"
        );
    }
    group.leave();
}

/// A partition whose end was told before this member read anything from it has no known
/// position: whether a writer's records wait past it, the watermark cannot say, so a batch
/// with `end_at_watermark` waits for them. Here each fetch brings one partition's record: the
/// first transaction's two records are one batch, not two.
#[test]
fn a_batch_at_the_watermark_waits_for_partitions_of_unknown_position() {
    let (args, topic) = input("unknown-position");
    // One record batch per fetch response.
    let one_batch_per_fetch = [
        ("message.max.bytes", "1000"),
        ("fetch.max.bytes", "1000"),
        ("max.partition.fetch.bytes", "1"),
    ];
    let mut group = member(&args, &topic, &one_batch_per_fetch);
    let limits = BatchLimits {
        records: 1000,
        weight: u64::MAX,
        idle: Duration::from_secs(60),
        max_wait: Duration::from_secs(60),
        wait_for_open: true,
        read_through: true,
        end_at_watermark: true,
    };
    // Joined, and the end of both (empty) partitions told.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(group.loaded().len() == 2 && group.all_heard()) {
        assert!(group.collect(limits, &mut Nothing).unwrap().is_empty());
        assert!(Instant::now() < deadline, "not joined");
    }
    let producer = writer(&args, "writer");
    commit_to_both(&producer, &topic, &"x".repeat(900));
    let mut batches = Vec::new();
    while batches.iter().sum::<usize>() < 2 {
        let batch = group.collect(limits, &mut Nothing).unwrap();
        if !batch.is_empty() {
            batches.push(batch.len());
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(60),
            "no records"
        );
    }
    assert_eq!(batches, [2], "one transaction's records in several batches");
    group.leave();
}

/// The stage's view upstream ([`PartitionState::upstream_drained`]).
struct Upstream {
    drained: bool,
}
impl PartitionState for Upstream {
    fn upstream_drained(&mut self) -> bool {
        self.drained
    }
}

/// With work left upstream (the aggregator's parsers have units not yet in a committed
/// transaction), a batch read to the watermark does not end there: it waits for the end to be
/// told, by when the writer's next transaction shows as open, and takes that one too. With
/// nothing left, the same records end the batch at the watermark.
#[test]
fn a_batch_at_the_watermark_waits_while_upstream_has_work_left() {
    let (args, topic) = input("upstream");
    let producer = std::sync::Arc::new(writer(&args, "writer"));
    // The end is told with a fetch response the broker holds up to 5 s.
    let mut group = member(&args, &topic, &[("fetch.wait.max.ms", "5000")]);
    let limits = BatchLimits {
        records: 1000,
        weight: u64::MAX,
        idle: Duration::from_secs(60),
        max_wait: Duration::from_secs(60),
        wait_for_open: true,
        read_through: false,
        end_at_watermark: true,
    };
    let mut next_batch = |drained: bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let batch = group.collect(limits, &mut Upstream { drained }).unwrap();
            if !batch.is_empty() {
                return batch.len();
            }
            assert!(Instant::now() < deadline, "no records");
        }
    };
    commit_to_both(&producer, &topic, "a");
    let mut got = next_batch(true);
    if got < 2 {
        got += next_batch(true);
    }
    assert_eq!(got, 2);

    // Nothing left upstream: the batch ends at the watermark, before the next transaction.
    commit_to_both(&producer, &topic, "b");
    let started = Instant::now();
    let opener = next_transaction(&producer, &topic);
    assert_eq!(
        next_batch(true),
        2,
        "one transaction's records in two batches"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}: the batch waited with nothing left upstream",
        started.elapsed()
    );
    opener.join().unwrap();
    assert_eq!(next_batch(true), 1);

    // Work left upstream: the batch waits past the watermark and takes the next transaction.
    commit_to_both(&producer, &topic, "d");
    let opener = next_transaction(&producer, &topic);
    assert_eq!(
        next_batch(false),
        3,
        "the batch ended at the watermark with work left upstream"
    );
    opener.join().unwrap();
    group.leave();
}

/// After 2 s, a transaction of `producer` with one record on partition 0 of `topic`, committed
/// 1 s after it opened.
fn next_transaction(
    producer: &std::sync::Arc<BaseProducer>,
    topic: &str,
) -> std::thread::JoinHandle<()> {
    let (producer, topic) = (producer.clone(), topic.to_owned());
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        producer.begin_transaction().unwrap();
        send_to(&producer, &topic, 0, "next");
        producer.flush(Duration::from_secs(10)).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        producer
            .commit_transaction(Duration::from_secs(30))
            .unwrap();
    })
}

/// The aggregator's question upstream: a unit announced on `tally.files` is left to the parsers
/// until their group commits past it; the transaction marker after it is not a unit.
#[test]
fn the_parsers_have_units_left_until_their_group_commits_past_them() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    use tally_aggregator::upstream::Parsers;
    use tally_core::Topics;

    let (args, _) = input("units-left");
    let topics = Topics::new(&args.topic_prefix);
    crate::liveness::two_partitions(&args, &topics.files);
    let parsers = Parsers::new(&args, &topics).unwrap();
    assert!(!parsers.units_left(), "an empty topic");
    let announcer = writer(&args, "announcer");
    // The parser group's committed offset on partition 1 (a client that never joins it).
    let group: BaseConsumer = kafka::consumer_config(&args, &topics.parser_group)
        .create()
        .unwrap();
    let commit = |offset: i64| {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topics.files, 1, Offset::Offset(offset))
            .unwrap();
        group.commit(&tpl, CommitMode::Sync).unwrap();
    };
    // A transaction of two units: offsets 0 and 1, its marker at 2.
    announcer.begin_transaction().unwrap();
    send_to(&announcer, &topics.files, 1, "unit 0");
    send_to(&announcer, &topics.files, 1, "unit 1");
    announcer
        .commit_transaction(Duration::from_secs(30))
        .unwrap();
    assert!(
        parsers.units_left(),
        "nothing committed, two units announced"
    );
    commit(1);
    assert!(parsers.units_left(), "one unit left");
    commit(2);
    assert!(
        !parsers.units_left(),
        "only the transaction's marker is past the committed offset"
    );
    // One more unit (offset 3, its marker at 4).
    announcer.begin_transaction().unwrap();
    send_to(&announcer, &topics.files, 1, "unit 3");
    announcer
        .commit_transaction(Duration::from_secs(30))
        .unwrap();
    assert!(parsers.units_left(), "a unit announced after the commit");
    commit(4);
    assert!(!parsers.units_left());
}
