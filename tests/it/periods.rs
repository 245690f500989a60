//! Usage per period: files with known times (set mtimes, and times in their names) across
//! several periods and a month boundary, through the pipeline with and without the aggregator;
//! every (consumer, period) total must equal an independent computation from the files, and per
//! consumer the sum over its periods must equal `consumer_totals`. Also `tally rollup` while
//! ingestion goes on, and `tally report`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::support::periods::{
    assert_periods, expected_periods, period_totals, set_mtime, OCT_31_22H,
};
use crate::support::Pipeline;

const TIMEOUT: Duration = Duration::from_secs(180);
/// Two pipelines (parsers → db-client, and parsers → aggregator → db-client), each with files
/// whose times come from their mtime and files whose times come from their names. With
/// `backlog`, the parser starts once every file is announced, so its transactions take units
/// of several files, and periods, at once (a parser keeps a unit's sums in its workers' maps
/// while the next unit has the same period).
async fn through(name: &str, aggregator: bool, period: &str, period_secs: i64, backlog: bool) {
    let mut p = Pipeline::new(name).await;
    let (generated, totals) = p.generate(6, 300_000, 2000, 31).await;
    // Mtimes 40 minutes apart from Oct 31 22:00: several periods, two months.
    let mut files: Vec<(String, i64)> = Vec::new();
    for (i, path) in generated.iter().enumerate() {
        let time = OCT_31_22H + i as i64 * 2400 + 17;
        set_mtime(Path::new(path), time);
        files.push((path.clone(), time));
    }
    // Files named by the minute since the epoch (mtime: now, which must not count).
    let named_minutes = [29_891_400i64, 29_891_401, 29_893_000];
    let (more, more_totals) = p.generate(3, 200_000, 2500, 32).await;
    let mut named = Vec::new();
    for (path, minute) in more.iter().zip(named_minutes) {
        let to = p.data.join(format!("{minute}.dat"));
        std::fs::rename(path, &to).unwrap();
        named.push(to.to_str().unwrap().to_owned());
        files.push((to.to_str().unwrap().to_owned(), minute * 60));
    }
    let expected = expected_periods(&files, period_secs);

    let mut parser_args = p.parser_args("a");
    parser_args.extend(["--period".to_owned(), period.to_owned()]);
    let parser = (!backlog).then(|| p.spawn("parser", &parser_args));
    let mut stages = vec![];
    if aggregator {
        stages.push(p.spawn("aggregator", &p.aggregator_args("agg")));
        stages.push(p.spawn("db-client", &["db-client", "--from-totals"]));
    } else {
        stages.push(p.spawn("db-client", &["db-client"]));
    }
    p.publish("100000", &generated).await;
    let mut publish = vec![
        "producer",
        "--unit-bytes",
        "70000",
        "--file-time-from",
        r"name:^(?P<epoch_min>\d+)\.dat$",
        // Fixed dates in the past: no window.
        "--file-time-max-age",
        "off",
        "publish",
    ];
    publish.extend(named.iter().map(String::as_str));
    p.tally(&publish).await;
    let mut parser = parser.unwrap_or_else(|| p.spawn("parser", &parser_args));
    p.wait_ingested(9, TIMEOUT).await;

    let mut all = totals;
    for (k, v) in more_totals {
        *all.entry(k).or_default() += v;
    }
    p.assert_totals(&all, "ingestion").await;
    assert_periods(&p, &expected, "ingestion").await;
    // The months got their partitions (and the next month's, ahead).
    let partitions: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'consumer_period_history'::regclass ORDER BY 1",
    )
    .fetch_all(&p.pool)
    .await
    .unwrap();
    for month in ["2026_10", "2026_11", "2026_12"] {
        assert!(
            partitions.contains(&format!("consumer_period_totals_{month}")),
            "{partitions:?}"
        );
    }
    parser.kill9();
    for mut stage in stages {
        stage.kill9();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hourly_periods_without_the_aggregator() {
    through("periods", false, "1h", 3600, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quarter_hour_periods_through_the_aggregator() {
    through("periods-agg", true, "15m", 900, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn periods_off_write_no_period_rows() {
    let mut p = Pipeline::new("periods-off").await;
    let (files, totals) = p.generate(2, 100_000, 500, 33).await;
    let mut parser_args = p.parser_args("a");
    parser_args.extend(["--period".to_owned(), "off".to_owned()]);
    let mut parser = p.spawn("parser", &parser_args);
    let mut db = p.spawn("db-client", &["db-client"]);
    p.publish("1000000", &files).await;
    p.wait_ingested(2, TIMEOUT).await;
    p.assert_totals(&totals, "ingestion").await;
    assert!(period_totals(&p).await.is_empty());
    parser.kill9();
    db.kill9();
}

/// 2026-10-05T00:00:00Z.
const OCT_5: i64 = 1_791_158_400;

/// Old hourly periods are folded into days by `tally rollup`, run again and again while late
/// files of those periods keep being ingested: every consumer's sum stays exact, and in the
/// end each old day is one row per consumer holding exactly that day's usage. Then `tally
/// report` prints the same figures.
#[tokio::test(flavor = "multi_thread")]
async fn rollup_while_ingesting_keeps_every_sum_and_report_prints_them() {
    let mut p = Pipeline::new("rollup").await;
    let (generated, totals) = p.generate(10, 120_000, 300, 41).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // Eight old files, 5 h apart over two days (Oct 5 and 6), and two from the last hour.
    let mut files: Vec<(String, i64)> = Vec::new();
    for (i, path) in generated.iter().enumerate() {
        let time = if i < 8 {
            OCT_5 + i as i64 * 18_000 + 600
        } else {
            now - 1800 - i as i64
        };
        set_mtime(Path::new(path), time);
        files.push((path.clone(), time));
    }
    let mut parser = p.spawn("parser", &p.parser_args("a"));
    let mut db = p.spawn("db-client", &["db-client"]);
    p.publish("50000", &generated[..4]).await;
    p.wait_ingested(4, TIMEOUT).await;
    let rollup = ["rollup", "--older-than", "1d", "--to", "1d"];
    // The rest arrives while rollups run.
    for file in &generated[4..] {
        p.publish("50000", std::slice::from_ref(file)).await;
        let out = p.tally(&rollup).await;
        assert!(out.starts_with("folded "), "{out}");
    }
    p.wait_ingested(10, TIMEOUT).await;
    p.assert_totals(&totals, "ingestion with rollups").await;
    p.tally(&rollup).await;
    // Old files by day, recent ones by hour.
    let mut expected = expected_periods(&files[..8], 86_400);
    for (k, v) in expected_periods(&files[8..], 3600) {
        *expected.entry(k).or_default() += v;
    }
    assert_periods(&p, &expected, "rollups").await;
    // Again: nothing left to fold.
    let out = p.tally(&rollup).await;
    assert!(out.starts_with("folded 0 rows"), "{out}");

    // The report: per day for October, one consumer, as CSV.
    let (consumer, _) = *expected.keys().find(|(_, start)| *start == OCT_5).unwrap();
    let csv = p
        .tally(&[
            "report",
            "--from",
            "2026-10-05",
            "--to",
            "2026-10-07T00:00:00Z",
            "--consumer",
            &consumer.to_string(),
            "--csv",
        ])
        .await;
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("consumer_id,period_start,total,open"));
    let rows: Vec<&str> = lines.collect();
    let day = |start: i64| expected.get(&(consumer, start)).copied().unwrap_or(0);
    let want: Vec<String> = [(OCT_5, "2026-10-05"), (OCT_5 + 86_400, "2026-10-06")]
        .iter()
        .filter(|(start, _)| day(*start) != 0)
        .map(|(start, date)| format!("{consumer},{date}T00:00Z,{},false", day(*start)))
        .collect();
    assert_eq!(rows, want);
    // By month, all consumers: the month's total per consumer; the current hour is open.
    let text = p
        .tally(&[
            "report",
            "--from",
            "2026-10-01",
            "--to",
            "2026-11-01",
            "--by",
            "month",
        ])
        .await;
    let october: i128 = text
        .lines()
        .skip(1)
        .map(|l| {
            l.split_whitespace()
                .nth(2)
                .unwrap()
                .parse::<i128>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        october,
        expected
            .iter()
            .filter(|((_, s), _)| *s < now - 86_400)
            .map(|(_, v)| v)
            .sum::<i128>()
    );
    let recent = p
        .tally(&[
            "report", "--from", "today", "--to", "tomorrow", "--by", "hour",
        ])
        .await;
    // The two recent files' hour is open unless it ended before the report ran (the test can
    // span an hour's end).
    let reported = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let recent_hour_end = files[8..]
        .iter()
        .map(|(_, time)| (time.div_euclid(3600) + 1) * 3600)
        .max()
        .unwrap();
    assert!(
        recent.lines().skip(1).any(|l| l.ends_with("open")) || reported >= recent_hour_end - 5,
        "{recent}"
    );
    let bad = p
        .output(
            &["report", "--from", "yesterday-ish", "--to", "now"],
            &[],
            TIMEOUT,
        )
        .await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--from"));
    parser.kill9();
    db.kill9();
}

/// File times from names outside `--file-time-max-age`/`--file-time-max-ahead` are refused,
/// never booked, by `producer watch` and by `standalone`; a name inside the window counts.
#[tokio::test(flavor = "multi_thread")]
async fn file_times_outside_the_window_are_refused_never_booked() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let pattern = r"name:^(?P<epoch_s>\d+)\.dat$";
    let names = [
        (now - 40 * 86_400, "1 1\n", false), // before the window: a closed month
        (now + 3 * 3600, "2 2\n", false),    // ahead of the window
        (100, "3 3\n", false),               // 1970: a partition for every month on the way
        (now - 86_400, "4 4\n", true),       // yesterday: inside
    ];
    let write = |dir: &Path| {
        for (time, body, _) in names {
            std::fs::write(dir.join(format!("{time}.dat")), body).unwrap();
        }
    };
    let counted = HashMap::from([(4i64, 4i128)]);

    // producer watch.
    let mut p = Pipeline::new("file-time-window").await;
    write(&p.data);
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    let mut watch = vec![
        "producer".to_owned(),
        "--file-time-from".to_owned(),
        pattern.to_owned(),
    ];
    watch.extend(p.watch_args(&["--settle-ms", "0"]).into_iter().skip(1));
    let watcher = p.spawn("watch", &watch);
    p.wait_ingested(1, TIMEOUT).await;
    tally_testkit::eventually(TIMEOUT, "three refusals in the log", || async {
        let log = watcher.log_text();
        let n = log.matches("file refused").count();
        tally_testkit::holds(n == 3, || format!("{n} refusals:\n{log}"))
    })
    .await;
    // A rescan later, nothing more was announced, nothing booked, no partition made.
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.assert_totals(&counted, "watch with refused names").await;
    assert_eq!(
        p.read_topic(&p.topics.files).len(),
        1,
        "only the file inside was announced"
    );
    let partitions: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'consumer_period_history'::regclass",
    )
    .fetch_all(&p.pool)
    .await
    .unwrap();
    assert!(
        !partitions.iter().any(|t| t.contains("1970")),
        "{partitions:?}"
    );
    drop(watcher);

    // standalone.
    let mut s = Pipeline::new("file-time-window-standalone").await;
    write(&s.data);
    let data = s.data.to_str().unwrap().to_owned();
    let args = [
        "standalone",
        "--dir",
        &data,
        "--settle-ms",
        "0",
        "--rescan-interval-ms",
        "300",
        "--file-time-from",
        pattern,
    ];
    let stage = s.spawn("standalone", &args);
    s.wait_ingested(1, TIMEOUT).await;
    tally_testkit::eventually(TIMEOUT, "three refusals in the log", || async {
        let log = stage.log_text();
        let n = log.matches("file refused").count();
        tally_testkit::holds(n == 3, || format!("{n} refusals:\n{log}"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.assert_totals(&counted, "standalone with refused names")
        .await;
    assert_eq!(
        stage.log_text().matches("file refused").count(),
        3,
        "each refused file is said once"
    );
}
