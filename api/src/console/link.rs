//! `tally api login-link --tokens-file F --name NAME --url BASE`: prints a link that signs a
//! browser in to the console once, within a minute ([`super::session::link`]). It needs only
//! the api's tokens file: the link is signed with NAME's token and holds no token.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use super::session;

/// Arguments of `tally api login-link`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoginLinkArgs {
    /// The api's read-tokens file.
    #[arg(long, env = "TALLY_API_TOKENS_FILE")]
    pub tokens_file: PathBuf,
    /// Whose token signs the link (the first word of its line).
    #[arg(long)]
    pub name: String,
    /// Where the console is, as the browser reaches it (e.g. `https://tally.example.com`).
    #[arg(long)]
    pub url: String,
}

/// The link for `args`.
pub fn make(args: &LoginLinkArgs) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&args.tokens_file)
        .with_context(|| format!("cannot read {}", args.tokens_file.display()))?;
    let tokens = tally_core::server::tokens::parse(&text)
        .with_context(|| format!("in {}", args.tokens_file.display()))?;
    let mut of_name: Vec<&String> = tokens
        .iter()
        .filter(|(_, name)| **name == args.name)
        .map(|(token, _)| token)
        .collect();
    of_name.sort();
    let token = of_name.first().with_context(|| {
        format!(
            "{} has no token named {}",
            args.tokens_file.display(),
            args.name
        )
    })?;
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce).context("no randomness for the link")?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let value = session::link(&args.name, token, now + session::LINK_SECONDS, &nonce);
    let base = args.url.trim_end_matches('/');
    anyhow::ensure!(
        base.starts_with("http://") || base.starts_with("https://"),
        "--url must start with http:// or https://"
    );
    Ok(format!("{base}/login?link={value}"))
}
