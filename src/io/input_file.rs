//! Opening input files safely: only regular files are opened, and small files are read
//! with a size cap.
//!
//! A model folder may hold anything: a FIFO (opening it blocks until someone writes), a
//! link to `/dev/zero` (reading it never ends), a directory or a socket where a file is
//! expected, a link that loops or points nowhere. Every input file goes through
//! [`classify`] (a `stat` that names such things for what they are) before it is opened,
//! and [`open_regular`] opens without blocking and checks the opened file again, so a file
//! swapped between the two steps is caught too.

use std::fs::{File, Metadata};
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

/// The cap on a JSON or text file read whole: config.json, generation_config.json, the
/// shard index, tokenizer_config.json, chat templates, `vocab.json`, `merges.txt`.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// The cap on `tokenizer.json` and `tokenizer.model`, which can be tens of megabytes for
/// large vocabularies.
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// The cap on a file of [`crate::io::model::DONOR_FILES`] called `name`.
pub fn cap_for(name: &str) -> u64 {
    match name {
        "tokenizer.json" | "tokenizer.model" => MAX_TOKENIZER_BYTES,
        _ => MAX_JSON_BYTES,
    }
}

/// Why an input path cannot be read as a file.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("no file at `{}`", path.display())]
    NotFound { path: PathBuf },
    /// A FIFO, device, socket or directory where a file is expected.
    #[error("`{}` is {what}, not a file", path.display())]
    NotAFile { path: PathBuf, what: &'static str },
    #[error("`{}` is a symbolic link that loops (following it never reaches a file)", path.display())]
    LinkLoop { path: PathBuf },
    #[error("`{}` is a dangling symbolic link: its target `{}` does not exist", path.display(), target.display())]
    Dangling { path: PathBuf, target: PathBuf },
    #[error("`{}` is larger than the {} limit for this file", path.display(), human(*cap))]
    TooLarge { path: PathBuf, cap: u64 },
    #[error("cannot read `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

impl InputError {
    pub fn path(&self) -> &Path {
        match self {
            InputError::NotFound { path }
            | InputError::NotAFile { path, .. }
            | InputError::LinkLoop { path }
            | InputError::Dangling { path, .. }
            | InputError::TooLarge { path, .. }
            | InputError::Io { path, .. } => path,
        }
    }
}

/// `64 MiB` for a power-of-two number of mebibytes, else bytes.
fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes}-byte")
    }
}

/// What a path holds, links followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Nothing (not even a dangling link).
    Missing,
    /// A regular file of this many bytes.
    File(u64),
    Dir,
}

/// Says what `path` is, following links. FIFOs, devices, sockets, looping and dangling
/// links are errors that name them; a missing path is [`Kind::Missing`].
pub fn classify(path: &Path) -> Result<Kind, InputError> {
    match std::fs::metadata(path) {
        Ok(meta) => kind_of(path, &meta),
        Err(e) => {
            if is_loop(&e) {
                return Err(InputError::LinkLoop {
                    path: path.to_path_buf(),
                });
            }
            if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) {
                // The path itself may be a link to nothing.
                if let Ok(link) = std::fs::symlink_metadata(path) {
                    if link.file_type().is_symlink() {
                        let target = std::fs::read_link(path).unwrap_or_default();
                        return Err(InputError::Dangling {
                            path: path.to_path_buf(),
                            target,
                        });
                    }
                }
                return Ok(Kind::Missing);
            }
            Err(InputError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        }
    }
}

fn is_loop(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(libc::ELOOP)
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

fn kind_of(path: &Path, meta: &Metadata) -> Result<Kind, InputError> {
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(Kind::File(meta.len()));
    }
    if ft.is_dir() {
        return Ok(Kind::Dir);
    }
    Err(InputError::NotAFile {
        path: path.to_path_buf(),
        what: special_kind(meta),
    })
}

/// "a FIFO", "a socket", ... for a file that is neither regular nor a directory.
fn special_kind(meta: &Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_socket() {
            return "a socket";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
    }
    if meta.is_dir() {
        return "a directory";
    }
    "a special file"
}

/// [`classify`], with a missing path and a directory as errors: the path must be a
/// regular file. Returns its length.
pub fn require_file(path: &Path) -> Result<u64, InputError> {
    match classify(path)? {
        Kind::File(len) => Ok(len),
        Kind::Dir => Err(InputError::NotAFile {
            path: path.to_path_buf(),
            what: "a directory",
        }),
        Kind::Missing => Err(InputError::NotFound {
            path: path.to_path_buf(),
        }),
    }
}

/// Opens a regular file for reading. The open never blocks (a FIFO swapped in after the
/// path was classified is refused, not waited on), and the opened file is checked again.
pub fn open_regular(path: &Path) -> Result<File, InputError> {
    require_file(path)?;
    let io = |source| InputError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| {
        if is_loop(&e) {
            InputError::LinkLoop {
                path: path.to_path_buf(),
            }
        } else if e.kind() == ErrorKind::NotFound {
            InputError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            io(e)
        }
    })?;
    let meta = file.metadata().map_err(io)?;
    match kind_of(path, &meta)? {
        Kind::File(_) => Ok(file),
        _ => Err(InputError::NotAFile {
            path: path.to_path_buf(),
            what: "a directory",
        }),
    }
}

/// Reads a whole regular file of at most `cap` bytes; `None` when nothing is at `path`.
/// The cap holds even for files whose reported length is wrong (as in `/proc`).
pub fn read_capped(path: &Path, cap: u64) -> Result<Option<Vec<u8>>, InputError> {
    let len = match classify(path)? {
        Kind::Missing => return Ok(None),
        Kind::Dir => {
            return Err(InputError::NotAFile {
                path: path.to_path_buf(),
                what: "a directory",
            })
        }
        Kind::File(len) => len,
    };
    let too_large = || InputError::TooLarge {
        path: path.to_path_buf(),
        cap,
    };
    if len > cap {
        return Err(too_large());
    }
    let file = open_regular(path)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| InputError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(Some(bytes))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn kinds_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("f"), b"12345").unwrap();
        std::fs::create_dir(p("d")).unwrap();
        mkfifo(&p("fifo"));
        std::os::unix::fs::symlink("nowhere", p("dangling")).unwrap();
        std::os::unix::fs::symlink("loop", p("loop")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", p("zero")).unwrap();

        assert_eq!(classify(&p("f")).unwrap(), Kind::File(5));
        assert_eq!(classify(&p("d")).unwrap(), Kind::Dir);
        assert_eq!(classify(&p("missing")).unwrap(), Kind::Missing);
        let e = classify(&p("fifo")).unwrap_err();
        assert!(e.to_string().ends_with("fifo` is a FIFO, not a file"), "{e}");
        let e = classify(&p("zero")).unwrap_err();
        assert!(
            e.to_string().ends_with("zero` is a character device, not a file"),
            "{e}"
        );
        let e = classify(&p("dangling")).unwrap_err();
        assert!(matches!(e, InputError::Dangling { .. }), "{e}");
        assert!(
            e.to_string().contains("its target `nowhere` does not exist"),
            "{e}"
        );
        let e = classify(&p("loop")).unwrap_err();
        assert!(matches!(e, InputError::LinkLoop { .. }), "{e}");

        let e = open_regular(&p("fifo")).unwrap_err();
        assert!(matches!(e, InputError::NotAFile { what: "a FIFO", .. }), "{e}");
        let e = read_capped(&p("d"), 10).unwrap_err();
        assert!(e.to_string().ends_with("d` is a directory, not a file"), "{e}");
        assert_eq!(read_capped(&p("missing"), 10).unwrap(), None);
        assert_eq!(read_capped(&p("f"), 5).unwrap().unwrap(), b"12345");
        let e = read_capped(&p("f"), 4).unwrap_err();
        assert!(matches!(e, InputError::TooLarge { cap: 4, .. }), "{e}");
        assert!(e.to_string().contains("larger than the 4-byte limit"), "{e}");
        let e = InputError::TooLarge {
            path: p("f"),
            cap: MAX_JSON_BYTES,
        };
        assert!(e.to_string().contains("larger than the 64 MiB limit"), "{e}");
        assert_eq!(cap_for("tokenizer.json"), MAX_TOKENIZER_BYTES);
        assert_eq!(cap_for("config.json"), MAX_JSON_BYTES);
    }

    #[test]
    fn reported_length_is_not_trusted() {
        // /proc files report length 0 but have contents: the cap still holds.
        let path = Path::new("/proc/self/status");
        if path.exists() {
            let e = read_capped(path, 8).unwrap_err();
            assert!(matches!(e, InputError::TooLarge { .. }), "{e}");
        }
    }
}
