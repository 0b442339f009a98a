//! Per-tensor resolution: a checked model value -> one plain [`TensorExpr`] per output
//! tensor, every parameter evaluated for that tensor's name and layer position.

use std::collections::{BTreeMap, BTreeSet};

use super::hir::{self, InputModel, ModelId, OutputTensor, TensorExpr};
use super::methods::{self, MethodSig};
use super::names;
use super::params::Param;
use super::value::{ArgValue, CallModel, MExpr, MethodCall, ModelVal};
use crate::diag::{Code, Diagnostic, Diagnostics};
use crate::source::Span;

/// Problems found while resolving tensors, reported once per place with a count.
#[derive(Default)]
struct Problems {
    by_place: BTreeMap<(Span, Code, String), (String, usize, &'static str)>,
}

impl Problems {
    fn add(&mut self, span: Span, code: Code, what: &str, label: &'static str, tensor: &str) {
        let entry = self
            .by_place
            .entry((span, code, what.to_string()))
            .or_insert_with(|| (tensor.to_string(), 0, label));
        entry.1 += 1;
    }
}

struct Ctx<'a> {
    models: &'a [InputModel],
    problems: Problems,
}

/// Fills `out.tensors` from `model`, in natural name order (layers in numeric order).
pub(super) fn output(
    models: &[InputModel],
    mut out: hir::Output,
    model: &ModelVal,
    diags: &mut Diagnostics,
) -> hir::Output {
    let mut ctx = Ctx {
        models,
        problems: Problems::default(),
    };
    let mut names: Vec<&String> = model.tensors.keys().collect();
    names.sort_by(|a, b| natural_cmp(a, b));
    for name in names {
        let Some(sig) = model.tensors.get(name) else {
            continue;
        };
        let t = layer_position(name, out.layer_count);
        let Some(expr) = ctx.tensor(&model.expr, name, t, false) else {
            continue;
        };
        // Integer buffers are copied as they are; only float tensors take the save dtype.
        let dtype = match (&expr, out.dtype) {
            (TensorExpr::Load { .. }, _) if !sig.dtype.is_mergeable() => sig.dtype,
            (_, Some(d)) => d,
            (_, None) => sig.dtype,
        };
        out.tensors.push(OutputTensor {
            name: name.clone(),
            shape: sig.shape.clone(),
            dtype,
            expr,
        });
    }
    for ((span, code, what), (tensor, count, label)) in ctx.problems.by_place {
        let message = if count == 1 {
            format!("{what}: tensor `{tensor}`")
        } else {
            format!("{what}: {count} tensors, e.g. `{tensor}`")
        };
        let mut d = Diagnostic::error(code, message).at(span, label);
        d = match code {
            Code::E0306 => {
                d.with_help("add a `_ => value` arm, or give the parameter a value for the whole call")
            }
            Code::E0307 => d.with_help(
                "merges compute on f32, f16 and bf16 tensors; other dtypes can only be saved unchanged",
            ),
            _ => d.with_help("pass `normalize: false`, or choose weights that do not sum to zero"),
        };
        diags.push(d);
    }
    out
}

/// mergekit's layer position: `i/(n-1)` for layer `i` of `n` (1 for a single layer), and 0
/// for tensors outside the layers (embeddings, final norm, lm_head).
fn layer_position(name: &str, layer_count: Option<usize>) -> f64 {
    match (names::layer_of(name), layer_count) {
        (Some((i, _)), Some(n)) if n > 1 => i as f64 / (n - 1) as f64,
        (Some(_), _) => 1.0,
        (None, _) => 0.0,
    }
}

impl Ctx<'_> {
    fn tensor(&mut self, expr: &MExpr, name: &str, t: f64, under_op: bool) -> Option<TensorExpr> {
        Some(match expr {
            MExpr::Input(id) => {
                let info = &self.models[id.0 as usize].info;
                let dtype = info.tensors.get(name)?.dtype;
                if under_op && !dtype.is_mergeable() {
                    let span = self.models[id.0 as usize].span;
                    self.problems.add(
                        span,
                        Code::E0307,
                        &format!("cannot compute on {} tensors", dtype.safetensors_name()),
                        "this model stores them",
                        name,
                    );
                    return None;
                }
                TensorExpr::Load {
                    model: *id,
                    name: name.to_string(),
                }
            }
            MExpr::Layers { inner, start } => {
                let (i, _) = names::layer_of(name)?;
                return self.tensor(inner, &names::with_layer(name, i + start), t, under_op);
            }
            MExpr::Neg(inner) => TensorExpr::Neg(Box::new(self.tensor(inner, name, t, true)?)),
            MExpr::Add(a, b) => TensorExpr::Add(
                Box::new(self.tensor(a, name, t, true)?),
                Box::new(self.tensor(b, name, t, true)?),
            ),
            MExpr::Sub(a, b) => TensorExpr::Sub(
                Box::new(self.tensor(a, name, t, true)?),
                Box::new(self.tensor(b, name, t, true)?),
            ),
            MExpr::Scale(inner, p, span) => {
                let factor = self.param(p, *span, name, t)?;
                TensorExpr::Scale(Box::new(self.tensor(inner, name, t, true)?), factor)
            }
            MExpr::Divide(inner, p, span) => {
                let divisor = self.param(p, *span, name, t)?;
                if divisor as f32 == 0.0 {
                    self.problems
                        .add(*span, Code::E0305, "division by zero", "this is 0 here", name);
                    return None;
                }
                TensorExpr::Divide(Box::new(self.tensor(inner, name, t, true)?), divisor)
            }
            MExpr::Method(call) => self.method(call, name, t)?,
        })
    }

    /// A factor or divisor for this tensor; it must be a finite f32, as kernels compute in f32.
    fn param(&mut self, p: &Param, span: Span, name: &str, t: f64) -> Option<f64> {
        let v = p.eval(name, t);
        match v {
            None => self.problems.add(
                span,
                Code::E0306,
                "no table entry matches",
                "no arm matches them",
                name,
            ),
            Some(x) if !(x as f32).is_finite() => self.problems.add(
                span,
                Code::E0305,
                "the number is too large for f32",
                "out of f32 range",
                name,
            ),
            Some(_) => return v,
        }
        None
    }

    /// A per-model number: the model's own setting, then the call's, then the default.
    /// Per-model settings match the model's input tensor name, call settings the output name.
    fn number(&mut self, m: &CallModel, call: &MethodCall, key: &str, name: &str, t: f64) -> Option<f64> {
        let source = source_name(&m.expr, name);
        if let Some(ArgValue::Param(p, _)) = m.params.get(key) {
            if let Some(v) = p.eval(&source, t) {
                return Some(v);
            }
        }
        if let Some(ArgValue::Param(p, _)) = call.globals.get(key) {
            if let Some(v) = p.eval(name, t) {
                return Some(v);
            }
        }
        {
            {
                let span = match (m.params.get(key), call.globals.get(key)) {
                    (Some(ArgValue::Param(_, s)), _) | (None, Some(ArgValue::Param(_, s))) => *s,
                    _ => m.span,
                };
                self.problems.add(
                    span,
                    Code::E0306,
                    &format!("no value of `{key}` matches"),
                    "no arm matches them",
                    name,
                );
                None
            }
        }
    }

    fn flag(sig: &MethodSig, call: &MethodCall, key: &str) -> bool {
        match (call.globals.get(key), sig.param(key).map(|s| s.default)) {
            (Some(ArgValue::Bool(b)), _) => *b,
            (_, Some(methods::Default::Bool(b))) => b,
            _ => false,
        }
    }

    fn method(&mut self, call: &MethodCall, name: &str, t: f64) -> Option<TensorExpr> {
        let sig = call.sig;
        match sig.name {
            "linear" => {
                let mut terms = Vec::with_capacity(call.models.len());
                for m in &call.models {
                    let w = self.number(m, call, "weight", name, t).filter(|w| {
                        let finite = (*w as f32).is_finite();
                        if !finite {
                            self.problems.add(
                                m.span,
                                Code::E0305,
                                "the weight is too large for f32",
                                "this model's weight",
                                name,
                            );
                        }
                        finite
                    });
                    let x = self.tensor(&m.expr, name, t, true);
                    terms.push((x?, w?));
                }
                let divisor = if Self::flag(sig, call, "normalize") {
                    // mergekit sums the weights in the tensor dtype; f32 here, as we compute.
                    let sum: f32 = terms.iter().map(|(_, w)| *w as f32).sum();
                    if sum == 0.0 {
                        self.problems.add(
                            call.span,
                            Code::E0305,
                            "the weights sum to 0, so they cannot be normalized",
                            "these weights",
                            name,
                        );
                        return None;
                    }
                    Some(sum as f64)
                } else {
                    None
                };
                Some(TensorExpr::WeightedSum { terms, divisor })
            }
            other => {
                self.problems.add(
                    call.span,
                    Code::E0001,
                    &format!("internal compiler error: method `{other}` has no lowering"),
                    "",
                    name,
                );
                None
            }
        }
    }
}

/// The tensor name `expr` reads for output name `name` (following layer renumbering).
fn source_name(expr: &MExpr, name: &str) -> String {
    match expr {
        MExpr::Layers { inner, start } => match names::layer_of(name) {
            Some((i, _)) => source_name(inner, &names::with_layer(name, i + start)),
            None => name.to_string(),
        },
        MExpr::Neg(inner)
        | MExpr::Scale(inner, ..)
        | MExpr::Divide(inner, ..)
        | MExpr::Add(inner, _)
        | MExpr::Sub(inner, _) => source_name(inner, name),
        MExpr::Input(_) | MExpr::Method(_) => name.to_string(),
    }
}

/// Warns about input tensors that no output reads (nothing is dropped silently).
pub(super) fn warn_unread_inputs(program: &hir::Program, diags: &mut Diagnostics) {
    let mut read: BTreeSet<(ModelId, &str)> = BTreeSet::new();
    for out in &program.outputs {
        for t in &out.tensors {
            collect_loads(&t.expr, &mut read);
        }
    }
    for (i, m) in program.models.iter().enumerate() {
        let id = ModelId(i as u32);
        if !read.iter().any(|(r, _)| *r == id) {
            continue; // an unused model is reported as an unused binding
        }
        let unread: Vec<&str> = m
            .info
            .tensors
            .keys()
            .map(String::as_str)
            .filter(|n| !read.contains(&(id, *n)))
            .collect();
        if unread.is_empty() {
            continue;
        }
        diags.push(
            Diagnostic::error(
                Code::W0002,
                format!(
                    "{} tensors of `{}` are not written by any output",
                    unread.len(),
                    m.name
                ),
            )
            .at(m.span, "this model")
            .with_note(format!(
                "not written:\n{}",
                names::bullet_list(&names::grouped(unread), 8)
            ))
            .with_help("this is expected after selecting layers; otherwise check the script"),
        );
    }
}

fn collect_loads<'a>(e: &'a TensorExpr, out: &mut BTreeSet<(ModelId, &'a str)>) {
    match e {
        TensorExpr::Load { model, name } => {
            out.insert((*model, name.as_str()));
        }
        TensorExpr::Neg(x) | TensorExpr::Scale(x, _) | TensorExpr::Divide(x, _) => collect_loads(x, out),
        TensorExpr::Add(a, b) | TensorExpr::Sub(a, b) => {
            collect_loads(a, out);
            collect_loads(b, out);
        }
        TensorExpr::WeightedSum { terms, .. } => terms.iter().for_each(|(x, _)| collect_loads(x, out)),
    }
}

/// Orders names with embedded numbers numerically: `layers.2` before `layers.10`.
pub(crate) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, _) => return std::cmp::Ordering::Less,
            (_, None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let ta = trim_zeros(da);
                let tb = trim_zeros(db);
                let ord = ta
                    .len()
                    .cmp(&tb.len())
                    .then_with(|| ta.cmp(tb))
                    .then_with(|| na.cmp(&nb));
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d
        .iter()
        .take_while(|c| **c == b'0')
        .count()
        .min(d.len().saturating_sub(1));
    &d[n..]
}
