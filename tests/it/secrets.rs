//! No secret in any output: passwords in every position of malformed and well-formed database
//! URLs, ingest URLs and `-X` options, through argument errors, `config check`, start-up
//! errors, retry logs and JSON logs.

use std::time::Duration;

use crate::support::Pipeline;

/// The secret, and its forms that must not show either.
const SECRET: &str = "Zq7SecretPw";

fn forbidden(text: &str) -> Option<&'static str> {
    ["Zq7SecretPw", "SecretPw", "Zq7%3FSecret", "Zq7?Secret"]
        .into_iter()
        .find(|s| text.contains(s))
}

/// Database URLs with the password in every position tried by an attacker or a typo.
fn database_urls() -> Vec<String> {
    let s = SECRET;
    [
        format!("postgresql+asyncpg://u:{s}@127.0.0.1:1/db"),
        format!("mysql://u:{s}@127.0.0.1:1/db"),
        format!("postgres://u:{s}?x@127.0.0.1:1/db"),
        format!("postgres://u:{s}@x@127.0.0.1:1/db"),
        format!("postgres://u:{s}/x@127.0.0.1:1/db"),
        format!("postgres://u:{s}#x@127.0.0.1:1/db"),
        format!("postgres://u:{s}@127.0.0.1:notaport/db"),
        format!("postgres://u:{s}@[::1/db"),
        format!("postgres://127.0.0.1:1/db?sslmode=disable&password={s}"),
        "postgres://u:Zq7%3FSecretPw@127.0.0.1:1/db".to_owned(),
        format!("host=127.0.0.1 port=1 password={s}"),
        format!("u:{s}@127.0.0.1:1/db"),
    ]
    .into()
}

/// `-X` options carrying the secret: known secret keys, an unknown (mistyped) key, a value
/// librdkafka refuses, and no `=` at all.
fn kafka_options() -> Vec<String> {
    let s = SECRET;
    [
        format!("sasl.password={s}"),
        format!("ssl.key.pem={s}"),
        format!("ssl.key.password={s}"),
        format!("sasl.oauthbearer.client.secret={s}"),
        format!("sasl.pasword={s}"),
        format!("security.protocol={s}"),
        format!("sasl.password:{s}"),
    ]
    .into()
}

/// One command: its arguments and extra environment.
type Run = (Vec<String>, Vec<(&'static str, String)>);

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_in_any_output_whatever_its_shape() {
    let p = Pipeline::new("secrets").await;
    let data = p.data.to_str().unwrap().to_owned();
    let short = Duration::from_secs(3);
    let mut runs: Vec<Run> = Vec::new();
    for url in database_urls() {
        for format in ["text", "json"] {
            let log = ("TALLY_LOG_FORMAT", format.to_owned());
            runs.push((
                vec!["config".into(), "check".into(), "db-client".into()],
                vec![("DATABASE_URL", url.clone()), log.clone()],
            ));
            runs.push((
                vec!["migrate".into(), "--database-url".into(), url.clone()],
                vec![log.clone()],
            ));
            runs.push((
                vec![
                    "db-client".into(),
                    "--stall-timeout-ms".into(),
                    "1000".into(),
                ],
                vec![("DATABASE_URL", url.clone()), log.clone()],
            ));
        }
    }
    for option in kafka_options() {
        for args in [
            vec!["config", "check", "parser", "--data-root", &data],
            vec!["parser", "--data-root", &data],
            vec!["status"],
        ] {
            let mut args: Vec<String> = args.into_iter().map(str::to_owned).collect();
            args.extend(["-X".to_owned(), option.clone()]);
            runs.push((args, vec![]));
        }
    }
    for url in [
        format!("http://u:{SECRET}@127.0.0.1:1"),
        format!("htp://u:{SECRET}@127.0.0.1:1"),
        format!("http://u:{SECRET}@[::1"),
    ] {
        runs.push((
            vec![
                "producer".into(),
                "push".into(),
                "--to".into(),
                url,
                "--give-up-after-s".into(),
                "1".into(),
                "Cargo.toml".into(),
            ],
            vec![("TALLY_INGEST_TOKEN", "t".to_owned())],
        ));
    }

    let outputs = futures_util::future::join_all(runs.iter().map(|(args, envs)| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let p = &p;
        async move { p.output_for(&args, &envs, short).await }
    }))
    .await;
    let mut leaks = Vec::new();
    for ((args, envs), out) in runs.iter().zip(&outputs) {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(found) = forbidden(&text) {
            leaks.push(format!("{args:?} {envs:?} printed {found}:\n{text}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "{} of {} runs leaked:\n{}",
        leaks.len(),
        runs.len(),
        leaks.join("\n")
    );
}
