//! Files as [`Source`]s of byte windows.
//!
//! Each chunk maps only its own window and unmaps it when done, so the resident set of a parse
//! stays at (workers × window) however large the file is: a 10 GB file costs what a 1 GB file
//! costs. The window is pre-faulted (`MAP_POPULATE`) and advised sequential. Files that cannot
//! be mapped (pipes, some special files) are read with `pread` into a buffer instead.
//!
//! A file truncated while a window of it is mapped does not kill the process (`guard.rs`): the
//! window reads zeros past the new end, and [`Source::intact`] reports it, so the reader
//! rejects what it parsed from that window.

mod guard;

use std::fs::File;
use std::io;
use std::ops::{Deref, Range};
use std::os::unix::fs::FileExt;

use memmap2::{Advice, Mmap, MmapOptions};

use crate::Source;

/// A regular file, read through per-window mappings.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    /// Opens `file`, whose length is taken now: bytes appended later are not read.
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self { file, len })
    }

    /// Reads only the first `len` bytes of `file`: a file that grew since its announcement is
    /// read as it was announced (the caller checked that those bytes are still there).
    pub fn with_len(file: File, len: u64) -> Self {
        Self { file, len }
    }
}

/// One window: mapped, or read into memory.
#[derive(Debug)]
pub enum Window {
    /// Mapped pages, guarded against truncation; unmapped on drop.
    Mapped(Mapped),
    /// Read with pread (fallback).
    Read(Vec<u8>),
}

/// A mapped window and its truncation guard. Fields drop in order: the guard is released
/// before the pages are unmapped, so it never covers pages that are no longer this window's.
#[derive(Debug)]
pub struct Mapped {
    guard: guard::Guard,
    map: Mmap,
}

impl Deref for Window {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Window::Mapped(m) => &m.map,
            Window::Read(v) => v,
        }
    }
}

impl Source for FileSource {
    type Window<'a> = Window;

    fn len(&self) -> u64 {
        self.len
    }

    fn window(&self, range: Range<u64>) -> io::Result<Window> {
        if range.is_empty() {
            return Ok(Window::Read(Vec::new()));
        }
        if let Ok(map) = map_window(&self.file, range.clone()) {
            if let Some(guard) = guard::Guard::register(map.as_ptr(), map.len()) {
                return Ok(Window::Mapped(Mapped { guard, map }));
            }
        }
        let mut buf = vec![0; (range.end - range.start) as usize];
        self.file.read_exact_at(&mut buf, range.start)?;
        Ok(Window::Read(buf))
    }

    fn intact(&self, window: &Window) -> io::Result<()> {
        match window {
            Window::Mapped(mapped) if mapped.guard.hit() => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file shrank while it was read (now {} bytes, {} announced)",
                    self.file.metadata().map(|m| m.len()).unwrap_or(0),
                    self.len
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Maps `range` of `file` read-only.
fn map_window(file: &File, range: Range<u64>) -> io::Result<Mmap> {
    // SAFETY: the mapping is read-only and private to this process. Its contents are undefined
    // only if another process truncates or rewrites the file while it is mapped; the producer
    // announces a file only once its writer finished it (renamed into place, no lock file),
    // and the parser checks the announced size before mapping. A truncation anyway raises
    // SIGBUS, which the window's guard turns into zeros and a mark the reader checks
    // ([`Source::intact`]) before it keeps anything parsed from the window.
    #[allow(unsafe_code)]
    let mmap = unsafe {
        MmapOptions::new()
            .offset(range.start)
            .len((range.end - range.start) as usize)
            .populate()
            .map(file)?
    };
    // Advice is a hint; a kernel that ignores it changes nothing.
    let _ = mmap.advise(Advice::Sequential);
    Ok(mmap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn windows_match_the_file() {
        let mut file = tempfile_with(b"0123456789abcdef");
        file.flush().unwrap();
        let source = FileSource::new(file).unwrap();
        assert_eq!(source.len(), 16);
        assert_eq!(&*source.window(3..9).unwrap(), b"345678");
        assert_eq!(&*source.window(0..0).unwrap(), b"");
    }

    #[test]
    fn a_file_truncated_under_its_mapping_reads_zeros_and_says_so() {
        let page = 4096;
        let mut file = tempfile_with(&vec![b'7'; 64 * page]);
        file.flush().unwrap();
        let source = FileSource::new(file.try_clone().unwrap()).unwrap();
        let window = source.window(0..source.len()).unwrap();
        assert!(matches!(window, Window::Mapped(_)));
        assert!(source.intact(&window).is_ok());
        file.set_len(page as u64).unwrap();
        // Without the guard, this read ends the process with SIGBUS.
        let sum: u64 = window.iter().map(|&b| u64::from(b)).sum();
        assert_eq!(
            sum,
            u64::from(b'7') * page as u64,
            "the bytes past the end read as zeros"
        );
        let error = source.intact(&window).unwrap_err();
        assert!(error.to_string().contains("shrank"), "{error}");
        drop(window);
        // A window mapped later is not marked by the earlier fault.
        let again = source.window(0..page as u64).unwrap();
        assert!(source.intact(&again).is_ok());
    }

    /// An unlinked file holding `bytes`, a name of its own per call: tests run in parallel,
    /// and a shared name let one test's `truncate` empty another's file (a red CI run).
    fn tempfile_with(bytes: &[u8]) -> File {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tally-source-{}-{n}", std::process::id()));
        let mut f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.write_all(bytes).unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
