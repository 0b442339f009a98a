//! Stage 2, check: `ast::Script` + the models' headers -> [`hir::Program`].
//!
//! Collects every error it can (E02xx names and calls, E03xx types and tensors, E04xx
//! models and files) instead of stopping at the first; an expression that failed evaluates
//! to `Value::Error`, which raises nothing further.

pub mod hir;
mod instantiate;
pub mod methods;
mod moe;
pub(crate) mod names;
pub(crate) mod params;
mod templates;
mod value;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use crate::diag::{Code, Diagnostic, Diagnostics};
use crate::io::{DType, ModelIndex};
use crate::source::Span;
use crate::syntax::ast::{self, Arg, BinOp, Expr, ExprKind, Named, StmtKind};
use hir::ModelId;
use methods::{MethodSig, ParamKind};
use params::{Param, Pattern, TableArm};
use value::{ArgValue, CallModel, MExpr, MethodCall, ModelVal, ParamEntry, TensorSig, Value};

/// Default output shard size, as mergekit's `--out-shard-size` (5e9 bytes).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// A built-in's arguments: positional models, positional strings, named strings.
type BuiltinArgs = (
    Vec<(ModelVal, Span)>,
    Vec<(String, Span)>,
    BTreeMap<String, (String, Span)>,
);

/// What `check` needs besides the script and the models.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Relative output folders resolve against this (the script's folder).
    pub base_dir: PathBuf,
    /// Whether existing non-empty output folders may be replaced.
    pub force: bool,
}

/// A checked program, with the warnings found on the way.
#[derive(Debug)]
pub struct Checked {
    pub program: hir::Program,
    pub warnings: Diagnostics,
}

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
        seed: 0,
        seed_span: None,
        max_memory: None,
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
        script_text: script_text.to_string(),
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
    seed: u64,
    seed_span: Option<Span>,
    max_memory: Option<u64>,
}

impl Checker<'_> {
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
            other => {
                let mut d = Diagnostic::error(Code::E0209, format!("unknown setting `{other}`"))
                    .at(name.span, "no such setting");
                d = match names::did_you_mean(other, ["seed", "max_memory"]) {
                    Some(s) => d.with_help(format!("did you mean `{s}`?")),
                    None => d.with_help("the settings are: seed, max_memory"),
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

    fn expr(&mut self, expr: &Expr) -> Value {
        match &expr.kind {
            ExprKind::Number(v) => Value::Param(Param::Number(*v)),
            ExprKind::Size(v) => Value::Size(*v),
            ExprKind::Str(_) => Value::Str,
            ExprKind::Name(name) => self.name(name, expr.span),
            ExprKind::List(items) => self.list(items, expr.span),
            ExprKind::Neg(inner) => match self.expr(inner) {
                Value::Param(Param::Number(v)) => Value::Param(Param::Number(-v)),
                Value::Model(m) => {
                    let m = self.no_params(m);
                    self.derive(&m, expr.span, MExpr::Neg(Rc::clone(&m.expr)))
                }
                Value::Error => Value::Error,
                other => self.error(
                    Diagnostic::error(Code::E0301, format!("cannot negate {}", other.describe()))
                        .at(inner.span, format!("this is {}", other.describe())),
                ),
            },
            ExprKind::Binary { op, lhs, rhs } => self.binary(*op, lhs, rhs, expr.span),
            ExprKind::Call { func, args } => self.call(func, args, expr.span),
            ExprKind::Params { target, params } => self.param_block(target, params, expr.span),
            ExprKind::Layers {
                target,
                start,
                end,
                range_span,
            } => self.layers(target, *start, *end, *range_span, expr.span),
            ExprKind::Match(arms) => self.table(arms, expr.span),
        }
    }

    fn name(&mut self, name: &str, span: Span) -> Value {
        if let Some(binding) = self.env.get_mut(name) {
            binding.used = true;
            return match binding.value.clone() {
                // Diagnostics about this use point here, not at the declaration.
                Value::Model(m) => Value::Model(ModelVal { span, ..m }),
                other => other,
            };
        }
        match name {
            "true" => return Value::Bool(true),
            "false" => return Value::Bool(false),
            _ => {}
        }
        let mut d = Diagnostic::error(Code::E0201, format!("unknown name `{name}`")).at(span, "not defined");
        let candidates: Vec<&str> = self.env.keys().map(String::as_str).collect();
        if let Some(s) = names::did_you_mean(name, candidates) {
            d = d.with_help(format!("did you mean `{s}`?"));
        } else if methods::lookup(name).is_some() {
            d = d.with_help(format!(
                "`{name}` is a merge method: call it, e.g. `{name}(a, b)`"
            ));
        } else {
            d = d.with_help("declare models with `model NAME = \"path\"` and values with `let NAME = ...`, before their use");
        }
        self.error(d)
    }

    fn list(&mut self, items: &[Expr], span: Span) -> Value {
        if items.is_empty() {
            return self.error(
                Diagnostic::error(Code::E0301, "empty list")
                    .at(span, "a list needs at least one element")
                    .with_help(
                        "a list is either a layer gradient `[0, 0.5, 1]` or a list of models `[a, b]`",
                    ),
            );
        }
        let values: Vec<(Value, Span)> = items.iter().map(|e| (self.expr(e), e.span)).collect();
        if values.iter().any(|(v, _)| matches!(v, Value::Error)) {
            return Value::Error;
        }
        if values
            .iter()
            .all(|(v, _)| matches!(v, Value::Param(Param::Number(_))))
        {
            let numbers: Vec<f64> = values
                .iter()
                .filter_map(|(v, _)| match v {
                    Value::Param(Param::Number(x)) => Some(*x),
                    _ => None,
                })
                .collect();
            return Value::Param(Param::Gradient(numbers.into()));
        }
        if values.iter().all(|(v, _)| matches!(v, Value::Model(_))) {
            let models = values
                .into_iter()
                .filter_map(|(v, _)| match v {
                    Value::Model(m) => Some(m),
                    _ => None,
                })
                .collect();
            return Value::Models(models);
        }
        let (first, first_span) = &values[0];
        let expect_models = matches!(first, Value::Model(_));
        let (odd, odd_span) = values
            .iter()
            .find(|(v, _)| {
                matches!(v, Value::Model(_)) != expect_models
                    || !matches!(v, Value::Model(_) | Value::Param(Param::Number(_)))
            })
            .map(|(v, s)| (v.describe(), *s))
            .unwrap_or(("a different kind of value", span));
        let expected = if expect_models { "a model" } else { "a number" };
        self.error(
            Diagnostic::error(Code::E0301, format!("expected {expected}, found {odd} in a list"))
                .at(odd_span, format!("this is {odd}"))
                .with_label(*first_span, format!("the list starts with {}", first.describe()))
                .with_help("a list is either a layer gradient `[0, 0.5, 1]` (numbers only) or a list of models `[a, b]`"),
        )
    }

    fn table(&mut self, arms: &[ast::MatchArm], span: Span) -> Value {
        let mut out = Vec::new();
        let mut failed = false;
        let mut wildcard_at: Option<Span> = None;
        for arm in arms {
            if let Some(w) = wildcard_at {
                self.diags.push(
                    Diagnostic::error(Code::E0305, "this arm can never match")
                        .at(arm.span, "unreachable")
                        .with_label(w, "`_` matches every tensor first")
                        .with_help("move `_` to the end of the table"),
                );
            }
            let value = match self.expr(&arm.value) {
                Value::Param(p) => p,
                Value::Error => {
                    failed = true;
                    continue;
                }
                other => {
                    failed = true;
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0301,
                            format!("expected a number, found {}", other.describe()),
                        )
                        .at(arm.value.span, format!("this is {}", other.describe()))
                        .with_help("table values are numbers, layer gradients or nested tables"),
                    );
                    continue;
                }
            };
            if arm.pattern.is_none() {
                wildcard_at = Some(arm.span);
            }
            out.push(TableArm {
                pattern: arm.pattern.as_ref().map(|p| Pattern::new(&p.value)),
                value,
                span: arm.span,
            });
        }
        if out.is_empty() && !failed {
            return self.error(
                Diagnostic::error(Code::E0301, "empty table").at(span, "a table needs at least one arm"),
            );
        }
        if failed {
            Value::Error
        } else {
            Value::Param(Param::Table(out.into()))
        }
    }

    /// A model value derived from `from` by `expr`, with the same tensors.
    fn derive(&self, from: &ModelVal, span: Span, expr: MExpr) -> Value {
        Value::Model(ModelVal {
            expr: Rc::new(expr),
            tensors: Rc::clone(&from.tensors),
            layer_sources: Rc::clone(&from.layer_sources),
            span,
            inputs: from.inputs.clone(),
            params: Vec::new(),
        })
    }

    /// Warns when a parameter block is attached where no method call consumes it.
    fn no_params(&mut self, m: ModelVal) -> ModelVal {
        if let Some(first) = m.params.first() {
            let span = m.params.iter().fold(first.span, |s, p| s.join(p.span));
            self.diags.push(
                Diagnostic::error(Code::W0003, "per-model parameters are ignored here")
                    .at(span, "not inside a merge method call")
                    .with_help("per-model parameters belong to a model passed to a method: `linear(a { weight: 0.5 }, b { weight: 0.5 })`"),
            );
        }
        ModelVal {
            params: Vec::new(),
            ..m
        }
    }

    fn binary(&mut self, op: BinOp, lhs_e: &Expr, rhs_e: &Expr, span: Span) -> Value {
        let lhs = self.expr(lhs_e);
        let rhs = self.expr(rhs_e);
        match (op, lhs, rhs) {
            (_, Value::Error, _) | (_, _, Value::Error) => Value::Error,
            (_, Value::Param(Param::Number(a)), Value::Param(Param::Number(b))) => {
                let v = match op {
                    BinOp::Add => a + b,
                    BinOp::Sub => a - b,
                    BinOp::Mul => a * b,
                    BinOp::Div => {
                        if b == 0.0 {
                            return self.error(
                                Diagnostic::error(Code::E0305, "division by zero")
                                    .at(rhs_e.span, "this is 0"),
                            );
                        }
                        a / b
                    }
                };
                Value::Param(Param::Number(v))
            }
            (BinOp::Add | BinOp::Sub, Value::Model(a), Value::Model(b)) => {
                let a = self.no_params(a);
                let b = self.no_params(b);
                if !self.same_tensors(&a, lhs_e.span, &b, rhs_e.span, op.symbol()) {
                    return Value::Error;
                }
                let expr = match op {
                    BinOp::Add => MExpr::Add(Rc::clone(&a.expr), Rc::clone(&b.expr)),
                    _ => MExpr::Sub(Rc::clone(&a.expr), Rc::clone(&b.expr)),
                };
                let inputs = union_inputs(a.inputs.iter().chain(&b.inputs));
                Value::Model(ModelVal {
                    expr: Rc::new(expr),
                    tensors: Rc::clone(&a.tensors),
                    layer_sources: Rc::clone(&a.layer_sources),
                    span,
                    inputs,
                    params: Vec::new(),
                })
            }
            (BinOp::Mul, Value::Param(p), Value::Model(m))
            | (BinOp::Mul, Value::Model(m), Value::Param(p)) => {
                let m = self.no_params(m);
                let factor_span = if matches!(self.peek_kind(lhs_e), Some(true)) {
                    rhs_e.span
                } else {
                    lhs_e.span
                };
                self.derive(&m, span, MExpr::Scale(Rc::clone(&m.expr), p, factor_span))
            }
            (BinOp::Div, Value::Model(m), Value::Param(p)) => {
                if p.literals().iter().any(|v| *v as f32 == 0.0) {
                    let label = if matches!(p, Param::Number(_)) {
                        "this is 0"
                    } else {
                        "this can be 0"
                    };
                    return self.error(
                        Diagnostic::error(Code::E0305, "division by zero")
                            .at(rhs_e.span, label)
                            .with_help("a model can only be divided by a non-zero number"),
                    );
                }
                let m = self.no_params(m);
                self.derive(&m, span, MExpr::Divide(Rc::clone(&m.expr), p, rhs_e.span))
            }
            (op, lhs, rhs) => {
                let (l, r) = (lhs.describe(), rhs.describe());
                let help = match op {
                    BinOp::Add | BinOp::Sub => "models add to models and numbers to numbers; to scale a model, multiply it: `0.5 * a`",
                    BinOp::Mul => "a model can be multiplied by a number, not by another model",
                    BinOp::Div => "a model can be divided by a number; a number cannot be divided by a model",
                };
                self.error(
                    Diagnostic::error(
                        Code::E0301,
                        format!("cannot apply `{}` to {l} and {r}", op.symbol()),
                    )
                    .at(span, "")
                    .with_label(lhs_e.span, format!("this is {l}"))
                    .with_label(rhs_e.span, format!("this is {r}"))
                    .with_help(help),
                )
            }
        }
    }

    /// Whether an expression is syntactically a model (used only to point at the factor).
    fn peek_kind(&self, e: &Expr) -> Option<bool> {
        match &e.kind {
            ExprKind::Number(_) | ExprKind::List(_) | ExprKind::Match(_) => Some(false),
            ExprKind::Name(n) => self.env.get(n).map(|b| matches!(b.value, Value::Model(_))),
            _ => Some(true),
        }
    }

    /// Checks that two models have the same tensor names and shapes; reports differences
    /// grouped by layer, with both spans.
    fn same_tensors(&mut self, a: &ModelVal, a_span: Span, b: &ModelVal, b_span: Span, what: &str) -> bool {
        let a_names: BTreeSet<&str> = a.tensors.keys().map(String::as_str).collect();
        let b_names: BTreeSet<&str> = b.tensors.keys().map(String::as_str).collect();
        let only_a: Vec<&str> = a_names.difference(&b_names).copied().collect();
        let only_b: Vec<&str> = b_names.difference(&a_names).copied().collect();
        let mut ok = true;
        if !only_a.is_empty() || !only_b.is_empty() {
            ok = false;
            let mut d = Diagnostic::error(
                Code::E0302,
                format!("the models combined by `{what}` have different tensors"),
            )
            .at(b_span, format!("this model has {} tensors", b_names.len()))
            .with_label(a_span, format!("this model has {} tensors", a_names.len()));
            if let (Some(la), Some(lb)) = (a.layers(), b.layers()) {
                if la != lb {
                    d = d.with_note(format!(
                        "the left model has {la} layers and the right one {lb}: models combined layer by layer need as many layers (ranges of equal length)"
                    ));
                }
            }
            if !only_a.is_empty() {
                d = d.with_note(format!(
                    "{} tensors of the left model are missing from the right one:\n{}",
                    only_a.len(),
                    names::bullet_list(&names::grouped(only_a.iter().copied()), 8)
                ));
            }
            if !only_b.is_empty() {
                d = d.with_note(format!(
                    "{} tensors of the right model are missing from the left one:\n{}",
                    only_b.len(),
                    names::bullet_list(&names::grouped(only_b.iter().copied()), 8)
                ));
            }
            d = d.with_help(
                "merge models of the same architecture, or select matching layers with `.layers[a..b]`",
            );
            self.diags.push(d);
        }
        let mismatched: Vec<(&String, &TensorSig, &TensorSig)> = a
            .tensors
            .iter()
            .filter_map(|(n, sa)| {
                b.tensors
                    .get(n)
                    .filter(|sb| sb.shape != sa.shape)
                    .map(|sb| (n, sa, sb))
            })
            .collect();
        if let Some((name, sa, sb)) = mismatched.first() {
            ok = false;
            let mut d = Diagnostic::error(
                Code::E0303,
                format!(
                    "shape mismatch: `{name}` is {:?} on the left but {:?} on the right",
                    sa.shape, sb.shape
                ),
            )
            .at(b_span, format!("`{name}` is {:?} here", sb.shape))
            .with_label(a_span, format!("`{name}` is {:?} here", sa.shape));
            if mismatched.len() > 1 {
                let others: Vec<String> = mismatched[1..]
                    .iter()
                    .map(|(n, x, y)| format!("{n}: {:?} vs {:?}", x.shape, y.shape))
                    .collect();
                d = d.with_note(format!(
                    "{} more tensors differ in shape:\n{}",
                    others.len(),
                    names::bullet_list(&others, 5)
                ));
            }
            d = d.with_help("the models must have the same architecture and sizes");
            self.diags.push(d);
        }
        ok
    }

    fn param_block(&mut self, target: &Expr, params: &[Named], span: Span) -> Value {
        let value = self.expr(target);
        let entries: Vec<ParamEntry> = params
            .iter()
            .map(|p| ParamEntry {
                name: p.name.clone(),
                value: self.expr(&p.value),
                span: p.name.span.join(p.value.span),
            })
            .collect();
        match value {
            Value::Model(mut m) => {
                m.params.extend(entries);
                m.span = span;
                Value::Model(m)
            }
            Value::Error => Value::Error,
            other => self.error(
                Diagnostic::error(
                    Code::E0301,
                    format!(
                        "parameters can only be attached to a model, not to {}",
                        other.describe()
                    ),
                )
                .at(target.span, format!("this is {}", other.describe())),
            ),
        }
    }

    fn layers(&mut self, target: &Expr, start: u64, end: u64, range_span: Span, span: Span) -> Value {
        let m = match self.expr(target) {
            Value::Model(m) => self.no_params(m),
            Value::Error => return Value::Error,
            other => {
                return self.error(
                    Diagnostic::error(
                        Code::E0301,
                        format!("`.layers[..]` needs a model, found {}", other.describe()),
                    )
                    .at(target.span, format!("this is {}", other.describe())),
                )
            }
        };
        let count = m.layers().unwrap_or(0);
        if start >= end || end > count as u64 {
            let why = if start >= end {
                format!("the range {start}..{end} is empty (the end is exclusive)")
            } else {
                format!("the model has {count} layers (0..{count})")
            };
            return self.error(
                Diagnostic::error(
                    Code::E0304,
                    format!("layer range {start}..{end} is out of bounds"),
                )
                .at(range_span, why)
                .with_label(target.span, format!("this model has {count} layers"))
                .with_help(format!("valid ranges lie within 0..{count}")),
            );
        }
        let (start, end) = (start as usize, end as usize);
        let module: Rc<str> = names::main_module(m.tensors.keys()).unwrap_or_default().into();
        let tensors: BTreeMap<String, TensorSig> = m
            .tensors
            .iter()
            .filter_map(|(name, sig)| match names::layer_in(name, &module) {
                // Tensors outside the layers (embeddings, final norm, lm_head) stay.
                None => Some((name.clone(), sig.clone())),
                Some((i, _)) => (start..end)
                    .contains(&i)
                    .then(|| (names::with_layer(name, i - start), sig.clone())),
            })
            .collect();
        Value::Model(ModelVal {
            expr: Rc::new(MExpr::Layers {
                inner: Rc::clone(&m.expr),
                start,
                module,
            }),
            tensors: Rc::new(tensors),
            layer_sources: m.layer_sources[start..end].into(),
            span,
            inputs: m.inputs.clone(),
            params: Vec::new(),
        })
    }

    fn call(&mut self, func: &ast::Ident, args: &[Arg], span: Span) -> Value {
        match func.name.as_str() {
            "stack" => return self.stack(args, span),
            "select" => return self.select(args, span),
            "graft" => return self.graft(args, span),
            "rename" => return self.rename(args, span),
            "moe" => return self.moe(args, span),
            _ => {}
        }
        let Some(sig) = methods::lookup(&func.name) else {
            let mut d = Diagnostic::error(Code::E0203, format!("unknown function `{}`", func.name))
                .at(func.span, "no such method");
            if let Some(s) = names::did_you_mean(&func.name, methods::METHODS.iter().map(|m| m.name)) {
                d = d.with_help(format!("did you mean `{s}`?"));
            } else {
                let all: Vec<&str> = methods::METHODS.iter().map(|m| m.name).collect();
                d = d.with_help(format!("the methods are: {}", all.join(", ")));
            }
            for a in args {
                let _ = match a {
                    Arg::Positional(e) => self.expr(e),
                    Arg::Named(n) => self.expr(&n.value),
                };
            }
            return self.error(d);
        };
        let mut models: Vec<ModelVal> = Vec::new();
        let mut base: Option<ModelVal> = None;
        let mut globals: BTreeMap<&'static str, ArgValue> = BTreeMap::new();
        let mut seen: HashMap<&str, Span> = HashMap::new();
        let mut failed = false;
        for arg in args {
            match arg {
                Arg::Positional(e) => {
                    match self.expr(e) {
                        Value::Model(m) => models.push(m),
                        Value::Models(ms) => models.extend(ms),
                        Value::Error => failed = true,
                        other => {
                            failed = true;
                            self.diags.push(
                            Diagnostic::error(Code::E0301, format!("expected a model, found {}", other.describe()))
                                .at(e.span, format!("this is {}", other.describe()))
                                .with_help(format!(
                                    "`{}` takes models as positional arguments and parameters by name, e.g. `{}`",
                                    sig.name,
                                    example_call(sig)
                                )),
                        );
                        }
                    }
                }
                Arg::Named(n) => {
                    if let Some(first) = seen.insert(n.name.name.as_str(), n.name.span) {
                        failed = true;
                        self.diags.push(
                            Diagnostic::error(
                                Code::E0207,
                                format!("argument `{}` is given twice", n.name.name),
                            )
                            .at(n.name.span, "given again here")
                            .with_label(first, "first given here"),
                        );
                        continue;
                    }
                    let value = self.expr(&n.value);
                    if n.name.name == "base" {
                        match self.base_argument(sig, &n.name, value, n.value.span) {
                            Some(m) => base = Some(m),
                            None => failed = true,
                        }
                        continue;
                    }
                    match self.arg_value(sig, &n.name, value, n.value.span, false) {
                        Some((name, v)) => {
                            globals.insert(name, v);
                        }
                        None => failed = true,
                    }
                }
            }
        }
        if sig.base == methods::Base::Required && !models.is_empty() {
            base = Some(models.remove(0));
        }
        if let Some(b) = base.take() {
            if let Some(first) = b.params.first() {
                let span = b.params.iter().fold(first.span, |s, p| s.join(p.span));
                self.diags.push(
                    Diagnostic::error(Code::W0003, "per-model parameters are ignored here")
                        .at(
                            span,
                            format!("the base model of `{}` takes no parameters", sig.name),
                        )
                        .with_help("the base is the reference the other models are merged against"),
                );
            }
            base = Some(ModelVal {
                params: Vec::new(),
                ..b
            });
        }
        if (sig.base == methods::Base::Required && base.is_none())
            || models.len() < sig.min_models
            || sig.max_models.is_some_and(|max| models.len() > max)
        {
            // An argument that failed (a model that did not load) has its own error: the
            // count is not the user's mistake.
            if failed {
                return Value::Error;
            }
            return self.error(self.arity_error(sig, base.is_some(), models.len(), span));
        }
        let mut all: Vec<&ModelVal> = base.iter().collect();
        all.extend(models.iter());
        for m in all.iter().skip(1) {
            if !self.same_tensors(all[0], all[0].span, m, m.span, sig.name) {
                failed = true;
            }
        }
        let Some(first) = all.first() else {
            return Value::Error;
        };
        let tensors = Rc::clone(&first.tensors);
        let layer_sources = Rc::clone(&first.layer_sources);
        let inputs = union_inputs(all.iter().flat_map(|m| m.inputs.iter()));
        let mut call_models = Vec::new();
        for m in models {
            let mut params: BTreeMap<&'static str, ArgValue> = BTreeMap::new();
            let mut bad_param = false;
            for entry in &m.params {
                if let Some(first) = m
                    .params
                    .iter()
                    .find(|p| p.name.name == entry.name.name && p.span != entry.span)
                {
                    if first.span.start < entry.span.start {
                        failed = true;
                        self.diags.push(
                            Diagnostic::error(
                                Code::E0207,
                                format!("parameter `{}` is given twice", entry.name.name),
                            )
                            .at(entry.name.span, "given again here")
                            .with_label(first.name.span, "first given here"),
                        );
                        continue;
                    }
                }
                match self.arg_value(sig, &entry.name, entry.value.clone(), entry.span, true) {
                    Some((name, v)) => {
                        params.insert(name, v);
                    }
                    None => {
                        failed = true;
                        bad_param = true;
                    }
                }
            }
            // Required per-model parameters must be set on the model or for the whole call.
            for p in sig
                .params
                .iter()
                .filter(|p| p.per_model && p.default == methods::Default::Required)
            {
                if !bad_param && !params.contains_key(p.name) && !globals.contains_key(p.name) {
                    failed = true;
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0205,
                            format!("missing argument `{}` for this model of `{}`", p.name, sig.name),
                        )
                        .at(m.span, format!("`{}` is not set for this model", p.name))
                        .with_help(format!(
                            "set it per model, `{}`, or once for all models, `{}(..., {}: 0.5)`",
                            "m { weight: 0.5 }".replace("weight", p.name),
                            sig.name,
                            p.name
                        )),
                    );
                }
            }
            call_models.push(CallModel {
                expr: m.expr,
                params,
                span: m.span,
            });
        }
        for p in sig
            .params
            .iter()
            .filter(|p| !p.per_model && p.default == methods::Default::Required)
        {
            if !globals.contains_key(p.name) {
                failed = true;
                self.diags.push(
                    Diagnostic::error(
                        Code::E0205,
                        format!("missing argument `{}` of `{}`", p.name, sig.name),
                    )
                    .at(span, format!("`{}` is required", p.name))
                    .with_help(format!("add `{}: ...` to the call", p.name)),
                );
            }
        }
        if failed {
            return Value::Error;
        }
        Value::Model(ModelVal {
            expr: Rc::new(MExpr::Method(MethodCall {
                sig,
                base: base.map(|b| b.expr),
                models: call_models,
                globals,
                span,
            })),
            tensors,
            layer_sources,
            span,
            inputs,
            params: Vec::new(),
        })
    }

    /// `stack(seg, ...; embed: m, head: m)`: the segments' layers one after another,
    /// renumbered; embeddings from the first segment (or `embed:`), the final norm and
    /// lm_head from the last (or `head:`).
    fn stack(&mut self, args: &[Arg], span: Span) -> Value {
        let mut segments: Vec<ModelVal> = Vec::new();
        let (mut embed, mut head): (Option<ModelVal>, Option<ModelVal>) = (None, None);
        let mut failed = false;
        for arg in args {
            let (name, e) = match arg {
                Arg::Positional(e) => (None, e),
                Arg::Named(n) => (Some(&n.name), &n.value),
            };
            let value = self.expr(e);
            let model = match value {
                Value::Model(m) => self.no_params(m),
                Value::Models(ms) if name.is_none() => {
                    segments.extend(ms.into_iter().map(|m| ModelVal {
                        params: Vec::new(),
                        ..m
                    }));
                    continue;
                }
                Value::Error => {
                    failed = true;
                    continue;
                }
                other => {
                    failed = true;
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0301,
                            format!("`stack` takes models, found {}", other.describe()),
                        )
                        .at(e.span, format!("this is {}", other.describe()))
                        .with_help("for example: `stack(a.layers[0..24], b.layers[8..32])`"),
                    );
                    continue;
                }
            };
            match name.map(|n| n.name.as_str()) {
                None => segments.push(model),
                Some("embed") => embed = Some(model),
                Some("head") => head = Some(model),
                Some(other) => {
                    failed = true;
                    let mut d = Diagnostic::error(Code::E0204, format!("`stack` has no parameter `{other}`"))
                        .at(name.map_or(e.span, |n| n.span), "unknown parameter");
                    d = match names::did_you_mean(other, ["embed", "head"]) {
                        Some(s) => d.with_help(format!("did you mean `{s}`?")),
                        None => d.with_help("`stack` takes `embed: m` and `head: m` to choose where the tensors outside the layers come from"),
                    };
                    self.diags.push(d);
                }
            }
        }
        if segments.is_empty() {
            if !failed {
                self.diags.push(
                    Diagnostic::error(Code::E0206, "`stack` takes at least 1 model, but got 0 models")
                        .at(span, "nothing to stack")
                        .with_help("for example: `stack(a.layers[0..24], b.layers[8..32])`"),
                );
            }
            return Value::Error;
        }
        // Every segment must have layers of one structure (names and shapes of layer 0).
        let module: Rc<str> = names::main_module(segments[0].tensors.keys())
            .unwrap_or_default()
            .into();
        let layer_zero = |m: &ModelVal| -> BTreeMap<String, TensorSig> {
            m.tensors
                .iter()
                .filter(|(n, _)| names::layer_in(n, &module).is_some_and(|(i, _)| i == 0))
                .map(|(n, s)| (n.clone(), s.clone()))
                .collect()
        };
        let first_layer = layer_zero(&segments[0]);
        for seg in &segments {
            if seg.layers().is_none() {
                failed = true;
                self.diags.push(
                    Diagnostic::error(Code::E0302, "this model has no layers to stack")
                        .at(seg.span, "no `layers.N` tensors")
                        .with_help("stack layer ranges of transformer models: `a.layers[0..8]`"),
                );
            }
        }
        if failed {
            return Value::Error;
        }
        for seg in segments.iter().skip(1) {
            let a = ModelVal {
                tensors: Rc::new(first_layer.clone()),
                ..segments[0].clone()
            };
            let b = ModelVal {
                tensors: Rc::new(layer_zero(seg)),
                ..seg.clone()
            };
            if !self.same_tensors(&a, segments[0].span, &b, seg.span, "stack") {
                return Value::Error;
            }
        }
        let pre_from = embed.unwrap_or_else(|| segments[0].clone());
        let post_from = head.unwrap_or_else(|| segments[segments.len() - 1].clone());
        let mut tensors: BTreeMap<String, TensorSig> = BTreeMap::new();
        for (name, sig) in pre_from
            .tensors
            .iter()
            .filter(|(n, _)| names::layer_in(n, &module).is_none() && names::stacks_before(n))
        {
            tensors.insert(name.clone(), sig.clone());
        }
        for (name, sig) in post_from
            .tensors
            .iter()
            .filter(|(n, _)| names::layer_in(n, &module).is_none() && !names::stacks_before(n))
        {
            tensors.insert(name.clone(), sig.clone());
        }
        let mut layer_sources: Vec<(ModelId, usize)> = Vec::new();
        let mut parts = Vec::with_capacity(segments.len());
        for seg in &segments {
            let offset = layer_sources.len();
            let len = seg.layers().unwrap_or(0);
            for (name, sig) in &*seg.tensors {
                if let Some((i, _)) = names::layer_in(name, &module) {
                    tensors.insert(names::with_layer(name, i + offset), sig.clone());
                }
            }
            layer_sources.extend(seg.layer_sources.iter().copied());
            parts.push(value::Segment {
                expr: Rc::clone(&seg.expr),
                offset,
                len,
            });
        }
        let inputs = union_inputs(
            pre_from
                .inputs
                .iter()
                .chain(segments.iter().flat_map(|s| s.inputs.iter()))
                .chain(post_from.inputs.iter()),
        );
        Value::Model(ModelVal {
            expr: Rc::new(MExpr::Stack {
                segments: parts,
                pre: Rc::clone(&pre_from.expr),
                post: Rc::clone(&post_from.expr),
                module,
            }),
            tensors: Rc::new(tensors),
            layer_sources: layer_sources.into(),
            span,
            inputs,
            params: Vec::new(),
        })
    }

    /// The positional models and strings and the named values of a built-in's call.
    fn builtin_args(&mut self, func: &str, args: &[Arg], named: &[&str]) -> Option<BuiltinArgs> {
        let (mut models, mut strings, mut named_out) = (Vec::new(), Vec::new(), BTreeMap::new());
        let mut failed = false;
        for arg in args {
            match arg {
                Arg::Positional(e) => match (&e.kind, self.expr(e)) {
                    (ExprKind::Str(s), _) => strings.push((s.clone(), e.span)),
                    (_, Value::Model(m)) => models.push((self.no_params(m), e.span)),
                    (_, Value::Error) => failed = true,
                    (_, other) => {
                        failed = true;
                        self.diags.push(
                            Diagnostic::error(
                                Code::E0301,
                                format!("`{func}` takes models and strings, found {}", other.describe()),
                            )
                            .at(e.span, format!("this is {}", other.describe())),
                        );
                    }
                },
                Arg::Named(n) => {
                    if !named.contains(&n.name.name.as_str()) {
                        failed = true;
                        let mut d = Diagnostic::error(
                            Code::E0204,
                            format!("`{func}` has no parameter `{}`", n.name.name),
                        )
                        .at(n.name.span, "unknown parameter");
                        if let Some(s) = names::did_you_mean(&n.name.name, named.iter().copied()) {
                            d = d.with_help(format!("did you mean `{s}`?"));
                        }
                        self.diags.push(d);
                        continue;
                    }
                    match &n.value.kind {
                        ExprKind::Str(s) => {
                            named_out.insert(n.name.name.clone(), (s.clone(), n.value.span));
                        }
                        _ => {
                            failed = true;
                            self.diags.push(
                                Diagnostic::error(Code::E0301, format!("`{}` expects a string", n.name.name))
                                    .at(n.value.span, "not a string"),
                            );
                        }
                    }
                }
            }
        }
        (!failed).then_some((models, strings, named_out))
    }

    /// `select(m, "pattern", ...; regex: "...")`: the tensors of `m` whose names match any
    /// pattern (substring, or a glob over the whole name when it has `*`) or the regex.
    fn select(&mut self, args: &[Arg], span: Span) -> Value {
        let Some((models, patterns, named)) = self.builtin_args("select", args, &["regex"]) else {
            return Value::Error;
        };
        let [(m, _)] = models.as_slice() else {
            return self.error(
                Diagnostic::error(
                    Code::E0206,
                    format!("`select` takes exactly 1 model, but got {} models", models.len()),
                )
                .at(span, "")
                .with_help("for example: `select(vlm, \"model.language_model.*\")`"),
            );
        };
        let regex = match named.get("regex") {
            Some((text, rspan)) => match regex::Regex::new(text) {
                Ok(r) => Some(r),
                Err(e) => {
                    return self.error(Diagnostic::error(Code::E0102, "invalid regular expression").at(
                        *rspan,
                        e.to_string().lines().last().unwrap_or("invalid").to_string(),
                    ))
                }
            },
            None => None,
        };
        if patterns.is_empty() && regex.is_none() {
            return self.error(
                Diagnostic::error(Code::E0205, "`select` needs at least one pattern")
                    .at(span, "no pattern")
                    .with_help("for example: `select(vlm, \"model.language_model.*\")` or `select(m, regex: \"layers\\.[0-3]\\.\")`"),
            );
        }
        let globs: Vec<params::Pattern> = patterns.iter().map(|(p, _)| params::Pattern::new(p)).collect();
        let tensors: BTreeMap<String, TensorSig> = m
            .tensors
            .iter()
            .filter(|(n, _)| {
                globs.iter().any(|g| g.matches(n)) || regex.as_ref().is_some_and(|r| r.is_match(n))
            })
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        if tensors.is_empty() {
            let shown: Vec<String> = patterns.iter().map(|(p, _)| format!("\"{p}\"")).collect();
            return self.error(
                Diagnostic::error(Code::E0305, "`select` matches no tensor")
                    .at(
                        patterns.first().map_or(span, |p| p.1),
                        format!("{} match nothing", shown.join(", ")),
                    )
                    .with_help(format!(
                        "the model's tensors look like `{}`",
                        m.tensors.keys().next().map_or("", String::as_str)
                    )),
            );
        }
        let same_main = names::main_module(tensors.keys()) == names::main_module(m.tensors.keys());
        let layer_sources = if same_main {
            Rc::clone(&m.layer_sources)
        } else {
            let count = names::main_layer_count(tensors.keys()).unwrap_or(0);
            let id = m.inputs.first().copied().unwrap_or(ModelId(0));
            (0..count).map(|i| (id, i)).collect()
        };
        Value::Model(ModelVal {
            expr: Rc::clone(&m.expr),
            tensors: Rc::new(tensors),
            layer_sources,
            span,
            inputs: m.inputs.clone(),
            params: Vec::new(),
        })
    }

    /// `graft(onto, part)`: `onto` with the tensors `part` has replaced by `part`'s, so a
    /// merged sub-module goes back into a full model (mergekit's fill_missing_params).
    fn graft(&mut self, args: &[Arg], span: Span) -> Value {
        let Some((models, strings, _)) = self.builtin_args("graft", args, &[]) else {
            return Value::Error;
        };
        let [(onto, onto_span), (part, part_span)] = models.as_slice() else {
            return self.error(
                Diagnostic::error(
                    Code::E0206,
                    format!("`graft` takes exactly 2 models, but got {} models", models.len()),
                )
                .at(span, "")
                .with_help(
                    "for example: `graft(vlm, linear(select(vlm, \"language_model\") { weight: 0.5 }, ...))`",
                ),
            );
        };
        if let Some((_, s)) = strings.first() {
            return self.error(
                Diagnostic::error(Code::E0301, "`graft` takes models, found a string")
                    .at(*s, "this is a string"),
            );
        }
        let extra: Vec<&str> = part
            .tensors
            .keys()
            .filter(|n| !onto.tensors.contains_key(*n))
            .map(String::as_str)
            .collect();
        if !extra.is_empty() {
            return self.error(
                Diagnostic::error(Code::E0302, format!("{} grafted tensors are not in the model grafted onto", extra.len()))
                    .at(*part_span, "grafted part")
                    .with_label(*onto_span, "grafted onto this model")
                    .with_note(format!("not in the target:\n{}", names::bullet_list(&names::grouped(extra), 8)))
                    .with_help("rename them to the target's names: `rename(m, \"model.layers.\", \"model.language_model.layers.\")`"),
            );
        }
        if let Some((name, a, b)) = part.tensors.iter().find_map(|(n, s)| {
            onto.tensors
                .get(n)
                .filter(|o| o.shape != s.shape)
                .map(|o| (n, o, s))
        }) {
            return self.error(
                Diagnostic::error(
                    Code::E0303,
                    format!(
                        "shape mismatch: `{name}` is {:?} in the target but {:?} in the grafted part",
                        a.shape, b.shape
                    ),
                )
                .at(*part_span, format!("`{name}` is {:?} here", b.shape))
                .with_label(*onto_span, format!("`{name}` is {:?} here", a.shape)),
            );
        }
        let inputs = union_inputs(onto.inputs.iter().chain(&part.inputs));
        Value::Model(ModelVal {
            expr: Rc::new(MExpr::Graft {
                onto: Rc::clone(&onto.expr),
                part: Rc::clone(&part.expr),
                part_names: Rc::new(part.tensors.keys().cloned().collect()),
            }),
            tensors: Rc::clone(&onto.tensors),
            layer_sources: Rc::clone(&onto.layer_sources),
            span,
            inputs,
            params: Vec::new(),
        })
    }

    /// `rename(m, "from", "to")`: tensors whose names start with `from` start with `to`
    /// instead (a text-only decoder renamed into a VLM's language model, or back).
    fn rename(&mut self, args: &[Arg], span: Span) -> Value {
        let Some((models, strings, _)) = self.builtin_args("rename", args, &[]) else {
            return Value::Error;
        };
        let ([(m, _)], [(from, from_span), (to, _)]) = (models.as_slice(), strings.as_slice()) else {
            return self.error(
                Diagnostic::error(Code::E0206, "`rename` takes a model and two prefixes")
                    .at(span, "")
                    .with_help(
                        "for example: `rename(m, \"model.layers.\", \"model.language_model.layers.\")`",
                    ),
            );
        };
        let mut tensors = BTreeMap::new();
        let mut map = BTreeMap::new();
        let mut renamed = 0;
        for (name, sig) in m.tensors.iter() {
            let out = match name.strip_prefix(from.as_str()) {
                Some(rest) => {
                    renamed += 1;
                    format!("{to}{rest}")
                }
                None => name.clone(),
            };
            if tensors.insert(out.clone(), sig.clone()).is_some() {
                return self.error(
                    Diagnostic::error(Code::E0302, format!("renaming makes two tensors named `{out}`"))
                        .at(span, "")
                        .with_help("rename a prefix that no other tensor name collides with"),
                );
            }
            map.insert(out, name.clone());
        }
        if renamed == 0 {
            return self.error(
                Diagnostic::error(Code::E0305, format!("no tensor name starts with `{from}`"))
                    .at(*from_span, "matches nothing")
                    .with_help(format!(
                        "the model's tensors look like `{}`",
                        m.tensors.keys().next().map_or("", String::as_str)
                    )),
            );
        }
        Value::Model(ModelVal {
            expr: Rc::new(MExpr::Rename {
                inner: Rc::clone(&m.expr),
                map: Rc::new(map),
            }),
            tensors: Rc::new(tensors),
            layer_sources: Rc::clone(&m.layer_sources),
            span,
            inputs: m.inputs.clone(),
            params: Vec::new(),
        })
    }

    fn arity_error(&self, sig: &MethodSig, has_base: bool, given: usize, span: Span) -> Diagnostic {
        let wanted = match sig.max_models {
            Some(max) if max == sig.min_models => format!("exactly {max}"),
            Some(max) => format!("{} to {max}", sig.min_models),
            None => format!("at least {}", sig.min_models),
        };
        let noun = if sig.max_models.unwrap_or(sig.min_models) == 1 {
            "model"
        } else {
            "models"
        };
        let what = match sig.base {
            methods::Base::Required => format!("a base model, then {wanted} {noun}"),
            _ => format!("{wanted} {noun}"),
        };
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        let got = match (sig.base, has_base) {
            (methods::Base::Required, true) => format!("a base and {given} model{}", plural(given)),
            (methods::Base::Required, false) => "no models".to_string(),
            _ => format!("{given} model{}", plural(given)),
        };
        Diagnostic::error(Code::E0206, format!("`{}` takes {what}, but got {got}", sig.name))
            .at(span, format!("{got} here"))
            .with_help(format!("for example: `{}`", example_call(sig)))
    }

    /// `base: m` for methods whose base is optional.
    fn base_argument(
        &mut self,
        sig: &MethodSig,
        name: &ast::Ident,
        value: Value,
        span: Span,
    ) -> Option<ModelVal> {
        if sig.base != methods::Base::Optional {
            let help = match sig.base {
                methods::Base::Required => format!(
                    "the base of `{}` is its first model: `{}`",
                    sig.name,
                    example_call(sig)
                ),
                _ => format!("`{}` does not use a base model", sig.name),
            };
            self.diags.push(
                Diagnostic::error(Code::E0204, format!("`{}` has no parameter `base`", sig.name))
                    .at(name.span, "not a parameter here")
                    .with_help(help),
            );
            return None;
        }
        match value {
            Value::Model(m) => Some(self.no_params(m)),
            Value::Error => None,
            other => {
                self.diags.push(
                    Diagnostic::error(
                        Code::E0301,
                        format!("`base` needs a model, found {}", other.describe()),
                    )
                    .at(span, format!("this is {}", other.describe())),
                );
                None
            }
        }
    }

    /// Checks a named argument or per-model parameter against the method's registry entry.
    fn arg_value(
        &mut self,
        sig: &'static MethodSig,
        name: &ast::Ident,
        value: Value,
        value_span: Span,
        per_model: bool,
    ) -> Option<(&'static str, ArgValue)> {
        let Some(spec) = sig.param(&name.name) else {
            let mut d = Diagnostic::error(
                Code::E0204,
                format!("`{}` has no parameter `{}`", sig.name, name.name),
            )
            .at(name.span, "unknown parameter");
            let candidates = sig
                .params
                .iter()
                .filter(|p| p.per_model || !per_model)
                .map(|p| p.name);
            if let Some(s) = names::did_you_mean(&name.name, candidates) {
                d = d.with_help(format!("did you mean `{s}`?"));
            } else {
                let all: Vec<&str> = sig.params.iter().map(|p| p.name).collect();
                d = d.with_help(format!(
                    "the parameters of `{}` are: {}",
                    sig.name,
                    all.join(", ")
                ));
            }
            self.diags.push(d);
            return None;
        };
        if per_model && !spec.per_model {
            self.diags.push(
                Diagnostic::error(
                    Code::E0204,
                    format!(
                        "`{}` is a parameter of the whole call, not of one model",
                        spec.name
                    ),
                )
                .at(name.span, "set for one model here")
                .with_help(format!(
                    "pass it to the call instead: `{}(a, b, {}: ...)`",
                    sig.name, spec.name
                )),
            );
            return None;
        }
        match (spec.kind, value) {
            (_, Value::Error) => None,
            (ParamKind::Number | ParamKind::Integer, Value::Param(p)) => {
                let bad = p.literals().into_iter().find(|v| {
                    !spec.range.contains(*v) || (spec.kind == ParamKind::Integer && v.fract() != 0.0)
                });
                if let Some(v) = bad {
                    let whole = if spec.kind == ParamKind::Integer {
                        "a whole number "
                    } else {
                        ""
                    };
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0305,
                            format!(
                                "`{}` must be {whole}{}, found {v}",
                                spec.name,
                                spec.range.describe()
                            ),
                        )
                        .at(value_span, "out of range")
                        .with_help(format!("`{}` of `{}`: {}", spec.name, sig.name, spec.doc)),
                    );
                    return None;
                }
                Some((spec.name, ArgValue::Param(p, value_span)))
            }
            (ParamKind::Bool, Value::Bool(b)) => Some((spec.name, ArgValue::Bool(b))),
            (kind, other) => {
                let expected = match kind {
                    ParamKind::Number | ParamKind::Integer => "a number, a layer gradient or a tensor table",
                    ParamKind::Bool => "`true` or `false`",
                };
                self.diags.push(
                    Diagnostic::error(
                        Code::E0301,
                        format!("`{}` expects {expected}, found {}", spec.name, other.describe()),
                    )
                    .at(value_span, format!("this is {}", other.describe())),
                );
                None
            }
        }
    }

    fn save(&mut self, stmt_span: Span, value: &Expr, dir: &ast::StrLit, options: &[Named]) {
        let model = match self.expr(value) {
            Value::Model(m) => Some(self.no_params(m)),
            Value::Error => None,
            other => {
                self.diags.push(
                    Diagnostic::error(
                        Code::E0301,
                        format!("`save` needs a model, found {}", other.describe()),
                    )
                    .at(value.span, format!("this is {}", other.describe())),
                );
                None
            }
        };
        let mut dtype = None;
        let mut max_shard_bytes = DEFAULT_SHARD_BYTES;
        let mut config_from = None;
        let mut chat_template = None;
        let mut tokenizer_from = None;
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for opt in options {
            if let Some(first) = seen.insert(opt.name.name.as_str(), opt.name.span) {
                self.diags.push(
                    Diagnostic::error(Code::E0207, format!("option `{}` is given twice", opt.name.name))
                        .at(opt.name.span, "given again here")
                        .with_label(first, "first given here"),
                );
                continue;
            }
            match opt.name.name.as_str() {
                "dtype" => dtype = self.dtype_option(&opt.value),
                "shard" => {
                    if let Some(n) = self.size_option(&opt.value) {
                        max_shard_bytes = n;
                    }
                }
                "config" => config_from = self.donor_option(&opt.value, "config"),
                "tokenizer" => tokenizer_from = self.donor_option(&opt.value, "tokenizer"),
                "chat_template" => chat_template = self.chat_template_option(&opt.value),
                other => {
                    let mut d = Diagnostic::error(Code::E0208, format!("unknown save option `{other}`"))
                        .at(opt.name.span, "unknown option");
                    if let Some(s) = names::did_you_mean(other, SAVE_OPTIONS.iter().copied()) {
                        d = d.with_help(format!("did you mean `{s}`?"));
                    } else {
                        d = d.with_help(format!("the options are: {}", SAVE_OPTIONS.join(", ")));
                    }
                    self.diags.push(d);
                }
            }
        }
        let dir_path = resolve_dir(&self.options.base_dir, &dir.value);
        if let Some(previous) = self.outputs.iter().find(|o| o.dir == dir_path) {
            self.diags.push(
                Diagnostic::error(Code::E0405, format!("two saves write to `{}`", dir.value))
                    .at(dir.span, "written again here")
                    .with_label(previous.span, "first written here")
                    .with_help("give each save its own folder"),
            );
            return;
        }
        if let Err(e) =
            crate::io::writer::check_output_target(&dir_path, self.options.force, &self.protected_paths())
        {
            let mut d = Diagnostic::error(Code::E0405, e.to_string()).at(dir.span, "output folder");
            d = match e {
                crate::io::WriteError::NotEmpty { .. } => {
                    d.with_help("choose another folder, or pass --force to replace it")
                }
                _ => d.with_help(
                    "choose a folder outside every input model; --force never overwrites an input",
                ),
            };
            self.diags.push(d);
        }
        let Some(model) = model else { return };
        let config_from = config_from.or_else(|| model.inputs.first().copied());
        let tokenizer_from = tokenizer_from.or(config_from);
        let output = hir::Output {
            dir: dir_path,
            span: dir.span,
            tensors: Vec::new(),
            max_shard_bytes,
            config_from,
            tokenizer_from,
            dtype,
            layer_count: model.layers(),
            layer_sources: model.layer_sources.to_vec(),
            inputs: model.inputs.clone(),
            chat_template,
            methods: describe(&model.expr),
            moe: None,
        };
        let _ = stmt_span;
        let output = instantiate::output(&self.models, self.seed, output, &model, &mut self.diags);
        self.outputs.push(output);
    }

    /// `shard: 5GB` (a size) or a plain number of bytes, at least 1.
    fn size_option(&mut self, value: &Expr) -> Option<u64> {
        let bytes = match self.expr(value) {
            Value::Size(n) => n as f64,
            Value::Param(Param::Number(x)) => x,
            Value::Error => return None,
            other => {
                self.diags.push(
                    Diagnostic::error(
                        Code::E0301,
                        format!("`shard` expects a size, found {}", other.describe()),
                    )
                    .at(value.span, format!("this is {}", other.describe()))
                    .with_help("for example `shard: 5GB` or `shard: 500MiB`"),
                );
                return None;
            }
        };
        if bytes < 1.0 || bytes.fract() != 0.0 {
            self.diags.push(
                Diagnostic::error(
                    Code::E0305,
                    "shard size must be a whole number of bytes, at least 1",
                )
                .at(value.span, "not a valid size")
                .with_help("for example `shard: 5GB`"),
            );
            return None;
        }
        Some(bytes as u64)
    }

    fn protected_paths(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for m in &self.models {
            out.extend(m.info.protected_paths());
        }
        out
    }

    fn dtype_option(&mut self, value: &Expr) -> Option<DType> {
        let text = match &value.kind {
            ExprKind::Name(n) if !self.env.contains_key(n) => n.clone(),
            ExprKind::Str(s) => s.clone(),
            _ => {
                let v = self.expr(value);
                if !matches!(v, Value::Error) {
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0301,
                            format!("`dtype` expects f32, f16 or bf16, found {}", v.describe()),
                        )
                        .at(value.span, format!("this is {}", v.describe())),
                    );
                }
                return None;
            }
        };
        match DType::from_script_name(&text) {
            Some(d) => Some(d),
            None => {
                let mut d = Diagnostic::error(Code::E0305, format!("unknown dtype `{text}`"))
                    .at(value.span, "not a dtype");
                d = match names::did_you_mean(&text, ["f32", "f16", "bf16"]) {
                    Some(s) => d.with_help(format!(
                        "did you mean `{s}`? the output dtypes are f32, f16 and bf16"
                    )),
                    None => d.with_help("the output dtypes are f32, f16 and bf16"),
                };
                self.diags.push(d);
                None
            }
        }
    }

    /// `chat_template: "chatml"` (a built-in name) or a literal Jinja template.
    fn chat_template_option(&mut self, value: &Expr) -> Option<String> {
        let ExprKind::Str(text) = &value.kind else {
            let v = self.expr(value);
            if !matches!(v, Value::Error) {
                self.diags.push(
                    Diagnostic::error(
                        Code::E0301,
                        format!("`chat_template` expects a string, found {}", v.describe()),
                    )
                    .at(value.span, format!("this is {}", v.describe()))
                    .with_help("a built-in name such as \"chatml\", or a Jinja template in quotes"),
                );
            }
            return None;
        };
        if let Some(t) = templates::built_in(text) {
            return Some(t.to_string());
        }
        if templates::looks_like_jinja(text) {
            return Some(text.clone());
        }
        let names: Vec<&str> = templates::BUILT_IN.iter().map(|(n, _)| *n).collect();
        let mut d = Diagnostic::error(Code::E0305, format!("unknown chat template `{text}`"))
            .at(value.span, "neither a built-in name nor a Jinja template");
        d = match names::did_you_mean(text, names.iter().copied()) {
            Some(s) => d.with_help(format!(
                "did you mean `{s}`? the built-in templates are: {}",
                names.join(", ")
            )),
            None => d.with_help(format!(
                "the built-in templates are: {}; or write the template itself",
                names.join(", ")
            )),
        };
        self.diags.push(d);
        None
    }

    /// `config: m` / `tokenizer: m`: must name an input model.
    fn donor_option(&mut self, value: &Expr, what: &str) -> Option<ModelId> {
        match self.expr(value) {
            Value::Model(m) => match (&*m.expr, m.params.is_empty()) {
                (MExpr::Input(id), true) => Some(*id),
                _ => {
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0301,
                            format!("`{what}` needs an input model, found a computed model"),
                        )
                        .at(value.span, "computed here")
                        .with_help(format!("name a model declared with `model`, e.g. `{what}: base`")),
                    );
                    None
                }
            },
            Value::Error => None,
            other => {
                self.diags.push(
                    Diagnostic::error(
                        Code::E0301,
                        format!("`{what}` needs an input model, found {}", other.describe()),
                    )
                    .at(value.span, format!("this is {}", other.describe())),
                );
                None
            }
        }
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

/// A call of `sig` that would check, for help lines.
fn example_call(sig: &MethodSig) -> String {
    let per_model: Vec<String> = sig
        .params
        .iter()
        .filter(|p| p.per_model && p.default == methods::Default::Required)
        .map(|p| format!("{}: 0.5", p.name))
        .collect();
    let block = if per_model.is_empty() {
        String::new()
    } else {
        format!(" {{ {} }}", per_model.join(", "))
    };
    let mut args: Vec<String> = Vec::new();
    if sig.base == methods::Base::Required {
        args.push("base".to_string());
    }
    let count = sig.min_models.max(if sig.max_models == Some(1) { 1 } else { 2 });
    for name in ["a", "b", "c", "d"].iter().take(count) {
        args.push(format!("{name}{block}"));
    }
    for p in sig
        .params
        .iter()
        .filter(|p| !p.per_model && p.default == methods::Default::Required)
    {
        args.push(format!("{}: 0.5", p.name));
    }
    format!("{}({})", sig.name, args.join(", "))
}

fn resolve_dir(base: &Path, dir: &str) -> PathBuf {
    let p = Path::new(dir);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The options `save ... to "dir" { ... }` takes.
const SAVE_OPTIONS: &[&str] = &["dtype", "shard", "config", "tokenizer", "chat_template"];

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

/// The methods a saved model is made with, outermost first, for its model card.
fn describe(expr: &MExpr) -> Vec<String> {
    fn walk(e: &MExpr, out: &mut Vec<String>) {
        let mut push = |s: &str| {
            if !out.iter().any(|o| o == s) {
                out.push(s.to_string());
            }
        };
        match e {
            MExpr::Input(_) => {}
            MExpr::Layers { inner, .. } => {
                push("layer selection");
                walk(inner, out);
            }
            MExpr::Stack {
                segments, pre, post, ..
            } => {
                push("stack");
                segments.iter().for_each(|s| walk(&s.expr, out));
                walk(pre, out);
                walk(post, out);
            }
            MExpr::Neg(x) | MExpr::Scale(x, ..) | MExpr::Divide(x, ..) => {
                push("arithmetic");
                walk(x, out);
            }
            MExpr::Graft { onto, part, .. } => {
                push("graft");
                walk(part, out);
                walk(onto, out);
            }
            MExpr::Rename { inner, .. } => walk(inner, out),
            MExpr::Add(a, b) | MExpr::Sub(a, b) => {
                push("arithmetic");
                walk(a, out);
                walk(b, out);
            }
            MExpr::Moe(moe) => {
                push("moe");
                walk(&moe.base, out);
                moe.members.iter().for_each(|m| walk(&m.expr, out));
            }
            MExpr::Method(call) => {
                push(call.sig.name);
                if let Some(b) = &call.base {
                    walk(b, out);
                }
                call.models.iter().for_each(|m| walk(&m.expr, out));
            }
        }
    }
    let mut out = Vec::new();
    walk(expr, &mut out);
    out
}
