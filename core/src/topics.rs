//! Topic names and consumer-group ids. The only place that spells them.
//!
//! Everything derives from one prefix (`--topic-prefix`, env `TALLY_TOPIC_PREFIX`) so that
//! several pipelines, and parallel tests, can share one broker. Changing a name here is a
//! contract change: record it in docs/messages.md.

/// The topics and group ids of one pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Work units announced by the producer (key: unit id).
    pub files: String,
    /// Completion record per unit, compacted, co-partitioned with `files`.
    pub done: String,
    /// Per-consumer partial sums from the parsers (key: consumer id).
    pub sums: String,
    /// Per-consumer merged sums from the aggregator (key: consumer id).
    pub totals: String,
    /// Bad lines and bad notifications, with their reason and position.
    pub dead_letter: String,
    /// Every file the ingest servers announced (key: digest and name), compacted, kept for
    /// ever: a push of bytes already counted is answered "in already".
    pub ingested: String,
    /// Consumer group of the parsers.
    pub parser_group: String,
    /// Consumer group of the aggregators.
    pub aggregator_group: String,
    /// Consumer group of the database writers.
    pub db_client_group: String,
}

impl Topics {
    /// Names for the pipeline with this prefix.
    pub fn new(prefix: &str) -> Self {
        Self {
            files: format!("{prefix}.files"),
            done: format!("{prefix}.done"),
            sums: format!("{prefix}.sums"),
            totals: format!("{prefix}.totals"),
            dead_letter: format!("{prefix}.dead-letter"),
            ingested: format!("{prefix}.ingested"),
            parser_group: format!("{prefix}.parser"),
            aggregator_group: format!("{prefix}.aggregator"),
            db_client_group: format!("{prefix}.db-client"),
        }
    }

    /// Every topic of the pipeline (the ones `tally init` creates).
    pub fn all(&self) -> [&String; 6] {
        [
            &self.files,
            &self.done,
            &self.sums,
            &self.totals,
            &self.dead_letter,
            &self.ingested,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_prefix() {
        let t = Topics::new("p1");
        assert_eq!(t.files, "p1.files");
        assert_eq!(t.dead_letter, "p1.dead-letter");
        assert_eq!(t.db_client_group, "p1.db-client");
    }
}
