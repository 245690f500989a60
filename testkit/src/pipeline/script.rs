//! `scripts/services` driven from a test: stopping, killing and restarting the shared services.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::{Command, Stdio};

/// Runs `scripts/services ARGS…` (e.g. `up`, `down`, `kill kafka`); panics if it fails.
pub fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services");
    let status = Command::new(script)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "scripts/services {args:?} failed");
}

/// `scripts/services ARGS…`'s output (e.g. `env --brokers 3`).
pub fn services_output(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services");
    let out = Command::new(script).args(args).output().unwrap();
    assert!(out.status.success(), "scripts/services {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that the tests use the services of `scripts/services` (a test that stops, kills or
/// restarts them must not hit other ones).
pub fn assert_services_of_the_script() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services");
    let env = Command::new(script).arg("env").output().unwrap().stdout;
    let bootstrap = crate::services().kafka_bootstrap;
    assert!(
        String::from_utf8_lossy(&env).contains(&format!("KAFKA_BOOTSTRAP_SERVERS={bootstrap}")),
        "this test stops the services of scripts/services; the tests use others ({bootstrap})"
    );
}
