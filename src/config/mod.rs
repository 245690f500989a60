//! `--config FILE` (env `TALLY_CONFIG`): a TOML file with the same keys as the flags, and
//! `tally config check`.
//!
//! ```toml
//! bootstrap-servers = "kafka-1:9092,kafka-2:9092"   # any subcommand that has the flag
//! topic-prefix = "billing"
//! kafka-option = ["linger.ms=10"]                   # repeatable flags: arrays
//!
//! [parser]                                          # only `tally parser`
//! data-root = "/data"
//! threads = 8
//!
//! [producer.watch]                                  # only `tally producer watch`
//! dir = "/data"
//! ```
//!
//! Precedence: a flag on the command line, then its env var, then the file, then the default.
//! The file's values are handed to clap as flags placed right after the subcommand, only for
//! flags that are neither on the command line nor set in the environment, so clap validates
//! them like any flag. A key that is no flag of any subcommand, or not of its section's
//! subcommand, is an error; so is a section that names no subcommand.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Command, CommandFactory};

mod check;

pub use check::check;

/// The flag and env var naming the file.
const FLAG: &str = "--config";
const ENV: &str = "TALLY_CONFIG";

/// `argv` with the values of the config file (if one is named) merged in.
pub fn merge_args<C: CommandFactory>(argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(path) = config_path(&argv) else {
        return Ok(argv);
    };
    let table = read(&path)?;
    let root = C::command();
    check_keys(&root, &table, &path)?;
    let levels = subcommand_path(&root, &argv);
    let names: Vec<String> = levels.iter().map(|(n, _)| n.clone()).collect();
    let extra = file_flags(&root, &names, &table, &argv)?;
    // Each flag goes right after the subcommand that owns it (a parent's flags are not
    // accepted after its subcommand's name).
    let mut at: Vec<(usize, OsString)> = Vec::new();
    for (owner, flag) in extra {
        let index = match owner {
            0 => argv.len().min(1),
            n => levels[n - 1].1,
        };
        at.push((index, flag));
    }
    let n = argv.len();
    let mut merged = Vec::with_capacity(n + at.len());
    for (i, a) in argv.into_iter().enumerate() {
        merged.extend(at.iter().filter(|(j, _)| *j == i).map(|(_, f)| f.clone()));
        merged.push(a);
    }
    merged.extend(at.into_iter().filter(|(j, _)| *j >= n).map(|(_, f)| f));
    Ok(merged)
}

/// The file named by `--config FILE`, `--config=FILE` or `TALLY_CONFIG`.
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let args: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    for (i, a) in args.iter().enumerate() {
        if a == FLAG {
            return args.get(i + 1).map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os(ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn read(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    text.parse::<toml::Table>().map_err(|e| {
        let line = e.span().map_or(0, |span| {
            text[..span.start.min(text.len())].lines().count().max(1)
        });
        anyhow::anyhow!(
            "config file {} is not valid TOML: line {line}: {}",
            path.display(),
            e.message()
        )
    })
}

/// Long flag names of `cmd` (its own and global ones), except `help`, `version`, `config`.
fn longs(cmd: &Command) -> BTreeSet<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !matches!(*l, "help" | "version" | "config"))
        .map(str::to_owned)
        .collect()
}

/// Every long flag of `cmd` and its subcommands, however deep.
fn all_longs(cmd: &Command, into: &mut BTreeSet<String>) {
    into.extend(longs(cmd));
    for sub in cmd.get_subcommands() {
        all_longs(sub, into);
    }
}

/// Refuses keys that are no flag: top-level keys must be a flag of some subcommand; a
/// section's keys, a flag of that subcommand (sections nest as subcommands do).
fn check_keys(root: &Command, table: &toml::Table, path: &Path) -> anyhow::Result<()> {
    let mut known = BTreeSet::new();
    all_longs(root, &mut known);
    for (key, value) in table {
        if let Some(sub) = root.find_subcommand(key) {
            let toml::Value::Table(section) = value else {
                bail!("{}: `{key}` must be a section", path.display());
            };
            check_section(sub, section, key, path)?;
        } else if !known.contains(key) {
            bail!("{}: unknown key `{key}`", path.display());
        }
    }
    Ok(())
}

fn check_section(
    cmd: &Command,
    table: &toml::Table,
    name: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let mut own = longs(cmd);
    // Flags of a subcommand's parent are accepted in the parent's section too.
    for sub in cmd.get_subcommands() {
        own.extend(longs(sub));
    }
    for (key, value) in table {
        if let Some(sub) = cmd.find_subcommand(key) {
            let toml::Value::Table(section) = value else {
                bail!("{}: `{name}.{key}` must be a section", path.display());
            };
            check_section(sub, section, &format!("{name}.{key}"), path)?;
        } else if !own.contains(key) {
            bail!(
                "{}: unknown key `{key}` in section [{name}] (`tally {} --help` lists the flags)",
                path.display(),
                name.replace('.', " ")
            );
        }
    }
    Ok(())
}

/// The subcommands in `argv`, each with the index just after its name.
fn subcommand_path(root: &Command, argv: &[OsString]) -> Vec<(String, usize)> {
    let mut cmd = root;
    let mut levels = Vec::new();
    for (i, a) in argv.iter().enumerate().skip(1) {
        let a = a.to_string_lossy();
        if let Some(sub) = cmd.find_subcommand(a.as_ref()) {
            levels.push((sub.get_name().to_owned(), i + 1));
            cmd = sub;
        }
    }
    levels
}

/// Flags for the file's values that apply to the subcommand at `names`, each with the level
/// that owns it (0: the root, n: the n-th subcommand).
fn file_flags(
    root: &Command,
    names: &[String],
    table: &toml::Table,
    argv: &[OsString],
) -> anyhow::Result<Vec<(usize, OsString)>> {
    // Each level's own flags; a flag belongs to the deepest level that has it.
    let mut cmd = root;
    let mut level_longs = vec![longs(root)];
    for name in names {
        if let Some(sub) = cmd.find_subcommand(name) {
            cmd = sub;
            level_longs.push(longs(cmd));
        }
    }
    let owner = |key: &str| level_longs.iter().rposition(|l| l.contains(key));
    // Values: top level first, then each section down the path (deeper wins).
    let mut values: Vec<(String, toml::Value)> = Vec::new();
    let mut section = Some(table);
    let mut depth = 0;
    while let Some(t) = section {
        for (k, v) in t {
            if !v.is_table() {
                values.retain(|(key, _)| key != k);
                values.push((k.clone(), v.clone()));
            }
        }
        section = names
            .get(depth)
            .and_then(|n| t.get(n))
            .and_then(toml::Value::as_table);
        depth += 1;
    }
    let all_args: Vec<&clap::Arg> = std::iter::once(root)
        .chain(names.iter().scan(root, |c, n| {
            *c = c.find_subcommand(n)?;
            Some(*c)
        }))
        .flat_map(Command::get_arguments)
        .collect();
    let mut given: BTreeSet<String> = BTreeSet::new();
    for a in argv.iter().filter_map(|a| a.to_str()) {
        if let Some(long) = a.strip_prefix("--") {
            given.insert(long.split('=').next().unwrap_or(long).to_owned());
        } else if let Some(short) = a.strip_prefix('-').and_then(|s| s.chars().next()) {
            // `-X value`: the short form of a long flag.
            if let Some(long) = all_args
                .iter()
                .find(|arg| arg.get_short() == Some(short))
                .and_then(|arg| arg.get_long())
            {
                given.insert(long.to_owned());
            }
        }
    }
    let mut out = Vec::new();
    for (key, value) in values {
        let Some(level) = owner(&key) else { continue };
        if given.contains(&key) {
            continue;
        }
        let arg = all_args.iter().find(|a| a.get_long() == Some(key.as_str()));
        let env_set = arg
            .and_then(|a| a.get_env())
            .and_then(std::env::var_os)
            .is_some_and(|v| !v.is_empty());
        if env_set {
            continue;
        }
        let takes_value = arg.is_some_and(|a| a.get_action().takes_values());
        let items = match value {
            toml::Value::Array(items) => items,
            other => vec![other],
        };
        for item in items {
            let text = match item {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) if !takes_value => {
                    if b {
                        out.push((level, OsString::from(format!("--{key}"))));
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!("config key `{key}`: unsupported value {other}"),
            };
            out.push((level, OsString::from(format!("--{key}={text}"))));
        }
    }
    Ok(out)
}

/// An argument error in one line, without clap's usage and tips: `error: ` dropped, and the
/// arguments a "required arguments were not provided" error lists named in that line.
pub fn argument_message(error: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let text = error.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first).trim_end();
    let message = match (error.kind(), error.get(ContextKind::InvalidArg)) {
        (ErrorKind::MissingRequiredArgument, Some(ContextValue::Strings(missing))) => {
            format!("{} {}", first.trim_end_matches(':'), missing.join(", "))
                .replace("were not provided", "were not provided:")
        }
        _ => first.to_owned(),
    };
    tally_core::redact::scrub(&message).into_owned()
}
