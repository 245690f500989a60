//! Liveness under broker outages: the broker is SIGKILLed several times under a running
//! pipeline (outages shorter and longer than the group session timeout), PostgreSQL crashes
//! with it in some rounds, stages are killed and restarted while they are down, and a writer
//! keeps adding files to the watched folder. Asserts
//! that the totals are exact, that no unit is counted twice, and that after every broker
//! restart the whole pipeline resumes work within a bound: every file written before the
//! broker came back reaches the totals within `RESUME_BOUND`. Needs every parser and every
//! db-client to work (a file's units spread over the files partitions; every unit writes an
//! end marker to every sums partition), so one stage left idle fails it.
//!
//! A test binary of its own: it kills the services of `scripts/services`, which would disturb
//! tests running beside it. The short profile runs in `scripts/test`; `scripts/fault-run`
//! runs long seeded profiles (env `TALLY_FAULT_OUTAGES`, `TALLY_FAULT_SEED`,
//! `TALLY_FAULT_FILES`).

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

use tally_testkit::pipeline as support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Pipeline, Stage};

/// How soon after the broker is back every file written before must be in the totals.
const RESUME_BOUND: Duration = Duration::from_secs(60);
/// Files added right after each broker restart.
const PROBE_FILES: usize = 4;

/// A xorshift generator: the schedule is a function of the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Outage lengths in seconds. The default mixes outages shorter than the group session
/// timeout (45 s) with one longer than it.
fn outages() -> Vec<u64> {
    std::env::var("TALLY_FAULT_OUTAGES")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().parse().unwrap()).collect())
        .unwrap_or_else(|| vec![4, 15, 50, 8])
}

fn db_client_args(instance: &str) -> Vec<String> {
    ["db-client", "--instance-id", instance]
        .map(String::from)
        .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn stages_resume_after_repeated_broker_kills() {
    support::assert_services_of_the_script();
    let seed = env_or(
        "TALLY_FAULT_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    let outages = outages();
    let file_count: usize = env_or("TALLY_FAULT_FILES", 300);
    eprintln!("fault test seed {seed}, outages {outages:?} s, {file_count} files");
    let mut rng = Rng(seed);

    let mut p = Pipeline::new("faults").await;
    // Files are made in a staging folder and renamed into the watched one by the writer below.
    let staging = p.dir.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let expect = p.dir.join("expected.txt");
    let generated = p
        .tally(&[
            "producer",
            "generate",
            "--no-announce",
            "--dir",
            staging.to_str().unwrap(),
            "--files",
            &file_count.to_string(),
            "--size",
            "150000",
            "--consumers",
            "3000",
            "--seed",
            &seed.to_string(),
            "--expect",
            expect.to_str().unwrap(),
        ])
        .await;
    let files: Vec<PathBuf> = generated.lines().map(PathBuf::from).collect();
    assert_eq!(files.len(), file_count);
    let expected = support::read_expected(&expect);

    // 32 KiB units: about five per file, spread over the files partitions.
    let data = p.data.to_str().unwrap().to_owned();
    let watch_args: Vec<String> = [
        "producer",
        "--unit-bytes",
        "32768",
        "watch",
        "--dir",
        &data,
        "--rescan-interval-ms",
        "500",
    ]
    .map(String::from)
    .to_vec();
    let mut stages: Vec<(String, Vec<String>, Stage)> = Vec::new();
    for (name, args) in [
        ("watch", watch_args),
        ("parser-a", p.parser_args("a")),
        ("parser-b", p.parser_args("b")),
        ("db-client-x", db_client_args("x")),
        ("db-client-y", db_client_args("y")),
    ] {
        let stage = p.spawn(name, &args);
        stages.push((name.to_owned(), args, stage));
    }

    // The writer: one file renamed into the watched folder every 0.5–2 s, from a pool that
    // the rounds below also draw from.
    let pool = Arc::new(Mutex::new(files));
    let moved = Arc::new(AtomicUsize::new(0));
    let move_one = {
        let (pool, moved, data) = (pool.clone(), moved.clone(), p.data.clone());
        move || {
            let Some(file) = pool.lock().unwrap().pop() else {
                return false;
            };
            std::fs::rename(&file, data.join(file.file_name().unwrap())).unwrap();
            moved.fetch_add(1, Ordering::SeqCst);
            true
        }
    };
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = {
        let (move_one, stop) = (move_one.clone(), stop_writer.clone());
        let mut rng = Rng(seed.rotate_left(17) | 1);
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) && move_one() {
                tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
            }
        })
    };

    let mut resumed: Vec<Duration> = Vec::new();
    for (round, &outage) in outages.iter().enumerate() {
        // Work flows for a while, then the broker dies mid-stream.
        tokio::time::sleep(Duration::from_millis(4_000 + rng.below(4_000))).await;
        // PostgreSQL crashes too in the second round, and at random in later ones.
        let pg_too = round == 1 || (round > 1 && rng.below(3) == 0);
        tokio::task::spawn_blocking(move || {
            support::services(&["kill", "kafka"]);
            if pg_too {
                support::services(&["kill", "postgres"]);
            }
        })
        .await
        .unwrap();
        let down = Instant::now();
        let what = if pg_too {
            "broker and PostgreSQL"
        } else {
            "broker"
        };
        eprintln!("round {round}: {what} killed, down for {outage} s");
        // While it is down: one or two stages die (SIGKILL or SIGTERM) and are restarted at
        // once, so they start up without a broker.
        let victims = 1 + rng.below(2);
        for _ in 0..victims {
            tokio::time::sleep(Duration::from_millis(rng.below(outage * 500 + 1))).await;
            let i = rng.below(stages.len() as u64) as usize;
            let (name, args, stage) = &mut stages[i];
            if rng.below(2) == 0 {
                stage.kill9();
                eprintln!("round {round}: {name} SIGKILLed");
            } else {
                let clean = stage.terminate(Duration::from_secs(10));
                eprintln!("round {round}: {name} SIGTERMed (clean exit: {clean})");
                stage.kill9();
            }
            *stage = p.spawn(name, args);
        }
        let rest = Duration::from_secs(outage).saturating_sub(down.elapsed());
        tokio::time::sleep(rest).await;
        tokio::task::spawn_blocking(|| support::services(&["up"]))
            .await
            .unwrap();
        let up = Instant::now();
        // Fresh work right away, whatever the writer's pace: every stage must take part.
        for _ in 0..PROBE_FILES {
            move_one();
        }
        let target = moved.load(Ordering::SeqCst) as i64;
        eprintln!("round {round}: {what} back; waiting for {target} files");
        loop {
            if p.files_ingested().await >= target {
                break;
            }
            assert!(
                up.elapsed() < RESUME_BOUND,
                "round {round}: only {} of {target} files in the totals {RESUME_BOUND:?} after \
                 the broker came back (seed {seed}); logs in {}",
                p.files_ingested().await,
                p.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let took = up.elapsed();
        eprintln!(
            "round {round}: all {target} files in the totals {took:?} after the broker came back"
        );
        resumed.push(took);
    }

    // The rest of the files at once: a backlog after the last outage.
    stop_writer.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    while move_one() {}
    p.wait_ingested(file_count as i64, Duration::from_secs(180))
        .await;
    p.assert_totals(&expected, &format!("broker kills (seed {seed})"))
        .await;
    let summed = p.summed_units();
    assert!(
        summed.values().all(|&n| n == 1),
        "units counted twice: {summed:?}"
    );
    let worst = resumed.iter().max().unwrap();
    eprintln!(
        "fault test: {} broker kills, catch-up after each {:?}, worst {worst:?} (bound {RESUME_BOUND:?})",
        resumed.len(),
        resumed
    );
}
