//! A file truncated while it is mapped must not kill the process.
//!
//! Reading a mapped page past the end of a file that shrank raises SIGBUS, whose default action
//! ends the process, with every unit in flight. Each mapped window is registered here while it
//! is read; a SIGBUS inside a registered window is answered by mapping zero-filled anonymous
//! pages over the rest of that window (so the read that faulted completes, with zeros) and
//! marking the window as hit. The reader checks the mark when it has parsed the window
//! ([`Guard::hit`]) and rejects what it read: nothing parsed from the zeros is ever kept. A
//! SIGBUS outside every registered window gets the action that was there before (the default:
//! the process ends), as if this module did not exist.
//!
//! The handler does only async-signal-safe work: atomic loads and stores on a fixed table, and
//! one `mmap` system call.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Windows that can be guarded at once (a window that finds no free slot is read with `pread`).
const SLOTS: usize = 512;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    hit: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    hit: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

/// The page size and the action SIGBUS had before ours, once ours is installed.
struct Installed {
    page: usize,
    previous: libc::sigaction,
}

static INSTALLED: OnceLock<Option<Installed>> = OnceLock::new();

/// A registered window: `hit` says whether a truncation was papered over inside it.
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Registers the mapped bytes `start..start + len`; `None` if no guard is possible (the
    /// handler could not be installed, or every slot is taken): read the window another way.
    pub fn register(start: *const u8, len: usize) -> Option<Guard> {
        INSTALLED.get_or_init(install).as_ref()?;
        for (slot, entry) in TABLE.iter().enumerate() {
            if entry.start.load(Ordering::Relaxed) != 0 {
                continue;
            }
            // Length first: the handler reads the start, then the length.
            entry.len.store(len, Ordering::Release);
            entry.hit.store(false, Ordering::Release);
            if entry
                .start
                .compare_exchange(0, start as usize, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Some(Guard { slot });
            }
        }
        None
    }

    /// Whether a read inside the window found the file shorter than the mapping.
    pub fn hit(&self) -> bool {
        TABLE[self.slot].hit.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let entry = &TABLE[self.slot];
        entry.start.store(0, Ordering::Release);
        entry.len.store(0, Ordering::Release);
    }
}

fn install() -> Option<Installed> {
    // SAFETY: sysconf and sigaction are called with valid arguments; the new action's handler
    // is an `extern "C"` function of the right signature, and the old action is written into a
    // zeroed `sigaction` this function owns.
    #[allow(unsafe_code)]
    unsafe {
        let page = usize::try_from(libc::sysconf(libc::_SC_PAGESIZE)).ok()?;
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigbus;
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
            return None;
        }
        Some(Installed { page, previous })
    }
}

extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; `si_addr` is the
    // faulting address for SIGBUS. The mmap replaces only pages of a window registered as
    // mapped by this process (the faulting page to the window's end), read-only, with
    // anonymous zero pages: the window's owner still unmaps the whole range on drop.
    #[allow(unsafe_code)]
    unsafe {
        let addr = (*info).si_addr() as usize;
        if let Some(Some(installed)) = INSTALLED.get() {
            for entry in &TABLE {
                let start = entry.start.load(Ordering::Acquire);
                let len = entry.len.load(Ordering::Acquire);
                if start == 0 || addr < start || addr >= start + len {
                    continue;
                }
                let page = addr & !(installed.page - 1);
                let end = (start + len).div_ceil(installed.page) * installed.page;
                let zeros = libc::mmap(
                    page as *mut libc::c_void,
                    end - page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                );
                if zeros != libc::MAP_FAILED {
                    entry.hit.store(true, Ordering::Release);
                    return;
                }
            }
            // Not ours: the action that was there before, for this fault and any later one.
            libc::sigaction(signal, &installed.previous, std::ptr::null_mut());
        } else {
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &default, std::ptr::null_mut());
        }
        // Returning re-runs the faulting access, which now meets the previous action.
    }
}
