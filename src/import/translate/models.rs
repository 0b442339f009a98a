//! Model references (paths, hub ids, revisions, other documents) and their script names.

use std::path::{Component, Path, PathBuf};

use super::*;
use crate::sema::methods;

pub(super) struct ModelDecl {
    /// The reference as the script writes it (`hf:org/name`, a path).
    pub(super) reference: String,
    /// Words for the model's name (lower case).
    pub(super) words: Vec<String>,
    pub(super) span: Span,
    pub(super) name: String,
    /// `model+lora`: the adapter's reference (as the script writes it) and the model it
    /// is applied to. Such a model is written as `let NAME = lora(BASE, "ADAPTER")`.
    pub(super) adapter: Option<(String, usize)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Ref {
    Model(usize),
    Doc(usize),
}

#[derive(Clone, Copy)]
pub(super) struct RefAt {
    pub(super) r: Ref,
    pub(super) span: Span,
}

/// `org/name`: one slash, both parts made of letters, digits, `-`, `_` and `.`.
pub(super) fn is_hub_id(path: &str) -> bool {
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

pub(super) fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// A local path of the YAML (relative to the base folder) as the script writes it
/// (relative to the script's folder).
pub(super) fn relative_reference(path: &str, opts: &Options) -> String {
    let trimmed = path.trim_end_matches('/');
    let trimmed = if trimmed.is_empty() { path } else { trimmed };
    let p = Path::new(trimmed);
    if p.is_absolute() || trimmed.starts_with("~/") || same_dir(&opts.base_dir, &opts.script_dir) {
        return trimmed.to_string();
    }
    relative_to(&opts.base_dir.join(p), &opts.script_dir)
        .map_or_else(|| trimmed.to_string(), |r| r.to_string_lossy().replace('\\', "/"))
}

pub(super) fn script_path(dir: &Path, opts: &Options) -> String {
    let s = dir.to_string_lossy().to_string();
    if dir.is_absolute() || same_dir(&opts.base_dir, &opts.script_dir) {
        return s;
    }
    relative_to(&opts.base_dir.join(dir), &opts.script_dir).map_or(s, |r| r.to_string_lossy().to_string())
}

pub(super) fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::path::absolute(a), std::path::absolute(b)) {
        (Ok(a), Ok(b)) => normalize(&a) == normalize(&b),
        _ => a == b,
    }
}

pub(super) fn normalize(p: &Path) -> PathBuf {
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
pub(super) fn relative_to(target: &Path, from: &Path) -> Option<PathBuf> {
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
pub(super) fn words_of(path: &str) -> Vec<String> {
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
pub(super) fn ident_from(s: &str) -> String {
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

impl Translator<'_> {
    /// A model reference: a local path, a hub id, `id@revision`, or another document's name.
    pub(super) fn reference(&mut self, v: &Node) -> Option<RefAt> {
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

    pub(super) fn reference_map(&mut self, v: &Node) -> Option<RefAt> {
        let entries = self.entries(
            v,
            &["model", "lora", "override_architecture"],
            "a model reference",
        );
        let mut out = None;
        let mut lora: Option<(String, Option<String>, Span)> = None;
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
                "lora" => match &value.value {
                    Value::Str(s) => lora = Some((s.clone(), None, value.span)),
                    Value::Map(_) => {
                        let inner = self.entries(value, &["path", "revision"], "a LoRA path");
                        let field = |k: &str| {
                            inner
                                .iter()
                                .find(|e| e.0 == k)
                                .and_then(|e| e.2.as_str().map(str::to_string))
                        };
                        match field("path") {
                            Some(p) => lora = Some((p, field("revision"), value.span)),
                            None => {
                                self.err(Code::E0603, "a LoRA path needs `path`", value.span, "here");
                                return None;
                            }
                        }
                    }
                    Value::Null => {}
                    _ => {
                        self.err(Code::E0603, "`lora` must be a string", value.span, "here");
                        return None;
                    }
                },
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
        match (out, lora) {
            (Some(base), Some((path, rev, span))) => self.with_adapter(base, &path, rev, span),
            (out, _) => out,
        }
    }

    /// `base+lora`: a model with a PEFT adapter applied, declared once per pair.
    fn with_adapter(
        &mut self,
        base: RefAt,
        path: &str,
        revision: Option<String>,
        span: Span,
    ) -> Option<RefAt> {
        let Ref::Model(b) = base.r else {
            self.err(
                Code::E0603,
                "a LoRA adapter applies to a model, not to another merge of the file",
                span,
                "here",
            );
            return None;
        };
        let (path, rev) = match (path.trim().split_once('@'), revision) {
            (Some((p, r)), _) => (p.to_string(), Some(r.to_string())),
            (None, r) => (path.trim().to_string(), r),
        };
        if path.is_empty() {
            self.err(Code::E0603, "empty LoRA reference", span, "here");
            return None;
        }
        let adapter = self.local_or_hub(&path, rev);
        let reference = self.models[b].reference.clone();
        // named after its model: `ft1` with an adapter is `ft1_lora`
        let mut words = self.models[b].words.clone();
        words.push("lora".to_string());
        let key = (adapter.clone(), b);
        let i = match self.adapter_index.get(&key) {
            Some(&i) => i,
            None => {
                self.adapter_index.insert(key, self.models.len());
                self.models.push(ModelDecl {
                    reference,
                    words,
                    span,
                    name: String::new(),
                    adapter: Some((adapter, b)),
                });
                self.models.len() - 1
            }
        };
        Some(RefAt {
            r: Ref::Model(i),
            span,
        })
    }

    /// A path as the script writes it: relative to the script when it exists locally (or
    /// is no hub id), else `hf:org/name[@revision]`.
    fn local_or_hub(&self, path: &str, rev: Option<String>) -> String {
        let local = expand_home(path);
        let resolved = if local.is_absolute() {
            local.clone()
        } else {
            self.opts.base_dir.join(&local)
        };
        if !resolved.exists() && is_hub_id(path) {
            match &rev {
                Some(r) => format!("hf:{path}@{r}"),
                None => format!("hf:{path}"),
            }
        } else {
            relative_reference(path, self.opts)
        }
    }

    pub(super) fn reference_text(
        &mut self,
        text: &str,
        revision: Option<String>,
        span: Span,
    ) -> Option<RefAt> {
        let text = text.trim();
        if let Some(&(i, _)) = self.doc_names.get(text) {
            return Some(RefAt { r: Ref::Doc(i), span });
        }
        // mergekit's `model+lora`: exactly one `+`.
        if let Some((model, lora)) = text.split_once('+') {
            if lora.contains('+') {
                self.err(
                    Code::E0603,
                    "a model reference holds at most one `+` (`model+lora`)",
                    span,
                    "here",
                );
                return None;
            }
            let base = self.reference_text(model, revision, span)?;
            return self.with_adapter(base, lora, None, span);
        }
        let (path, rev) = match (text.split_once('@'), revision) {
            (Some((p, r)), _) => (p.to_string(), Some(r.to_string())),
            (None, r) => (text.to_string(), r),
        };
        if path.is_empty() {
            self.err(Code::E0603, "empty model reference", span, "here");
            return None;
        }
        let reference = self.local_or_hub(&path, rev);
        // Plain models only: a model with an adapter is a declaration of its own.
        let i = match self.model_index.get(&reference) {
            Some(&i) => i,
            None => {
                self.model_index.insert(reference.clone(), self.models.len());
                self.models.push(ModelDecl {
                    reference,
                    words: words_of(&path),
                    span,
                    name: String::new(),
                    adapter: None,
                });
                self.models.len() - 1
            }
        };
        Some(RefAt {
            r: Ref::Model(i),
            span,
        })
    }

    /// Readable model names: the last part of each path, lower case, without the words
    /// every model shares (`micro-llama-ft1-f32`, `micro-llama-base-f32` -> `ft1`, `base`).
    pub(super) fn name_models(&mut self) {
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

    pub(super) fn ref_name(&self, r: Ref, idents: &[String]) -> String {
        match r {
            Ref::Model(i) => self.models[i].name.clone(),
            Ref::Doc(i) => idents[i].clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn relative_paths() {
        assert_eq!(
            relative_to(Path::new("/a/b/models/x"), Path::new("/a/b/configs")),
            Some(PathBuf::from("../models/x"))
        );
    }
}
