//! The synthetic generator: deterministic `<consumer_id> <amount>` files, written atomically
//! (temp file in `DIR/.tmp` → fsync → rename into `DIR` → fsync `DIR`), plus optionally the
//! expected per-consumer totals in `tally sum`'s output format, for end-to-end verification.
//!
//! Consumer ids are `id_base + index` for index in `0..consumers`, so a file with a million
//! consumers has 7-digit ids, like a real customer table. Amounts are uniform in
//! `1..=amount_max`. The same options and seed always give the same bytes.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// How consumer ids are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdDistribution {
    /// Every consumer equally likely.
    Uniform,
    /// Zipf with exponent 1.1: a few consumers get most lines, like real usage.
    Zipf,
}

/// What to generate.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Directory the files are renamed into.
    #[arg(long)]
    pub dir: PathBuf,
    /// Number of files.
    #[arg(long, default_value_t = 1)]
    pub files: u32,
    /// Size of each file in bytes (rounded up to a whole line).
    #[arg(long, default_value_t = 64 << 20)]
    pub size: u64,
    /// Number of distinct consumers.
    #[arg(long, default_value_t = 10_000)]
    pub consumers: u64,
    /// Distribution of consumer ids over the lines.
    #[arg(long, value_enum, default_value_t = IdDistribution::Uniform)]
    pub distribution: IdDistribution,
    /// Seed: the same seed gives the same files.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Largest amount on a line.
    #[arg(long, default_value_t = 100_000)]
    pub amount_max: u64,
    /// The smallest consumer id.
    #[arg(long, default_value_t = 1_000_000)]
    pub id_base: u64,
    /// File name prefix; files are `<prefix>-<seed>-<index>.txt`.
    #[arg(long, default_value = "usage")]
    pub prefix: String,
    /// Also write the expected per-consumer totals of all generated files to this file.
    #[arg(long)]
    pub expect: Option<PathBuf>,
}

/// Writes the files; returns their paths in order. `progress` gets bytes written so far.
pub fn generate(
    args: &GenerateArgs,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<Vec<PathBuf>> {
    ensure!(args.consumers >= 1, "--consumers must be at least 1");
    ensure!(args.amount_max >= 1, "--amount-max must be at least 1");
    ensure!(
        args.id_base
            .checked_add(args.consumers)
            .is_some_and(|m| m <= i64::MAX as u64),
        "consumer ids must fit in a signed 64-bit integer"
    );
    let tmp = args.dir.join(".tmp");
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    // Expected totals, indexed by consumer index; i128 so that no input can overflow them.
    let mut expected: Option<Vec<i128>> = args
        .expect
        .as_ref()
        .map(|_| vec![0; args.consumers as usize]);
    let zipf = Zipf::new(args.consumers as f64, 1.1).context("zipf parameters")?;
    let mut written = 0u64;
    let mut paths = Vec::new();
    for index in 0..args.files {
        let name = format!("{}-{}-{index:05}.txt", args.prefix, args.seed);
        let final_path = args.dir.join(&name);
        let tmp_path = tmp.join(&name);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(args.seed ^ (u64::from(index) << 32));
        let file = File::create(&tmp_path)
            .with_context(|| format!("cannot create {}", tmp_path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut size = 0u64;
        let mut line = Vec::with_capacity(48);
        let mut ids = itoa::Buffer::new();
        let mut amounts = itoa::Buffer::new();
        while size < args.size {
            let consumer = match args.distribution {
                IdDistribution::Uniform => rng.random_range(0..args.consumers),
                IdDistribution::Zipf => (zipf.sample(&mut rng) as u64 - 1).min(args.consumers - 1),
            };
            let amount = rng.random_range(1..=args.amount_max);
            line.clear();
            line.extend_from_slice(ids.format(args.id_base + consumer).as_bytes());
            line.push(b' ');
            line.extend_from_slice(amounts.format(amount).as_bytes());
            line.push(b'\n');
            out.write_all(&line)?;
            size += line.len() as u64;
            if let Some(e) = expected.as_mut() {
                e[consumer as usize] += i128::from(amount);
            }
            if size % (16 << 20) < line.len() as u64 {
                progress(written + size);
            }
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp_path, &final_path)
            .with_context(|| format!("cannot rename into {}", final_path.display()))?;
        written += size;
        progress(written);
        paths.push(final_path);
    }
    sync_dir(&args.dir)?;
    if let (Some(path), Some(expected)) = (&args.expect, expected) {
        write_expected(path, args.id_base, &expected)?;
    }
    Ok(paths)
}

/// Writes `consumer_id total` lines, sorted by id, for consumers with at least one line.
fn write_expected(path: &Path, id_base: u64, expected: &[i128]) -> anyhow::Result<()> {
    let mut out = BufWriter::new(
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    for (index, total) in expected.iter().enumerate() {
        if *total != 0 {
            writeln!(out, "{} {total}", id_base + index as u64)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// fsync a directory, so that a rename into it survives a crash.
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}
