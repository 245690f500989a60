//! `tally producer …`: the producer's subcommands.

use std::path::PathBuf;

use anyhow::Context;
use tally_core::args::UnitArgs;
use tally_core::shutdown::CancellationToken;
use tally_core::KafkaArgs;

use crate::announce::{self, Announcer, Split};
use crate::generate::{self, GenerateArgs};
use crate::watch::{self, WatchArgs};

/// Settings shared by the producer's subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct ProducerArgs {
    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Work units and file times.
    #[command(flatten)]
    pub units: UnitArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: ProducerCommand,
}

/// The producer's subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ProducerCommand {
    /// Write deterministic synthetic files atomically, then announce them.
    Generate {
        /// What to generate.
        #[command(flatten)]
        args: GenerateArgs,
        /// Only write the files (and expected totals); announce nothing.
        #[arg(long)]
        no_announce: bool,
    },
    /// Announce complete files written into a directory by any program, as they appear.
    Watch(WatchArgs),
    /// Take files pushed over HTTP into a folder, and announce them (`producer push` is the
    /// client).
    Serve(crate::ingest::ServeArgs),
    /// Push files to a `producer serve`, resuming and retrying until each is in.
    Push(crate::push::PushArgs),
    /// Announce the given files once.
    Publish {
        /// Files to announce.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Runs a producer subcommand (blocking; call on a blocking thread).
pub fn run(args: &ProducerArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let split = Split::new(&args.units);
    let one_shot_id = || {
        format!(
            "{}.producer.oneshot.{}",
            args.kafka.topic_prefix,
            std::process::id()
        )
    };
    match &args.command {
        ProducerCommand::Generate {
            args: generate,
            no_announce,
        } => {
            let total = generate.size.saturating_mul(u64::from(generate.files));
            let bar = indicatif::ProgressBar::new(total).with_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let paths = generate::generate(generate, |done| bar.set_position(done))?;
            bar.finish_and_clear();
            if !no_announce {
                let mut announcer = Announcer::new(&args.kafka, &one_shot_id())?;
                for path in &paths {
                    announcer.announce(&announce::describe(path, &split)?)?;
                }
            }
            for path in &paths {
                println!("{}", path.display());
            }
            Ok(())
        }
        ProducerCommand::Publish { files } => {
            let mut announcer = Announcer::new(&args.kafka, &one_shot_id())?;
            // Drawn only on a terminal (indicatif hides it otherwise).
            let bar = indicatif::ProgressBar::new(files.len() as u64).with_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} files {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            for path in files {
                let units = announce::describe(path, &split)?;
                announcer
                    .announce(&units)
                    .with_context(|| format!("cannot announce {}", path.display()))?;
                bar.suspend(|| {
                    tracing::info!(path = %path.display(), units = units.len(), "announced");
                });
                bar.inc(1);
            }
            bar.finish_and_clear();
            Ok(())
        }
        ProducerCommand::Watch(watch_args) => watch::run(&args.kafka, &split, watch_args, shutdown),
        ProducerCommand::Serve(serve) => crate::ingest::run(&args.kafka, &split, serve, shutdown),
        ProducerCommand::Push(push) => crate::push::run(push, shutdown),
    }
}
