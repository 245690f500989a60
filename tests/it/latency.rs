//! No timer on the critical path: a stage whose input is drained ends its batch at once, so a
//! file's totals do not wait out a flush interval or a batch wait.

use std::time::{Duration, Instant};

use crate::support::Pipeline;

/// With a 60 s aggregator flush interval and a 60 s db-client batch wait, a file's totals are
/// in within seconds of its arrival: every stage commits as soon as its input is drained.
#[tokio::test(flavor = "multi_thread")]
async fn drained_stages_commit_at_once_whatever_their_intervals() {
    let mut p = Pipeline::new("latency").await;
    let _watch = p.spawn("watch", &p.watch_args(&["--settle-ms", "50"]));
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _aggregator = p.spawn(
        "aggregator",
        &[
            "aggregator",
            "--instance-id",
            "g",
            "--flush-interval-ms",
            "60000",
        ],
    );
    let _db = p.spawn(
        "db-client",
        &["db-client", "--from-totals", "--batch-wait-ms", "60000"],
    );
    // A first file: the stages have joined their groups once it is in.
    let (_, mut expected) = p.generate(1, 200_000, 300, 11).await;
    p.wait_ingested(1, Duration::from_secs(120)).await;
    p.assert_totals(&expected, "the first file").await;
    for (n, seed) in [(2, 12), (3, 13)] {
        let started = Instant::now();
        let (_, more) = p.generate(1, 200_000, 300, seed).await;
        for (consumer, amount) in more {
            *expected.entry(consumer).or_default() += amount;
        }
        p.wait_ingested(n, Duration::from_secs(50)).await;
        let took = started.elapsed();
        p.assert_totals(&expected, "a later file").await;
        assert!(
            took < Duration::from_secs(15),
            "file {n} took {took:?}: a stage waited out its interval"
        );
        eprintln!("file {n}: from written to totals in {took:?}");
    }
}

/// Drained means nothing more will come: while a writer's transaction is open on a partition
/// held (the high watermark past the last stable offset), a batch waits for it, up to its
/// `max_wait`, so the sums of two parsers finishing close together are merged once, not
/// written twice. Once no transaction is open, a drained batch ends at once.
#[test]
fn a_batch_waits_for_a_transaction_open_upstream_then_ends_at_once() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use tally_core::consume::{BatchLimits, Group, PartitionState};
    use tally_core::kafka;

    struct Nothing;
    impl PartitionState for Nothing {}

    let args = tally_core::KafkaArgs::plaintext(
        &tally_testkit::services().kafka_bootstrap,
        &tally_testkit::unique("drain"),
    );
    let topic = crate::liveness::input_topic(&args);
    let writer = |name: &str| {
        let producer: BaseProducer = kafka::transactional_producer_config(
            &args,
            &format!("{}.{name}", args.topic_prefix),
            Duration::from_secs(60),
        )
        .create()
        .unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        producer
    };
    let send = |producer: &BaseProducer, partition: i32, payload: &str| {
        producer
            .send(
                BaseRecord::<(), _>::to(&topic)
                    .partition(partition)
                    .payload(payload),
            )
            .unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
    };
    let (first, second) = (writer("first"), writer("second"));
    let liveness =
        tally_core::liveness::Liveness::start_with("test", &args, Duration::from_secs(600), |_| {});
    let mut group = Group::new(
        "test",
        &kafka::consumer_config(&args, &format!("{}.group", args.topic_prefix)),
        &topic,
        liveness,
        tally_core::shutdown::CancellationToken::new(),
    )
    .unwrap();
    group.subscribe().unwrap();
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
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use tally_core::consume::{BatchLimits, Group, PartitionState};
    use tally_core::kafka;

    struct Nothing;
    impl PartitionState for Nothing {}

    let args = tally_core::KafkaArgs::plaintext(
        &tally_testkit::services().kafka_bootstrap,
        &tally_testkit::unique("watermark"),
    );
    let topic = crate::liveness::input_topic(&args);
    let producer: BaseProducer = kafka::transactional_producer_config(
        &args,
        &format!("{}.writer", args.topic_prefix),
        Duration::from_secs(60),
    )
    .create()
    .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    // One committed transaction with a record on each partition.
    let commit = |payload: &str| {
        producer.begin_transaction().unwrap();
        for partition in 0..2 {
            producer
                .send(
                    BaseRecord::<(), _>::to(&topic)
                        .partition(partition)
                        .payload(payload),
                )
                .unwrap();
        }
        producer
            .commit_transaction(Duration::from_secs(30))
            .unwrap();
    };
    let liveness =
        tally_core::liveness::Liveness::start_with("test", &args, Duration::from_secs(600), |_| {});
    let mut config = kafka::consumer_config(&args, &format!("{}.group", args.topic_prefix));
    config.set("fetch.wait.max.ms", "10000");
    let mut group = Group::new(
        "test",
        &config,
        &topic,
        liveness,
        tally_core::shutdown::CancellationToken::new(),
    )
    .unwrap();
    group.subscribe().unwrap();
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
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use tally_core::consume::{BatchLimits, Group, PartitionState};
    use tally_core::kafka;

    struct Nothing;
    impl PartitionState for Nothing {}

    let args = tally_core::KafkaArgs::plaintext(
        &tally_testkit::services().kafka_bootstrap,
        &tally_testkit::unique("unknown-position"),
    );
    let topic = crate::liveness::input_topic(&args);
    let liveness =
        tally_core::liveness::Liveness::start_with("test", &args, Duration::from_secs(600), |_| {});
    let mut config = kafka::consumer_config(&args, &format!("{}.group", args.topic_prefix));
    // One record batch per fetch response.
    config
        .set("message.max.bytes", "1000")
        .set("fetch.max.bytes", "1000")
        .set("max.partition.fetch.bytes", "1");
    let mut group = Group::new(
        "test",
        &config,
        &topic,
        liveness,
        tally_core::shutdown::CancellationToken::new(),
    )
    .unwrap();
    group.subscribe().unwrap();
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
    let producer: BaseProducer = kafka::transactional_producer_config(
        &args,
        &format!("{}.writer", args.topic_prefix),
        Duration::from_secs(60),
    )
    .create()
    .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    producer.begin_transaction().unwrap();
    let payload = "x".repeat(900);
    for partition in 0..2 {
        producer
            .send(
                BaseRecord::<(), _>::to(&topic)
                    .partition(partition)
                    .payload(&payload),
            )
            .unwrap();
    }
    producer
        .commit_transaction(Duration::from_secs(30))
        .unwrap();
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

/// A stage's commit costs a broker round trip: no poll step of the client library in it.
/// Before, each commit of a threaded producer slept out rust-rdkafka's 100 ms flush step (the
/// producer's own polling thread took the delivery reports the flush waited for): 100 ms per
/// parser transaction and per announced file.
#[test]
fn a_commit_waits_out_no_poll_step() {
    let args = tally_core::KafkaArgs::plaintext(
        &tally_testkit::services().kafka_bootstrap,
        &tally_testkit::unique("quick"),
    );
    let topic = crate::liveness::input_topic(&args);
    let producer = tally_core::txn::producer::create(
        &args,
        &format!("{}.quick", args.topic_prefix),
        Duration::from_secs(60),
    )
    .unwrap();
    let mut commits = Vec::new();
    for i in 0..12 {
        rdkafka::producer::Producer::begin_transaction(&producer).unwrap();
        for partition in 0..2 {
            let payload = format!("record {i}");
            tally_core::txn::producer::send(
                &producer,
                &topic,
                Some(partition),
                None,
                payload.as_bytes(),
            )
            .unwrap();
        }
        let started = Instant::now();
        tally_core::txn::commit(&producer).unwrap();
        commits.push(started.elapsed());
    }
    commits.sort();
    let median = commits[commits.len() / 2];
    assert!(
        median < Duration::from_millis(60),
        "a commit takes {median:?} (median of {commits:?}): it waits out a poll step"
    );
}

/// A file renamed into a watched folder is announced at once: the watch sleeps on the folder's
/// events, and reads the done topic without waiting on it. Before, each turn of its loop first
/// read the done topic for 200 ms, and a new file waited up to that long for its scan.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_renamed_into_a_watched_folder_is_announced_at_once() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;

    let mut p = Pipeline::new("announce-at-once").await;
    let outside = p.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let (files, _) = p.generate_in(&outside, 10, 2_000, 100, 31).await;
    let data = p.data.to_str().unwrap().to_owned();
    // Full rescans far apart: only the folder's events find the files in time.
    let _watch = p.spawn(
        "watch",
        &[
            "producer",
            "watch",
            "--dir",
            &data,
            "--rescan-interval-ms",
            "600000",
            "--settle-ms",
            "0",
        ],
    );
    let reader: BaseConsumer =
        tally_core::kafka::consumer_config(&p.kafka, &tally_testkit::unique("announced"))
            .create()
            .unwrap();
    let partitions = tally_core::kafka::partition_count(&reader, &p.topics.files).unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for partition in 0..partitions {
        tpl.add_partition_offset(&p.topics.files, partition, rdkafka::Offset::Beginning)
            .unwrap();
    }
    reader.assign(&tpl).unwrap();
    // Milliseconds from a file's rename to its announcement's send (the record's create time,
    // stamped by the watch's producer), one per file; the first file waits for the watch to
    // start and is not counted.
    let mut delays = Vec::new();
    let mut next = crate::support::clock_rng("rename pauses");
    for (i, file) in files.iter().enumerate() {
        // Renames at no fixed rhythm: a loop that looks at the folder's events only now and
        // then is met anywhere in its turn.
        std::thread::sleep(Duration::from_millis(100 + next() % 200));
        let from = std::path::Path::new(file);
        let renamed = now_ms();
        std::fs::rename(from, p.data.join(from.file_name().unwrap())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let sent = loop {
            assert!(Instant::now() < deadline, "{file} was not announced");
            if let Some(Ok(record)) = reader.poll(Duration::from_millis(100)) {
                break record.timestamp().to_millis().unwrap();
            }
        };
        if i > 0 {
            delays.push(sent - renamed);
        }
    }
    delays.sort_unstable();
    eprintln!("from rename to announcement, ms: {delays:?}");
    let median = delays[delays.len() / 2];
    assert!(
        median < 40,
        "a renamed file waits {median} ms for its announcement (median of {delays:?} ms)"
    );
}

/// An idle watch sleeps: the events its own scans raise (opening the folder, reading a file)
/// start no further scan. Before, each scan's opening of the folder started the next one, and
/// a watch over a large folder listed it again and again while nothing changed.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_watch_does_not_rescan_its_folder() {
    let mut p = Pipeline::new("idle-watch").await;
    let command = ["producer", "watch"].map(String::from);
    let scans = idle_scans(&mut p, "watch", &command, "watching").await;
    assert!(
        scans <= 1,
        "an idle watch listed its folder {scans} times in 3 s: it keeps scanning it"
    );
}

/// The same of `standalone`, whose passes opened the folder too.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_standalone_does_not_rescan_its_folder() {
    let mut p = Pipeline::new("idle-standalone").await;
    let command = ["standalone".to_owned()];
    let scans = idle_scans(&mut p, "standalone", &command, "standalone started").await;
    assert!(
        scans <= 1,
        "an idle standalone listed its folder {scans} times in 3 s: it keeps scanning it"
    );
}

/// How many times `command` (`--dir` and its settle and rescan times added) listed its folder
/// in 3 s once started (`started` in its log), over 2,000 files that are all still settling:
/// nothing changes, and nothing is counted.
async fn idle_scans(p: &mut Pipeline, name: &str, command: &[String], started: &str) -> usize {
    for i in 0..2_000 {
        std::fs::write(p.data.join(format!("f{i:05}.txt")), "1 1\n").unwrap();
    }
    p.envs.push((
        "RUST_LOG".to_owned(),
        "info,tally_producer::watch=debug".to_owned(),
    ));
    let mut args = command.to_vec();
    args.extend(
        [
            "--rescan-interval-ms",
            "600000",
            "--settle-ms",
            "600000",
            "--dir",
        ]
        .map(String::from),
    );
    args.push(p.data.to_str().unwrap().to_owned());
    let stage = p.spawn(name, &args);
    tally_testkit::eventually(Duration::from_secs(60), "the process started", || async {
        tally_testkit::holds(stage.log_text().contains(started), || stage.log_text())
    })
    .await;
    std::thread::sleep(Duration::from_secs(1));
    let listed = || stage.log_text().matches("folder listed").count();
    let before = listed();
    std::thread::sleep(Duration::from_secs(3));
    let scans = listed() - before;
    eprintln!("an idle {name} over 2,000 files listed its folder {scans} times in 3 s");
    scans
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(since.as_millis()).unwrap()
}
