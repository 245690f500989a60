//! The watchdog thread: decides when a stage is stalled, asks the broker whether it answers,
//! and restarts the process in place (see the parent module for the rules).

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;

use super::{group, Input, Liveness, Throttle};
use crate::args::KafkaArgs;
use crate::kafka::BrokerProbe;

/// How often the watchdog looks.
const TICK: Duration = Duration::from_secs(1);
/// Least time between two lag probes of a quiet stage.
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// The watchdog loop.
pub(super) fn watch(
    liveness: &Liveness,
    kafka: &KafkaArgs,
    limit: Duration,
    on_stall: &dyn Fn(&str),
) {
    let probe = BrokerProbe::new(kafka);
    // The last lag probe of a quiet stage: when, and the stall it found.
    let mut lag: Option<(Instant, Option<String>)> = None;
    // Since when the broker answers while the stage is stalled.
    let mut answering_since: Option<Instant> = None;
    // Once the broker is back, the stage gets this long to get going by itself.
    let grace = limit / 4;
    let mut waiting_log = Throttle::new(Duration::from_secs(30));
    // A client of the stage's group id, for its committed offsets (never joins).
    let mut offsets = None;
    loop {
        std::thread::sleep(TICK);
        let waiting_on = *liveness
            .shared
            .waiting_on
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if waiting_on.is_some() {
            // Not the broker's business, and a restart would not bring it back.
            answering_since = None;
            continue;
        }
        let reason = match liveness.stalled_step(limit) {
            Some(reason) => Some(reason),
            None if liveness.quiet_for() > limit && !liveness.in_long_step(limit) => {
                if lag
                    .as_ref()
                    .is_none_or(|(at, _)| at.elapsed() >= PROBE_EVERY)
                {
                    let input = liveness
                        .shared
                        .input
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let member = liveness
                        .shared
                        .member
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let found = match waiting_records(&probe, &input) {
                        // No partition held, none loading: is this member left out of work?
                        Ok(0) if input.positions.is_empty() && !liveness.has_open_step() => {
                            let unheld = member.as_ref().map_or(Ok(None), |member| {
                                group::unheld_work(&probe, kafka, &mut offsets, member)
                            });
                            match unheld {
                                Ok(None) => {
                                    liveness.progress();
                                    None
                                }
                                Ok(Some(reason)) => Some(reason),
                                Err(_) => Some("no progress".to_owned()),
                            }
                        }
                        Ok(0) => {
                            // Idle, not stuck: nothing waits for this stage.
                            liveness.progress();
                            None
                        }
                        Ok(waiting) => Some(format!(
                            "{waiting} records wait in {} and nothing was completed for {} s",
                            input.topic,
                            liveness.quiet_for().as_secs()
                        )),
                        // The broker does not answer: said below, when it is asked again.
                        Err(_) => Some("no progress".to_owned()),
                    };
                    lag = Some((Instant::now(), found));
                }
                lag.as_ref().and_then(|(_, found)| found.clone())
            }
            None => {
                lag = None;
                None
            }
        };
        let Some(reason) = reason else {
            answering_since = None;
            continue;
        };
        if !probe.answers(Duration::from_secs(10)) {
            answering_since = None;
            if let Some(skipped) = waiting_log.allow() {
                tracing::warn!(
                    stage = liveness.stage,
                    reason,
                    skipped,
                    "stalled, and the broker does not answer: waiting for it"
                );
            }
            continue;
        }
        if answering_since.get_or_insert_with(Instant::now).elapsed() < grace {
            continue;
        }
        tracing::error!(
            stage = liveness.stage,
            reason,
            limit_s = limit.as_secs(),
            "stalled while the broker answers; restarting this process in place"
        );
        on_stall(&reason);
    }
}

/// Records past the stage's positions, from the broker's high watermarks.
fn waiting_records(probe: &BrokerProbe, input: &Input) -> Result<i64, KafkaError> {
    let mut waiting = 0;
    for &(partition, position) in &input.positions {
        let (_, high) = probe.watermarks(&input.topic, partition)?;
        waiting += (high - position).max(0);
    }
    Ok(waiting)
}

/// Replaces this process by a fresh copy of itself (same binary, same arguments, same pid).
pub fn restart_in_place() -> ! {
    use std::os::unix::process::CommandExt;
    let error = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec(),
        Err(error) => error,
    };
    // exec only returns on failure: exit, and let the supervisor restart us.
    tracing::error!(%error, "cannot restart in place, exiting");
    std::process::exit(75);
}
