//! `tally sum`'s progress bar, on a terminal only.

use std::io::{self, IsTerminal};

use tally_engine::source::FileSource;
use tally_engine::{self as engine, EngineError, Source, Stats};

use super::Collect;

/// A progress bar in bytes on stderr when it is a terminal; nothing otherwise.
pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

/// On a terminal, a file is summed in pieces of this size, the bar moving after each (lines
/// belong to the piece they start in, so pieces add up to the whole file exactly).
const PROGRESS_PIECE: u64 = 256 << 20;

impl Progress {
    pub(super) fn new(files: &[std::path::PathBuf]) -> Self {
        if !io::stderr().is_terminal() {
            return Self { bar: None };
        }
        let total: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.len())
            .sum();
        let bar = indicatif::ProgressBar::new(total).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Self { bar: Some(bar) }
    }

    pub(super) fn sum_file(
        &self,
        source: &FileSource,
        config: &engine::EngineConfig,
        pool: &rayon::ThreadPool,
        sink: &Collect,
    ) -> Result<Stats, EngineError> {
        let len = source.len();
        let Some(bar) = &self.bar else {
            return engine::sum_range(source, 0..len, config, pool, sink);
        };
        let mut stats = Stats::default();
        let mut start = 0;
        while start < len {
            let end = (start + PROGRESS_PIECE).min(len);
            stats.merge(&engine::sum_range(source, start..end, config, pool, sink)?);
            bar.inc(end - start);
            start = end;
        }
        Ok(stats)
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
