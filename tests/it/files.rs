//! File identity over time, against the real pipeline: a file announced again with other unit
//! sizes, a file that grows, a file rewritten in place, each counted byte for byte once; and
//! the done-set forgetting the files that are gone, never those still there; a name reused
//! before parsing, a file written in place announced once it settled, files with rejected
//! units kept and listed.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use tally_model::identity;
use tally_model::messages::DeadLetter;

use crate::support::{read_records, Pipeline};

const TIMEOUT: Duration = Duration::from_secs(120);

/// `n` lines `<id> <amount>` (ids 0..37, amounts that differ per `seed`), and their sums.
fn lines(seed: i64, n: i64) -> (String, HashMap<i64, i128>) {
    let (mut text, mut sums) = (String::new(), HashMap::new());
    for i in 0..n {
        let (id, amount) = ((seed * 7 + i * 11) % 37, (seed * 131 + i * 17) % 1_000 + 1);
        text.push_str(&format!("{id} {amount}\n"));
        *sums.entry(id).or_default() += i128::from(amount);
    }
    (text, sums)
}

fn add(to: &mut HashMap<i64, i128>, sums: &HashMap<i64, i128>) {
    for (id, sum) in sums {
        *to.entry(*id).or_default() += sum;
    }
}

fn append(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

fn version(path: &Path) -> String {
    identity::file_id(&std::fs::metadata(path).unwrap())
}

/// Polls the totals until they equal `expected` (the pipeline catching up), or panics.
async fn wait_totals(p: &Pipeline, expected: &HashMap<i64, i128>, what: &str) {
    tally_testkit::eventually(TIMEOUT, what, || async {
        let totals = p.totals().await;
        let differ = expected
            .iter()
            .filter(|(k, v)| totals.get(k) != Some(v))
            .count();
        tally_testkit::holds(totals == *expected, || {
            format!(
                "{differ} of {} consumers differ, {} in the database",
                expected.len(),
                totals.len()
            )
        })
    })
    .await;
    p.wait_files_consumed(TIMEOUT).await;
    // Anything produced by a (wrong) second count would show up by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.assert_totals(expected, what).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_announced_with_other_unit_sizes_counts_each_byte_once() {
    let mut p = Pipeline::new("splits").await;
    let (files, expected) = p.generate(2, 3_000_000, 1_000, 71).await;
    // Cut points anywhere inside lines, one split a prefix of none of the others.
    for unit_bytes in ["1000000", "300007", "2999999"] {
        p.publish(unit_bytes, &files).await;
    }
    let _a = p.spawn("parser-a", &p.parser_args("a"));
    let _b = p.spawn("parser-b", &p.parser_args("b"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.wait_ingested(2, TIMEOUT).await;
    // Once more while running, by a watcher with yet another unit size and no state.
    let data = p.data.to_str().unwrap().to_owned();
    p.tally(&[
        "producer",
        "--unit-bytes",
        "450001",
        "watch",
        "--dir",
        &data,
        "--once",
        "--settle-ms",
        "0",
    ])
    .await;
    wait_totals(&p, &expected, "a file announced with four unit sizes").await;
    let bytes = p.summed_bytes();
    for file in &files {
        let size = std::fs::metadata(file).unwrap().len();
        assert_eq!(
            bytes[&version(Path::new(file))],
            size,
            "{file}: bytes summed"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn appends_count_only_new_lines_and_rewrites_count_anew() {
    let mut p = Pipeline::new("grow").await;
    let grow = p.data.join("grow.txt");
    let rewrite = p.data.join("rewrite.txt");
    let mut expected = HashMap::new();

    // While no parser runs: grow.txt announced, appended to, announced again; rewrite.txt
    // announced, rewritten in place (same inode, other content), announced again.
    let (g1, s) = lines(1, 300);
    add(&mut expected, &s);
    std::fs::write(&grow, &g1).unwrap();
    p.publish("1000", &[&grow.to_str().unwrap()]).await;
    let (g2, s) = lines(2, 200);
    add(&mut expected, &s);
    append(&grow, &g2);
    p.publish("777", &[&grow.to_str().unwrap()]).await;
    let (r1, _) = lines(3, 100);
    std::fs::write(&rewrite, &r1).unwrap();
    p.publish("1000000", &[&rewrite.to_str().unwrap()]).await;
    let (r2, s) = lines(4, 150);
    add(&mut expected, &s);
    std::fs::write(&rewrite, &r2).unwrap();
    p.publish("1000000", &[&rewrite.to_str().unwrap()]).await;

    // touched.txt: announced, then only touched (a new mtime, same bytes), announced again.
    let touched = p.data.join("touched.txt");
    let (t1, s) = lines(7, 90);
    add(&mut expected, &s);
    std::fs::write(&touched, &t1).unwrap();
    p.publish("1000", &[&touched.to_str().unwrap()]).await;
    let later = std::time::SystemTime::now() + Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&touched)
        .unwrap()
        .set_modified(later)
        .unwrap();
    p.publish("333", &[&touched.to_str().unwrap()]).await;

    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    wait_totals(&p, &expected, "appended, rewritten, touched while queued").await;
    let dead: Vec<DeadLetter> = p
        .read_topic(&p.topics.dead_letter)
        .iter()
        .map(|(_, v)| serde_json::from_slice(v).unwrap())
        .collect();
    match &dead[..] {
        [DeadLetter::RejectedUnit { reason, path, .. }] => {
            assert!(reason.contains("rewritten in place"), "{reason}");
            assert!(path.ends_with("rewrite.txt"), "{path}");
        }
        other => panic!("the rewritten file's old unit must be rejected, once: {other:?}"),
    }

    // While running, through a watcher: grow.txt grows again (and is also published with
    // units that cut its lines anywhere), then is rewritten in place with new content.
    let _watch = p.spawn("watch", &p.watch_args(&["--settle-ms", "300"]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (g3, s) = lines(5, 250);
    add(&mut expected, &s);
    append(&grow, &g3);
    p.publish("50", &[&grow.to_str().unwrap()]).await;
    let grown = version(&grow);
    wait_totals(&p, &expected, "appended while running").await;
    assert_eq!(
        p.summed_bytes()[&grown],
        g3.len() as u64,
        "the grown version summed only its new bytes"
    );
    let (g4, s) = lines(6, 80);
    add(&mut expected, &s);
    std::fs::write(&grow, &g4).unwrap();
    wait_totals(&p, &expected, "rewritten in place while running").await;
    let complete: i64 = sqlx::query_scalar("SELECT count(*) FROM ingested_files WHERE complete")
        .fetch_one(&p.pool)
        .await
        .unwrap();
    assert!(
        complete >= 5,
        "every counted version complete in the ledger: {complete}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn done_states_of_files_gone_are_pruned_and_of_files_there_kept() {
    let mut p = Pipeline::new("prune").await;
    let mut expected = HashMap::new();
    let mut paths = Vec::new();
    for (i, name) in ["a.txt", "b.txt", "c.txt"].iter().enumerate() {
        let (text, sums) = lines(10 + i as i64, 120);
        add(&mut expected, &sums);
        let path = p.data.join(name);
        std::fs::write(&path, text).unwrap();
        paths.push(path.to_str().unwrap().to_owned());
    }
    p.publish("100", &paths).await;
    let mut parser_args = p.parser_args("a");
    parser_args.extend(["--done-retention".to_owned(), "1s".to_owned()]);
    let parser = p.spawn("parser", &parser_args);
    let _db = p.spawn("db-client", &["db-client"]);
    p.wait_ingested(3, TIMEOUT).await;
    let streams: Vec<String> = paths
        .iter()
        .map(|f| identity::stream_id(&std::fs::metadata(f).unwrap()))
        .collect();

    // a and b are gone (deleted, archived elsewhere); c stays.
    std::fs::remove_file(&paths[0]).unwrap();
    std::fs::rename(&paths[1], p.dir.join("b-archived.txt")).unwrap();
    tally_testkit::eventually(Duration::from_secs(60), "the done-set pruned", || async {
        let log = parser.log_text();
        tally_testkit::holds(log.contains("done-set pruned"), || log)
    })
    .await;
    // The log line comes as the tombstones are sent; they are read once their transaction
    // commits.
    let latest_states = || {
        let mut latest: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        for (_, key, payload) in read_records(&p.kafka, &p.topics.done) {
            latest.insert(key.expect("done records are keyed by stream"), payload);
        }
        latest
    };
    let latest = tally_testkit::eventually(
        Duration::from_secs(30),
        "the gone files' states are tombstones",
        || async {
            let latest = latest_states();
            let live = streams[..2]
                .iter()
                .any(|s| latest.get(s.as_bytes()).is_some_and(Option::is_some));
            if live {
                Err(format!(
                    "{} keys, a gone file's state still live",
                    latest.len()
                ))
            } else {
                Ok(latest)
            }
        },
    )
    .await;
    assert_eq!(latest.len(), 3, "one key per file, however many units");
    assert!(latest[streams[0].as_bytes()].is_none(), "a pruned");
    assert!(latest[streams[1].as_bytes()].is_none(), "b pruned");
    assert!(
        latest[streams[2].as_bytes()].is_some(),
        "c kept: it is still there"
    );

    // c, still there, may be announced again: it is not counted again.
    p.publish("64", &paths[2..]).await;
    wait_totals(&p, &expected, "c announced again after pruning").await;

    // `tally inspect` shows what is on the topics: the binary sums add up to the totals, and
    // the pruned states are tombstones.
    let sums = p.tally(&["inspect", "sums", "--json"]).await;
    let mut shown: HashMap<i64, i128> = HashMap::new();
    for line in sums.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["record"]["type"] == "sums" {
            for pair in v["record"]["sums"].as_array().unwrap() {
                *shown.entry(pair[0].as_i64().unwrap()).or_default() +=
                    i128::from(pair[1].as_i64().unwrap());
            }
        }
    }
    assert_eq!(shown, expected, "tally inspect sums --json");
    let done = p.tally(&["inspect", "done"]).await;
    assert_eq!(done.matches("tombstone").count(), 2, "{done}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_reused_before_parsing_counts_only_the_new_file() {
    let mut p = Pipeline::new("reused").await;
    // A is announced while no parser runs...
    let path = p.data.join("usage.txt");
    std::fs::write(&path, "1 100\n2 200\n").unwrap();
    p.tally(&["producer", "publish", path.to_str().unwrap()])
        .await;
    // ...then B, of the same size, is renamed over A's name and announced too.
    let tmp = p.data.join(".b.tmp");
    std::fs::write(&tmp, "3 300\n4 400\n").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    p.tally(&["producer", "publish", path.to_str().unwrap()])
        .await;

    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.wait_ingested(1, TIMEOUT).await;
    let dead = p.dead_letters_until(TIMEOUT, |d| !d.is_empty()).await;
    match &dead[..] {
        [DeadLetter::RejectedUnit { reason, .. }] => {
            assert!(reason.contains("not the announced file"), "{reason}")
        }
        other => panic!("A's unit must be rejected, once: {other:?}"),
    }
    p.wait_files_consumed(TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        p.totals().await,
        HashMap::from([(3, 300), (4, 400)]),
        "B counted once, nothing read as A"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_written_in_place_is_announced_once_it_settled() {
    use std::io::Write;
    let mut p = Pipeline::new("settle").await;
    let _watch = p.spawn("watch", &p.watch_args(&["--settle-ms", "1500"]));
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    // No rename, no lock: the writer appends a line every 300 ms for three seconds.
    let mut file = std::fs::File::create(p.data.join("inplace.txt")).unwrap();
    for _ in 0..10 {
        file.write_all(b"9 1\n").unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(file);
    p.wait_ingested(1, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        p.totals().await,
        HashMap::from([(9, 10)]),
        "all ten lines, once"
    );
    let dead = p.read_topic(&p.topics.dead_letter);
    assert!(
        dead.is_empty(),
        "nothing rejected: {} dead letters",
        dead.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn files_with_rejected_units_are_kept_and_listed_not_deleted() {
    let mut p = Pipeline::new("lifecycle").await;
    let _watch = p.spawn(
        "watch",
        &p.watch_args(&["--settle-ms", "0", "--after-done", "delete"]),
    );
    // Under --bad-lines=fail a unit with a bad line is rejected: not in the totals.
    let mut parser_args = p.parser_args("a");
    parser_args.extend(["--bad-lines".to_owned(), "fail".to_owned()]);
    let _parser = p.spawn("parser", &parser_args);
    let _db = p.spawn("db-client", &["db-client"]);
    for (name, body) in [("good.txt", "1 1\n"), ("bad.txt", "2 2\nnot a line\n")] {
        let tmp = p.data.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, p.data.join(name)).unwrap();
    }
    let listed = p.data.join(".tally-rejected");
    tally_testkit::eventually(
        TIMEOUT,
        "good.txt deleted and bad.txt listed as rejected",
        || async {
            let list = std::fs::read_to_string(&listed);
            let done = !p.data.join("good.txt").exists()
                && list.as_ref().is_ok_and(|l| l.contains("bad.txt"));
            tally_testkit::holds(done, || {
                format!(
                    "good.txt deleted: {}, rejected list: {list:?}",
                    !p.data.join("good.txt").exists()
                )
            })
        },
    )
    .await;
    assert!(
        p.data.join("bad.txt").exists(),
        "a file that is not in the totals must not be deleted"
    );
    let line = std::fs::read_to_string(&listed).unwrap();
    // Rejected bytes of the file's bytes: all 15 of them.
    assert!(line.contains(" 15/15 "), "{line}");
    // Done (parsed, in Kafka) comes before "in the totals": wait for the db-client.
    p.wait_ingested(1, TIMEOUT).await;
    assert_eq!(p.totals().await, HashMap::from([(1, 1)]));
}

/// A file truncated while the parser has it mapped: the parser process lives on (no SIGBUS
/// death), the unit is rejected with the reason, and the other files count exactly.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_truncated_while_it_is_parsed_is_rejected_and_the_parser_lives() {
    let mut p = Pipeline::new("truncated").await;
    let mut parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    // Big enough to be mapped for a while by the (debug) parser: 96 MiB.
    let big = p.data.join("big.txt");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let line = b"123456 7\n";
        for _ in 0..(96 << 20) / line.len() {
            out.write_all(line).unwrap();
        }
        out.flush().unwrap();
    }
    let (good_text, good) = lines(5, 1000);
    let small = p.data.join("small.txt");
    std::fs::write(&small, good_text).unwrap();
    let maps = format!("/proc/{}/maps", parser.child.id());
    let big_name = big.to_str().unwrap().to_owned();
    p.publish("1073741824", &[big_name.as_str()]).await;
    tally_testkit::eventually(TIMEOUT, "the parser maps big.txt", || async {
        let mapped = std::fs::read_to_string(&maps).unwrap_or_default();
        tally_testkit::holds(mapped.contains(&big_name), || "not mapped yet".into())
    })
    .await;
    std::fs::File::options()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(4096)
        .unwrap();
    p.publish("1073741824", &[small.to_str().unwrap()]).await;
    let dead = p
        .dead_letters_until(TIMEOUT, |dead| {
            dead.iter().any(
                |d| matches!(d, DeadLetter::RejectedUnit { path, .. } if path.ends_with("big.txt")),
            )
        })
        .await;
    let reason = dead
        .iter()
        .find_map(|d| match d {
            DeadLetter::RejectedUnit { path, reason, .. } if path.ends_with("big.txt") => {
                Some(reason.clone())
            }
            _ => None,
        })
        .unwrap();
    assert!(reason.contains("shrank"), "{reason}");
    wait_totals(&p, &good, "the small file, beside the truncated one").await;
    assert!(
        parser.child.try_wait().unwrap().is_none(),
        "the parser died: {}",
        parser.log_text()
    );
}

/// A file in the watched folder that another producer announced and the pipeline counted
/// before the watch saw it (held back by a lock file here; `producer serve` writing into the
/// folder in practice): the watch's own announcement is skipped, no new done record comes, and
/// the file must still be cleared from what the watch read before.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_counted_before_the_watch_announced_it_is_still_cleared() {
    let mut p = Pipeline::new("done-first").await;
    let path = p.data.join("first.txt");
    std::fs::write(p.data.join("first.txt.lock"), b"").unwrap();
    std::fs::write(&path, b"4 10\n5 20\n").unwrap();
    let _watch = p.spawn(
        "watch",
        &p.watch_args(&["--settle-ms", "0", "--after-done", "delete"]),
    );
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.publish("1048576", &[path.to_str().unwrap()]).await;
    p.wait_ingested(1, TIMEOUT).await;
    // The watch reads the done record now, while the file is not pending yet.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(path.exists(), "deleted while locked");
    std::fs::remove_file(p.data.join("first.txt.lock")).unwrap();
    let logs = format!(
        "the watch clears the counted file (logs in {})",
        p.dir.display()
    );
    tally_testkit::eventually(Duration::from_secs(30), &logs, || async {
        tally_testkit::holds(!path.exists(), || "still there".into())
    })
    .await;
    assert_eq!(p.totals().await, HashMap::from([(4, 10), (5, 20)]), "once");
}
