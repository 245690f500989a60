//! Usage windows (pure): what a `?from=&to=&window=&tz=` request asks, checked against the
//! stored period before any query runs.
//!
//! Usage per window is computed from `consumer_period_totals` (the period rows and each consumer's
//! current period), periods of `--period` (epoch-aligned in UTC). A window is answerable only when its boundaries fall on
//! period boundaries: an `hour` window needs periods of at most an hour and a time zone whose
//! offset is a whole number of periods (Asia/Kolkata, +05:30, is not with `1h` periods); a
//! `day` window needs periods dividing a day and, with `1d` periods, a zone at UTC. `from` and
//! `to` must be period boundaries too. A period counts in full in the window holding its start.

use std::collections::HashMap;

use chrono::{DateTime, FixedOffset, SecondsFormat};
use tally_model::period::Period;

/// Most windows one request may ask for.
pub const WINDOWS_MAX: i64 = 10_000;

/// A window length, in the time zone asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// An hour.
    Hour,
    /// A calendar day.
    Day,
    /// A calendar month.
    Month,
}

impl Window {
    /// Its name in requests, responses and PostgreSQL's `date_trunc`.
    pub fn name(self) -> &'static str {
        match self {
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    /// One step, as a PostgreSQL interval.
    pub fn step(self) -> &'static str {
        match self {
            Window::Hour => "1 hour",
            Window::Day => "1 day",
            Window::Month => "1 month",
        }
    }

    /// Its shortest length in seconds (a day at a DST change is 23 h).
    pub fn shortest(self) -> i64 {
        match self {
            Window::Hour => 3600,
            Window::Day => 23 * 3600,
            Window::Month => 28 * 86_400,
        }
    }
}

/// A checked usage request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Start, inclusive (Unix seconds, a period boundary).
    pub from: i64,
    /// End, exclusive (Unix seconds, a period boundary).
    pub to: i64,
    /// The window length.
    pub window: Window,
    /// The IANA time zone the windows are cut in (checked against PostgreSQL's list).
    pub tz: String,
    /// The stored period's length in seconds.
    pub period: i64,
}

/// Reads and checks `params` against the stored `period`: `Err(why)` for a 400.
/// `zone_known` says whether PostgreSQL knows a time zone name.
pub fn parse(
    params: &HashMap<String, String>,
    period: Period,
    zone_known: impl Fn(&str) -> bool,
) -> Result<Usage, String> {
    let Some(period) = period.length() else {
        return Err(
            "usage per window comes from the period totals, and periods are off (--period off)"
                .into(),
        );
    };
    let window = match params.get("window").map(String::as_str) {
        None | Some("day") => Window::Day,
        Some("hour") => Window::Hour,
        Some("month") => Window::Month,
        Some(other) => return Err(format!("window must be hour, day or month, not {other:?}")),
    };
    if window.shortest() < period {
        return Err(format!(
            "a {} window is finer than the stored period ({}): use a coarser window",
            window.name(),
            Period::seconds(period).map_or_else(String::new, |p| p.to_string())
        ));
    }
    let tz = params.get("tz").cloned().unwrap_or_else(|| "UTC".into());
    if !zone_known(&tz) {
        return Err(format!(
            "unknown time zone {tz:?}: an IANA name such as Europe/Berlin"
        ));
    }
    let time = |name: &str| -> Result<i64, String> {
        let text = params
            .get(name)
            .ok_or_else(|| format!("{name} is needed (RFC 3339, e.g. 2026-11-01T00:00:00Z)"))?;
        let at = DateTime::parse_from_rfc3339(text)
            .map_err(|e| format!("{name} is not an RFC 3339 time ({e}): {text:?}"))?
            .timestamp();
        if at.rem_euclid(period) != 0 {
            return Err(format!(
                "{name} must fall on a stored period's boundary (every {} from the Unix epoch, UTC): {text}",
                Period::seconds(period).map_or_else(String::new, |p| p.to_string())
            ));
        }
        Ok(at)
    };
    let (from, to) = (time("from")?, time("to")?);
    if from >= to {
        return Err("from must be before to".into());
    }
    if (to - from) / window.shortest() > WINDOWS_MAX {
        return Err(format!(
            "more than {WINDOWS_MAX} {} windows: ask for a shorter range or a coarser window",
            window.name()
        ));
    }
    Ok(Usage {
        from,
        to,
        window,
        tz,
        period,
    })
}

/// Whether a window boundary (Unix seconds) falls on a stored period's boundary.
pub fn aligned(at: i64, period: i64) -> bool {
    at.rem_euclid(period) == 0
}

/// `at` (Unix seconds) as RFC 3339 in a zone whose offset there is `offset` seconds
/// (`Z` for UTC).
pub fn rfc3339(at: i64, offset: i64) -> String {
    let zone = i32::try_from(offset)
        .ok()
        .and_then(FixedOffset::east_opt)
        .unwrap_or_else(|| FixedOffset::east_opt(0).expect("zero offset"));
    DateTime::from_timestamp(at, 0)
        .map(|t| {
            t.with_timezone(&zone)
                .to_rfc3339_opts(SecondsFormat::Secs, true)
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(pairs: &[(&str, &str)], period: Period) -> Result<Usage, String> {
        let params = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(&params, period, |tz| tz == "UTC" || tz == "Europe/Berlin")
    }

    fn hour() -> Period {
        Period::seconds(3600).unwrap()
    }

    #[test]
    fn a_day_in_berlin() {
        let usage = ask(
            &[
                ("from", "2026-11-01T00:00:00+01:00"),
                ("to", "2026-11-03T00:00:00+01:00"),
                ("window", "day"),
                ("tz", "Europe/Berlin"),
            ],
            hour(),
        )
        .unwrap();
        assert_eq!(usage.to - usage.from, 2 * 86_400);
        assert_eq!(usage.window, Window::Day);
        assert_eq!(usage.period, 3600);
    }

    #[test]
    fn refusals_say_why() {
        let range = [
            ("from", "2026-11-01T00:00:00Z"),
            ("to", "2026-11-02T00:00:00Z"),
        ];
        let with = |extra: &[(&'static str, &'static str)], period| {
            let mut all = range.to_vec();
            all.extend_from_slice(extra);
            ask(&all, period).unwrap_err()
        };
        assert!(with(&[], Period::OFF).contains("periods are off"));
        assert!(with(&[("window", "minute")], hour()).contains("hour, day or month"));
        let day = Period::seconds(86_400).unwrap();
        assert!(with(&[("window", "hour")], day).contains("finer than the stored period"));
        assert!(with(&[("tz", "Mars/Olympus")], hour()).contains("unknown time zone"));
        let err = ask(
            &[
                ("from", "2026-11-01T00:30:00Z"),
                ("to", "2026-11-02T00:00:00Z"),
            ],
            hour(),
        )
        .unwrap_err();
        assert!(err.contains("boundary"), "{err}");
        let err = ask(
            &[("from", "yesterday"), ("to", "2026-11-02T00:00:00Z")],
            hour(),
        )
        .unwrap_err();
        assert!(err.contains("RFC 3339"), "{err}");
        let err = ask(&[("to", "2026-11-02T00:00:00Z")], hour()).unwrap_err();
        assert!(err.contains("from is needed"), "{err}");
        let err = ask(
            &[
                ("from", "2026-11-02T00:00:00Z"),
                ("to", "2026-11-01T00:00:00Z"),
            ],
            hour(),
        )
        .unwrap_err();
        assert!(err.contains("before"), "{err}");
        let err = ask(
            &[
                ("from", "2000-01-01T00:00:00Z"),
                ("to", "2026-01-01T00:00:00Z"),
                ("window", "hour"),
            ],
            hour(),
        )
        .unwrap_err();
        assert!(err.contains("windows"), "{err}");
    }

    #[test]
    fn times_in_the_zone() {
        assert_eq!(rfc3339(1_793_491_200, 3600), "2026-11-01T01:00:00+01:00");
        assert_eq!(rfc3339(1_793_491_200, 0), "2026-11-01T00:00:00Z");
        assert!(aligned(1_793_491_200, 3600));
        assert!(!aligned(1_793_491_200 + 1800, 3600));
    }
}
