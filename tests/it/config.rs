//! `--config FILE`: the same keys as the flags, flag > env > file > default, unknown keys
//! refused; `tally config check`; a stage started from a file alone.

use std::time::Duration;

use crate::support::Pipeline;
use crate::support::{free_port, wait_http};

const WITHIN: Duration = Duration::from_secs(30);

fn write(p: &Pipeline, name: &str, text: &str) -> String {
    let path = p.dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn succeeds(p: &Pipeline, args: &[&str], envs: &[(&str, &str)]) -> bool {
    p.output(args, envs, WITHIN).await.status.success()
}

#[tokio::test(flavor = "multi_thread")]
async fn flag_beats_env_beats_file_beats_default() {
    let p = Pipeline::new("config-precedence").await;
    let input = write(&p, "input.txt", "1 5\nnot a line\n2 7\n");
    let fail = write(&p, "fail.toml", "[sum]\nbad-lines = \"fail\"\n");
    let skip = write(&p, "skip.toml", "[sum]\nbad-lines = \"skip\"\n");
    // Default (dead-letter, counted): succeeds.
    assert!(succeeds(&p, &["sum", &input], &[]).await);
    // The file says fail: it fails.
    assert!(!succeeds(&p, &["--config", &fail, "sum", &input], &[]).await);
    // The same file through TALLY_CONFIG.
    assert!(!succeeds(&p, &["sum", &input], &[("TALLY_CONFIG", &fail)]).await);
    // The env beats the file.
    assert!(
        succeeds(
            &p,
            &["--config", &fail, "sum", &input],
            &[("TALLY_BAD_LINES", "skip")]
        )
        .await
    );
    assert!(
        !succeeds(
            &p,
            &["--config", &skip, "sum", &input],
            &[("TALLY_BAD_LINES", "fail")]
        )
        .await
    );
    // The flag beats both.
    assert!(
        succeeds(
            &p,
            &["--config", &fail, "sum", "--bad-lines", "skip", &input],
            &[("TALLY_BAD_LINES", "fail")]
        )
        .await
    );
    // Top-level keys apply to every subcommand that has the flag.
    let top = write(&p, "top.toml", "bad-lines = \"fail\"\n");
    assert!(!succeeds(&p, &["--config", &top, "sum", &input], &[]).await);
    // A section's value beats the top level's.
    let both = write(
        &p,
        "both.toml",
        "bad-lines = \"fail\"\n[sum]\nbad-lines = \"skip\"\n",
    );
    assert!(succeeds(&p, &["--config", &both, "sum", &input], &[]).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_keys_and_bad_values_are_errors() {
    let p = Pipeline::new("config-unknown").await;
    let input = write(&p, "input.txt", "1 5\n");
    for (name, text, says) in [
        (
            "typo.toml",
            "bad-line = \"skip\"\n",
            "unknown key `bad-line`",
        ),
        (
            "section.toml",
            "[sum]\ndata-root = \"/data\"\n",
            "unknown key `data-root` in section [sum]",
        ),
        (
            "nosuch.toml",
            "[summer]\nthreads = 1\n",
            "unknown key `summer`",
        ),
        ("zero.toml", "[sum]\nthreads = 0\n", "at least 1"),
        ("broken.toml", "[sum\n", "not valid TOML"),
    ] {
        let file = write(&p, name, text);
        let out = p
            .output(&["--config", &file, "sum", &input], &[], WITHIN)
            .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} accepted");
        assert!(stderr.contains(says), "{name}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{name}: {stderr}");
    }
    let missing = p
        .output(&["--config", "/no/such.toml", "sum", &input], &[], WITHIN)
        .await;
    assert!(!missing.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn config_check_prints_the_effective_values_and_hides_secrets() {
    let p = Pipeline::new("config-check").await;
    let data = p.data.to_str().unwrap().to_owned();
    let file = write(
        &p,
        "tally.toml",
        &format!(
            "topic-prefix = \"from-file\"\nkafka-option = [\"sasl.password=hunter2\"]\n\
             [parser]\ndata-root = \"{data}\"\nthreads = 3\n\
             [db-client]\ndatabase-url = \"postgres://u:hunter2@db:5432/x?password=hunter2\"\n\
             [producer.watch]\ndir = \"{data}\"\n"
        ),
    );
    let out = p
        .output(
            &["--config", &file, "config", "check"],
            &[("TALLY_THREADS", ""), ("DATABASE_URL", "")],
            WITHIN,
        )
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("threads = \"3\"  # file"), "{stdout}");
    assert!(stdout.contains("database-url = \"postgres://u:***@db:5432/x?password=***\"  # file"));
    assert!(stdout.contains("writers = \"2\"  # default"));
    assert!(!stdout.contains("hunter2"), "{stdout}");
    for stage in [
        "[producer watch]",
        "[parser]",
        "[aggregator]",
        "[db-client]",
    ] {
        assert!(stdout.contains(stage), "{stage} missing: {stdout}");
    }
    // The env is shown as the source where it wins (the pipeline's prefix is in the env).
    assert!(stdout.contains("topic-prefix = \"from-file\"  # file") || stdout.contains("# env"));

    // A stage that would not start makes the check fail, and says which.
    let no_root = write(&p, "no-root.toml", "[parser]\nthreads = 1\n");
    let out = p
        .output(
            &["--config", &no_root, "config", "check", "parser"],
            &[],
            WITHIN,
        )
        .await;
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    // It names the argument that is missing, not only that some are.
    assert!(
        stdout.contains(
            "would not start: the following required arguments were not provided: --data-root"
        ),
        "{stdout}"
    );
    // So does the stage itself, in its one-line error.
    let out = p.output(&["parser", "--threads", "1"], &[], WITHIN).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("were not provided: --data-root"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_runs_from_a_config_file_alone() {
    let mut p = Pipeline::new("config-stage").await;
    let port = free_port();
    let file = write(
        &p,
        "parser.toml",
        &format!(
            "[parser]\ndata-root = \"{}\"\ninstance-id = \"from-file\"\nhttp-addr = \"127.0.0.1:{port}\"\n",
            p.data.display()
        ),
    );
    let (paths, expected) = p.generate(2, 100_000, 300, 6).await;
    let _parser = p.spawn("parser", &["--config", &file, "parser"]);
    let _db = p.spawn("db-client", &["db-client"]);
    wait_http(port, "/readyz", Duration::from_secs(60), |s, _| s == 200).await;
    p.publish("1000000", &paths).await;
    p.wait_ingested(2, Duration::from_secs(120)).await;
    p.assert_totals(&expected, "a parser configured by file")
        .await;
}
