//! Opening a unit's file for reading, only if it is the announced one: beneath the data root
//! (checked by the kernel at the open itself, not by a path check before it), a regular file
//! (the open never blocks), the announced stream (device, inode, birth time), and either the
//! announced version or a file that only grew since (the announced bytes, checked by their
//! fingerprint, are still its first bytes).

use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use tally_model::identity;
use tally_model::messages::WorkUnit;

/// Opens a unit's file, or says why not (the dead-letter reason). The path is opened beneath
/// the data root: `openat2` with `RESOLVE_BENEATH` resolves it from a descriptor of the root and
/// refuses any step out of it (`..`, an absolute or escaping symbolic link, a directory swapped
/// for a link mid-open), so what is opened is inside the root whatever changes under it; a
/// kernel without `openat2` gets the same check on the opened descriptor instead. The open does
/// not block (a FIFO or device at the path cannot wedge the parser); and the descriptor's
/// `fstat` must show a regular file with the announced identity (device, inode, size, mtime),
/// or the same file grown with the announced bytes intact, so no unit is ever summed from
/// bytes that are not the announced file's, whatever was renamed over its path or written into
/// it since. The caller reads only the announced `file_bytes`.
pub fn open_unit(unit: &WorkUnit, data_root: &Path) -> Result<File, String> {
    let (file, resolved) = open_in_root(Path::new(&unit.path), data_root)?;
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

/// The unit's path relative to the data root: the announced path without the root's prefix
/// (or, for a path announced through another name of the root, its resolved form's). Only a
/// name to open beneath the root; nothing is trusted from it.
fn beneath(path: &Path, data_root: &Path) -> Result<PathBuf, String> {
    let outside = || format!("path outside the data root {}", data_root.display());
    if let Ok(relative) = path.strip_prefix(data_root) {
        return Ok(relative.to_owned());
    }
    let resolved = std::fs::canonicalize(path).map_err(|e| format!("cannot resolve path: {e}"))?;
    resolved
        .strip_prefix(data_root)
        .map(Path::to_owned)
        .map_err(|_| outside())
}

/// Opens the announced `path` beneath `data_root`; the file and the name it was opened by.
fn open_in_root(path: &Path, data_root: &Path) -> Result<(File, PathBuf), String> {
    let resolved = data_root.join(beneath(path, data_root)?);
    match open_beneath(data_root, &resolved) {
        Ok(file) => Ok((file, resolved)),
        // An absolute link is a step out of the root for the kernel, even one that points
        // back in: the name it resolves to now is opened beneath the root in its turn.
        Err(why) => {
            let Ok(canonical) = std::fs::canonicalize(&resolved) else {
                return Err(why);
            };
            if canonical == resolved || !canonical.starts_with(data_root) {
                return Err(why);
            }
            let file = open_beneath(data_root, &canonical)?;
            Ok((file, canonical))
        }
    }
}

/// Opens `path` (inside `data_root`) for reading, beneath the root as the kernel resolves it.
fn open_beneath(data_root: &Path, path: &Path) -> Result<File, String> {
    let outside = || format!("path outside the data root {}", data_root.display());
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let root = rustix::fs::open(
        data_root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open the data root: {e}"))?;
    let relative = path.strip_prefix(data_root).map_err(|_| outside())?;
    let relative = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    match rustix::fs::openat2(
        &root,
        relative,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Ok(File::from(fd)),
        // A step out of the root.
        Err(rustix::io::Errno::XDEV) => Err(outside()),
        // No openat2 here (before Linux 5.6, or a seccomp filter without it): open, then check
        // where the descriptor really is.
        Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => {
            let file = File::from(
                rustix::fs::open(path, flags, Mode::empty())
                    .map_err(|e| format!("cannot open: {e}"))?,
            );
            let at = std::fs::read_link(format!("/proc/self/fd/{}", fd_number(&file)))
                .map_err(|e| format!("cannot check where the file is: {e}"))?;
            if at.starts_with(data_root) {
                Ok(file)
            } else {
                Err(outside())
            }
        }
        Err(e) => Err(format!("cannot open: {e}")),
    }
}

fn fd_number(file: &File) -> i32 {
    use std::os::fd::AsRawFd;
    file.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tally-open-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::canonicalize(d).unwrap()
    }

    #[test]
    fn links_and_dots_out_of_the_root_are_refused() {
        let root = dir("root");
        let outside = dir("outside");
        std::fs::write(outside.join("secret"), "1 1\n").unwrap();
        std::fs::write(root.join("in"), "1 1\n").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("file-link")).unwrap();
        std::os::unix::fs::symlink(root.join("in"), root.join("in-link")).unwrap();
        std::os::unix::fs::symlink("in", root.join("relative-link")).unwrap();
        for inside in ["in", "in-link", "relative-link"] {
            assert!(
                open_in_root(&root.join(inside), &root).is_ok(),
                "{inside} is inside"
            );
        }
        for path in [
            root.join("link/secret"),
            root.join("file-link"),
            root.join("../")
                .join(outside.file_name().unwrap())
                .join("secret"),
        ] {
            let why = open_in_root(&path, &root).unwrap_err();
            assert!(
                why.contains("outside the data root"),
                "{}: {why}",
                path.display()
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    /// A directory of the root swapped for a link to outside while files are opened (between
    /// any path check and the open): the open itself must refuse it, however they interleave.
    #[test]
    fn a_directory_swapped_for_a_link_mid_open_never_opens_outside() {
        let root = dir("race-root");
        let outside = dir("race-outside");
        std::fs::write(outside.join("f"), "outside\n").unwrap();
        let real = root.join("real");
        let parked = root.join("parked");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("f"), "inside\n").unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flipper = {
            let (real, parked, outside, stop) =
                (real.clone(), parked.clone(), outside.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::fs::rename(&real, &parked).unwrap();
                    std::os::unix::fs::symlink(&outside, &real).unwrap();
                    std::thread::yield_now();
                    std::fs::remove_file(&real).unwrap();
                    std::fs::rename(&parked, &real).unwrap();
                    std::thread::yield_now();
                }
            })
        };
        let (mut inside, mut opened_outside) = (0, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if let Ok((file, _)) = open_in_root(&real.join("f"), &root) {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut &file, &mut text);
                match text.as_str() {
                    "outside\n" => opened_outside += 1,
                    _ => inside += 1,
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flipper.join().unwrap();
        assert!(inside > 0, "the race never let an open through");
        assert_eq!(
            opened_outside, 0,
            "opened a file outside the data root ({inside} inside)"
        );
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&outside);
    }
}
