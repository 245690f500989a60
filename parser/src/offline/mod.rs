//! `tally sum`: the engine on local files (or stdin), without Kafka. Prints `consumer_id total`
//! lines sorted by id, so the output diffs against
//! `awk '{s[$1]+=$2} END {for (k in s) printf "%s %.0f\n", k, s[k]}' | sort -n` on well-formed
//! input (awk sums in doubles: exact below 2^53), and a summary on stderr.
//!
//! Memory: the engine's tables hold at most a quarter of `--memory-max` ([`EngineArgs`]); the
//! printed result itself holds one entry per distinct consumer (it is the output).

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use tally_core::args::usable_memory;
use tally_engine::source::FileSource;
use tally_engine::stream::{sum_reader, STREAM_BLOCK_BYTES};
use tally_engine::{BadLinePolicy, EngineConfig, EngineError, Stats};
use tally_model::sums::keys_within;

mod collect;
mod progress;

use collect::Collect;
use progress::Progress;

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
    /// Memory for the per-consumer sums held before they leave, in bytes (`2GiB`, `512MiB`,
    /// …). Less 32 MiB for the process itself, a quarter goes to the parse workers' tables;
    /// `tally parser` and `tally standalone` give half to the table that merges a
    /// transaction's units (the rest is left for mapped windows and Kafka's buffers). A table takes only what its keys need and at most 64
    /// bytes per key of its share: 2 GiB hold 8M keys in the workers and 16M in the merge.
    /// Default: 2 GiB, or three quarters of the container's memory limit when lower.
    #[arg(long, env = "TALLY_MEMORY_MAX", value_parser = tally_core::args::bytes)]
    pub memory_max: Option<u64>,
    /// A key cap instead of `--memory-max` (configurations from before it): at most this many
    /// keys in the workers' tables, and as many again in the merge.
    #[arg(long, env = "TALLY_KEYS_MAX", value_parser = tally_core::args::positive_usize)]
    pub keys_max: Option<usize>,
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
            keys_max: self
                .keys_max
                .unwrap_or_else(|| keys_within(usable_memory(self.memory_max()) / 4)),
            line_bytes_max: self.line_bytes_max as usize,
            chunk_bytes: self.chunk_bytes,
            bad_lines: self.bad_lines,
        }
    }

    /// Most keys of the table that merges one transaction's units (`tally parser`, `tally
    /// standalone`).
    pub fn merge_keys_max(&self) -> usize {
        self.keys_max
            .unwrap_or_else(|| keys_within(usable_memory(self.memory_max()) / 2))
    }

    /// The memory budget in bytes (`--memory-max`, or its default).
    pub fn memory_max(&self) -> u64 {
        tally_core::args::memory_budget(self.memory_max, 2 << 30)
    }

    /// A rayon pool with the configured thread count.
    pub fn pool(&self) -> anyhow::Result<rayon::ThreadPool> {
        self.pool_at(0)
    }

    /// A rayon pool with the configured thread count, its threads at CPU niceness `nice` or
    /// the process's own, whichever is lower in priority.
    pub fn pool_at(&self, nice: i32) -> anyhow::Result<rayon::ThreadPool> {
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("tally-parse-{i}"))
            .start_handler(move |i| lower_priority(nice, i == 0))
            .build()
            .context("cannot start the parse thread pool")
    }
}

/// Lowers the calling thread's CPU priority to niceness `nice` (0 to 19), unless it is lower
/// already: on Linux a thread's nice value is its own, so the parse threads yield to the
/// process's other threads and to other processes (PostgreSQL, the broker, `tally api`)
/// while they keep every idle core. Raising niceness needs no privilege; a failure is
/// logged (when `log`) and the thread runs as it is.
fn lower_priority(nice: i32, log: bool) {
    let nice = nice.min(19);
    if nice <= 0 {
        return;
    }
    let result = rustix::process::getpriority_process(None).and_then(|now| match now >= nice {
        true => Ok(now),
        false => rustix::process::setpriority_process(None, nice).map(|()| nice),
    });
    match result {
        Ok(now) if log => tracing::info!(nice = now, "parse threads at lower CPU priority"),
        Ok(_) => {}
        Err(error) if log => {
            tracing::warn!(%error, nice, "cannot lower the parse threads' CPU priority")
        }
        Err(_) => {}
    }
}

/// Writes `id total` lines, formatted with `itoa` into a 1 MiB buffer (millions of lines: the
/// `fmt` machinery would cost more than the sort before it).
fn write_totals(out: &mut impl Write, totals: &[(i64, i128)]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 20);
    let (mut id_text, mut total_text) = (itoa::Buffer::new(), itoa::Buffer::new());
    for &(id, total) in totals {
        buf.extend_from_slice(id_text.format(id).as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(total_text.format(total).as_bytes());
        buf.push(b'\n');
        if buf.len() > (1 << 20) - 64 {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    out.write_all(&buf)?;
    out.flush()
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
    let totals = sink.into_sorted(&pool);
    write_totals(&mut io::stdout().lock(), &totals).context("cannot write output")?;

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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        engine: super::EngineArgs,
    }

    fn nice_of_this_thread() -> i32 {
        rustix::process::getpriority_process(None).unwrap()
    }

    #[test]
    fn parse_threads_run_at_their_niceness_and_the_caller_keeps_its_own() {
        let args = Cli::parse_from(["test", "--threads", "2"]).engine;
        let caller = nice_of_this_thread();
        let want = (caller + 7).min(19);
        let pool = args.pool_at(want).unwrap();
        let seen = pool.broadcast(|_| nice_of_this_thread());
        assert_eq!(seen, vec![want; 2]);
        assert_eq!(nice_of_this_thread(), caller);
        // 0 leaves the threads at the caller's niceness.
        let seen = args
            .pool_at(0)
            .unwrap()
            .broadcast(|_| nice_of_this_thread());
        assert_eq!(seen, vec![caller; 2]);
    }
}
