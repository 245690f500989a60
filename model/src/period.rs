//! Usage periods: which period a file's lines are counted in.
//!
//! Lines carry no timestamp, so a line's period is its file's: the file's time (its
//! modification time at announcement, or a time parsed from its name, [`FileTimeFrom`]) floored
//! to the configured [`Period`] (`--period`, epoch-aligned in UTC: `1h` periods start on the
//! hour, `1d` at midnight UTC). The period start travels with the sums (docs/messages.md) into
//! the usage per period (`consumer_period_totals`).

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::str::FromStr;

/// The length of a usage period, or none (`off`): whole minutes, hours or days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period(Option<i64>);

impl Period {
    /// Periods off: only running totals are kept.
    pub const OFF: Period = Period(None);

    /// A period of `seconds` (> 0).
    pub fn seconds(seconds: i64) -> Option<Self> {
        (seconds > 0).then_some(Period(Some(seconds)))
    }

    /// Its length in seconds, or `None` when off.
    pub fn length(self) -> Option<i64> {
        self.0
    }

    /// The start (Unix seconds) of the period holding `time` (Unix seconds), or `None` when
    /// periods are off.
    pub fn start_of(self, time: i64) -> Option<i64> {
        self.0.map(|len| time.div_euclid(len) * len)
    }
}

impl Default for Period {
    fn default() -> Self {
        Period(Some(3600))
    }
}

impl FromStr for Period {
    type Err = String;

    /// `off`, or a whole number followed by `m`, `h` or `d` (`15m`, `1h`, `1d`).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(Period::OFF);
        }
        let bad = || format!("`{s}` is no period: use off, or a whole number of m, h or d (1h)");
        let (number, unit) = s.split_at(s.len().saturating_sub(1));
        let unit = match unit {
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        let n: i64 = number.parse().map_err(|_| bad())?;
        n.checked_mul(unit)
            .and_then(Period::seconds)
            .filter(|_| n > 0)
            .ok_or_else(bad)
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("off"),
            Some(s) if s % 86_400 == 0 => write!(f, "{}d", s / 86_400),
            Some(s) if s % 3600 == 0 => write!(f, "{}h", s / 3600),
            Some(s) => write!(f, "{}m", s / 60),
        }
    }
}

/// Earliest file time taken (1900-01-01 UTC): anything before is a misread name.
pub const TIME_MIN: i64 = -2_208_988_800;
/// Latest file time taken (9999-12-31 23:59:59 UTC).
pub const TIME_MAX: i64 = 253_402_300_799;

/// Whether `time` (Unix seconds) is a plausible file time, [`TIME_MIN`] to [`TIME_MAX`]:
/// PostgreSQL and the partitions by month need a real calendar date.
pub fn plausible(time: i64) -> bool {
    (TIME_MIN..=TIME_MAX).contains(&time)
}

/// A clap value parser for [`Period`].
pub fn parse_period(s: &str) -> Result<Period, String> {
    s.parse()
}

/// A duration as the flags write it: a whole number with `s`, `m`, `h` or `d`, or `off`
/// (`None`).
pub fn parse_span(s: &str) -> Result<Option<std::time::Duration>, String> {
    if s == "off" {
        return Ok(None);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("expected a number with s, m, h or d, or `off`; got `{s}`"))?;
    let seconds = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3_600),
        "d" => n.checked_mul(86_400),
        _ => return Err(format!("unknown unit in `{s}`: use s, m, h or d")),
    }
    .ok_or_else(|| format!("`{s}` is too long"))?;
    Ok(Some(std::time::Duration::from_secs(seconds)))
}

/// A duration flag's value: `Some` duration, or `None` for `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Option<std::time::Duration>);

impl FromStr for Span {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_span(s).map(Span)
    }
}

/// The file times a stage accepts: at most `back` before now and `ahead` after it (`None`:
/// no bound on that side). A file time outside books usage into closed periods, or makes the
/// database create a partition for every month a writer names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// How far back.
    pub back: Option<std::time::Duration>,
    /// How far ahead.
    pub ahead: Option<std::time::Duration>,
}

impl TimeWindow {
    /// No bound.
    pub const OPEN: TimeWindow = TimeWindow {
        back: None,
        ahead: None,
    };

    /// `Ok` if `time` (Unix seconds) is inside the window around `now`; else why not.
    pub fn check(&self, time: i64, now: i64) -> Result<(), String> {
        let secs = |d: std::time::Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        if let Some(back) = self.back {
            if time < now.saturating_sub(secs(back)) {
                return Err(format!(
                    "file time {} is more than {} s before now (--file-time-max-age)",
                    format_utc(time),
                    back.as_secs()
                ));
            }
        }
        if let Some(ahead) = self.ahead {
            if time > now.saturating_add(secs(ahead)) {
                return Err(format!(
                    "file time {} is more than {} s after now (--file-time-max-ahead)",
                    format_utc(time),
                    ahead.as_secs()
                ));
            }
        }
        if !plausible(time) {
            return Err(format!(
                "file time {time} s since the epoch is not between the years 1900 and 9999"
            ));
        }
        Ok(())
    }

    /// [`TimeWindow::check`] against the clock.
    pub fn check_now(&self, time: i64) -> Result<(), String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.check(time, now)
    }
}

/// Where a file's time comes from (`--file-time-from`).
#[derive(Debug, Clone)]
pub enum FileTimeFrom {
    /// Its modification time when it is announced.
    Mtime,
    /// A time in its name: the regex's named group `epoch_s`, `epoch_min` or `epoch_ms` (a
    /// Unix time in that unit), or else its first group (or whole match) as a UTC date-time
    /// (`2026-11-26T10:15:00Z`, `2026-11-26 10:15`, `20261126T1015`, `20261126`, …).
    Name(regex::Regex),
}

impl FromStr for FileTimeFrom {
    type Err = String;

    /// `mtime`, or `name:<regex>`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "mtime" {
            return Ok(FileTimeFrom::Mtime);
        }
        let Some(pattern) = s.strip_prefix("name:") else {
            return Err(format!("`{s}`: use mtime or name:<regex>"));
        };
        regex::Regex::new(pattern)
            .map(FileTimeFrom::Name)
            .map_err(|e| format!("bad regex in `{s}`: {e}"))
    }
}

impl fmt::Display for FileTimeFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileTimeFrom::Mtime => f.write_str("mtime"),
            FileTimeFrom::Name(re) => write!(f, "name:{re}"),
        }
    }
}

/// A clap value parser for [`FileTimeFrom`].
pub fn parse_file_time_from(s: &str) -> Result<FileTimeFrom, String> {
    s.parse()
}

/// Unix seconds of a file's modification time.
pub fn mtime_seconds(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
}

impl FileTimeFrom {
    /// The time (Unix seconds) of the file at `path` with metadata `meta`. A name that does not
    /// match, or whose match is no time, is an error (the caller decides: the producer falls
    /// back to the modification time and says so).
    pub fn file_time(&self, path: &Path, meta: &std::fs::Metadata) -> Result<i64, String> {
        match self {
            FileTimeFrom::Mtime => Ok(mtime_seconds(meta)),
            FileTimeFrom::Name(re) => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                time_in_name(re, &name)
            }
        }
    }
}

/// The time in `name` by `re` (see [`FileTimeFrom::Name`]).
pub fn time_in_name(re: &regex::Regex, name: &str) -> Result<i64, String> {
    let time = time_in_name_unchecked(re, name)?;
    if plausible(time) {
        Ok(time)
    } else {
        Err(format!(
            "the time in `{name}` ({time} s since the epoch) is not between the years 1900 and 9999"
        ))
    }
}

fn time_in_name_unchecked(re: &regex::Regex, name: &str) -> Result<i64, String> {
    let caps = re
        .captures(name)
        .ok_or_else(|| format!("name `{name}` does not match /{re}/"))?;
    let number = |group: &str| -> Option<Result<i64, String>> {
        caps.name(group).map(|m| {
            m.as_str()
                .parse::<i64>()
                .map_err(|_| format!("`{}` in `{name}` is no whole number", m.as_str()))
        })
    };
    if let Some(s) = number("epoch_s") {
        return s;
    }
    if let Some(min) = number("epoch_min") {
        return min?
            .checked_mul(60)
            .ok_or_else(|| format!("minutes in `{name}` out of range"));
    }
    if let Some(ms) = number("epoch_ms") {
        return Ok(ms?.div_euclid(1000));
    }
    let text = caps
        .get(1)
        .or_else(|| caps.get(0))
        .map_or("", |m| m.as_str());
    parse_utc(text).ok_or_else(|| format!("`{text}` in `{name}` is no date-time"))
}

/// `time` (Unix seconds) as RFC 3339 UTC, or the number where no date has it.
pub fn format_utc(time: i64) -> String {
    chrono::DateTime::from_timestamp(time, 0).map_or_else(
        || format!("{time} s"),
        |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// Unix seconds of a UTC date-time in a common form: RFC 3339 (with any offset), or a date with
/// an optional time in `-`/`:`-separated or compact form, read as UTC.
pub fn parse_utc(text: &str) -> Option<i64> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime};
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp());
    }
    let bare = text.strip_suffix('Z').unwrap_or(text);
    const DATE_TIMES: &[&str] = &[
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H-%M-%S",
        "%Y-%m-%dT%H-%M",
        "%Y-%m-%d_%H-%M-%S",
        "%Y-%m-%d_%H-%M",
        "%Y%m%dT%H%M%S",
        "%Y%m%dT%H%M",
        "%Y%m%d%H%M%S",
        "%Y%m%d%H%M",
    ];
    for format in DATE_TIMES {
        if let Ok(t) = NaiveDateTime::parse_from_str(bare, format) {
            return Some(t.and_utc().timestamp());
        }
    }
    for format in ["%Y-%m-%d", "%Y%m%d"] {
        if let Ok(d) = NaiveDate::parse_from_str(bare, format) {
            return Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_time_windows() {
        let day = std::time::Duration::from_secs(86_400);
        let window = TimeWindow {
            back: Some(35 * day),
            ahead: Some(std::time::Duration::from_secs(3600)),
        };
        let now = 1_800_000_000;
        assert!(window.check(now, now).is_ok());
        assert!(window.check(now - 35 * 86_400, now).is_ok());
        assert!(window
            .check(now - 35 * 86_400 - 1, now)
            .unwrap_err()
            .contains("max-age"));
        assert!(window.check(now + 3600, now).is_ok());
        assert!(window
            .check(now + 3601, now)
            .unwrap_err()
            .contains("max-ahead"));
        assert!(TimeWindow::OPEN.check(0, now).is_ok());
        assert!(TimeWindow::OPEN.check(i64::MAX, now).is_err());
        assert_eq!(parse_span("35d").unwrap(), Some(35 * day));
        assert_eq!(parse_span("off").unwrap(), None);
        assert!(parse_span("5w").is_err());
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn periods_parse_print_and_bucket() {
        assert_eq!("1h".parse::<Period>().unwrap().length(), Some(3600));
        assert_eq!("15m".parse::<Period>().unwrap().length(), Some(900));
        assert_eq!("2d".parse::<Period>().unwrap().length(), Some(172_800));
        assert_eq!("off".parse::<Period>().unwrap(), Period::OFF);
        for bad in ["", "0h", "-1h", "1", "1s", "1.5h", "h", "1w"] {
            assert!(bad.parse::<Period>().is_err(), "{bad}");
        }
        for s in ["off", "90m", "1h", "36h", "1d"] {
            assert_eq!(s.parse::<Period>().unwrap().to_string(), s);
        }
        let hour = Period::default();
        assert_eq!(hour.start_of(7199), Some(3600));
        assert_eq!(hour.start_of(7200), Some(7200));
        assert_eq!(hour.start_of(-1), Some(-3600));
        assert_eq!(Period::OFF.start_of(7200), None);
    }

    #[test]
    fn times_come_from_names() {
        let re = |p: &str| regex::Regex::new(p).unwrap();
        // Minutes since the epoch.
        assert_eq!(
            time_in_name(&re(r"^(?P<epoch_min>\d+)\.dat$"), "26593136.dat"),
            Ok(26_593_136 * 60)
        );
        assert_eq!(
            time_in_name(&re(r"(?P<epoch_s>\d+)"), "x-1700000000.log"),
            Ok(1_700_000_000)
        );
        assert_eq!(
            time_in_name(&re(r"(?P<epoch_ms>\d+)"), "1700000000999"),
            Ok(1_700_000_000)
        );
        // ISO forms, with or without the group.
        let iso = re(r"usage-(.+)\.txt");
        assert_eq!(
            time_in_name(&iso, "usage-2026-11-26T10:15:00Z.txt"),
            Ok(1_795_688_100)
        );
        assert_eq!(
            time_in_name(&iso, "usage-2026-11-26T11:15:00+01:00.txt"),
            Ok(1_795_688_100)
        );
        assert_eq!(
            time_in_name(&iso, "usage-20261126T1015.txt"),
            Ok(1_795_688_100)
        );
        assert_eq!(time_in_name(&iso, "usage-20261126.txt"), Ok(1_795_651_200));
        assert!(time_in_name(&iso, "other.txt").is_err());
        // Nanoseconds read as seconds: no year 9999 or later.
        assert!(time_in_name(&re(r"(?P<epoch_s>\d+)"), "1795688100000000000").is_err());
        assert!(time_in_name(&iso, "usage-yesterday.txt").is_err());
        assert!("name:(".parse::<FileTimeFrom>().is_err());
        assert!("ctime".parse::<FileTimeFrom>().is_err());
    }
}
