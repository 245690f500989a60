//! A unit against its stream's done-state: which version the state describes once the unit is
//! counted, and which of the unit's bytes are still to be summed.
//!
//! The rules (docs/architecture.md, "File identity"):
//! - bytes already summed or rejected in the stream's state are never read again, whatever
//!   split or announcement the unit comes from;
//! - a version whose first bytes are the state's version (same fingerprint at the state's
//!   size) is an append: it inherits the state's ranges, and the longer version describes the
//!   stream from then on;
//! - any other version is a rewrite in place: the state starts afresh for it (the old
//!   version's counted bytes stay counted; its uncounted units are rejected when read, as the
//!   file no longer holds them).

use std::fs::File;
use std::io;

use tally_model::identity::fingerprint;
use tally_model::messages::{StreamDone, WorkUnit};
use tally_model::ranges::Ranges;

/// How to count one unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The stream's state to count the unit against (and to update with it).
    pub state: StreamDone,
    /// The unit's bytes that no earlier unit summed or rejected, in order.
    pub missing: Vec<(u64, u64)>,
    /// The state described another version, which the file no longer holds: started afresh.
    pub rewritten: bool,
}

/// An empty state for the unit's version.
pub fn fresh(unit: &WorkUnit) -> StreamDone {
    StreamDone {
        stream: unit.stream.clone(),
        file_id: unit.file_id.clone(),
        path: unit.path.clone(),
        file_bytes: unit.file_bytes,
        fingerprint: unit.fingerprint,
        summed: Ranges::new(),
        rejected: Ranges::new(),
    }
}

/// The unit's bytes not yet summed or rejected in `state`.
pub fn missing(state: &StreamDone, unit: &WorkUnit) -> Vec<(u64, u64)> {
    state.done().missing(unit.start, unit.end)
}

/// Plans `unit` (its `file` opened and verified: the announced version, or grown from it)
/// against the stream's `state`.
pub fn plan(state: Option<&StreamDone>, unit: &WorkUnit, file: &File) -> io::Result<Plan> {
    let (state, rewritten) = match state {
        None => (fresh(unit), false),
        Some(state) if state.file_id == unit.file_id => (state.clone(), false),
        Some(state) => {
            let len = file.metadata()?.len();
            let still_there = state.file_bytes <= len
                && fingerprint(file, state.file_bytes)? == state.fingerprint;
            if still_there {
                let mut state = state.clone();
                if unit.file_bytes >= state.file_bytes {
                    state.file_id.clone_from(&unit.file_id);
                    state.path.clone_from(&unit.path);
                    state.file_bytes = unit.file_bytes;
                    state.fingerprint = unit.fingerprint;
                }
                (state, false)
            } else {
                (fresh(unit), true)
            }
        }
    };
    let missing = missing(&state, unit);
    Ok(Plan {
        state,
        missing,
        rewritten,
    })
}

/// What to do with a unit, against its stream's state.
#[derive(Debug)]
pub enum Step {
    /// Its bytes are all summed or rejected already.
    Skip,
    /// It cannot be read as announced; the reason.
    Reject(String),
    /// Sum `plan.missing` of `file`.
    Count {
        /// The unit's file, opened and verified.
        file: File,
        /// The state to count it against, and the bytes still to sum.
        plan: Plan,
    },
}

/// Whether every byte of `unit` is summed or rejected in `state` (of its version already).
pub fn done_already(state: Option<&StreamDone>, unit: &WorkUnit) -> bool {
    state.is_some_and(|s| s.file_id == unit.file_id && missing(s, unit).is_empty())
}

/// Decides what to do with `unit` against its stream's `state`: skip it when its bytes are
/// done, reject it when its file is not the announced one ([`crate::open::open_unit`], inside
/// `data_root`), count the bytes still missing otherwise. An empty file's one empty unit is
/// counted the first time it is seen, so that the file completes.
pub fn prepare(state: Option<&StreamDone>, unit: &WorkUnit, data_root: &std::path::Path) -> Step {
    if done_already(state, unit) {
        return Step::Skip;
    }
    let file = match crate::open::open_unit(unit, data_root) {
        Ok(file) => file,
        Err(reason) => return Step::Reject(reason),
    };
    let plan = match plan(state, unit, &file) {
        Ok(plan) => plan,
        Err(e) => return Step::Reject(format!("cannot read: {e}")),
    };
    if plan.rewritten {
        tracing::warn!(
            path = unit.path,
            "file rewritten in place since its last count: counted as a new version"
        );
    }
    let empty_first = state.is_none() && unit.start == unit.end;
    if plan.missing.is_empty() && !empty_first {
        return Step::Skip;
    }
    Step::Count { file, plan }
}

/// The stream's state once `plan`'s bytes of `unit` are summed, and the unit's summary for
/// the ledger (`stats`: what summing them counted).
pub fn counted(
    plan: Plan,
    unit: &WorkUnit,
    stats: &tally_engine::Stats,
) -> (StreamDone, tally_model::messages::UnitDone) {
    let mut state = plan.state;
    for &(start, end) in &plan.missing {
        state.summed.insert(start, end);
    }
    let done = tally_model::messages::UnitDone {
        unit_id: unit.unit_id.clone(),
        file_id: unit.file_id.clone(),
        path: unit.path.clone(),
        file_bytes: unit.file_bytes,
        lines: stats.lines,
        bad_lines: stats.bad_lines,
        bytes: stats.bytes,
        completes_file: state.summed.covers(0, unit.file_bytes),
    };
    (state, done)
}

/// The state after rejecting `unit`, if it is to be recorded: when the stream has no state yet
/// or the state describes the unit's version. A unit of another version is rejected because
/// the file changed; the state of the current version must not learn of it.
pub fn rejected(state: Option<&StreamDone>, unit: &WorkUnit) -> Option<StreamDone> {
    let mut state = match state {
        None => fresh(unit),
        Some(state) if state.file_id == unit.file_id => state.clone(),
        Some(_) => return None,
    };
    state.rejected.insert(unit.start, unit.end);
    Some(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tally_model::identity;

    fn unit_of(path: &std::path::Path, start: u64, end: u64) -> WorkUnit {
        let file = File::open(path).unwrap();
        let meta = file.metadata().unwrap();
        let id = identity::file_id(&meta);
        WorkUnit {
            stream: identity::stream_id(&meta),
            unit_id: WorkUnit::unit_id(&id, start, end),
            file_id: id,
            path: path.display().to_string(),
            file_bytes: meta.len(),
            fingerprint: identity::fingerprint(&file, meta.len()).unwrap(),
            start,
            end: end.min(meta.len()),
            file_time: None,
        }
    }

    fn count(state: Option<&StreamDone>, unit: &WorkUnit) -> (StreamDone, u64, bool) {
        let file = File::open(&unit.path).unwrap();
        let mut plan = plan(state, unit, &file).unwrap();
        let bytes = plan.missing.iter().map(|(s, e)| e - s).sum();
        for (s, e) in &plan.missing {
            plan.state.summed.insert(*s, *e);
        }
        (plan.state, bytes, plan.rewritten)
    }

    #[test]
    fn appends_inherit_and_rewrites_start_afresh() {
        let dir = std::env::temp_dir().join(format!("tally-streams-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        std::fs::write(&path, "1 1\n2 2\n").unwrap();
        let v1 = unit_of(&path, 0, 8);
        let (state, bytes, _) = count(None, &v1);
        assert_eq!((bytes, state.summed.pairs()), (8, &[(0, 8)][..]));
        // Announced again with another split: nothing more.
        let (state, bytes, _) = count(Some(&state), &unit_of(&path, 4, 8));
        assert_eq!(bytes, 0);
        // Grown: only the new bytes, and the longer version describes the stream.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"3 3\n")
            .unwrap();
        let v2 = unit_of(&path, 0, 12);
        let (state, bytes, rewritten) = count(Some(&state), &v2);
        assert_eq!((bytes, rewritten, &state.file_id), (4, false, &v2.file_id));
        // A late unit of the old version (read as announced): nothing more either.
        let (state, bytes, _) = count(Some(&state), &v1);
        assert_eq!((bytes, &state.file_id), (0, &v2.file_id));
        // Rewritten in place: a new version, counted whole.
        std::fs::write(&path, "7 7\n8 8\n9 9\n").unwrap();
        let v3 = unit_of(&path, 0, 12);
        let (state, bytes, rewritten) = count(Some(&state), &v3);
        assert_eq!((bytes, rewritten, &state.file_id), (12, true, &v3.file_id));
        // Rejections are recorded for the current version only.
        assert!(rejected(Some(&state), &v1).is_none());
        let r = rejected(Some(&state), &unit_of(&path, 0, 4)).unwrap();
        assert_eq!(r.rejected.pairs(), &[(0, 4)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
