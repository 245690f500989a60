//! `tally`: one binary, one subcommand per stage. Thin: parse arguments, set up logging, call
//! the stage crate. The logic lives in the libraries so tests can run stages in-process.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tally_core::{DatabaseArgs, TelemetryArgs};

/// Exactly-once per-consumer sums from large data files into PostgreSQL, through Kafka.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sum `<consumer_id> <amount>` lines of local files (or stdin) and print the totals.
    Sum(tally_parser::offline::SumArgs),
    /// Apply the database migrations (idempotent).
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tally_core::telemetry::init(&cli.telemetry);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tally: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Sum(args) => tally_parser::offline::run(&args),
        Command::Migrate { database } => {
            runtime()?.block_on(async { tally_db_client::schema::migrate_url(&database).await })
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
