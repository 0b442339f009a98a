//! mergekit configuration (YAML tree) -> `.merge` script text. spec/import.md says how
//! each key maps; everything here reports problems against the YAML's own places.
//!
//! One file per idea: `config` reads a document's top-level keys, `models` the model
//! references and their script names, `slices` the `models`/`slices` bodies, `params`
//! parameter values and where each level goes, `calls` the method call a body becomes,
//! `output` the save and its options; this file holds the entry point and what spans
//! several documents (mergekit-multi).

mod calls;
mod config;
mod models;
mod moe;
mod output;
mod params;
mod slices;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use super::pretty::{quote, Expr, Out};
use super::yaml::{Node, Value};
use super::Options;
use crate::diag::{Code, Diagnostic, Diagnostics, Severity};
use crate::sema::methods::MethodSig;
use crate::source::Span;
use models::script_path;
use models::{ident_from, ModelDecl, Ref, RefAt};
use output::{header, save};
use params::{is_any_parameter, Param};
use slices::{slice_bases, Body};

/// The translated script and where its pieces came from.
pub(crate) struct Translated {
    pub out: Out,
    /// What mergekit ignores or tolerates (W0005).
    pub warnings: Diagnostics,
}

/// Translates every document of a mergekit (or mergekit-multi) YAML file.
pub(crate) fn translate(docs: &[Node], yaml_text: &str, opts: &Options) -> Result<Translated, Diagnostics> {
    let mut t = Translator {
        opts,
        diags: Diagnostics::new(),
        models: Vec::new(),
        model_index: HashMap::new(),
        adapter_index: HashMap::new(),
        doc_names: HashMap::new(),
        used: BTreeSet::new(),
        next_suffix: HashMap::new(),
        lets: Vec::new(),
        warnings: Diagnostics::new(),
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
        return Err(t.failed());
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
    let mut declared = vec![false; t.models.len()];
    for i in bases.into_iter().chain(0..t.models.len()) {
        // a model with an adapter comes after the model it applies to
        if let Some((_, b)) = t.models[i].adapter {
            if !std::mem::replace(&mut declared[b], true) {
                decl.push(b);
            }
        }
        if !std::mem::replace(&mut declared[i], true) {
            decl.push(i);
        }
    }
    // Models first, then the models with an adapter applied (`model+lora`).
    for m in decl.iter().map(|&i| &t.models[i]).filter(|m| m.adapter.is_none()) {
        out.push(&format!("model {} = ", m.name));
        out.expr(&Expr::atom(quote(&m.reference)).at(m.span), 0);
        out.push("\n");
    }
    for m in decl.iter().map(|&i| &t.models[i]) {
        if let Some((adapter, base)) = &m.adapter {
            out.push(&format!("let {} = ", m.name));
            let call = Expr::Call(
                "lora".to_string(),
                vec![
                    Expr::atom(t.models[*base].name.clone()),
                    Expr::atom(quote(adapter)).at(m.span),
                ],
            );
            out.expr(&call, 0);
            out.push("\n");
        }
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
        return Err(t.failed());
    }
    Ok(Translated {
        out,
        warnings: t.warnings,
    })
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

struct Doc<'a> {
    name: Option<(String, Span)>,
    method: Option<(&'static MethodSig, Span)>,
    body: Option<Body<'a>>,
    base: Option<RefAt>,
    params: Vec<Param<'a>>,
    dtype: Option<(&'static str, Span)>,
    /// mergekit's `dtype`: the dtype it computes in (`dtype` above is the stored one).
    compute: Option<(&'static str, Span)>,
    tokenizer: Option<RefAt>,
    /// `union` / `base` and the rest of mergekit's `tokenizer:` block, as save options.
    vocab: Vec<Expr>,
    chat_template: Option<(String, Span)>,
    span: Span,
}

impl Doc<'_> {
    /// A document with nothing read yet.
    fn new(span: Span) -> Self {
        Doc {
            name: None,
            method: None,
            body: None,
            base: None,
            params: Vec::new(),
            dtype: None,
            compute: None,
            tokenizer: None,
            vocab: Vec::new(),
            chat_template: None,
            span,
        }
    }

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
            Some(Body::Modules(modules)) => {
                refs.extend(modules.iter().flat_map(|m| m.sources.iter().map(|s| s.model)))
            }
            Some(Body::Moe(_)) | None => {}
        }
        refs.iter()
            .filter_map(|r| match r.r {
                Ref::Doc(i) => Some(i),
                Ref::Model(_) => None,
            })
            .collect()
    }
}

struct Translator<'o> {
    opts: &'o Options,
    diags: Diagnostics,
    models: Vec<ModelDecl>,
    /// Where each reference is in `models`.
    model_index: HashMap<String, usize>,
    /// Where each `model+lora` pair (adapter reference, model) is in `models`.
    adapter_index: HashMap<(String, usize), usize>,
    doc_names: HashMap<String, (usize, Span)>,
    /// Names taken in the script.
    used: BTreeSet<String>,
    /// For each base name given to `fresh`, the suffix it tries next.
    next_suffix: HashMap<String, usize>,
    /// Tables hoisted out of the current document's expression.
    lets: Vec<(String, Expr)>,
    /// What mergekit ignores or tolerates (W0005).
    warnings: Diagnostics,
}

/// The longest chain of mergekit-multi documents, each using the one before (E0607):
/// every document adds to the depth of the script's model expressions.
pub(crate) const MAX_DOC_CHAIN: usize = 64;

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

impl Translator<'_> {
    pub(super) fn err(
        &mut self,
        code: Code,
        message: impl Into<String>,
        span: Span,
        label: &str,
    ) -> &mut Diagnostic {
        self.diags.push(Diagnostic::error(code, message).at(span, label));
        let last = self.diags.0.len() - 1;
        &mut self.diags.0[last]
    }

    /// The entries of a mapping, each key checked against `allowed`.
    pub(super) fn entries<'n>(
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
            if let Some(first) = seen.insert(key, k.span) {
                self.given_twice(key, first, k.span);
                out.retain(|e: &(&str, Span, &Node)| e.0 != key);
            }
            if !allowed.contains(&key) {
                self.unknown_key(key, k.span, allowed, what);
                continue;
            }
            out.push((key, k.span, v));
        }
        out
    }

    /// Something mergekit ignores or tolerates: a warning (W0005) that says what mergekit
    /// does, or under `--strict` the error `strict`.
    pub(super) fn tolerated(&mut self, strict: Code, mut d: Diagnostic) {
        d.code = Code::W0005;
        if self.opts.strict {
            d.code = strict;
            d.severity = Severity::Error;
            d.notes
                .push("an error because of `--strict`; without it mergec does as mergekit does".into());
            self.diags.push(d);
        } else {
            d.severity = Severity::Warning;
            self.warnings.push(d);
        }
    }

    /// The diagnostics of a failed translation: its errors and its warnings.
    fn failed(&mut self) -> Diagnostics {
        let mut all = std::mem::take(&mut self.diags);
        all.extend(std::mem::take(&mut self.warnings));
        all
    }

    /// A key given twice in one mapping: PyYAML keeps the last one, without a word.
    pub(super) fn given_twice(&mut self, key: &str, first: Span, again: Span) {
        self.tolerated(
            Code::E0603,
            Diagnostic::error(Code::W0005, format!("`{key}` is given twice"))
                .at(again, "this one is used")
                .with_label(first, "this one is ignored")
                .with_note("mergekit reads YAML with PyYAML, which keeps the last value of a repeated key; so does mergec")
                .with_help("keep one of them"),
        );
    }

    pub(super) fn unknown_key(&mut self, key: &str, span: Span, allowed: &[&str], what: &str) {
        let mut d = Diagnostic::error(Code::W0005, format!("`{key}` is not a mergekit key in {what}"))
            .at(span, "ignored");
        let mut ignored = "mergekit ignores it, and so does mergec".to_string();
        if let Some(s) = suggest(key, allowed.iter().copied()) {
            d = d.with_help(format!("did you mean `{s}`?"));
            ignored = match s {
                "dtype" => "mergekit ignores it and computes in the models' own dtype; so does mergec".into(),
                "base_model" => "mergekit ignores it and merges without a base model; so does mergec".into(),
                "parameters" => "mergekit ignores it, and every parameter in it; so does mergec".into(),
                _ => ignored,
            };
        } else if is_any_parameter(key) {
            d = d.with_help(format!(
                "`{key}` is a merge parameter: put it under `parameters:`"
            ));
        } else if key == "revision" {
            d = d.with_help("give the revision with the model: `model: org/name@REVISION`, or `model: {path: org/name, revision: REVISION}`");
            ignored = "mergekit ignores it and reads the model's default revision; so does mergec".into();
        } else if key == "layer_range" {
            d = d.with_help(
                "layer ranges belong to the sources of `slices:`; `models:` always takes whole models",
            );
        } else {
            d = d.with_help(format!("the keys here are: {}", allowed.join(", ")));
        }
        d = d.with_note(ignored);
        self.tolerated(Code::E0602, d);
    }

    /// Document order with every document after the ones it uses (a walk without
    /// recursion). A cycle is an error (E0603), and so is a chain of more than
    /// [`MAX_DOC_CHAIN`] documents each using the next (E0607).
    pub(super) fn order(&mut self, docs: &[Doc]) -> Vec<usize> {
        let refs: Vec<Vec<usize>> = docs.iter().map(Doc::doc_refs).collect();
        let mut order = Vec::new();
        let mut state = vec![0u8; docs.len()]; // 0 new, 1 in progress, 2 done
                                               // The longest chain of documents from each one down (1: it uses no other).
        let mut chain = vec![0usize; docs.len()];
        for root in 0..docs.len() {
            if state[root] != 0 {
                continue;
            }
            state[root] = 1;
            let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
            while let Some((i, next)) = stack.last_mut() {
                let i = *i;
                if let Some(&j) = refs[i].get(*next) {
                    *next += 1;
                    match state[j] {
                        0 => {
                            state[j] = 1;
                            stack.push((j, 0));
                        }
                        1 => {
                            let span = docs[j].name.as_ref().map_or(docs[j].span, |n| n.1);
                            self.err(
                                Code::E0603,
                                "these merges use each other in a cycle",
                                span,
                                "this merge uses itself, through others",
                            )
                            .help
                            .push("a document may use only merges that do not use it".into());
                            return order;
                        }
                        _ => {}
                    }
                } else {
                    state[i] = 2;
                    chain[i] = 1 + refs[i].iter().map(|&j| chain[j]).max().unwrap_or(0);
                    order.push(i);
                    stack.pop();
                }
            }
        }
        if let Some((i, &longest)) = chain.iter().enumerate().max_by_key(|(_, c)| **c) {
            if longest > MAX_DOC_CHAIN {
                let span = docs[i].name.as_ref().map_or(first_line_of(docs[i].span), |n| n.1);
                self.err(
                    Code::E0607,
                    format!("the documents use each other in a chain of {longest}, more than {MAX_DOC_CHAIN}"),
                    span,
                    "this merge is at the end of the chain",
                )
                .help
                .push("merge in fewer steps, or save an intermediate merge and use its folder in another config".into());
            }
        }
        order
    }

    /// `base` made unique among the script's names: `base`, else the first of `base_2`,
    /// `base_3`, ... not taken. The suffix to try next is kept for each base, so that many
    /// models of one name take linear time.
    pub(super) fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = self.next_suffix.get(base).copied().unwrap_or(2);
        while self.used.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.next_suffix.insert(base.to_string(), k);
        self.used.insert(name.clone());
        name
    }
}
