//! Extracting a LoRA adapter from a fine-tune: per module a truncated SVD of
//! `W_finetune − W_base`, written as a PEFT adapter folder.
//!
//! Three steps, each with its own errors:
//!
//! 1. [`plan`] (headers only): the two models must have the same tensors with the same
//!    shapes; every tensor gets a [`Role`] from its name and shape, and the largest SVD
//!    must fit the memory budget. Nothing is read yet.
//! 2. [`extract`]: the tensors are read (memory-mapped) and compared; the delta of each
//!    target module is decomposed ([`svd`]), modules in parallel within the budget.
//! 3. [`write`] ([`peft`]): `adapter_model.safetensors` and `adapter_config.json`,
//!    through the atomic output writer (temporary folder, `.mergec` marker, `--force`).
//!
//! A module stage like `driver`: it uses `io`, `diag`, `sema`'s output-folder check and
//! the CPU executor's dtype conversions.

pub mod peft;
pub mod svd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use rayon::prelude::*;
use regex::Regex;

use crate::diag::{Code, Diagnostic, Diagnostics};
use crate::io::model::{load_model, ModelInfo};
use crate::io::{writer, DType, TensorReader};

pub use svd::Method;

/// How the SVD is chosen: by size ([`svd::choose_method`]), or always one way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SvdChoice {
    #[default]
    Auto,
    Exact,
    Randomized,
}

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// The largest rank kept per module.
    pub rank: usize,
    /// Singular values at or below this are dropped (a module's rank may be lower).
    pub sv_epsilon: f32,
    /// Regexes over module names (`re.search` semantics): with any, only modules that
    /// match one are in the adapter.
    pub include: Vec<String>,
    /// Regexes over module names: modules that match one are left out.
    pub exclude: Vec<String>,
    pub svd: SvdChoice,
    /// The most bytes the SVDs in flight may hold together.
    pub max_memory: Option<u64>,
    /// Modules decomposed at once (at most).
    pub threads: usize,
    /// Replace an output folder mergec wrote before.
    pub force: bool,
}

impl Options {
    pub fn new(rank: usize) -> Options {
        Options {
            rank,
            sv_epsilon: 0.0,
            include: Vec::new(),
            exclude: Vec::new(),
            svd: SvdChoice::Auto,
            max_memory: None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            force: false,
        }
    }
}

/// What a tensor of the fine-tune becomes in the adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The weight of a linear module: its delta is decomposed into `lora_A` / `lora_B`.
    Target {
        rows: usize,
        cols: usize,
        method: Method,
    },
    /// The bias of a target module: its delta becomes `lora_B.bias` (PEFT's `lora_bias`).
    TargetBias,
    /// Embeddings, output heads and tensors that are not matrices: if it differs from the
    /// base, its module is saved whole (`modules_to_save`).
    Whole,
    /// Left out by `--include` / `--exclude`, or a tensor no PEFT module can hold (no
    /// module name): if it differs, the adapter does not carry the difference (W0030).
    LeftOut,
}

/// One tensor of the fine-tune and its role.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    /// The module the tensor belongs to: the name without its last component.
    pub module: String,
    pub role: Role,
}

/// What [`plan`] found: every tensor's role, in name order.
#[derive(Debug)]
pub struct Plan {
    pub entries: Vec<Entry>,
    /// The most bytes one module's SVD holds (its delta and the SVD's workspace).
    pub largest_job_bytes: u64,
    /// The bytes of every module's factors at the full rank, held until written.
    pub factor_bytes: u64,
    /// The rank asked for and the epsilon, as given.
    pub rank: usize,
    pub sv_epsilon: f32,
}

/// Names of modules that are embeddings or output heads: saved whole, as
/// mergekit-extract-lora does by default (`--no-embed-lora`).
fn is_embedding(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    last.contains("embed") || matches!(last, "lm_head" | "wte" | "wpe" | "output" | "embed_out")
}

/// The compiled `--include` / `--exclude` patterns, or E0920 for one that does not parse.
fn compile_patterns(options: &Options) -> Result<(Vec<Regex>, Vec<Regex>), Diagnostics> {
    let mut diags = Diagnostics::new();
    let mut compile = |patterns: &[String], flag: &str| {
        patterns
            .iter()
            .filter_map(|p| match Regex::new(p) {
                Ok(r) => Some(r),
                Err(e) => {
                    diags.push(
                        Diagnostic::error(Code::E0920, format!("`--{flag} {p}` is not a valid regular expression"))
                            .with_note(e.to_string())
                            .with_help("patterns are regular expressions searched in module names, e.g. `self_attn` or `layers\\.(0|1)\\.`"),
                    );
                    None
                }
            })
            .collect::<Vec<_>>()
    };
    let include = compile(&options.include, "include");
    let exclude = compile(&options.exclude, "exclude");
    if diags.is_empty() {
        Ok((include, exclude))
    } else {
        Err(diags)
    }
}

/// Checks the options alone (E0920).
pub fn check_options(options: &Options) -> Result<(), Diagnostics> {
    let mut diags = Diagnostics::new();
    if options.rank == 0 {
        diags.push(
            Diagnostic::error(Code::E0920, "rank 0 keeps nothing of the fine-tune")
                .with_help("give a rank of at least 1, e.g. `--rank 32`"),
        );
    }
    if !(options.sv_epsilon.is_finite() && options.sv_epsilon >= 0.0) {
        diags.push(
            Diagnostic::error(
                Code::E0920,
                format!(
                    "sv-epsilon {} is not a finite number at least 0",
                    options.sv_epsilon
                ),
            )
            .with_help("singular values at or below sv-epsilon are dropped; 0 keeps every nonzero one"),
        );
    }
    if let Err(d) = compile_patterns(options) {
        diags.extend(d);
    }
    if diags.is_empty() {
        Ok(())
    } else {
        Err(diags)
    }
}

/// Loads a model reference (folder, `.safetensors` file or `hf:org/name`) from headers.
pub fn load(reference: &str, base_dir: &Path, what: &str) -> Result<ModelInfo, Diagnostics> {
    load_model(reference, base_dir).map_err(|e| {
        let mut d = Diagnostic::error(e.code(), format!("{what}: {e}"));
        if let Some(help) = e.help() {
            d = d.with_help(help);
        }
        Diagnostics::from(d)
    })
}

/// Lists at most a few names, for messages.
fn some_names<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.into_iter().collect();
    let shown: Vec<String> = names.iter().take(3).map(|n| format!("`{n}`")).collect();
    match names.len() {
        n if n > 3 => format!("{} and {} more", shown.join(", "), n - 3),
        _ => shown.join(", "),
    }
}

/// Step 1, from headers: the roles of the fine-tune's tensors. Refuses models whose
/// tensor sets (E0921) or shapes (E0922) differ, and an SVD bigger than the memory
/// budget (E0924).
pub fn plan(finetune: &ModelInfo, base: &ModelInfo, options: &Options) -> Result<Plan, Diagnostics> {
    check_options(options)?;
    let (include, exclude) = compile_patterns(options)?;
    let mut diags = Diagnostics::new();
    let only_ft: Vec<&str> = finetune
        .tensors
        .keys()
        .filter(|n| !base.tensors.contains_key(*n))
        .map(String::as_str)
        .collect();
    let only_base: Vec<&str> = base
        .tensors
        .keys()
        .filter(|n| !finetune.tensors.contains_key(*n))
        .map(String::as_str)
        .collect();
    for (names, has, lacks) in [(&only_ft, finetune, base), (&only_base, base, finetune)] {
        if !names.is_empty() {
            diags.push(
                Diagnostic::error(
                    Code::E0921,
                    format!(
                        "{} tensor{} of `{}` {} not in `{}`: {}",
                        names.len(),
                        if names.len() == 1 { "" } else { "s" },
                        has.reference,
                        if names.len() == 1 { "is" } else { "are" },
                        lacks.reference,
                        some_names(names.iter().copied())
                    ),
                )
                .with_help("extract from a fine-tune of this base: both must have the same tensors"),
            );
        }
    }
    let mut entries = Vec::new();
    let mut largest_job_bytes = 0u64;
    let mut factor_bytes = 0u64;
    // Modules whose weight is a target: their biases are carried as `lora_B.bias`.
    let mut target_modules = std::collections::BTreeSet::new();
    for (name, ft) in &finetune.tensors {
        let Some(b) = base.tensors.get(name) else {
            continue;
        };
        if ft.shape != b.shape {
            diags.push(
                Diagnostic::error(
                    Code::E0922,
                    format!(
                        "tensor `{name}` is {:?} in `{}` but {:?} in `{}`",
                        ft.shape, finetune.reference, b.shape, base.reference
                    ),
                )
                .with_help(if is_embedding(module_of(name)) {
                    "a fine-tune with a resized vocabulary has no adapter on this base: resize the base's embeddings first, or extract from a fine-tune that keeps the vocabulary"
                } else {
                    "extract from a fine-tune of this base: every tensor must keep its shape"
                }),
            );
            continue;
        }
        let module = module_of(name);
        let selected = !module.is_empty()
            && (include.is_empty() || include.iter().any(|r| r.is_match(module)))
            && !exclude.iter().any(|r| r.is_match(module));
        let float = ft.dtype.is_mergeable() && b.dtype.is_mergeable();
        let role = if !selected {
            Role::LeftOut
        } else if ft.shape.len() == 2 && name.ends_with(".weight") && float && !is_embedding(module) {
            let (rows, cols) = (ft.shape[0], ft.shape[1]);
            let method = match options.svd {
                SvdChoice::Auto => svd::choose_method(rows, cols, options.rank),
                SvdChoice::Exact => Method::Exact,
                SvdChoice::Randomized => Method::Randomized,
            };
            let bytes = (rows as u64 * cols as u64 * 4).saturating_add(svd::workspace_bytes(
                rows,
                cols,
                options.rank,
                method,
            ));
            largest_job_bytes = largest_job_bytes.max(bytes);
            let kept = options.rank.min(rows.min(cols)) as u64;
            factor_bytes = factor_bytes.saturating_add(kept * (rows as u64 + cols as u64) * 4);
            target_modules.insert(module.to_owned());
            Role::Target { rows, cols, method }
        } else {
            Role::Whole
        };
        entries.push(Entry {
            name: name.clone(),
            module: module.to_owned(),
            role,
        });
    }
    // A target's bias is carried by the LoRA layer; the rest of its module (rare) cannot be.
    for e in &mut entries {
        if target_modules.contains(&e.module) && !matches!(e.role, Role::Target { .. }) {
            let is_bias = e.name.ends_with(".bias")
                && finetune
                    .tensors
                    .get(&e.name)
                    .is_some_and(|t| t.shape.len() == 1 && t.dtype.is_mergeable())
                && base.tensors.get(&e.name).is_some_and(|t| t.dtype.is_mergeable());
            e.role = if is_bias { Role::TargetBias } else { Role::LeftOut };
        }
    }
    let needed = largest_job_bytes.saturating_add(factor_bytes);
    if let Some(budget) = options.max_memory.filter(|b| needed > *b) {
        diags.push(
            Diagnostic::error(
                Code::E0924,
                format!(
                    "the largest module's SVD needs {} (and the factors kept until written {}) but the memory budget is {}",
                    human_bytes(largest_job_bytes),
                    human_bytes(factor_bytes),
                    human_bytes(budget)
                ),
            )
            .with_help("raise --max-memory, or leave the largest modules out with --exclude"),
        );
    }
    if diags.is_empty() {
        Ok(Plan {
            entries,
            largest_job_bytes,
            factor_bytes,
            rank: options.rank,
            sv_epsilon: options.sv_epsilon,
        })
    } else {
        Err(diags)
    }
}

/// The module a tensor belongs to: its name without the last component.
fn module_of(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(module, _)| module)
}

/// One decomposed module.
#[derive(Clone, Debug)]
pub struct Decomposed {
    pub module: String,
    /// The dtype A and B are written in: the fine-tune's.
    pub dtype: DType,
    pub rank: usize,
    pub rows: usize,
    pub cols: usize,
    /// `rank × cols`, row-major.
    pub a: Vec<f32>,
    /// `rows × rank`, row-major.
    pub b: Vec<f32>,
    /// `‖ΔW‖²_F` and the part the kept singular values carry (`Σ σ²` over the kept ones).
    pub delta_energy: f64,
    pub kept_energy: f64,
    pub method: Method,
}

/// What [`extract`] found.
#[derive(Debug, Default)]
pub struct Extraction {
    /// Modules with a nonzero delta, by name.
    pub modules: Vec<Decomposed>,
    /// Biases of target modules that differ: module -> (dtype, delta).
    pub biases: BTreeMap<String, (DType, Vec<f32>)>,
    /// Tensors saved whole (their modules are `modules_to_save`), by name.
    pub whole: Vec<String>,
    /// Tensors that differ but are not in the adapter (W0030).
    pub left_out: Vec<String>,
    /// Target modules whose delta is zero (or all singular values ≤ sv-epsilon).
    pub unchanged_targets: usize,
}

/// Why extraction failed after the plan.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Read(#[from] crate::io::reader::ReadError),
    #[error("tensor `{name}` of `{model}` holds {what}")]
    NotFinite {
        name: String,
        model: String,
        what: &'static str,
    },
    #[error("the SVD of `{name}` failed: {source}")]
    Svd { name: String, source: svd::SvdError },
    #[error(transparent)]
    Write(#[from] writer::WriteError),
}

impl ExtractError {
    pub fn code(&self) -> Code {
        match self {
            ExtractError::Read(_) => Code::E0402,
            ExtractError::NotFinite { .. } => Code::E0925,
            ExtractError::Svd {
                source: svd::SvdError::OutOfMemory(_),
                ..
            } => Code::E0924,
            // Never seen with finite input (checked first): a bug, not the user's input.
            ExtractError::Svd { .. } => Code::E0001,
            ExtractError::Write(e) => crate::sema::output_folder_problem(e).0,
        }
    }

    pub fn to_diagnostic(&self) -> Diagnostic {
        let d = Diagnostic::error(self.code(), self.to_string());
        match self {
            ExtractError::NotFinite { .. } => {
                d.with_help("a delta with NaN or infinite entries has no SVD; check the model files")
            }
            ExtractError::Svd { .. } => {
                d.with_help("lower --max-memory's share per module: pass --threads 1, or --svd randomized")
            }
            ExtractError::Write(e) => d.with_help(crate::sema::output_folder_problem(e).1),
            ExtractError::Read(_) => d,
        }
    }
}

/// A budget of bytes that jobs take before they start and give back when done.
struct Budget {
    left: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn take(&self, bytes: u64) {
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        while *left < bytes {
            left = self.freed.wait(left).unwrap_or_else(|p| p.into_inner());
        }
        *left -= bytes;
    }

    fn give(&self, bytes: u64) {
        *self.left.lock().unwrap_or_else(|p| p.into_inner()) += bytes;
        self.freed.notify_all();
    }
}

/// What one tensor turned out to be.
enum Outcome {
    Same,
    Decomposed(Box<Decomposed>),
    ZeroRank,
    Bias(String, DType, Vec<f32>),
    Whole(String),
    LeftOut(String),
}

/// Step 2: reads and compares every tensor, decomposes the deltas of target modules.
/// SVDs run in parallel (at most `options.threads`), each taking its bytes from the
/// memory budget first, so the deltas and workspaces in flight stay within it.
pub fn extract(
    plan: &Plan,
    finetune: &ModelInfo,
    base: &ModelInfo,
    reader: &TensorReader,
    options: &Options,
) -> Result<Extraction, ExtractError> {
    // The factors of decomposed modules stay until written: their share is set aside.
    let for_svds = options
        .max_memory
        .map_or(u64::MAX, |b| b.saturating_sub(plan.factor_bytes));
    let budget = Budget {
        left: Mutex::new(for_svds.max(plan.largest_job_bytes)),
        freed: Condvar::new(),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads.max(1))
        .build()
        .map_err(|e| {
            ExtractError::Write(writer::WriteError::Io {
                path: PathBuf::from("."),
                source: std::io::Error::other(e),
            })
        })?;
    // Largest first: the long SVDs start early and the small ones fill the gaps.
    let mut order: Vec<&Entry> = plan.entries.iter().collect();
    order.sort_by_key(|e| match e.role {
        Role::Target { rows, cols, .. } => std::cmp::Reverse(rows as u64 * cols as u64),
        _ => std::cmp::Reverse(0),
    });
    let outcomes: Vec<Outcome> = pool.install(|| {
        order
            .par_iter()
            .map(|entry| examine(entry, plan, finetune, base, reader, &budget))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let mut out = Extraction::default();
    for outcome in outcomes {
        match outcome {
            Outcome::Same => {}
            Outcome::Decomposed(d) => out.modules.push(*d),
            Outcome::ZeroRank => out.unchanged_targets += 1,
            Outcome::Bias(module, dtype, delta) => {
                out.biases.insert(module, (dtype, delta));
            }
            Outcome::Whole(name) => out.whole.push(name),
            Outcome::LeftOut(name) => out.left_out.push(name),
        }
    }
    out.modules.sort_by(|a, b| a.module.cmp(&b.module));
    out.whole.sort();
    out.left_out.sort();
    // A bias whose module has no LoRA layer (its weight did not change) has nowhere to go.
    let decomposed: std::collections::BTreeSet<&str> =
        out.modules.iter().map(|d| d.module.as_str()).collect();
    let orphans: Vec<String> = out
        .biases
        .keys()
        .filter(|m| !decomposed.contains(m.as_str()))
        .cloned()
        .collect();
    for module in orphans {
        out.biases.remove(&module);
        out.left_out.push(format!("{module}.bias"));
    }
    out.left_out.sort();
    Ok(out)
}

fn examine(
    entry: &Entry,
    plan: &Plan,
    finetune: &ModelInfo,
    base: &ModelInfo,
    reader: &TensorReader,
    budget: &Budget,
) -> Result<Outcome, ExtractError> {
    let ft_bytes = reader.read(finetune, &entry.name)?;
    let base_bytes = reader.read(base, &entry.name)?;
    let (Some(ft_info), Some(base_info)) = (finetune.tensors.get(&entry.name), base.tensors.get(&entry.name))
    else {
        return Ok(Outcome::Same);
    };
    let same = ft_info.dtype == base_info.dtype && ft_bytes[..] == base_bytes[..];
    let outcome = if same {
        Outcome::Same
    } else {
        match &entry.role {
            Role::Whole => Outcome::Whole(entry.name.clone()),
            Role::LeftOut => Outcome::LeftOut(entry.name.clone()),
            Role::TargetBias => {
                let delta = delta_of(entry, finetune, base, &ft_bytes, &base_bytes)?;
                Outcome::Bias(entry.module.clone(), ft_info.dtype, delta)
            }
            Role::Target { rows, cols, method } => {
                let (rows, cols, method) = (*rows, *cols, *method);
                let bytes = (rows as u64 * cols as u64 * 4)
                    .saturating_add(svd::workspace_bytes(rows, cols, plan.rank, method));
                budget.take(bytes);
                let result = decompose(
                    entry,
                    plan,
                    finetune,
                    base,
                    (&ft_bytes, &base_bytes),
                    (rows, cols, method),
                );
                budget.give(bytes);
                match result? {
                    Some(d) => Outcome::Decomposed(Box::new(d)),
                    None => Outcome::ZeroRank,
                }
            }
        }
    };
    // The pages are not needed again (a whole tensor is read again when written).
    ft_bytes.release();
    base_bytes.release();
    Ok(outcome)
}

/// `finetune − base` in f32; NaN or infinite entries in either are an error (E0925).
fn delta_of(
    entry: &Entry,
    finetune: &ModelInfo,
    base: &ModelInfo,
    ft_bytes: &[u8],
    base_bytes: &[u8],
) -> Result<Vec<f32>, ExtractError> {
    let decode = |model: &ModelInfo, bytes: &[u8]| -> Result<Vec<f32>, ExtractError> {
        let dtype = model.tensors.get(&entry.name).map_or(DType::F32, |t| t.dtype);
        let mut values = vec![0f32; bytes.len() / dtype.size_bytes()];
        crate::exec::cpu::decode(bytes, dtype, &mut values);
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(ExtractError::NotFinite {
                name: entry.name.clone(),
                model: model.reference.clone(),
                what: if bad.is_nan() { "NaN" } else { "an infinite value" },
            });
        }
        Ok(values)
    };
    let mut delta = decode(finetune, ft_bytes)?;
    let base_values = decode(base, base_bytes)?;
    for (d, b) in delta.iter_mut().zip(&base_values) {
        *d -= b;
    }
    if let Some(i) = delta.iter().position(|v| !v.is_finite()) {
        let _ = i;
        return Err(ExtractError::NotFinite {
            name: entry.name.clone(),
            model: format!("{} − {}", finetune.reference, base.reference),
            what: "an infinite difference",
        });
    }
    Ok(delta)
}

fn decompose(
    entry: &Entry,
    plan: &Plan,
    finetune: &ModelInfo,
    base: &ModelInfo,
    (ft_bytes, base_bytes): (&[u8], &[u8]),
    (rows, cols, method): (usize, usize, Method),
) -> Result<Option<Decomposed>, ExtractError> {
    let delta = delta_of(entry, finetune, base, ft_bytes, base_bytes)?;
    let matrix = faer::MatRef::from_row_major_slice(&delta, rows, cols);
    let delta_energy: f64 = delta.iter().map(|&v| f64::from(v).powi(2)).sum();
    let result = svd::top_svd(matrix, plan.rank, method).map_err(|source| ExtractError::Svd {
        name: entry.name.clone(),
        source,
    })?;
    let rank = svd::kept_rank(&result.s, plan.rank, plan.sv_epsilon);
    if rank == 0 {
        return Ok(None);
    }
    let kept_energy = result.s[..rank].iter().map(|&s| f64::from(s).powi(2)).sum();
    let (a, b) = svd::lora_factors(&result, rank);
    let dtype = finetune.tensors.get(&entry.name).map_or(DType::F32, |t| t.dtype);
    Ok(Some(Decomposed {
        module: entry.module.clone(),
        dtype,
        rank,
        rows,
        cols,
        a,
        b,
        delta_energy,
        kept_energy,
        method,
    }))
}

/// Step 3: writes the adapter folder. See [`peft`].
pub use peft::write;

/// What a whole extraction did, for the command line.
#[derive(Debug)]
pub struct Report {
    pub written: writer::WrittenModel,
    pub modules: usize,
    pub max_rank: usize,
    pub min_rank: usize,
    pub whole_modules: usize,
    pub unchanged_targets: usize,
    /// Fraction of the deltas' squared Frobenius norm the adapter keeps (1 = exact).
    pub kept_fraction: f64,
    /// Modules decomposed exactly / by the randomized SVD.
    pub exact: usize,
    pub randomized: usize,
    pub warnings: Diagnostics,
}

/// W0030 for differing tensors the adapter does not carry.
fn left_out_warning(left_out: &[String]) -> Option<Diagnostic> {
    if left_out.is_empty() {
        return None;
    }
    Some(
        Diagnostic::error(
            Code::W0030,
            format!(
                "{} tensor{} differ{} from the base but {} not in the adapter: {}",
                left_out.len(),
                if left_out.len() == 1 { "" } else { "s" },
                if left_out.len() == 1 { "s" } else { "" },
                if left_out.len() == 1 { "is" } else { "are" },
                some_names(left_out.iter().map(String::as_str))
            ),
        )
        .with_help("they are excluded by --include / --exclude, or belong to a target module that LoRA cannot carry; a model with the adapter applied keeps the base's values there"),
    )
}

/// Loads both models, plans, extracts and writes: the whole of `mergec extract-lora`.
pub fn run(
    finetune: &str,
    base: &str,
    out: &Path,
    base_dir: &Path,
    options: &Options,
) -> Result<Report, Diagnostics> {
    check_options(options)?;
    let ft_model = load(finetune, base_dir, "the fine-tune");
    let base_model = load(base, base_dir, "the base");
    let (ft_model, base_model) = match (ft_model, base_model) {
        (Ok(f), Ok(b)) => (f, b),
        (f, b) => {
            let mut diags = Diagnostics::new();
            for d in [f.err(), b.err()].into_iter().flatten() {
                diags.extend(d);
            }
            return Err(diags);
        }
    };
    let plan = plan(&ft_model, &base_model, options)?;
    let protected: Vec<PathBuf> = ft_model
        .protected_paths()
        .into_iter()
        .chain(base_model.protected_paths())
        .collect();
    writer::check_output_target(out, options.force, &protected, None)
        .map_err(|e| ExtractError::Write(e).to_diagnostic())?;
    let reader = TensorReader::new();
    let extraction =
        extract(&plan, &ft_model, &base_model, &reader, options).map_err(|e| e.to_diagnostic())?;
    if extraction.modules.is_empty() && extraction.whole.is_empty() {
        return Err(Diagnostic::error(
            Code::E0923,
            format!(
                "`{}` does not differ from `{}` in any module the adapter would hold",
                ft_model.reference, base_model.reference
            ),
        )
        .with_help(if options.include.is_empty() {
            "the two models have the same weights (up to sv-epsilon): there is nothing to extract"
        } else {
            "check --include / --exclude: the modules they select have the same weights in both models"
        })
        .into());
    }
    let mut warnings = Diagnostics::new();
    if let Some(w) = left_out_warning(&extraction.left_out) {
        warnings.push(w);
    }
    let spec = peft::AdapterSpec {
        out,
        base_reference: &base_model.reference,
        force: options.force,
        protected,
    };
    let written = peft::write(&spec, &extraction, &ft_model, &reader).map_err(|e| e.to_diagnostic())?;
    let delta: f64 = extraction.modules.iter().map(|m| m.delta_energy).sum();
    let kept: f64 = extraction.modules.iter().map(|m| m.kept_energy).sum();
    Ok(Report {
        written,
        modules: extraction.modules.len(),
        max_rank: extraction.modules.iter().map(|m| m.rank).max().unwrap_or(0),
        min_rank: extraction.modules.iter().map(|m| m.rank).min().unwrap_or(0),
        whole_modules: peft::saved_modules(&extraction).len(),
        unchanged_targets: extraction.unchanged_targets,
        kept_fraction: if delta > 0.0 { (kept / delta).min(1.0) } else { 1.0 },
        exact: extraction
            .modules
            .iter()
            .filter(|m| m.method == Method::Exact)
            .count(),
        randomized: extraction
            .modules
            .iter()
            .filter(|m| m.method == Method::Randomized)
            .count(),
        warnings,
    })
}

/// Bytes in powers of 1000, for messages.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
