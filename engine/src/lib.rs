//! tally-engine, the parse engine: bytes in, per-consumer sums out. No Kafka, no SQL: a
//! [`Source`] hands it windows of bytes ([`source::FileSource`] maps files; [`stream`] feeds
//! it a pipe block by block). Built on tally-model's bounded sums.
//!
//! A work unit is a byte range `[start, end)` of a file and owns exactly the lines that *start*
//! inside it, so any split of a file into units counts every line once. [`sum_range`] cuts the
//! unit into chunks with the same ownership rule and runs them on a rayon pool, one bounded
//! [`SumMap`] per worker: when a worker's map holds its share of `keys_max`, its sums go to the
//! [`Sink`] and the map starts over, so memory does not grow with the input. A range's workers
//! (`worker.rs`) send their maps at its end; [`sum_range_held`] keeps them instead, for the
//! next range of the same caller ([`Held`], `held.rs`).

mod held;
mod line;
pub mod source;
pub mod stream;
#[cfg(test)]
mod tests;
mod worker;

use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

pub use line::{check_line_parsers, parse_line, Reason};
pub use tally_model::sums::{Added, Merger, SumMap};

pub use held::Held;
use worker::Worker;

/// What happens to a bad line. It is always counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BadLinePolicy {
    /// Count it and hand it to [`Sink::bad_line`] (→ the dead-letter topic).
    #[default]
    DeadLetter,
    /// Count it only.
    Skip,
    /// Stop at the first one with [`EngineError::BadLine`].
    Fail,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most distinct consumer ids held in memory at once (shared by all workers).
    pub keys_max: usize,
    /// Longest acceptable line in bytes, LF excluded (≥ [`EngineConfig::LINE_BYTES_MIN`]).
    pub line_bytes_max: usize,
    /// Size of the chunks a unit is cut into for the workers.
    pub chunk_bytes: usize,
    /// What to do with bad lines.
    pub bad_lines: BadLinePolicy,
}

impl EngineConfig {
    /// Smallest `line_bytes_max` accepted: room for the longest valid line without leading zeros
    /// (19 + 1 + 19 digits and a CR).
    pub const LINE_BYTES_MIN: usize = 40;
    /// Raw bytes of a bad line kept for its report.
    pub const RAW_BYTES_MAX: usize = 256;
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            keys_max: 1_000_000,
            line_bytes_max: 4096,
            chunk_bytes: 8 << 20,
            bad_lines: BadLinePolicy::DeadLetter,
        }
    }
}

/// A bad line, for the dead-letter topic or a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// Byte offset of the line's first byte in the source.
    pub offset: u64,
    /// Why it is bad.
    pub reason: Reason,
    /// The line's first bytes (at most [`EngineConfig::RAW_BYTES_MAX`]), LF excluded.
    pub raw: Vec<u8>,
}

/// The sink refused more output; the engine stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// Where the engine's output goes. Called from worker threads, possibly concurrently; a call
/// may block (that is the back-pressure that bounds memory downstream).
pub trait Sink: Sync {
    /// A batch of `(consumer_id, partial sum)`. A consumer may appear in several batches, and
    /// twice in one batch after an overflow split.
    fn sums(&self, batch: Vec<(i64, i64)>) -> Result<(), Stopped>;
    /// A bad line (only under [`BadLinePolicy::DeadLetter`]).
    fn bad_line(&self, bad: BadLine) -> Result<(), Stopped>;
}

/// Byte windows of an input (a mapped file, a buffer).
pub trait Source: Sync {
    /// The bytes of one window.
    type Window<'a>: Deref<Target = [u8]>
    where
        Self: 'a;
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// True for an empty source.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bytes of `range` (within `0..len()`).
    fn window(&self, range: Range<u64>) -> std::io::Result<Self::Window<'_>>;
    /// Whether `window` read what the source holds, checked once it has been parsed: an
    /// error if it changed under the reader (a mapped file truncated), so that nothing parsed
    /// from it is kept.
    fn intact(&self, _window: &Self::Window<'_>) -> std::io::Result<()> {
        Ok(())
    }
}

impl Source for [u8] {
    type Window<'a> = &'a [u8];
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn window(&self, range: Range<u64>) -> std::io::Result<&[u8]> {
        Ok(&self[range.start as usize..range.end as usize])
    }
}

/// Counts for a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Lines owned by the range (good and bad).
    pub lines: u64,
    /// Bad lines among them.
    pub bad_lines: u64,
    /// Bytes of the range.
    pub bytes: u64,
    /// Batches handed to the sink.
    pub batches: u64,
}

impl Stats {
    /// Adds another range's counts.
    pub fn merge(&mut self, other: &Stats) {
        self.lines += other.lines;
        self.bad_lines += other.bad_lines;
        self.bytes += other.bytes;
        self.batches += other.batches;
    }
}

/// Why a range could not be summed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Reading the source failed.
    #[error("cannot read input")]
    Io(#[from] std::io::Error),
    /// A bad line under [`BadLinePolicy::Fail`].
    #[error("bad line at byte {} ({}): {:?}", .0.offset, .0.reason, String::from_utf8_lossy(&.0.raw))]
    BadLine(BadLine),
    /// The sink stopped the engine.
    #[error("output stopped")]
    Stopped,
}

/// Sums the lines that start in `range` of `source` on `pool`, streaming the sums (and bad
/// lines) to `sink`.
pub fn sum_range<S: Source + ?Sized>(
    source: &S,
    range: Range<u64>,
    config: &EngineConfig,
    pool: &rayon::ThreadPool,
    sink: &dyn Sink,
) -> Result<Stats, EngineError> {
    run(source, range, config, pool, sink, None)
}

/// As [`sum_range`], but the workers' maps are kept in `held` when the range is done, with
/// the sums not sent yet, and taken up again by the next call: a caller summing several
/// ranges (a parser's transaction of units) merges them in the workers' maps and sends each
/// consumer once, by [`Held::flush`], instead of at every range's end. Flush before summing
/// input whose sums must not merge with what is held (another period). After an error,
/// `held` is empty: what it held is lost with the failed range, and the caller discards its
/// output.
pub fn sum_range_held<S: Source + ?Sized>(
    source: &S,
    range: Range<u64>,
    config: &EngineConfig,
    pool: &rayon::ThreadPool,
    sink: &dyn Sink,
    held: &Held,
) -> Result<Stats, EngineError> {
    let result = run(source, range, config, pool, sink, Some(held));
    if result.is_err() {
        held.clear();
    }
    result
}

fn run<S: Source + ?Sized>(
    source: &S,
    range: Range<u64>,
    config: &EngineConfig,
    pool: &rayon::ThreadPool,
    sink: &dyn Sink,
    held: Option<&Held>,
) -> Result<Stats, EngineError> {
    let len = source.len();
    let range = range.start.min(len)..range.end.min(len);
    if range.is_empty() {
        return Ok(Stats::default());
    }
    let chunk_bytes = config.chunk_bytes.max(1) as u64;
    let chunks = (range.end - range.start).div_ceil(chunk_bytes) as usize;
    let workers = pool.current_num_threads().min(chunks).max(1);
    // Held maps outlive this call and may meet more workers later: each gets a thread's share.
    let shares = match held {
        Some(_) => pool.current_num_threads().max(1),
        None => workers,
    };
    let keys_per_worker = (config.keys_max / shares).max(1);
    let line_bytes_max = config.line_bytes_max.max(EngineConfig::LINE_BYTES_MIN);

    let next_chunk = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let results: Mutex<Vec<Result<Stats, EngineError>>> = Mutex::new(Vec::new());

    pool.scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|_| {
                let map = held.and_then(Held::take);
                let mut worker =
                    Worker::new(keys_per_worker, map, line_bytes_max, config.bad_lines, sink);
                let result = (|| {
                    loop {
                        let i = next_chunk.fetch_add(1, Ordering::Relaxed);
                        if i >= chunks || abort.load(Ordering::Relaxed) {
                            break;
                        }
                        let own_start = range.start + i as u64 * chunk_bytes;
                        let own_end = (own_start + chunk_bytes).min(range.end);
                        // One byte before the chunk tells whether a line starts at its first
                        // byte; bytes after it let its last line finish (or prove it too long).
                        let win_start = own_start.saturating_sub(1);
                        let win_end = (own_end + line_bytes_max as u64 + 2).min(len);
                        let window = source.window(win_start..win_end)?;
                        worker.chunk(
                            &window,
                            win_start,
                            (own_start - win_start) as usize..(own_end - win_start) as usize,
                            win_end == len,
                        )?;
                        source.intact(&window)?;
                    }
                    match held {
                        Some(held) => {
                            worker.emit_spilled()?;
                            let stats = worker.stats;
                            held.put(worker.agg);
                            Ok(stats)
                        }
                        None => {
                            worker.flush()?;
                            Ok(worker.stats)
                        }
                    }
                })();
                if result.is_err() {
                    abort.store(true, Ordering::Relaxed);
                }
                results
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .push(result);
            });
        }
    });

    let mut stats = Stats::default();
    let mut first_bad: Option<BadLine> = None;
    let mut other_error = None;
    for result in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
        match result {
            Ok(s) => stats.merge(&s),
            Err(EngineError::BadLine(bad)) => {
                if first_bad.as_ref().is_none_or(|b| bad.offset < b.offset) {
                    first_bad = Some(bad);
                }
            }
            Err(e) => other_error = Some(e),
        }
    }
    if let Some(e) = other_error {
        return Err(e);
    }
    if let Some(bad) = first_bad {
        return Err(EngineError::BadLine(bad));
    }
    stats.bytes = range.end - range.start;
    Ok(stats)
}
