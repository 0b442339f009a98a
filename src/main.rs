//! The `mergec` binary: parse the command line, hand it to `cli`.

mod cli;
mod progress;

use clap::Parser;

fn main() -> std::process::ExitCode {
    quiet_gpu_probe();
    #[cfg(unix)]
    interrupt::install();
    cli::run(cli::Cli::parse())
}

/// Mesa's device-selection layer, an implicit Vulkan layer, connects to the desktop's
/// Wayland and X11 displays to find its GPU; without a desktop (servers, containers, ssh)
/// libwayland prints `error: XDG_RUNTIME_DIR is invalid` from inside the GPU probe of an
/// ordinary CPU run. mergec ranks adapters itself (and `--adapter` names one), so the layer
/// is switched off through the variable its manifest names, unless the user set it. Set
/// here, before any thread starts.
fn quiet_gpu_probe() {
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

/// SIGINT, SIGTERM and SIGHUP remove the temporary folders of the outputs being written
/// and exit with 128 + the signal's number (130, 143, 129), so an interrupted run leaves
/// nothing behind. The handler only writes the signal's number to a pipe (write(2) is
/// async-signal-safe); a thread waiting on the pipe does the cleanup and exits. A signal
/// ignored when mergec starts (`nohup`) stays ignored.
#[cfg(unix)]
mod interrupt {
    use std::io::Write;
    use std::sync::atomic::{AtomicI32, Ordering};

    use libc::c_int;

    /// The pipe's write end, for the handler.
    static WAKE: AtomicI32 = AtomicI32::new(-1);

    const SIGNALS: [(c_int, &str); 3] = [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
    ];

    extern "C" fn on_signal(signal: c_int) {
        let byte = signal as u8;
        let saved = errno::get();
        // SAFETY: write(2) is async-signal-safe; the buffer is one valid byte. A failed
        // write (the pipe full of earlier signals) loses nothing: one byte is enough.
        let _ = unsafe { libc::write(WAKE.load(Ordering::Relaxed), (&raw const byte).cast(), 1) };
        errno::set(saved);
    }

    pub fn install() {
        let mut fds = [0 as c_int; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return;
        }
        for fd in fds {
            // SAFETY: plain fcntl calls on descriptors this function owns.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        WAKE.store(fds[1], Ordering::Relaxed);
        let reader = fds[0];
        let spawned = std::thread::Builder::new()
            .name("mergec-signals".into())
            .spawn(move || wait(reader));
        if spawned.is_err() {
            return;
        }
        for (signal, _) in SIGNALS {
            // SAFETY: sigaction with zeroed (valid) structs; the handler is an extern "C"
            // fn that only calls async-signal-safe functions.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, std::ptr::null(), &mut old) != 0
                    || old.sa_sigaction == libc::SIG_IGN
                {
                    continue;
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(c_int) as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
    }

    /// Waits for a signal's number on the pipe, then cleans up and exits.
    fn wait(reader: c_int) {
        let mut byte = 0u8;
        loop {
            // SAFETY: reads one byte into a valid one-byte buffer.
            let n = unsafe { libc::read(reader, (&raw mut byte).cast(), 1) };
            if n == 1 {
                break;
            }
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let signal = c_int::from(byte);
        let removed = mergec::io::writer::remove_temporary_folders_before_exit();
        let name = SIGNALS
            .iter()
            .find(|(s, _)| *s == signal)
            .map_or("a signal", |(_, n)| n);
        // stderr may be gone (a closed terminal's SIGHUP): errors are ignored.
        let mut err = std::io::stderr().lock();
        for path in removed {
            let _ = writeln!(
                err,
                "interrupted by {name}: removed the temporary folder `{}`",
                path.display()
            );
        }
        let _ = err.flush();
        // SAFETY: _exit ends the process at once, without running destructors or atexit
        // handlers that could touch the state other threads were using.
        unsafe { libc::_exit(128 + signal) }
    }

    /// errno, saved and restored around the handler's write.
    mod errno {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        fn location() -> *mut libc::c_int {
            // SAFETY: returns the calling thread's errno; always valid.
            unsafe { libc::__errno_location() }
        }

        #[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
        fn location() -> *mut libc::c_int {
            // SAFETY: returns the calling thread's errno; always valid.
            unsafe { libc::__error() }
        }

        #[cfg(any(
            target_os = "linux",
            target_os = "android",
            target_os = "macos",
            target_os = "ios",
            target_os = "freebsd"
        ))]
        pub fn get() -> libc::c_int {
            // SAFETY: the thread's own errno.
            unsafe { *location() }
        }

        #[cfg(any(
            target_os = "linux",
            target_os = "android",
            target_os = "macos",
            target_os = "ios",
            target_os = "freebsd"
        ))]
        pub fn set(value: libc::c_int) {
            // SAFETY: the thread's own errno.
            unsafe { *location() = value }
        }

        #[cfg(not(any(
            target_os = "linux",
            target_os = "android",
            target_os = "macos",
            target_os = "ios",
            target_os = "freebsd"
        )))]
        pub fn get() -> libc::c_int {
            0
        }

        #[cfg(not(any(
            target_os = "linux",
            target_os = "android",
            target_os = "macos",
            target_os = "ios",
            target_os = "freebsd"
        )))]
        pub fn set(_: libc::c_int) {}
    }
}
