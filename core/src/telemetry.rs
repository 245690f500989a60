//! Logging set-up: `tracing` with key/value fields, level from `RUST_LOG` (default `info`),
//! text or JSON lines on stderr (stdout belongs to command output such as `tally sum`).
//!
//! In JSON mode every line the process writes to stderr is one JSON object with the event's
//! fields at the top level (`timestamp`, `level`, `message`, `target`, then the fields), the
//! final error and argument errors included ([`report_error`]). Colours only on a terminal.

use std::io::IsTerminal;

use crate::args::{LogFormat, TelemetryArgs};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(args: &TelemetryArgs) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| crate::redact::ScrubbedStderr);
    let _ = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// Prints the error that ends the process: `tally: error: …` as text, or one JSON line.
pub fn report_error(format: LogFormat, error: &str) {
    let error = &*crate::redact::scrub(error);
    match format {
        LogFormat::Text => eprintln!("tally: error: {error}"),
        LogFormat::Json => eprintln!("{}", error_json(error)),
    }
}

fn error_json(error: &str) -> serde_json::Value {
    let timestamp = humantime_now();
    serde_json::json!({
        "timestamp": timestamp,
        "level": "ERROR",
        "message": "tally: error",
        "error": error,
        "target": "tally",
    })
}

/// RFC 3339 UTC with microseconds, like the JSON logger's timestamps.
fn humantime_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_error_is_one_json_object() {
        let line = error_json("cannot connect: \"x\"\nsecond line").to_string();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "ERROR");
        assert_eq!(v["error"], "cannot connect: \"x\"\nsecond line");
        let ts = v["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-11-26T19:29:29.872350Z".len(), "{ts}");
    }
}
