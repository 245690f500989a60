//! `tally standalone`: one process and PostgreSQL, no Kafka. SIGKILLed again and again while
//! files keep arriving, it must leave exact totals and period totals with every unit applied
//! once; and duplicate sightings, other unit sizes, name reuse, growing and rewritten files,
//! locked files and the life cycle follow the pipeline's rules.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::periods::{self, set_mtime};
use crate::support::{clock_rng, Pipeline};

const TIMEOUT: Duration = Duration::from_secs(180);

fn standalone_args(p: &Pipeline, unit_bytes: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "standalone",
        "--dir",
        p.data.to_str().unwrap(),
        "--unit-bytes",
        unit_bytes,
        "--settle-ms",
        "300",
        "--rescan-interval-ms",
        "500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Writes `files` generated files into `p.dir/incoming-SEED` (not yet in the watched folder).
async fn generate_outside(
    p: &Pipeline,
    files: u32,
    size: u64,
    seed: u64,
) -> (Vec<PathBuf>, HashMap<i64, i128>) {
    let incoming = p.dir.join(format!("incoming-{seed}"));
    let (paths, expected) = p.generate_in(&incoming, files, size, 4000, seed).await;
    (paths.into_iter().map(PathBuf::from).collect(), expected)
}

async fn units_applied(p: &Pipeline) -> Vec<(String, i32)> {
    sqlx::query_as("SELECT unit_id, partitions_seen FROM ingested_units")
        .fetch_all(&p.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn standalone_is_exact_after_repeated_kill_9_while_files_arrive() {
    let mut p = Pipeline::new("standalone-crash").await;
    let (files, expected) = generate_outside(&p, 12, 1_000_000, 51).await;
    let args = standalone_args(&p, "262144", &[]);
    let mut stage = p.spawn("standalone", &args);
    let mut next = clock_rng("standalone crash");
    // Each file lands by rename (with a time 35 minutes after the previous one), then the
    // process is killed at a random moment and restarted.
    let mut timed = Vec::new();
    let mut kills = 0;
    for (i, file) in files.iter().enumerate() {
        let time = periods::OCT_31_22H + i as i64 * 2100;
        set_mtime(file, time);
        let to = p.data.join(file.file_name().unwrap());
        std::fs::rename(file, &to).unwrap();
        timed.push((to.to_str().unwrap().to_owned(), time));
        tokio::time::sleep(Duration::from_millis(100 + next() % 1500)).await;
        stage.kill9();
        kills += 1;
        if matches!(next() % 3, 0) {
            tokio::time::sleep(Duration::from_millis(next() % 1000)).await;
        }
        stage = p.spawn("standalone", &args);
    }
    eprintln!("{kills} kills");
    p.wait_ingested(12, TIMEOUT).await;
    p.assert_totals(&expected, &format!("{kills} kills")).await;
    periods::assert_periods(&p, &periods::expected_periods(&timed, 3600), "kills").await;
    // Every unit applied once: 12 files of 1 MB in 256 KiB units.
    let units = units_applied(&p).await;
    assert_eq!(units.len(), 12 * 4, "{units:?}");
    assert!(units.iter().all(|(_, seen)| *seen == 1), "{units:?}");
    stage.kill9();
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

fn add(into: &mut HashMap<i64, i128>, text: &str) {
    for line in text.lines() {
        let (id, amount) = line.split_once(' ').unwrap();
        *into.entry(id.parse().unwrap()).or_default() += amount.parse::<i128>().unwrap();
    }
}

/// Waits until `ingested_files` has `n` complete versions.
async fn wait_versions(p: &Pipeline, n: i64) {
    p.wait_ingested(n, TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn standalone_follows_the_pipeline_rules_at_the_edges() {
    let mut p = Pipeline::new("standalone-edges").await;
    let mut expected: HashMap<i64, i128> = HashMap::new();
    let a = p.data.join("a.txt");
    let text_a = "1 10\n2 20\n3 30\n";
    std::fs::write(&a, text_a).unwrap();
    add(&mut expected, text_a);
    // Locked: not counted while the lock is there.
    let locked = p.data.join("locked.txt");
    std::fs::write(&locked, "9 900\n").unwrap();
    std::fs::write(p.data.join("locked.txt.lock"), "").unwrap();
    std::fs::write(p.data.join("ignored.part"), "8 800\n").unwrap();
    let mut stage = p.spawn("standalone", &standalone_args(&p, "7", &[]));
    wait_versions(&p, 1).await;
    p.assert_totals(&expected, "a.txt").await;
    stage.kill9();

    // Seen again with another unit size by a restarted instance: nothing more.
    let mut stage = p.spawn("standalone", &standalone_args(&p, "1000", &[]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.assert_totals(&expected, "a.txt again, other unit size")
        .await;

    // Grown: only the new lines.
    append(&a, "1 5\n4 40\n");
    add(&mut expected, "1 5\n4 40\n");
    wait_versions(&p, 2).await;
    p.assert_totals(&expected, "append").await;

    // A new file under an old name: counted as a new file.
    let replacement = p.dir.join("a.new");
    std::fs::write(&replacement, "5 500\n").unwrap();
    std::fs::rename(&replacement, &a).unwrap();
    add(&mut expected, "5 500\n");
    wait_versions(&p, 3).await;
    p.assert_totals(&expected, "name reuse").await;

    // Rewritten in place (same inode, other content): the new content counts.
    std::fs::write(&a, "6 60\n7 70\n").unwrap();
    add(&mut expected, "6 60\n7 70\n");
    wait_versions(&p, 4).await;
    p.assert_totals(&expected, "rewrite in place").await;

    // The lock goes: the file counts.
    std::fs::remove_file(p.data.join("locked.txt.lock")).unwrap();
    add(&mut expected, "9 900\n");
    wait_versions(&p, 5).await;
    p.assert_totals(&expected, "lock removed").await;
    stage.kill9();

    // --after-done delete: a new file is counted, then removed; the others (done before) too.
    let mut stage = p.spawn(
        "standalone",
        &standalone_args(&p, "1000", &["--after-done", "delete"]),
    );
    std::fs::write(p.data.join("b.txt"), "10 1\n").unwrap();
    add(&mut expected, "10 1\n");
    wait_versions(&p, 6).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.data.join("b.txt").exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !p.data.join("b.txt").exists(),
        "b.txt not deleted after it was counted"
    );
    assert!(!a.exists() && !locked.exists());
    assert!(p.data.join("ignored.part").exists());
    p.assert_totals(&expected, "after-done").await;
    stage.kill9();

    // --bad-lines fail: a file with a bad line is rejected whole and listed, the good file
    // counted in the same group's transaction is exact.
    std::fs::write(p.data.join("c.txt"), "11 1\nnot a line\n12 2\n").unwrap();
    std::fs::write(p.data.join("d.txt"), "13 3\n").unwrap();
    add(&mut expected, "13 3\n");
    let mut stage = p.spawn(
        "standalone",
        &standalone_args(&p, "1000", &["--bad-lines", "fail"]),
    );
    wait_versions(&p, 7).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let listed = || std::fs::read_to_string(p.data.join(".tally-rejected")).unwrap_or_default();
    while !listed().contains("c.txt") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(listed().contains("c.txt"), "{}", listed());
    p.assert_totals(&expected, "a rejected file beside a good one")
        .await;
    let units = units_applied(&p).await;
    assert!(units.iter().all(|(_, seen)| *seen == 1), "{units:?}");
    stage.kill9();
}
