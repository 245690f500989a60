//! What the ingest server's handlers share ([`Ingest`]: the store, tokens, throttle,
//! announcer, limits, upload slots) and the claim on an upload id that keeps two pieces of work
//! off the same upload ([`Busy`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_core::liveness::Liveness;
use tally_core::metrics as m;

use super::once::{self, Ingested, Mark};
use super::store::{Record, State as Stage, Store};
use super::throttle;
use crate::announce::{self, Also, Announcer, Split};
use crate::protocol;
use tally_core::server::tokens::Tokens;

/// The limits of one server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest file accepted.
    pub max_file_bytes: u64,
    /// Longest wait for the next bytes of a body.
    pub idle_timeout: Duration,
    /// `Retry-After` of a refusal for load.
    pub retry_after: Duration,
    /// Uploads one token may have receiving at once.
    pub max_uploads_per_token: usize,
    /// Bytes one token may hold in unfinished uploads.
    pub max_partial_bytes_per_token: u64,
    /// Slowest body accepted once `idle_timeout` has passed, in bytes per second.
    pub min_rate: u64,
}

/// What the handlers share.
pub struct Ingest {
    /// Uploads on disk.
    pub store: Store,
    /// Who may write.
    pub tokens: Tokens,
    /// Whether new uploads wait.
    pub throttle: throttle::Shared,
    /// Announces finished files (one Kafka transaction each).
    pub announcer: Mutex<Announcer>,
    /// How files split into units.
    pub split: Split,
    /// Limits.
    pub limits: Limits,
    /// Uploads receiving bytes at once.
    pub slots: tokio::sync::Semaphore,
    /// Upload ids a request (or the sweep) is working on.
    pub busy: Arc<Mutex<HashSet<String>>>,
    /// Uploads receiving now, by token name.
    pub receiving: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    /// Unfinished uploads by token name (their ids): rebuilt from the records by every sweep,
    /// added to by every new upload, so that a quota check reads no record.
    pub partials: Mutex<std::collections::HashMap<String, HashSet<String>>>,
    /// Every file announced, for ever (the ingested topic).
    pub ingested: Arc<Ingested>,
    /// The watchdog.
    pub liveness: Liveness,
}

/// Holds an upload id for one piece of work (a request, or the sweep) until dropped.
pub struct Busy {
    ids: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// One of a token's uploads receiving now, until dropped.
pub struct Receiving {
    counts: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    token: String,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.token) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.token);
            }
        }
    }
}

impl Ingest {
    /// Bytes `token` may still hold in unfinished uploads besides upload `id` (blocking): the
    /// least of what its quota leaves and an even share, among the `tokens` receiving, of the
    /// free space.
    pub fn quota_left(&self, token: &str, id: &str, tokens: usize) -> u64 {
        let ids: Vec<String> = self
            .partials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .map(|ids| ids.iter().filter(|i| *i != id).cloned().collect())
            .unwrap_or_default();
        let others: u64 = ids.iter().map(|i| self.store.held(i)).sum();
        let own = self
            .limits
            .max_partial_bytes_per_token
            .saturating_sub(others);
        // One token alone has the whole free space (a disk that fills is 507, as before).
        match throttle::free_bytes(self.store.dir()) {
            Some(free) if tokens > 1 => own.min(free / tokens as u64),
            _ => own,
        }
    }

    /// Notes upload `id` of `token` as unfinished (its bytes count against the token's quota).
    pub fn note_partial(&self, token: &str, id: &str) {
        self.partials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(token.to_owned())
            .or_default()
            .insert(id.to_owned());
    }

    /// Counts an upload of `token` as receiving, unless the token has its most already; also
    /// how many tokens are receiving now (this one included).
    pub fn start_receiving(&self, token: &str) -> Option<(Receiving, usize)> {
        let mut counts = self.receiving.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(token.to_owned()).or_default();
        if *n >= self.limits.max_uploads_per_token {
            return None;
        }
        *n += 1;
        let tokens = counts.len();
        Some((
            Receiving {
                counts: self.receiving.clone(),
                token: token.to_owned(),
            },
            tokens,
        ))
    }

    /// Holds upload `id`, unless something else holds it.
    pub fn claim(&self, id: &str) -> Option<Busy> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.insert(id.to_owned()).then(|| Busy {
            ids: self.busy.clone(),
            id: id.to_owned(),
        })
    }

    /// Announces the linked file of `record` and records it announced (blocking). A file no
    /// longer in the folder as linked (another inode, or none) was taken by something else
    /// that announces files there (`producer watch`, whose life cycle runs only once a file
    /// is done): recorded as announced, with a warning, rather than retried for ever.
    ///
    /// Its mark goes on the ingested topic in the same transaction; a file whose mark is there
    /// already (an announcement committed before a crash) is recorded as announced at once.
    pub fn announce(&self, record: &mut Record) -> anyhow::Result<usize> {
        let path = self.store.dir().join(&record.name);
        if record.digest.is_none() && self.store.holds_linked(record) {
            // A record from before digests were kept.
            let digest = protocol::checksum_file(protocol::Algorithm::Xxh3, &path)?;
            record.digest = Some(digest.to_string());
        }
        if let Some(digest) = &record.digest {
            if self.ingested.knows(&record.name, digest) {
                tracing::info!(name = %record.name, %digest, "announced before; recorded as announced");
                record.state = Stage::Announced;
                self.store.save(record)?;
                return Ok(0);
            }
        }
        let units = match announce::describe(&path, &self.split) {
            Ok(units) => units,
            Err(error) if !self.store.holds_linked(record) => {
                tracing::warn!(name = %record.name, error = format!("{error:#}"), "the file left the folder before it was announced here; taking it as announced by another producer");
                record.state = Stage::Announced;
                self.store.save(record)?;
                return Ok(0);
            }
            Err(error) => return Err(error),
        };
        let bytes: u64 = units.iter().map(|u| u.end - u.start).sum();
        let also = record.digest.as_ref().map(|digest| Also {
            topic: self.ingested.topic.clone(),
            key: once::key(&record.name, digest),
            payload: serde_json::to_vec(&Mark {
                name: record.name.clone(),
                digest: digest.clone(),
                bytes: record.total.unwrap_or(bytes),
                token: record.token.clone(),
                announced_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64),
            })
            .expect("marks serialise"),
        });
        {
            let _step = self.liveness.step("announce");
            self.announcer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .announce_with(&units, also.as_ref())?;
        }
        if let Some(digest) = &record.digest {
            self.ingested.note(&record.name, digest);
        }
        self.liveness.progress();
        self.throttle.announced(units.len(), bytes);
        metrics::counter!(m::PRODUCER_FILES).increment(1);
        metrics::counter!(m::PRODUCER_UNITS).increment(units.len() as u64);
        metrics::counter!(m::PRODUCER_BYTES).increment(bytes);
        metrics::counter!(m::PRODUCER_INGEST_UPLOADS, "token" => record.token.clone(), "outcome" => "announced").increment(1);
        tracing::info!(name = %record.name, token = %record.token, units = units.len(), "announced");
        record.state = Stage::Announced;
        self.store.save(record)?;
        Ok(units.len())
    }
}
