//! An open-loop load generator for `tally api`: `GET /v1/consumers/{id}` for random ids below
//! IDS, RATE requests a second for SECONDS, whatever the answers take (a slow answer does not
//! hold the next request back, so queueing shows in the latencies instead of hiding in a lower
//! rate). A latency runs from when the request was due to its last byte. At most 2,048
//! requests are in flight; one due beyond that is counted as dropped, not sent.
//!
//! Prints one line: requests, answered (200 or 404), errors, dropped, achieved rate, and the
//! latency percentiles p50 p90 p99 p99.9 max in milliseconds.
//!
//! `cargo run --release -p tally-api --example load -- URL TOKEN RATE SECONDS IDS`

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, token, rate, seconds, ids] = args.as_slice() else {
        anyhow::bail!("usage: load URL TOKEN RATE SECONDS IDS");
    };
    let rate: f64 = rate.parse().context("RATE")?;
    let seconds: f64 = seconds.parse().context("SECONDS")?;
    let ids: u64 = ids.parse().context("IDS")?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2048)
        .timeout(Duration::from_secs(30))
        .build()?;
    let total = (rate * seconds) as u64;
    let step = Duration::from_secs_f64(1.0 / rate);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(2048));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut dropped = 0u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + step.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            dropped += 1;
            continue;
        };
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let request = client
            .get(format!(
                "{}/v1/consumers/{}",
                url.trim_end_matches('/'),
                seed % ids
            ))
            .bearer_auth(token);
        let (latencies, errors) = (latencies.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let answered = match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    response.bytes().await.is_ok() && (status == 200 || status == 404)
                }
                Err(_) => false,
            };
            if answered {
                latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(due.elapsed());
            } else {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    latencies.sort_unstable();
    let at = |q: f64| -> f64 {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "requests {total} answered {} errors {} dropped {dropped} rate {:.0}/s \
         p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms",
        latencies.len(),
        errors.load(std::sync::atomic::Ordering::Relaxed),
        latencies.len() as f64 / elapsed,
        at(0.50),
        at(0.90),
        at(0.99),
        at(0.999),
        latencies
            .last()
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
    );
    Ok(())
}
