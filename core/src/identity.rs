//! File identity: what makes the file at a path the file that was announced.
//!
//! The producer names a file by device, inode, modification time (ns) and size when it
//! announces it; the parser computes the same id from `fstat` of the descriptor it opened and
//! reads the bytes only if the two agree. A file replaced under the same name (a new inode), or
//! rewritten or touched in place (a new mtime or size), is therefore never read as the
//! announced one, whatever the path says.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

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
        assert_eq!(kind(&meta), "regular file");
        assert_eq!(kind(&std::fs::metadata(&dir).unwrap()), "directory");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
