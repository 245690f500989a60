//! Opening a unit's file for reading, only if it is the announced one: inside the data root,
//! a regular file (the open never blocks), with the announced identity.

use std::fs::File;
use std::path::Path;

use tally_core::identity;
use tally_core::messages::WorkUnit;

/// Opens a unit's file, or says why not (the dead-letter reason). The path must resolve inside
/// the data root; the open neither follows a final symbolic link nor blocks (a FIFO or device
/// at the path cannot wedge the parser); and the descriptor's `fstat` must show a regular file
/// with the announced identity (device, inode, size, mtime), so no unit is ever summed from
/// bytes that are not the announced file's, whatever was renamed over its path since.
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
    if meta.len() != unit.file_bytes {
        return Err(format!(
            "size changed since announced ({} bytes announced, {} now)",
            unit.file_bytes,
            meta.len()
        ));
    }
    let now = identity::file_id(&meta);
    if now != unit.file_id {
        return Err(format!(
            "not the announced file: {} was replaced or rewritten after it was announced \
             (announced as {}, now {now}); announce the new file to count it",
            resolved.display(),
            unit.file_id
        ));
    }
    Ok(file)
}
