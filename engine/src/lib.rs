//! tally-engine, the parse engine: bytes in, per-consumer sums out. No Kafka, no SQL: a
//! [`Source`] hands it windows of bytes ([`source::FileSource`] maps files; [`stream`] feeds
//! it a pipe block by block). Built on tally-model's bounded sums.
//!
//! A work unit is a byte range `[start, end)` of a file and owns exactly the lines that *start*
//! inside it, so any split of a file into units counts every line once. [`sum_range`] cuts the
//! unit into chunks with the same ownership rule and runs them on a rayon pool, one bounded
//! [`SumMap`] per worker: when a worker's map holds its share of `keys_max`, its sums go to the
//! [`Sink`] and the map starts over, so memory does not grow with the input.

mod line;
pub mod source;
pub mod stream;
#[cfg(test)]
mod tests;

use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

pub use line::{check_line_parsers, parse_line, Reason};
use tally_model::sums::agg;
pub use tally_model::sums::{Added, Merger, SumMap};

use line::{parse_fast, FAST_LOOKAHEAD};

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
    let len = source.len();
    let range = range.start.min(len)..range.end.min(len);
    if range.is_empty() {
        return Ok(Stats::default());
    }
    let chunk_bytes = config.chunk_bytes.max(1) as u64;
    let chunks = (range.end - range.start).div_ceil(chunk_bytes) as usize;
    let workers = pool.current_num_threads().min(chunks).max(1);
    let keys_per_worker = (config.keys_max / workers).max(1);
    let line_bytes_max = config.line_bytes_max.max(EngineConfig::LINE_BYTES_MIN);

    let next_chunk = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let results: Mutex<Vec<Result<Stats, EngineError>>> = Mutex::new(Vec::new());

    pool.scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|_| {
                let mut worker =
                    Worker::new(keys_per_worker, line_bytes_max, config.bad_lines, sink);
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
                    worker.flush()?;
                    Ok(worker.stats)
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

/// How many lines after its parse a line's pair is added to the sums. Its table slot is
/// prefetched when it is parsed, so the add finds it in cache instead of waiting on memory
/// (with 10k consumers the table is 512 KiB, and the file's bytes stream through the same
/// caches). A power of two. docs/benchmarks.md has the figures.
const PREFETCH_LINES: usize = 8;

/// One worker's state: its bounded aggregation, its counts, and the sums on their way out.
struct Worker<'s> {
    agg: agg::Aggregator,
    /// This worker's share of `keys_max`.
    keys_max: usize,
    /// Sums leaving the aggregation (flushed tables, overflow splits), sent as one batch once
    /// `emit_at` of them are here: bounded, and few, large batches.
    spilled: Vec<(i64, i64)>,
    emit_at: usize,
    stats: Stats,
    line_bytes_max: usize,
    policy: BadLinePolicy,
    sink: &'s dyn Sink,
}

impl<'s> Worker<'s> {
    fn new(
        keys_max: usize,
        line_bytes_max: usize,
        policy: BadLinePolicy,
        sink: &'s dyn Sink,
    ) -> Self {
        Self {
            agg: agg::Aggregator::new(keys_max),
            keys_max,
            spilled: Vec::new(),
            emit_at: keys_max.clamp(1, 1 << 16),
            stats: Stats::default(),
            line_bytes_max,
            policy,
            sink,
        }
    }

    /// Processes the lines starting in `own` of `data`. `data[0]` is at `base` in the source;
    /// `at_eof` says whether `data` ends where the source ends.
    fn chunk(
        &mut self,
        data: &[u8],
        base: u64,
        own: Range<usize>,
        at_eof: bool,
    ) -> Result<(), EngineError> {
        let mut p = own.start;
        if p > 0 && data[p - 1] != b'\n' {
            // The line running into this chunk belongs to the previous one.
            p = match memchr::memchr(b'\n', &data[p..]) {
                Some(i) => p + i + 1,
                None => return Ok(()),
            };
        }
        let fast_end = data.len().saturating_sub(FAST_LOOKAHEAD);
        let mut lines = 0u64;
        // The last PREFETCH_LINES pairs parsed, not yet added; all are added before returning.
        let mut pending = [(0i64, 0i64); PREFETCH_LINES];
        let mut parsed = 0usize;
        while p < own.end {
            lines += 1;
            if p < fast_end {
                if let Some((id, amount, next)) = parse_fast(data, p) {
                    self.agg.prefetch(id);
                    let (due_id, due_amount) =
                        std::mem::replace(&mut pending[parsed % PREFETCH_LINES], (id, amount));
                    parsed += 1;
                    if parsed > PREFETCH_LINES {
                        self.add(due_id, due_amount)?;
                    }
                    p = next;
                    continue;
                }
            }
            p = self.slow_line(data, base, p, at_eof)?;
        }
        for k in parsed.saturating_sub(PREFETCH_LINES)..parsed {
            let (id, amount) = pending[k % PREFETCH_LINES];
            self.add(id, amount)?;
        }
        self.stats.lines += lines;
        Ok(())
    }

    /// The careful path for the line at `p`; returns the next line's start.
    #[cold]
    fn slow_line(
        &mut self,
        data: &[u8],
        base: u64,
        p: usize,
        at_eof: bool,
    ) -> Result<usize, EngineError> {
        let limit = (p + self.line_bytes_max + 1).min(data.len());
        let (line, next) = match memchr::memchr(b'\n', &data[p..limit]) {
            Some(i) => (&data[p..p + i], p + i + 1),
            None if at_eof && limit == data.len() => (&data[p..], data.len()),
            None => {
                // Longer than allowed: the rest of it is skipped, up to its LF.
                let next =
                    memchr::memchr(b'\n', &data[limit..]).map_or(data.len(), |i| limit + i + 1);
                (&data[p..limit], next)
            }
        };
        match parse_line(line, self.line_bytes_max) {
            Ok((id, amount)) => self.add(id, amount)?,
            Err(reason) => self.bad(base + p as u64, reason, line)?,
        }
        Ok(next)
    }

    #[inline(always)]
    fn add(&mut self, id: i64, amount: i64) -> Result<(), EngineError> {
        self.agg.add(id, amount, self.keys_max, &mut self.spilled);
        if self.spilled.len() >= self.emit_at {
            self.emit()?;
        }
        Ok(())
    }

    fn emit(&mut self) -> Result<(), EngineError> {
        let batch = std::mem::take(&mut self.spilled);
        self.stats.batches += 1;
        self.sink.sums(batch).map_err(|_| EngineError::Stopped)
    }

    fn bad(&mut self, offset: u64, reason: Reason, line: &[u8]) -> Result<(), EngineError> {
        self.stats.bad_lines += 1;
        let report = || BadLine {
            offset,
            reason,
            raw: line[..line.len().min(EngineConfig::RAW_BYTES_MAX)].to_vec(),
        };
        match self.policy {
            BadLinePolicy::Skip => Ok(()),
            BadLinePolicy::DeadLetter => self
                .sink
                .bad_line(report())
                .map_err(|_| EngineError::Stopped),
            BadLinePolicy::Fail => Err(EngineError::BadLine(report())),
        }
    }

    /// Sends everything held, in batches of about `emit_at` sums.
    fn flush(&mut self) -> Result<(), EngineError> {
        if !self.agg.is_empty() {
            for piece in 0..self.agg.pieces() {
                self.agg.drain_piece(piece, &mut self.spilled);
                if self.spilled.len() >= self.emit_at {
                    self.emit()?;
                }
            }
        }
        if self.spilled.is_empty() {
            return Ok(());
        }
        self.emit()
    }
}
