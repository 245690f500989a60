//! `GET /v1/changes` against real writers: parallel transactions that commit out of the order
//! of their ids and roll back, a real pipeline's db-client, readers that disconnect and resume
//! with `Last-Event-ID` on another api process, retention and the switch.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::Connection;
use tally_db_client::{changes, copy};
use tally_testkit::pipeline::sse::{Next, Sse, SseEvent};

use super::{conforms, get, start_api, Pipeline, TIMEOUT, TOKEN};

/// Opens `/v1/changes` (after `last`, if given; `query` appended), as a browser would.
pub(super) async fn open(port: u16, last: Option<&str>, query: &str) -> Sse {
    let last = last.map(str::to_owned);
    let path = format!("/v1/changes{query}");
    tokio::task::spawn_blocking(move || {
        let bearer = format!("Bearer {TOKEN}");
        let mut headers = vec![("Authorization", bearer.as_str())];
        if let Some(id) = &last {
            headers.push(("Last-Event-ID", id.as_str()));
        }
        Sse::open(port, &path, &headers).expect("the API answers")
    })
    .await
    .unwrap()
}

/// The next event within `within`, or what came instead.
pub(super) async fn next(sse: &mut Sse, within: Duration) -> Next {
    tokio::task::block_in_place(|| sse.next(within))
}

pub(super) fn event(next: Next) -> SseEvent {
    match next {
        Next::Event(event) => event,
        other => panic!("no event but {other:?}"),
    }
}

/// An event id as (transaction, sequence), to compare.
fn position(event: &SseEvent) -> (u64, i64) {
    let id = event.id.as_deref().expect("an id");
    let (tx, seq) = id.split_once('-').expect("TX-SEQ");
    (tx.parse().unwrap(), seq.parse().unwrap())
}

/// (consumer, total) pairs of a totals event.
pub(super) fn totals(event: &SseEvent) -> Vec<(i64, i64)> {
    assert_eq!(event.event, "totals", "{event:?}");
    let data: Value = serde_json::from_str(&event.data).unwrap();
    data["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["consumer_id"].as_i64().unwrap(),
                c["total"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Writes `rows` as one transaction of its own, committed (or rolled back) after `hold`.
pub(super) async fn write(pool: &sqlx::PgPool, rows: &[(i64, i128)], hold: Duration, commit: bool) {
    let mut tx = pool.begin().await.unwrap();
    changes::writing(&mut tx).await.unwrap();
    copy::upsert_totals(&mut tx, rows, true).await.unwrap();
    tokio::time::sleep(hold).await;
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_committed_before_an_older_open_transaction_waits_for_it() {
    let mut p = Pipeline::new("changes-order").await;
    let (_api, port) = start_api(&mut p).await;
    let mut sse = open(port, None, "").await;
    assert_eq!(sse.status, 200);

    // A writes first (it takes the lower transaction id); B writes after it and commits first.
    let mut a = p.pool.begin().await.unwrap();
    changes::writing(&mut a).await.unwrap();
    copy::upsert_totals(&mut a, &[(1, 5), (2, 6)], true)
        .await
        .unwrap();
    write(&p.pool, &[(10, 7)], Duration::ZERO, true).await;
    // B is committed, but A may still commit behind it: a reader that took B now would resume
    // past A and never see it. Nothing is sent while A is open.
    assert_eq!(
        next(&mut sse, Duration::from_millis(1500)).await,
        Next::Quiet
    );
    a.commit().await.unwrap();
    let first = event(next(&mut sse, TIMEOUT).await);
    let second = event(next(&mut sse, TIMEOUT).await);
    assert_eq!(totals(&first), vec![(1, 5), (2, 6)]);
    assert_eq!(totals(&second), vec![(10, 7)]);
    assert!(position(&first) < position(&second));

    // A rolled-back transaction sends nothing; the next committed one comes.
    write(&p.pool, &[(20, 1)], Duration::ZERO, false).await;
    write(&p.pool, &[(21, 2)], Duration::ZERO, true).await;
    let third = event(next(&mut sse, TIMEOUT).await);
    assert_eq!(totals(&third), vec![(21, 2)]);

    // Resuming after the first event gives the second and the third, nothing else.
    drop(sse);
    let mut again = open(port, first.id.as_deref(), "").await;
    assert_eq!(event(next(&mut again, TIMEOUT).await), second);
    assert_eq!(event(next(&mut again, TIMEOUT).await), third);
    assert_eq!(
        next(&mut again, Duration::from_millis(800)).await,
        Next::Quiet
    );

    // Held back by an open writer while the events after it are pruned, a follower is told
    // (`event: gone`), not moved past the gap by that writer's event when it commits: the gone
    // mark is read with the events, in one snapshot.
    let mut held = p.pool.begin().await.unwrap();
    changes::writing(&mut held).await.unwrap();
    copy::upsert_totals(&mut held, &[(30, 1)], true)
        .await
        .unwrap();
    write(&p.pool, &[(31, 1)], Duration::ZERO, true).await;
    assert!(changes::prune(&p.pool, Duration::ZERO).await.unwrap() > 0);
    held.commit().await.unwrap();
    assert_eq!(event(next(&mut again, TIMEOUT).await).event, "gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_that_writes_no_change_holds_none_back() {
    let mut p = Pipeline::new("changes-bystander").await;
    let (_api, port) = start_api(&mut p).await;
    let mut sse = open(port, None, "").await;
    assert_eq!(sse.status, 200);

    // Another application's session, left open in a transaction that wrote (so it has a
    // transaction id, older than the writer's below), here and in another database.
    let mut bystander = p.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *bystander)
        .await
        .unwrap();
    let other_database = tally_testkit::with_database(&p.database_url, "postgres");
    let mut elsewhere = sqlx::PgConnection::connect(&other_database).await.unwrap();
    sqlx::query("BEGIN").execute(&mut elsewhere).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut elsewhere)
        .await
        .unwrap();

    // A writer of the change log after them: its change is sent while they stay open.
    write(&p.pool, &[(3, 4)], Duration::ZERO, true).await;
    let sent = event(next(&mut sse, Duration::from_secs(10)).await);
    assert_eq!(totals(&sent), vec![(3, 4)]);
    bystander.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn readers_resuming_across_api_restarts_get_every_committed_change_once() {
    let mut p = Pipeline::new("changes-parallel").await;
    let (mut api, mut port) = start_api(&mut p).await;
    // From the oldest change kept: the log is empty, so this is everything to come.
    let mut sse = open(port, None, "?from=oldest").await;
    assert_eq!(sse.status, 200);

    // Writers, each for its own consumers (as the db-client's shares are) on a connection of
    // its own, with random holds between write and commit, so commits land out of id order
    // (a reader that skips a writer still open behind a committed one is red here); one in
    // five rolls back.
    let start = 1_798_761_600; // 2027-01-01T00:00:00Z
    copy::ensure_partitions(&p.pool, &[start]).await.unwrap();
    let writers_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(6)
        .connect(&p.database_url)
        .await
        .unwrap();
    let writers: Vec<_> = (0..6i64)
        .map(|w| {
            let pool = writers_pool.clone();
            tokio::spawn(async move {
                let mut rng = tally_testkit::pipeline::clock_rng(&format!("writer {w}"));
                let mut expected: HashMap<i64, i64> = HashMap::new();
                let mut periods: HashMap<i64, i64> = HashMap::new();
                for _ in 0..25 {
                    let count = 1 + rng() % 1500;
                    let rows: Vec<(i64, i128)> = (0..count)
                        .map(|i| (w * 10_000 + i as i64, 1 + (rng() % 100) as i128))
                        .collect();
                    let commit = !rng().is_multiple_of(5);
                    let hold = Duration::from_millis(rng() % 150);
                    let mut tx = pool.begin().await.unwrap();
                    changes::writing(&mut tx).await.unwrap();
                    copy::upsert_totals(&mut tx, &rows, true).await.unwrap();
                    let period_rows: Vec<((i64, i64), i128)> =
                        rows.iter().map(|&(id, n)| ((id, start), n)).collect();
                    copy::upsert_period_totals(&mut tx, &period_rows, true)
                        .await
                        .unwrap();
                    tokio::time::sleep(hold).await;
                    if commit {
                        tx.commit().await.unwrap();
                        for (id, n) in rows {
                            *expected.entry(id).or_default() += n as i64;
                            *periods.entry(id).or_default() += n as i64;
                        }
                    } else {
                        tx.rollback().await.unwrap();
                    }
                }
                (expected, periods)
            })
        })
        .collect();

    // Follow meanwhile, dropping the connection every few events and once restarting the api.
    let mut seen: Vec<SseEvent> = Vec::new();
    let mut reconnects = 0;
    let mut writers_done = false;
    let mut pending = writers;
    let mut expected: HashMap<i64, i64> = HashMap::new();
    let mut period_expected: HashMap<i64, i64> = HashMap::new();
    let until = Instant::now() + TIMEOUT;
    loop {
        assert!(
            Instant::now() < until,
            "{} events after {TIMEOUT:?}",
            seen.len()
        );
        if !writers_done && pending.iter().all(tokio::task::JoinHandle::is_finished) {
            for writer in pending.drain(..) {
                let (totals, periods) = writer.await.unwrap();
                expected.extend(totals);
                period_expected.extend(periods);
            }
            writers_done = true;
        }
        match next(&mut sse, Duration::from_millis(1500)).await {
            Next::Event(event) => {
                seen.push(event);
                if seen.len().is_multiple_of(7) {
                    reconnects += 1;
                    drop(sse);
                    if reconnects == 5 {
                        api.kill9();
                        (api, port) = start_api(&mut p).await;
                    }
                    sse = open(port, seen.last().and_then(|e| e.id.as_deref()), "").await;
                    assert_eq!(sse.status, 200);
                }
            }
            Next::Quiet if writers_done => break,
            Next::Quiet => {}
            Next::Ended => panic!("the stream ended"),
        }
    }
    assert!(reconnects >= 5, "only {reconnects} reconnects");

    // Every event of the log once, in id order; nothing else.
    let positions: Vec<(u64, i64)> = seen.iter().map(position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "events out of order or twice"
    );
    let logged: Vec<(String, i64)> =
        // `c.tx`, not `tx`: that would name the text output column, and sort "10001" before
        // "9886".
        sqlx::query_as("SELECT c.tx::text, c.seq FROM tally_changes c ORDER BY c.tx, c.seq")
            .fetch_all(&p.pool)
            .await
            .unwrap();
    let logged: Vec<(u64, i64)> = logged
        .into_iter()
        .map(|(tx, seq)| (tx.parse().unwrap(), seq))
        .collect();
    assert_eq!(positions.len(), logged.len(), "events sent vs logged");
    assert_eq!(positions, logged);

    // The last total of each consumer is its total; the deltas add up to its period total.
    let mut last: HashMap<i64, i64> = HashMap::new();
    let mut deltas: HashMap<i64, i64> = HashMap::new();
    for event in &seen {
        let data: Value = serde_json::from_str(&event.data).unwrap();
        match event.event.as_str() {
            "totals" => {
                let consumers = data["consumers"].as_array().unwrap();
                assert!(consumers.len() <= 1000, "{} in one event", consumers.len());
                for (id, total) in totals(event) {
                    let before = last.insert(id, total).unwrap_or(0);
                    assert!(total > before, "consumer {id}: {total} after {before}");
                }
            }
            "periods" => {
                for d in data["periods"].as_array().unwrap() {
                    assert_eq!(d["period_start"], "2027-01-01T00:00:00Z");
                    *deltas
                        .entry(d["consumer_id"].as_i64().unwrap())
                        .or_default() += d["delta"].as_i64().unwrap();
                }
            }
            other => panic!("event {other}"),
        }
    }
    assert_eq!(last, expected, "last totals sent vs committed");
    assert_eq!(deltas, period_expected, "period deltas sent vs committed");
    let stored: Vec<(i64, String)> =
        sqlx::query_as("SELECT consumer_id, total::text FROM consumer_totals")
            .fetch_all(&p.pool)
            .await
            .unwrap();
    let stored: HashMap<i64, i64> = stored
        .into_iter()
        .map(|(id, t)| (id, t.parse().unwrap()))
        .collect();
    assert_eq!(last, stored, "last totals sent vs PostgreSQL");

    // Past the retention: a reader behind what was deleted is told (410); one that had read
    // all of it goes on; a new one starts after it.
    let deleted = changes::prune(&p.pool, Duration::ZERO).await.unwrap();
    assert_eq!(deleted as usize, logged.len());
    let behind = open(port, seen[seen.len() - 2].id.as_deref(), "").await;
    assert_eq!(behind.status, 410);
    let caught_up = open(port, seen.last().and_then(|e| e.id.as_deref()), "").await;
    assert_eq!(caught_up.status, 200);
    let mut fresh = open(port, None, "?from=oldest").await;
    assert_eq!(fresh.status, 200);
    write(&p.pool, &[(99_999, 3)], Duration::ZERO, true).await;
    assert_eq!(
        totals(&event(next(&mut fresh, TIMEOUT).await)),
        vec![(99_999, 3)]
    );

    // Switched off: a follower is told and the endpoint says so; switched on again, a reader
    // from before the switch is told changes are missing.
    let before_off = seen.last().and_then(|e| e.id.clone());
    changes::start(&p.pool, false).await.unwrap();
    assert_eq!(event(next(&mut fresh, TIMEOUT).await).event, "off");
    assert_eq!(open(port, None, "").await.status, 409);
    changes::start(&p.pool, true).await.unwrap();
    assert_eq!(open(port, before_off.as_deref(), "").await.status, 410);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_s_changes_add_up_to_its_totals() {
    let mut p = Pipeline::new("changes-pipeline").await;
    let (_api, port) = start_api(&mut p).await;
    let mut sse = open(port, None, "?from=oldest").await;
    assert_eq!(sse.status, 200);
    let (files, expected) = p.generate(3, 2 << 20, 30_000, 7).await;
    // Two of the files in an hour that `tally rollup` folds into its day below.
    for file in &files[..2] {
        crate::support::periods::set_mtime(
            std::path::Path::new(file),
            crate::support::periods::OCT_31_22H + 60,
        );
    }
    let _parser = p.spawn("parser", &p.parser_args("a"));
    let _db = p.spawn("db-client", &["db-client", "--writers", "2"]);
    p.publish("1048576", &files).await;
    p.wait_ingested(files.len() as i64, TIMEOUT).await;
    p.assert_totals(&expected, "the pipeline").await;
    // The fold moves usage between periods: its deltas are in the log too.
    let out = p
        .tally(&["rollup", "--older-than", "1d", "--to", "1d"])
        .await;
    assert!(
        out.starts_with("folded ") && !out.starts_with("folded 0 "),
        "{out}"
    );
    let (_, doc) = get(port, "/v1/openapi.json", Some(TOKEN)).await;

    let mut last: HashMap<i64, i64> = HashMap::new();
    let mut periods: HashMap<(i64, String), i128> = HashMap::new();
    let mut previous = None;
    loop {
        let event = match next(&mut sse, Duration::from_secs(3)).await {
            Next::Event(event) => event,
            Next::Quiet => break,
            Next::Ended => panic!("the stream ended"),
        };
        assert!(previous < Some(position(&event)), "out of order");
        previous = Some(position(&event));
        let data: Value = serde_json::from_str(&event.data).unwrap();
        let schema = match event.event.as_str() {
            "totals" => "ChangesTotals",
            _ => "ChangesPeriods",
        };
        conforms(
            &doc,
            &doc["components"]["schemas"][schema],
            &data,
            &event.event,
        );
        match event.event.as_str() {
            "totals" => last.extend(totals(&event)),
            "periods" => {
                for d in data["periods"].as_array().unwrap() {
                    *periods
                        .entry((
                            d["consumer_id"].as_i64().unwrap(),
                            d["period_start"].as_str().unwrap().to_owned(),
                        ))
                        .or_default() += i128::from(d["delta"].as_i64().unwrap());
                }
            }
            other => panic!("event {other}"),
        }
    }
    let expected: HashMap<i64, i64> = expected
        .into_iter()
        .map(|(id, t)| (id, i64::try_from(t).unwrap()))
        .collect();
    assert_eq!(last.len(), expected.len(), "consumers in the changes");
    assert!(last == expected, "the last totals sent are the totals");
    let stored: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT consumer_id,
                to_char(period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                sum(total)::text
         FROM consumer_period_totals GROUP BY 1, 2",
    )
    .fetch_all(&p.pool)
    .await
    .unwrap();
    let stored: HashMap<(i64, String), i128> = stored
        .into_iter()
        .map(|(id, start, t)| ((id, start), t.parse().unwrap()))
        .collect();
    assert!(!stored.is_empty(), "the pipeline writes periods");
    periods.retain(|_, delta| *delta != 0); // the folded hour
    assert!(
        periods == stored,
        "the period deltas add up to the period totals"
    );
}
