//! The method call a document's body becomes, with its base and parameters in place.

use super::super::pretty::quote;
use super::params::{chain_arms, find};
use super::slices::Source;
use super::*;
use crate::sema::methods::{Base, MethodSig};

pub(super) struct Arg<'p, 'n> {
    pub(super) model: Expr,
    pub(super) r: Ref,
    pub(super) params: &'p [Param<'n>],
    /// The model's layer range starts at layer 0 (input tensor names equal the call's).
    pub(super) starts_at_zero: bool,
}

pub(super) fn placed(e: Expr, place: Option<Span>) -> Expr {
    match place {
        Some(p) => e.at(p),
        None => e,
    }
}

pub(super) fn with_block(model: Expr, entries: Vec<Expr>) -> Expr {
    if entries.is_empty() {
        model
    } else {
        Expr::Block(Box::new(model), entries)
    }
}

/// The model name at the start of an argument (`ft1` of `ft1.layers[0..2]`).
pub(super) fn flat_name(e: &Expr) -> String {
    match e {
        Expr::Atom(s) => s.split('.').next().unwrap_or(s).to_string(),
        Expr::At(inner, _) => flat_name(inner),
        Expr::Cat(parts) => parts.first().map_or(String::new(), flat_name),
        _ => String::new(),
    }
}

impl Translator<'_> {
    /// The expression a document merges to.
    pub(super) fn doc_expr(&mut self, doc: &Doc, idents: &[String]) -> Expr {
        if let Some(Body::Moe(moe)) = &doc.body {
            return self.moe_expr(doc, moe, idents);
        }
        let Some((sig, method_span)) = doc.method else {
            return Expr::atom("");
        };
        match &doc.body {
            Some(Body::Models(sources)) => {
                let args = self.model_args(sources, doc.base, idents, |m| m);
                self.call(sig, method_span, args, doc.base, &[], &doc.params, 0)
            }
            Some(Body::Modules(modules)) => {
                // Each module merged on its own tensors, grafted over the base (else the
                // first model) in turn.
                let onto = doc
                    .base
                    .or_else(|| modules.iter().find_map(|m| m.sources.first().map(|s| s.model)));
                let Some(onto) = onto else {
                    return Expr::atom("");
                };
                let mut out = Expr::atom(self.ref_name(onto.r, idents)).at(onto.span);
                for m in modules {
                    let select = |model: Expr| {
                        Expr::Call(
                            "select".into(),
                            vec![model, Expr::atom(quote(&m.pattern)).at(m.span)],
                        )
                    };
                    let args = self.model_args(&m.sources, doc.base, idents, select);
                    let merged = self.call(sig, method_span, args, doc.base, &m.params, &doc.params, 0);
                    out = Expr::Call("graft".into(), vec![out, merged]).at(m.span);
                }
                out
            }
            Some(Body::Slices(slices, slices_span)) => {
                let mut segments = Vec::new();
                let mut offset = 0;
                for slice in slices {
                    let this_offset = offset;
                    offset += slice
                        .sources
                        .first()
                        .and_then(|s| s.range)
                        .map_or(0, |(a, b, _)| (b - a).max(0) as usize);
                    let args: Vec<Arg> = slice
                        .sources
                        .iter()
                        .map(|s| {
                            let (a, b, range_span) = s.range.unwrap_or((0, 0, s.model.span));
                            Arg {
                                model: Expr::Cat(vec![
                                    Expr::atom(self.ref_name(s.model.r, idents)).at(s.model.span),
                                    Expr::atom(format!(".layers[{a}..{b}]")).at(range_span),
                                ]),
                                r: s.model.r,
                                params: &s.params,
                                starts_at_zero: a == 0,
                            }
                        })
                        .collect();
                    let base = slice.base.or(doc.base);
                    if let Some(b) = base {
                        let needs = sig.base != Base::None || sig.name == "slerp";
                        if needs && !args.iter().any(|a| a.r == b.r) {
                            let name = self.ref_name(b.r, idents);
                            let d = self.err(
                                Code::E0603,
                                format!("the base model `{name}` is not among this slice's sources"),
                                first_line_of(slice.span),
                                "this slice",
                            );
                            *d = d
                                .clone()
                                .with_label(b.span, "the base model")
                                .with_help("add the base model to the slice's `sources` with the same `layer_range` length");
                            continue;
                        }
                    }
                    // A plain passthrough of one source is the layer range itself.
                    let plain = sig.name == "passthrough"
                        && args.len() == 1
                        && args[0].params.is_empty()
                        && slice.params.is_empty()
                        && doc.params.is_empty();
                    if plain {
                        if let Some(a) = args.into_iter().next() {
                            segments.push(a.model);
                        }
                        continue;
                    }
                    segments.push(self.call(
                        sig,
                        method_span,
                        args,
                        base,
                        &slice.params,
                        &doc.params,
                        this_offset,
                    ));
                }
                if segments.len() == 1 {
                    segments.remove(0)
                } else {
                    Expr::Call("stack".into(), segments).at(*slices_span)
                }
            }
            Some(Body::Moe(_)) | None => Expr::atom(""),
        }
    }

    /// The inputs of a `models:` list, each model written through `wrap`; mergekit appends
    /// the base model to the inputs when it is not listed.
    fn model_args<'p, 'n>(
        &self,
        sources: &'p [Source<'n>],
        base: Option<RefAt>,
        idents: &[String],
        wrap: impl Fn(Expr) -> Expr,
    ) -> Vec<Arg<'p, 'n>> {
        let mut args: Vec<Arg> = sources
            .iter()
            .map(|s| Arg {
                model: wrap(Expr::atom(self.ref_name(s.model.r, idents)).at(s.model.span)),
                r: s.model.r,
                params: &s.params,
                starts_at_zero: true,
            })
            .collect();
        if let Some(base) = base {
            if !args.iter().any(|a| a.r == base.r) {
                args.push(Arg {
                    model: wrap(Expr::atom(self.ref_name(base.r, idents)).at(base.span)),
                    r: base.r,
                    params: &[],
                    starts_at_zero: true,
                });
            }
        }
        args
    }

    /// One method call: `args` in YAML order; the base goes where the method wants it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn call(
        &mut self,
        sig: &'static MethodSig,
        method_span: Span,
        mut args: Vec<Arg>,
        base: Option<RefAt>,
        slice_params: &[Param],
        top_params: &[Param],
        offset: usize,
    ) -> Expr {
        // mergekit's slerp needs its base: the t = 0 end.
        let base_first = sig.base == Base::Required || sig.name == "slerp";
        let mut base_arg: Option<Arg> = None;
        match (base, base_first || sig.base == Base::Optional) {
            (Some(b), true) => {
                if let Some(i) = args.iter().position(|a| a.r == b.r) {
                    base_arg = Some(args.remove(i));
                }
            }
            (None, true) if base_first => {
                self.err(
                    Code::E0603,
                    format!("`{}` needs a `base_model`", sig.name),
                    method_span,
                    "this method merges relative to a base model",
                )
                .help
                .push(if sig.name == "slerp" {
                    "add `base_model:` naming the model at t = 0".into()
                } else {
                    "add `base_model:` naming the model the others were fine-tuned from".into()
                });
            }
            _ => {}
        }
        // Check every parameter name once, at each level.
        for p in slice_params.iter().chain(top_params) {
            self.check_param(sig, p, false);
        }
        for a in args.iter().chain(base_arg.iter()) {
            for p in a.params {
                self.check_param(sig, p, true);
            }
        }
        let mut named: Vec<Expr> = Vec::new();
        let mut blocks: Vec<Vec<Expr>> = vec![Vec::new(); args.len()];
        let all_at_zero = args.iter().all(|a| a.starts_at_zero);
        for p in sig.params {
            let call_levels = [find(slice_params, p.name), find(top_params, p.name)];
            let call_place = call_levels.iter().flatten().next().map(|q| q.place());
            let call_arms = self.chain(&call_levels);
            let hint = format!("{}_{}", sig.name, p.name);
            if !p.per_model {
                if offset > 0 {
                    self.no_layer_filters(&call_levels, offset);
                }
                if let Some(e) = self.arms_expr(call_arms, &hint) {
                    named.push(placed(Expr::named(p.name, e), call_place));
                }
                continue;
            }
            let has_filter = call_arms.iter().any(|(f, _)| f.is_some());
            let fold = has_filter && !all_at_zero;
            if !fold {
                if let Some(e) = self.arms_expr(call_arms.clone(), &hint) {
                    named.push(placed(Expr::named(p.name, e), call_place));
                }
            }
            for (i, a) in args.iter().enumerate() {
                // A model listed twice has each entry's value, the first entry's first.
                let own_levels: Vec<Option<&Param>> =
                    a.params.iter().filter(|q| q.name == p.name).map(Some).collect();
                let own = self.chain(&own_levels);
                let arms = if fold {
                    chain_arms(vec![own, call_arms.clone()])
                } else {
                    own
                };
                let model_name = flat_name(&a.model);
                let place = own_levels
                    .first()
                    .copied()
                    .flatten()
                    .map(|q| q.place())
                    .or(call_place);
                if let Some(e) = self.arms_expr(arms, &format!("{model_name}_{}", p.name)) {
                    blocks[i].push(placed(Expr::named(p.name, e), place));
                }
            }
        }
        let mut positional: Vec<Expr> = Vec::new();
        let mut base_named = None;
        if let Some(b) = base_arg {
            let mut entries = Vec::new();
            for (i, p) in b.params.iter().enumerate() {
                let first = b.params[..i].iter().all(|q| q.name != p.name);
                if first && sig.param(&p.name).is_some_and(|s| s.per_model) {
                    let levels: Vec<Option<&Param>> = b.params[i..]
                        .iter()
                        .filter(|q| q.name == p.name)
                        .map(Some)
                        .collect();
                    let arms = self.chain(&levels);
                    if let Some(e) = self.arms_expr(arms, &format!("{}_{}", flat_name(&b.model), p.name)) {
                        entries.push(Expr::named(&p.name, e));
                    }
                }
            }
            let e = with_block(b.model, entries);
            if sig.base == Base::Optional {
                base_named = Some(e);
            } else {
                positional.push(e);
            }
        }
        for (a, entries) in args.into_iter().zip(blocks) {
            positional.push(with_block(a.model, entries));
        }
        positional.extend(named);
        if let Some(b) = base_named {
            positional.push(Expr::named("base", b));
        }
        Expr::Call(sig.name.to_string(), positional).at(method_span)
    }

    /// mergekit matches a whole-merge parameter's filters against the output tensor name,
    /// mergec against the name inside the slice's call: they differ in the layer number
    /// after the first slice, so a filter with a digit cannot be translated exactly.
    pub(super) fn no_layer_filters(&mut self, levels: &[Option<&Param>], offset: usize) {
        for p in levels.iter().flatten() {
            let Value::Seq(items) = &p.value.value else {
                continue;
            };
            for item in items {
                let Value::Map(entries) = &item.value else {
                    continue;
                };
                let Some((_, f)) = entries.iter().find(|(k, _)| k.as_str() == Some("filter")) else {
                    continue;
                };
                if f.as_str().is_some_and(|s| s.chars().any(|c| c.is_ascii_digit())) {
                    self.err(
                        Code::E0606,
                        format!("a filter with a layer number on `{}` in a slice that starts at output layer {offset} is not supported yet", p.name),
                        f.span,
                        "matched against the output name in mergekit",
                    )
                    .help
                    .push("give the value in the slice's own `parameters`, or as a gradient".into());
                }
            }
        }
    }
}
