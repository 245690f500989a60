//! `tally sum`: the engine on local files (or stdin), without Kafka. Prints `consumer_id total`
//! lines sorted by id, so the output diffs against
//! `awk '{s[$1]+=$2} END {for (k in s) printf "%s %.0f\n", k, s[k]}' | sort -n` on well-formed
//! input (awk sums in doubles: exact below 2^53), and a summary on stderr.
//!
//! Memory: the engine holds at most `--keys-max` keys; the printed result itself holds one
//! entry per distinct consumer (it is the output).

use std::collections::HashMap;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context};

use tally_engine::source::FileSource;
use tally_engine::stream::{sum_reader, STREAM_BLOCK_BYTES};
use tally_engine::{
    self as engine, BadLine, BadLinePolicy, EngineConfig, EngineError, Reason, Sink, Source, Stats,
    Stopped,
};

/// Arguments of `tally sum`.
#[derive(Debug, Clone, clap::Args)]
pub struct SumArgs {
    /// Files to sum; `-` reads stdin.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Engine settings.
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Engine settings as flags (shared by `tally sum` and `tally parser`).
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Most distinct consumer ids held in memory before partial sums are flushed. `tally
    /// parser` holds up to this many again while it merges a transaction's units.
    #[arg(long, env = "TALLY_KEYS_MAX", default_value_t = 1_000_000, value_parser = tally_core::args::positive_usize)]
    pub keys_max: usize,
    /// Parse threads (default: all cores).
    #[arg(long, env = "TALLY_THREADS", value_parser = tally_core::args::positive_usize)]
    pub threads: Option<usize>,
    /// What to do with a bad line; it is always counted.
    #[arg(long, env = "TALLY_BAD_LINES", value_enum, default_value_t = BadLinePolicy::DeadLetter)]
    pub bad_lines: BadLinePolicy,
    /// Longest acceptable line, in bytes (at least 40).
    #[arg(long, env = "TALLY_LINE_BYTES_MAX", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(EngineConfig::LINE_BYTES_MIN as i64..))]
    pub line_bytes_max: u32,
    /// Bytes per parallel chunk.
    #[arg(long, env = "TALLY_CHUNK_BYTES", default_value_t = 8 << 20, value_parser = tally_core::args::positive_usize)]
    pub chunk_bytes: usize,
}

impl EngineArgs {
    /// The engine configuration these flags describe.
    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            keys_max: self.keys_max,
            line_bytes_max: self.line_bytes_max as usize,
            chunk_bytes: self.chunk_bytes,
            bad_lines: self.bad_lines,
        }
    }

    /// A rayon pool with the configured thread count.
    pub fn pool(&self) -> anyhow::Result<rayon::ThreadPool> {
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("tally-parse-{i}"))
            .build()
            .context("cannot start the parse thread pool")
    }
}

/// Bad lines printed in detail on stderr; the rest are counted.
const BAD_LINES_SHOWN: u64 = 100;

/// Collects the sums of all files, and reports bad lines on stderr.
///
/// The result holds one entry per distinct consumer (it is the output). With millions of
/// consumers one map behind one lock would make every added pair a cache miss under
/// contention, so it is sharded by a hash of the id: a batch is scattered by shard first, then
/// each shard is updated in one burst under its own lock.
struct Collect {
    shards: Vec<Mutex<HashMap<i64, i128, BuildIdHasher>>>,
    bad: Mutex<BadCounts>,
}

const SHARDS: usize = 1024;

impl Collect {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            bad: Mutex::new(BadCounts::default()),
        }
    }

    fn into_sorted(self) -> Vec<(i64, i128)> {
        let mut all: Vec<(i64, i128)> = Vec::new();
        for shard in self.shards {
            all.extend(shard.into_inner().unwrap_or_else(|p| p.into_inner()));
        }
        all.sort_unstable_by_key(|&(id, _)| id);
        all
    }
}

fn shard_of(id: i64) -> usize {
    ((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARDS.trailing_zeros())) as usize
}

/// A multiplicative hash for integer keys: SipHash's DoS resistance buys nothing for data
/// files and costs several times the map update.
#[derive(Default, Clone, Copy)]
struct BuildIdHasher;

#[derive(Default)]
struct IdHasher(u64);

impl std::hash::BuildHasher for BuildIdHasher {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        }
    }
    fn write_i64(&mut self, i: i64) {
        // Mix, then fold the high bits down: hashbrown takes its bucket from the low bits.
        let x = (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        self.0 = x ^ (x >> 29);
    }
}

#[derive(Default)]
struct BadCounts {
    /// Name of the input being read, for reports.
    input: String,
    shown: u64,
    by_reason: HashMap<Reason, u64>,
}

impl Sink for Collect {
    fn sums(&self, mut batch: Vec<(i64, i64)>) -> Result<(), Stopped> {
        batch.sort_unstable_by_key(|&(id, _)| shard_of(id));
        for run in batch.chunk_by(|a, b| shard_of(a.0) == shard_of(b.0)) {
            let mut shard = self.shards[shard_of(run[0].0)]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for &(id, sum) in run {
                *shard.entry(id).or_default() += i128::from(sum);
            }
        }
        Ok(())
    }

    fn bad_line(&self, bad: BadLine) -> Result<(), Stopped> {
        let mut counts = self.bad.lock().unwrap_or_else(|p| p.into_inner());
        *counts.by_reason.entry(bad.reason).or_default() += 1;
        if counts.shown < BAD_LINES_SHOWN {
            counts.shown += 1;
            eprintln!(
                "bad line: {}: byte {}: {}: {:?}",
                counts.input,
                bad.offset,
                bad.reason,
                String::from_utf8_lossy(&bad.raw)
            );
        }
        Ok(())
    }
}

/// A progress bar in bytes on stderr when it is a terminal; nothing otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

/// On a terminal, a file is summed in pieces of this size, the bar moving after each (lines
/// belong to the piece they start in, so pieces add up to the whole file exactly).
const PROGRESS_PIECE: u64 = 256 << 20;

impl Progress {
    fn new(files: &[std::path::PathBuf]) -> Self {
        if !io::stderr().is_terminal() {
            return Self { bar: None };
        }
        let total: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.len())
            .sum();
        let bar = indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Self { bar: Some(bar) }
    }

    fn sum_file(
        &self,
        source: &FileSource,
        config: &engine::EngineConfig,
        pool: &rayon::ThreadPool,
        sink: &Collect,
    ) -> Result<Stats, EngineError> {
        let len = source.len();
        let Some(bar) = &self.bar else {
            return engine::sum_range(source, 0..len, config, pool, sink);
        };
        let mut stats = Stats::default();
        let mut start = 0;
        while start < len {
            let end = (start + PROGRESS_PIECE).min(len);
            stats.merge(&engine::sum_range(source, start..end, config, pool, sink)?);
            bar.inc(end - start);
            start = end;
        }
        Ok(stats)
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs `tally sum`: prints the totals on stdout, the summary on stderr.
pub fn run(args: &SumArgs) -> anyhow::Result<()> {
    let config = args.engine.config();
    let pool = args.engine.pool()?;
    let sink = Collect::new();
    let started = Instant::now();
    let mut stats = Stats::default();
    let bar = Progress::new(&args.files);
    for path in &args.files {
        let name = path.display().to_string();
        sink.bad.lock().unwrap_or_else(|p| p.into_inner()).input = name.clone();
        let result = if name == "-" {
            sum_reader(
                io::stdin().lock(),
                &config,
                &pool,
                &sink,
                STREAM_BLOCK_BYTES,
            )
        } else {
            let file = std::fs::File::open(path).with_context(|| format!("cannot open {name}"))?;
            let meta = file
                .metadata()
                .with_context(|| format!("cannot stat {name}"))?;
            if meta.is_dir() {
                bail!("{name} is a directory");
            }
            if meta.is_file() {
                let source =
                    FileSource::new(file).with_context(|| format!("cannot read {name}"))?;
                bar.sum_file(&source, &config, &pool, &sink)
            } else {
                // A pipe or FIFO (`tally sum <(zcat f.gz)`): no length to map, stream it.
                sum_reader(file, &config, &pool, &sink, STREAM_BLOCK_BYTES)
            }
        };
        match result {
            Ok(s) => stats.merge(&s),
            Err(EngineError::BadLine(bad)) => bail!(
                "{name}: bad line at byte {} ({}): {:?} (--bad-lines=fail)",
                bad.offset,
                bad.reason,
                String::from_utf8_lossy(&bad.raw)
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot sum {name}")),
        }
    }
    bar.finish();
    let elapsed = started.elapsed();

    let bad = sink
        .bad
        .lock()
        .map(|mut b| std::mem::take(&mut *b))
        .unwrap_or_default();
    let totals = sink.into_sorted();
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 20, stdout.lock());
    for (id, total) in &totals {
        writeln!(out, "{id} {total}").context("cannot write output")?;
    }
    out.flush().context("cannot write output")?;

    let mut reasons: Vec<_> = bad.by_reason.into_iter().collect();
    reasons.sort();
    let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{r}={n}")).collect();
    let secs = elapsed.as_secs_f64();
    eprintln!(
        "tally sum: {} consumers, {} lines, {} bad lines{}, {} bytes in {:.3} s ({:.2} GB/s)",
        totals.len(),
        stats.lines,
        stats.bad_lines,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        },
        stats.bytes,
        secs,
        stats.bytes as f64 / secs.max(1e-9) / 1e9
    );
    Ok(())
}
