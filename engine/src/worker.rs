//! One worker of [`crate::sum_range`]: parses its chunks line by line (the SWAR fast path,
//! else the careful classifier) into its bounded aggregation, and sends what leaves it.

use std::ops::Range;

use tally_model::sums::agg;

use crate::held::{drain, EMIT_MAX};
use crate::line::{parse_fast, parse_line, Reason};
use crate::{BadLine, BadLinePolicy, EngineConfig, EngineError, Sink, Stats};

/// How many lines after its parse a line's pair is added to the sums. Its table slot is
/// prefetched when it is parsed, so the add finds it in cache instead of waiting on memory
/// (with 10k consumers the table is 512 KiB, and the file's bytes stream through the same
/// caches). A power of two. docs/benchmarks.md has the figures.
pub(crate) const PREFETCH_LINES: usize = 8;

/// One worker's state: its bounded aggregation, its counts, and the sums on their way out.
pub(crate) struct Worker<'s> {
    pub(crate) agg: agg::Aggregator,
    /// This worker's share of `keys_max`.
    keys_max: usize,
    /// Sums leaving the aggregation (flushed tables, overflow splits), sent as one batch once
    /// `emit_at` of them are here: bounded, and few, large batches.
    spilled: Vec<(i64, i64)>,
    emit_at: usize,
    pub(crate) stats: Stats,
    line_bytes_max: usize,
    policy: BadLinePolicy,
    sink: &'s dyn Sink,
}

impl<'s> Worker<'s> {
    pub(crate) fn new(
        keys_max: usize,
        map: Option<agg::Aggregator>,
        line_bytes_max: usize,
        policy: BadLinePolicy,
        sink: &'s dyn Sink,
    ) -> Self {
        Self {
            agg: map.unwrap_or_else(|| agg::Aggregator::new(keys_max)),
            keys_max,
            spilled: Vec::new(),
            emit_at: keys_max.clamp(1, EMIT_MAX),
            stats: Stats::default(),
            line_bytes_max,
            policy,
            sink,
        }
    }

    /// Processes the lines starting in `own` of `data`. `data[0]` is at `base` in the source;
    /// `at_eof` says whether `data` ends where the source ends.
    ///
    /// Finding where a line ends needs the line's digits, so one line's parse waits on the
    /// previous one's: a loop over one run of lines is bound by that chain, not by the work per
    /// line. The chunk is therefore cut at a line start near its middle, and both halves are
    /// parsed side by side, one line of each per turn, two independent chains the CPU overlaps.
    /// The second half leaves that loop at its first line the fast path declines and goes on
    /// after the first half is done, so bad lines are still met (and reported) in file order.
    pub(crate) fn chunk(
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
        let mut ring = Ring::default();
        // The second half starts at the first line start at or after the middle.
        let middle = p + own.end.saturating_sub(p) / 2;
        let mut q = match middle {
            m if m <= p || m >= own.end => own.end,
            m if data[m - 1] == b'\n' => m,
            m => memchr::memchr(b'\n', &data[m..own.end]).map_or(own.end, |i| m + i + 1),
        };
        let half = q;
        let mut lines = 0u64;
        while p < half && q < own.end {
            lines += 2;
            match parse_fast(data, p) {
                Some((id, amount, next)) => {
                    self.ring_add(&mut ring, id, amount)?;
                    p = next;
                }
                None => p = self.slow_line(&mut ring, data, base, p, at_eof)?,
            }
            match parse_fast(data, q) {
                Some((id, amount, next)) => {
                    self.ring_add(&mut ring, id, amount)?;
                    q = next;
                }
                None => {
                    // Not counted here: the run of the second half below takes it up.
                    lines -= 1;
                    break;
                }
            }
        }
        lines += self.run(&mut ring, data, base, p..half, at_eof)?;
        lines += self.run(&mut ring, data, base, q..own.end, at_eof)?;
        ring.drain(|id, amount| self.add(id, amount))?;
        self.stats.lines += lines;
        Ok(())
    }

    /// The lines starting in `[from, end)` (`from` a line start), one after another; returns
    /// how many.
    fn run(
        &mut self,
        ring: &mut Ring,
        data: &[u8],
        base: u64,
        Range { start: mut p, end }: Range<usize>,
        at_eof: bool,
    ) -> Result<u64, EngineError> {
        let mut lines = 0u64;
        while p < end {
            lines += 1;
            match parse_fast(data, p) {
                Some((id, amount, next)) => {
                    self.ring_add(ring, id, amount)?;
                    p = next;
                }
                None => p = self.slow_line(ring, data, base, p, at_eof)?,
            }
        }
        Ok(lines)
    }

    /// Prefetches `id`'s slot and adds the pair parsed [`PREFETCH_LINES`] lines ago.
    #[inline(always)]
    fn ring_add(&mut self, ring: &mut Ring, id: i64, amount: i64) -> Result<(), EngineError> {
        self.agg.prefetch(id);
        match ring.push(id, amount) {
            Some((id, amount)) => self.add(id, amount),
            None => Ok(()),
        }
    }

    /// The careful path for the line at `p`; returns the next line's start.
    #[cold]
    fn slow_line(
        &mut self,
        ring: &mut Ring,
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
            Ok((id, amount)) => self.ring_add(ring, id, amount)?,
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
    pub(crate) fn flush(&mut self) -> Result<(), EngineError> {
        self.emit_spilled()?;
        self.stats.batches +=
            drain(&mut self.agg, self.emit_at, self.sink).map_err(|_| EngineError::Stopped)?;
        Ok(())
    }

    /// Sends the sums that already left the map.
    pub(crate) fn emit_spilled(&mut self) -> Result<(), EngineError> {
        if self.spilled.is_empty() {
            return Ok(());
        }
        self.emit()
    }
}

/// The last [`PREFETCH_LINES`] pairs parsed, not yet added: a pair is added that many lines
/// after its slot was prefetched.
#[derive(Default)]
struct Ring {
    pending: [(i64, i64); PREFETCH_LINES],
    parsed: usize,
}

impl Ring {
    /// Holds `(id, amount)`; hands back the pair it replaces, once the ring is full.
    #[inline(always)]
    fn push(&mut self, id: i64, amount: i64) -> Option<(i64, i64)> {
        let due = std::mem::replace(
            &mut self.pending[self.parsed % PREFETCH_LINES],
            (id, amount),
        );
        self.parsed += 1;
        (self.parsed > PREFETCH_LINES).then_some(due)
    }

    /// Hands every pair still held to `add`, oldest first, and empties the ring.
    fn drain(
        &mut self,
        mut add: impl FnMut(i64, i64) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        for k in self.parsed.saturating_sub(PREFETCH_LINES)..self.parsed {
            let (id, amount) = self.pending[k % PREFETCH_LINES];
            add(id, amount)?;
        }
        self.parsed = 0;
        Ok(())
    }
}
