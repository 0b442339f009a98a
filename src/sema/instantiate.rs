//! Per-tensor resolution: a checked model value -> one plain [`TensorExpr`] per output
//! tensor, every parameter evaluated for that tensor's name and layer position.

use std::collections::{BTreeMap, BTreeSet};

use super::hir::{self, InputModel, ModelId, OutputTensor, TensorExpr};
use super::methods::{self, MethodSig};
use super::names;
use super::params::Param;
use super::value::{
    ArgValue, CallModel, LoraEdit, LoraExpr, MExpr, MethodCall, ModelVal, MoeExpr, MoeSource,
};
use crate::diag::{Code, Diagnostic, Diagnostics};
use crate::ops::{Compute, GtaKind, GtaOp, Half, Method, MethodOp};
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
    seed: u64,
    /// The output's compute dtype: 16 bits rounds after every op (`ops::compute`).
    compute: Compute,
    /// Operations left (E0211): each step of [`Ctx::tensor`] takes one, a copy of an
    /// expression as many as it has nodes.
    ops_left: u64,
    /// Set once `ops_left` ran out: every tensor still to do fails at once.
    too_large: bool,
}

/// Fills `out.tensors` from `model`, in natural name order (layers in numeric order),
/// with at most `ops_left` operations (E0211), which it counts down.
pub(super) fn output(
    models: &[InputModel],
    seed: u64,
    out: hir::Output,
    model: &ModelVal,
    diags: &mut Diagnostics,
    ops_left: &mut u64,
) -> hir::Output {
    let mut ctx = Ctx {
        models,
        problems: Problems::default(),
        seed,
        compute: out.compute,
        ops_left: *ops_left,
        too_large: false,
    };
    let mut out = tensors(&mut ctx, out, model);
    if !ctx.too_large
        && out
            .tensors
            .iter()
            .any(|t| depth(&t.expr) > super::MAX_TENSOR_DEPTH)
    {
        // Graph lowering and the kernels walk each tensor's expression recursively.
        out.tensors.clear();
        diags.push(
            Diagnostic::error(
                Code::E0210,
                format!(
                    "the model expression is nested too deeply: a tensor is computed through more than {} nested operations",
                    super::MAX_TENSOR_DEPTH
                ),
            )
            .at(model.span, "this model")
            .with_note("16-bit compute rounds after every operation, and merge methods such as `task_arithmetic` take several operations each")
            .with_help("save an intermediate model and merge further from the saved folder in another script"),
        );
    }
    // Reported once, by the save that used the last of them.
    if ctx.too_large && *ops_left > 0 {
        diags.push(
            Diagnostic::error(
                Code::E0211,
                format!(
                    "the saved models are too large to compute: their tensors need more than {} operations in all",
                    super::MAX_TENSOR_OPS
                ),
            )
            .at(model.span, "the limit is reached computing this model")
            .with_note("each tensor is computed on its own: a `let` binding used twice is computed twice, so a chain of such bindings doubles the work at every step")
            .with_help("merge in fewer steps, or save an intermediate model and merge further from the saved folder in another script"),
        );
    }
    *ops_left = ctx.ops_left;
    if !ctx.too_large {
        report(ctx.problems, diags);
    }
    out
}

fn tensors(ctx: &mut Ctx, mut out: hir::Output, model: &ModelVal) -> hir::Output {
    if let MExpr::Moe(moe) = &*model.expr {
        return moe_output(ctx, moe, out, model);
    }
    let modules = names::module_layers(model.tensors.keys());
    let mut names: Vec<&String> = model.tensors.keys().collect();
    names.sort_by(|a, b| natural_cmp(a, b));
    for name in names {
        let Some(sig) = model.tensors.get(name) else {
            continue;
        };
        let t = layer_position(name, &modules);
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
    out
}

/// The name `Layers { start, module }` reads for output tensor `name`.
#[inline(never)]
fn layer_name(name: &str, module: &str, start: usize) -> String {
    match names::layer_in(name, module) {
        Some((i, _)) => names::with_layer(name, i + start),
        None => name.to_string(),
    }
}

/// Where a stack takes tensor `name` from: the expression, its name there and its layer
/// position (each segment is a slice: gradients run over its own layers).
#[inline(never)]
fn stack_source<'e>(expr: &'e MExpr, name: &str) -> Option<(&'e MExpr, String, f64)> {
    let MExpr::Stack {
        segments,
        pre,
        post,
        module,
    } = expr
    else {
        return None;
    };
    let Some((i, _)) = names::layer_in(name, module) else {
        // Outside the layers: mergekit plans these at t = 0.
        let from = if names::stacks_before(name) { pre } else { post };
        return Some((from.as_ref(), name.to_string(), 0.0));
    };
    let seg = segments
        .iter()
        .find(|s| (s.offset..s.offset + s.len).contains(&i))?;
    let local = i - seg.offset;
    let t = if seg.len > 1 {
        local as f64 / (seg.len - 1) as f64
    } else {
        1.0
    };
    Some((seg.expr.as_ref(), names::with_layer(name, local), t))
}

/// The depth of an expression (a load is 1 deep), measured without recursion.
fn depth(e: &TensorExpr) -> u32 {
    let mut deepest = 0;
    let mut stack = vec![(e, 1)];
    while let Some((e, d)) = stack.pop() {
        deepest = deepest.max(d);
        stack.extend(e.operands().iter().map(|x| (x, d + 1)));
    }
    deepest
}

/// The number of nodes of an expression, counted without recursion.
fn size(e: &TensorExpr) -> u64 {
    let mut count = 0;
    let mut stack = vec![e];
    while let Some(e) = stack.pop() {
        count += 1;
        stack.extend(e.operands());
    }
    count
}

/// One diagnostic per place with a problem, with how many tensors it concerns.
fn report(problems: Problems, diags: &mut Diagnostics) {
    for ((span, code, what), (tensor, count, label)) in problems.by_place {
        let message = if count == 1 {
            format!("{what}: tensor `{tensor}`")
        } else {
            format!("{what}: {count} tensors, e.g. `{tensor}`")
        };
        let mut d = Diagnostic::error(code, message).at(span, label);
        let help = match code {
            Code::E0306 => "add a `_ => value` arm, or give the parameter a value for the whole call",
            Code::E0307 => "merges compute on f32, f16 and bf16 tensors; other dtypes can only be saved unchanged",
            _ if what.starts_with("density") => {
                "DELLA keeps elements with probabilities density ± epsilon: lower epsilon or move the density away from 0 and 1"
            }
            _ if what.starts_with("the weights sum") => "pass `normalize: false`, or choose weights that do not sum to zero",
            _ if what.contains("too large") => "computation is in f32: use a number below 3.4e38 in magnitude",
            _ if code == Code::E0301 => "save the `moe(...)` model directly: `save moe(...) to \"dir\"`",
            _ => "a model can only be divided by a non-zero number",
        };
        d = d.with_help(help);
        diags.push(d);
    }
}

/// mergekit's layer position: `i/(n-1)` for layer `i` of the `n` layers of its module (1 for
/// a single layer), and 0 for tensors outside the layers (embeddings, final norm, lm_head).
/// Each module of a multi-modal model has its own depth.
fn layer_position(name: &str, modules: &BTreeMap<String, usize>) -> f64 {
    let Some((i, range)) = names::layer_of(name) else {
        return 0.0;
    };
    match modules.get(&name[..range.start]) {
        Some(&n) if n > 1 => i as f64 / (n - 1) as f64,
        _ => 1.0,
    }
}

impl Ctx<'_> {
    /// Takes `n` operations; false (and nothing taken) when fewer are left.
    fn take_ops(&mut self, n: u64) -> bool {
        match self.ops_left.checked_sub(n) {
            Some(left) if !self.too_large => {
                self.ops_left = left;
                true
            }
            _ => {
                self.too_large = true;
                false
            }
        }
    }

    /// Tensor `name` of `expr` at layer position `t`. The recursion runs through this
    /// function and the method calls only; everything else is done in helpers, so that each
    /// level of a deep expression takes little stack.
    fn tensor(&mut self, expr: &MExpr, name: &str, t: f64, under_op: bool) -> Option<TensorExpr> {
        if !self.take_ops(1) {
            return None;
        }
        match expr {
            MExpr::Input(id) => self.input(*id, name, under_op),
            MExpr::Layers { inner, start, module } => {
                let inner_name = layer_name(name, module, *start);
                self.tensor(inner, &inner_name, t, under_op)
            }
            MExpr::Stack { .. } => {
                let (from, name, t) = stack_source(expr, name)?;
                self.tensor(from, &name, t, under_op)
            }
            MExpr::Graft {
                onto,
                part,
                part_names,
            } => {
                let from = if part_names.contains(name) { part } else { onto };
                self.tensor(from, name, t, under_op)
            }
            MExpr::Rename { inner, map } => {
                let inner_name = map.get(name).map_or(name, String::as_str);
                self.tensor(inner, inner_name, t, under_op)
            }
            MExpr::Neg(inner) => self.negated(inner, name, t),
            MExpr::Add(a, b) | MExpr::Sub(a, b) => self.arithmetic(expr, a, b, name, t),
            MExpr::Scale(inner, p, span) | MExpr::Divide(inner, p, span) => {
                self.scaled(expr, inner, p, *span, name, t)
            }
            MExpr::Method(call) => self.method(call, name, t),
            MExpr::Lora(l) => self.lora(l, name, t, under_op),
            MExpr::Moe(moe) => {
                self.moe_merged_further(moe, name);
                None
            }
        }
    }

    /// An input model's tensor, rounded to the compute dtype when it is a float.
    #[inline(never)]
    fn input(&mut self, id: ModelId, name: &str, under_op: bool) -> Option<TensorExpr> {
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
        let load = TensorExpr::Load {
            model: id,
            name: name.to_string(),
        };
        // mergekit casts every float input to the compute dtype first.
        Some(if dtype.is_mergeable() {
            self.round(load)
        } else {
            load
        })
    }

    /// `-inner`. Negation is exact in every dtype: nothing to round.
    fn negated(&mut self, inner: &MExpr, name: &str, t: f64) -> Option<TensorExpr> {
        let x = self.tensor(inner, name, t, true)?;
        Some(-x)
    }

    /// `a + b` or `a - b` as `expr` says, rounded.
    fn arithmetic(&mut self, expr: &MExpr, a: &MExpr, b: &MExpr, name: &str, t: f64) -> Option<TensorExpr> {
        let x = self.tensor(a, name, t, true)?;
        let y = self.tensor(b, name, t, true)?;
        Some(self.combined(expr, x, y))
    }

    #[inline(never)]
    fn combined(&self, expr: &MExpr, x: TensorExpr, y: TensorExpr) -> TensorExpr {
        let value = match expr {
            MExpr::Add(..) => x + y,
            _ => x - y,
        };
        self.round(value)
    }

    /// `inner * p` or `inner / p` as `expr` says, rounded.
    fn scaled(
        &mut self,
        expr: &MExpr,
        inner: &MExpr,
        p: &Param,
        span: Span,
        name: &str,
        t: f64,
    ) -> Option<TensorExpr> {
        let factor = self.factor(expr, p, span, name, t)?;
        let x = self.tensor(inner, name, t, true)?;
        Some(self.times(expr, x, factor))
    }

    /// The factor of a `Scale` or the divisor of a `Divide` for this tensor.
    #[inline(never)]
    fn factor(&mut self, expr: &MExpr, p: &Param, span: Span, name: &str, t: f64) -> Option<f64> {
        let v = self.param(p, span, name, t)?;
        if matches!(expr, MExpr::Divide(..)) && v as f32 == 0.0 {
            self.problems
                .add(span, Code::E0305, "division by zero", "this is 0 here", name);
            return None;
        }
        Some(v)
    }

    /// `x * factor` or `x / factor` as `expr` says, rounded.
    #[inline(never)]
    fn times(&self, expr: &MExpr, x: TensorExpr, factor: f64) -> TensorExpr {
        let value = match expr {
            MExpr::Divide(..) => TensorExpr::divide(x, factor),
            _ => TensorExpr::scale(x, factor),
        };
        self.round(value)
    }

    #[inline(never)]
    fn moe_merged_further(&mut self, moe: &MoeExpr, name: &str) {
        self.problems.add(
            moe.span,
            Code::E0301,
            "`moe(...)` makes a model to save; it cannot be merged, sliced or renamed further",
            "this mixture of experts",
            name,
        );
    }

    /// Tensor `name` of a model with a LoRA adapter applied: the model's, its low-rank
    /// delta added, or the adapter's replacement.
    fn lora(&mut self, l: &LoraExpr, name: &str, t: f64, under_op: bool) -> Option<TensorExpr> {
        let load = |tensor: &str| TensorExpr::Load {
            model: l.adapter,
            name: tensor.to_string(),
        };
        match l.edits.get(name) {
            None => self.tensor(&l.inner, name, t, under_op),
            Some(LoraEdit::Replace { tensor }) => Some(self.round(load(tensor))),
            Some(LoraEdit::LowRank {
                a,
                b,
                rank,
                scaling,
                transpose,
                dtype,
            }) => {
                let scale = self.param(&l.scale, l.scale_span, name, t)?;
                // mergekit has PEFT merge a stored model's weight as stored, and casts the
                // merged weight to the compute dtype afterwards: read it unrounded.
                let weight = if matches!(*l.inner, MExpr::Input(_)) {
                    let compute = std::mem::replace(&mut self.compute, Compute::F32);
                    let weight = self.tensor(&l.inner, name, t, true);
                    self.compute = compute;
                    weight?
                } else {
                    self.tensor(&l.inner, name, t, true)?
                };
                // The factors are read as stored: the product decodes them itself.
                let delta = TensorExpr::Method {
                    op: MethodOp::LowRank {
                        scale: scale * scaling,
                        rank: *rank,
                        transpose: *transpose,
                    },
                    compute: Compute::F32,
                    inputs: vec![load(b), load(a)],
                };
                Some(match (self.compute.half(), Half::of_dtype(*dtype)) {
                    // mergekit merges through PEFT in the model's dtype: the f32 delta
                    // rounded to it, the sum rounded to it, then cast to the compute dtype.
                    (Some(_), Some(stored)) => {
                        let sum = weight + TensorExpr::round(delta, stored);
                        self.round(TensorExpr::round(sum, stored))
                    }
                    (Some(_), None) => self.round(weight + delta),
                    (None, _) => weight + delta,
                })
            }
        }
    }

    /// Tensor `name` of MoE member `member`, with its noise and residual scale. The noise is
    /// keyed by (seed, member, source tensor), so every output layout gets the same experts.
    fn moe_member(&mut self, moe: &MoeExpr, member: usize, name: &str) -> Option<TensorExpr> {
        let m = moe.members.get(member)?;
        let mut x = self.tensor(&m.expr, name, 0.0, m.noise_scale > 0.0)?;
        if m.noise_scale > 0.0 {
            x = TensorExpr::Method {
                compute: self.compute,
                op: MethodOp::Noise {
                    scale: m.noise_scale,
                    key: crate::ops::rng_key(self.seed, member as u32, name),
                },
                inputs: vec![x],
            };
        }
        if name.ends_with("down_proj.weight") && m.residual_scale != 1.0 {
            x = self.round(TensorExpr::scale(x, m.residual_scale));
        }
        Some(x)
    }

    /// `x` rounded to the compute dtype when it is 16 bits: torch rounds the result of
    /// every op on 16-bit tensors (an op with a Python-float operand computes with it as
    /// an f32 scalar, which is how `scale` and `divide` carry their constants).
    fn round(&self, x: TensorExpr) -> TensorExpr {
        match self.compute.half() {
            Some(h) => TensorExpr::round(x, h),
            None => x,
        }
    }

    /// `p` as the compute dtype holds it when mergekit makes it a tensor of that dtype
    /// (task-vector weights): rounded to 16 bits, or unchanged in f32.
    fn cast_param(&self, p: f64) -> f64 {
        match self.compute.half() {
            Some(h) => h.round(p as f32) as f64,
            None => p,
        }
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
    /// A per-model number: the model's own setting, then the call's, then the default.
    /// Per-model settings match the model's input tensor name, call settings the output name.
    fn number(&mut self, m: &CallModel, call: &MethodCall, key: &str, name: &str, t: f64) -> Option<f64> {
        let source = source_name(&m.expr, name);
        let own = match m.params.get(key) {
            Some(ArgValue::Param(p, _)) => p.eval(&source, t),
            _ => None,
        };
        let value = own.or_else(|| self.global(call, key, name, t));
        match value {
            Some(v) if !(v as f32).is_finite() => {
                self.problems.add(
                    m.span,
                    Code::E0305,
                    &format!("`{key}` is too large for f32"),
                    "this model",
                    name,
                );
                None
            }
            Some(v) => Some(v),
            None => {
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

    /// A call-wide number for tensor `name`, or the method's default; `None` if neither.
    fn global(&mut self, call: &MethodCall, key: &str, name: &str, t: f64) -> Option<f64> {
        if let Some(ArgValue::Param(p, _)) = call.globals.get(key) {
            if let Some(v) = p.eval(name, t) {
                return Some(v);
            }
        }
        match call.sig.param(key).map(|s| s.default) {
            Some(methods::Default::Number(v)) => Some(v),
            _ => None,
        }
    }

    /// A required call-wide number (checked by sema to be present).
    fn required(&mut self, call: &MethodCall, key: &str, name: &str, t: f64) -> Option<f64> {
        let v = self.global(call, key, name, t);
        match v {
            None => {
                let span = match call.globals.get(key) {
                    Some(ArgValue::Param(_, s)) => *s,
                    _ => call.span,
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
            Some(x) if !(x as f32).is_finite() => {
                self.problems.add(
                    call.span,
                    Code::E0305,
                    &format!("`{key}` is too large for f32"),
                    "here",
                    name,
                );
                None
            }
            Some(x) => Some(x),
        }
    }

    /// The per-model values of `key` for every model of the call (the default where the
    /// method does not take `key`).
    fn per_model(
        &mut self,
        call: &MethodCall,
        key: &str,
        fallback: f64,
        name: &str,
        t: f64,
    ) -> Option<Vec<f64>> {
        if call.sig.param(key).is_none() {
            return Some(vec![fallback; call.models.len()]);
        }
        let mut out = Vec::with_capacity(call.models.len());
        for m in &call.models {
            out.push(self.number(m, call, key, name, t));
        }
        out.into_iter().collect()
    }

    fn flag(sig: &MethodSig, call: &MethodCall, key: &str) -> bool {
        match (call.globals.get(key), sig.param(key).map(|s| s.default)) {
            (Some(ArgValue::Bool(b)), _) => *b,
            (_, Some(methods::Default::Bool(b))) => b,
            _ => false,
        }
    }

    fn method(&mut self, call: &MethodCall, name: &str, t: f64) -> Option<TensorExpr> {
        match call.sig.method {
            Method::Linear => self.linear(call, name, t),
            _ => self.whole_tensor_method(call, name, t),
        }
    }

    /// `linear`: element-wise, a weighted sum.
    fn linear(&mut self, call: &MethodCall, name: &str, t: f64) -> Option<TensorExpr> {
        let mut terms = Vec::with_capacity(call.models.len());
        for m in &call.models {
            let w = self.linear_weight(m, call, name, t);
            let x = self.tensor(&m.expr, name, t, true);
            terms.push((x?, w?));
        }
        self.weighted(call, terms, name)
    }

    /// A model's `linear` weight, finite in f32.
    #[inline(never)]
    fn linear_weight(&mut self, m: &CallModel, call: &MethodCall, name: &str, t: f64) -> Option<f64> {
        self.number(m, call, "weight", name, t).filter(|w| {
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
        })
    }

    /// `linear`'s weighted sum of the models' tensors, normalized when it asks to be.
    #[inline(never)]
    fn weighted(
        &mut self,
        call: &MethodCall,
        terms: Vec<(TensorExpr, f64)>,
        name: &str,
    ) -> Option<TensorExpr> {
        let divisor = if Self::flag(call.sig, call, "normalize") {
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
        // mergekit's linear accumulates in f32 even for 16-bit inputs and rounds once.
        Some(self.round(TensorExpr::weighted_sum(terms, divisor)))
    }

    /// task_arithmetic in a 16-bit compute dtype, as mergekit's GTA code runs it on
    /// 16-bit tensors: each `(x − base)` rounded, times its weight (a tensor of the
    /// compute dtype, so the weight is rounded too) rounded, the products summed in f32
    /// and rounded, divided by the rounded sum of the rounded weights (|Σw| < 1e-8 -> 1)
    /// and rounded, times λ (an f32 scalar) and rounded, plus the base, rounded.
    fn task_arithmetic_16(
        &self,
        base: TensorExpr,
        models: Vec<TensorExpr>,
        weights: &[f64],
        lambda: f64,
        normalize: bool,
    ) -> TensorExpr {
        let weights: Vec<f64> = weights.iter().map(|w| self.cast_param(*w)).collect();
        let products: Vec<(TensorExpr, f64)> = models
            .into_iter()
            .zip(&weights)
            .map(|(x, w)| {
                let delta = self.round(x - base.clone());
                (self.round(TensorExpr::scale(delta, *w)), 1.0)
            })
            .collect();
        let mut mixed = self.round(TensorExpr::weighted_sum(products, None));
        if normalize {
            let sum = self.cast_param(weights.iter().map(|w| *w as f32).sum::<f32>() as f64);
            // torch compares with the threshold rounded to the compute dtype (0 in f16,
            // so there a zero sum divides by zero, as in mergekit and `half::gta`).
            let divisor = if sum.abs() < self.cast_param(1e-8) {
                1.0
            } else {
                sum
            };
            mixed = self.round(TensorExpr::divide(mixed, divisor));
        }
        if lambda != 1.0 {
            mixed = self.round(TensorExpr::scale(mixed, lambda));
        }
        self.round(base + mixed)
    }

    /// Every method but `linear`: a [`MethodOp`] over the base (first) and the models.
    fn whole_tensor_method(&mut self, call: &MethodCall, name: &str, t: f64) -> Option<TensorExpr> {
        let base = match &call.base {
            Some(b) => Some(self.tensor(b, name, t, true)?),
            None => None,
        };
        let mut models = Vec::with_capacity(call.models.len());
        for m in &call.models {
            models.push(self.tensor(&m.expr, name, t, true));
        }
        let models: Vec<TensorExpr> = models.into_iter().collect::<Option<_>>()?;
        self.method_op(call, base, models, name, t)
    }

    /// The method applied to its inputs' tensors (computed already, out of the recursion).
    #[inline(never)]
    fn method_op(
        &mut self,
        call: &MethodCall,
        base: Option<TensorExpr>,
        models: Vec<TensorExpr>,
        name: &str,
        t: f64,
    ) -> Option<TensorExpr> {
        let sig = call.sig;
        let with_base = base.is_some();
        let flag = |key: &str| Self::flag(sig, call, key);
        let op = match sig.method {
            Method::Linear => return self.linear(call, name, t),
            Method::Passthrough => {
                let scale = self.per_model(call, "scale", 1.0, name, t)?;
                let x = models.into_iter().next()?;
                // A scale of exactly 1 is the tensor itself (copied as raw bytes when it can be).
                return Some(if scale[0] == 1.0 {
                    x
                } else {
                    self.round(TensorExpr::scale(x, scale[0]))
                });
            }
            Method::Slerp => MethodOp::Slerp {
                t: self.required(call, "t", name, t)?,
            },
            Method::Nuslerp => {
                let w = self.per_model(call, "weight", 1.0, name, t)?;
                MethodOp::Nuslerp {
                    weights: [w[0], w[1]],
                    flatten: flag("nuslerp_flatten"),
                    row_wise: flag("nuslerp_row_wise"),
                    with_base,
                }
            }
            Method::Multislerp => MethodOp::Multislerp {
                weights: self.per_model(call, "weight", 1.0, name, t)?,
                normalize_weights: flag("normalize_weights"),
                eps: self.required(call, "eps", name, t)?,
                with_base,
            },
            Method::Karcher => MethodOp::Karcher {
                max_iter: self.required(call, "max_iter", name, t)? as u32,
                tol: self.required(call, "tol", name, t)?,
            },
            Method::Sce => MethodOp::Sce {
                select_topk: self.required(call, "select_topk", name, t)?,
            },
            Method::Ram => MethodOp::Ram {
                epsilon: self.required(call, "epsilon", name, t)?,
            },
            Method::RamPlusTl => MethodOp::RamPlusTl {
                r: self.required(call, "r", name, t)?,
                alpha: self.required(call, "alpha", name, t)?,
                epsilon: self.required(call, "epsilon", name, t)?,
            },
            Method::ModelStock => MethodOp::ModelStock {
                filter_wise: flag("filter_wise"),
            },
            Method::Nearswap => MethodOp::Nearswap {
                t: self.required(call, "t", name, t)?,
            },
            Method::ArceeFusion => MethodOp::ArceeFusion,
            Method::Gta(GtaKind::TaskArithmetic) => {
                // Element-wise, so it lowers to arithmetic the fused kernels (CPU chunks, GPU)
                // run in one pass, with the GTA kernel's order of operations: each
                // (x − base)·w summed in model order, divided by Σw (|Σw| < 1e-8 -> 1) when
                // normalize is on, times λ, plus the base.
                let base = base?;
                // The base is copied once per model.
                if !self.take_ops(size(&base) * models.len() as u64) {
                    return None;
                }
                let weights = self.per_model(call, "weight", 1.0, name, t)?;
                let lambda = self.required(call, "lambda", name, t)?;
                if self.compute.half().is_some() {
                    return Some(self.task_arithmetic_16(base, models, &weights, lambda, flag("normalize")));
                }
                let divisor = flag("normalize").then(|| {
                    let sum: f32 = weights.iter().map(|w| *w as f32).sum();
                    if sum.abs() < 1e-8 {
                        1.0
                    } else {
                        sum as f64
                    }
                });
                let terms = models
                    .into_iter()
                    .zip(&weights)
                    .map(|(x, w)| (x - base.clone(), *w))
                    .collect();
                let mut mixed = TensorExpr::weighted_sum(terms, divisor);
                if lambda as f32 != 1.0 {
                    mixed = TensorExpr::scale(mixed, lambda);
                }
                return Some(base + mixed);
            }
            Method::Gta(kind) => {
                let densities = self.per_model(call, "density", 1.0, name, t)?;
                let epsilons = self.per_model(call, "epsilon", 0.15, name, t)?;
                if matches!(kind, GtaKind::Della | GtaKind::DellaLinear) {
                    for ((d, e), m) in densities.iter().zip(&epsilons).zip(&call.models) {
                        if *d < 1.0 && (d - e <= 0.0 || d + e >= 1.0) {
                            self.problems.add(
                                m.span,
                                Code::E0305,
                                "density ± epsilon must stay inside (0, 1)",
                                "this model's density and epsilon",
                                name,
                            );
                            return None;
                        }
                    }
                }
                let seed = self.seed;
                MethodOp::Gta(GtaOp {
                    kind,
                    weights: self.per_model(call, "weight", 1.0, name, t)?,
                    gammas: self.per_model(call, "gamma", 0.01, name, t)?,
                    densities,
                    epsilons,
                    lambda: self.required(call, "lambda", name, t)?,
                    normalize: flag("normalize"),
                    rescale: flag("rescale"),
                    keys: (0..call.models.len() as u32)
                        .map(|i| crate::ops::rng_key(seed, i, name))
                        .collect(),
                })
            }
        };
        let mut inputs: Vec<TensorExpr> = base.into_iter().collect();
        inputs.extend(models);
        Some(TensorExpr::Method {
            op,
            compute: self.compute,
            inputs,
        })
    }
}

/// The tensor name `expr` reads for output name `name` (following layer renumbering).
fn source_name(expr: &MExpr, name: &str) -> String {
    match expr {
        MExpr::Layers { inner, start, module } => match names::layer_in(name, module) {
            Some((i, _)) => source_name(inner, &names::with_layer(name, i + start)),
            None => name.to_string(),
        },
        MExpr::Neg(inner)
        | MExpr::Scale(inner, ..)
        | MExpr::Divide(inner, ..)
        | MExpr::Add(inner, _)
        | MExpr::Sub(inner, _) => source_name(inner, name),
        MExpr::Stack {
            segments,
            pre,
            post,
            module,
        } => match names::layer_in(name, module) {
            None if names::stacks_before(name) => source_name(pre, name),
            None => source_name(post, name),
            Some((i, _)) => match segments
                .iter()
                .find(|s| (s.offset..s.offset + s.len).contains(&i))
            {
                Some(seg) => source_name(&seg.expr, &names::with_layer(name, i - seg.offset)),
                None => name.to_string(),
            },
        },
        MExpr::Graft {
            onto,
            part,
            part_names,
        } => source_name(if part_names.contains(name) { part } else { onto }, name),
        MExpr::Rename { inner, map } => source_name(inner, map.get(name).map_or(name, String::as_str)),
        MExpr::Lora(l) => source_name(&l.inner, name),
        MExpr::Input(_) | MExpr::Method(_) | MExpr::Moe(_) => name.to_string(),
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
    // A mixture of experts takes only the MLPs of its experts, by design.
    let experts: BTreeSet<ModelId> = program
        .outputs
        .iter()
        .filter(|o| o.moe.is_some())
        .flat_map(|o| o.inputs.iter().copied())
        .collect();
    for (i, m) in program.models.iter().enumerate() {
        let id = ModelId(i as u32);
        if !read.iter().any(|(r, _)| *r == id) || experts.contains(&id) {
            continue; // an unused model is reported as an unused binding
        }
        if m.adapter {
            continue; // factors an adapter's config leaves out are reported by W0020
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
        TensorExpr::Gather(g) => out.extend(g.sources.iter().map(|(m, t, _)| (*m, t.as_str()))),
        e => e.operands().iter().for_each(|x| collect_loads(x, out)),
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

/// A `moe(...)` output: base tensors and per-expert tensors as ordinary output tensors,
/// fused expert tensors as parts (`{name}#{k}`) the writer puts one after another, and the
/// routers and zero biases as tensors the run generates.
fn moe_output(ctx: &mut Ctx, moe: &MoeExpr, mut out: hir::Output, model: &ModelVal) -> hir::Output {
    let mut spec = moe.spec.clone();
    let mut names: Vec<&String> = model.tensors.keys().collect();
    names.sort_by(|a, b| natural_cmp(a, b));
    for name in names {
        let (Some(sig), Some(source)) = (model.tensors.get(name), moe.sources.get(name)) else {
            continue;
        };
        let float_dtype = out.dtype.unwrap_or(sig.dtype);
        match source {
            MoeSource::Base => {
                let Some(expr) = ctx.tensor(&moe.base, name, 0.0, false) else {
                    continue;
                };
                let dtype = if sig.dtype.is_mergeable() {
                    float_dtype
                } else {
                    sig.dtype
                };
                out.tensors.push(OutputTensor {
                    name: name.clone(),
                    shape: sig.shape.clone(),
                    dtype,
                    expr,
                });
            }
            MoeSource::Member { member, name: from } => {
                let Some(expr) = ctx.moe_member(moe, *member, from) else {
                    continue;
                };
                out.tensors.push(OutputTensor {
                    name: name.clone(),
                    shape: sig.shape.clone(),
                    dtype: float_dtype,
                    expr,
                });
            }
            MoeSource::Parts(parts) => {
                let mut part_names = Vec::with_capacity(parts.len());
                for (k, (member, from, shape)) in parts.iter().enumerate() {
                    let part = format!("{name}#{k}");
                    let Some(expr) = ctx.moe_member(moe, *member, from) else {
                        continue;
                    };
                    out.tensors.push(OutputTensor {
                        name: part.clone(),
                        shape: shape.clone(),
                        dtype: float_dtype,
                        expr,
                    });
                    part_names.push(part);
                }
                spec.assembled.push(hir::Assembled {
                    name: name.clone(),
                    shape: sig.shape.clone(),
                    dtype: float_dtype,
                    parts: part_names,
                });
            }
            MoeSource::Generated(what) => spec.generated.push(hir::Generated {
                name: name.clone(),
                shape: sig.shape.clone(),
                dtype: float_dtype,
                what: *what,
            }),
        }
    }
    out.moe = Some(std::sync::Arc::new(spec));
    out
}
