//! Opening a unit's file for reading, only if it is the announced one: inside the data root,
//! a regular file (the open never blocks), the announced stream (device, inode, birth time),
//! and either the announced version or a file that only grew since (the announced bytes,
//! checked by their fingerprint, are still its first bytes).

use std::fs::File;
use std::path::Path;

use tally_model::identity;
use tally_model::messages::WorkUnit;

/// Opens a unit's file, or says why not (the dead-letter reason). The path must resolve inside
/// the data root; the open neither follows a final symbolic link nor blocks (a FIFO or device
/// at the path cannot wedge the parser); and the descriptor's `fstat` must show a regular file
/// with the announced identity (device, inode, size, mtime), or the same file grown with the
/// announced bytes intact, so no unit is ever summed from bytes that are not the announced
/// file's, whatever was renamed over its path or written into it since. The caller reads only
/// the announced `file_bytes`.
pub fn open_unit(unit: &WorkUnit, data_root: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let resolved =
        std::fs::canonicalize(&unit.path).map_err(|e| format!("cannot resolve path: {e}"))?;
    if !resolved.starts_with(data_root) {
        return Err(format!(
            "path outside the data root {}",
            data_root.display()
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&resolved)
        .map_err(|e| format!("cannot open: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "not a regular file: {} is a {}",
            resolved.display(),
            identity::kind(&meta)
        ));
    }
    if identity::stream_id(&meta) != unit.stream {
        return Err(format!(
            "not the announced file: {} is another file now (replaced or renamed over since it \
             was announced); announce the new file to count it",
            resolved.display()
        ));
    }
    if identity::file_id(&meta) == unit.file_id {
        return Ok(file);
    }
    // The same file, changed since: fine if it only grew or was touched (the announced bytes
    // are still its first bytes; only those are read), a new version otherwise.
    let grown = meta.len() >= unit.file_bytes
        && identity::fingerprint(&file, unit.file_bytes).ok() == Some(unit.fingerprint);
    if !grown {
        return Err(format!(
            "not the announced version: {} was rewritten in place since it was announced \
             ({} bytes announced, {} now, other content); its new version is counted once \
             it is announced",
            resolved.display(),
            unit.file_bytes,
            meta.len()
        ));
    }
    Ok(file)
}
