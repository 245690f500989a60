//! File identity: what makes the file at a path the file that was announced.
//!
//! The producer names a file by device, inode, modification time (ns) and size when it
//! announces it; the parser computes the same id from `fstat` of the descriptor it opened and
//! reads the bytes only if the two agree. A file replaced under the same name (a new inode), or
//! rewritten or touched in place (a new mtime or size), is therefore never read as the
//! announced one, whatever the path says.
//!
//! Beside the version, a file has a *stream*: device, inode and birth time, which survive
//! appends and rewrites in place (and, unlike device and inode alone, are not fooled by a new
//! file that got a recycled inode number). All versions of a stream share one done-state, in
//! which a [`fingerprint`] of the counted version tells an append (the old bytes are still
//! there) from a rewrite (they are not).

use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};

/// Identity of a file: device, inode, modification time (ns) and size. The same file announced
/// twice gets the same id; a new file that reuses a name is a new inode (and a new mtime), so
/// it gets a new id. Stable across versions (no hashing).
pub fn file_id(meta: &Metadata) -> String {
    let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + i128::from(meta.mtime_nsec());
    format!(
        "{:x}-{:x}-{:x}-{:x}",
        meta.dev(),
        meta.ino(),
        mtime_ns,
        meta.size()
    )
}

/// The size a [`file_id`] names.
pub fn file_id_size(file_id: &str) -> Option<u64> {
    u64::from_str_radix(file_id.rsplit('-').next()?, 16).ok()
}

/// The modification time (Unix seconds) a [`file_id`] names.
pub fn file_id_mtime(file_id: &str) -> Option<i64> {
    let ns = i128::from_str_radix(file_id.rsplit('-').nth(1)?, 16).ok()?;
    i64::try_from(ns.div_euclid(1_000_000_000)).ok()
}

/// The stream of a file: device, inode and birth time (ns; 0 where the file system does not
/// report one), in hex. Stable while the file is appended to or rewritten in place.
pub fn stream_id(meta: &Metadata) -> String {
    let born = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}-{:x}", meta.dev(), meta.ino(), born)
}

/// Bytes read at each end of the prefix by [`fingerprint`].
const FINGERPRINT_BYTES: u64 = 4096;

/// A fingerprint of the first `len` bytes of `file`: FNV-1a (64-bit) of their first and last
/// 4 KiB and of `len`. Computed by the producer for the announced size, and by the parser for
/// the same size on the file it opened: equal means the announced bytes are (very likely) still
/// there, as a prefix of a file that may have grown since. Not a defence against a writer that
/// rewrites only the middle of a file in place; such writers must use a new name.
pub fn fingerprint(file: &File, len: u64) -> std::io::Result<u64> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    let mut buf = vec![0u8; FINGERPRINT_BYTES.min(len) as usize];
    file.read_exact_at(&mut buf, 0)?;
    feed(&buf);
    let tail = len - buf.len() as u64;
    file.read_exact_at(&mut buf, tail)?;
    feed(&buf);
    feed(&len.to_le_bytes());
    Ok(hash)
}

/// What kind of file `meta` describes, for messages (`regular file`, `FIFO`, …).
pub fn kind(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_has_another_id() {
        let dir = std::env::temp_dir().join(format!("tally-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.txt");
        std::fs::write(&path, "1 1\n").unwrap();
        let first = file_id(&std::fs::metadata(&path).unwrap());
        assert_eq!(first, file_id(&std::fs::metadata(&path).unwrap()));
        // Same size, same name, another file renamed over it.
        let other = dir.join("b.txt");
        std::fs::write(&other, "2 2\n").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_ne!(first, file_id(&meta));
        assert_eq!(file_id_size(&first), Some(4));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(file_id_mtime(&file_id(&meta)), Some(meta.mtime()));
        assert_eq!(kind(&meta), "regular file");
        // A stream survives appends, and its old prefix keeps its fingerprint.
        let stream = stream_id(&meta);
        let before = fingerprint(&File::open(&path).unwrap(), 4).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"3 3\n").unwrap();
        let grown = std::fs::metadata(&path).unwrap();
        assert_eq!(stream_id(&grown), stream);
        let reopened = File::open(&path).unwrap();
        assert_eq!(fingerprint(&reopened, 4).unwrap(), before);
        assert_ne!(fingerprint(&reopened, 8).unwrap(), before);
        std::fs::write(&path, "9 9\n3 3\n").unwrap();
        assert_ne!(fingerprint(&File::open(&path).unwrap(), 4).unwrap(), before);
        assert_eq!(kind(&std::fs::metadata(&dir).unwrap()), "directory");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
