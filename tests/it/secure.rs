//! Secure connections against the real services: Kafka over TLS with SASL/SCRAM (the broker's
//! `SASL_SSL` listener, certificates and user made by `scripts/services`), PostgreSQL over TLS
//! with the server certificate verified (`ssl=on` there), secrets from env vars and files and
//! never in the logs.

use std::time::Duration;

use crate::support::Pipeline;

const TIMEOUT: Duration = Duration::from_secs(120);

/// The secure side of `scripts/services env`.
struct Secure {
    servers: String,
    ca_file: String,
    user: String,
    password: String,
    client_cert: String,
    client_key: String,
}

fn secure() -> Secure {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: export the output of `scripts/services env` (scripts/test does)")
        })
    };
    Secure {
        servers: var("TALLY_KAFKA_SASL_SSL_SERVERS"),
        ca_file: var("TALLY_TLS_CA_FILE"),
        user: var("TALLY_KAFKA_SASL_USERNAME"),
        password: var("TALLY_KAFKA_SASL_PASSWORD"),
        client_cert: var("TALLY_TLS_CLIENT_CERT_FILE"),
        client_key: var("TALLY_TLS_CLIENT_KEY_FILE"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_runs_over_tls_and_scram_to_kafka_and_verified_tls_to_postgres() {
    let s = secure();
    let mut p = Pipeline::new("secure").await;
    let (paths, expected) = p.generate(2, 200_000, 500, 4).await;
    let password_file = p.dir.join("kafka-password");
    std::fs::write(&password_file, format!("{}\n", s.password)).unwrap();
    // Every command from here on: TLS + SCRAM to Kafka, verified TLS to PostgreSQL.
    let verified_url = p.database_url.replace("127.0.0.1", "localhost");
    p.envs = vec![
        ("KAFKA_BOOTSTRAP_SERVERS".into(), s.servers.clone()),
        ("TALLY_KAFKA_SECURITY_PROTOCOL".into(), "sasl-ssl".into()),
        ("TALLY_KAFKA_SSL_CA_FILE".into(), s.ca_file.clone()),
        ("TALLY_KAFKA_SASL_USERNAME".into(), s.user.clone()),
        ("TALLY_KAFKA_SASL_PASSWORD".into(), s.password.clone()),
        // The broker asks for a client certificate (and accepts a connection without one).
        ("TALLY_KAFKA_SSL_CERT_FILE".into(), s.client_cert.clone()),
        ("TALLY_KAFKA_SSL_KEY_FILE".into(), s.client_key.clone()),
        ("DATABASE_URL".into(), verified_url.clone()),
        ("TALLY_DATABASE_SSL_MODE".into(), "verify-full".into()),
        ("TALLY_DATABASE_SSL_ROOT_CERT".into(), s.ca_file.clone()),
    ];
    // The password from the env (SCRAM-SHA-512, the default) for the parser and db-client, from
    // a file with SCRAM-SHA-256 for the producer.
    let parser = p.spawn("parser", &p.parser_args("p1"));
    let db = p.spawn("db-client", &["db-client"]);
    let mut publish = vec![
        "producer".to_owned(),
        "--kafka-sasl-mechanism".to_owned(),
        "SCRAM-SHA-256".to_owned(),
        "--kafka-sasl-password-file".to_owned(),
        password_file.to_str().unwrap().to_owned(),
        "publish".to_owned(),
    ];
    publish.extend(paths.iter().cloned());
    let publish: Vec<&str> = publish.iter().map(String::as_str).collect();
    let out = p
        .output(
            &publish,
            &[("TALLY_KAFKA_SASL_PASSWORD", "")],
            Duration::from_secs(60),
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p.wait_ingested(2, TIMEOUT).await;
    p.assert_totals(&expected, "over TLS and SCRAM").await;

    // The db-client's connections are TLS.
    let database = verified_url.rsplit('/').next().unwrap().to_owned();
    let tls: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = $1 AND s.ssl AND a.pid <> pg_backend_pid()",
    )
    .bind(&database)
    .fetch_one(&p.pool)
    .await
    .unwrap();
    assert!(tls >= 1, "no TLS connection from the db-client");
    for stage in [&parser, &db] {
        let log = stage.log_text();
        assert!(
            !log.contains(&s.password),
            "the password is in a log:\n{log}"
        );
    }

    // The same parser with a wrong password: refused by the broker, it ends at start in one
    // line (the error will not heal), never counting, never showing the password.
    p.envs.retain(|(k, _)| k != "TALLY_KAFKA_SASL_PASSWORD");
    p.envs
        .push(("TALLY_KAFKA_SASL_PASSWORD".into(), "wrong-password".into()));
    let mut wrong = p.spawn("parser-wrong-password", &p.parser_args("p2"));
    let status = wrong.exit_within(TIMEOUT).await;
    assert!(status.is_some_and(|s| !s.success()), "{}", wrong.log_text());
    let log = wrong.log_text();
    assert!(log.contains("Kafka refuses this client"), "{log}");
    assert!(!log.contains("wrong-password"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_does_not_verify_is_refused() {
    let s = secure();
    let p = Pipeline::new("secure-pg").await;
    // Verified against a CA that did not sign the server's certificate: refused, at once.
    let other_ca = p.dir.join("other-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=not-the-services-ca", "-keyout"])
        .arg(p.dir.join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .output()
        .unwrap();
    assert!(made.status.success());
    let out = p
        .output(
            &["migrate"],
            &[
                ("TALLY_DATABASE_SSL_MODE", "verify-full"),
                ("TALLY_DATABASE_SSL_ROOT_CERT", other_ca.to_str().unwrap()),
            ],
            Duration::from_secs(30),
        )
        .await;
    assert!(!out.status.success());
    // The right CA: verified.
    let out = p
        .output(
            &["migrate"],
            &[
                ("TALLY_DATABASE_SSL_MODE", "verify-full"),
                ("TALLY_DATABASE_SSL_ROOT_CERT", &s.ca_file),
            ],
            Duration::from_secs(30),
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And verify-ca without the CA file cannot be satisfied either.
    let out = p
        .output(
            &["migrate"],
            &[("TALLY_DATABASE_SSL_MODE", "verify-ca")],
            Duration::from_secs(30),
        )
        .await;
    assert!(!out.status.success());
    // require: TLS without verification works.
    let out = p
        .output(
            &["migrate"],
            &[("TALLY_DATABASE_SSL_MODE", "require")],
            Duration::from_secs(30),
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Errors that will not heal (a wrong SASL password, a security protocol that does not match
/// the listener) end a stage at start, in one line, instead of being retried for ever.
#[tokio::test(flavor = "multi_thread")]
async fn refused_credentials_and_protocols_fail_fast_in_one_line() {
    let s = secure();
    let p = Pipeline::new("secure-refused").await;
    let data = p.data.to_str().unwrap().to_owned();
    let plaintext = p.kafka.bootstrap_servers.clone();
    let wrong_password = "not-the-Password-42";
    let cases: [(&str, Vec<(&str, String)>); 3] = [
        (
            "a wrong SASL password",
            vec![
                ("KAFKA_BOOTSTRAP_SERVERS", s.servers.clone()),
                ("TALLY_KAFKA_SECURITY_PROTOCOL", "sasl-ssl".into()),
                ("TALLY_KAFKA_SSL_CA_FILE", s.ca_file.clone()),
                ("TALLY_KAFKA_SASL_USERNAME", s.user.clone()),
                ("TALLY_KAFKA_SASL_PASSWORD", wrong_password.into()),
            ],
        ),
        (
            "plaintext to the TLS listener",
            vec![
                ("KAFKA_BOOTSTRAP_SERVERS", s.servers.clone()),
                ("TALLY_KAFKA_SECURITY_PROTOCOL", "plaintext".into()),
            ],
        ),
        (
            "TLS to the plaintext listener",
            vec![
                ("KAFKA_BOOTSTRAP_SERVERS", plaintext),
                ("TALLY_KAFKA_SECURITY_PROTOCOL", "ssl".into()),
                ("TALLY_KAFKA_SSL_CA_FILE", s.ca_file.clone()),
            ],
        ),
    ];
    for (what, envs) in cases {
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let started = std::time::Instant::now();
        let out = p
            .output(
                &["parser", "--data-root", &data],
                &envs,
                Duration::from_secs(60),
            )
            .await;
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: the parser ran");
        assert!(
            took < Duration::from_secs(20),
            "{what}: failed after {took:?}"
        );
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("tally: error: ") && last.contains("Kafka refuses this client"),
            "{what}: {stderr}"
        );
        assert!(
            !stderr.contains(wrong_password),
            "{what}: the password shows"
        );
    }
}
