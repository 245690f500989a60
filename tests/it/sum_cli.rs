//! `tally sum` as a user runs it: files, stdin, pipes, exit codes.

use std::io::Write;
use std::process::{Command, Stdio};

fn tally() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

fn temp_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(tally_testkit::unique(what));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn sums_files_stdin_and_pipes_identically() {
    let dir = temp_dir("sum");
    let expect = dir.join("expected.txt");
    let status = tally()
        .args([
            "producer",
            "generate",
            "--no-announce",
            "--files",
            "2",
            "--size",
            "3000000",
        ])
        .args([
            "--consumers",
            "1000",
            "--distribution",
            "zipf",
            "--seed",
            "5",
        ])
        .arg("--dir")
        .arg(&dir)
        .arg("--expect")
        .arg(&expect)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let files: Vec<_> = ["usage-5-00000.txt", "usage-5-00001.txt"]
        .map(|f| dir.join(f))
        .into();
    let expected = std::fs::read_to_string(&expect).unwrap();

    let out = tally().arg("sum").args(&files).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected, "files");
    let summary = String::from_utf8(out.stderr).unwrap();
    assert!(summary.contains("0 bad lines"), "{summary}");

    // stdin: both files concatenated.
    let mut child = tally()
        .args(["sum", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for f in &files {
        stdin.write_all(&std::fs::read(f).unwrap()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected, "stdin");

    // A pipe given as a path (what `tally sum <(zcat f.gz)` passes).
    let script = format!(
        "{} sum <(cat {} {})",
        env!("CARGO_BIN_EXE_tally"),
        files[0].display(),
        files[1].display()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        expected,
        "pipe path"
    );

    // The same as awk (with printf, so that large sums are not printed in exponent form).
    let script = format!(
        "cat {} {} | awk '{{s[$1]+=$2}} END {{for (k in s) printf \"%.0f %.0f\\n\", k, s[k]}}' | sort -n",
        files[0].display(),
        files[1].display()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected, "awk");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_lines_are_counted_and_fail_policy_exits_non_zero() {
    let dir = temp_dir("sumbad");
    let file = dir.join("messy.txt");
    std::fs::write(&file, "1 5\nnope\n2 -3\n1 5\r\n").unwrap();

    let out = tally().arg("sum").arg(&file).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "1 10\n");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("byte 4: missing-field") && err.contains("byte 9: sign"),
        "{err}"
    );
    assert!(err.contains("2 bad lines"), "{err}");

    let out = tally()
        .args(["sum", "--bad-lines", "skip"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("2 bad lines"));

    let out = tally()
        .args(["sum", "--bad-lines", "fail"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no totals printed when failing");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("bad line at byte 4"), "{err}");

    let out = tally().args(["sum", "/nonexistent/file"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("cannot open /nonexistent/file"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `tally ARGS` under a pseudo-terminal (`script`), as a user at a terminal would; the
/// terminal's output.
fn on_a_terminal(args: &[&str]) -> String {
    let line = std::iter::once(env!("CARGO_BIN_EXE_tally"))
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("script(1) from util-linux");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sum_shows_progress_on_a_terminal_only() {
    let dir = temp_dir("sum-progress");
    // Big enough to be summed in more than one piece (256 MiB each).
    let big = dir.join("big.txt");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        let line = b"123456789 1000\n";
        for _ in 0..(300u64 << 20) / line.len() as u64 {
            f.write_all(line).unwrap();
        }
    }
    let big = big.to_str().unwrap();
    let tty = on_a_terminal(&["sum", big]);
    assert!(
        tty.contains("MiB/"),
        "no progress bar on a terminal: {tty:?}"
    );
    let piped = tally().args(["sum", big]).output().unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !stderr.contains("MiB/"),
        "a progress bar on a pipe: {stderr:?}"
    );
    // The pieces add up to the same totals as one pass.
    let lines = (300u64 << 20) / 15;
    assert!(
        tty.contains(&format!("123456789 {}", lines * 1000)),
        "{tty}"
    );
    assert_eq!(
        String::from_utf8_lossy(&piped.stdout).trim(),
        format!("123456789 {}", lines * 1000)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn totals_past_i64_and_many_consumers_print_in_id_order() {
    let dir = temp_dir("sum-wide");
    let file = dir.join("wide.txt");
    let mut text = String::new();
    let mut expected = std::collections::BTreeMap::<i64, i128>::new();
    // 200k consumers, each twice, in a scrambled order (7919 is coprime to 200,000).
    for round in 0..2i64 {
        for i in 0..200_000i64 {
            let id = (i * 7919 + round * 13) % 200_000;
            text.push_str(&format!("{id} {}\n", i + 1));
            *expected.entry(id).or_default() += i128::from(i + 1);
        }
    }
    // One consumer's total leaves i64.
    for _ in 0..3 {
        text.push_str(&format!("7 {}\n", i64::MAX));
        *expected.entry(7).or_default() += i128::from(i64::MAX);
    }
    std::fs::write(&file, text).unwrap();
    let expected: String = expected
        .iter()
        .map(|(id, total)| format!("{id} {total}\n"))
        .collect();

    // A small key cap makes the workers flush many times mid-file.
    for keys in ["1000000", "1000"] {
        let out = tally()
            .args(["sum", "--keys-max", keys])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8(out.stdout).unwrap(), expected, "{keys}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
