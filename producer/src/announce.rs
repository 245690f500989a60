//! Files → work units → one Kafka transaction per file on `tally.files`.
//!
//! A unit is a byte range of at most `unit_bytes`; it owns the lines that start inside it (the
//! parse engine's rule), so the cut points need not be line-aligned. Records are keyed by the
//! file's stream (device, inode, birth time), so every announcement of a file, whatever its
//! split or version, lands in the one partition whose parser holds the file's done-state and
//! counts only the bytes no earlier unit counted.

use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use tally_core::backoff::Backoff;
use tally_core::kafka::{self, TxnErrorKind};
use tally_core::{KafkaArgs, Topics};
use tally_model::messages::WorkUnit;
use tally_model::period::{mtime_seconds, FileTimeFrom, TimeWindow};

pub use tally_model::identity::file_id;
use tally_model::identity::{fingerprint, stream_id};

/// How files become work units: the largest unit, where a file's time comes from, and which
/// times are accepted.
#[derive(Debug, Clone)]
pub struct Split {
    /// Largest unit, in bytes.
    pub unit_bytes: u64,
    /// Where a file's time comes from.
    pub time_from: FileTimeFrom,
    /// The times accepted from names.
    pub window: TimeWindow,
}

/// A file that is not announced, and why: its name gives a time outside the accepted window.
/// It is never booked; the caller says so once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refused(pub String);

/// Logs and counts a refused file (once per file version: the caller remembers it).
pub fn say_refused(refused: &Refused) {
    metrics::counter!(tally_core::metrics::PRODUCER_FILES_REFUSED).increment(1);
    tracing::error!(reason = %refused.0, "file refused, not counted: its time is outside the accepted window (rename it, or widen --file-time-max-age/--file-time-max-ahead)");
}

impl Split {
    /// The split the unit flags describe.
    pub fn new(args: &tally_core::args::UnitArgs) -> Self {
        Self {
            unit_bytes: args.unit_bytes,
            time_from: args.file_time_from.clone(),
            window: args.window(),
        }
    }

    /// Whether a file of this name would be refused for its time (under `name:…`), before any
    /// of its bytes exist (`producer serve` refuses the upload at once).
    pub fn check_name(&self, name: &str) -> Result<(), Refused> {
        let FileTimeFrom::Name(re) = &self.time_from else {
            return Ok(());
        };
        match tally_model::period::time_in_name(re, name) {
            Ok(time) => self
                .window
                .check_now(time)
                .map_err(|why| Refused(format!("{name}: {why}"))),
            // No time in it: its modification time will count.
            Err(_) => Ok(()),
        }
    }

    /// The time of the file at `path`: from its name when so configured (refused outside the
    /// window), or (and when its name holds none, logged and counted) its modification time.
    pub fn file_time(&self, path: &Path, meta: &Metadata) -> Result<i64, Refused> {
        match self.time_from.file_time(path, meta) {
            Ok(time) => match &self.time_from {
                FileTimeFrom::Mtime => Ok(time),
                FileTimeFrom::Name(_) => self
                    .window
                    .check_now(time)
                    .map(|()| time)
                    .map_err(|why| Refused(format!("{}: {why}", path.display()))),
            },
            Err(reason) => {
                metrics::counter!(tally_core::metrics::PRODUCER_FILE_TIME_FALLBACKS).increment(1);
                tracing::warn!(
                    path = %path.display(),
                    reason,
                    "no time in the file name: its modification time counts"
                );
                Ok(mtime_seconds(meta))
            }
        }
    }
}

/// The work units of the file at `path` (absolute) with metadata `meta` and fingerprint
/// `print`. An empty file has one empty unit, so that it too is marked done and reaches its
/// life-cycle action.
pub fn work_units(
    path: &Path,
    meta: &Metadata,
    print: u64,
    split: &Split,
) -> Result<Vec<WorkUnit>, Refused> {
    let (stream, id) = (stream_id(meta), file_id(meta));
    let size = meta.size();
    let unit_bytes = split.unit_bytes.max(1);
    let file_time = Some(split.file_time(path, meta)?);
    let units = size.div_ceil(unit_bytes).max(1);
    Ok((0..units)
        .map(|index| {
            let start = (index * unit_bytes).min(size);
            let end = (start + unit_bytes).min(size);
            WorkUnit {
                stream: stream.clone(),
                file_id: id.clone(),
                unit_id: WorkUnit::unit_id(&id, start, end),
                path: path.to_string_lossy().into_owned(),
                file_bytes: size,
                fingerprint: print,
                start,
                end,
                file_time,
            }
        })
        .collect())
}

/// A record written in an announcement's transaction.
#[derive(Debug, Clone)]
pub struct Also {
    /// Its topic.
    pub topic: String,
    /// Its key.
    pub key: String,
    /// Its value.
    pub payload: Vec<u8>,
}

/// A transactional producer on `tally.files`.
pub struct Announcer {
    producer: ThreadedProducer<DefaultProducerContext>,
    kafka: KafkaArgs,
    transactional_id: String,
    topic: String,
}

const TIMEOUT: Duration = Duration::from_secs(30);

impl Announcer {
    /// Connects and initialises transactions (fencing an earlier producer with the same id).
    pub fn new(kafka: &KafkaArgs, transactional_id: &str) -> anyhow::Result<Self> {
        let topic = Topics::new(&kafka.topic_prefix).files;
        let producer = Self::create(kafka, transactional_id, &topic)?;
        Ok(Self {
            producer,
            kafka: kafka.clone(),
            transactional_id: transactional_id.to_owned(),
            topic,
        })
    }

    fn create(
        kafka: &KafkaArgs,
        transactional_id: &str,
        topic: &str,
    ) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
        let mut config =
            kafka::transactional_producer_config(kafka, transactional_id, Duration::from_secs(60));
        // The metadata request below names the topic: a broker that creates topics on request
        // must not create it with its own defaults instead of `tally init`'s.
        config.set("allow.auto.create.topics", "false");
        kafka::apply_overrides(&mut config, kafka);
        let producer: ThreadedProducer<DefaultProducerContext> = config
            .create()
            .map_err(kafka::quiet)
            .context("cannot create the Kafka producer")?;
        // The topic's metadata first, on the producer's own client, twice: the first answer
        // (from a bootstrap server) names the brokers, and librdkafka then replaces its
        // bootstrap connection by theirs; the second waits until one of them is up. A producer
        // id asked for while no broker is up is asked again only 500 ms later. The first
        // announcement then also finds its partition in the cache (a leader query costs 100 ms).
        kafka::client_partition_count(producer.client(), topic).context("cannot reach Kafka")?;
        if kafka::client_partition_count(producer.client(), topic).context("cannot reach Kafka")?
            == 0
        {
            bail!("topic {topic} does not exist: run `tally init` first");
        }
        producer
            .init_transactions(TIMEOUT)
            .context("cannot initialise Kafka transactions")?;
        Ok(producer)
    }

    /// Announces all units of one file in one transaction. Retries until it commits or fails
    /// for good; a failed announcement announces nothing.
    pub fn announce(&mut self, units: &[WorkUnit]) -> anyhow::Result<()> {
        self.announce_with(units, None)
    }

    /// [`Self::announce`], with one more record in the same transaction (`producer serve`'s
    /// mark on the ingested topic): both are on their topics, or neither.
    pub fn announce_with(&mut self, units: &[WorkUnit], also: Option<&Also>) -> anyhow::Result<()> {
        let mut attempts = 0;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        loop {
            attempts += 1;
            match self.try_announce(units, also) {
                Ok(()) => return Ok(()),
                Err(error) if attempts < 10 => {
                    let kind = kafka::classify_txn_error(&error);
                    tracing::warn!(%error, ?kind, attempts, "announcement failed, retrying");
                    match kind {
                        TxnErrorKind::Fatal => {
                            self.producer =
                                Self::create(&self.kafka, &self.transactional_id, &self.topic)?;
                        }
                        _ => {
                            let _ = self
                                .producer
                                .abort_transaction(rdkafka::util::Timeout::Never);
                        }
                    }
                    std::thread::sleep(backoff.next_delay());
                }
                Err(error) => return Err(error).context("cannot announce work units"),
            }
        }
    }

    fn try_announce(&self, units: &[WorkUnit], also: Option<&Also>) -> Result<(), KafkaError> {
        self.producer.begin_transaction()?;
        for unit in units {
            let payload = serde_json::to_vec(unit).expect("work units serialise");
            let record = BaseRecord::<str, [u8]>::to(&self.topic)
                .key(&unit.stream)
                .payload(&payload);
            kafka::send_waiting(&self.producer, record)?;
        }
        if let Some(also) = also {
            let record = BaseRecord::<str, [u8]>::to(&also.topic)
                .key(&also.key)
                .payload(&also.payload);
            kafka::send_waiting(&self.producer, record)?;
        }
        // Infinite timeout: a finite one can desynchronise librdkafka's transaction state.
        let mut tries = 0;
        loop {
            match kafka::commit_transaction(&self.producer, rdkafka::util::Timeout::Never) {
                Ok(()) => return Ok(()),
                Err(e) if kafka::classify_txn_error(&e) == TxnErrorKind::Retriable && tries < 5 => {
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Validates and describes a file for announcement: absolute path, metadata, units. A file
/// refused for its time is an error holding [`Refused`] (`error.downcast_ref::<Refused>()`).
pub fn describe(path: &Path, split: &Split) -> anyhow::Result<Vec<WorkUnit>> {
    let absolute = std::fs::canonicalize(path)
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    let meta = std::fs::metadata(&absolute)
        .with_context(|| format!("cannot stat {}", absolute.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", absolute.display());
    }
    // Identity and fingerprint from one open descriptor: they describe the same bytes. The
    // open never blocks, whatever was swapped in at the path since the check.
    let file: File = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&absolute)
            .with_context(|| format!("cannot open {}", absolute.display()))?
    };
    let meta = file
        .metadata()
        .with_context(|| format!("cannot stat {}", absolute.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", absolute.display());
    }
    let print = fingerprint(&file, meta.size())
        .with_context(|| format!("cannot read {}", absolute.display()))?;
    Ok(work_units(&absolute, &meta, print, split)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_cover_the_file_and_share_the_file_id() {
        let dir = std::env::temp_dir().join(format!("tally-units-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, vec![b'x'; 1000]).unwrap();
        let split = Split {
            unit_bytes: 300,
            time_from: FileTimeFrom::Mtime,
            window: TimeWindow::OPEN,
        };
        let units = describe(&path, &split).unwrap();
        assert_eq!(units.len(), 4);
        assert_eq!((units[0].start, units[3].end), (0, 1000));
        assert!(units.windows(2).all(|w| w[0].end == w[1].start));
        assert!(units
            .iter()
            .all(|u| u.file_id == units[0].file_id && u.check().is_ok()));
        assert_eq!(units[1].unit_id, format!("{}/300-600", units[0].file_id));
        let mtime = std::fs::metadata(&path).unwrap().mtime();
        assert!(units.iter().all(|u| u.file_time == Some(mtime)));
        // From the name, or the mtime when the name holds no time.
        let by_name = |re: &str| Split {
            unit_bytes: 300,
            time_from: format!("name:{re}").parse().unwrap(),
            window: TimeWindow::OPEN,
        };
        let named = dir.join("26593136.dat");
        std::fs::write(&named, b"1 1\n").unwrap();
        let timed = describe(&named, &by_name(r"^(?P<epoch_min>\d+)")).unwrap();
        assert_eq!(timed[0].file_time, Some(26_593_136 * 60));
        let timed = describe(&named, &by_name(r"^x(?P<epoch_min>\d+)")).unwrap();
        assert_eq!(
            timed[0].file_time,
            Some(std::fs::metadata(&named).unwrap().mtime())
        );
        // Same file: same id. A new file under the same name: a new id.
        assert_eq!(
            describe(&path, &split).unwrap()[0].file_id,
            units[0].file_id
        );
        std::fs::remove_file(&path).unwrap();
        std::fs::write(dir.join("g"), vec![b'y'; 1000]).unwrap();
        std::fs::rename(dir.join("g"), &path).unwrap();
        assert_ne!(
            describe(&path, &split).unwrap()[0].file_id,
            units[0].file_id
        );
        std::fs::write(dir.join("empty"), b"").unwrap();
        assert_eq!(describe(&dir.join("empty"), &split).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
