//! The save: output folder, dtype, shard size, config and tokenizer donors, chat template.

use std::path::Path;

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
        Some(Body::Modules(_) | Body::Moe(_)) | None => None,
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
        // mergekit's --unsafe-truncate-embeddings acts only where no tokenizer is set.
        let truncate = self.opts.truncate_embeddings && doc.tokenizer.is_none() && doc.vocab.is_empty();
        if let Some((d, span)) = doc.dtype {
            options.push(Expr::named("dtype", Expr::atom(d).at(span)));
        }
        // mergekit computes in `dtype`, rounding every step to it.
        if let Some((d, span)) = doc.compute {
            options.push(Expr::named("compute", Expr::atom(d).at(span)));
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
                if doc.tokenizer.is_none() && doc.vocab.is_empty() && !truncate {
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
        options.extend(doc.vocab.iter().map(|e| self.with_model_names(e)));
        if truncate {
            options.push(Expr::named("tokenizer", Expr::atom("truncate")));
        }
        if let Some((text, span)) = &doc.chat_template {
            let text = match text.as_str() {
                "auto" => self.auto_chat_template(doc),
                _ => Some(text.clone()),
            };
            if let Some(text) = text {
                options.push(Expr::named("chat_template", Expr::atom(quote(&text)).at(*span)));
            }
        }
        options
    }

    /// `chat_template: auto`: the template most of the merge's models have (the first of
    /// them on a tie), as mergekit picks it; none when no model has one, which keeps the
    /// tokenizer donor's files as they are. Models that cannot be read are passed over,
    /// as mergekit passes over tokenizers it cannot load.
    fn auto_chat_template(&self, doc: &Doc) -> Option<String> {
        let mut refs: Vec<usize> = Vec::new();
        let mut add = |r: RefAt| {
            if let Ref::Model(i) = r.r {
                if !refs.contains(&i) {
                    refs.push(i);
                }
            }
        };
        doc.base.into_iter().for_each(&mut add);
        match &doc.body {
            Some(Body::Models(sources)) => sources.iter().for_each(|s| add(s.model)),
            Some(Body::Slices(slices, _)) => slices
                .iter()
                .flat_map(|s| s.base.into_iter().chain(s.sources.iter().map(|s| s.model)))
                .for_each(&mut add),
            Some(Body::Modules(modules)) => modules
                .iter()
                .flat_map(|m| m.sources.iter().map(|s| s.model))
                .for_each(&mut add),
            Some(Body::Moe(_)) | None => {}
        }
        let mut counts: Vec<(String, usize)> = Vec::new();
        for i in refs {
            let Ok(path) =
                crate::io::model::resolve_reference(&self.models[i].reference, &self.opts.script_dir)
            else {
                continue;
            };
            let dir = if path.is_file() {
                path.parent().map(Path::to_path_buf)
            } else {
                Some(path)
            };
            if let Some(t) = dir.and_then(|d| model_chat_template(&d)) {
                match counts.iter_mut().find(|(c, _)| *c == t) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((t, 1)),
                }
            }
        }
        let most = counts.iter().map(|(_, n)| *n).max()?;
        counts.into_iter().find(|(_, n)| *n == most).map(|(t, _)| t)
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
            "auto" => Some((text.to_string(), v.span)),
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

    /// `tokenizer_source` / `tokenizer.source`: `union` becomes the save option
    /// `tokenizer: union` (pushed to `vocab`), `base` the base model, else a model.
    pub(super) fn tokenizer_source(
        &mut self,
        v: &Node,
        base: Option<RefAt>,
        key: &str,
        vocab: &mut Vec<Expr>,
    ) -> Option<RefAt> {
        match v.as_str() {
            Some("union") => {
                vocab.push(Expr::named("tokenizer", Expr::atom("union").at(v.span)));
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

    /// mergekit's `tokenizer: {source, tokens, pad_to_multiple_of}` (source `union` when
    /// not given) as the save options `tokenizer`, `tokens` and `pad_vocab`.
    pub(super) fn tokenizer_block(
        &mut self,
        v: &Node,
        base: Option<RefAt>,
        vocab: &mut Vec<Expr>,
    ) -> Option<RefAt> {
        let entries = self.entries(v, &["source", "tokens", "pad_to_multiple_of"], "`tokenizer`");
        let mut source = None;
        let mut has_source = false;
        for (key, kspan, value) in entries {
            match key {
                "source" => {
                    has_source = true;
                    source = self.tokenizer_source(value, base, "tokenizer.source", vocab);
                }
                "pad_to_multiple_of" => match value.as_f64() {
                    Some(n) if n >= 1.0 && n.fract() == 0.0 => {
                        vocab.push(Expr::named(
                            "pad_vocab",
                            Expr::atom(format!("{}", n as u64)).at(value.span),
                        ));
                    }
                    // mergekit skips padding for 0 and null.
                    Some(0.0) => {}
                    _ if matches!(value.value, Value::Null) => {}
                    _ => {
                        self.err(
                            Code::E0603,
                            format!(
                                "`pad_to_multiple_of` must be a whole number, found {}",
                                value.describe()
                            ),
                            value.span,
                            "here",
                        );
                    }
                },
                "tokens" => {
                    if let Some(list) = self.token_rules(value) {
                        vocab.push(Expr::named("tokens", Expr::List(list).at(kspan)));
                    }
                }
                _ => {}
            }
        }
        if !has_source && matches!(v.value, Value::Map(_)) {
            vocab.insert(0, Expr::named("tokenizer", Expr::atom("union").at(v.span)));
        }
        source
    }

    /// `tokens: {TOKEN: {source: MODEL | {kind: model_token, model, token | token_id} |
    /// {kind: zero}, force: BOOL}}` as `[token("TOKEN", from: ..., row: ..., force: true)]`.
    fn token_rules(&mut self, v: &Node) -> Option<Vec<Expr>> {
        let Value::Map(pairs) = &v.value else {
            if !matches!(v.value, Value::Null) {
                self.err(
                    Code::E0603,
                    format!(
                        "`tokenizer.tokens` must be a mapping of tokens, found {}",
                        v.describe()
                    ),
                    v.span,
                    "here",
                );
            }
            return None;
        };
        let mut out = Vec::new();
        for (k, rule) in pairs {
            let Some(token) = k.as_str() else {
                self.err(Code::E0603, "a token must be a string", k.span, "here");
                continue;
            };
            let mut args = vec![Expr::atom(quote(token)).at(k.span)];
            for (key, _, value) in self.entries(rule, &["source", "force"], "a token's settings") {
                match key {
                    "force" => match value.value {
                        Value::Bool(true) => {
                            args.push(Expr::named("force", Expr::atom("true").at(value.span)))
                        }
                        Value::Bool(false) => {}
                        _ => {
                            self.err(
                                Code::E0603,
                                format!("`force` must be true or false, found {}", value.describe()),
                                value.span,
                                "here",
                            );
                        }
                    },
                    _ => args.extend(self.token_source(value)),
                }
            }
            out.push(Expr::Call("token".into(), args).at(rule.span));
        }
        Some(out)
    }

    /// A token's `source`: a model, `{kind: zero}` or `{kind: model_token, ...}`.
    fn token_source(&mut self, v: &Node) -> Vec<Expr> {
        let kind = match &v.value {
            Value::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| k.as_str() == Some("kind"))
                .and_then(|(_, kv)| kv.as_str().map(str::to_string)),
            Value::Null => return Vec::new(),
            _ => None,
        };
        let model_name = |t: &mut Self, n: &Node| -> Option<Expr> {
            match t.reference(n)?.r {
                // Names are given to models once the whole file is read: a placeholder
                // until the save is written (`with_model_names`).
                Ref::Model(m) => Some(Expr::atom(format!("{MODEL_PLACEHOLDER}{m}")).at(n.span)),
                Ref::Doc(_) => {
                    t.err(
                        Code::E0606,
                        "a token's row from another merge of the file is not supported yet",
                        n.span,
                        "a merge, not a model",
                    );
                    None
                }
            }
        };
        match kind.as_deref() {
            None => model_name(self, v)
                .map(|m| vec![Expr::named("from", m)])
                .unwrap_or_default(),
            Some("zero") => {
                let _ = self.entries(v, &["kind"], "`kind: zero`");
                vec![Expr::named("from", Expr::atom("zero").at(v.span))]
            }
            Some("model_token") => {
                let mut args = Vec::new();
                let mut row = None;
                for (key, kspan, value) in
                    self.entries(v, &["kind", "model", "token", "token_id"], "`kind: model_token`")
                {
                    match key {
                        "model" => {
                            if let Some(m) = model_name(self, value) {
                                args.push(Expr::named("from", m));
                            }
                        }
                        "token" => match value.as_str() {
                            Some(t) => row = Some(Expr::atom(quote(t)).at(value.span)),
                            None => {
                                self.err(Code::E0603, "`token` must be a string", value.span, "here");
                            }
                        },
                        "token_id" => match value.value {
                            Value::Int(i) if i >= 0 => row = Some(Expr::atom(i.to_string()).at(value.span)),
                            _ => {
                                self.err(
                                    Code::E0603,
                                    "`token_id` must be a whole number, at least 0",
                                    value.span,
                                    "here",
                                );
                            }
                        },
                        _ => {
                            let _ = kspan;
                        }
                    }
                }
                match row {
                    Some(r) if !args.is_empty() => {
                        args.push(Expr::named("row", r));
                        args
                    }
                    _ => {
                        self.err(
                            Code::E0603,
                            "`kind: model_token` needs `model` and one of `token` or `token_id`",
                            v.span,
                            "incomplete",
                        );
                        Vec::new()
                    }
                }
            }
            Some(other) => {
                self.err(
                    Code::E0603,
                    format!("unknown token source kind `{other}`"),
                    v.span,
                    "not `model_token` or `zero`",
                );
                Vec::new()
            }
        }
    }
}

/// Stands for input model N in a `tokens` rule until models have names.
const MODEL_PLACEHOLDER: &str = "\u{0}model:";

impl Translator<'_> {
    /// `e` with every model placeholder replaced by the model's name.
    fn with_model_names(&self, e: &Expr) -> Expr {
        match e {
            Expr::Atom(a) => match a
                .strip_prefix(MODEL_PLACEHOLDER)
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(m) => Expr::atom(self.models[m].name.clone()),
                None => e.clone(),
            },
            Expr::Call(f, args) => {
                Expr::Call(f.clone(), args.iter().map(|a| self.with_model_names(a)).collect())
            }
            Expr::Named(n, v) => Expr::Named(n.clone(), Box::new(self.with_model_names(v))),
            Expr::Block(t, items) => Expr::Block(
                Box::new(self.with_model_names(t)),
                items.iter().map(|a| self.with_model_names(a)).collect(),
            ),
            Expr::Table(arms) => Expr::Table(
                arms.iter()
                    .map(|(p, v)| (p.clone(), self.with_model_names(v)))
                    .collect(),
            ),
            Expr::List(items) => Expr::List(items.iter().map(|a| self.with_model_names(a)).collect()),
            Expr::At(inner, span) => Expr::At(Box::new(self.with_model_names(inner)), *span),
            Expr::Cat(items) => Expr::Cat(items.iter().map(|a| self.with_model_names(a)).collect()),
        }
    }
}

/// A model folder's chat template, as transformers loads it: `chat_template.jinja`, else
/// `tokenizer_config.json`'s `chat_template` (of a list of named templates, `default`).
fn model_chat_template(dir: &Path) -> Option<String> {
    let template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
        Ok(t) => t,
        Err(_) => {
            let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
            let config: serde_json::Value = serde_json::from_str(&text).ok()?;
            match &config["chat_template"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")?
                    .get("template")?
                    .as_str()?
                    .to_string(),
                _ => return None,
            }
        }
    };
    let t = template.trim();
    (!t.is_empty()).then(|| t.to_string())
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
