//! A document's top-level keys.

use super::moe::is_moe;
use super::slices::Body;
use super::*;
use crate::sema::methods::{self, MethodSig};

pub(super) const TOP_KEYS: &[&str] = &[
    "merge_method",
    "models",
    "slices",
    "modules",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
];

impl Translator<'_> {
    pub(super) fn doc<'n>(&mut self, node: &'n Node, multi: bool) -> Doc<'n> {
        if is_moe(node) {
            return self.moe_doc(node, multi);
        }
        let mut doc = Doc::new(node.span);
        let entries = self.entries(node, TOP_KEYS, "a merge configuration");
        if entries.is_empty() && !matches!(node.value, Value::Map(_)) {
            return doc;
        }
        let mut method_at: Option<Span> = None;
        let (mut dtype, mut out_dtype) = (None, None);
        let mut tokenizer_source: Option<&Node> = None;
        let mut tokenizer_key: Option<(Span, &Node)> = None;
        let mut bodies: Vec<(&str, Span)> = Vec::new();
        for (key, kspan, v) in entries.iter().copied() {
            match key {
                "name" => match v.as_str() {
                    Some(s) => doc.name = Some((s.to_string(), v.span)),
                    None => {
                        self.err(Code::E0603, "`name` must be a string", v.span, "here");
                    }
                },
                "merge_method" => {
                    method_at = Some(kspan);
                    doc.method = self.method(v);
                }
                "base_model" => doc.base = self.reference(v),
                "parameters" => doc.params = self.params(v, "the top-level `parameters`"),
                "dtype" => dtype = self.dtype(v),
                "out_dtype" => out_dtype = self.dtype(v),
                "tokenizer_source" => tokenizer_source = Some(v),
                "tokenizer" => tokenizer_key = Some((kspan, v)),
                "chat_template" => doc.chat_template = self.chat_template(v),
                "modules" => {
                    bodies.push((key, kspan));
                    doc.body = Some(Body::Modules(self.modules(v)));
                }
                "models" => {
                    bodies.push((key, kspan));
                    doc.body = Some(Body::Models(self.models_list(v)));
                }
                "slices" => {
                    bodies.push((key, kspan));
                    doc.body = Some(Body::Slices(self.slices_list(v), kspan));
                }
                _ => {}
            }
        }
        if multi && doc.name.is_none() {
            // Checked by the caller (at most one unnamed document).
        }
        if method_at.is_none() {
            self.err(
                Code::E0603,
                "the config has no `merge_method`",
                first_line(node),
                "in this config",
            )
            .help
            .push(format!(
                "add `merge_method: NAME`, one of: {}",
                methods::method_names().collect::<Vec<_>>().join(", ")
            ));
        }
        match bodies.len() {
            0 => {
                self.err(
                    Code::E0603,
                    "the config has no `models`, `slices` or `modules`",
                    first_line(node),
                    "in this config",
                )
                .help
                .push("list the models to merge under `models:`".into());
            }
            1 => {}
            _ => {
                let d = self.err(
                    Code::E0603,
                    format!("`{}` and `{}` cannot both be given", bodies[0].0, bodies[1].0),
                    bodies[1].1,
                    "second one",
                );
                *d = d
                    .clone()
                    .with_label(bodies[0].1, "first one")
                    .with_help("mergekit takes exactly one of `models`, `slices` and `modules`");
            }
        }
        doc.dtype = out_dtype.or(dtype);
        doc.compute = dtype;
        if let (Some(v), Some((kspan, _))) = (tokenizer_source, tokenizer_key) {
            let d = self.err(
                Code::E0603,
                "`tokenizer_source` and `tokenizer` cannot both be given",
                kspan,
                "second one",
            );
            *d = d.clone().with_label(v.span, "first one");
        }
        if let Some(v) = tokenizer_source {
            doc.tokenizer = self.tokenizer_source(v, doc.base, "tokenizer_source", &mut doc.vocab);
        }
        if let Some((_, v)) = tokenizer_key {
            doc.tokenizer = self.tokenizer_block(v, doc.base, &mut doc.vocab);
        }
        doc
    }

    pub(super) fn method(&mut self, v: &Node) -> Option<(&'static MethodSig, Span)> {
        let Some(name) = v.as_str() else {
            self.err(
                Code::E0603,
                format!("`merge_method` must be a name, found {}", v.describe()),
                v.span,
                "here",
            );
            return None;
        };
        match methods::lookup(name) {
            Some(sig) => Some((sig, v.span)),
            None => {
                let mut d = Diagnostic::error(Code::E0604, format!("unknown merge method `{name}`"))
                    .at(v.span, "no such method");
                d = match suggest(name, methods::method_names()) {
                    Some(s) => d.with_help(format!("did you mean `{s}`?")),
                    None => d.with_help(format!(
                        "the methods are: {}",
                        methods::method_names().collect::<Vec<_>>().join(", ")
                    )),
                };
                self.diags.push(d);
                None
            }
        }
    }
}
