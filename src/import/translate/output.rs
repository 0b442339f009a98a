//! The save: output folder, dtype, shard size, config and tokenizer donors, chat template.

use super::super::pretty::{self, quote};
use super::*;
use crate::sema::methods::Base;

/// `save VALUE to "DIR" { OPTIONS }`: on one line when it fits, else `to` on the next line,
/// else the call broken one argument a line.
pub(super) fn save(out: &mut Out, value: &Expr, dir: &str, options: Vec<Expr>) {
    let mut tail = format!("to {}", quote(dir));
    let block = (!options.is_empty()).then(|| Expr::Block(Box::new(Expr::atom("")), options));
    if let Some(b) = &block {
        tail.push_str(&pretty::flat(b));
    }
    let head = pretty::flat(value);
    out.push("save ");
    if 5 + head.len() + 1 + tail.len() <= pretty::WIDTH {
        out.expr(value, 0);
        out.push(" ");
    } else if 5 + head.len() <= pretty::WIDTH && 4 + tail.len() <= pretty::WIDTH {
        out.expr(value, 0);
        out.push("\n    ");
    } else {
        out.broken(value, 0);
        out.push(" ");
    }
    out.push(&format!("to {}", quote(dir)));
    if let Some(b) = &block {
        out.expr(b, 0);
    }
    out.push("\n");
}

/// The YAML's leading comment lines, kept as the script's header.
pub(super) fn header(out: &mut Out, yaml_text: &str, opts: &Options) {
    out.push(&format!(
        "# Translated from {} by `mergec import`.\n",
        opts.yaml_name
    ));
    for line in yaml_text.lines() {
        let l = line.trim_start();
        if l.starts_with('#') {
            out.push(l);
            out.push("\n");
        } else if !l.is_empty() {
            break;
        }
    }
}

/// The model mergec takes the config from by default: the base of a method with one,
/// else the first listed model.
pub(super) fn first_input(doc: &Doc) -> Option<Ref> {
    let (sig, _) = doc.method?;
    let with_base = sig.base != Base::None || sig.name == "slerp";
    match &doc.body {
        Some(Body::Models(sources)) => {
            if with_base && doc.base.is_some() {
                return doc.base.map(|b| b.r);
            }
            sources.first().map(|s| s.model.r)
        }
        Some(Body::Slices(slices, _)) => {
            let first = slices.first()?;
            match first.base.or(doc.base) {
                Some(b) if with_base => Some(b.r),
                _ => first.sources.first().map(|s| s.model.r),
            }
        }
        Some(Body::Moe(_)) | None => None,
    }
}

/// A byte count as a script size: `12KB`, `5GB`, or plain bytes.
pub(super) fn size_text(bytes: u64) -> String {
    for (unit, n) in [
        ("TB", 1_000_000_000_000u64),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
    ] {
        if bytes >= n && bytes.is_multiple_of(n) {
            return format!("{}{unit}", bytes / n);
        }
    }
    bytes.to_string()
}

impl Translator<'_> {
    pub(super) fn save_options(&mut self, doc: &Doc) -> Vec<Expr> {
        let mut options = Vec::new();
        if let Some((d, span)) = doc.dtype {
            options.push(Expr::named("dtype", Expr::atom(d).at(span)));
        }
        if let Some(bytes) = self.opts.shard_bytes {
            options.push(Expr::named("shard", Expr::atom(size_text(bytes))));
        }
        // mergekit's config donor is the base model; mergec's default is the first input.
        if let (Some(base), Some(first)) = (doc.base, first_input(doc)) {
            if let (Ref::Model(b), true) = (base.r, base.r != first) {
                options.push(Expr::named(
                    "config",
                    Expr::atom(self.models[b].name.clone()).at(base.span),
                ));
                if doc.tokenizer.is_none() {
                    options.push(Expr::named(
                        "tokenizer",
                        Expr::atom(self.models[b].name.clone()).at(base.span),
                    ));
                }
            }
        }
        if let Some(tok) = doc.tokenizer {
            match tok.r {
                Ref::Model(m) => {
                    let name = self.models[m].name.clone();
                    options.push(Expr::named("tokenizer", Expr::atom(name).at(tok.span)));
                }
                Ref::Doc(_) => {
                    self.err(
                        Code::E0606,
                        "a tokenizer from another merge of the file is not supported yet",
                        tok.span,
                        "a merge, not a model",
                    )
                    .help
                    .push("name one of the input models instead".into());
                }
            }
        }
        if let Some((text, span)) = &doc.chat_template {
            options.push(Expr::named("chat_template", Expr::atom(quote(text)).at(*span)));
        }
        options
    }

    pub(super) fn dtype(&mut self, v: &Node) -> Option<(&'static str, Span)> {
        let Some(name) = v.as_str() else {
            self.err(
                Code::E0603,
                format!("a dtype must be a name, found {}", v.describe()),
                v.span,
                "here",
            );
            return None;
        };
        let bare = name.strip_prefix("torch.").unwrap_or(name);
        let script = match bare {
            "float32" => "f32",
            "float16" => "f16",
            "bfloat16" => "bf16",
            _ => {
                let mut d = Diagnostic::error(Code::E0603, format!("unsupported dtype `{name}`"))
                    .at(v.span, "not float32, float16 or bfloat16");
                if let Some(s) = suggest(bare, ["float32", "float16", "bfloat16"].into_iter()) {
                    d = d.with_help(format!("did you mean `{s}`?"));
                } else if let Some(d2) = crate::io::DType::from_script_name(bare) {
                    d = d.with_help(format!("mergekit spells it `{}`", d2.torch_name()));
                } else {
                    d = d.with_help("mergec writes float32, float16 or bfloat16 tensors");
                }
                self.diags.push(d);
                return None;
            }
        };
        Some((script, v.span))
    }

    /// mergekit's `chat_template`: a built-in name or the text of a Jinja template.
    pub(super) fn chat_template(&mut self, v: &Node) -> Option<(String, Span)> {
        let Some(text) = v.as_str() else {
            self.err(
                Code::E0603,
                format!("`chat_template` must be a string, found {}", v.describe()),
                v.span,
                "here",
            );
            return None;
        };
        match text {
            "chatml" | "llama3" | "mistral" | "alpaca" => Some((text.to_string(), v.span)),
            "auto" => {
                self.err(Code::E0606, "`chat_template: auto` is not supported yet", v.span, "not supported yet")
                    .help
                    .push("remove the key to keep the donor model's own template, or name one: chatml, llama3, mistral, alpaca".into());
                None
            }
            "exaone" => {
                self.err(Code::E0606, "the built-in chat template `exaone` is not supported yet", v.span, "not built in")
                    .help
                    .push("give the template's Jinja text instead; the built-in ones are chatml, llama3, mistral, alpaca".into());
                None
            }
            t if t.contains('{') && t.chars().count() >= 20 => Some((text.to_string(), v.span)),
            _ => {
                let mut d = Diagnostic::error(Code::E0603, format!("unknown chat template `{text}`"))
                    .at(v.span, "not a built-in template nor a Jinja template");
                d = match suggest(text, ["chatml", "llama3", "mistral", "alpaca"].into_iter()) {
                    Some(s) => d.with_help(format!("did you mean `{s}`?")),
                    None => d.with_help("the built-in templates are chatml, llama3, mistral and alpaca; anything else must be the template's Jinja text"),
                };
                self.diags.push(d);
                None
            }
        }
    }

    pub(super) fn tokenizer_source(&mut self, v: &Node, base: Option<RefAt>, key: &str) -> Option<RefAt> {
        match v.as_str() {
            Some("union") => {
                self.err(
                    Code::E0606,
                    format!("`{key}: union` is not supported yet"),
                    v.span,
                    "a merged vocabulary is not supported yet",
                )
                .help
                .push(
                    "mergec copies one model's tokenizer: name that model, or `base` for the base model's"
                        .into(),
                );
                None
            }
            Some("base") => match base {
                Some(b) => Some(RefAt { r: b.r, span: v.span }),
                None => {
                    self.err(
                        Code::E0603,
                        format!("`{key}: base` needs a `base_model`"),
                        v.span,
                        "no base model in this config",
                    )
                    .help
                    .push("add `base_model:`, or name the model whose tokenizer to use".into());
                    None
                }
            },
            _ => self.reference(v),
        }
    }

    pub(super) fn tokenizer_block(&mut self, v: &Node, base: Option<RefAt>) -> Option<RefAt> {
        let entries = self.entries(v, &["source", "tokens", "pad_to_multiple_of"], "`tokenizer`");
        let mut source = None;
        let mut has_source = false;
        for (key, kspan, value) in entries {
            match key {
                "source" => {
                    has_source = true;
                    source = self.tokenizer_source(value, base, "tokenizer.source");
                }
                _ => {
                    self.err(
                        Code::E0606,
                        format!("`tokenizer.{key}` is not supported yet"),
                        kspan,
                        "not supported yet",
                    )
                    .help
                    .push("mergec copies one model's tokenizer unchanged; it cannot add tokens or pad the vocabulary yet".into());
                }
            }
        }
        if !has_source && matches!(v.value, Value::Map(_)) {
            self.err(
                Code::E0606,
                "`tokenizer` without `source` means `source: union`, which is not supported yet",
                v.span,
                "a merged vocabulary is not supported yet",
            )
            .help
            .push("add `source: base` or `source: MODEL` to copy that model's tokenizer".into());
        }
        source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size_text(12_000), "12KB");
        assert_eq!(size_text(5_000_000_000), "5GB");
        assert_eq!(size_text(1234), "1234");
    }
}
