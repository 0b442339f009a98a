//! Checking layer surgery: layer ranges `m[a..b]`, `stack`, `select`, `graft` and
//! `rename`, and the argument lists of these built-ins.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::hir::ModelId;
use super::params::{self};
use super::value::{MExpr, ModelVal, TensorSig, Value};
use super::{names, union_inputs, value, wrong_type, Checker};
use crate::diag::{Code, Diagnostic};
use crate::source::Span;
use crate::syntax::ast::{Arg, Expr, ExprKind, Ident, Named};

/// A built-in's arguments: positional models, positional strings, named strings.
type BuiltinArgs = (
    Vec<(ModelVal, Span)>,
    Vec<(String, Span)>,
    BTreeMap<String, (String, Span)>,
);

/// `stack`'s arguments, as they are checked.
#[derive(Default)]
struct StackArgs {
    segments: Vec<ModelVal>,
    embed: Option<ModelVal>,
    head: Option<ModelVal>,
    failed: bool,
}

impl Checker<'_> {
    pub(super) fn layers(
        &mut self,
        target: &Expr,
        start: u64,
        end: u64,
        range_span: Span,
        span: Span,
    ) -> Value {
        let value = self.expr(target);
        self.layer_range(target, value, (start, end), range_span, span)
    }

    /// `.layers[start..end]` of `value` (the evaluated `target`).
    #[inline(never)]
    fn layer_range(
        &mut self,
        target: &Expr,
        value: Value,
        (start, end): (u64, u64),
        range_span: Span,
        span: Span,
    ) -> Value {
        let m = match value {
            Value::Model(m) => self.no_params(m),
            Value::Error => return Value::Error,
            other => {
                return self.error(wrong_type(
                    format!("`.layers[..]` needs a model, found {}", other.describe()),
                    target.span,
                    &other,
                ))
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

    /// `stack(seg, ...; embed: m, head: m)`: the segments' layers one after another,
    /// renumbered; embeddings from the first segment (or `embed:`), the final norm and
    /// lm_head from the last (or `head:`).
    pub(super) fn stack(&mut self, args: &[Arg], span: Span) -> Value {
        let mut st = StackArgs::default();
        for arg in args {
            let (name, e) = match arg {
                Arg::Positional(e) => (None, e),
                Arg::Named(n) => (Some(&n.name), &n.value),
            };
            let value = self.expr(e);
            self.stack_arg(name, e, value, &mut st);
        }
        self.stack_of(st, span)
    }

    #[inline(never)]
    fn stack_arg(&mut self, name: Option<&Ident>, e: &Expr, value: Value, st: &mut StackArgs) {
        let model = match value {
            Value::Model(m) => self.no_params(m),
            Value::Models(ms) if name.is_none() => {
                st.segments.extend(ms.into_iter().map(|m| ModelVal {
                    params: Vec::new(),
                    ..m
                }));
                return;
            }
            Value::Error => {
                st.failed = true;
                return;
            }
            other => {
                st.failed = true;
                self.diags.push(
                    wrong_type(
                        format!("`stack` takes models, found {}", other.describe()),
                        e.span,
                        &other,
                    )
                    .with_help("for example: `stack(a.layers[0..24], b.layers[8..32])`"),
                );
                return;
            }
        };
        match name.map(|n| n.name.as_str()) {
            None => st.segments.push(model),
            Some("embed") => st.embed = Some(model),
            Some("head") => st.head = Some(model),
            Some(other) => {
                st.failed = true;
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

    /// The stack of the checked arguments.
    #[inline(never)]
    fn stack_of(&mut self, st: StackArgs, span: Span) -> Value {
        let StackArgs {
            segments,
            embed,
            head,
            mut failed,
        } = st;
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
    pub(super) fn builtin_args(&mut self, func: &str, args: &[Arg], named: &[&str]) -> Option<BuiltinArgs> {
        let mut out: BuiltinArgs = (Vec::new(), Vec::new(), BTreeMap::new());
        let mut failed = false;
        for arg in args {
            match arg {
                Arg::Positional(e) => {
                    let value = self.expr(e);
                    failed |= !self.builtin_positional(func, e, value, &mut out);
                }
                Arg::Named(n) => failed |= !self.builtin_named(func, n, named, &mut out),
            }
        }
        (!failed).then_some(out)
    }

    /// A positional argument of a built-in: a string or a model. False on an error.
    #[inline(never)]
    fn builtin_positional(&mut self, func: &str, e: &Expr, value: Value, out: &mut BuiltinArgs) -> bool {
        match (&e.kind, value) {
            (ExprKind::Str(s), _) => out.1.push((s.clone(), e.span)),
            (_, Value::Model(m)) => out.0.push((self.no_params(m), e.span)),
            (_, Value::Error) => return false,
            (_, other) => {
                self.diags.push(wrong_type(
                    format!("`{func}` takes models and strings, found {}", other.describe()),
                    e.span,
                    &other,
                ));
                return false;
            }
        }
        true
    }

    /// A named argument of a built-in: one of `named`, a string. False on an error.
    #[inline(never)]
    fn builtin_named(&mut self, func: &str, n: &Named, named: &[&str], out: &mut BuiltinArgs) -> bool {
        if !named.contains(&n.name.name.as_str()) {
            let mut d = Diagnostic::error(
                Code::E0204,
                format!("`{func}` has no parameter `{}`", n.name.name),
            )
            .at(n.name.span, "unknown parameter");
            if let Some(s) = names::did_you_mean(&n.name.name, named.iter().copied()) {
                d = d.with_help(format!("did you mean `{s}`?"));
            }
            self.diags.push(d);
            return false;
        }
        match &n.value.kind {
            ExprKind::Str(s) => {
                out.2.insert(n.name.name.clone(), (s.clone(), n.value.span));
                true
            }
            _ => {
                self.diags.push(
                    Diagnostic::error(Code::E0301, format!("`{}` expects a string", n.name.name))
                        .at(n.value.span, "not a string"),
                );
                false
            }
        }
    }

    /// `select(m, "pattern", ...; regex: "...")`: the tensors of `m` whose names match any
    /// pattern (substring, or a glob over the whole name when it has `*`) or the regex.
    pub(super) fn select(&mut self, args: &[Arg], span: Span) -> Value {
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
    pub(super) fn graft(&mut self, args: &[Arg], span: Span) -> Value {
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
    pub(super) fn rename(&mut self, args: &[Arg], span: Span) -> Value {
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
}
