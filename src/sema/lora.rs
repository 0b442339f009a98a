//! `lora(m, "adapter", scale: s)`: a PEFT LoRA adapter applied to a model, checked
//! against the model's tensors from headers alone: every module the adapter changes must
//! be a tensor of the model, with the shapes its factors need; replaced tensors must keep
//! their shapes, and an adapter that resizes the vocabulary is refused.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use super::hir::{self, ModelId};
use super::params::Param;
use super::value::{LoraEdit, LoraExpr, MExpr, ModelVal, Value};
use super::{names, union_inputs, wrong_type, Checker};
use crate::diag::{Code, Diagnostic};
use crate::io::AdapterInfo;
use crate::ops::lowrank;
use crate::source::Span;
use crate::syntax::ast::{self, Arg, Expr, ExprKind};

const EXAMPLE: &str = "for example: `lora(base, \"adapters/my-lora\", scale: 1.0)`";

/// Every adapter a script applies: the string argument of each `lora(...)` call, in order
/// (to load into the [`ModelIndex`](crate::io::ModelIndex) before checking).
pub fn adapter_references(script: &ast::Script) -> Vec<&str> {
    fn walk<'a>(e: &'a Expr, out: &mut Vec<&'a str>) {
        match &e.kind {
            ExprKind::Call { func, args } => {
                for a in args {
                    match a {
                        Arg::Positional(x) => {
                            if let (true, ExprKind::Str(s)) = (func.name == "lora", &x.kind) {
                                out.push(s);
                            }
                            walk(x, out);
                        }
                        Arg::Named(n) => walk(&n.value, out),
                    }
                }
            }
            ExprKind::List(items) => items.iter().for_each(|x| walk(x, out)),
            ExprKind::Neg(x) => walk(x, out),
            ExprKind::Binary { lhs, rhs, .. } => {
                walk(lhs, out);
                walk(rhs, out);
            }
            ExprKind::Params { target, params } => {
                walk(target, out);
                params.iter().for_each(|p| walk(&p.value, out));
            }
            ExprKind::Layers { target, .. } => walk(target, out),
            ExprKind::Match(arms) => arms.iter().for_each(|a| walk(&a.value, out)),
            ExprKind::Number(_) | ExprKind::Size(_) | ExprKind::Str(_) | ExprKind::Name(_) => {}
        }
    }
    let mut out = Vec::new();
    for stmt in &script.stmts {
        match &stmt.kind {
            ast::StmtKind::Let { value, .. } | ast::StmtKind::Set { value, .. } => walk(value, &mut out),
            ast::StmtKind::Save { value, options, .. } => {
                walk(value, &mut out);
                options.iter().for_each(|o| walk(&o.value, &mut out));
            }
            ast::StmtKind::Model { .. } => {}
        }
    }
    out
}

impl Checker<'_> {
    pub(super) fn lora(&mut self, args: &[Arg], span: Span) -> Value {
        let mut model: Option<ModelVal> = None;
        let mut adapter: Option<(String, Span)> = None;
        let mut scale: Option<(Param, Span)> = None;
        let mut failed = false;
        for arg in args {
            match arg {
                Arg::Positional(e) => match (&e.kind, self.expr(e)) {
                    (ExprKind::Str(s), _) if adapter.is_none() => adapter = Some((s.clone(), e.span)),
                    (_, Value::Model(m)) if model.is_none() => model = Some(self.no_params(m)),
                    (_, Value::Error) => failed = true,
                    (_, other) => {
                        failed = true;
                        let d = match other {
                            Value::Model(_) | Value::Str => {
                                Diagnostic::error(Code::E0206, "`lora` takes one model and one adapter")
                                    .at(e.span, "one too many")
                            }
                            _ => wrong_type(
                                format!(
                                    "`lora` takes a model and an adapter path, found {}",
                                    other.describe()
                                ),
                                e.span,
                                &other,
                            ),
                        };
                        self.diags.push(d.with_help(EXAMPLE));
                    }
                },
                Arg::Named(n) if n.name.name == "scale" && scale.is_none() => match self.expr(&n.value) {
                    Value::Param(p) => scale = Some((p, n.value.span)),
                    Value::Error => failed = true,
                    other => {
                        failed = true;
                        self.diags.push(wrong_type(
                            format!(
                                "`scale` must be a number, gradient or table, found {}",
                                other.describe()
                            ),
                            n.value.span,
                            &other,
                        ));
                    }
                },
                Arg::Named(n) => {
                    failed = true;
                    let code = if n.name.name == "scale" {
                        Code::E0207
                    } else {
                        Code::E0204
                    };
                    self.diags.push(
                        Diagnostic::error(code, format!("`lora` has no parameter `{}` here", n.name.name))
                            .at(n.name.span, "not taken")
                            .with_help("`lora` takes one named argument, `scale`"),
                    );
                }
            }
        }
        if failed {
            return Value::Error;
        }
        let (Some(model), Some((reference, ref_span))) = (model, adapter) else {
            return self.error(
                Diagnostic::error(Code::E0205, "`lora` needs a model and the path of a PEFT adapter")
                    .at(span, "incomplete")
                    .with_help(EXAMPLE),
            );
        };
        let info = match self.index.adapter(&reference) {
            Some(Ok(info)) => Arc::clone(info),
            Some(Err(e)) => {
                let mut d = Diagnostic::error(e.code(), e.to_string()).at(ref_span, "this adapter");
                if let Some(help) = e.help() {
                    d = d.with_help(help);
                }
                return self.error(d);
            }
            None => {
                return self
                    .error(Diagnostic::bug(format!("adapter `{reference}` was not loaded")).at(ref_span, ""))
            }
        };
        let Some(edits) = self.adapter_edits(&model, &info, ref_span) else {
            return Value::Error;
        };
        let id = self.adapter_model(&reference, &info, ref_span);
        let (scale, scale_span) = scale.unwrap_or((Param::Number(1.0), span));
        let inputs = union_inputs(model.inputs.iter().chain([&id]));
        Value::Model(ModelVal {
            expr: Rc::new(MExpr::Lora(Box::new(LoraExpr {
                inner: Rc::clone(&model.expr),
                adapter: id,
                edits,
                scale,
                scale_span,
            }))),
            tensors: Rc::clone(&model.tensors),
            layer_sources: Rc::clone(&model.layer_sources),
            span,
            inputs,
            params: Vec::new(),
        })
    }

    /// The input model that reads the adapter's weights, one per adapter.
    fn adapter_model(&mut self, reference: &str, info: &AdapterInfo, span: Span) -> ModelId {
        if let Some(id) = self.adapter_ids.get(reference) {
            return *id;
        }
        let id = ModelId(self.models.len() as u32);
        self.models.push(hir::InputModel {
            name: format!("adapter {reference}"),
            info: Arc::clone(&info.weights),
            span,
            adapter: true,
        });
        self.adapter_ids.insert(reference.to_owned(), id);
        id
    }

    /// What the adapter does to each tensor of `model`, or `None` after reporting why it
    /// does not fit.
    fn adapter_edits(
        &mut self,
        model: &ModelVal,
        info: &AdapterInfo,
        at: Span,
    ) -> Option<BTreeMap<String, LoraEdit>> {
        let config = &info.config;
        let mut edits = BTreeMap::new();
        let mut missing: Vec<&str> = Vec::new();
        let mut ignored: Vec<&str> = Vec::new();
        let mut ok = true;
        for (name, tensor) in &info.replacements {
            let Some(sig) = model.tensors.get(name) else {
                missing.push(name);
                continue;
            };
            // `replacements` lists tensors of `weights`, so this always finds one.
            let Some(replaced) = info.weights.tensors.get(tensor) else {
                continue;
            };
            if replaced.shape != sig.shape {
                ok = false;
                self.diags
                    .push(shape_diagnostic(name, &sig.shape, &replaced.shape, at));
                continue;
            }
            edits.insert(
                name.clone(),
                LoraEdit::Replace {
                    tensor: tensor.clone(),
                },
            );
        }
        for (module, m) in &info.modules {
            if !config.targets(module) {
                ignored.push(module);
                continue;
            }
            let weight = format!("{module}.weight");
            if edits.contains_key(&weight) {
                continue; // a module saved whole (modules_to_save) is not adapted
            }
            let Some(sig) = model.tensors.get(&weight) else {
                missing.push(module);
                continue;
            };
            let transpose = m.embedding || config.fan_in_fan_out;
            let rank = m.rank();
            let fits = lowrank::factor_shapes(&sig.shape, rank, transpose)
                .is_some_and(|(b, a)| b[..] == m.b_shape[..] && a[..] == m.a_shape[..]);
            if !fits {
                ok = false;
                // An embedding adapter over another vocabulary: say so.
                let vocab = m.embedding && sig.shape.len() == 2 && m.a_shape.get(1) != sig.shape.first();
                let d = if vocab {
                    vocabulary_diagnostic(&weight, sig.shape[0], m.a_shape.get(1).copied().unwrap_or(0), at)
                } else {
                    let (p, q) = if transpose { ("in", "out") } else { ("out", "in") };
                    Diagnostic::error(
                        Code::E0905,
                        format!(
                            "shape mismatch: `{weight}` is {:?} in the model, but the adapter's factors are `lora_A` {:?} and `lora_B` {:?}",
                            sig.shape, m.a_shape, m.b_shape
                        ),
                    )
                    .at(at, "this adapter")
                    .with_help(format!(
                        "a [{p}, {q}] weight takes `lora_A` [r, {q}] and `lora_B` [{p}, r]{}; the adapter was trained on another model",
                        if config.fan_in_fan_out { " (with `fan_in_fan_out`)" } else { "" }
                    ))
                };
                self.diags.push(d);
                continue;
            }
            if !sig.dtype.is_mergeable() {
                ok = false;
                self.diags.push(
                    Diagnostic::error(
                        Code::E0307,
                        format!(
                            "cannot apply an adapter to `{weight}`, a {} tensor",
                            sig.dtype.safetensors_name()
                        ),
                    )
                    .at(at, "this adapter"),
                );
                continue;
            }
            edits.insert(
                weight,
                LoraEdit::LowRank {
                    a: m.a.clone(),
                    b: m.b.clone(),
                    rank,
                    scaling: config.scaling(module),
                    transpose,
                    dtype: sig.dtype,
                },
            );
        }
        if !missing.is_empty() {
            ok = false;
            let shown = names::bullet_list(&names::grouped(missing.iter().copied()), 8);
            self.diags.push(
                Diagnostic::error(
                    Code::E0904,
                    match missing.len() {
                        1 => "a module the adapter changes is not in the model".to_string(),
                        n => format!("{n} modules the adapter changes are not in the model"),
                    },
                )
                .at(at, "this adapter")
                .with_label(model.span, "this model")
                .with_note(format!("not in the model:\n{shown}"))
                .with_help(format!(
                    "apply the adapter to the model it was trained on; the model's tensors look like `{}`",
                    model.tensors.keys().next().map_or("", String::as_str)
                )),
            );
        }
        if !ignored.is_empty() {
            let shown = names::bullet_list(&names::grouped(ignored.iter().copied()), 8);
            self.diags.push(
                Diagnostic::error(
                    Code::W0020,
                    match ignored.len() {
                        1 => "the factors of 1 module are not applied: the adapter's config does not target it"
                            .to_string(),
                        n => format!(
                            "the factors of {n} modules are not applied: the adapter's config does not target them"
                        ),
                    },
                )
                .at(at, "this adapter")
                .with_note(format!("not applied:\n{shown}"))
                .with_help(
                    "PEFT loads only the modules its `target_modules`, `exclude_modules` and \
                     `layers_to_transform` select, and ignores these too",
                ),
            );
        }
        if ok && edits.is_empty() {
            self.diags.push(
                Diagnostic::error(Code::W0021, "the adapter changes no tensor of the model")
                    .at(at, "this adapter")
                    .with_help("check the adapter's `target_modules` and `layers_to_transform`"),
            );
        }
        ok.then_some(edits)
    }
}

/// A replaced tensor of another shape: a resized vocabulary for embeddings and heads.
fn shape_diagnostic(name: &str, model: &[usize], adapter: &[usize], at: Span) -> Diagnostic {
    let embedding = ["embed", "lm_head", "wte", "word_embeddings", "output.weight"]
        .iter()
        .any(|k| name.contains(k));
    if embedding && model.len() == 2 && adapter.len() == 2 && model[1] == adapter[1] && model[0] != adapter[0]
    {
        return vocabulary_diagnostic(name, model[0], adapter[0], at);
    }
    Diagnostic::error(
        Code::E0905,
        format!("shape mismatch: the adapter replaces `{name}` ({model:?} in the model) with a {adapter:?} tensor"),
    )
    .at(at, "this adapter")
    .with_help("the adapter was trained on another model")
}

fn vocabulary_diagnostic(name: &str, model_rows: usize, adapter_rows: usize, at: Span) -> Diagnostic {
    Diagnostic::error(
        Code::E0906,
        format!(
            "the adapter resizes the vocabulary: `{name}` has {model_rows} tokens in the model and {adapter_rows} in the adapter"
        ),
    )
    .at(at, "this adapter")
    .with_help(
        "an adapter trained after `resize_token_embeddings` needs the tokenizer and embeddings it was trained with; \
         mergec does not resize a model's vocabulary",
    )
}
