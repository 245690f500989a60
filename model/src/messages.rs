//! The records on tally's topics (JSON via serde). The contract between stages: changing a
//! field here is a contract change, recorded in docs/messages.md.

use serde::{Deserialize, Serialize};

use crate::ranges::Ranges;

/// A work unit on `tally.files` (key: [`WorkUnit::stream`]): the lines of `path` that start in
/// `start..end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkUnit {
    /// The physical file, across appends and rewrites in place (device, inode, birth time;
    /// [`crate::identity::stream_id`]). Also the record key: every unit of every version of a
    /// file lands in one partition, where one parser owns its done-state.
    pub stream: String,
    /// The version announced: device, inode, mtime and size ([`crate::identity::file_id`]).
    pub file_id: String,
    /// `<file_id>/<start>-<end>`: names the byte range, so units of different splits differ.
    pub unit_id: String,
    /// Absolute path as the producer saw it; must resolve inside the parser's `--data-root`.
    pub path: String,
    /// File size at announcement: only these bytes are read, even if the file grew since.
    pub file_bytes: u64,
    /// [`crate::identity::fingerprint`] of the announced `file_bytes`.
    pub fingerprint: u64,
    /// First byte of the unit.
    pub start: u64,
    /// One past the last byte of the unit.
    pub end: u64,
    /// The file's time (Unix seconds): its modification time at announcement, or a time read
    /// from its name (`--file-time-from`). Its lines count in the period that holds it. Absent
    /// from units of older producers: the parser then takes the mtime in `file_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_time: Option<i64>,
}

/// Longest id (stream, file or unit) a work unit may carry.
pub const ID_BYTES_MAX: usize = 256;
/// Longest path a work unit may carry (Linux's `PATH_MAX`).
pub const PATH_BYTES_MAX: usize = 4096;

impl WorkUnit {
    /// The unit id for bytes `start..end` of `file_id`.
    pub fn unit_id(file_id: &str, start: u64, end: u64) -> String {
        format!("{file_id}/{start}-{end}")
    }

    /// The file's time (Unix seconds): `file_time`, or for units of older producers the
    /// modification time in `file_id`; `None` when neither is a plausible time
    /// ([`crate::period::plausible`]).
    pub fn time(&self) -> Option<i64> {
        self.file_time
            .or_else(|| crate::identity::file_id_mtime(&self.file_id))
            .filter(|&t| crate::period::plausible(t))
    }

    /// Whether the unit is well-formed, before anything is opened: ids and path of sane length
    /// without control characters, a unit id that names its file and byte range, a byte range
    /// inside the file. The error is the dead-letter reason. A unit that fails this is a bad
    /// notification: it names nothing tally could ever parse.
    pub fn check(&self) -> Result<(), String> {
        let clean = |what: &str, s: &str, max: usize| {
            if s.is_empty() || s.len() > max {
                Err(format!("{what} is {} bytes long (1 to {max})", s.len()))
            } else if s.chars().any(char::is_control) {
                Err(format!("{what} contains a control character"))
            } else {
                Ok(())
            }
        };
        clean("stream", &self.stream, ID_BYTES_MAX)?;
        clean("file_id", &self.file_id, ID_BYTES_MAX)?;
        clean("unit_id", &self.unit_id, ID_BYTES_MAX)?;
        clean("path", &self.path, PATH_BYTES_MAX)?;
        if self.start > self.end || self.end > self.file_bytes {
            return Err(format!(
                "byte range {}..{} is not inside the {}-byte file",
                self.start, self.end, self.file_bytes
            ));
        }
        if self.unit_id != Self::unit_id(&self.file_id, self.start, self.end) {
            return Err("unit_id does not name its file_id and byte range".to_owned());
        }
        Ok(())
    }
}

/// The done-state of a stream on `tally.done` (key: stream; compacted, so the latest record
/// per stream is what counts): which bytes of its latest counted version are summed or
/// rejected. Written in the transaction of every unit that changes it; a tombstone (no
/// payload) when the parsers prune it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDone {
    /// The stream.
    pub stream: String,
    /// The version the ranges describe: the longest counted one.
    pub file_id: String,
    /// Its path when last announced.
    pub path: String,
    /// Its size.
    pub file_bytes: u64,
    /// Its [`crate::identity::fingerprint`]: a later version whose first `file_bytes` have the
    /// same fingerprint is an append and inherits the ranges; any other is a rewrite and
    /// starts afresh.
    pub fingerprint: u64,
    /// Bytes whose lines are in the sums.
    pub summed: Ranges,
    /// Bytes whose units were rejected (dead-lettered): never parsed again.
    pub rejected: Ranges,
}

impl StreamDone {
    /// The bytes summed or rejected: never parsed again.
    pub fn done(&self) -> Ranges {
        let mut all = self.summed.clone();
        all.extend(&self.rejected);
        all
    }

    /// Whether every byte of the first `file_bytes` is summed or rejected.
    pub fn finished(&self, file_bytes: u64) -> bool {
        self.done().covers(0, file_bytes)
    }
}

/// A unit's summary, in its end markers on `tally.sums` (for the ingested-files ledger).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitDone {
    /// The unit.
    pub unit_id: String,
    /// Its file version.
    pub file_id: String,
    /// Its file's path.
    pub path: String,
    /// Its file version's size.
    pub file_bytes: u64,
    /// Lines summed (good and bad): those starting in the unit's bytes that no earlier unit
    /// of the stream had summed.
    pub lines: u64,
    /// Bad lines among them.
    pub bad_lines: u64,
    /// Bytes summed (the unit's bytes less those summed before).
    pub bytes: u64,
    /// With this unit every byte of the file version is summed.
    pub completes_file: bool,
}

/// A record on `tally.sums` / `tally.totals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SumsRecord {
    /// Partial sums `[consumer_id, sum]`; every id hashes to this record's partition
    /// ([`consumer_partition`]).
    Sums {
        /// Start (Unix seconds) of the usage period the sums belong to; `None` with periods
        /// off (running totals only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        period: Option<i64>,
        /// `(consumer_id, partial sum)`; an id may repeat (overflow splits).
        sums: Vec<(i64, i64)>,
    },
    /// End of a unit's sums in this partition: sent to every partition after the unit's sums
    /// there. The unit is in the totals once its end markers from all `partitions` are applied,
    /// which is what the ingested-files ledger records.
    UnitEnd {
        /// The unit's counts.
        #[serde(flatten)]
        unit: UnitDone,
        /// Number of sums partitions the unit ended in (all of them).
        partitions: i32,
    },
}

/// A record on `tally.dead-letter`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DeadLetter {
    /// A malformed line of a unit.
    BadLine {
        /// The unit.
        unit_id: String,
        /// The file's path.
        path: String,
        /// Byte offset of the line in the file.
        offset: u64,
        /// Why (a parse-engine reason such as `non-digit`).
        reason: String,
        /// The line's first bytes, lossily decoded.
        raw: String,
    },
    /// The bad lines of a unit past the first ones written in full (`bad-line` records): one
    /// record at the unit's end, so that a garbage file costs a bounded number of records.
    BadLinesSummary {
        /// The unit.
        unit_id: String,
        /// The file's path.
        path: String,
        /// Every bad line of the unit, those written in full included.
        bad_lines: u64,
        /// How many of them were written in full (`bad-line` records).
        written: u64,
        /// Every bad line of the unit by reason (`non-digit`, …).
        by_reason: std::collections::BTreeMap<String, u64>,
    },
    /// A unit that could not be parsed at all.
    RejectedUnit {
        /// The unit.
        unit_id: String,
        /// The file's path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A record on `tally.files` that is not a work unit.
    BadNotification {
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// Why it could not be read.
        reason: String,
        /// Its payload's first bytes, lossily decoded.
        raw: String,
    },
}

/// The partition of `tally.sums`/`tally.totals` that owns `consumer_id`: a fixed mix of the
/// id (not librdkafka's key hash, which would need the id formatted as a key per record).
pub fn consumer_partition(consumer_id: i64, partitions: i32) -> i32 {
    let mut x = consumer_id as u64;
    // splitmix64 finaliser: cheap, and spreads sequential ids evenly.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x % partitions.max(1) as u64) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_as_documented() {
        let record = SumsRecord::Sums {
            period: None,
            sums: vec![(1, 2), (3, 4)],
        };
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(json, r#"{"type":"sums","sums":[[1,2],[3,4]]}"#);
        assert_eq!(serde_json::from_str::<SumsRecord>(&json).unwrap(), record);
        let dead = DeadLetter::RejectedUnit {
            unit_id: "f/0-1".into(),
            path: "/x".into(),
            reason: "outside data root".into(),
        };
        let json = serde_json::to_string(&dead).unwrap();
        assert!(json.starts_with(r#"{"kind":"rejected-unit""#), "{json}");
    }

    #[test]
    fn work_units_are_checked_before_use() {
        let good = WorkUnit {
            stream: "s".into(),
            file_id: "f".into(),
            unit_id: "f/0-10".into(),
            path: "/data/x".into(),
            file_bytes: 10,
            fingerprint: 7,
            start: 0,
            end: 10,
            file_time: None,
        };
        assert_eq!(good.check(), Ok(()));
        let bad = |edit: fn(&mut WorkUnit)| {
            let mut unit = good.clone();
            edit(&mut unit);
            unit.check().unwrap_err()
        };
        assert!(bad(|u| u.unit_id = "f/\0".into()).contains("control"));
        assert!(bad(|u| u.path = "/data/\nx".into()).contains("control"));
        assert!(bad(|u| u.file_id = "x".repeat(100_000)).contains("100000 bytes"));
        assert!(bad(|u| u.stream = String::new()).contains("stream is 0 bytes"));
        assert!(bad(|u| u.unit_id = "g/0-10".into()).contains("name its"));
        assert!(bad(|u| u.unit_id = "f/0".into()).contains("name its"));
        assert!(bad(|u| u.start = 2).contains("name its"));
        assert!(bad(|u| u.end = 11).contains("not inside"));
        assert!(bad(|u| {
            u.start = 5;
            u.end = 4;
        })
        .contains("not inside"));
        // An empty file's one unit is fine.
        let mut empty = good.clone();
        (empty.file_bytes, empty.end, empty.unit_id) = (0, 0, "f/0-0".into());
        assert_eq!(empty.check(), Ok(()));
    }

    #[test]
    fn partitions_spread_and_stay_in_range() {
        let mut counts = [0u32; 6];
        for id in 0..60_000 {
            counts[consumer_partition(id, 6) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(consumer_partition(5, 1), 0);
    }
}
