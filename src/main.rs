//! `tally`: one binary, one subcommand per stage. Thin: parse arguments, set up logging, call
//! the stage crate. The logic lives in the libraries so tests can run stages in-process.

mod config;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tally_core::shutdown::{self, CancellationToken};
use tally_core::{DatabaseArgs, KafkaArgs, TelemetryArgs};

/// Exactly-once per-consumer sums from large data files into PostgreSQL, through Kafka.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// A TOML file with the same keys as the flags (top level, or in a `[subcommand]`
    /// section); a flag or env var wins over it (docs/operations.md "Configuration file").
    #[arg(long, env = "TALLY_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Producer stage: generate, watch and announce data files.
    Producer(tally_producer::cli::ProducerArgs),
    /// Parser stage: parse announced work units into per-consumer sums (a consumer group).
    Parser(Box<tally_parser::service::ParserArgs>),
    /// Aggregator stage (optional): merge sums across units and files before the database (a
    /// consumer group; run the db-client with `--from-totals`).
    Aggregator(tally_aggregator::service::AggregatorArgs),
    /// DB-client stage: add sums to the totals in PostgreSQL, exactly once (a consumer group).
    DbClient(tally_db_client::service::DbClientArgs),
    /// Usage over HTTP: queries with an OpenAPI document, live changes and a web console, from
    /// the totals in PostgreSQL (stateless; run any number behind a load balancer).
    #[command(subcommand_negates_reqs = true)]
    Api(Box<tally_api::ApiArgs>),
    /// One process, PostgreSQL only (no Kafka): count a folder's files into the totals (and
    /// period totals), exactly once, as they appear.
    Standalone(Box<tally_standalone::StandaloneArgs>),
    /// Sum `<consumer_id> <amount>` lines of local files (or stdin) and print the totals.
    Sum(tally_parser::offline::SumArgs),
    /// The pipeline at a glance: files by state, lag per stage and partition, dead letters,
    /// halted partitions. Exit status 1 when something needs an operator.
    Status(tally_operator::status::StatusArgs),
    /// Usage per consumer and period (`consumer_period_totals`), as text or CSV.
    Report(tally_operator::report::ReportArgs),
    /// Fold the fine periods of old usage into coarse ones (sums kept exactly), so that
    /// `consumer_period_totals` stays bounded.
    Rollup(tally_operator::rollup::RollupArgs),
    /// Compare the totals in PostgreSQL with an expected-totals file (`tally sum` output).
    Verify(tally_operator::verify::VerifyArgs),
    /// Print a pipeline topic's records as text (or JSON lines), binary sums decoded.
    Inspect(tally_operator::inspect::InspectArgs),
    /// Configuration files: `tally config check`.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Apply the database migrations (idempotent).
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Apply the migrations and create the pipeline's topics (idempotent).
    Init {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        database: DatabaseArgs,
        /// Days the files, sums, totals and dead-letter topics keep their records (new topics
        /// only). Longer than any stage may be down: the db-client stops at records deleted
        /// before it read them, and announcements deleted before a parser read them are lost.
        #[arg(long, env = "TALLY_RETENTION_DAYS",
              default_value_t = tally_core::kafka::RETENTION_DEFAULT.as_secs() / 86_400)]
        retention_days: u64,
        /// Partitions of the files and done topics (new topics only): at least the number of
        /// parser instances; all units of one file go to one partition.
        #[arg(long, env = "TALLY_FILES_PARTITIONS", default_value_t = tally_core::kafka::FILES_PARTITIONS,
              value_parser = clap::value_parser!(i32).range(1..=10_000))]
        files_partitions: i32,
        /// Partitions of the sums and totals topics (new topics only): at least the number of
        /// aggregator or db-client instances.
        #[arg(long, env = "TALLY_SUMS_PARTITIONS", default_value_t = tally_core::kafka::SUMS_PARTITIONS,
              value_parser = clap::value_parser!(i32).range(1..=10_000))]
        sums_partitions: i32,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration (`--config FILE`, env, defaults) and print the effective
    /// values of each long-running stage and where each comes from, secrets redacted.
    /// Non-zero exit if a stage would not start with it.
    Check {
        /// Only this subcommand (e.g. `parser`, `producer watch`), with its flags if any
        /// (`parser --data-root /data`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        stage: Vec<String>,
    },
}

fn main() -> ExitCode {
    let argv = match config::merge_args::<Cli>(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(error) => {
            tally_core::telemetry::report_error(json_asked().into(), &format!("{error:#}"));
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(error) => return argument_error(&error),
    };
    tally_core::telemetry::init(&cli.telemetry);
    let format = cli.telemetry.log_format;
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tally_core::telemetry::report_error(format, &format!("{error:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout as clap prints them; an argument error is one line (`tally:
/// error: …`), of JSON when JSON logs were asked for (`--log-format json` or
/// `TALLY_LOG_FORMAT=json`).
fn argument_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if !error.use_stderr()
        || matches!(
            error.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        )
    {
        error.exit();
    }
    let message = config::argument_message(error);
    tally_core::telemetry::report_error(json_asked().into(), &message);
    ExitCode::from(2)
}

/// Whether JSON logs were asked for, before the arguments are parsed.
fn json_asked() -> JsonAsked {
    let args: Vec<String> = std::env::args().collect();
    JsonAsked(
        std::env::var("TALLY_LOG_FORMAT").is_ok_and(|v| v == "json")
            || args
                .windows(2)
                .any(|w| w[0] == "--log-format" && w[1] == "json")
            || args.iter().any(|a| a == "--log-format=json"),
    )
}

struct JsonAsked(bool);

impl From<JsonAsked> for tally_core::args::LogFormat {
    fn from(asked: JsonAsked) -> Self {
        if asked.0 {
            Self::Json
        } else {
            Self::Text
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Sum(args) => tally_parser::offline::run(&args),
        Command::Producer(args) => {
            blocking_stage(move |token| tally_producer::cli::run(&args, &token))
        }
        Command::Parser(args) => {
            blocking_stage(move |token| tally_parser::service::run(&args, &token))
        }
        Command::Aggregator(args) => {
            blocking_stage(move |token| tally_aggregator::service::run(&args, &token))
        }
        Command::Api(args) => blocking_stage(move |token| tally_api::run(&args, &token)),
        Command::DbClient(args) => runtime()?.block_on(async move {
            let token = shutdown::on_signals();
            tally_db_client::service::run(&args, &token).await
        }),
        Command::Standalone(args) => runtime()?.block_on(async move {
            let token = shutdown::on_signals();
            tally_standalone::run(&args, &token).await
        }),
        Command::Status(args) => {
            if runtime()?.block_on(tally_operator::status::run(&args))? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Report(args) => runtime()?.block_on(tally_operator::report::run(&args)),
        Command::Rollup(args) => runtime()?.block_on(tally_operator::rollup::run(&args)),
        Command::Verify(args) => runtime()?.block_on(tally_operator::verify::run(&args)),
        Command::Inspect(args) => tally_operator::inspect::run(&args),
        Command::Config {
            command: ConfigCommand::Check { stage },
        } => config::check::<Cli>(&stage),
        Command::Migrate { database } => {
            runtime()?.block_on(tally_core::schema::migrate_url(&database))
        }
        Command::Init {
            kafka,
            database,
            retention_days,
            files_partitions,
            sums_partitions,
        } => runtime()?.block_on(async move {
            tally_core::schema::migrate_url(&database).await?;
            let layout = tally_core::kafka::PipelineLayout {
                files_partitions,
                sums_partitions,
                retention: std::time::Duration::from_secs(retention_days.max(1) * 24 * 3600),
            };
            tally_core::kafka::ensure_pipeline_topics(&kafka, &layout)
                .await
                .context("cannot create topics")?;
            tracing::info!(prefix = kafka.topic_prefix, "topics ready");
            Ok(())
        }),
    }
}

/// Runs a synchronous stage on a blocking thread, with SIGINT/SIGTERM wired to its token.
fn blocking_stage(
    stage: impl FnOnce(CancellationToken) -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let token = shutdown::on_signals();
        tokio::task::spawn_blocking(move || stage(token)).await?
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Flags without an env var, on purpose: the arguments of one-off commands (an operator
    /// types them once), the decisions an operator must make out loud (`--accept-gap`,
    /// `--switch-input`), and what names a single run (`--once`, `-X` which is repeatable
    /// `key=value`). docs/operations.md says the same.
    const NO_ENV: &[&str] = &[
        "generate",
        "report",
        "rollup",
        "verify",
        "inspect",
        "status",
        "sum",
        "config",
        "push",       // its files; --watch and --once below
        "login-link", // a one-off link for one person
    ];

    fn walk(command: &clap::Command, path: &mut Vec<String>, missing: &mut Vec<String>) {
        let one_off = path.iter().any(|p| NO_ENV.contains(&p.as_str()));
        for arg in command.get_arguments() {
            let long = arg.get_long().unwrap_or_default();
            let exempt = one_off
                || arg.is_positional()
                || matches!(
                    long,
                    "once"
                        | "kafka-option"
                        | "accept-gap"
                        | "switch-input"
                        | "help"
                        | "version"
                        | "config"
                        | "no-announce"
                );
            if arg.get_env().is_none() && !exempt {
                missing.push(format!("tally {} --{long}", path.join(" ")));
            }
        }
        for sub in command.get_subcommands() {
            path.push(sub.get_name().to_owned());
            walk(sub, path, missing);
            path.pop();
        }
    }

    #[test]
    fn every_setting_of_a_running_stage_has_an_env_var() {
        let mut missing = Vec::new();
        walk(&Cli::command(), &mut Vec::new(), &mut missing);
        assert!(missing.is_empty(), "flags without an env var: {missing:#?}");
    }
}
