//! Memory-mapped tensor bytes.
//!
//! Each safetensors file is mapped once and shared: tensors are handed out as ranges of
//! the map, so reading a tensor copies nothing and the kernel pages data in on demand
//! (and can drop it again under memory pressure).
//!
//! A mapped file that shrinks makes reading its lost pages raise SIGBUS. Two guards keep
//! that from killing a run without a word: every tensor read first checks that the file
//! still has the length and modification time it had when it was mapped (an error naming
//! the file otherwise), and every map is registered with [`crate::io::sigbus`], whose
//! handler reports a file that shrinks in the middle of a read and exits with status 1.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use memmap2::Mmap;

use crate::io::input_file::{self, InputError};
use crate::io::sigbus::{self, MapRegistration};
use crate::io::ModelInfo;

/// Why tensor bytes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("model `{model}` has no tensor `{name}`")]
    UnknownTensor { model: String, name: String },
    #[error("cannot map `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    File(#[from] InputError),
    #[error(
        "file `{}` changed since its header was read: tensor `{name}` ends at byte {end} but the file is now {len} bytes long",
        path.display()
    )]
    FileChanged {
        path: PathBuf,
        name: String,
        end: u64,
        len: u64,
    },
    /// The file's length or modification time changed after it was mapped.
    #[error("`{}` changed while mergec was reading it: {detail}", path.display())]
    ChangedWhileReading { path: PathBuf, detail: String },
    #[error("tensor `{name}` of model `{model}` names file #{file}, which the model does not have (a bug in mergec)")]
    BadFileIndex { model: String, name: String, file: u32 },
}

/// What a file looked like when it was mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(file: &File) -> std::io::Result<Stamp> {
        let meta = file.metadata()?;
        Ok(Stamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// One mapped file: the map, the open file (to notice changes cheaply) and the SIGBUS
/// registration, which is dropped before the map is unmapped (fields drop in order).
#[derive(Debug)]
struct Mapped {
    _registration: MapRegistration,
    map: Mmap,
    file: File,
    path: PathBuf,
    stamp: Stamp,
}

impl Mapped {
    /// An error when the file no longer has the length and modification time it had when
    /// it was mapped.
    fn check_unchanged(&self) -> Result<(), ReadError> {
        let now = Stamp::of(&self.file).map_err(|source| ReadError::Io {
            path: self.path.clone(),
            source,
        })?;
        if now == self.stamp {
            return Ok(());
        }
        let detail = if now.len != self.stamp.len {
            format!("it was {} bytes long and is now {}", self.stamp.len, now.len)
        } else {
            "it was modified".to_owned()
        };
        Err(ReadError::ChangedWhileReading {
            path: self.path.clone(),
            detail,
        })
    }
}

/// Shares one read-only map per file across threads.
#[derive(Debug, Default)]
pub struct TensorReader {
    maps: Mutex<HashMap<PathBuf, Arc<Mapped>>>,
}

/// One tensor's bytes: a range of a shared map, kept alive as long as this value.
#[derive(Clone, Debug)]
pub struct TensorBytes {
    map: Arc<Mapped>,
    start: usize,
    end: usize,
}

impl Deref for TensorBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // The range was checked against the map when this value was made.
        self.map.map.get(self.start..self.end).unwrap_or(&[])
    }
}

impl TensorBytes {
    /// Tells the kernel these pages are no longer needed, so resident memory does not grow
    /// with the size of the models read. A later read simply pages them in again. Failure
    /// only costs memory, so it is ignored.
    pub fn release(&self) {
        release_range(&self.map.map, self.start, self.end - self.start);
    }

    /// Asks the kernel to start reading the first `max` bytes of this tensor from disk now
    /// (`MADV_WILLNEED`), so a later step finds them in the page cache instead of waiting
    /// on page faults. Nothing is mapped into the process by this (its memory does not
    /// grow); failure only costs time, so it is ignored.
    pub fn will_need(&self, max: usize) {
        #[cfg(unix)]
        {
            let len = (self.end - self.start).min(max);
            if len > 0 {
                let _ = self
                    .map
                    .map
                    .advise_range(memmap2::Advice::WillNeed, self.start, len);
            }
        }
        #[cfg(not(unix))]
        let _ = max;
    }

    /// Like [`TensorBytes::release`] for bytes `from..to` of this tensor only.
    pub fn release_part(&self, from: usize, to: usize) {
        let len = self.end - self.start;
        let (from, to) = (from.min(len), to.min(len));
        if from < to {
            release_range(&self.map.map, self.start + from, to - from);
        }
    }
}

#[cfg(unix)]
#[allow(unsafe_code)]
fn release_range(map: &Mmap, start: usize, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: the map is a read-only shared file mapping and nothing is ever written
    // through it, so dropping its pages (MADV_DONTNEED) loses no data: the next access
    // reads the same bytes from the file again. memmap2 aligns the range to whole pages.
    let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
}

#[cfg(not(unix))]
fn release_range(_map: &Mmap, _start: usize, _len: usize) {}

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl TensorReader {
    pub fn new() -> TensorReader {
        TensorReader::default()
    }

    /// The bytes of tensor `name` of `model`, mapping its file on first use.
    pub fn read(&self, model: &ModelInfo, name: &str) -> Result<TensorBytes, ReadError> {
        let info = model.tensors.get(name).ok_or_else(|| ReadError::UnknownTensor {
            model: model.reference.clone(),
            name: name.to_owned(),
        })?;
        let path = model
            .files
            .get(info.file as usize)
            .ok_or_else(|| ReadError::BadFileIndex {
                model: model.reference.clone(),
                name: name.to_owned(),
                file: info.file,
            })?;
        let map = self.map(path)?;
        map.check_unchanged()?;
        let len = map.map.len() as u64;
        let end = info.offset.saturating_add(info.len);
        let changed = || ReadError::FileChanged {
            path: path.clone(),
            name: name.to_owned(),
            end,
            len,
        };
        if end > len {
            return Err(changed());
        }
        let start = usize::try_from(info.offset).map_err(|_| changed())?;
        let end = usize::try_from(end).map_err(|_| changed())?;
        Ok(TensorBytes { map, start, end })
    }

    /// Drops the cached map of `path` so its pages can be released once the tensors
    /// already handed out are dropped too.
    pub fn forget(&self, path: &Path) {
        self.lock().remove(path);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PathBuf, Arc<Mapped>>> {
        // A panic elsewhere cannot leave the map inconsistent (inserts are single calls).
        self.maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn map(&self, path: &Path) -> Result<Arc<Mapped>, ReadError> {
        if let Some(map) = self.lock().get(path) {
            return Ok(Arc::clone(map));
        }
        // Map without holding the lock, so threads mapping different files do not wait
        // on each other; if two raced on the same file, the first insert wins.
        let map = Arc::new(map_file(path)?);
        Ok(Arc::clone(self.lock().entry(path.to_path_buf()).or_insert(map)))
    }
}

/// Maps a whole regular file read-only and registers the map with the SIGBUS handler.
#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<Mapped, ReadError> {
    let io = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = input_file::open_regular(path)?;
    let stamp = Stamp::of(&file).map_err(io)?;
    // SAFETY: the map is read-only and only ever read as plain bytes (any bit pattern is
    // valid). The remaining hazard of file-backed maps is another process truncating the
    // file while it is mapped: `read` checks the file's length and modification time and
    // every range against the map's length, and a page lost after that check raises a
    // SIGBUS that `sigbus` reports as an error naming the file.
    let map = unsafe { Mmap::map(&file) }.map_err(io)?;
    let registration = sigbus::register_map(map.as_ptr(), map.len(), path);
    Ok(Mapped {
        _registration: registration,
        map,
        file,
        path: path.to_path_buf(),
        stamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::model::load_model;
    use safetensors::tensor::{Dtype, TensorView};

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn bytes_match_what_was_written() {
        assert_send_sync::<TensorReader>();
        assert_send_sync::<TensorBytes>();
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<u8> = (0..24).collect();
        let b: Vec<u8> = (100..108).collect();
        let views = vec![
            ("a", TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap()),
            ("b", TensorView::new(Dtype::F16, vec![4], &b).unwrap()),
        ];
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        let model = load_model(".", dir.path()).unwrap();
        let reader = TensorReader::new();
        assert_eq!(&*reader.read(&model, "a").unwrap(), &a[..]);
        let tb = reader.read(&model, "b").unwrap();
        assert_eq!(tb.as_ref(), &b[..]);
        let e = reader.read(&model, "c").unwrap_err();
        assert!(matches!(e, ReadError::UnknownTensor { .. }), "{e}");

        // Forgetting keeps handed-out bytes valid.
        reader.forget(&path);
        assert_eq!(&*tb, &b[..]);
        drop(tb);

        // A file truncated after its header was read is caught, not read past its end.
        std::fs::write(&path, [0u8; 16]).unwrap();
        let e = reader.read(&model, "b").unwrap_err();
        assert!(matches!(e, ReadError::FileChanged { .. }), "{e}");
        assert!(e.to_string().contains("changed since its header was read"));
    }

    #[test]
    fn shared_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..=255).collect();
        let views = vec![("t", TensorView::new(Dtype::U8, vec![256], &data).unwrap())];
        std::fs::write(
            dir.path().join("x.safetensors"),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        let model = load_model("x.safetensors", dir.path()).unwrap();
        let reader = TensorReader::new();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| assert_eq!(&*reader.read(&model, "t").unwrap(), &data[..]));
            }
        });
    }
}
