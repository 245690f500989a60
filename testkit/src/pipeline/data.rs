//! What a pipeline under test is fed (generated files) and what it wrote (the files ledger,
//! the totals), read back and compared.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::Pipeline;

impl Pipeline {
    /// Writes `files` generated files (not announced) into the data directory; returns their
    /// paths and the generator's expected totals.
    pub async fn generate(
        &self,
        files: u32,
        size: u64,
        consumers: u64,
        seed: u64,
    ) -> (Vec<String>, HashMap<i64, i128>) {
        self.generate_in(&self.data, files, size, consumers, seed)
            .await
    }

    /// [`Pipeline::generate`] into `dir`.
    pub async fn generate_in(
        &self,
        dir: &Path,
        files: u32,
        size: u64,
        consumers: u64,
        seed: u64,
    ) -> (Vec<String>, HashMap<i64, i128>) {
        let expect = self.dir.join(format!("expected-{seed}.txt"));
        let out = self
            .tally(&[
                "producer",
                "generate",
                "--no-announce",
                "--dir",
                dir.to_str().unwrap(),
                "--files",
                &files.to_string(),
                "--size",
                &size.to_string(),
                "--consumers",
                &consumers.to_string(),
                "--seed",
                &seed.to_string(),
                "--prefix",
                &format!("gen{seed}"),
                "--expect",
                expect.to_str().unwrap(),
            ])
            .await;
        (
            out.lines().map(str::to_owned).collect(),
            read_expected(&expect),
        )
    }

    /// Files with all units in the ledger.
    pub async fn files_ingested(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM ingested_files WHERE complete")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits until `n` files are completely in the totals.
    pub async fn wait_ingested(&self, n: i64, timeout: Duration) {
        let what = format!("{n} files ingested (logs in {})", self.dir.display());
        crate::eventually(timeout, &what, || async {
            let got = self.files_ingested().await;
            crate::holds(got >= n, || format!("{got} files"))
        })
        .await;
    }

    /// Totals in the database.
    pub async fn totals(&self) -> HashMap<i64, i128> {
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT consumer_id, total::text FROM consumer_totals")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        rows.into_iter()
            .map(|(k, v)| (k, v.parse().unwrap()))
            .collect()
    }

    /// Asserts that every consumer's total in the database equals `expected` (and no other
    /// consumer has one); `after` says what the pipeline went through, for the message.
    pub async fn assert_totals(&self, expected: &HashMap<i64, i128>, after: &str) {
        let totals = self.totals().await;
        let wrong: Vec<_> = expected
            .iter()
            .filter(|(k, v)| totals.get(k) != Some(v))
            .take(5)
            .collect();
        assert!(
            wrong.is_empty() && totals.len() == expected.len(),
            "totals differ after {after}: {wrong:?} ({} consumers expected, {} in the database)",
            expected.len(),
            totals.len()
        );
    }
}

/// Reads an expected-totals file (`consumer_id total` lines).
pub fn read_expected(path: &Path) -> HashMap<i64, i128> {
    tally_operator::verify::read_expected(path).unwrap()
}
