//! Resolving model references and indexing their tensors from headers alone.
//!
//! A reference is a local folder, a single `.safetensors` file, or `hf:org/name[@rev]`
//! looked up (without network) in the local Hugging Face cache. Loading reads only the
//! safetensors headers, `model.safetensors.index.json` and `config.json`, so checking a
//! script against many large models stays fast.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::{Map, Value};

use crate::diag::Code;
use crate::io::header::{read_header, FileHeader, HeaderError};
use crate::io::input_file::{self, classify, InputError, Kind, MAX_JSON_BYTES};
use crate::io::DType;

/// Tokenizer and generation files copied into a merged model, in copy order.
pub const DONOR_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
];

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
const CONFIG_FILE: &str = "config.json";
const BIN_ONLY: &str = "it has only PyTorch .bin weights; mergec reads safetensors";

/// Where one tensor's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Index into [`ModelInfo::files`].
    pub file: u32,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub len: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        // The header check proved the product fits.
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// A model as its headers describe it; no tensor data is read.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// As written by the user.
    pub reference: String,
    /// The model folder (the parent folder for a single-file reference).
    pub root: PathBuf,
    /// The safetensors files (shards).
    pub files: Vec<PathBuf>,
    pub tensors: BTreeMap<String, TensorInfo>,
    /// config.json, if present.
    pub config: Option<Map<String, Value>>,
    /// The tokenizer/generation files present in `root`, in [`DONOR_FILES`] order.
    pub donor_files: Vec<PathBuf>,
}

impl ModelInfo {
    /// What an output must never overwrite or contain: the model folder, or only the
    /// file itself for a single-file reference (its folder may hold other things).
    pub fn protected_paths(&self) -> Vec<PathBuf> {
        let single_file = self.files.len() == 1 && self.reference.ends_with(".safetensors");
        // The folder first, so a save to the folder itself reads "is the input model".
        let mut out = Vec::with_capacity(self.files.len() + 1);
        if !single_file {
            out.push(self.root.clone());
        }
        out.extend(self.files.iter().cloned());
        out
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .values()
            .fold(0u64, |acc, t| acc.saturating_add(t.len))
    }

    /// The layer count from config.json, looking where the common architectures put it.
    pub fn num_layers(&self) -> Option<usize> {
        let config = self.config.as_ref()?;
        let get = |map: &Map<String, Value>, key: &str| {
            map.get(key)
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
        };
        get(config, "num_hidden_layers")
            .or_else(|| match config.get("text_config") {
                Some(Value::Object(text)) => get(text, "num_hidden_layers"),
                _ => None,
            })
            .or_else(|| get(config, "n_layer"))
            .or_else(|| get(config, "num_layers"))
    }
}

/// Why a model reference cannot be used. Every variant names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("no model at `{}`", path.display())]
    NotFound { path: PathBuf },
    #[error("`{}` is not a model: {reason}", path.display())]
    NotAModel { path: PathBuf, reason: String },
    #[error("model `{}` is not in the Hugging Face cache", hf_name(repo, revision.as_deref()))]
    HfNotCached {
        repo: String,
        revision: Option<String>,
        cache: PathBuf,
    },
    #[error("cannot read `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{}` is not a valid safetensors file: {source}", path.display())]
    Corrupt { path: PathBuf, source: HeaderError },
    #[error("bad shard index `{}`: {reason}", path.display())]
    BadShardIndex { path: PathBuf, reason: String },
    #[error("invalid config `{}`: {reason}", path.display())]
    BadConfig { path: PathBuf, reason: String },
    /// A path that is not a regular file (a FIFO, device, socket or directory), a
    /// looping or dangling link, or a small file over its size cap.
    #[error(transparent)]
    File(InputError),
    #[error("model `{}` has no tensors{detail}", path.display())]
    NoTensors { path: PathBuf, detail: String },
    #[error("`{}` has a tensor with an empty name", path.display())]
    EmptyTensorName { path: PathBuf },
    #[error("tensor `{name}` appears twice in model `{}`: {detail}", path.display())]
    DuplicateTensor {
        path: PathBuf,
        name: String,
        detail: String,
    },
}

impl From<InputError> for ModelError {
    fn from(e: InputError) -> ModelError {
        match e {
            InputError::NotFound { path } => ModelError::NotFound { path },
            e => ModelError::File(e),
        }
    }
}

fn hf_name(repo: &str, revision: Option<&str>) -> String {
    match revision {
        Some(rev) => format!("hf:{repo}@{rev}"),
        None => format!("hf:{repo}"),
    }
}

impl ModelError {
    pub fn code(&self) -> Code {
        match self {
            ModelError::NotFound { .. } | ModelError::NotAModel { .. } => Code::E0401,
            ModelError::HfNotCached { .. } => Code::E0403,
            ModelError::Corrupt {
                source: HeaderError::Duplicate { name },
                ..
            } if name != "__metadata__" => Code::E0409,
            ModelError::Io { .. } | ModelError::Corrupt { .. } | ModelError::BadShardIndex { .. } => {
                Code::E0402
            }
            ModelError::BadConfig { .. } => Code::E0404,
            ModelError::File(e) => match e {
                InputError::NotFound { .. } => Code::E0401,
                InputError::NotAFile { .. } | InputError::LinkLoop { .. } | InputError::Dangling { .. } => {
                    Code::E0406
                }
                InputError::TooLarge { .. } | InputError::Io { .. } => Code::E0402,
            },
            ModelError::NoTensors { .. } => Code::E0407,
            ModelError::EmptyTensorName { .. } => Code::E0408,
            ModelError::DuplicateTensor { .. } => Code::E0409,
        }
    }

    pub fn help(&self) -> Option<String> {
        match self {
            ModelError::NotFound { .. } => Some(
                "relative model paths are resolved against the script's folder; \
                 use `hf:org/name` for a model in the Hugging Face cache"
                    .to_owned(),
            ),
            ModelError::NotAModel { reason, .. } if reason == BIN_ONLY => Some(
                "convert it first, e.g. load it with transformers and call \
                 `save_pretrained(folder, safe_serialization=True)`"
                    .to_owned(),
            ),
            ModelError::NotAModel { .. } => Some(format!(
                "a model folder holds `{SINGLE_FILE}`, or `{INDEX_FILE}` with its shards, \
                 or `*.safetensors` files"
            )),
            ModelError::HfNotCached {
                repo,
                revision,
                cache,
            } => {
                let rev = revision
                    .as_deref()
                    .map(|r| format!(" --revision {r}"))
                    .unwrap_or_default();
                Some(format!(
                    "searched the cache folder `{}` (set HF_HUB_CACHE or HF_HOME to look \
                     elsewhere); download it with `hf download {repo}{rev}`",
                    cache.display()
                ))
            }
            ModelError::Io { .. } => None,
            ModelError::Corrupt { .. } => {
                Some("the file may be truncated or still downloading; download it again".to_owned())
            }
            ModelError::BadShardIndex { .. } => Some(
                "the index must list every tensor under the shard that holds it; \
                 a download may be incomplete"
                    .to_owned(),
            ),
            ModelError::BadConfig { .. } => {
                Some("config.json must be a JSON object, as transformers writes it".to_owned())
            }
            ModelError::File(e) => match e {
                InputError::NotFound { .. } | InputError::Io { .. } => None,
                InputError::NotAFile { .. } => Some(
                    "mergec reads model files only from regular files (or links to them)".to_owned(),
                ),
                InputError::Dangling { .. } => Some(
                    "in a Hugging Face cache a link to a missing blob means an incomplete download; download the model again"
                        .to_owned(),
                ),
                InputError::LinkLoop { .. } => {
                    Some("point the link at the file itself, or replace it with the file".to_owned())
                }
                InputError::TooLarge { .. } => Some(
                    "a file this large is not a real model's; the file may be damaged".to_owned(),
                ),
            },
            ModelError::NoTensors { .. } => Some(
                "a download may be incomplete; a model folder holds its weights in `*.safetensors` files"
                    .to_owned(),
            ),
            ModelError::EmptyTensorName { .. } => Some(
                "a safetensors file written by transformers or safetensors never has one; the file is damaged"
                    .to_owned(),
            ),
            ModelError::DuplicateTensor { .. } => Some(
                "each tensor must be in one file only; remove the stray file or download the model again"
                    .to_owned(),
            ),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelError::NotFound { path }
            | ModelError::NotAModel { path, .. }
            | ModelError::Io { path, .. }
            | ModelError::Corrupt { path, .. }
            | ModelError::BadShardIndex { path, .. }
            | ModelError::BadConfig { path, .. }
            | ModelError::NoTensors { path, .. }
            | ModelError::EmptyTensorName { path }
            | ModelError::DuplicateTensor { path, .. } => path,
            ModelError::File(e) => e.path(),
            ModelError::HfNotCached { cache, .. } => cache,
        }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    if source.kind() == ErrorKind::NotFound {
        ModelError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The Hugging Face hub cache folder, as huggingface_hub finds it.
pub fn hf_cache_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return dir;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return xdg.join("huggingface").join("hub");
    }
    var("HOME")
        .unwrap_or_else(|| PathBuf::from("~"))
        .join(".cache")
        .join("huggingface")
        .join("hub")
}

/// Resolves a reference to the path it names (a folder or a file), checking that it exists.
/// `hf:` references are looked up in the Hugging Face cache named by the environment.
pub fn resolve_reference(reference: &str, base_dir: &Path) -> Result<PathBuf, ModelError> {
    resolve_with_cache(reference, base_dir, None)
}

/// [`resolve_reference`] with the cache folder given explicitly (`None`: from the
/// environment), so tests need not change process-wide environment variables.
fn resolve_with_cache(reference: &str, base_dir: &Path, cache: Option<&Path>) -> Result<PathBuf, ModelError> {
    if let Some(spec) = reference.strip_prefix("hf:") {
        let (repo, revision) = parse_hf(reference, spec)?;
        let cache = match cache {
            Some(c) => c.to_path_buf(),
            None => hf_cache_dir(),
        };
        return resolve_hf(repo, revision, &cache);
    }
    let path = match reference.strip_prefix("~/") {
        Some(rest) => match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            Some(home) => PathBuf::from(home).join(rest),
            None => base_dir.join(reference),
        },
        None => base_dir.join(reference),
    };
    if classify(&path)? == Kind::Missing {
        return Err(ModelError::NotFound { path });
    }
    Ok(path)
}

/// Splits `org/name@rev` and rejects names that could escape the cache folder.
fn parse_hf<'a>(reference: &str, spec: &'a str) -> Result<(&'a str, Option<&'a str>), ModelError> {
    let (repo, revision) = match spec.split_once('@') {
        Some((repo, rev)) => (repo, Some(rev)),
        None => (spec, None),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    let good_part =
        |p: &str| !p.is_empty() && p != "." && p != ".." && !p.contains(['\\', '@']) && !p.contains("--");
    let repo_ok = (1..=2).contains(&parts.len()) && parts.iter().all(|p| good_part(p));
    let rev_ok = revision.is_none_or(|r| {
        !r.is_empty()
            && !r.starts_with('/')
            && !r.contains('\\')
            && r.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
    });
    if repo_ok && rev_ok {
        Ok((repo, revision))
    } else {
        Err(ModelError::NotAModel {
            path: PathBuf::from(reference),
            reason: "a Hugging Face reference looks like `hf:org/name` or `hf:org/name@revision`".to_owned(),
        })
    }
}

/// Finds the snapshot folder of `repo` at `revision` (default `main`) in `cache`:
/// `refs/<revision>` holds a commit hash, else the revision is taken as the hash itself.
fn resolve_hf(repo: &str, revision: Option<&str>, cache: &Path) -> Result<PathBuf, ModelError> {
    let not_cached = || ModelError::HfNotCached {
        repo: repo.to_owned(),
        revision: revision.map(str::to_owned),
        cache: cache.to_path_buf(),
    };
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(not_cached());
    }
    let rev = revision.unwrap_or("main");
    let ref_file = repo_dir.join("refs").join(rev);
    let commit = match classify(&ref_file)? {
        Kind::File(_) => {
            // A ref holds a 40-character hash; anything much longer is not a ref.
            let bytes = input_file::read_capped(&ref_file, 4096)?.unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            let hash = text.trim();
            if hash.is_empty() || hash.contains(['/', '\\']) || hash == "." || hash == ".." {
                return Err(ModelError::NotAModel {
                    path: ref_file,
                    reason: "the ref file does not hold a commit hash".to_owned(),
                });
            }
            hash.to_owned()
        }
        // A folder named like the ref (e.g. `refs/pr`) means the revision is not a ref.
        Kind::Dir | Kind::Missing => rev.to_owned(),
    };
    let snapshot = repo_dir.join("snapshots").join(commit);
    if snapshot.is_dir() {
        Ok(snapshot)
    } else {
        Err(not_cached())
    }
}

/// Loads a model's index: resolves the reference, reads every shard header, the shard
/// index, config.json, and lists the donor files.
pub fn load_model(reference: &str, base_dir: &Path) -> Result<ModelInfo, ModelError> {
    load_model_with_cache(reference, base_dir, None)
}

fn load_model_with_cache(
    reference: &str,
    base_dir: &Path,
    cache: Option<&Path>,
) -> Result<ModelInfo, ModelError> {
    let path = resolve_with_cache(reference, base_dir, cache)?;
    let kind = classify(&path)?;
    if kind == Kind::Missing {
        return Err(ModelError::NotFound { path });
    }
    let (root, weights) = if kind == Kind::Dir {
        let weights = find_weights(&path)?;
        (path, weights)
    } else {
        let root = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = file_name(&path);
        let weights = if name.ends_with(".safetensors.index.json") {
            Weights::Index(path)
        } else if [".bin", ".pt", ".pth", ".ckpt"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            return Err(ModelError::NotAModel {
                path,
                reason: "it is a PyTorch pickle; mergec reads safetensors".to_owned(),
            });
        } else if name.ends_with(".gguf") {
            return Err(ModelError::NotAModel {
                path,
                reason: "it is a GGUF file; mergec reads safetensors".to_owned(),
            });
        } else {
            Weights::Files(vec![path])
        };
        (root, weights)
    };

    let (files, tensors, weights_kind) = match weights {
        Weights::Files(files) => {
            let headers = read_headers(&files)?;
            let tensors = index_unsharded(&root, &files, headers)?;
            (files, tensors, WeightsKind::Files)
        }
        Weights::Index(index) => {
            let (files, tensors) = index_sharded(&root, &index)?;
            (files, tensors, WeightsKind::Index(index))
        }
    };
    if tensors.is_empty() {
        let detail = match &weights_kind {
            WeightsKind::Index(index) => format!(": the `weight_map` of `{}` is empty", file_name(index)),
            WeightsKind::Files => String::new(),
        };
        return Err(ModelError::NoTensors {
            path: root_or_file(&root, &files, reference),
            detail,
        });
    }
    let config = read_config(&root.join(CONFIG_FILE))?;
    let donor_files = donor_files(&root)?;
    Ok(ModelInfo {
        reference: reference.to_owned(),
        root,
        files,
        tensors,
        config,
        donor_files,
    })
}

/// Where the tensors of a model were listed (for messages).
enum WeightsKind {
    Files,
    Index(PathBuf),
}

/// The path a message about the whole model names: the file of a single-file reference,
/// else the folder.
fn root_or_file(root: &Path, files: &[PathBuf], reference: &str) -> PathBuf {
    match files {
        [file] if reference.ends_with(".safetensors") => file.clone(),
        _ => root.to_path_buf(),
    }
}

/// The tokenizer and generation files present in `root`, in [`DONOR_FILES`] order. Each
/// must be a regular file (or a link to one) within its size cap: the writer copies them
/// and the MoE gates read the tokenizer, so a FIFO or a directory here is an error, not a
/// file silently left out.
fn donor_files(root: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let mut found = Vec::new();
    for name in DONOR_FILES {
        let path = root.join(name);
        match classify(&path)? {
            Kind::Missing => {}
            Kind::Dir => {
                return Err(ModelError::File(InputError::NotAFile {
                    path,
                    what: "a directory",
                }))
            }
            Kind::File(len) => {
                let cap = input_file::cap_for(name);
                if len > cap {
                    return Err(ModelError::File(InputError::TooLarge { path, cap }));
                }
                found.push(path);
            }
        }
    }
    Ok(found)
}

enum Weights {
    /// Independent files whose tensors together make the model.
    Files(Vec<PathBuf>),
    /// A `*.safetensors.index.json` naming shards.
    Index(PathBuf),
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Picks the weights of a model folder as transformers would.
fn find_weights(dir: &Path) -> Result<Weights, ModelError> {
    let single = dir.join(SINGLE_FILE);
    if classify(&single)? != Kind::Missing {
        input_file::require_file(&single)?;
        return Ok(Weights::Files(vec![single]));
    }
    let index = dir.join(INDEX_FILE);
    if classify(&index)? != Kind::Missing {
        input_file::require_file(&index)?;
        return Ok(Weights::Index(index));
    }
    let mut safetensors = Vec::new();
    let mut names = BTreeSet::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.ends_with(".safetensors") {
            // A loose file that is a FIFO, a directory or a broken link is an error, not
            // a shard quietly left out.
            match classify(&path)? {
                Kind::File(_) => safetensors.push(path),
                Kind::Dir => {
                    return Err(ModelError::File(InputError::NotAFile {
                        path,
                        what: "a directory",
                    }))
                }
                Kind::Missing => {}
            }
        }
        names.insert(name);
    }
    if !safetensors.is_empty() {
        safetensors.sort();
        return Ok(Weights::Files(safetensors));
    }
    let reason = if names
        .iter()
        .any(|n| n.ends_with(".bin") || n == "pytorch_model.bin.index.json")
    {
        BIN_ONLY.to_owned()
    } else if names.iter().any(|n| n.ends_with(".gguf")) {
        "it has only GGUF files; mergec reads safetensors".to_owned()
    } else if names.contains("snapshots") && names.contains("refs") {
        "it is a Hugging Face cache folder; refer to the model as `hf:org/name`".to_owned()
    } else {
        format!("the folder has no `{SINGLE_FILE}`, `{INDEX_FILE}` or `*.safetensors` file")
    };
    Err(ModelError::NotAModel {
        path: dir.to_path_buf(),
        reason,
    })
}

fn read_headers(files: &[PathBuf]) -> Result<Vec<FileHeader>, ModelError> {
    files
        .par_iter()
        .map(|path| {
            read_header(path).map_err(|e| match e {
                HeaderError::Io(source) => io_err(path, source),
                HeaderError::File(e) => e.into(),
                source => ModelError::Corrupt {
                    path: path.clone(),
                    source,
                },
            })
        })
        .collect()
}

fn file_index(root: &Path, i: usize) -> Result<u32, ModelError> {
    u32::try_from(i).map_err(|_| ModelError::NotAModel {
        path: root.to_path_buf(),
        reason: "it has more files than mergec can index".to_owned(),
    })
}

fn tensor_info(entry: &crate::io::header::HeaderEntry, file: u32) -> TensorInfo {
    TensorInfo {
        dtype: entry.dtype,
        shape: entry.shape.clone(),
        file,
        offset: entry.start,
        len: entry.end - entry.start,
    }
}

/// Merges the tensors of files that have no index; a name in two files is ambiguous.
fn index_unsharded(
    root: &Path,
    files: &[PathBuf],
    headers: Vec<FileHeader>,
) -> Result<BTreeMap<String, TensorInfo>, ModelError> {
    let mut tensors = BTreeMap::new();
    for (i, header) in headers.into_iter().enumerate() {
        let file = file_index(root, i)?;
        for entry in &header.entries {
            if entry.name.is_empty() {
                return Err(ModelError::EmptyTensorName {
                    path: files.get(i).cloned().unwrap_or_default(),
                });
            }
            let info = tensor_info(entry, file);
            if let Some(prev) = tensors.insert(entry.name.clone(), info) {
                return Err(ModelError::DuplicateTensor {
                    path: root.to_path_buf(),
                    name: entry.name.clone(),
                    detail: format!(
                        "it is in both `{}` and `{}`, and there is no `{INDEX_FILE}` to say which one counts",
                        files
                            .get(prev.file as usize)
                            .map(|p| file_name(p))
                            .unwrap_or_default(),
                        files.get(i).map(|p| file_name(p)).unwrap_or_default(),
                    ),
                });
            }
        }
    }
    Ok(tensors)
}

/// Reads `model.safetensors.index.json` and checks it against the shards' headers. The
/// index decides which tensors belong to the model (as in transformers): every listed
/// tensor must be in its shard and in no other one.
fn index_sharded(
    root: &Path,
    index: &Path,
) -> Result<(Vec<PathBuf>, BTreeMap<String, TensorInfo>), ModelError> {
    let bad = |reason: String| ModelError::BadShardIndex {
        path: index.to_path_buf(),
        reason,
    };
    let text = input_file::read_capped(index, MAX_JSON_BYTES)?.ok_or_else(|| ModelError::NotFound {
        path: index.to_path_buf(),
    })?;
    let json: Value = serde_json::from_slice(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Some(Value::Object(_)) = json.get("weight_map") else {
        return Err(bad("no `weight_map` object".to_owned()));
    };
    // Parsed again keeping every entry: a JSON object may repeat a key, and a parser keeps
    // only one of them, so a tensor listed under two shards would quietly lose one.
    let WeightMapOnly { weight_map } =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let mut seen: HashMap<&str, &Value> = HashMap::with_capacity(weight_map.0.len());
    for (tensor, shard) in &weight_map.0 {
        if tensor.is_empty() {
            return Err(ModelError::EmptyTensorName {
                path: index.to_path_buf(),
            });
        }
        if let Some(first) = seen.insert(tensor.as_str(), shard) {
            return Err(ModelError::DuplicateTensor {
                path: root.to_path_buf(),
                name: tensor.clone(),
                detail: format!(
                    "`{}` lists it twice (under {} and {})",
                    file_name(index),
                    shown(first),
                    shown(shard)
                ),
            });
        }
    }
    // Shard names, in sorted order, and each tensor's shard name.
    let mut shard_names = BTreeSet::new();
    let mut listed = Vec::with_capacity(weight_map.0.len());
    for (tensor, shard) in &weight_map.0 {
        let Value::String(shard) = shard else {
            return Err(bad(format!("tensor `{tensor}` maps to a non-string")));
        };
        let rel = Path::new(shard);
        if shard.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(bad(format!(
                "shard name `{shard}` is not a file in the model folder"
            )));
        }
        shard_names.insert(shard.as_str());
        listed.push((tensor, shard.as_str()));
    }
    let shard_names: Vec<&str> = shard_names.into_iter().collect();
    let files: Vec<PathBuf> = shard_names.iter().map(|s| root.join(s)).collect();
    for (name, path) in shard_names.iter().zip(&files) {
        match classify(path)? {
            Kind::File(_) => {}
            Kind::Missing => return Err(bad(format!("it names shard `{name}`, which does not exist"))),
            Kind::Dir => {
                return Err(ModelError::File(InputError::NotAFile {
                    path: path.clone(),
                    what: "a directory",
                }))
            }
        }
    }
    let headers = read_headers(&files)?;
    let shard_name = |file: u32| shard_names.get(file as usize).copied().unwrap_or_default();

    // Where each tensor actually is, across all shards.
    let mut found: HashMap<&str, Vec<(u32, &crate::io::header::HeaderEntry)>> = HashMap::new();
    for (i, header) in headers.iter().enumerate() {
        let file = file_index(root, i)?;
        for entry in &header.entries {
            found.entry(entry.name.as_str()).or_default().push((file, entry));
        }
    }
    let mut tensors = BTreeMap::new();
    for (tensor, shard) in listed {
        let places = found.get(tensor.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        if let [(_, _), (_, _), ..] = places {
            let names: Vec<String> = places
                .iter()
                .map(|(f, _)| format!("`{}`", shard_name(*f)))
                .collect();
            return Err(ModelError::DuplicateTensor {
                path: root.to_path_buf(),
                name: tensor.clone(),
                detail: format!("it is in more than one shard: {}", names.join(", ")),
            });
        }
        let Some(&(file, entry)) = places.iter().find(|(f, _)| shard_name(*f) == shard) else {
            return Err(bad(format!(
                "tensor `{tensor}` is listed under shard `{shard}`, which does not contain it"
            )));
        };
        tensors.insert(tensor.clone(), tensor_info(entry, file));
    }
    Ok((files, tensors))
}

/// A shard name of the index as a message shows it: `name`, or the JSON if not a string.
fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => format!("`{s}`"),
        other => other.to_string(),
    }
}

/// The `weight_map` of a shard index, every entry kept (repeated keys included).
#[derive(serde::Deserialize)]
struct WeightMapOnly {
    weight_map: Entries,
}

/// A JSON object's entries in order, a repeated key kept as often as it appears.
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Entries, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn read_config(path: &Path) -> Result<Option<Map<String, Value>>, ModelError> {
    let Some(text) = input_file::read_capped(path, MAX_JSON_BYTES)? else {
        return Ok(None);
    };
    let bad = |reason: String| ModelError::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    match serde_json::from_slice::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(bad("it is not a JSON object".to_owned())),
        Err(e) => Err(bad(format!("not valid JSON: {e}"))),
    }
}

/// Every model a script refers to, each loaded once.
#[derive(Debug, Default)]
pub struct ModelIndex {
    models: HashMap<String, Result<Arc<ModelInfo>, ModelError>>,
    /// The LoRA adapters the script applies, by reference.
    adapters: HashMap<String, Result<Arc<crate::io::AdapterInfo>, crate::io::AdapterError>>,
}

impl ModelIndex {
    /// Loads each distinct reference once, in parallel.
    pub fn load<'a>(references: impl IntoIterator<Item = &'a str>, base_dir: &Path) -> ModelIndex {
        let distinct: BTreeSet<&str> = references.into_iter().collect();
        let models = distinct
            .into_par_iter()
            .map(|r| (r.to_owned(), load_model(r, base_dir).map(Arc::new)))
            .collect();
        ModelIndex {
            models,
            adapters: HashMap::new(),
        }
    }

    /// Loads each distinct adapter reference once (config and header only).
    pub fn load_adapters<'a>(&mut self, references: impl IntoIterator<Item = &'a str>, base_dir: &Path) {
        let distinct: BTreeSet<&str> = references.into_iter().collect();
        for r in distinct {
            if !self.adapters.contains_key(r) {
                let loaded = crate::io::adapter::load_adapter(r, base_dir).map(Arc::new);
                self.adapters.insert(r.to_owned(), loaded);
            }
        }
    }

    pub fn adapter(
        &self,
        reference: &str,
    ) -> Option<&Result<Arc<crate::io::AdapterInfo>, crate::io::AdapterError>> {
        self.adapters.get(reference)
    }

    pub fn get(&self, reference: &str) -> Option<&Result<Arc<ModelInfo>, ModelError>> {
        self.models.get(reference)
    }

    pub fn insert(&mut self, reference: String, model: Result<Arc<ModelInfo>, ModelError>) {
        self.models.insert(reference, model);
    }

    /// Every reference and its result, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Result<Arc<ModelInfo>, ModelError>)> {
        self.models.iter().map(|(k, v)| (k.as_str(), v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};

    /// Writes a safetensors file of U8 tensors, each filled with its own length.
    fn write_st(path: &Path, tensors: &[(&str, usize)]) {
        let data: Vec<Vec<u8>> = tensors.iter().map(|&(_, n)| vec![n as u8; n]).collect();
        let views: Vec<(&str, TensorView)> = tensors
            .iter()
            .zip(&data)
            .map(|(&(name, n), d)| (name, TensorView::new(Dtype::U8, vec![n], d).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn write_index(dir: &Path, map: &[(&str, &str)]) {
        let weight_map: Map<String, Value> = map
            .iter()
            .map(|(t, s)| (t.to_string(), Value::String(s.to_string())))
            .collect();
        let json = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join(INDEX_FILE), json.to_string()).unwrap();
    }

    #[test]
    fn single_file_reference() {
        let dir = tempfile::tempdir().unwrap();
        write_st(&dir.path().join("w.safetensors"), &[("a", 3), ("b", 5)]);
        std::fs::write(dir.path().join("config.json"), r#"{"num_hidden_layers": 4}"#).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        let m = load_model("w.safetensors", dir.path()).unwrap();
        assert_eq!(m.root, dir.path());
        assert_eq!(m.files, vec![dir.path().join("w.safetensors")]);
        assert_eq!(m.tensors.len(), 2);
        assert_eq!(m.tensors["b"].len, 5);
        assert_eq!(m.tensors["b"].numel(), 5);
        assert_eq!(m.total_bytes(), 8);
        assert_eq!(m.num_layers(), Some(4));
        assert_eq!(m.donor_files, vec![dir.path().join("tokenizer.json")]);
        assert_eq!(m.reference, "w.safetensors");
    }

    #[test]
    fn folder_reference() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m");
        std::fs::create_dir(&model).unwrap();
        write_st(&model.join(SINGLE_FILE), &[("x", 2)]);
        // Ignored: model.safetensors takes precedence.
        write_st(&model.join("extra.safetensors"), &[("y", 2)]);
        for name in ["generation_config.json", "tokenizer_config.json", "merges.txt"] {
            std::fs::write(model.join(name), "{}").unwrap();
        }
        std::fs::write(
            model.join("config.json"),
            r#"{"text_config": {"num_hidden_layers": 7}}"#,
        )
        .unwrap();
        let m = load_model("m", dir.path()).unwrap();
        assert_eq!(m.tensors.keys().collect::<Vec<_>>(), ["x"]);
        assert_eq!(m.num_layers(), Some(7));
        let donors: Vec<_> = m.donor_files.iter().map(|p| file_name(p)).collect();
        assert_eq!(
            donors,
            ["tokenizer_config.json", "merges.txt", "generation_config.json"]
        );
        // The data offset is absolute.
        let bytes = std::fs::read(model.join(SINGLE_FILE)).unwrap();
        let t = &m.tensors["x"];
        assert_eq!(&bytes[t.offset as usize..(t.offset + t.len) as usize], [2, 2]);
    }

    #[test]
    fn folder_of_loose_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        write_st(&dir.path().join("b.safetensors"), &[("y", 2)]);
        write_st(&dir.path().join("a.safetensors"), &[("x", 1)]);
        let m = load_model(".", dir.path()).unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(file_name(&m.files[0]), "a.safetensors");
        assert_eq!(m.tensors["y"].file, 1);
        assert_eq!(m.config, None);
        assert_eq!(m.num_layers(), None);

        write_st(&dir.path().join("c.safetensors"), &[("x", 1)]);
        let e = load_model(".", dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::DuplicateTensor { .. }), "{e}");
        assert_eq!(e.code(), Code::E0409);
    }

    #[test]
    fn sharded_folder_with_index() {
        let dir = tempfile::tempdir().unwrap();
        let s1 = "model-00001-of-00002.safetensors";
        let s2 = "model-00002-of-00002.safetensors";
        write_st(&dir.path().join(s1), &[("a", 4), ("b", 2)]);
        write_st(&dir.path().join(s2), &[("c", 8), ("stray", 1)]);
        write_index(dir.path(), &[("a", s1), ("b", s1), ("c", s2)]);
        let m = load_model(dir.path().to_str().unwrap(), Path::new("/nonexistent")).unwrap();
        assert_eq!(m.files, vec![dir.path().join(s1), dir.path().join(s2)]);
        assert_eq!(m.tensors.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(m.tensors["c"].file, 1);
        assert_eq!(m.total_bytes(), 14);
        // The index file itself as the reference works too.
        let m2 = load_model(INDEX_FILE, dir.path()).unwrap();
        assert_eq!(m2.tensors, m.tensors);
        assert_eq!(m2.root, dir.path());
    }

    #[test]
    fn index_naming_a_missing_shard() {
        let dir = tempfile::tempdir().unwrap();
        write_st(&dir.path().join("s1.safetensors"), &[("a", 4)]);
        write_index(dir.path(), &[("a", "s1.safetensors"), ("b", "s2.safetensors")]);
        let e = load_model(".", dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::BadShardIndex { .. }), "{e}");
        assert!(
            e.to_string().contains("`s2.safetensors`, which does not exist"),
            "{e}"
        );
        assert_eq!(e.code(), Code::E0402);

        write_index(dir.path(), &[("a", "../s1.safetensors")]);
        let e = load_model(".", dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::BadShardIndex { .. }), "{e}");
    }

    #[test]
    fn index_tensor_missing_or_twice() {
        let dir = tempfile::tempdir().unwrap();
        write_st(&dir.path().join("s1.safetensors"), &[("a", 4)]);
        write_st(&dir.path().join("s2.safetensors"), &[("b", 4), ("a", 1)]);
        write_index(dir.path(), &[("a", "s1.safetensors"), ("c", "s2.safetensors")]);
        let e = load_model(".", dir.path()).unwrap_err();
        assert!(e.to_string().contains("more than one shard"), "{e}");
        assert_eq!(e.code(), Code::E0409);

        write_st(&dir.path().join("s2.safetensors"), &[("b", 4)]);
        let e = load_model(".", dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::BadShardIndex { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("tensor `c` is listed under shard `s2.safetensors`, which does not contain it"),
            "{e}"
        );

        std::fs::write(dir.path().join(INDEX_FILE), "{not json").unwrap();
        let e = load_model(".", dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::BadShardIndex { .. }), "{e}");
    }

    #[test]
    fn bin_only_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), b"junk").unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let e = load_model(".", dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .contains("only PyTorch .bin weights; mergec reads safetensors"),
            "{e}"
        );
        assert_eq!(e.code(), Code::E0401);
        assert!(e.help().unwrap().contains("safe_serialization"));
        let e = load_model("pytorch_model.bin", dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::NotAModel { .. }), "{e}");
    }

    #[test]
    fn empty_folder_and_missing_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_model(".", dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::NotAModel { .. }), "{e}");
        let e = load_model("nope", dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::NotFound { .. }), "{e}");
        assert_eq!(e.path(), dir.path().join("nope"));
        assert_eq!(e.code(), Code::E0401);
    }

    #[test]
    fn corrupt_file_and_bad_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SINGLE_FILE), [1u8, 2, 3]).unwrap();
        let e = load_model(".", dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::Corrupt { .. }), "{e}");
        assert_eq!(e.code(), Code::E0402);
        assert!(e.to_string().contains("shorter than the 8-byte header length"));

        write_st(&dir.path().join(SINGLE_FILE), &[("a", 1)]);
        std::fs::write(dir.path().join("config.json"), "[1]").unwrap();
        let e = load_model(".", dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::BadConfig { .. }), "{e}");
        assert_eq!(e.code(), Code::E0404);
        std::fs::write(dir.path().join("config.json"), "{").unwrap();
        let e = load_model(".", dir.path()).unwrap_err();
        assert!(matches!(e, ModelError::BadConfig { .. }), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn hf_cache_resolution() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--name");
        let hash = "0123abcd";
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(hash)).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join("feedbeef")).unwrap();
        std::fs::write(repo.join("refs").join("main"), format!("{hash}\n")).unwrap();
        write_st(&repo.join("blobs").join("b1"), &[("w", 6)]);
        std::fs::write(repo.join("blobs").join("b2"), r#"{"n_layer": 3}"#).unwrap();
        let snap = repo.join("snapshots").join(hash);
        std::os::unix::fs::symlink("../../blobs/b1", snap.join(SINGLE_FILE)).unwrap();
        std::os::unix::fs::symlink("../../blobs/b2", snap.join("config.json")).unwrap();

        assert_eq!(resolve_hf("org/name", None, cache.path()).unwrap(), snap);
        assert_eq!(resolve_hf("org/name", Some("main"), cache.path()).unwrap(), snap);
        assert_eq!(
            resolve_hf("org/name", Some("feedbeef"), cache.path()).unwrap(),
            repo.join("snapshots").join("feedbeef")
        );
        let m = load_model_with_cache("hf:org/name", Path::new("."), Some(cache.path())).unwrap();
        assert_eq!(m.root, snap);
        assert_eq!(m.tensors["w"].len, 6);
        assert_eq!(m.num_layers(), Some(3));
        assert_eq!(m.reference, "hf:org/name");

        let e = resolve_hf("org/other", None, cache.path()).unwrap_err();
        assert!(matches!(e, ModelError::HfNotCached { .. }), "{e}");
        assert_eq!(e.code(), Code::E0403);
        assert_eq!(e.path(), cache.path());
        let help = e.help().unwrap();
        assert!(help.contains(&cache.path().display().to_string()), "{help}");
        assert!(help.contains("hf download org/other"), "{help}");
        let e = load_model_with_cache("hf:org/name@v2", Path::new("."), Some(cache.path())).unwrap_err();
        assert!(matches!(e, ModelError::HfNotCached { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "model `hf:org/name@v2` is not in the Hugging Face cache"
        );
        assert!(e.help().unwrap().contains("--revision v2"));

        for bad in [
            "hf:",
            "hf:a/b/c",
            "hf:../x",
            "hf:org/name@",
            "hf:org/name@../../x",
        ] {
            let e = load_model_with_cache(bad, Path::new("."), Some(cache.path())).unwrap_err();
            assert!(matches!(e, ModelError::NotAModel { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn model_index_loads_each_reference_once() {
        let dir = tempfile::tempdir().unwrap();
        write_st(&dir.path().join("a.safetensors"), &[("x", 1)]);
        let mut index = ModelIndex::load(["a.safetensors", "missing", "a.safetensors"], dir.path());
        assert_eq!(index.iter().count(), 2);
        assert!(matches!(index.get("a.safetensors"), Some(Ok(_))));
        assert!(matches!(
            index.get("missing"),
            Some(Err(ModelError::NotFound { .. }))
        ));
        assert!(index.get("other").is_none());
        index.insert(
            "other".to_owned(),
            Err(ModelError::NotFound {
                path: PathBuf::from("other"),
            }),
        );
        assert!(index.get("other").is_some());
    }
}
