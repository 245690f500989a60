//! `tally config check`: what each stage would start with, where each value comes from,
//! secrets redacted.

use std::collections::BTreeSet;
use std::ffi::OsString;

use anyhow::bail;
use clap::parser::ValueSource;
use clap::{ArgMatches, Command, CommandFactory};

use super::{config_path, merge_args, FLAG};

/// `tally config check`: the effective configuration of each long-running stage (or of the
/// subcommand named), where each value comes from, secrets redacted; an error if any of them
/// would not start.
pub fn check<C: CommandFactory>(only: &[String]) -> anyhow::Result<()> {
    let stages: Vec<Vec<String>> = if only.is_empty() {
        [
            vec!["producer", "watch"],
            vec!["parser"],
            vec!["aggregator"],
            vec!["db-client"],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(str::to_owned).collect())
        .collect()
    } else {
        vec![only.to_vec()]
    };
    let mut failed = Vec::new();
    for stage in stages {
        let mut argv: Vec<OsString> = vec!["tally".into()];
        if let Some(path) = config_path(&std::env::args_os().collect::<Vec<_>>()) {
            argv.push(FLAG.into());
            argv.push(path.into());
        }
        argv.extend(stage.iter().map(OsString::from));
        let merged = merge_args::<C>(argv)?;
        // Parsed first: the parse registers the secrets the header must not show.
        let parsed = C::command().try_get_matches_from(&merged);
        // The subcommand words only: a flag's value may be a secret.
        let words: Vec<&str> = stage
            .iter()
            .map(String::as_str)
            .take_while(|word| !word.starts_with('-'))
            .collect();
        say(&format!("[{}]", words.join(" ")));
        match parsed {
            Ok(matches) => {
                let mut m = &matches;
                let mut cmd = C::command();
                // The subcommand words only: flags after them are not subcommand names.
                for name in stage.iter().take_while(|word| !word.starts_with('-')) {
                    let (Some(sub_m), Some(sub)) = (
                        m.subcommand_matches(name),
                        cmd.find_subcommand(name).cloned(),
                    ) else {
                        break;
                    };
                    print_effective(&sub, sub_m, &merged);
                    if let Ok(Some(options)) = sub_m.try_get_raw("options") {
                        for option in options.filter_map(|o| o.to_str()) {
                            let Some((k, v)) = option.split_once('=') else {
                                continue;
                            };
                            if let Some(why) = tally_core::kafka::refused_option(k.trim(), v.trim())
                            {
                                say(&format!("# would not start: -X {}: {why}", k.trim()));
                                failed.push(words.join(" "));
                            }
                        }
                    }
                    m = sub_m;
                    cmd = sub;
                }
            }
            Err(error) => {
                say(&format!(
                    "# would not start: {}",
                    super::argument_message(&error)
                ));
                failed.push(words.join(" "));
            }
        }
        say("");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("invalid configuration for: {}", failed.join(", "))
    }
}

fn print_effective(cmd: &Command, m: &ArgMatches, merged: &[OsString]) {
    let from_file: BTreeSet<String> = merged
        .iter()
        .filter_map(|a| a.to_str())
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_owned())
        .collect();
    for arg in cmd.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        if matches!(long, "help" | "version" | "config") {
            continue;
        }
        let Ok(Some(raw)) = m.try_get_raw(id) else {
            continue;
        };
        let values: Vec<String> = raw.map(|v| v.to_string_lossy().into_owned()).collect();
        let source = match m.value_source(id) {
            Some(ValueSource::CommandLine) if from_file.contains(long) => "file",
            Some(ValueSource::CommandLine) => "flag",
            Some(ValueSource::EnvVariable) => "env",
            Some(ValueSource::DefaultValue) => "default",
            _ => "",
        };
        let shown: Vec<String> = values
            .iter()
            .map(|v| redact(long, v))
            .map(|v| format!("{v:?}"))
            .collect();
        let shown = if shown.len() == 1 {
            shown[0].clone()
        } else {
            format!("[{}]", shown.join(", "))
        };
        say(&format!("{long} = {shown}  # {source}"));
    }
}

/// One line on stdout; a closed pipe (`| head`) is not an error.
fn say(line: &str) {
    use std::io::Write;
    let line = tally_core::redact::scrub(line);
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// A value as it may be shown: passwords never, URLs without theirs.
fn redact(key: &str, value: &str) -> String {
    if key.contains("password") && !key.ends_with("-file") {
        "***".to_owned()
    } else if key.contains("url") {
        tally_core::args::redact_url(value)
    } else if key == "kafka-option" {
        match value.split_once('=') {
            // A key librdkafka does not know, or a value it refuses, may be a mistyped secret.
            Some((k, v)) => match tally_core::kafka::refused_option(k.trim(), v.trim()) {
                Some(why) => format!("{}=*** (refused: {why})", k.trim()),
                None => tally_core::redact::redact_option(k.trim(), v.trim()),
            },
            None => "***".to_owned(),
        }
    } else {
        value.to_owned()
    }
}
