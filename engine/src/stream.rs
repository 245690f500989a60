//! Streams (stdin, a pipe) through the engine in blocks of whole lines, with the same results
//! as [`crate::sum_range`] over the same bytes, in the memory of about one block.

use std::io::Read;

use crate::{sum_range, BadLine, EngineConfig, EngineError, Sink, Stats, Stopped};

/// A sink that shifts bad-line offsets by `base` (a block's position in a stream).
struct Shifted<'a> {
    inner: &'a dyn Sink,
    base: u64,
}

impl Sink for Shifted<'_> {
    fn sums(&self, batch: Vec<(i64, i64)>) -> Result<(), Stopped> {
        self.inner.sums(batch)
    }
    fn bad_line(&self, mut bad: BadLine) -> Result<(), Stopped> {
        bad.offset += self.base;
        self.inner.bad_line(bad)
    }
}

/// Block size for [`sum_reader`] on stdin.
pub const STREAM_BLOCK_BYTES: usize = 64 << 20;

/// Sums a stream (stdin, a pipe) in blocks of about `block_bytes` of whole lines, with the same
/// results as [`sum_range`] over the same bytes. Memory: about one block.
pub fn sum_reader(
    mut reader: impl Read,
    config: &EngineConfig,
    pool: &rayon::ThreadPool,
    sink: &dyn Sink,
    block_bytes: usize,
) -> Result<Stats, EngineError> {
    let block = block_bytes.max(4 * config.line_bytes_max.max(EngineConfig::LINE_BYTES_MIN));
    let mut buf: Vec<u8> = Vec::with_capacity(block);
    let mut base = 0u64;
    let mut stats = Stats::default();
    // Inside a too-long line that was already reported: discard up to its LF.
    let mut skipping = false;
    let mut eof = false;
    let run = |data: &[u8], range: std::ops::Range<u64>, base: u64| {
        let shifted = Shifted { inner: sink, base };
        sum_range(data, range, config, pool, &shifted).map_err(|e| match e {
            EngineError::BadLine(mut bad) => {
                bad.offset += base;
                EngineError::BadLine(bad)
            }
            e => e,
        })
    };
    while !eof || !buf.is_empty() {
        if buf.len() < block && !eof {
            // Fills up to the block (or EOF) without zeroing the buffer on every short read
            // of a pipe; read_to_end retries interrupted reads.
            let want = (block - buf.len()) as u64;
            let got = (&mut reader).take(want).read_to_end(&mut buf)?;
            eof = (got as u64) < want;
        }
        let consumed = if skipping {
            match memchr::memchr(b'\n', &buf) {
                Some(i) => {
                    skipping = false;
                    i + 1
                }
                None => buf.len(),
            }
        } else if eof {
            let s = run(&buf, 0..buf.len() as u64, base)?;
            stats.merge(&s);
            buf.len()
        } else if let Some(last) = memchr::memrchr(b'\n', &buf) {
            let s = run(&buf[..=last], 0..last as u64 + 1, base)?;
            stats.merge(&s);
            last + 1
        } else {
            // A block without any LF: one line longer than the limit. Report it once.
            let s = run(&buf, 0..1, base)?;
            stats.lines += s.lines;
            stats.bad_lines += s.bad_lines;
            stats.batches += s.batches;
            skipping = true;
            buf.len()
        };
        buf.drain(..consumed);
        base += consumed as u64;
    }
    stats.bytes = base;
    Ok(stats)
}
