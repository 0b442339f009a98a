//! Chains the stages for the CLI and tests: source file -> checked, optimised, scheduled.

use std::path::{Path, PathBuf};

use crate::diag::{Code, Diagnostic, Diagnostics};
use crate::graph::Graph;
use crate::io::ModelIndex;
use crate::ops::Compute;
use crate::plan::{Limits, Plan};
use crate::sema::{hir, CheckOptions};
use crate::source::{SourceId, SourceMap};
use crate::syntax::ast;

/// Everything `mergec check` computes; `mergec run` executes `plan`.
#[derive(Debug)]
pub struct Compiled {
    pub ast: ast::Script,
    pub program: hir::Program,
    /// The graph as lowered, before optimisation.
    pub lowered: Graph,
    /// The optimised graph the plan is made from.
    pub graph: Graph,
    pub plan: Plan,
    pub warnings: Diagnostics,
}

/// A script loaded from disk (or given as text) with the folder its relative paths use.
pub struct Script {
    pub sources: SourceMap,
    pub id: SourceId,
    pub base_dir: PathBuf,
    /// The mergekit YAML the script was translated from, if any (written beside each
    /// output as mergekit_config.yml, so the hub's merge tooling recognises the model).
    pub mergekit_config: Option<String>,
    /// `--compute`: the compute dtype of every save, over the script's own choice.
    pub compute: Option<Compute>,
}

/// The largest script or mergekit config mergec reads: 16 MiB.
pub const MAX_SOURCE_BYTES: u64 = 16 << 20;

/// Why a script or config could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// Not read at all: a message that names the file (missing, not a regular file, too
    /// large, an I/O error).
    Unreadable(String),
    /// Not UTF-8 (E0104): the diagnostic points at the first bad byte in a copy of the
    /// text where each bad sequence is U+FFFD.
    NotUtf8 {
        sources: SourceMap,
        diagnostics: Diagnostics,
    },
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Unreadable(message) => f.write_str(message),
            ReadError::NotUtf8 { diagnostics, .. } => match diagnostics.iter().next() {
                Some(d) => write!(f, "[{}] {}", d.code, d.message),
                None => f.write_str("not valid UTF-8"),
            },
        }
    }
}

impl std::error::Error for ReadError {}

/// Reads a script or config: a regular file (checked before anything is read, so that a
/// FIFO or a device is refused by name instead of blocking or running forever) of at
/// most [`MAX_SOURCE_BYTES`], in UTF-8.
pub fn read_source(path: &Path) -> Result<String, ReadError> {
    use std::io::Read;
    let shown = path.display();
    let unreadable = |why: String| ReadError::Unreadable(format!("cannot read `{shown}`: {why}"));
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        // Opening a FIFO for reading would wait for a writer.
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| unreadable(e.to_string()))?;
    let meta = file.metadata().map_err(|e| unreadable(e.to_string()))?;
    if !meta.is_file() {
        return Err(unreadable(format!(
            "it is {}, not a regular file",
            file_kind(&meta)
        )));
    }
    let too_large = |size: String| {
        unreadable(format!(
            "it is {size}; a script or config may be at most {} MiB",
            MAX_SOURCE_BYTES >> 20
        ))
    };
    if meta.len() > MAX_SOURCE_BYTES {
        return Err(too_large(format!("{} bytes", meta.len())));
    }
    // The size can change after the check (or be wrong, as in /proc): read with the cap.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_SOURCE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(e.to_string()))?;
    if bytes.len() as u64 > MAX_SOURCE_BYTES {
        return Err(too_large(format!("more than {MAX_SOURCE_BYTES} bytes")));
    }
    String::from_utf8(bytes).map_err(|e| not_utf8(&shown.to_string(), path, e))
}

/// What a file that is not a regular one is, in words.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let kind = meta.file_type();
    if kind.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    "not a file"
}

/// E0104 at the first byte that is not UTF-8.
fn not_utf8(name: &str, path: &Path, e: std::string::FromUtf8Error) -> ReadError {
    let at = e.utf8_error().valid_up_to();
    let bytes = e.as_bytes();
    let bad = bytes[at..]
        .iter()
        .take(e.utf8_error().error_len().unwrap_or(bytes.len() - at))
        .map(|b| format!("0x{b:02X}"))
        .collect::<Vec<_>>()
        .join(" ");
    let text = String::from_utf8_lossy(bytes).into_owned();
    let mut sources = SourceMap::new();
    let id = sources.add(name, Some(path.to_path_buf()), text);
    let replacement = char::REPLACEMENT_CHARACTER.len_utf8();
    let diagnostic = Diagnostic::error(
        Code::E0104,
        format!("`{name}` is not UTF-8 text: the byte at offset {at} ({bad}) is not valid UTF-8"),
    )
    .at(
        crate::source::Span::new(id, at, at + replacement),
        format!("byte offset {at}: {bad}"),
    )
    .with_help("scripts and configs are UTF-8 text: save the file as UTF-8");
    ReadError::NotUtf8 {
        sources,
        diagnostics: Diagnostics::from(diagnostic),
    }
}

impl Script {
    /// Reads a script with [`read_source`]; its relative paths resolve against its folder.
    pub fn from_file(path: &Path) -> Result<Script, ReadError> {
        let text = read_source(path)?;
        let base_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Script::from_text(&path.display().to_string(), text, base_dir))
    }

    pub fn from_text(name: &str, text: String, base_dir: PathBuf) -> Script {
        let mut sources = SourceMap::new();
        let id = sources.add(name, None, text);
        Script {
            sources,
            id,
            base_dir,
            mergekit_config: None,
            compute: None,
        }
    }

    pub fn text(&self) -> &str {
        &self.sources.get(self.id).text
    }
}

/// parse -> load headers -> check -> lower -> optimize -> schedule (+ plan check).
pub fn compile(script: &Script, force: bool, limits: &Limits) -> Result<Compiled, Diagnostics> {
    let ast = crate::syntax::parse(&script.sources, script.id)?;
    let mut index = ModelIndex::load(crate::sema::model_references(&ast), &script.base_dir);
    index.load_adapters(crate::sema::adapter_references(&ast), &script.base_dir);
    let options = CheckOptions {
        base_dir: script.base_dir.clone(),
        force,
        compute: script.compute,
    };
    let mut checked = crate::sema::check(&ast, script.text(), &index, &options)?;
    checked.program.mergekit_config = script.mergekit_config.as_deref().map(Into::into);
    let graph = crate::graph::lower(&checked.program);
    let internal = |d: Box<Diagnostic>| Diagnostics::from(*d);
    crate::graph::verify(&graph).map_err(internal)?;
    let (optimised, _) = crate::opt::optimize(graph.clone()).map_err(internal)?;
    let plan = crate::plan::schedule(&optimised, &checked.program, limits, force)?;
    Ok(Compiled {
        ast,
        program: checked.program,
        lowered: graph,
        graph: optimised,
        plan,
        warnings: checked.warnings,
    })
}

/// A stage whose output `mergec debug` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Ast,
    Hir,
    /// The graph as lowered.
    Graph,
    /// The graph after optimisation.
    Opt,
    Plan,
    /// The WGSL of every generated element-wise kernel of the plan.
    Wgsl,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Ast,
        Stage::Hir,
        Stage::Graph,
        Stage::Opt,
        Stage::Plan,
        Stage::Wgsl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Ast => "ast",
            Stage::Hir => "hir",
            Stage::Graph => "graph",
            Stage::Opt => "opt",
            Stage::Plan => "plan",
            Stage::Wgsl => "wgsl",
        }
    }
}

/// The stable text form of one stage's output: what `mergec debug STAGE` prints and the
/// stage snapshots record.
pub fn dump(compiled: &Compiled, stage: Stage) -> String {
    match stage {
        Stage::Ast => crate::syntax::ast::dump(&compiled.ast),
        Stage::Hir => hir::dump(&compiled.program),
        Stage::Graph => crate::graph::dump(&compiled.lowered),
        Stage::Opt => crate::graph::dump(&compiled.graph),
        Stage::Plan => crate::plan::dump(&compiled.plan),
        Stage::Wgsl => crate::kernels::dump(&compiled.plan),
    }
}
