//! Uploads on disk, under `<dir>/.tmp/`: `<id>.part` holds the bytes received so far, and
//! `<id>.json` the upload's record (its file name, size, checksum, token name and state). A
//! record is written to a temporary file, synced and renamed, so it is always whole.
//!
//! The life of an upload: `receiving` (bytes arrive in `.part`) → `linked` (verified, synced,
//! hard-linked into `<dir>/<name>` and the directory synced) → `announced` (its units are on
//! the files topic). A `linked` upload is announced again after a crash (the parsers' done
//! set makes a second announcement of the same file harmless); an `announced` record answers
//! a repeated upload without announcing again, until it expires.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Where an upload is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Bytes arrive in `<id>.part`.
    Receiving,
    /// The file is in the folder, not yet announced.
    Linked,
    /// Announced: done.
    Announced,
}

/// An upload's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The upload id.
    pub id: String,
    /// The file name in the folder.
    pub name: String,
    /// The file's size, once a request said it.
    pub total: Option<u64>,
    /// `algorithm:hex`, if the client sent one.
    pub checksum: Option<String>,
    /// The name of the token that started it.
    pub token: String,
    /// Where it is.
    pub state: State,
    /// Whether it can resume (it came with an upload id).
    pub resumable: bool,
    /// The generator's modification time of the file, unix seconds, if it said.
    #[serde(default)]
    pub file_time: Option<i64>,
    /// The file's inode once linked into the folder.
    #[serde(default)]
    pub inode: Option<u64>,
    /// `xxh3:<hex>` of the whole file, computed by the server once all bytes are in.
    #[serde(default)]
    pub digest: Option<String>,
}

/// The uploads of one folder.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    tmp: PathBuf,
}

impl Store {
    /// The uploads into `dir` (creates `dir/.tmp`).
    pub fn open(dir: &Path) -> io::Result<Self> {
        let tmp = dir.join(".tmp");
        fs::create_dir_all(&tmp)?;
        Ok(Self {
            dir: dir.to_owned(),
            tmp,
        })
    }

    /// The folder files land in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the bytes of upload `id` go.
    pub fn part(&self, id: &str) -> PathBuf {
        self.tmp.join(format!("{id}.part"))
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.tmp.join(format!("{id}.json"))
    }

    /// The record of upload `id`, if there is one (an unreadable record counts as none).
    pub fn load(&self, id: &str) -> io::Result<Option<Record>> {
        match fs::read(self.record_path(id)) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `record` durably (temporary file, sync, rename, sync of the folder).
    pub fn save(&self, record: &Record) -> io::Result<()> {
        let path = self.record_path(&record.id);
        let new = path.with_extension("json.new");
        let written = File::create(&new).and_then(|mut file| {
            file.write_all(&serde_json::to_vec(record).map_err(io::Error::other)?)?;
            file.sync_all()
        });
        if let Err(e) = written.and_then(|()| fs::rename(&new, &path)) {
            let _ = fs::remove_file(&new);
            return Err(e);
        }
        sync_dir(&self.tmp)
    }

    /// How many bytes of upload `id` are held.
    pub fn held(&self, id: &str) -> u64 {
        fs::metadata(self.part(id)).map_or(0, |m| m.len())
    }

    /// Opens the part file of `id` for appending (created if missing).
    pub fn append(&self, id: &str) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.part(id))
    }

    /// Forgets upload `id`: its bytes and its record.
    pub fn remove(&self, id: &str) {
        let _ = fs::remove_file(self.part(id));
        let _ = fs::remove_file(self.record_path(id));
    }

    /// Drops the bytes of upload `id`, keeping its record.
    pub fn remove_part(&self, id: &str) {
        let _ = fs::remove_file(self.part(id));
    }

    /// Gives the bytes of `id` the modification time `unix_s`.
    pub fn set_file_time(&self, id: &str, unix_s: i64) -> io::Result<()> {
        let when = if unix_s >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(unix_s as u64)
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(unix_s.unsigned_abs())
        };
        OpenOptions::new()
            .write(true)
            .open(self.part(id))?
            .set_modified(when)
    }

    /// Puts the verified bytes of `record` into the folder under its name, never over an
    /// existing file: syncs them, hard-links them in, syncs the folder, notes the inode in the
    /// record. `Ok(false)`: the name is taken.
    pub fn link(&self, record: &mut Record) -> io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let (id, name) = (&record.id, &record.name);
        let part = File::open(self.part(id))?;
        part.sync_all()?;
        record.inode = Some(part.metadata()?.ino());
        let target = self.dir.join(name);
        match fs::hard_link(self.part(id), &target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Already linked by this upload before a crash: the same inode.
                if !same_file(&self.part(id), &target) {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
        sync_dir(&self.dir)?;
        Ok(true)
    }

    /// Whether the bytes of `id` are the file `name` in the folder already (linked before a
    /// crash that came before the record said so).
    pub fn link_done(&self, id: &str, name: &str) -> bool {
        same_file(&self.part(id), &self.dir.join(name))
    }

    /// Whether the folder holds the file `record` linked (an announcement can still find it).
    pub fn holds_linked(&self, record: &Record) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (record.inode, fs::metadata(self.dir.join(&record.name))) {
            (Some(inode), Ok(meta)) => meta.ino() == inode,
            (None, Ok(_)) => true,
            (_, Err(_)) => false,
        }
    }

    /// All records (for recovery and cleaning), with the age of their last change.
    pub fn records(&self) -> io::Result<Vec<(Record, Duration)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.tmp)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Some(record) = self.load(id)? else {
                continue;
            };
            // A part still growing counts as a change.
            let changed = [self.record_path(id), self.part(id)]
                .iter()
                .filter_map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
                .max()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let age = SystemTime::now()
                .duration_since(changed)
                .unwrap_or(Duration::ZERO);
            out.push((record, age));
        }
        Ok(out)
    }

    /// Removes part files that have no record (a crash between creating both).
    pub fn remove_orphan_parts(&self, older_than: Duration) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.tmp)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".part")) else {
                continue;
            };
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .is_some_and(|age| age > older_than);
            if old && !self.record_path(id).exists() {
                let _ = fs::remove_file(entry.path());
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            id: id.into(),
            name: "a.dat".into(),
            total: Some(3),
            checksum: None,
            token: "t".into(),
            state: State::Receiving,
            resumable: true,
            file_time: None,
            inode: None,
            digest: None,
        }
    }

    #[test]
    fn records_and_links() {
        let dir = std::env::temp_dir().join(format!("tally-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        store.save(&record("upload01")).unwrap();
        assert_eq!(store.load("upload01").unwrap(), Some(record("upload01")));
        store.append("upload01").unwrap().write_all(b"abc").unwrap();
        assert_eq!(store.held("upload01"), 3);
        let mut first = record("upload01");
        assert!(store.link(&mut first).unwrap());
        assert!(store.holds_linked(&first));
        // Linking again after a crash is the same file; another upload's bytes are refused.
        assert!(store.link(&mut first).unwrap());
        store.append("upload02").unwrap().write_all(b"xyz").unwrap();
        assert!(!store.link(&mut record("upload02")).unwrap());
        assert_eq!(fs::read(dir.join("a.dat")).unwrap(), b"abc");
        store.remove("upload01");
        assert_eq!(store.load("upload01").unwrap(), None);
        assert!(store.holds_linked(&first), "the folder's file stays");
        fs::remove_file(dir.join("a.dat")).unwrap();
        assert!(!store.holds_linked(&first));
        assert_eq!(store.remove_orphan_parts(Duration::ZERO).unwrap(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
