//! Stage 2, check: `ast::Script` + the models' headers -> [`hir::Program`].
//!
//! Collects every error it can (E02xx names and calls, E03xx types and tensors, E04xx
//! models and files) instead of stopping at the first; an expression that failed evaluates
//! to `Value::Error`, which raises nothing further.
//!
//! This module holds the entry point [`check`], the checker's state and statements;
//! [`expr`] checks expressions, [`calls`] method calls and their arguments, [`surgery`]
//! layer ranges, `stack`, `select`, `graft` and `rename`, [`save`] the save options, and
//! [`moe`] the `moe(...)` call, [`lora`] the `lora(...)` call (a PEFT adapter applied).

mod calls;
mod expr;
pub mod hir;
mod instantiate;
mod lora;
pub mod methods;
mod moe;
pub(crate) mod names;
pub(crate) mod params;
mod save;
pub use save::output_folder_problem;
mod surgery;
mod templates;
mod value;
mod vocab;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use crate::diag::{Code, Diagnostic, Diagnostics};
use crate::io::ModelIndex;
use crate::ops::Compute;
use crate::source::Span;
use crate::syntax::ast::{self, Expr, ExprKind, StmtKind};
use hir::ModelId;
use value::{MExpr, ModelVal, TensorSig, Value};

/// The names `set` accepts.
pub const SETTINGS: [&str; 3] = ["seed", "max_memory", "compute"];

/// The deepest model expression accepted (E0210): every operation, merge, layer range,
/// `stack`, `graft` or `rename` over a model adds a level, through `let` bindings too.
/// Instantiation and the stages after it walk these trees recursively.
pub const MAX_MODEL_DEPTH: u32 = 256;

/// The deepest expression a tensor of a saved model may be computed with (E0210): graph
/// lowering and the kernels walk it recursively. Each operation is a level, and 16-bit
/// compute adds a rounding after each; a merge method takes one to seven levels.
pub const MAX_TENSOR_DEPTH: u32 = 512;

/// The most operations the tensors of all saved models may take in all (E0211), once
/// shared `let` bindings are expanded: each tensor is a tree, so a binding used twice is
/// computed twice, and a chain of such bindings doubles at every step.
pub const MAX_TENSOR_OPS: u64 = 500_000;

/// How many unknown names get a "did you mean" suggestion; the text output shows only the
/// first diagnostics anyway, and each suggestion compares the name with every binding.
const MAX_SUGGESTIONS: usize = 100;

/// Default output shard size, as mergekit's `--out-shard-size` (5e9 bytes).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// What `check` needs besides the script and the models.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Relative output folders resolve against this (the script's folder).
    pub base_dir: PathBuf,
    /// Whether existing non-empty output folders may be replaced.
    pub force: bool,
    /// The compute dtype of every save (`--compute`), over the script's own choice.
    pub compute: Option<Compute>,
}

/// A checked program, with the warnings found on the way.
#[derive(Debug)]
pub struct Checked {
    pub program: hir::Program,
    pub warnings: Diagnostics,
}

pub use lora::adapter_references;

/// Every model path a script declares, in order (to build the [`ModelIndex`] from).
pub fn model_references(script: &ast::Script) -> Vec<&str> {
    script
        .stmts
        .iter()
        .filter_map(|s| match &s.kind {
            StmtKind::Model { path, .. } => Some(path.value.as_str()),
            _ => None,
        })
        .collect()
}

pub fn check(
    script: &ast::Script,
    script_text: &str,
    models: &ModelIndex,
    options: &CheckOptions,
) -> Result<Checked, Diagnostics> {
    let mut checker = Checker {
        script_text,
        index: models,
        options,
        models: Vec::new(),
        env: HashMap::new(),
        diags: Diagnostics::new(),
        outputs: Vec::new(),
        output_dirs: HashMap::new(),
        seed: 0,
        seed_span: None,
        max_memory: None,
        compute: None,
        depths: HashMap::new(),
        ops_left: MAX_TENSOR_OPS,
        suggestions_left: MAX_SUGGESTIONS,
        adapter_ids: HashMap::new(),
    };
    // Settings apply to the whole script, wherever they are written.
    for stmt in &script.stmts {
        if let StmtKind::Set { name, value } = &stmt.kind {
            checker.setting(name, value);
        }
    }
    for stmt in &script.stmts {
        checker.stmt(stmt);
    }
    checker.warn_unused();
    let mut diags = checker.diags;
    let program = hir::Program {
        models: checker.models,
        outputs: checker.outputs,
        script_text: script_text.trim_end().into(),
        mergekit_config: None,
        seed: checker.seed,
        max_memory: checker.max_memory,
    };
    if !diags.has_errors() {
        instantiate::warn_unread_inputs(&program, &mut diags);
    }
    diags.sort();
    if diags.has_errors() {
        Err(diags)
    } else {
        Ok(Checked {
            program,
            warnings: diags,
        })
    }
}

struct Binding {
    value: Value,
    span: Span,
    used: bool,
    is_model: bool,
}

struct Checker<'a> {
    script_text: &'a str,
    index: &'a ModelIndex,
    options: &'a CheckOptions,
    models: Vec<hir::InputModel>,
    env: HashMap<String, Binding>,
    diags: Diagnostics,
    outputs: Vec<hir::Output>,
    /// The folder of each output so far (to find two saves to one folder at once).
    output_dirs: HashMap<PathBuf, Span>,
    seed: u64,
    seed_span: Option<Span>,
    max_memory: Option<u64>,
    /// `set compute = ...`: the default compute dtype of the saves.
    compute: Option<(Compute, Span)>,
    /// The depth of every model expression measured so far (E0210). Each entry holds its
    /// expression, so that no address is reused while the checker runs.
    depths: HashMap<*const MExpr, (Rc<MExpr>, u32)>,
    /// Operations left to instantiate the tensors of the saves with (E0211).
    ops_left: u64,
    /// Unknown names that may still get a "did you mean" suggestion.
    suggestions_left: usize,
    /// The input model of each adapter applied, by reference (each read once).
    adapter_ids: HashMap<String, ModelId>,
}

impl Checker<'_> {
    /// The depth of a model expression (an input model is 1 deep), without recursion:
    /// expressions are shared (a `let` used twice), and each is measured once.
    fn model_depth(&mut self, root: &Rc<MExpr>) -> u32 {
        let mut stack: Vec<(&Rc<MExpr>, bool)> = vec![(root, false)];
        while let Some((e, children_done)) = stack.pop() {
            if self.depths.contains_key(&Rc::as_ptr(e)) {
                continue;
            }
            let children = e.children();
            if children_done {
                let depth = children
                    .iter()
                    .map(|c| self.depths.get(&Rc::as_ptr(c)).map_or(0, |d| d.1))
                    .max()
                    .unwrap_or(0)
                    + 1;
                self.depths.insert(Rc::as_ptr(e), (Rc::clone(e), depth));
            } else {
                stack.push((e, true));
                stack.extend(
                    children
                        .into_iter()
                        .filter(|c| !self.depths.contains_key(&Rc::as_ptr(c)))
                        .map(|c| (c, false)),
                );
            }
        }
        self.depths.get(&Rc::as_ptr(root)).map_or(0, |d| d.1)
    }

    fn error(&mut self, d: Diagnostic) -> Value {
        self.diags.push(d);
        Value::Error
    }

    fn stmt(&mut self, stmt: &ast::Stmt) {
        match &stmt.kind {
            StmtKind::Model { name, path } => {
                let value = self.declare_model(name, path);
                self.bind(name, value, true);
            }
            StmtKind::Let { name, value } => {
                let value = self.expr(value);
                self.bind(name, value, false);
            }
            StmtKind::Save { value, dir, options } => self.save(stmt.span, value, dir, options),
            StmtKind::Set { .. } => {}
        }
    }

    /// `set seed = N`: the seed of every random mask (a whole number below 2^53).
    fn setting(&mut self, name: &ast::Ident, value: &Expr) {
        match name.name.as_str() {
            "seed" if self.seed_span.is_some() => {
                let mut d =
                    Diagnostic::error(Code::E0209, "`seed` is set twice").at(name.span, "set again here");
                if let Some(first) = self.seed_span {
                    d = d.with_label(first, "first set here");
                }
                self.diags
                    .push(d.with_help("a script has one seed: keep one `set seed`"));
            }
            "seed" => match &value.kind {
                ExprKind::Number(v) if v.fract() == 0.0 && *v >= 0.0 && *v < 9_007_199_254_740_992.0 => {
                    self.seed = *v as u64;
                    self.seed_span = Some(name.span);
                }
                _ => self.diags.push(
                    Diagnostic::error(Code::E0305, "`seed` must be a whole number, at least 0")
                        .at(value.span, "not a valid seed")
                        .with_help("for example `set seed = 42`"),
                ),
            },
            "max_memory" if self.max_memory.is_some() => self.diags.push(
                Diagnostic::error(Code::E0209, "`max_memory` is set twice")
                    .at(name.span, "set again here")
                    .with_help("a script has one memory budget: keep one `set max_memory`"),
            ),
            "max_memory" => match &value.kind {
                ExprKind::Size(n) if *n > 0 => self.max_memory = Some(*n),
                _ => self.diags.push(
                    Diagnostic::error(Code::E0305, "`max_memory` must be a size above 0")
                        .at(value.span, "not a memory size")
                        .with_help("for example `set max_memory = 8GB`"),
                ),
            },
            "compute" => {
                if let Some((_, first)) = self.compute {
                    self.diags.push(
                        Diagnostic::error(Code::E0209, "`compute` is set twice")
                            .at(name.span, "set again here")
                            .with_label(first, "first set here")
                            .with_help("a script has one default compute dtype: keep one `set compute`"),
                    );
                } else if let Some(c) = self.compute_option(value) {
                    self.compute = Some((c, name.span));
                }
            }
            other => {
                let mut d = Diagnostic::error(Code::E0209, format!("unknown setting `{other}`"))
                    .at(name.span, "no such setting");
                d = match names::did_you_mean(other, SETTINGS) {
                    Some(s) => d.with_help(format!("did you mean `{s}`?")),
                    None => d.with_help(format!("the settings are: {}", SETTINGS.join(", "))),
                };
                self.diags.push(d);
            }
        }
    }

    fn bind(&mut self, name: &ast::Ident, value: Value, is_model: bool) {
        if matches!(name.name.as_str(), "true" | "false") {
            self.diags.push(
                Diagnostic::error(
                    Code::E0202,
                    format!("`{}` is a built-in name and cannot be redefined", name.name),
                )
                .at(name.span, "built in")
                .with_help("choose another name"),
            );
            return;
        }
        if let Some(previous) = self.env.get(&name.name) {
            let d = Diagnostic::error(Code::E0202, format!("`{}` is defined twice", name.name))
                .at(name.span, "defined again here")
                .with_label(previous.span, "first defined here")
                .with_help("give the second one another name");
            self.diags.push(d);
            return;
        }
        self.env.insert(
            name.name.clone(),
            Binding {
                value,
                span: name.span,
                used: false,
                is_model,
            },
        );
    }

    fn declare_model(&mut self, name: &ast::Ident, path: &ast::StrLit) -> Value {
        let info = match self.index.get(&path.value) {
            Some(Ok(info)) => Arc::clone(info),
            Some(Err(e)) => {
                let mut d = Diagnostic::error(e.code(), e.to_string()).at(path.span, "this model");
                if let Some(help) = e.help() {
                    d = d.with_help(help);
                }
                return self.error(d);
            }
            None => {
                return self.error(
                    Diagnostic::bug(format!("model `{}` was not loaded", path.value)).at(path.span, ""),
                )
            }
        };
        let id = ModelId(self.models.len() as u32);
        let tensors: BTreeMap<String, TensorSig> = info
            .tensors
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    TensorSig {
                        shape: t.shape.clone(),
                        dtype: t.dtype,
                    },
                )
            })
            .collect();
        let layers = names::main_layer_count(tensors.keys())
            .or_else(|| info.num_layers())
            .unwrap_or(0);
        self.models.push(hir::InputModel {
            name: name.name.clone(),
            info,
            span: name.span,
            adapter: false,
        });
        Value::Model(ModelVal {
            expr: Rc::new(MExpr::Input(id)),
            tensors: Rc::new(tensors),
            layer_sources: (0..layers).map(|i| (id, i)).collect(),
            span: name.span,
            inputs: vec![id],
            params: Vec::new(),
        })
    }

    fn warn_unused(&mut self) {
        let mut unused: Vec<(&String, &Binding)> = self.env.iter().filter(|(_, b)| !b.used).collect();
        unused.sort_by_key(|(_, b)| b.span);
        for (name, b) in unused {
            let what = if b.is_model { "model" } else { "binding" };
            self.diags.push(
                Diagnostic::error(Code::W0001, format!("unused {what} `{name}`"))
                    .at(b.span, "never used")
                    .with_help(if b.is_model {
                        "remove it, or use it in a merge; an unused model is not read"
                    } else {
                        "remove it, or save it; unused bindings are not computed"
                    }),
            );
        }
    }
}

/// E0301: a value of the wrong kind; `span` is labelled with what `found` is.
fn wrong_type(message: impl Into<String>, span: Span, found: &Value) -> Diagnostic {
    Diagnostic::error(Code::E0301, message).at(span, format!("this is {}", found.describe()))
}

/// Input models in order of first appearance, each once.
fn union_inputs<'a>(ids: impl IntoIterator<Item = &'a ModelId>) -> Vec<ModelId> {
    let mut out: Vec<ModelId> = Vec::new();
    for id in ids {
        if !out.contains(id) {
            out.push(*id);
        }
    }
    out
}

/// The methods a saved model is made with, outermost first, for its model card: a walk
/// in pre-order, without recursion, each shared expression once.
fn describe(expr: &Rc<MExpr>) -> Vec<hir::Construct> {
    use hir::Construct;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![expr];
    while let Some(e) = stack.pop() {
        if !seen.insert(Rc::as_ptr(e)) {
            continue;
        }
        let construct = match &**e {
            MExpr::Input(_) | MExpr::Rename { .. } => None,
            MExpr::Layers { .. } => Some(Construct::LayerSelection),
            MExpr::Stack { .. } => Some(Construct::Stack),
            MExpr::Neg(_) | MExpr::Scale(..) | MExpr::Divide(..) | MExpr::Add(..) | MExpr::Sub(..) => {
                Some(Construct::Arithmetic)
            }
            MExpr::Graft { .. } => Some(Construct::Graft),
            MExpr::Moe(_) => Some(Construct::Moe),
            MExpr::Method(call) => Some(Construct::Method(call.sig.method)),
            MExpr::Lora(_) => Some(Construct::Lora),
        };
        if let Some(c) = construct.filter(|c| !out.contains(c)) {
            out.push(c);
        }
        let mut children = e.children();
        // A graft lists the part before what it is grafted onto.
        if let MExpr::Graft { onto, part, .. } = &**e {
            children = vec![part, onto];
        }
        stack.extend(children.into_iter().rev());
    }
    out
}
