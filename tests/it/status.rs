//! `tally status` against a real pipeline: files by state with reasons, dead letters, lag per
//! stage and partition, the exit status an operator's script relies on. (Halted partitions:
//! tests/it/edges.rs, records deleted before they were applied.)

use std::time::Duration;

use crate::support::Pipeline;

const TIMEOUT: Duration = Duration::from_secs(120);

async fn status(p: &Pipeline) -> (i32, serde_json::Value) {
    let out = p
        .output(&["status", "--json"], &[], Duration::from_secs(60))
        .await;
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

fn total_lag(report: &serde_json::Value, stage: &str) -> i64 {
    report["lag"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["stage"] == stage)
        .map(|l| l["lag"].as_i64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_files_lag_dead_letters_and_what_needs_an_operator() {
    let mut p = Pipeline::new("status").await;
    let (good, _) = p.generate(2, 200_000, 300, 11).await;
    let bad_lines = p.data.join("bad-lines.txt");
    std::fs::write(&bad_lines, "1 5\nnot-a-number 3\n2 7\n").unwrap();
    let vanishing = p.data.join("vanishing.txt");
    std::fs::write(&vanishing, "3 1\n").unwrap();

    // Announced, nothing running: all in progress, the parsers lag, nothing for an operator.
    let mut all = good.clone();
    all.push(bad_lines.to_str().unwrap().to_owned());
    all.push(vanishing.to_str().unwrap().to_owned());
    p.publish("1000000", &all).await;
    let (code, report) = status(&p).await;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["files"]["announced"], 4, "{report:#}");
    assert_eq!(report["files"]["in_progress"], 4);
    assert_eq!(report["last_ingestion"], serde_json::Value::Null);
    assert_eq!(total_lag(&report, "parser"), 4, "{report:#}");

    // One announced file disappears before any parser reads it: its unit is rejected.
    std::fs::remove_file(&vanishing).unwrap();
    let _parser = p.spawn("parser", &p.parser_args("p1"));
    let _db = p.spawn("db-client", &["db-client"]);
    p.wait_ingested(3, TIMEOUT).await;
    p.wait_files_consumed(TIMEOUT).await;
    let until = std::time::Instant::now() + TIMEOUT;
    let (code, report) = loop {
        let (code, report) = status(&p).await;
        let settled = total_lag(&report, "parser") == 0 && total_lag(&report, "db-client") == 0;
        if settled || std::time::Instant::now() > until {
            break (code, report);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(code, 1, "a rejected file needs an operator: {report:#}");
    assert_eq!(report["files"]["announced"], 4);
    assert_eq!(report["files"]["complete"], 3, "{report:#}");
    assert_eq!(report["files"]["rejected"], 1);
    assert_eq!(report["files"]["in_progress"], 0);
    let rejected = &report["rejected"][0];
    assert!(rejected["path"]
        .as_str()
        .unwrap()
        .ends_with("vanishing.txt"));
    assert!(!rejected["reason"].as_str().unwrap().is_empty());
    assert_eq!(report["dead_letters"]["rejected_unit"], 1);
    assert_eq!(report["dead_letters"]["bad_line"], 1);
    assert_eq!(report["bad_line_reasons"].as_object().unwrap().len(), 1);
    assert!(report["last_ingestion"].is_string());
    assert_eq!(total_lag(&report, "parser"), 0, "{report:#}");
    assert_eq!(total_lag(&report, "db-client"), 0, "{report:#}");
    // Every files partition and every sums partition is listed.
    let listed = |stage: &str| {
        report["lag"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["stage"] == stage)
            .count()
    };
    assert_eq!(
        listed("parser"),
        tally_core::kafka::FILES_PARTITIONS as usize
    );
    assert_eq!(
        listed("db-client"),
        tally_core::kafka::SUMS_PARTITIONS as usize
    );
    assert!(report["needs_operator"][0]
        .as_str()
        .unwrap()
        .contains("vanishing.txt"));

    // The text form says the same in lines an operator reads.
    let out = p.output(&["status"], &[], Duration::from_secs(60)).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains("files: 4 announced, 3 complete, 0 in progress, 1 rejected"),
        "{text}"
    );
    assert!(text.contains("needs an operator:"), "{text}");
}

/// A million announcements within retention: `status` reads only the latest `--scan-records`,
/// says which figures are partial, and answers in under 2 s.
#[tokio::test(flavor = "multi_thread")]
async fn status_answers_fast_with_a_million_announcements() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p = Pipeline::new("status-million").await;
    let producer: BaseProducer = tally_core::kafka::base_config(&p.kafka)
        .set("compression.type", "lz4")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()
        .unwrap();
    let data = p.data.to_str().unwrap().to_owned();
    let n = 1_000_000u64;
    tokio::task::spawn_blocking({
        let topic = p.topics.files.clone();
        move || {
            for i in 0..n {
                let unit = format!(
                    "{{\"stream\":\"1:{i}:0\",\"file_id\":\"1:{i}:0:4:0\",\"unit_id\":\"1:{i}:0:4:0/0-4\",\
                     \"path\":\"{data}/f{i}\",\"file_bytes\":4,\"fingerprint\":0,\"start\":0,\"end\":4}}"
                );
                let key = format!("1:{i}:0");
                loop {
                    match producer.send(BaseRecord::to(&topic).key(&key).payload(&unit)) {
                        Ok(()) => break,
                        Err(_) => {
                            producer.poll(Duration::from_millis(10));
                        }
                    }
                }
            }
            producer.flush(Duration::from_secs(120)).unwrap();
        }
    })
    .await
    .unwrap();

    // The best of five, each beside a run on an empty pipeline (so that both see the same load:
    // other tests share these two cores). The bound is 2 s, or three times what `status` takes
    // on the empty pipeline (a debug build beside other tests is slower than an operator's
    // release build); reading the whole topic took 11 s here.
    let empty = Pipeline::new("status-empty").await;
    let mut took = Duration::MAX;
    let mut baseline = Duration::MAX;
    let mut report = serde_json::Value::Null;
    for _ in 0..5 {
        let started = std::time::Instant::now();
        report = status(&p).await.1;
        took = took.min(started.elapsed());
        let started = std::time::Instant::now();
        status(&empty).await;
        baseline = baseline.min(started.elapsed());
    }
    let bound = Duration::from_secs(2).max(baseline * 3);
    eprintln!("status: {took:?} with a million announcements, {baseline:?} empty");
    assert!(
        took < bound,
        "status took {took:?} with a million announcements, {baseline:?} on an empty pipeline"
    );
    let partial = report["partial"].as_array().unwrap();
    assert!(
        partial
            .iter()
            .any(|l| l.as_str().unwrap().starts_with("files:")),
        "{report}"
    );
    let announced = report["files"]["announced"].as_u64().unwrap();
    assert!((9_000..=10_000).contains(&announced), "{report}");
    assert_eq!(total_lag(&report, "parser"), n as i64, "{report}");
    eprintln!("status with {n} announcements: {took:?} ({baseline:?} on an empty pipeline)");
}
