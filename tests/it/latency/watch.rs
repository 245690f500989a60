//! `producer watch` and `standalone` look at their folder when it changes: at once, and not
//! again for their own reads.

use std::time::{Duration, Instant};

use crate::support::Pipeline;

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
    // Full rescans far apart: only the folder's events find the files in time.
    let _watch = p.spawn(
        "watch",
        &p.watch_args(&["--rescan-interval-ms", "600000", "--settle-ms", "0"]),
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
