//! A file that shrinks while it is memory-mapped makes the next read of a page past its new
//! end raise SIGBUS, which kills the process without a word. The reader registers every
//! map here; the SIGBUS handler looks the faulting address up, and when it lies in a model
//! file's map it says which file changed, removes the run's temporary output folders
//! (registered with [`remove_on_fault`]) and exits with status 1. A fault anywhere else
//! goes to the handler that was installed before (Rust's own, which reports stack
//! overflows), or kills the process as it would have without this module.
//!
//! The handler may only make async-signal-safe calls: it reads the registries through
//! atomics, writes with `write(2)`, removes folders with raw `openat`/`getdents64`/
//! `unlinkat` calls on stack buffers, and ends with `_exit(2)`.
//!
//! Only Linux has the handler; elsewhere registering does nothing and a SIGBUS stays fatal.

use std::path::Path;

/// A map registered with the SIGBUS handler; unregistered when dropped, which must happen
/// before the map is unmapped.
#[derive(Debug)]
pub struct MapRegistration {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    slot: Option<usize>,
    /// The path's bytes, which the handler reads while the slot is registered.
    _path: Box<[u8]>,
}

/// A folder the SIGBUS handler removes before exiting; unregistered when dropped.
#[derive(Debug)]
#[must_use = "the folder is registered only as long as this value lives"]
pub struct FaultCleanup {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    slot: Option<usize>,
    /// The path, NUL-terminated, which the handler reads while the slot is registered.
    _path: Box<[u8]>,
}

/// Registers the map `start..start + len` of file `path`.
pub fn register_map(start: *const u8, len: usize, path: &Path) -> MapRegistration {
    let bytes: Box<[u8]> = path.as_os_str().as_encoded_bytes().into();
    #[cfg(target_os = "linux")]
    {
        imp::install();
        let slot = imp::register(&imp::MAPS, start as usize, len, &bytes);
        MapRegistration { slot, _path: bytes }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (start, len);
        MapRegistration {
            slot: None,
            _path: bytes,
        }
    }
}

/// Asks the SIGBUS handler to remove folder `dir` (and everything in it) before it exits:
/// for the temporary folder a run writes its output into, so that a model file truncated
/// under the run leaves nothing behind. Keep the returned value alive as long as the
/// folder should be removed on a fault; drop it once the folder is renamed into place.
///
/// Up to 16 folders can be registered at once; more are not removed (the fault is still
/// reported).
pub fn remove_on_fault(dir: &Path) -> FaultCleanup {
    let mut bytes = dir.as_os_str().as_encoded_bytes().to_vec();
    bytes.push(0);
    let bytes: Box<[u8]> = bytes.into();
    #[cfg(target_os = "linux")]
    {
        imp::install();
        let slot = imp::register(&imp::CLEANUP, 1, 0, &bytes);
        FaultCleanup { slot, _path: bytes }
    }
    #[cfg(not(target_os = "linux"))]
    FaultCleanup {
        slot: None,
        _path: bytes,
    }
}

impl Drop for MapRegistration {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(slot) = self.slot {
            imp::unregister(&imp::MAPS, slot);
        }
    }
}

impl Drop for FaultCleanup {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(slot) = self.slot {
            imp::unregister(&imp::CLEANUP, slot);
        }
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod imp {
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
    use std::sync::OnceLock;

    /// One registered range and the path it belongs to. `start == 0` means free.
    pub struct Slot {
        busy: AtomicBool,
        start: AtomicUsize,
        len: AtomicUsize,
        path: AtomicPtr<u8>,
        path_len: AtomicUsize,
    }

    impl Slot {
        const fn new() -> Slot {
            Slot {
                busy: AtomicBool::new(false),
                start: AtomicUsize::new(0),
                len: AtomicUsize::new(0),
                path: AtomicPtr::new(std::ptr::null_mut()),
                path_len: AtomicUsize::new(0),
            }
        }
    }

    /// Mapped model files. A run maps each shard of each input once.
    pub static MAPS: [Slot; 4096] = [const { Slot::new() }; 4096];
    /// Folders to remove on a fault (`start` is 1 while registered).
    pub static CLEANUP: [Slot; 16] = [const { Slot::new() }; 16];

    /// The handler installed before ours.
    static PREVIOUS: OnceLock<Previous> = OnceLock::new();
    /// Set by the first thread that reports a fault; the others wait for its `_exit`.
    static REPORTING: AtomicBool = AtomicBool::new(false);

    struct Previous(libc::sigaction);
    // SAFETY: a plain C struct of integers and function addresses, only read after it is set.
    unsafe impl Send for Previous {}
    unsafe impl Sync for Previous {}

    pub fn register(slots: &[Slot], start: usize, len: usize, path: &[u8]) -> Option<usize> {
        let i = slots.iter().position(|s| {
            s.busy
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        let s = &slots[i];
        s.path.store(path.as_ptr().cast_mut(), Ordering::Relaxed);
        s.path_len.store(path.len(), Ordering::Relaxed);
        s.len.store(len, Ordering::Relaxed);
        s.start.store(start, Ordering::Release);
        Some(i)
    }

    pub fn unregister(slots: &[Slot], i: usize) {
        if let Some(s) = slots.get(i) {
            s.start.store(0, Ordering::Release);
            s.busy.store(false, Ordering::Release);
        }
    }

    /// Installs the handler once per process.
    pub fn install() {
        PREVIOUS.get_or_init(|| {
            // SAFETY: plain sigaction calls with initialised structs; the handler only
            // makes async-signal-safe calls.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
                action.sa_sigaction = handler as usize;
                action.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&mut action.sa_mask);
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
                    previous.sa_sigaction = libc::SIG_DFL;
                }
                Previous(previous)
            }
        });
    }

    fn write_all(bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            // SAFETY: writes from a live slice.
            let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
            if n <= 0 {
                return;
            }
            rest = rest.get(n as usize..).unwrap_or(&[]);
        }
    }

    /// The registered path whose range holds `addr`.
    fn path_of(addr: usize) -> Option<&'static [u8]> {
        MAPS.iter().find_map(|s| {
            let start = s.start.load(Ordering::Acquire);
            let len = s.len.load(Ordering::Relaxed);
            if start == 0 || addr < start || addr - start >= len {
                return None;
            }
            let ptr = s.path.load(Ordering::Relaxed);
            let n = s.path_len.load(Ordering::Relaxed);
            // SAFETY: the path outlives the registration, and a map cannot be unregistered
            // while a thread faults on it (the faulting thread holds a reference to it).
            (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr.cast_const(), n) })
        })
    }

    extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler. Only a
        // fault the kernel raised (si_code > 0) has an address; a SIGBUS sent by a process
        // (kill, raise) has none and is never a model file's.
        let addr = if info.is_null() || unsafe { (*info).si_code } <= 0 {
            0
        } else {
            unsafe { (*info).si_addr() as usize }
        };
        if let Some(path) = path_of(addr) {
            if REPORTING.swap(true, Ordering::AcqRel) {
                // Another thread is reporting; its _exit ends this one too.
                loop {
                    // SAFETY: pause is async-signal-safe.
                    unsafe { libc::pause() };
                }
            }
            write_all(b"error: `");
            write_all(path);
            write_all(b"` changed while mergec was reading it (the file shrank or could not be read)\n");
            for s in CLEANUP.iter() {
                if s.start.load(Ordering::Acquire) == 0 {
                    continue;
                }
                let ptr = s.path.load(Ordering::Relaxed);
                if !ptr.is_null() {
                    // SAFETY: a NUL-terminated path registered by remove_on_fault.
                    unsafe { remove_tree(ptr.cast_const().cast()) };
                }
            }
            // SAFETY: _exit is async-signal-safe and ends every thread.
            unsafe { libc::_exit(1) };
        }
        // Not a model file: what would have happened without this handler.
        let previous = PREVIOUS.get().map(|p| p.0.sa_sigaction);
        match previous {
            Some(handler) if handler != libc::SIG_DFL && handler != libc::SIG_IGN => {
                let flags = PREVIOUS.get().map(|p| p.0.sa_flags).unwrap_or(0);
                // SAFETY: the previous handler was installed with these flags, so it has
                // this signature.
                unsafe {
                    if flags & libc::SA_SIGINFO != 0 {
                        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                            std::mem::transmute(handler);
                        f(sig, info, ctx);
                    } else {
                        let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
                        f(sig);
                    }
                }
            }
            _ => {
                // Restore the default action and return: the access faults again and
                // the process dies of SIGBUS, as it would have.
                // SAFETY: sigaction is async-signal-safe.
                unsafe {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = libc::SIG_DFL;
                    libc::sigemptyset(&mut action.sa_mask);
                    libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
                }
            }
        }
    }

    /// Removes the folder `path` and what it holds (up to a few levels deep) with raw
    /// system calls only. Links are removed, never followed.
    ///
    /// # Safety
    /// `path` must be NUL-terminated.
    unsafe fn remove_tree(path: *const libc::c_char) {
        let fd = libc::open(
            path,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return;
        }
        clear_dir(fd, 0);
        libc::close(fd);
        libc::rmdir(path);
    }

    /// Removes every entry of the open folder `fd`.
    unsafe fn clear_dir(fd: libc::c_int, depth: u32) {
        let mut buf = [0u8; 2048];
        // A few passes: entries removed while listing can make getdents skip others.
        for _ in 0..8 {
            libc::lseek(fd, 0, libc::SEEK_SET);
            let mut removed_any = false;
            loop {
                let n = libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len());
                if n <= 0 {
                    break;
                }
                let n = n as usize;
                let mut at = 0usize;
                // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
                while at + 19 < n {
                    let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
                    if reclen == 0 || at + reclen > n {
                        break;
                    }
                    let d_type = buf[at + 18];
                    let name = buf.as_ptr().add(at + 19).cast::<libc::c_char>();
                    let dot = *name == b'.' as libc::c_char
                        && (*name.add(1) == 0 || (*name.add(1) == b'.' as libc::c_char && *name.add(2) == 0));
                    if !dot {
                        if d_type == libc::DT_DIR || libc::unlinkat(fd, name, 0) != 0 {
                            if depth < 4 {
                                let sub = libc::openat(
                                    fd,
                                    name,
                                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                                );
                                if sub >= 0 {
                                    clear_dir(sub, depth + 1);
                                    libc::close(sub);
                                }
                            }
                            libc::unlinkat(fd, name, libc::AT_REMOVEDIR);
                        }
                        removed_any = true;
                    }
                    at += reclen;
                }
            }
            if !removed_any {
                return;
            }
        }
    }
}
