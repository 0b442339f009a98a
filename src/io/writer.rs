//! Writing a Hugging Face model folder: streaming, sharded and atomic.
//!
//! Every tensor's size is known before the first byte is written, so the shards are
//! planned up front: each shard file starts with its complete header and tensor data is
//! then streamed after it, never holding a shard in memory. Everything is written into a
//! temporary folder beside the target and renamed into place only once complete and
//! synced, so a failed or interrupted run never leaves a folder that looks finished.
//!
//! Every output holds a [`MARKER_FILE`]; `--force` replaces only folders that hold one,
//! and [`check_output_target`] refuses places no output may replace (the current, the
//! script's, the home and the root folder, and folders above them; input models). An old
//! output is exchanged with the new one in one step where the file system can. The
//! temporary folders of the writers are registered so a signal handler can remove them
//! ([`remove_temporary_folders_before_exit`]), and a later run removes what a killed run
//! left ([`remove_leftovers`]).

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{json, Map, Value};

use crate::io::header::MAX_HEADER_BYTES;
use crate::io::DType;

/// Write buffer per open shard: large writes keep syscalls few on fast disks.
const BUF_BYTES: usize = 8 << 20;
const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
const CONFIG_FILE: &str = "config.json";

/// Everything to write, known before writing starts.
#[derive(Clone, Debug)]
pub struct OutputSpec {
    pub dir: PathBuf,
    /// A shard is closed when adding the next tensor would pass this; a tensor bigger
    /// than the limit gets a shard of its own.
    pub max_shard_bytes: u64,
    /// Name, dtype and shape of each tensor, in write order.
    pub tensors: Vec<(String, DType, Vec<usize>)>,
    /// Written as config.json; the caller has already set its dtype keys.
    pub config: Option<Map<String, Value>>,
    /// (file name in the output, source path): byte copies such as tokenizer files.
    pub copied_files: Vec<(String, PathBuf)>,
    /// (file name in the output, contents), e.g. README.md.
    pub generated_files: Vec<(String, Contents)>,
    /// Replace an existing non-empty target.
    pub force: bool,
    /// Input model roots and files, which the output must never overwrite or delete.
    pub protected: Vec<PathBuf>,
}

/// A generated file's contents, in parts written one after another. A part every output
/// shares (the script in each model card, the imported YAML) is held once, however many
/// outputs a script saves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents(Vec<Arc<[u8]>>);

impl Contents {
    pub fn from_parts(parts: impl IntoIterator<Item = Arc<[u8]>>) -> Contents {
        Contents(parts.into_iter().collect())
    }

    pub fn parts(&self) -> &[Arc<[u8]>] {
        &self.0
    }

    pub fn len(&self) -> u64 {
        self.0.iter().map(|p| p.len() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole file, for callers that read it back.
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.concat()
    }
}

impl From<Vec<u8>> for Contents {
    fn from(bytes: Vec<u8>) -> Contents {
        Contents(vec![bytes.into()])
    }
}

impl From<String> for Contents {
    fn from(text: String) -> Contents {
        text.into_bytes().into()
    }
}

/// What [`ModelWriter::finish`] put in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenModel {
    pub dir: PathBuf,
    /// File names in the folder, in the order they were written.
    pub files: Vec<String>,
    /// Sum of all tensors' data bytes.
    pub tensor_bytes: u64,
    /// Sum of all files' bytes (headers, index, config and copies included).
    pub bytes_written: u64,
}

/// Why the output could not be written. Errors that say "a bug in mergec" mean the
/// caller broke the writer's protocol.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("output folder `{}` exists and is not empty", dir.display())]
    NotEmpty { dir: PathBuf },
    #[error("output path `{}` exists and is {what}, not a folder", dir.display())]
    NotAFolder { dir: PathBuf, what: &'static str },
    #[error("output folder `{}` is the input model `{}`", dir.display(), input.display())]
    SameAsInput { dir: PathBuf, input: PathBuf },
    #[error("output folder `{}` is inside the input model `{}`", dir.display(), input.display())]
    InsideInput { dir: PathBuf, input: PathBuf },
    #[error("output folder `{}` contains the input model `{}`, which replacing it would delete", dir.display(), input.display())]
    ContainsInput { dir: PathBuf, input: PathBuf },
    #[error("output path `{}` does not name a folder that can be created", dir.display())]
    BadTarget { dir: PathBuf },
    #[error("output folder `{}` is the root folder", dir.display())]
    Root { dir: PathBuf },
    #[error("output folder `{}` {} the home folder{}", dir.display(), if *contains { "contains" } else { "is" }, if *contains { format!(" `{}`", home.display()) } else { String::new() })]
    Home {
        dir: PathBuf,
        home: PathBuf,
        contains: bool,
    },
    #[error("output folder `{}` {} the current folder", dir.display(), if *contains { "contains" } else { "is" })]
    WorkingFolder { dir: PathBuf, contains: bool },
    #[error("output folder `{}` {} {what}{}", dir.display(), if *contains { "contains" } else { "is" }, if *contains { format!(" `{}`", script.display()) } else { String::new() })]
    HoldsScript {
        dir: PathBuf,
        script: PathBuf,
        what: &'static str,
        contains: bool,
    },
    #[error("output folder `{}` exists and was not written by mergec", dir.display())]
    NotMergecOutput { dir: PathBuf },
    #[error(
        "output folder name `{}` is {bytes} bytes long, over the {NAME_MAX}-byte limit of file names",
        shortened(name)
    )]
    NameTooLong {
        dir: PathBuf,
        name: String,
        bytes: usize,
    },
    #[error("no space left on device while writing `{}`", path.display())]
    NoSpace { path: PathBuf, source: std::io::Error },
    #[error("cannot write `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot copy `{}` to `{}`: {source}", from.display(), to.display())]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor `{got}` written to `{}` out of order: `{expected}` comes next (a bug in mergec)", path.display())]
    OutOfOrder {
        path: PathBuf,
        expected: String,
        got: String,
    },
    #[error("tensor `{name}` written to `{}` after all its tensors were written (a bug in mergec)", path.display())]
    Extra { path: PathBuf, name: String },
    #[error("tensor `{name}` written to `{}` with {got} bytes but it has {expected} (a bug in mergec)", path.display())]
    WrongLength {
        path: PathBuf,
        name: String,
        expected: u64,
        got: u64,
    },
    #[error("{what} while writing `{}` (a bug in mergec)", path.display())]
    Misuse { path: PathBuf, what: &'static str },
    #[error("`{}` finished with {written} of {total} tensors written; `{next}` is missing (a bug in mergec)", dir.display())]
    Unfinished {
        dir: PathBuf,
        written: usize,
        total: usize,
        next: String,
    },
    #[error("cannot write `{}`: {reason} (a bug in mergec)", dir.display())]
    BadSpec { dir: PathBuf, reason: String },
    #[error("writing `{}` already failed; nothing more can be written", dir.display())]
    Failed { dir: PathBuf },
}

/// A long name's first and last characters, for messages.
fn shortened(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= 40 {
        return name.to_owned();
    }
    let head: String = chars[..20].iter().collect();
    let tail: String = chars[chars.len() - 12..].iter().collect();
    format!("{head}...{tail}")
}

fn io_error(path: PathBuf, source: std::io::Error) -> WriteError {
    if matches!(source.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded) {
        WriteError::NoSpace { path, source }
    } else {
        WriteError::Io { path, source }
    }
}

/// The file mergec writes in every output folder. `--force` replaces a non-empty folder
/// only when it holds this file, and a later run removes a leftover temporary folder of an
/// interrupted run only when it holds it.
pub const MARKER_FILE: &str = ".mergec";

/// The first line of [`MARKER_FILE`] starts with this, then the version that wrote it.
const MARKER_PREFIX: &str = "mergec ";

/// The longest file name most file systems take (ext4, XFS, Btrfs, APFS, NTFS), in bytes.
pub const NAME_MAX: usize = 255;

/// The marker's contents: a version line, and what the file is for.
fn marker_text() -> String {
    format!(
        "{MARKER_PREFIX}{}\nThis folder was written by mergec: `mergec run --force` may replace it. Delete this file to keep --force from replacing it.\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Whether `dir` is a folder mergec wrote: it holds a [`MARKER_FILE`] (a plain file, not a
/// link) whose first line names mergec. The model card alone is no proof.
pub fn is_mergec_output(dir: &Path) -> bool {
    let marker = dir.join(MARKER_FILE);
    let plain = fs::symlink_metadata(&marker).is_ok_and(|m| m.file_type().is_file());
    if !plain {
        return false;
    }
    let mut head = [0u8; 64];
    let n = File::open(&marker)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .unwrap_or(0);
    head[..n].starts_with(MARKER_PREFIX.as_bytes())
}

/// Paths no output may be or contain besides the built-in ones: the script or mergekit
/// config being run, registered by the command line with [`keep`].
static KEPT: Mutex<Vec<(PathBuf, &'static str)>> = Mutex::new(Vec::new());

/// Registers `path` (a file or folder, described as `what`, e.g. "the script") as a place
/// no output folder may be or contain, even with `--force`: checked by every later
/// [`check_output_target`] of this process.
pub fn keep(path: &Path, what: &'static str) {
    lock(&KEPT).push((path.to_path_buf(), what));
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Checks that `dir` can be written (used at check time, before anything runs, and again
/// when writing):
///
/// - it is not the root folder, the home folder, the current folder, the script's folder
///   (`script_dir`, and anything registered with [`keep`]), nor a folder above one of them;
/// - it neither is nor is inside nor contains any `protected` path (the input models);
/// - no part of its path is longer than [`NAME_MAX`] bytes;
/// - it does not exist, or is an empty folder, or (with `force`) a folder mergec wrote; a
///   non-empty folder mergec did not write is never replaced.
pub fn check_output_target(
    dir: &Path,
    force: bool,
    protected: &[PathBuf],
    script_dir: Option<&Path>,
) -> Result<(), WriteError> {
    let resolved_dir = resolve_target(dir)?;
    let target = comparable(&resolved_dir);
    let owned = || dir.to_path_buf();
    // Refused even when the place is empty or does not exist yet (a home folder can be
    // empty): an output there would be a mistake, and --force would delete it.
    if target.parent().is_none() {
        return Err(WriteError::Root { dir: owned() });
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        let home = PathBuf::from(home);
        let resolved = comparable(&home);
        if resolved.starts_with(&target) {
            return Err(WriteError::Home {
                dir: owned(),
                home,
                contains: resolved != target,
            });
        }
    }
    if let Ok(cwd) = std::env::current_dir() {
        let resolved = comparable(&cwd);
        if resolved.starts_with(&target) {
            return Err(WriteError::WorkingFolder {
                dir: owned(),
                contains: resolved != target,
            });
        }
    }
    let kept = lock(&KEPT).clone();
    let script = script_dir.map(|d| (d.to_path_buf(), "the script's folder"));
    for (path, what) in script.into_iter().chain(kept) {
        let resolved = comparable(&path);
        if resolved.starts_with(&target) {
            return Err(WriteError::HoldsScript {
                dir: owned(),
                script: path,
                what,
                contains: resolved != target,
            });
        }
    }
    for input in protected.iter().filter(|p| !p.as_os_str().is_empty()) {
        let resolved = comparable(input);
        let err = if target == resolved {
            WriteError::SameAsInput {
                dir: owned(),
                input: input.clone(),
            }
        } else if target.starts_with(&resolved) {
            WriteError::InsideInput {
                dir: owned(),
                input: input.clone(),
            }
        } else if resolved.starts_with(&target) {
            WriteError::ContainsInput {
                dir: owned(),
                input: input.clone(),
            }
        } else {
            continue;
        };
        return Err(err);
    }
    if let Some(name) = dir
        .components()
        .map(|c| c.as_os_str())
        .find(|c| c.len() > NAME_MAX)
    {
        return Err(WriteError::NameTooLong {
            dir: owned(),
            name: name.to_string_lossy().into_owned(),
            bytes: name.len(),
        });
    }
    // From here on the folder as the file system finds it; messages name it as given.
    let dir = resolved_dir.as_path();
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(owned(), e)),
    };
    let not_a_folder = |what| WriteError::NotAFolder { dir: owned(), what };
    let kind = meta.file_type();
    if kind.is_symlink() {
        Err(not_a_folder("a symbolic link"))
    } else if kind.is_file() {
        Err(not_a_folder("a file"))
    } else if !kind.is_dir() {
        Err(not_a_folder("a special file"))
    } else if is_empty_dir(dir)? {
        Ok(())
    } else if !is_mergec_output(dir) {
        Err(WriteError::NotMergecOutput { dir: owned() })
    } else if !force {
        Err(WriteError::NotEmpty { dir: owned() })
    } else {
        Ok(())
    }
}

/// Where the output folder `dir` is, as the file system resolves it: the deepest part of its
/// parent that exists, canonicalized (links and `..` followed as the kernel follows them),
/// the names below it that do not exist yet, then the folder's own name, unresolved (a
/// link there is refused, not followed). A `..` below a folder that does not exist means
/// nothing to the file system, so it is refused: the place checked is the place written.
fn resolve_target(dir: &Path) -> Result<PathBuf, WriteError> {
    let bad = || WriteError::BadTarget {
        dir: dir.to_path_buf(),
    };
    let abs = std::path::absolute(dir).map_err(|e| io_error(dir.to_path_buf(), e))?;
    let (parent, name) = match abs.components().next_back() {
        Some(Component::Normal(name)) => (abs.parent().ok_or_else(bad)?, name),
        // `out/..` or `out/.`: a folder only when it exists.
        _ => return fs::canonicalize(&abs).map_err(|_| bad()),
    };
    let mut missing = Vec::new();
    let mut existing = parent;
    let base = loop {
        if let Ok(resolved) = fs::canonicalize(existing) {
            break resolved;
        }
        let (Some(last), Some(up)) = (existing.components().next_back(), existing.parent()) else {
            return Err(bad());
        };
        match last {
            Component::Normal(n) => missing.push(n),
            Component::CurDir => {}
            _ => return Err(bad()),
        }
        existing = up;
    };
    let mut target = base;
    target.extend(missing.iter().rev());
    target.push(name);
    Ok(target)
}

fn is_empty_dir(dir: &Path) -> Result<bool, WriteError> {
    let mut entries = fs::read_dir(dir).map_err(|e| io_error(dir.to_path_buf(), e))?;
    Ok(entries.next().is_none())
}

/// Removes `.` and `..` components without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push(c);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// An absolute, symlink-free form of `path` for comparing places, also for paths that do
/// not exist yet (their deepest existing ancestor is canonicalized).
pub fn comparable_path(path: &Path) -> PathBuf {
    comparable(path)
}

/// An absolute, symlink-free form of `path` for comparing places, also for paths that do
/// not exist yet (their deepest existing ancestor is canonicalized).
fn comparable(path: &Path) -> PathBuf {
    if let Ok(c) = fs::canonicalize(path) {
        return c;
    }
    let abs = normalize(&std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()));
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    while let (Some(name), Some(parent)) = (cur.file_name(), cur.parent()) {
        rest.push(name);
        cur = parent;
        if let Ok(mut c) = fs::canonicalize(cur) {
            c.extend(rest.iter().rev());
            return c;
        }
    }
    abs
}

/// One tensor's place in the plan.
#[derive(Debug)]
struct Planned {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: u64,
    shard: usize,
    /// Offset within its shard's data section.
    begin: u64,
}

/// A shard: a range of planned tensors.
#[derive(Debug)]
struct Shard {
    name: String,
    first: usize,
    end: usize,
}

#[derive(Debug)]
struct OpenShard {
    index: usize,
    out: BufWriter<File>,
}

/// Writes one output model folder. Drop it without [`finish`](ModelWriter::finish) and
/// the partial output is removed.
#[derive(Debug)]
pub struct ModelWriter {
    /// The target as given, for messages and the result.
    dir: PathBuf,
    /// Absolute target.
    target: PathBuf,
    tmp: PathBuf,
    /// Removes `tmp` if an input file faults under the run (SIGBUS, `io::sigbus`).
    _fault_cleanup: crate::io::sigbus::FaultCleanup,
    tensors: Vec<Planned>,
    shards: Vec<Shard>,
    config: Option<Map<String, Value>>,
    copied_files: Vec<(String, PathBuf)>,
    generated_files: Vec<(String, Contents)>,
    force: bool,
    protected: Vec<PathBuf>,
    current: Option<OpenShard>,
    /// Index of the next tensor to begin (or the one begun).
    next: usize,
    /// Bytes written so far of the tensor begun, if one is.
    in_tensor: Option<u64>,
    tensor_bytes: u64,
    bytes_written: u64,
    files: Vec<String>,
    failed: bool,
    finished: bool,
}

impl ModelWriter {
    /// Checks the target, plans the shards, and creates the temporary folder with the
    /// first shard's header.
    pub fn create(spec: OutputSpec) -> Result<ModelWriter, WriteError> {
        ModelWriter::create_named(spec, SINGLE_FILE)
    }

    /// [`create`](ModelWriter::create) with the weights in `single_file` when they fit in
    /// one shard (e.g. `adapter_model.safetensors` for a PEFT adapter).
    pub fn create_named(spec: OutputSpec, single_file: &str) -> Result<ModelWriter, WriteError> {
        check_output_target(&spec.dir, spec.force, &spec.protected, None)?;
        let bad = |reason: String| WriteError::BadSpec {
            dir: spec.dir.clone(),
            reason,
        };
        let target = resolve_target(&spec.dir)?;
        let (Some(name), Some(parent)) = (target.file_name(), target.parent()) else {
            return Err(WriteError::BadTarget { dir: spec.dir });
        };
        let tmp = scratch_path(parent, name, Scratch::Tmp, std::process::id());

        let (tensors, shards, tensor_bytes) =
            plan(spec.tensors, spec.max_shard_bytes, single_file).map_err(bad)?;

        // Output file names must be plain, distinct, and not collide with what we write.
        let mut names: HashSet<&str> = shards.iter().map(|s| s.name.as_str()).collect();
        names.insert(INDEX_FILE);
        if spec.config.is_some() {
            names.insert(CONFIG_FILE);
        }
        let extra = spec
            .copied_files
            .iter()
            .map(|(n, _)| n)
            .chain(spec.generated_files.iter().map(|(n, _)| n));
        for file in extra {
            let plain = matches!(
                Path::new(file).components().collect::<Vec<_>>().as_slice(),
                [Component::Normal(_)]
            );
            if !plain {
                return Err(bad(format!("output file name `{file}` is not a plain file name")));
            }
            if !names.insert(file) {
                return Err(bad(format!("output file `{file}` is written twice")));
            }
        }

        fs::create_dir_all(parent).map_err(|e| io_error(parent.to_path_buf(), e))?;
        {
            // Created and registered together: a signal's cleanup either sees the folder
            // registered or runs before it exists.
            let mut registered = lock(&SCRATCH);
            // A leftover of a crashed run that had the same process id.
            if fs::symlink_metadata(&tmp).is_ok() {
                if !is_scratch_leftover(&tmp) {
                    return Err(io_error(tmp, ErrorKind::AlreadyExists.into()));
                }
                fs::remove_dir_all(&tmp).map_err(|e| io_error(tmp.clone(), e))?;
            }
            fs::create_dir(&tmp).map_err(|e| io_error(tmp.clone(), e))?;
            registered.push(tmp.clone());
        }
        // The marker goes in first, so a run killed at any later point leaves a folder the
        // next run can prove is a leftover of mergec's.
        let marker = tmp.join(MARKER_FILE);
        if let Err(e) = File::create_new(&marker).and_then(|mut f| {
            f.write_all(marker_text().as_bytes())?;
            f.sync_all()
        }) {
            let _ = fs::remove_dir_all(&tmp);
            unregister(&[&tmp]);
            return Err(io_error(marker, e));
        }

        let mut writer = ModelWriter {
            dir: spec.dir,
            target,
            _fault_cleanup: crate::io::sigbus::remove_on_fault(&tmp),
            tmp,
            tensors,
            shards,
            config: spec.config,
            copied_files: spec.copied_files,
            generated_files: spec.generated_files,
            force: spec.force,
            protected: spec.protected,
            current: None,
            next: 0,
            in_tensor: None,
            tensor_bytes,
            bytes_written: 0,
            files: Vec::new(),
            failed: false,
            finished: false,
        };
        // From here on, Drop removes the temporary folder if anything fails.
        writer.open_shard(0)?;
        Ok(writer)
    }

    /// The shard file names: `model.safetensors`, or `model-0000i-of-0000N.safetensors`.
    pub fn shard_names(&self) -> Vec<String> {
        self.shards.iter().map(|s| s.name.clone()).collect()
    }

    /// Writes a whole tensor: the next one in spec order, with exactly its byte length.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), WriteError> {
        self.usable()?;
        if let Some(t) = self.tensors.get(self.next) {
            if t.name == name && data.len() as u64 != t.bytes {
                return Err(WriteError::WrongLength {
                    path: self.final_shard_path(t.shard),
                    name: name.to_owned(),
                    expected: t.bytes,
                    got: data.len() as u64,
                });
            }
        }
        self.begin_tensor(name)?;
        self.write_bytes(data)?;
        self.end_tensor()
    }

    /// Starts the next tensor in spec order; its bytes follow in [`write_bytes`] chunks.
    ///
    /// [`write_bytes`]: ModelWriter::write_bytes
    pub fn begin_tensor(&mut self, name: &str) -> Result<(), WriteError> {
        self.usable()?;
        if self.in_tensor.is_some() {
            return Err(WriteError::Misuse {
                path: self.dir.clone(),
                what: "a tensor was begun before the previous one ended",
            });
        }
        let Some(t) = self.tensors.get(self.next) else {
            return Err(WriteError::Extra {
                path: self.dir.clone(),
                name: name.to_owned(),
            });
        };
        if t.name != name {
            return Err(WriteError::OutOfOrder {
                path: self.dir.clone(),
                expected: t.name.clone(),
                got: name.to_owned(),
            });
        }
        let shard = t.shard;
        if self.current.as_ref().map(|c| c.index) != Some(shard) {
            self.close_shard()?;
            self.open_shard(shard)?;
        }
        self.in_tensor = Some(0);
        Ok(())
    }

    /// Appends bytes to the tensor begun.
    pub fn write_bytes(&mut self, data: &[u8]) -> Result<(), WriteError> {
        self.usable()?;
        let (Some(done), Some(t)) = (self.in_tensor, self.tensors.get(self.next)) else {
            return Err(WriteError::Misuse {
                path: self.dir.clone(),
                what: "bytes were written with no tensor begun",
            });
        };
        let got = done.saturating_add(data.len() as u64);
        if got > t.bytes {
            return Err(WriteError::WrongLength {
                path: self.final_shard_path(t.shard),
                name: t.name.clone(),
                expected: t.bytes,
                got,
            });
        }
        let shard = t.shard;
        let result = match self.current.as_mut() {
            Some(open) => open.out.write_all(data),
            None => {
                return Err(WriteError::Misuse {
                    path: self.dir.clone(),
                    what: "bytes were written with no shard open",
                })
            }
        };
        if let Err(e) = result {
            self.failed = true;
            return Err(io_error(self.final_shard_path(shard), e));
        }
        self.in_tensor = Some(got);
        Ok(())
    }

    /// Ends the tensor begun; its bytes must add up to its length.
    pub fn end_tensor(&mut self) -> Result<(), WriteError> {
        self.usable()?;
        let (Some(done), Some(t)) = (self.in_tensor, self.tensors.get(self.next)) else {
            return Err(WriteError::Misuse {
                path: self.dir.clone(),
                what: "a tensor was ended that was never begun",
            });
        };
        if done != t.bytes {
            return Err(WriteError::WrongLength {
                path: self.final_shard_path(t.shard),
                name: t.name.clone(),
                expected: t.bytes,
                got: done,
            });
        }
        self.in_tensor = None;
        self.next += 1;
        Ok(())
    }

    /// Writes the index, config and other files, syncs everything, and moves the folder
    /// into place (replacing the old target only with `force`, deleting it last).
    pub fn finish(mut self) -> Result<WrittenModel, WriteError> {
        self.usable()?;
        if self.in_tensor.is_some() || self.next < self.tensors.len() {
            return Err(WriteError::Unfinished {
                dir: self.dir.clone(),
                written: self.next,
                total: self.tensors.len(),
                next: self
                    .tensors
                    .get(self.next)
                    .map(|t| t.name.clone())
                    .unwrap_or_default(),
            });
        }
        self.close_shard()?;

        if self.shards.len() > 1 {
            let mut weight_map = BTreeMap::new();
            for t in &self.tensors {
                let shard = self.shards.get(t.shard).map(|s| s.name.as_str());
                weight_map.insert(t.name.as_str(), shard.unwrap_or_default());
            }
            let index = json!({
                "metadata": {"total_size": self.tensor_bytes},
                "weight_map": weight_map,
            });
            let text = pretty(&index, &self.dir)?;
            self.write_file(INDEX_FILE, &text.into())?;
        }
        if let Some(config) = self.config.take() {
            let text = pretty(&Value::Object(config), &self.dir)?;
            self.write_file(CONFIG_FILE, &text.into())?;
        }
        for (name, from) in std::mem::take(&mut self.copied_files) {
            self.copy_file(&name, &from)?;
        }
        for (name, bytes) in std::mem::take(&mut self.generated_files) {
            self.write_file(&name, &bytes)?;
        }
        sync_dir(&self.tmp).map_err(|e| io_error(self.tmp.clone(), e))?;

        // The target may have changed since create.
        check_output_target(&self.dir, self.force, &self.protected, None)?;
        let old = self.install()?;
        self.finished = true;
        // The new output is in place; the old one (if any) is only wasted space now, and
        // a leftover of it is removed by a later run.
        if let Some(old) = old {
            let _ = fs::remove_dir_all(&old);
            unregister(&[&old]);
        }
        // Best effort: the rename is done and every file is synced; a failure to sync the
        // parent folder only risks the rename itself on a crash.
        if let Some(parent) = self.target.parent() {
            let _ = sync_dir(parent);
        }
        Ok(WrittenModel {
            dir: self.dir.clone(),
            files: std::mem::take(&mut self.files),
            tensor_bytes: self.tensor_bytes,
            bytes_written: self.bytes_written,
        })
    }

    fn usable(&self) -> Result<(), WriteError> {
        if self.failed {
            Err(WriteError::Failed {
                dir: self.dir.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// Where a shard will be once finished: the path users see in messages.
    fn final_shard_path(&self, shard: usize) -> PathBuf {
        match self.shards.get(shard) {
            Some(s) => self.dir.join(&s.name),
            None => self.dir.clone(),
        }
    }

    fn open_shard(&mut self, index: usize) -> Result<(), WriteError> {
        let Some(shard) = self.shards.get(index) else {
            return Err(WriteError::Misuse {
                path: self.dir.clone(),
                what: "a shard past the plan was opened",
            });
        };
        let final_path = self.dir.join(&shard.name);
        let planned = self.tensors.get(shard.first..shard.end).unwrap_or(&[]);
        let header = shard_header(planned).map_err(|reason| WriteError::BadSpec {
            dir: self.dir.clone(),
            reason,
        })?;
        let result = File::create_new(self.tmp.join(&shard.name)).and_then(|file| {
            let mut out = BufWriter::with_capacity(BUF_BYTES, file);
            out.write_all(&header)?;
            Ok(out)
        });
        match result {
            Ok(out) => {
                self.bytes_written += header.len() as u64;
                self.files.push(shard.name.clone());
                self.current = Some(OpenShard { index, out });
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(io_error(final_path, e))
            }
        }
    }

    /// Flushes and syncs the open shard, if any.
    fn close_shard(&mut self) -> Result<(), WriteError> {
        let Some(open) = self.current.take() else {
            return Ok(());
        };
        let path = self.final_shard_path(open.index);
        let data: u64 = self
            .shards
            .get(open.index)
            .and_then(|s| self.tensors.get(s.first..s.end))
            .unwrap_or(&[])
            .iter()
            .map(|t| t.bytes)
            .sum();
        let result = open
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all());
        if let Err(e) = result {
            self.failed = true;
            return Err(io_error(path, e));
        }
        self.bytes_written += data;
        Ok(())
    }

    fn write_file(&mut self, name: &str, contents: &Contents) -> Result<(), WriteError> {
        let result = File::create_new(self.tmp.join(name)).and_then(|mut file| {
            for part in contents.parts() {
                file.write_all(part)?;
            }
            file.sync_all()
        });
        if let Err(e) = result {
            self.failed = true;
            return Err(io_error(self.dir.join(name), e));
        }
        self.bytes_written += contents.len();
        self.files.push(name.to_owned());
        Ok(())
    }

    fn copy_file(&mut self, name: &str, from: &Path) -> Result<(), WriteError> {
        let to = self.tmp.join(name);
        let result = fs::copy(from, &to).and_then(|n| {
            File::open(&to)?.sync_all()?;
            Ok(n)
        });
        match result {
            Ok(n) => {
                self.bytes_written += n;
                self.files.push(name.to_owned());
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                let to = self.dir.join(name);
                if matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded) {
                    Err(WriteError::NoSpace { path: to, source: e })
                } else {
                    Err(WriteError::Copy {
                        from: from.to_path_buf(),
                        to,
                        source: e,
                    })
                }
            }
        }
    }

    /// Puts the temporary folder in place of the target; returns where the old target
    /// now is, to be deleted, if there was one. At no instant is the target path missing
    /// where the file system can exchange two folders atomically (Linux); elsewhere the old
    /// target is moved aside first, and moved back if the second rename fails.
    fn install(&mut self) -> Result<Option<PathBuf>, WriteError> {
        let (Some(name), Some(parent)) = (self.target.file_name(), self.target.parent()) else {
            return Err(WriteError::BadTarget {
                dir: self.dir.clone(),
            });
        };
        let aside = scratch_path(parent, name, Scratch::Old, std::process::id());
        // Held across the renames: a signal's cleanup waits for them, then removes
        // whichever registered folder holds the old output.
        let mut registered = lock(&SCRATCH);
        let result = put_in_place(&self.tmp, &self.target, &aside, exchange);
        match &result {
            Ok(Some(old)) if *old == aside => {
                registered.retain(|p| *p != self.tmp);
                registered.push(aside.clone());
            }
            Ok(None) => registered.retain(|p| *p != self.tmp),
            _ => {}
        }
        drop(registered);
        result.map_err(|e| io_error(self.target.clone(), e))
    }
}

/// Moves `tmp` to `target`. With an existing `target`, first tries `exchange`; where the
/// file system cannot, renames `target` to `aside` and `tmp` to `target`. Returns where
/// the old target is now: `tmp` after an exchange, `aside` after the two renames.
fn put_in_place(
    tmp: &Path,
    target: &Path,
    aside: &Path,
    exchange: fn(&Path, &Path) -> std::io::Result<bool>,
) -> std::io::Result<Option<PathBuf>> {
    match fs::symlink_metadata(target) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return fs::rename(tmp, target).map(|()| None),
        Err(e) => return Err(e),
    }
    if exchange(tmp, target)? {
        return Ok(Some(tmp.to_path_buf()));
    }
    if fs::symlink_metadata(aside).is_ok() {
        fs::remove_dir_all(aside)?;
    }
    fs::rename(target, aside)?;
    if let Err(e) = fs::rename(tmp, target) {
        let _ = fs::rename(aside, target);
        return Err(e);
    }
    Ok(Some(aside.to_path_buf()))
}

/// Swaps two existing paths in one step (`renameat2` with `RENAME_EXCHANGE`). `Ok(false)`
/// when the kernel or file system cannot (old kernels, some network file systems).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both pointers are NUL-terminated strings that outlive the call; the
    // syscall reads them and nothing else.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<bool> {
    Ok(false)
}

impl Drop for ModelWriter {
    fn drop(&mut self) {
        if let Some(open) = self.current.take() {
            // Discard buffered bytes instead of flushing them into a file about to go.
            let _ = open.out.into_parts();
        }
        if !self.finished {
            let _ = fs::remove_dir_all(&self.tmp);
            unregister(&[&self.tmp]);
        }
    }
}

/// What a scratch folder beside an output is: the output being written, or (where folders
/// cannot be exchanged) the old output moved aside.
#[derive(Clone, Copy)]
enum Scratch {
    Tmp,
    Old,
}

/// Digits of the largest process id.
const PID_DIGITS: usize = 10;

/// A scratch folder's name up to its process id: `.NAME.mergec-tmp-`, or, where that
/// would take the name past [`NAME_MAX`], `.mergec-tmp-HASH-` with a hash of NAME, so a
/// legal output name never gets an illegal scratch name.
fn scratch_prefix(name: &OsStr, kind: Scratch) -> OsString {
    let tag = match kind {
        Scratch::Tmp => "tmp",
        Scratch::Old => "old",
    };
    let bytes = name.as_encoded_bytes();
    let mut out = OsString::from(".");
    if 1 + bytes.len() + ".mergec-".len() + tag.len() + 1 + PID_DIGITS <= NAME_MAX {
        out.push(name);
        out.push(format!(".mergec-{tag}-"));
    } else {
        out.push(format!("mergec-{tag}-{:016x}-", fnv1a(bytes)));
    }
    out
}

fn scratch_path(parent: &Path, name: &OsStr, kind: Scratch, pid: u32) -> PathBuf {
    let mut file = scratch_prefix(name, kind);
    file.push(pid.to_string());
    parent.join(file)
}

/// 64-bit FNV-1a: stable across versions and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether the scratch folder at `path` is one mergec made: an empty folder, or one with
/// the marker (written first).
fn is_scratch_leftover(path: &Path) -> bool {
    let is_dir = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    is_dir && (is_mergec_output(path) || is_empty_dir(path).unwrap_or(false))
}

/// The scratch folders this process's writers have on disk now.
static SCRATCH: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn unregister(paths: &[&Path]) {
    lock(&SCRATCH).retain(|p| !paths.contains(&p.as_path()));
}

/// Removes every scratch folder of this process's writers (unfinished outputs, and old
/// outputs being deleted) and returns the ones removed: for a process about to exit on a
/// signal. It never releases the registry, so from then on no writer of this process
/// creates, installs or registers a folder; the caller must exit right after.
pub fn remove_temporary_folders_before_exit() -> Vec<PathBuf> {
    let registered = lock(&SCRATCH);
    let mut removed = Vec::new();
    for path in registered.iter() {
        // A writer thread may add a file while the folder is being emptied: try again.
        for _ in 0..20 {
            match fs::remove_dir_all(path) {
                Ok(()) => {
                    removed.push(path.clone());
                    break;
                }
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
    }
    std::mem::forget(registered);
    removed
}

/// A leftover of an interrupted run that [`remove_leftovers`] dealt with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftover {
    pub path: PathBuf,
    /// Set when the leftover was the previous output, moved aside by a run killed before
    /// it put the new one in place, and was moved back to the output path.
    pub restored_to: Option<PathBuf>,
}

/// Removes the scratch folders that interrupted runs of mergec left beside output `dir`.
/// A folder is removed only when it is provably such a leftover: its name is the scratch
/// name of this output with the id of a process that no longer runs, and it is empty or
/// holds mergec's marker. An old output moved aside while the output path is empty is
/// moved back instead.
pub fn remove_leftovers(dir: &Path) -> Vec<Leftover> {
    let Ok(target) = resolve_target(dir) else {
        return Vec::new();
    };
    let (Some(name), Some(parent)) = (target.file_name(), target.parent()) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let prefixes = [Scratch::Tmp, Scratch::Old].map(|k| scratch_prefix(name, k));
    let own = std::process::id();
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file = entry.file_name();
        let pid = prefixes
            .iter()
            .find_map(|p| file.as_encoded_bytes().strip_prefix(p.as_encoded_bytes()))
            .filter(|digits| !digits.is_empty() && digits.len() <= PID_DIGITS)
            .filter(|digits| digits.iter().all(u8::is_ascii_digit))
            .and_then(|digits| std::str::from_utf8(digits).ok()?.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        let path = entry.path();
        if pid == own || process_alive(pid) || !is_scratch_leftover(&path) {
            continue;
        }
        let moved_aside = file
            .as_encoded_bytes()
            .starts_with(prefixes[1].as_encoded_bytes());
        if moved_aside
            && fs::symlink_metadata(&target).is_err_and(|e| e.kind() == ErrorKind::NotFound)
            && fs::rename(&path, &target).is_ok()
        {
            removed.push(Leftover {
                path,
                restored_to: Some(target.clone()),
            });
        } else if fs::remove_dir_all(&path).is_ok() {
            removed.push(Leftover {
                path,
                restored_to: None,
            });
        }
    }
    removed.sort_by(|a, b| a.path.cmp(&b.path));
    removed
}

/// Whether process `pid` may still run (when unsure: yes).
#[cfg(unix)]
#[allow(unsafe_code)]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(not(unix))]
fn process_alive(_: u32) -> bool {
    true
}

type Plan = (Vec<Planned>, Vec<Shard>, u64);

/// Assigns tensors to shards: a shard is closed when the next tensor would take it past
/// `max_shard_bytes`.
fn plan(
    tensors: Vec<(String, DType, Vec<usize>)>,
    max_shard_bytes: u64,
    single_file: &str,
) -> Result<Plan, String> {
    let mut seen = HashSet::new();
    let mut planned = Vec::with_capacity(tensors.len());
    let mut shards: Vec<Shard> = Vec::new();
    let mut shard_bytes = 0u64;
    let mut total = 0u64;
    for (i, (name, dtype, shape)) in tensors.into_iter().enumerate() {
        if name.is_empty() || name == "__metadata__" {
            return Err(format!("`{name}` is not a valid tensor name"));
        }
        if !seen.insert(name.clone()) {
            return Err(format!("tensor `{name}` is listed twice"));
        }
        let bytes = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(dtype.size_bytes() as u64))
            .ok_or_else(|| format!("tensor `{name}` of shape {shape:?} is too large"))?;
        total = total
            .checked_add(bytes)
            .ok_or_else(|| "the tensors add up to more than 2^64 bytes".to_owned())?;
        let start_new = match shards.last() {
            None => true,
            Some(s) => s.end > s.first && shard_bytes.saturating_add(bytes) > max_shard_bytes,
        };
        if start_new {
            shards.push(Shard {
                name: String::new(),
                first: i,
                end: i,
            });
            shard_bytes = 0;
        }
        let shard = shards.len() - 1;
        if let Some(s) = shards.last_mut() {
            s.end = i + 1;
        }
        planned.push(Planned {
            name,
            dtype,
            shape,
            bytes,
            shard,
            begin: shard_bytes,
        });
        shard_bytes += bytes;
    }
    if shards.is_empty() {
        shards.push(Shard {
            name: String::new(),
            first: 0,
            end: 0,
        });
    }
    let n = shards.len();
    for (i, s) in shards.iter_mut().enumerate() {
        s.name = if n == 1 {
            single_file.to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
    }
    Ok((planned, shards, total))
}

/// The 8-byte length and JSON header of one shard, padded with spaces to a multiple of 8.
fn shard_header(tensors: &[Planned]) -> Result<Vec<u8>, String> {
    let mut map = Map::new();
    map.insert("__metadata__".to_owned(), json!({"format": "pt"}));
    for t in tensors {
        map.insert(
            t.name.clone(),
            json!({
                "dtype": t.dtype.safetensors_name(),
                "shape": t.shape,
                "data_offsets": [t.begin, t.begin + t.bytes],
            }),
        );
    }
    let mut json = serde_json::to_vec(&Value::Object(map)).map_err(|e| e.to_string())?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let n = json.len() as u64;
    if n > MAX_HEADER_BYTES {
        return Err(format!(
            "a shard header would be {n} bytes, over the {MAX_HEADER_BYTES}-byte limit"
        ));
    }
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Pretty JSON with a trailing newline, as transformers writes it.
fn pretty(value: &Value, dir: &Path) -> Result<Vec<u8>, WriteError> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| WriteError::BadSpec {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    text.push(b'\n');
    Ok(text)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::model::load_model;
    use crate::io::TensorReader;
    use safetensors::SafeTensors;

    fn spec(dir: &Path, tensors: &[(&str, DType, &[usize])], max: u64) -> OutputSpec {
        OutputSpec {
            dir: dir.to_path_buf(),
            max_shard_bytes: max,
            tensors: tensors
                .iter()
                .map(|&(n, d, s)| (n.to_owned(), d, s.to_vec()))
                .collect(),
            config: None,
            copied_files: Vec::new(),
            generated_files: Vec::new(),
            force: false,
            protected: Vec::new(),
        }
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn single_shard_readable_by_safetensors() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let donor = tmp.path().join("tok.json");
        fs::write(&donor, b"{\"tok\": 1}").unwrap();
        let mut s = spec(
            &out,
            &[
                ("w", DType::F32, &[2, 3]),
                ("b", DType::BF16, &[4]),
                ("e", DType::U8, &[0]),
            ],
            u64::MAX,
        );
        let mut config = Map::new();
        config.insert("torch_dtype".into(), "bfloat16".into());
        config.insert("num_hidden_layers".into(), 2.into());
        s.config = Some(config);
        s.copied_files = vec![("tokenizer.json".into(), donor.clone())];
        s.generated_files = vec![("README.md".into(), b"# merged\n".to_vec().into())];

        let mut w = ModelWriter::create(s).unwrap();
        assert_eq!(w.shard_names(), ["model.safetensors"]);
        let (dw, db) = (data(24, 1), data(8, 2));
        w.write_tensor("w", &dw).unwrap();
        w.write_tensor("b", &db).unwrap();
        w.write_tensor("e", &[]).unwrap();
        let written = w.finish().unwrap();

        assert_eq!(written.dir, out);
        assert_eq!(
            written.files,
            ["model.safetensors", "config.json", "tokenizer.json", "README.md"]
        );
        assert_eq!(written.tensor_bytes, 32);
        let bytes = fs::read(out.join("model.safetensors")).unwrap();
        let total: u64 = written
            .files
            .iter()
            .map(|f| fs::metadata(out.join(f)).unwrap().len())
            .sum();
        assert_eq!(written.bytes_written, total);

        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(n % 8, 0);
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let w_view = st.tensor("w").unwrap();
        assert_eq!(w_view.dtype(), safetensors::Dtype::F32);
        assert_eq!(w_view.shape(), [2, 3]);
        assert_eq!(w_view.data(), &dw[..]);
        assert_eq!(st.tensor("b").unwrap().data(), &db[..]);
        assert_eq!(st.tensor("b").unwrap().dtype(), safetensors::Dtype::BF16);
        assert_eq!(st.tensor("e").unwrap().shape(), [0]);

        let config = fs::read_to_string(out.join("config.json")).unwrap();
        assert_eq!(
            config,
            "{\n  \"torch_dtype\": \"bfloat16\",\n  \"num_hidden_layers\": 2\n}\n"
        );
        assert_eq!(
            fs::read(out.join("tokenizer.json")).unwrap(),
            fs::read(&donor).unwrap()
        );
        assert_eq!(fs::read(out.join("README.md")).unwrap(), b"# merged\n");
        // Nothing left beside it.
        assert_eq!(listing(tmp.path()), ["out", "tok.json"]);

        // Our own reader agrees.
        let model = load_model("out", tmp.path()).unwrap();
        let reader = TensorReader::new();
        assert_eq!(&*reader.read(&model, "w").unwrap(), &dw[..]);
        assert_eq!(model.num_layers(), Some(2));
        assert_eq!(model.donor_files, [out.join("tokenizer.json")]);
    }

    #[test]
    fn multi_shard_names_index_and_total_size() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let tensors: &[(&str, DType, &[usize])] = &[
            ("a", DType::U8, &[6]),
            ("b", DType::U8, &[4]),
            ("c", DType::U8, &[3]),
            ("big", DType::F32, &[5]),
            ("d", DType::U8, &[1]),
        ];
        let mut w = ModelWriter::create(spec(&out, tensors, 10)).unwrap();
        let names: Vec<String> = (1..=4)
            .map(|i| format!("model-{i:05}-of-00004.safetensors"))
            .collect();
        assert_eq!(w.shard_names(), names);
        let mut expected = BTreeMap::new();
        for (i, &(name, dtype, shape)) in tensors.iter().enumerate() {
            let d = data(shape[0] * dtype.size_bytes(), i as u8);
            w.write_tensor(name, &d).unwrap();
            expected.insert(name, d);
        }
        let written = w.finish().unwrap();
        assert_eq!(written.tensor_bytes, 34);
        let mut all = names.clone();
        all.push(INDEX_FILE.to_owned());
        assert_eq!(written.files, all);

        let index: Value = serde_json::from_slice(&fs::read(out.join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 34);
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(
            map.keys().map(String::as_str).collect::<Vec<_>>(),
            ["a", "b", "big", "c", "d"]
        );
        assert_eq!(map["a"], names[0].as_str());
        assert_eq!(map["b"], names[0].as_str());
        assert_eq!(map["c"], names[1].as_str());
        assert_eq!(map["big"], names[2].as_str());
        assert_eq!(map["d"], names[3].as_str());
        for shard in &names {
            let bytes = fs::read(out.join(shard)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for name in st.names() {
                let name: &str = name;
                assert_eq!(st.tensor(name).unwrap().data(), &expected[name][..]);
            }
        }
        let model = load_model("out", tmp.path()).unwrap();
        assert_eq!(model.tensors.len(), 5);
        assert_eq!(model.total_bytes(), 34);
    }

    #[test]
    fn streaming_form() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut w = ModelWriter::create(spec(&out, &[("x", DType::F16, &[3, 100])], 1 << 30)).unwrap();
        let d = data(600, 9);
        w.begin_tensor("x").unwrap();
        for chunk in d.chunks(77) {
            w.write_bytes(chunk).unwrap();
        }
        w.write_bytes(&[]).unwrap();
        w.end_tensor().unwrap();
        w.finish().unwrap();
        let bytes = fs::read(out.join(SINGLE_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("x").unwrap().data(), &d[..]);
    }

    #[test]
    fn no_tensors_still_writes_a_valid_file() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let w = ModelWriter::create(spec(&out, &[], 10)).unwrap();
        assert_eq!(w.finish().unwrap().files, [SINGLE_FILE]);
        let bytes = fs::read(out.join(SINGLE_FILE)).unwrap();
        assert_eq!(SafeTensors::deserialize(&bytes).unwrap().len(), 0);
    }

    #[test]
    fn drop_without_finish_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut w =
            ModelWriter::create(spec(&out, &[("a", DType::U8, &[4]), ("b", DType::U8, &[4])], 4)).unwrap();
        w.write_tensor("a", &[1, 2, 3, 4]).unwrap();
        w.begin_tensor("b").unwrap();
        assert_eq!(
            listing(tmp.path()).len(),
            1,
            "the temporary folder exists while writing"
        );
        drop(w);
        assert!(listing(tmp.path()).is_empty());

        // A failed finish cleans up too.
        let mut w = ModelWriter::create(spec(&out, &[("a", DType::U8, &[4])], 4)).unwrap();
        w.begin_tensor("a").unwrap();
        w.write_bytes(&[1, 2]).unwrap();
        let e = w.finish().unwrap_err();
        assert!(matches!(e, WriteError::Unfinished { .. }), "{e}");
        assert!(listing(tmp.path()).is_empty());
    }

    #[test]
    fn existing_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        fs::create_dir(&out).unwrap();
        // An empty folder is fine.
        let w = ModelWriter::create(spec(&out, &[], 1)).unwrap();
        w.finish().unwrap();
        // Now it is not empty.
        fs::write(out.join("old.txt"), b"old").unwrap();
        let e = ModelWriter::create(spec(&out, &[], 1)).unwrap_err();
        assert!(matches!(e, WriteError::NotEmpty { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!("output folder `{}` exists and is not empty", out.display())
        );
        assert!(check_output_target(&out, false, &[], None).is_err());
        assert!(check_output_target(&out, true, &[], None).is_ok());

        let mut s = spec(&out, &[("t", DType::U8, &[1])], 1);
        s.force = true;
        let mut w = ModelWriter::create(s).unwrap();
        w.write_tensor("t", &[7]).unwrap();
        w.finish().unwrap();
        assert_eq!(listing(&out), [MARKER_FILE, SINGLE_FILE]);
        assert_eq!(listing(tmp.path()), ["out"]);

        // A file is never replaced, even with force.
        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        let e = check_output_target(&file, true, &[], None).unwrap_err();
        assert!(matches!(e, WriteError::NotAFolder { .. }), "{e}");
    }

    #[test]
    fn force_replaces_only_what_mergec_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        ModelWriter::create(spec(&out, &[], 1)).unwrap().finish().unwrap();
        let marker = fs::read_to_string(out.join(MARKER_FILE)).unwrap();
        assert!(
            marker.starts_with(&format!("mergec {}\n", env!("CARGO_PKG_VERSION"))),
            "{marker}"
        );
        assert!(is_mergec_output(&out));

        // Someone else's folder: refused with or without force, and left as it was.
        let theirs = tmp.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        fs::write(theirs.join("notes.txt"), b"mine").unwrap();
        for force in [false, true] {
            let e = check_output_target(&theirs, force, &[], None).unwrap_err();
            assert!(matches!(e, WriteError::NotMergecOutput { .. }), "{e}");
            let mut s = spec(&theirs, &[], 1);
            s.force = force;
            let e = ModelWriter::create(s).unwrap_err();
            assert!(matches!(e, WriteError::NotMergecOutput { .. }), "{e}");
        }
        assert_eq!(listing(&theirs), ["notes.txt"]);
        // A model card is no proof; neither is a marker that is a link or names no mergec.
        fs::write(theirs.join("README.md"), b"---\ntags:\n- mergec\n---\n").unwrap();
        assert!(!is_mergec_output(&theirs));
        fs::write(theirs.join(MARKER_FILE), b"something else\n").unwrap();
        assert!(!is_mergec_output(&theirs));
        fs::remove_file(theirs.join(MARKER_FILE)).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(out.join(MARKER_FILE), theirs.join(MARKER_FILE)).unwrap();
            assert!(!is_mergec_output(&theirs));
        }
        assert_eq!(listing(tmp.path()), ["out", "theirs"]);
    }

    #[test]
    fn places_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let e = check_output_target(Path::new("/"), true, &[], None).unwrap_err();
        assert!(matches!(e, WriteError::Root { .. }), "{e}");
        // The tests run in the crate's folder.
        for (dir, contains) in [(".", false), ("..", true), ("src/..", false)] {
            let e = check_output_target(Path::new(dir), true, &[], None).unwrap_err();
            assert!(
                matches!(e, WriteError::WorkingFolder { contains: c, .. } if c == contains),
                "{dir}: {e}"
            );
        }
        let script_dir = tmp.path().join("scripts");
        fs::create_dir(&script_dir).unwrap();
        for (dir, contains) in [(script_dir.clone(), false), (tmp.path().to_path_buf(), true)] {
            let e = check_output_target(&dir, true, &[], Some(&script_dir)).unwrap_err();
            assert!(
                matches!(e, WriteError::HoldsScript { contains: c, .. } if c == contains),
                "{}: {e}",
                dir.display()
            );
        }
        // Inside the script's folder is where outputs usually go.
        assert!(check_output_target(&script_dir.join("out"), true, &[], Some(&script_dir)).is_ok());
    }

    #[test]
    fn long_names() {
        let tmp = tempfile::tempdir().unwrap();
        for len in [1, 200, 232, 233, 250, NAME_MAX] {
            let name = "n".repeat(len);
            for kind in [Scratch::Tmp, Scratch::Old] {
                let scratch = scratch_path(tmp.path(), OsStr::new(&name), kind, u32::MAX);
                let file = scratch.file_name().unwrap().len();
                assert!(file <= NAME_MAX, "{len}: {file}");
                // Short names keep the readable form.
                let readable = scratch.to_string_lossy().contains(name.as_str());
                assert_eq!(readable, len <= 232, "{len}");
            }
        }
        // The longest legal name works end to end; one byte more is refused up front.
        let out = tmp.path().join("n".repeat(NAME_MAX));
        let mut w = ModelWriter::create(spec(&out, &[("t", DType::U8, &[1])], 1)).unwrap();
        w.write_tensor("t", &[1]).unwrap();
        w.finish().unwrap();
        assert_eq!(listing(&out), [MARKER_FILE, SINGLE_FILE]);
        let mut s = spec(&out, &[], 1);
        s.force = true;
        ModelWriter::create(s).unwrap().finish().unwrap();
        assert_eq!(listing(tmp.path()), ["n".repeat(NAME_MAX)]);
        let too_long = tmp.path().join("n".repeat(NAME_MAX + 1));
        let e = ModelWriter::create(spec(&too_long, &[], 1)).unwrap_err();
        assert!(matches!(e, WriteError::NameTooLong { bytes: 256, .. }), "{e}");
        assert!(
            e.to_string().contains("nnnnnnnnnnnnnnnnnnnn...nnnnnnnnnnnn"),
            "{e}"
        );
        let e = check_output_target(&too_long.join("x"), false, &[], None).unwrap_err();
        assert!(matches!(e, WriteError::NameTooLong { .. }), "{e}");
    }

    /// Writes an output holding `tag` and returns its folder.
    fn output_with(out: &Path, tag: u8, force: bool) -> Result<WrittenModel, WriteError> {
        let mut s = spec(out, &[("t", DType::U8, &[1])], 1);
        s.force = force;
        let mut w = ModelWriter::create(s)?;
        w.write_tensor("t", &[tag])?;
        w.finish()
    }

    fn tag_of(out: &Path) -> u8 {
        let bytes = fs::read(out.join(SINGLE_FILE)).unwrap();
        SafeTensors::deserialize(&bytes)
            .unwrap()
            .tensor("t")
            .unwrap()
            .data()[0]
    }

    #[test]
    fn replacing_keeps_the_old_output_until_the_new_one_is_complete() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        output_with(&out, 1, false).unwrap();

        // The new output fails half way: the old one is untouched, nothing is left beside.
        let mut s = spec(&out, &[("t", DType::U8, &[1]), ("u", DType::U8, &[1])], 1);
        s.force = true;
        let mut w = ModelWriter::create(s).unwrap();
        w.write_tensor("t", &[2]).unwrap();
        assert_eq!(
            tag_of(&out),
            1,
            "the old output stays while the new one is written"
        );
        assert!(matches!(w.finish(), Err(WriteError::Unfinished { .. })));
        assert_eq!(tag_of(&out), 1);
        assert_eq!(listing(tmp.path()), ["out"]);

        output_with(&out, 3, true).unwrap();
        assert_eq!(tag_of(&out), 3);
        assert_eq!(listing(tmp.path()), ["out"]);
    }

    #[test]
    fn put_in_place_exchanges_or_falls_back_to_two_renames() {
        let tmp = tempfile::tempdir().unwrap();
        let (new, target, aside) = (
            tmp.path().join("new"),
            tmp.path().join("target"),
            tmp.path().join("aside"),
        );
        let fill = |dir: &Path, text: &str| {
            fs::create_dir(dir).unwrap();
            fs::write(dir.join("f"), text).unwrap();
        };
        let read = |dir: &Path| fs::read_to_string(dir.join("f")).unwrap();

        // Nothing there: a plain rename.
        fill(&new, "1");
        assert_eq!(put_in_place(&new, &target, &aside, exchange).unwrap(), None);
        assert_eq!(read(&target), "1");

        // The exchange (where the file system has it) leaves the old one where the new was.
        fill(&new, "2");
        let old = put_in_place(&new, &target, &aside, exchange).unwrap().unwrap();
        assert_eq!(read(&target), "2");
        assert_eq!(read(&old), "1");
        fs::remove_dir_all(&old).unwrap();

        // Without it: two renames through `aside`.
        let no_exchange = |_: &Path, _: &Path| Ok(false);
        fill(&new, "3");
        let old = put_in_place(&new, &target, &aside, no_exchange).unwrap().unwrap();
        assert_eq!(old, aside);
        assert_eq!((read(&target), read(&aside)), ("3".into(), "2".into()));
        fs::remove_dir_all(&aside).unwrap();

        // A failed exchange changes nothing.
        let failing = |_: &Path, _: &Path| Err(std::io::Error::from(ErrorKind::PermissionDenied));
        fill(&new, "4");
        assert!(put_in_place(&new, &target, &aside, failing).is_err());
        assert_eq!((read(&target), read(&new)), ("3".into(), "4".into()));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn exchange_swaps_folders_on_linux() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        fs::write(a.join("from_a"), b"").unwrap();
        // tmpfs and ext4 have RENAME_EXCHANGE; a file system without it falls back.
        if exchange(&a, &b).unwrap() {
            assert!(b.join("from_a").exists() && !a.join("from_a").exists());
        }
    }

    /// The id of a process that has exited.
    #[cfg(unix)]
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[cfg(unix)]
    #[test]
    fn leftovers_removed_only_when_provably_mergecs() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let name = OsStr::new("out");
        let dead = dead_pid();
        let with_marker = |dir: &Path| {
            fs::create_dir(dir).unwrap();
            fs::write(dir.join(MARKER_FILE), marker_text()).unwrap();
            fs::write(dir.join(SINGLE_FILE), b"partial").unwrap();
        };
        let stale = scratch_path(tmp.path(), name, Scratch::Tmp, dead);
        with_marker(&stale);
        // A live process's (our parent's), someone else's folder, another output's.
        let alive = scratch_path(
            tmp.path(),
            name,
            Scratch::Tmp,
            std::os::unix::process::parent_id(),
        );
        with_marker(&alive);
        let unmarked = tmp.path().join(format!(".out.mergec-tmp-{}", dead_pid()));
        fs::create_dir(&unmarked).unwrap();
        fs::write(unmarked.join("x"), b"").unwrap();
        let other = scratch_path(tmp.path(), OsStr::new("other"), Scratch::Tmp, dead);
        with_marker(&other);
        let odd = tmp.path().join(format!(".out.mergec-tmp-{dead}x"));
        with_marker(&odd);

        let removed = remove_leftovers(&out);
        assert_eq!(
            removed,
            [Leftover {
                path: stale.clone(),
                restored_to: None
            }]
        );
        assert!(!stale.exists());
        for kept in [&alive, &unmarked, &other, &odd] {
            assert!(kept.exists(), "{}", kept.display());
        }

        // An old output moved aside by a run killed between its two renames comes back.
        let aside = scratch_path(tmp.path(), name, Scratch::Old, dead);
        with_marker(&aside);
        let removed = remove_leftovers(&out);
        assert_eq!(removed[0].restored_to.as_deref(), Some(out.as_path()));
        assert!(out.join(SINGLE_FILE).exists() && !aside.exists());
        // With the output in place, it is only a leftover.
        with_marker(&aside);
        assert_eq!(remove_leftovers(&out)[0].restored_to, None);
        assert!(!aside.exists());

        // A long name's hashed scratch name is recognised too.
        let long = tmp.path().join("l".repeat(250));
        let stale = scratch_path(tmp.path(), long.file_name().unwrap(), Scratch::Tmp, dead);
        with_marker(&stale);
        assert_eq!(remove_leftovers(&long).len(), 1);
        assert!(!stale.exists());
    }

    #[test]
    fn protected_paths_refused_both_ways() {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("models").join("in");
        fs::create_dir_all(&input).unwrap();
        let weights = input.join(SINGLE_FILE);
        fs::write(&weights, b"x").unwrap();
        let protected = vec![input.clone(), weights.clone()];

        let e = check_output_target(&input.join("out"), false, &protected, None).unwrap_err();
        assert!(matches!(e, WriteError::InsideInput { .. }), "{e}");
        // Through `..` and an unnormalized path.
        let sneaky = tmp
            .path()
            .join("models")
            .join("x")
            .join("..")
            .join("in")
            .join("o");
        // `x` missing: the file system gives the path no meaning, so it is refused as such.
        let e = check_output_target(&sneaky, false, &protected, None).unwrap_err();
        assert!(matches!(e, WriteError::BadTarget { .. }), "{e}");
        fs::create_dir(tmp.path().join("models").join("x")).unwrap();
        let e = check_output_target(&sneaky, false, &protected, None).unwrap_err();
        assert!(matches!(e, WriteError::InsideInput { .. }), "{e}");
        let e = check_output_target(&input, true, &protected, None).unwrap_err();
        assert!(matches!(e, WriteError::SameAsInput { .. }), "{e}");
        let e = check_output_target(&tmp.path().join("models"), true, &protected, None).unwrap_err();
        assert!(matches!(e, WriteError::ContainsInput { .. }), "{e}");
        let mut s = spec(&tmp.path().join("models"), &[], 1);
        s.force = true;
        s.protected = protected.clone();
        assert!(matches!(
            ModelWriter::create(s),
            Err(WriteError::ContainsInput { .. })
        ));
        assert!(weights.exists());
        // A sibling is fine.
        assert!(check_output_target(&tmp.path().join("models").join("out"), false, &protected, None).is_ok());

        #[cfg(unix)]
        {
            // Reached through a symlink.
            let link = tmp.path().join("link");
            std::os::unix::fs::symlink(&input, &link).unwrap();
            let e = check_output_target(&link.join("out"), false, &protected, None).unwrap_err();
            assert!(matches!(e, WriteError::InsideInput { .. }), "{e}");
            let e = check_output_target(&link, true, &[], None).unwrap_err();
            assert!(matches!(e, WriteError::NotAFolder { .. }), "{e}");
        }
    }

    #[test]
    fn wrong_order_and_length_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut w = ModelWriter::create(spec(
            &out,
            &[("a", DType::F32, &[2]), ("b", DType::U8, &[3])],
            100,
        ))
        .unwrap();
        let e = w.write_tensor("b", &[1, 2, 3]).unwrap_err();
        assert!(matches!(e, WriteError::OutOfOrder { .. }), "{e}");
        assert!(e.to_string().contains("a bug in mergec"));
        let e = w.write_tensor("a", &[0; 7]).unwrap_err();
        assert!(
            matches!(
                e,
                WriteError::WrongLength {
                    expected: 8,
                    got: 7,
                    ..
                }
            ),
            "{e}"
        );
        let e = w.write_bytes(&[1]).unwrap_err();
        assert!(matches!(e, WriteError::Misuse { .. }), "{e}");
        let e = w.end_tensor().unwrap_err();
        assert!(matches!(e, WriteError::Misuse { .. }), "{e}");

        w.begin_tensor("a").unwrap();
        let e = w.begin_tensor("a").unwrap_err();
        assert!(matches!(e, WriteError::Misuse { .. }), "{e}");
        w.write_bytes(&[0; 5]).unwrap();
        let e = w.write_bytes(&[0; 4]).unwrap_err();
        assert!(matches!(e, WriteError::WrongLength { got: 9, .. }), "{e}");
        let e = w.end_tensor().unwrap_err();
        assert!(matches!(e, WriteError::WrongLength { got: 5, .. }), "{e}");
        w.write_bytes(&[0; 3]).unwrap();
        w.end_tensor().unwrap();
        w.write_tensor("b", &[1, 2, 3]).unwrap();
        let e = w.write_tensor("c", &[]).unwrap_err();
        assert!(matches!(e, WriteError::Extra { .. }), "{e}");
        w.finish().unwrap();
        let bytes = fs::read(out.join(SINGLE_FILE)).unwrap();
        assert_eq!(
            SafeTensors::deserialize(&bytes)
                .unwrap()
                .tensor("b")
                .unwrap()
                .data(),
            [1, 2, 3]
        );
    }

    #[test]
    fn bad_specs_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let e = ModelWriter::create(spec(&out, &[("a", DType::U8, &[1]), ("a", DType::U8, &[1])], 1))
            .unwrap_err();
        assert!(matches!(e, WriteError::BadSpec { .. }), "{e}");
        let e = ModelWriter::create(spec(&out, &[("a", DType::F64, &[usize::MAX])], 1)).unwrap_err();
        assert!(matches!(e, WriteError::BadSpec { .. }), "{e}");
        for name in [SINGLE_FILE, "../escape", "a/b", ""] {
            let mut s = spec(&out, &[("a", DType::U8, &[1])], 1);
            s.generated_files = vec![(name.to_owned(), Contents::default())];
            let e = ModelWriter::create(s).unwrap_err();
            assert!(matches!(e, WriteError::BadSpec { .. }), "{name}: {e}");
        }
        assert!(listing(tmp.path()).is_empty());
    }

    #[test]
    fn missing_copy_source_fails_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let mut s = spec(&out, &[], 1);
        s.copied_files = vec![("tokenizer.json".into(), tmp.path().join("missing.json"))];
        let e = ModelWriter::create(s).unwrap().finish().unwrap_err();
        assert!(matches!(e, WriteError::Copy { .. }), "{e}");
        assert!(listing(tmp.path()).is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn enospc_is_named() {
        // ENOSPC is 28 on Linux and the BSDs.
        let e = io_error(
            PathBuf::from("out/model.safetensors"),
            std::io::Error::from_raw_os_error(28),
        );
        assert!(matches!(e, WriteError::NoSpace { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "no space left on device while writing `out/model.safetensors`"
        );
    }
}
