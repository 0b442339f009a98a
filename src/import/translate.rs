//! mergekit configuration (YAML tree) -> `.merge` script text. spec/import.md says how
//! each key maps; everything here reports problems against the YAML's own places.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use super::pretty::{self, quote, Expr, Out};
use super::yaml::{Node, Value};
use super::Options;
use crate::diag::{Code, Diagnostic, Diagnostics};
use crate::sema::methods::{self, Base, MethodSig};
use crate::source::Span;

/// The translated script and where its pieces came from.
pub(crate) struct Translated {
    pub out: Out,
}

/// Translates every document of a mergekit (or mergekit-multi) YAML file.
pub(crate) fn translate(docs: &[Node], yaml_text: &str, opts: &Options) -> Result<Translated, Diagnostics> {
    let mut t = Translator {
        opts,
        diags: Diagnostics::new(),
        models: Vec::new(),
        doc_names: HashMap::new(),
        used: BTreeSet::new(),
        lets: Vec::new(),
    };
    let docs: Vec<&Node> = docs.iter().filter(|d| d.value != Value::Null).collect();
    if docs.is_empty() {
        return Err(Diagnostics::from(
            Diagnostic::error(Code::E0603, "the YAML file holds no merge configuration").with_help(
                "a mergekit config has at least `merge_method:` and one of `models:` or `slices:`",
            ),
        ));
    }
    // Names first: a document may use another one's name as a model.
    for (i, d) in docs.iter().enumerate() {
        if let Some((name, span)) = doc_name(d) {
            if let Some(&(_, first)) = t.doc_names.get(&name) {
                t.diags.push(
                    Diagnostic::error(Code::E0603, format!("two documents are named `{name}`"))
                        .at(span, "second one")
                        .with_label(first, "first one")
                        .with_help("each merge of a mergekit-multi file needs its own name"),
                );
            } else {
                t.doc_names.insert(name, (i, span));
            }
        }
    }
    let parsed: Vec<Doc> = docs.iter().map(|d| t.doc(d, docs.len() > 1)).collect();
    let unnamed: Vec<&Doc> = parsed.iter().filter(|d| d.name.is_none()).collect();
    if docs.len() > 1 && unnamed.len() > 1 {
        let mut d = Diagnostic::error(Code::E0603, "more than one document has no `name`")
            .at(unnamed[1].span, "this one has no name")
            .with_help("in a mergekit-multi file every merge but the final one needs `name:`");
        d = d.with_label(unnamed[0].span, "and neither has this one");
        t.diags.push(d);
    }
    let order = t.order(&parsed);
    if t.diags.has_errors() {
        return Err(t.diags);
    }
    t.name_models();
    let idents: Vec<String> = parsed
        .iter()
        .map(|d| {
            let base = d.name.as_ref().map_or("merged".to_string(), |(n, _)| n.clone());
            t.fresh(&ident_from(&base))
        })
        .collect();
    let final_doc = parsed
        .iter()
        .position(|d| d.name.is_none())
        .unwrap_or(parsed.len() - 1);
    let referenced: BTreeSet<usize> = parsed.iter().flat_map(|d| d.doc_refs()).collect();

    let mut out = Out::default();
    header(&mut out, yaml_text, opts);
    // Base models first, then the others in the order the YAML names them.
    let bases: Vec<usize> = parsed
        .iter()
        .flat_map(|d| d.base.into_iter().chain(slice_bases(d)))
        .filter_map(|b| match b.r {
            Ref::Model(i) => Some(i),
            Ref::Doc(_) => None,
        })
        .collect();
    let mut decl: Vec<usize> = Vec::new();
    for i in bases.into_iter().chain(0..t.models.len()) {
        if !decl.contains(&i) {
            decl.push(i);
        }
    }
    for m in decl.iter().map(|&i| &t.models[i]) {
        out.push(&format!("model {} = ", m.name));
        out.expr(&Expr::atom(quote(&m.reference)).at(m.span), 0);
        out.push("\n");
    }
    if let Some(seed) = opts.seed {
        out.push(&format!("\nset seed = {seed}\n"));
    }
    for &i in &order {
        let doc = &parsed[i];
        let expr = t.doc_expr(doc, &idents);
        let lets = std::mem::take(&mut t.lets);
        out.push("\n");
        if docs.len() > 1 {
            let title = doc
                .name
                .as_ref()
                .map_or("the final merge".to_string(), |(n, _)| format!("`{n}`"));
            out.push(&format!("# {title}\n"));
        }
        for (name, value) in &lets {
            out.push(&format!("let {name} = "));
            out.expr(value, 0);
            out.push("\n");
        }
        if !lets.is_empty() {
            out.push("\n");
        }
        let saved = i == final_doc || opts.save_intermediates || !referenced.contains(&i);
        let bound = i != final_doc && referenced.contains(&i);
        if bound {
            out.push(&format!("let {} = ", idents[i]));
            out.expr(&expr, 0);
            out.push("\n");
        }
        if saved {
            let dir = if i == final_doc {
                opts.out.clone()
            } else {
                let name = doc.name.as_ref().map_or("merged", |(n, _)| n.as_str());
                opts.out
                    .parent()
                    .map_or_else(|| PathBuf::from(name), |p| p.join(name))
            };
            let value = if bound {
                Expr::atom(idents[i].clone())
            } else {
                expr
            };
            let options = t.save_options(doc);
            save(&mut out, &value, &script_path(&dir, opts), options);
        }
    }
    if t.diags.has_errors() {
        // A top-level problem is found once per slice: report it once.
        let mut seen = BTreeSet::new();
        t.diags
            .0
            .retain(|d| seen.insert((d.span, d.code, d.message.clone())));
        return Err(t.diags);
    }
    Ok(Translated { out })
}

/// `save VALUE to "DIR" { OPTIONS }`: on one line when it fits, else `to` on the next line,
/// else the call broken one argument a line.
fn save(out: &mut Out, value: &Expr, dir: &str, options: Vec<Expr>) {
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
fn header(out: &mut Out, yaml_text: &str, opts: &Options) {
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

fn slice_bases(d: &Doc) -> Vec<RefAt> {
    match &d.body {
        Some(Body::Slices(slices, _)) => slices.iter().filter_map(|s| s.base).collect(),
        _ => Vec::new(),
    }
}

fn doc_name(d: &Node) -> Option<(String, Span)> {
    let Value::Map(entries) = &d.value else {
        return None;
    };
    entries
        .iter()
        .find(|(k, _)| k.as_str() == Some("name"))
        .and_then(|(_, v)| v.as_str().map(|s| (s.to_string(), v.span)))
}

struct ModelDecl {
    /// The reference as the script writes it (`hf:org/name`, a path).
    reference: String,
    /// Words for the model's name (lower case).
    words: Vec<String>,
    span: Span,
    name: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ref {
    Model(usize),
    Doc(usize),
}

#[derive(Clone, Copy)]
struct RefAt {
    r: Ref,
    span: Span,
}

struct Param<'a> {
    name: String,
    key: Span,
    value: &'a Node,
}

impl Param<'_> {
    /// `name: value` in the YAML.
    fn place(&self) -> Span {
        self.key.join(self.value.span)
    }
}

struct Source<'a> {
    model: RefAt,
    range: Option<(i64, i64, Span)>,
    params: Vec<Param<'a>>,
}

struct Slice<'a> {
    sources: Vec<Source<'a>>,
    base: Option<RefAt>,
    params: Vec<Param<'a>>,
    span: Span,
}

enum Body<'a> {
    Models(Vec<Source<'a>>),
    Slices(Vec<Slice<'a>>, Span),
}

struct Doc<'a> {
    name: Option<(String, Span)>,
    method: Option<(&'static MethodSig, Span)>,
    body: Option<Body<'a>>,
    base: Option<RefAt>,
    params: Vec<Param<'a>>,
    dtype: Option<(&'static str, Span)>,
    tokenizer: Option<RefAt>,
    chat_template: Option<(String, Span)>,
    span: Span,
}

impl Doc<'_> {
    fn doc_refs(&self) -> Vec<usize> {
        let mut refs: Vec<RefAt> = self.base.iter().copied().chain(self.tokenizer).collect();
        match &self.body {
            Some(Body::Models(sources)) => refs.extend(sources.iter().map(|s| s.model)),
            Some(Body::Slices(slices, _)) => {
                for s in slices {
                    refs.extend(s.base);
                    refs.extend(s.sources.iter().map(|s| s.model));
                }
            }
            None => {}
        }
        refs.iter()
            .filter_map(|r| match r.r {
                Ref::Doc(i) => Some(i),
                Ref::Model(_) => None,
            })
            .collect()
    }
}

/// One level of a parameter (a source's, a slice's or the whole config's): its arms, tried
/// in order; `None` is the catch-all.
type Arms = Vec<(Option<String>, Expr)>;

struct Translator<'o> {
    opts: &'o Options,
    diags: Diagnostics,
    models: Vec<ModelDecl>,
    doc_names: HashMap<String, (usize, Span)>,
    /// Names taken in the script.
    used: BTreeSet<String>,
    /// Tables hoisted out of the current document's expression.
    lets: Vec<(String, Expr)>,
}

const TOP_KEYS: &[&str] = &[
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

impl<'o> Translator<'o> {
    fn err(&mut self, code: Code, message: impl Into<String>, span: Span, label: &str) -> &mut Diagnostic {
        self.diags.push(Diagnostic::error(code, message).at(span, label));
        let last = self.diags.0.len() - 1;
        &mut self.diags.0[last]
    }

    /// The entries of a mapping, each key checked against `allowed`.
    fn entries<'n>(
        &mut self,
        node: &'n Node,
        allowed: &[&str],
        what: &str,
    ) -> Vec<(&'n str, Span, &'n Node)> {
        let Value::Map(entries) = &node.value else {
            self.err(
                Code::E0603,
                format!("{what} must be a mapping, found {}", node.describe()),
                node.span,
                "expected `key: value` lines",
            );
            return Vec::new();
        };
        let mut seen: HashMap<&str, Span> = HashMap::new();
        let mut out = Vec::new();
        for (k, v) in entries {
            let Some(key) = k.as_str() else {
                self.err(
                    Code::E0602,
                    format!("a key of {what} is {}", k.describe()),
                    k.span,
                    "not a name",
                );
                continue;
            };
            if let Some(first) = seen.get(key) {
                let first = *first;
                let d = self.err(
                    Code::E0603,
                    format!("`{key}` is given twice"),
                    k.span,
                    "again here",
                );
                *d = d
                    .clone()
                    .with_label(first, "first here")
                    .with_help("keep one of them");
                continue;
            }
            seen.insert(key, k.span);
            if !allowed.contains(&key) {
                self.unknown_key(key, k.span, allowed, what);
                continue;
            }
            out.push((key, k.span, v));
        }
        out
    }

    fn unknown_key(&mut self, key: &str, span: Span, allowed: &[&str], what: &str) {
        let mut d = Diagnostic::error(Code::E0602, format!("unknown key `{key}` in {what}"))
            .at(span, "not a mergekit key here");
        if let Some(s) = suggest(key, allowed.iter().copied()) {
            d = d.with_help(format!("did you mean `{s}`?"));
        } else if is_any_parameter(key) {
            d = d.with_help(format!(
                "`{key}` is a merge parameter: put it under `parameters:`"
            ));
        } else if key == "layer_range" {
            d = d.with_help(
                "layer ranges belong to the sources of `slices:`; `models:` always takes whole models",
            );
        } else {
            d = d.with_help(format!("the keys here are: {}", allowed.join(", ")));
        }
        d = d.with_note("mergekit ignores unknown keys without a word; mergec reports them");
        self.diags.push(d);
    }

    fn doc<'n>(&mut self, node: &'n Node, multi: bool) -> Doc<'n> {
        let mut doc = Doc {
            name: None,
            method: None,
            body: None,
            base: None,
            params: Vec::new(),
            dtype: None,
            tokenizer: None,
            chat_template: None,
            span: node.span,
        };
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
                    self.err(
                        Code::E0606,
                        "`modules` (per-module merges of multi-module models) is not supported yet",
                        kspan,
                        "not supported yet",
                    )
                    .help
                    .push(
                        "use `models:` to merge every module alike: mergec merges all the tensors of a model, vision tower included"
                            .into(),
                    );
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
            doc.tokenizer = self.tokenizer_source(v, doc.base, "tokenizer_source");
        }
        if let Some((_, v)) = tokenizer_key {
            doc.tokenizer = self.tokenizer_block(v, doc.base);
        }
        doc
    }

    /// mergekit's `chat_template`: a built-in name or the text of a Jinja template.
    fn chat_template(&mut self, v: &Node) -> Option<(String, Span)> {
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

    fn tokenizer_source(&mut self, v: &Node, base: Option<RefAt>, key: &str) -> Option<RefAt> {
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

    fn tokenizer_block(&mut self, v: &Node, base: Option<RefAt>) -> Option<RefAt> {
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

    fn method(&mut self, v: &Node) -> Option<(&'static MethodSig, Span)> {
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

    fn dtype(&mut self, v: &Node) -> Option<(&'static str, Span)> {
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

    fn params<'n>(&mut self, v: &'n Node, what: &str) -> Vec<Param<'n>> {
        if v.value == Value::Null {
            return Vec::new();
        }
        let Value::Map(entries) = &v.value else {
            self.err(
                Code::E0603,
                format!("{what} must be a mapping, found {}", v.describe()),
                v.span,
                "expected `name: value` lines",
            );
            return Vec::new();
        };
        let mut out: Vec<Param> = Vec::new();
        for (k, value) in entries {
            let Some(name) = k.as_str() else {
                self.err(
                    Code::E0603,
                    format!("a parameter name is {}", k.describe()),
                    k.span,
                    "not a name",
                );
                continue;
            };
            if let Some(first) = out.iter().find(|p| p.name == name) {
                let first = first.key;
                let d = self.err(
                    Code::E0603,
                    format!("`{name}` is given twice"),
                    k.span,
                    "again here",
                );
                *d = d.clone().with_label(first, "first here");
                continue;
            }
            out.push(Param {
                name: name.to_string(),
                key: k.span,
                value,
            });
        }
        out
    }

    fn models_list<'n>(&mut self, v: &'n Node) -> Vec<Source<'n>> {
        let Value::Seq(items) = &v.value else {
            self.err(
                Code::E0603,
                format!("`models` must be a list, found {}", v.describe()),
                v.span,
                "expected `- model: ...` items",
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items {
            if let Some(s) = self.source(item, false) {
                out.push(s);
            }
        }
        if items.is_empty() {
            self.err(Code::E0603, "`models` is empty", v.span, "no models")
                .help
                .push("list at least one `- model: PATH`".into());
        }
        self.no_repeats(&out);
        out
    }

    /// mergekit keys a merge's inputs by model: a model listed twice is merged once, with
    /// the first entry's parameters. Refused as the surprise it is.
    fn no_repeats(&mut self, sources: &[Source]) {
        for (i, s) in sources.iter().enumerate() {
            if let Some(first) = sources[..i].iter().find(|f| f.model.r == s.model.r) {
                let d = self.err(
                    Code::E0603,
                    "a model is listed twice in one merge",
                    s.model.span,
                    "again here",
                );
                *d = d.clone().with_label(first.model.span, "first here").with_help(
                    "mergekit would merge it once, with the first entry's parameters; list each model once",
                );
            }
        }
    }

    fn slices_list<'n>(&mut self, v: &'n Node) -> Vec<Slice<'n>> {
        let Value::Seq(items) = &v.value else {
            self.err(
                Code::E0603,
                format!("`slices` must be a list, found {}", v.describe()),
                v.span,
                "expected `- sources: ...` items",
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.err(Code::E0603, "`slices` is empty", v.span, "no slices");
        }
        let mut out = Vec::new();
        for item in items {
            let entries = self.entries(
                item,
                &["sources", "base_model", "parameters", "residual_weight"],
                "a slice",
            );
            let mut slice = Slice {
                sources: Vec::new(),
                base: None,
                params: Vec::new(),
                span: item.span,
            };
            let mut has_sources = false;
            for (key, kspan, value) in entries {
                match key {
                    "sources" => {
                        has_sources = true;
                        match &value.value {
                            Value::Seq(srcs) if !srcs.is_empty() => {
                                for s in srcs {
                                    if let Some(src) = self.source(s, true) {
                                        slice.sources.push(src);
                                    }
                                }
                            }
                            _ => {
                                self.err(
                                    Code::E0603,
                                    "`sources` must be a non-empty list",
                                    value.span,
                                    "expected `- model: ...` items",
                                );
                            }
                        }
                    }
                    "base_model" => slice.base = self.reference(value),
                    "parameters" => slice.params = self.params(value, "a slice's `parameters`"),
                    _ => {
                        self.err(
                            Code::E0606,
                            "`residual_weight` is not supported",
                            kspan,
                            "mergekit reads it but never uses it",
                        )
                        .help
                        .push("remove it: it has no effect in mergekit either".into());
                    }
                }
            }
            if !has_sources && matches!(item.value, Value::Map(_)) {
                self.err(
                    Code::E0603,
                    "a slice needs `sources`",
                    first_line(item),
                    "this slice",
                );
            }
            self.no_repeats(&slice.sources);
            let lens: Vec<(i64, Span)> = slice
                .sources
                .iter()
                .filter_map(|s| s.range.map(|(a, b, sp)| (b - a, sp)))
                .collect();
            if let Some(&(len0, span0)) = lens.first() {
                if let Some(&(len, span)) = lens.iter().find(|(l, _)| *l != len0) {
                    let d = self.err(
                        Code::E0603,
                        "the sources of a slice have different numbers of layers",
                        span,
                        format!("{len} layers").as_str(),
                    );
                    *d = d
                        .clone()
                        .with_label(span0, format!("{len0} layers"))
                        .with_help("every source of a slice gives the same number of layers: they are merged layer by layer");
                }
            }
            out.push(slice);
        }
        out
    }

    fn source<'n>(&mut self, item: &'n Node, slice: bool) -> Option<Source<'n>> {
        let allowed: &[&str] = if slice {
            &["model", "layer_range", "parameters"]
        } else {
            &["model", "parameters"]
        };
        let what = if slice {
            "a slice source"
        } else {
            "a `models` entry"
        };
        if let Some(s) = item.as_str() {
            // `- org/name` instead of `- model: org/name`.
            self.err(
                Code::E0603,
                format!("{what} must be a mapping with `model:`"),
                item.span,
                "a bare model name",
            )
            .help
            .push(format!("write `- model: {s}`"));
            return None;
        }
        let entries = self.entries(item, allowed, what);
        let mut model = None;
        let mut range = None;
        let mut params = Vec::new();
        let mut has_range = false;
        for (key, _, v) in entries {
            match key {
                "model" => model = self.reference(v),
                "layer_range" => {
                    has_range = true;
                    range = self.layer_range(v);
                }
                _ => params = self.params(v, "a model's `parameters`"),
            }
        }
        if slice && !has_range && matches!(item.value, Value::Map(_)) {
            self.err(
                Code::E0603,
                "a slice source needs `layer_range`",
                first_line(item),
                "this source",
            )
            .help
            .push("add `layer_range: [START, END]` (END is exclusive)".into());
        }
        if model.is_none() && matches!(item.value, Value::Map(_)) && !self.diags.has_errors() {
            self.err(
                Code::E0603,
                format!("{what} needs `model`"),
                first_line(item),
                "no model here",
            );
        }
        Some(Source {
            model: model?,
            range: if slice { Some(range?) } else { None },
            params,
        })
    }

    fn layer_range(&mut self, v: &Node) -> Option<(i64, i64, Span)> {
        if let Value::Seq(items) = &v.value {
            if let [a, b] = items.as_slice() {
                if let (Value::Int(a), Value::Int(b)) = (&a.value, &b.value) {
                    if *a >= 0 && *b >= 0 {
                        return Some((*a, *b, v.span));
                    }
                }
            }
        }
        self.err(
            Code::E0603,
            "`layer_range` must be two layer numbers",
            v.span,
            "expected `[START, END]`",
        )
        .help
        .push("for example `layer_range: [0, 16]`: layers 0 to 15 (END is exclusive)".into());
        None
    }

    /// A model reference: a local path, a hub id, `id@revision`, or another document's name.
    fn reference(&mut self, v: &Node) -> Option<RefAt> {
        let (text, revision, span) = match &v.value {
            Value::Str(s) => (s.clone(), None, v.span),
            Value::Map(_) => return self.reference_map(v),
            _ => {
                self.err(
                    Code::E0603,
                    format!("a model reference must be a string, found {}", v.describe()),
                    v.span,
                    "here",
                );
                return None;
            }
        };
        self.reference_text(&text, revision, span)
    }

    fn reference_map(&mut self, v: &Node) -> Option<RefAt> {
        let entries = self.entries(
            v,
            &["model", "lora", "override_architecture"],
            "a model reference",
        );
        let mut out = None;
        for (key, kspan, value) in entries {
            match key {
                "model" => match &value.value {
                    Value::Str(s) => out = self.reference_text(s, None, value.span),
                    Value::Map(_) => {
                        let inner = self.entries(value, &["path", "revision"], "a model path");
                        let path = inner
                            .iter()
                            .find(|e| e.0 == "path")
                            .and_then(|e| e.2.as_str().map(str::to_string));
                        let rev = inner
                            .iter()
                            .find(|e| e.0 == "revision")
                            .and_then(|e| e.2.as_str().map(str::to_string));
                        match path {
                            Some(p) => out = self.reference_text(&p, rev, value.span),
                            None => {
                                self.err(Code::E0603, "a model path needs `path`", value.span, "here");
                            }
                        }
                    }
                    _ => {
                        self.err(Code::E0603, "`model` must be a string", value.span, "here");
                    }
                },
                "lora" => {
                    self.lora(kspan);
                    return None;
                }
                _ => {
                    self.err(
                        Code::E0606,
                        "`override_architecture` is not supported yet",
                        kspan,
                        "not supported yet",
                    )
                    .help
                    .push(
                        "mergec merges every tensor by name and needs no architecture; remove the key".into(),
                    );
                    return None;
                }
            }
        }
        out
    }

    fn lora(&mut self, span: Span) {
        self.err(Code::E0606, "LoRA adapters in model references (`model+lora`) are not supported yet", span, "a LoRA adapter")
            .help
            .push("merge the adapter into its model first (e.g. with PEFT's `merge_and_unload`), then refer to the merged folder".into());
    }

    fn reference_text(&mut self, text: &str, revision: Option<String>, span: Span) -> Option<RefAt> {
        let text = text.trim();
        if let Some(&(i, _)) = self.doc_names.get(text) {
            return Some(RefAt { r: Ref::Doc(i), span });
        }
        if let Some(plus) = text.find('+') {
            let at = Span::new(span.source, span.start as usize, span.end as usize);
            let _ = plus;
            self.lora(at);
            return None;
        }
        let (path, rev) = match (text.split_once('@'), revision) {
            (Some((p, r)), _) => (p.to_string(), Some(r.to_string())),
            (None, r) => (text.to_string(), r),
        };
        if path.is_empty() {
            self.err(Code::E0603, "empty model reference", span, "here");
            return None;
        }
        let local = expand_home(&path);
        let resolved = if local.is_absolute() {
            local.clone()
        } else {
            self.opts.base_dir.join(&local)
        };
        let reference = if !resolved.exists() && is_hub_id(&path) {
            match &rev {
                Some(r) => format!("hf:{path}@{r}"),
                None => format!("hf:{path}"),
            }
        } else {
            relative_reference(&path, self.opts)
        };
        let i = match self.models.iter().position(|m| m.reference == reference) {
            Some(i) => i,
            None => {
                self.models.push(ModelDecl {
                    reference,
                    words: words_of(&path),
                    span,
                    name: String::new(),
                });
                self.models.len() - 1
            }
        };
        Some(RefAt {
            r: Ref::Model(i),
            span,
        })
    }

    /// Document order with every document after the ones it uses.
    fn order(&mut self, docs: &[Doc]) -> Vec<usize> {
        let mut order = Vec::new();
        let mut state = vec![0u8; docs.len()]; // 0 new, 1 in progress, 2 done
        fn visit(i: usize, docs: &[Doc], state: &mut [u8], order: &mut Vec<usize>) -> Option<usize> {
            match state[i] {
                2 => return None,
                1 => return Some(i),
                _ => {}
            }
            state[i] = 1;
            for j in docs[i].doc_refs() {
                if let Some(c) = visit(j, docs, state, order) {
                    return Some(c);
                }
            }
            state[i] = 2;
            order.push(i);
            None
        }
        for i in 0..docs.len() {
            if let Some(c) = visit(i, docs, &mut state, &mut order) {
                let span = docs[c].name.as_ref().map_or(docs[c].span, |n| n.1);
                self.err(
                    Code::E0603,
                    "these merges use each other in a cycle",
                    span,
                    "this merge uses itself, through others",
                )
                .help
                .push("a document may use only merges that do not use it".into());
                break;
            }
        }
        order
    }

    /// Readable model names: the last part of each path, lower case, without the words
    /// every model shares (`micro-llama-ft1-f32`, `micro-llama-base-f32` -> `ft1`, `base`).
    fn name_models(&mut self) {
        let all: Vec<Vec<String>> = self.models.iter().map(|m| m.words.clone()).collect();
        let strip = |prefix: bool, suffix: bool| -> Option<Vec<String>> {
            if all.len() < 2 {
                return (!prefix && !suffix).then(|| all.iter().map(|w| w.join("_")).collect());
            }
            let shortest = all.iter().map(Vec::len).min().unwrap_or(0);
            let mut pre = 0;
            while prefix && pre < shortest && all.iter().all(|w| w[pre] == all[0][pre]) {
                pre += 1;
            }
            let mut suf = 0;
            while suffix
                && suf + pre < shortest
                && all
                    .iter()
                    .all(|w| w[w.len() - 1 - suf] == all[0][all[0].len() - 1 - suf])
            {
                suf += 1;
            }
            let names: Vec<String> = all.iter().map(|w| w[pre..w.len() - suf].join("_")).collect();
            let distinct: BTreeSet<&String> = names.iter().collect();
            let ok = names
                .iter()
                .all(|n| n.chars().next().is_some_and(|c| c.is_ascii_alphabetic()))
                && distinct.len() == names.len();
            ok.then_some(names)
        };
        let names = strip(true, true)
            .or_else(|| strip(true, false))
            .or_else(|| strip(false, true))
            .unwrap_or_else(|| all.iter().map(|w| w.join("_")).collect());
        for (i, n) in names.into_iter().enumerate() {
            let name = self.fresh(&ident_from(&n));
            self.models[i].name = name;
        }
    }

    /// `base` made unique among the script's names.
    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 2;
        while self.used.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.used.insert(name.clone());
        name
    }

    fn ref_name(&self, r: Ref, idents: &[String]) -> String {
        match r {
            Ref::Model(i) => self.models[i].name.clone(),
            Ref::Doc(i) => idents[i].clone(),
        }
    }

    fn save_options(&mut self, doc: &Doc) -> Vec<Expr> {
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

    /// The expression a document merges to.
    fn doc_expr(&mut self, doc: &Doc, idents: &[String]) -> Expr {
        let Some((sig, method_span)) = doc.method else {
            return Expr::atom("");
        };
        match &doc.body {
            Some(Body::Models(sources)) => {
                let mut args: Vec<Arg> = sources
                    .iter()
                    .map(|s| Arg {
                        model: Expr::atom(self.ref_name(s.model.r, idents)).at(s.model.span),
                        r: s.model.r,
                        params: &s.params,
                        starts_at_zero: true,
                    })
                    .collect();
                // mergekit appends the base model to the inputs when it is not listed.
                if let Some(base) = doc.base {
                    if !args.iter().any(|a| a.r == base.r) {
                        args.push(Arg {
                            model: Expr::atom(self.ref_name(base.r, idents)).at(base.span),
                            r: base.r,
                            params: &[],
                            starts_at_zero: true,
                        });
                    }
                }
                self.call(sig, method_span, args, doc.base, &[], &doc.params, 0)
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
            None => Expr::atom(""),
        }
    }

    /// One method call: `args` in YAML order; the base goes where the method wants it.
    #[allow(clippy::too_many_arguments)]
    fn call(
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
                let own_param = find(a.params, p.name);
                let own = self.chain(&[own_param]);
                let arms = if fold {
                    chain_arms(vec![own, call_arms.clone()])
                } else {
                    own
                };
                let model_name = flat_name(&a.model);
                let place = own_param.map(|q| q.place()).or(call_place);
                if let Some(e) = self.arms_expr(arms, &format!("{model_name}_{}", p.name)) {
                    blocks[i].push(placed(Expr::named(p.name, e), place));
                }
            }
        }
        let mut positional: Vec<Expr> = Vec::new();
        let mut base_named = None;
        if let Some(b) = base_arg {
            let mut entries = Vec::new();
            for p in b.params {
                if sig.param(&p.name).is_some_and(|s| s.per_model) {
                    let arms = self.chain(&[Some(p)]);
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
    fn no_layer_filters(&mut self, levels: &[Option<&Param>], offset: usize) {
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

    /// Checks that `sig` takes `p` (per model when `per_model`); reports it otherwise.
    fn check_param(&mut self, sig: &MethodSig, p: &Param, per_model: bool) {
        match sig.param(&p.name) {
            Some(spec) if spec.per_model || !per_model => {}
            Some(_) => {
                self.err(
                    Code::E0605,
                    format!("`{}` is set for the whole merge, not per model", p.name),
                    p.key,
                    format!("a parameter of the whole `{}` merge", sig.name).as_str(),
                )
                .help
                .extend([
                    "move it to the top-level `parameters:`".to_string(),
                    "mergekit ignores it here without a word".to_string(),
                ]);
            }
            None => {
                let takes: Vec<&str> = sig
                    .params
                    .iter()
                    .filter(|s| s.per_model || !per_model)
                    .map(|s| s.name)
                    .collect();
                let mut d = Diagnostic::error(
                    Code::E0605,
                    format!("`{}` does not take the parameter `{}`", sig.name, p.name),
                )
                .at(p.key, "not a parameter of this method");
                if let Some(s) = suggest(&p.name, takes.iter().copied()) {
                    d = d.with_help(format!("did you mean `{s}`?"));
                } else if takes.is_empty() {
                    d = d.with_help(format!(
                        "`{}` takes no {}parameters: remove it",
                        sig.name,
                        if per_model { "per-model " } else { "" }
                    ));
                } else {
                    d = d.with_help(format!("`{}` takes: {}", sig.name, takes.join(", ")));
                }
                d = d.with_note("mergekit ignores parameters a method does not take, without a word");
                self.diags.push(d);
            }
        }
    }

    /// The levels' arms, first match wins, falling through a level that matches nothing.
    fn chain(&mut self, levels: &[Option<&Param>]) -> Arms {
        let arms: Vec<Arms> = levels
            .iter()
            .flatten()
            .filter_map(|p| self.setting(p.value))
            .collect();
        chain_arms(arms)
    }

    /// A parameter value: a number, a boolean, a gradient or a list of `{filter, value}`.
    fn setting(&mut self, v: &Node) -> Option<Arms> {
        match &v.value {
            Value::Seq(items) if items.iter().any(|i| matches!(i.value, Value::Map(_))) => {
                let mut arms = Vec::new();
                for item in items {
                    let entries = self.entries(item, &["filter", "value"], "a filtered parameter value");
                    let filter = entries.iter().find(|e| e.0 == "filter").map(|e| e.2);
                    let Some(value) = entries.iter().find(|e| e.0 == "value").map(|e| e.2) else {
                        if matches!(item.value, Value::Map(_)) {
                            self.err(
                                Code::E0603,
                                "a filtered value needs `value`",
                                first_line(item),
                                "no `value` here",
                            );
                        }
                        continue;
                    };
                    let value = self.scalar_or_gradient(value)?;
                    let pattern = match filter.map(|f| (f, f.value.clone())) {
                        None | Some((_, Value::Null)) => None,
                        Some((_, Value::Str(s))) if s == "*" => None,
                        Some((f, Value::Str(s))) => {
                            if s.contains('*') {
                                self.err(
                                    Code::E0603,
                                    format!("the filter `{s}` never matches in mergekit"),
                                    f.span,
                                    "a plain substring, not a pattern",
                                )
                                .help
                                .push("mergekit matches filters as substrings, and tensor names contain no `*`: write the substring without `*`, or remove the entry".into());
                                continue;
                            }
                            Some(s)
                        }
                        Some((f, _)) => Some(f.raw.clone()),
                    };
                    let catch_all = pattern.is_none();
                    arms.push((pattern, value));
                    if catch_all {
                        break;
                    }
                }
                Some(arms)
            }
            Value::Map(_) => {
                // One `{filter, value}` on its own.
                let list = Node {
                    value: Value::Seq(vec![v.clone()]),
                    span: v.span,
                    raw: String::new(),
                };
                self.setting(&list)
            }
            _ => Some(vec![(None, self.scalar_or_gradient(v)?)]),
        }
    }

    fn scalar_or_gradient(&mut self, v: &Node) -> Option<Expr> {
        match &v.value {
            Value::Bool(b) => Some(Expr::atom(b.to_string()).at(v.span)),
            Value::Seq(items) if items.is_empty() => {
                self.err(Code::E0603, "an empty list is not a value", v.span, "empty");
                None
            }
            Value::Seq(items) => {
                if items
                    .iter()
                    .any(|i| matches!(i.value, Value::Bool(_) | Value::Str(_)) && i.as_f64().is_none())
                {
                    self.err(
                        Code::E0606,
                        "lists of booleans or strings (a step per layer) are not supported yet",
                        v.span,
                        "not a list of numbers",
                    );
                    return None;
                }
                let nums: Option<Vec<Expr>> = items.iter().map(|i| self.number(i)).collect();
                let nums = nums?;
                if nums.len() == 1 {
                    return nums.into_iter().next();
                }
                Some(Expr::List(nums).at(v.span))
            }
            _ => self.number(v),
        }
    }

    fn number(&mut self, v: &Node) -> Option<Expr> {
        let Some(x) = v.as_f64() else {
            self.err(
                Code::E0603,
                format!("expected a number, found {}", v.describe()),
                v.span,
                "not a number",
            );
            return None;
        };
        if !x.is_finite() {
            self.err(Code::E0603, "the value is not a finite number", v.span, "here");
            return None;
        }
        Some(Expr::atom(number_text(&v.raw, x)).at(v.span))
    }

    /// The arms as one value; a table with filters is bound by `let` to a name from `hint`.
    fn arms_expr(&mut self, arms: Arms, hint: &str) -> Option<Expr> {
        match arms.len() {
            0 => None,
            1 if arms[0].0.is_none() => arms.into_iter().next().map(|a| a.1),
            _ => {
                let name = self.fresh(&ident_from(hint));
                self.lets.push((name.clone(), Expr::Table(arms)));
                Some(Expr::atom(name))
            }
        }
    }
}

struct Arg<'p, 'n> {
    model: Expr,
    r: Ref,
    params: &'p [Param<'n>],
    /// The model's layer range starts at layer 0 (input tensor names equal the call's).
    starts_at_zero: bool,
}

fn placed(e: Expr, place: Option<Span>) -> Expr {
    match place {
        Some(p) => e.at(p),
        None => e,
    }
}

fn find<'p, 'n>(params: &'p [Param<'n>], name: &str) -> Option<&'p Param<'n>> {
    params.iter().find(|p| p.name == name)
}

fn chain_arms(levels: Vec<Arms>) -> Arms {
    let mut out: Arms = Vec::new();
    for level in levels {
        for arm in level {
            let catch_all = arm.0.is_none();
            out.push(arm);
            if catch_all {
                return out;
            }
        }
    }
    out
}

fn with_block(model: Expr, entries: Vec<Expr>) -> Expr {
    if entries.is_empty() {
        model
    } else {
        Expr::Block(Box::new(model), entries)
    }
}

/// The model name at the start of an argument (`ft1` of `ft1.layers[0..2]`).
fn flat_name(e: &Expr) -> String {
    match e {
        Expr::Atom(s) => s.split('.').next().unwrap_or(s).to_string(),
        Expr::At(inner, _) => flat_name(inner),
        Expr::Cat(parts) => parts.first().map_or(String::new(), flat_name),
        _ => String::new(),
    }
}

/// The model mergec takes the config from by default: the base of a method with one,
/// else the first listed model.
fn first_input(doc: &Doc) -> Option<Ref> {
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
        None => None,
    }
}

fn is_any_parameter(key: &str) -> bool {
    methods::METHODS.iter().any(|m| m.param(key).is_some())
}

/// The closest of `options` to `word`, when it is close enough to be a typo.
pub(crate) fn suggest<'a>(word: &str, options: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    options
        .map(|o| (strsim::levenshtein(word, o), o))
        .filter(|(d, o)| *d > 0 && *d <= (o.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| o)
}

/// The first line of a node's text (for a place that should not span a whole block).
fn first_line(n: &Node) -> Span {
    match &n.value {
        Value::Map(entries) if !entries.is_empty() => entries[0].0.span,
        _ => first_line_of(n.span),
    }
}

fn first_line_of(s: Span) -> Span {
    Span {
        end: s.start.max(s.end.min(s.start + 1)),
        ..s
    }
}

/// A number as the script writes it: the YAML text when it is already a script literal.
fn number_text(raw: &str, x: f64) -> String {
    let body = raw.strip_prefix('-').unwrap_or(raw);
    let is_literal = {
        let mut chars = body.chars().peekable();
        let mut ok = chars.peek().is_some_and(|c| c.is_ascii_digit());
        let mut state = 0; // 0 int, 1 after '.', 2 frac, 3 after e, 4 after sign, 5 exp
        for c in body.chars() {
            state = match (state, c) {
                (0, d) if d.is_ascii_digit() => 0,
                (0, '.') => 1,
                (1 | 2, d) if d.is_ascii_digit() => 2,
                (0 | 2, 'e' | 'E') => 3,
                (3, '+' | '-') => 4,
                (3..=5, d) if d.is_ascii_digit() => 5,
                _ => {
                    ok = false;
                    break;
                }
            };
        }
        ok && matches!(state, 0 | 2 | 5)
    };
    if is_literal
        && body
            .parse::<f64>()
            .ok()
            .map(|v| if raw.starts_with('-') { -v } else { v })
            == Some(x)
    {
        return raw.to_string();
    }
    if x == x.trunc() && x.abs() < 1e15 {
        return format!("{}", x as i64);
    }
    format!("{x:?}")
}

/// A byte count as a script size: `12KB`, `5GB`, or plain bytes.
fn size_text(bytes: u64) -> String {
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

/// `org/name`: one slash, both parts made of letters, digits, `-`, `_` and `.`.
fn is_hub_id(path: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match path.split_once('/') {
        Some((org, name)) => ok(org) && ok(name) && !path.starts_with('.'),
        None => false,
    }
}

fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// A local path of the YAML (relative to the base folder) as the script writes it
/// (relative to the script's folder).
fn relative_reference(path: &str, opts: &Options) -> String {
    let trimmed = path.trim_end_matches('/');
    let trimmed = if trimmed.is_empty() { path } else { trimmed };
    let p = Path::new(trimmed);
    if p.is_absolute() || trimmed.starts_with("~/") || same_dir(&opts.base_dir, &opts.script_dir) {
        return trimmed.to_string();
    }
    relative_to(&opts.base_dir.join(p), &opts.script_dir)
        .map_or_else(|| trimmed.to_string(), |r| r.to_string_lossy().replace('\\', "/"))
}

fn script_path(dir: &Path, opts: &Options) -> String {
    let s = dir.to_string_lossy().to_string();
    if dir.is_absolute() || same_dir(&opts.base_dir, &opts.script_dir) {
        return s;
    }
    relative_to(&opts.base_dir.join(dir), &opts.script_dir).map_or(s, |r| r.to_string_lossy().to_string())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::path::absolute(a), std::path::absolute(b)) {
        (Ok(a), Ok(b)) => normalize(&a) == normalize(&b),
        _ => a == b,
    }
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// `target` relative to the folder `from` (both made absolute).
fn relative_to(target: &Path, from: &Path) -> Option<PathBuf> {
    let target = normalize(&std::path::absolute(target).ok()?);
    let from = normalize(&std::path::absolute(from).ok()?);
    let t: Vec<Component> = target.components().collect();
    let f: Vec<Component> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return None;
    }
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    Some(out)
}

/// The words of a model's name: the last part of its path (the folder, for a file in it).
fn words_of(path: &str) -> Vec<String> {
    let parts: Vec<&str> = path
        .split(['/', '\\'])
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let mut last = parts.last().copied().unwrap_or("model");
    if last.ends_with(".safetensors") || last.ends_with(".json") {
        last = match last {
            "model.safetensors" | "model.safetensors.index.json" => {
                parts.iter().rev().nth(1).copied().unwrap_or("model")
            }
            _ => last.split('.').next().unwrap_or(last),
        };
    }
    let words: Vec<String> = last
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    if words.is_empty() {
        vec!["model".to_string()]
    } else {
        words
    }
}

/// A valid, unreserved script name made from `s`.
fn ident_from(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    while out.contains("__") {
        out = out.replace("__", "_");
    }
    let mut out = out.trim_matches('_').to_string();
    if out.is_empty() {
        out = "m".to_string();
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out = format!("m{out}");
    }
    const RESERVED: &[&str] = &[
        "model", "let", "save", "set", "to", "match", "tensor", "true", "false", "stack",
    ];
    if RESERVED.contains(&out.as_str()) || methods::lookup(&out).is_some() {
        out.push_str("_model");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_their_text() {
        assert_eq!(number_text("5.0e-6", 5e-6), "5.0e-6");
        assert_eq!(number_text("0.25", 0.25), "0.25");
        assert_eq!(number_text(".5", 0.5), "0.5");
        assert_eq!(number_text("1.", 1.0), "1");
        assert_eq!(number_text("-0.5", -0.5), "-0.5");
        assert_eq!(number_text("+2", 2.0), "2");
        assert_eq!(number_text("1_000", 1000.0), "1000");
    }

    #[test]
    fn names_from_paths() {
        assert_eq!(
            words_of("models/micro-llama-ft1-f32"),
            ["micro", "llama", "ft1", "f32"]
        );
        assert_eq!(
            words_of("x/Mistral-7B-v0.1/model.safetensors"),
            ["mistral", "7b", "v0", "1"]
        );
        assert_eq!(ident_from("7b_x"), "m7b_x");
        assert_eq!(ident_from("linear"), "linear_model");
        assert_eq!(ident_from("second-merge"), "second_merge");
    }

    #[test]
    fn hub_ids() {
        assert!(is_hub_id("mistralai/Mistral-7B-v0.1"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("./x"));
        assert!(!is_hub_id("../x"));
        assert!(!is_hub_id("model"));
    }

    #[test]
    fn sizes() {
        assert_eq!(size_text(12_000), "12KB");
        assert_eq!(size_text(5_000_000_000), "5GB");
        assert_eq!(size_text(1234), "1234");
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_to(Path::new("/a/b/models/x"), Path::new("/a/b/configs")),
            Some(PathBuf::from("../models/x"))
        );
    }
}
