//! What the language server knows about one document: its diagnostics (the compiler's own
//! parse and check, against model headers kept between edits), and the words around a
//! cursor for hover, completion and go to definition. Positions here are byte offsets;
//! `lsp::mod` converts them to the protocol's lines and UTF-16 columns.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use regex::Regex;

use crate::diag::{Diagnostic, Diagnostics};
use crate::driver::Script;
use crate::import;
use crate::io::{ModelIndex, ModelInfo};
use crate::sema::methods::{self, MethodSig, ParamSpec};
use crate::sema::CheckOptions;
use crate::source::{SourceId, SourceMap};

/// The kind of document, from its file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    Merge,
    Yaml,
}

impl Lang {
    pub fn of(path: &Path) -> Lang {
        if import::is_yaml(path) {
            Lang::Yaml
        } else {
            Lang::Merge
        }
    }
}

/// Model headers already read, per (folder, reference as written), with the modification
/// times of their files: a model is read again only when one of them changed.
#[derive(Default)]
pub struct HeaderCache {
    models: HashMap<(PathBuf, String), (Arc<ModelInfo>, Stamp)>,
}

/// The modification times of a model's files when its headers were read.
type Stamp = Vec<Option<SystemTime>>;

fn mtimes(info: &ModelInfo) -> Stamp {
    let mut files = info.files.clone();
    files.push(info.root.join("config.json"));
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

impl HeaderCache {
    /// The index `sema::check` needs for `references`, reading only what is not cached.
    pub fn index<'a>(
        &mut self,
        references: impl IntoIterator<Item = &'a str>,
        base_dir: &Path,
    ) -> ModelIndex {
        let references: BTreeSet<&str> = references.into_iter().collect();
        let mut cached = Vec::new();
        let mut missing = Vec::new();
        for r in references {
            let key = (base_dir.to_path_buf(), r.to_string());
            match self.models.get(&key) {
                Some((info, stamp)) if *stamp == mtimes(info) => cached.push((r, Arc::clone(info))),
                _ => missing.push(r),
            }
        }
        let mut index = ModelIndex::load(missing, base_dir);
        for (r, result) in index.iter() {
            if let Ok(info) = result {
                let key = (base_dir.to_path_buf(), r.to_string());
                self.models.insert(key, (Arc::clone(info), mtimes(info)));
            }
        }
        for (r, info) in cached {
            index.insert(r.to_string(), Ok(info));
        }
        index
    }

    /// Every tensor name of the cached models that `references` name.
    pub fn tensor_names<'a>(
        &mut self,
        references: impl IntoIterator<Item = &'a str>,
        base_dir: &Path,
    ) -> BTreeSet<String> {
        let index = self.index(references, base_dir);
        index
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .flat_map(|info| info.tensors.keys().cloned())
            .collect()
    }
}

/// A document's diagnostics, each with its byte range in the document; those the compiler
/// places elsewhere (in a YAML config's translated script) or nowhere get range 0..0.
pub fn diagnostics(
    path: &Path,
    text: &str,
    lang: Lang,
    cache: &mut HeaderCache,
) -> Vec<(Diagnostic, usize, usize)> {
    let dir = folder(path);
    let name = path.display().to_string();
    let (diags, doc) = match lang {
        Lang::Merge => {
            let script = Script::from_text(&name, text.to_string(), dir);
            (check(&script, cache), Some(script.id))
        }
        // Editors send every YAML file; only mergekit configs are ours.
        Lang::Yaml if !is_mergekit(text) => return Vec::new(),
        Lang::Yaml => {
            let stem = path
                .file_stem()
                .map_or("merged".into(), |s| s.to_string_lossy().to_string());
            let opts = import::Options::new(&name, &dir, &Path::new("out").join(stem));
            match import::translate(&name, text.to_string(), &opts) {
                Err(f) => (f.diagnostics, yaml_source(&f.sources, &name)),
                Ok(imported) => (
                    imported.remap(check(&imported.script(), cache)),
                    Some(imported.yaml),
                ),
            }
        }
    };
    diags
        .into_iter()
        .map(|d| {
            let (start, end) = match d.span {
                Some(s) if Some(s.source) == doc => (s.start as usize, s.end as usize),
                _ => (0, 0),
            };
            (d, start.min(text.len()), end.min(text.len()))
        })
        .collect()
}

/// Whether a YAML text is a mergekit config (a merge, or a mergekit-moe config).
fn is_mergekit(text: &str) -> bool {
    text.lines()
        .any(|l| l.starts_with("merge_method:") || l.starts_with("experts:"))
}

/// The YAML document in a failed translation's sources.
fn yaml_source(sources: &SourceMap, name: &str) -> Option<SourceId> {
    sources.files().find(|(_, f)| f.name == name).map(|(id, _)| id)
}

/// parse and check, as `mergec check` does up to its plan (E01xx-E04xx and warnings);
/// output folders that exist are accepted, since writing is `run`'s concern.
fn check(script: &Script, cache: &mut HeaderCache) -> Diagnostics {
    let ast = match crate::syntax::parse(&script.sources, script.id) {
        Ok(a) => a,
        Err(d) => return d,
    };
    let mut index = cache.index(crate::sema::model_references(&ast), &script.base_dir);
    index.load_adapters(crate::sema::adapter_references(&ast), &script.base_dir);
    let options = CheckOptions {
        base_dir: script.base_dir.clone(),
        force: true,
        compute: None,
    };
    match crate::sema::check(&ast, script.text(), &index, &options) {
        Ok(checked) => checked.warnings,
        Err(d) => d,
    }
}

fn folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The identifier around byte `at`, with its range.
pub fn word_at(text: &str, at: usize) -> Option<(&str, usize, usize)> {
    let at = at.min(text.len());
    let start = text[..at]
        .char_indices()
        .rev()
        .take_while(|(_, c)| is_word(*c))
        .last()
        .map_or(at, |(i, _)| i);
    let end = text[at..]
        .find(|c: char| !is_word(c))
        .map_or(text.len(), |i| at + i);
    (start < end).then(|| (&text[start..end], start, end))
}

/// The method whose call's parentheses enclose byte `at` (skipping parameter blocks and
/// lists inside it), for parameters named inside the call.
fn enclosing_call(text: &str, at: usize) -> Option<&'static MethodSig> {
    let mut depth = 0i32;
    for (i, c) in text[..at.min(text.len())].char_indices().rev() {
        match c {
            ')' | '}' | ']' => depth += 1,
            '{' | '[' if depth > 0 => depth -= 1,
            '(' if depth > 0 => depth -= 1,
            '(' => {
                let before = text[..i].trim_end();
                let (name, _, _) = word_at(before, before.len())?;
                return method(name);
            }
            _ => {}
        }
    }
    None
}

fn method(name: &str) -> Option<&'static MethodSig> {
    methods::METHODS.iter().find(|m| m.name == name)
}

/// The built-in operations that are not merge methods, with what they do.
const BUILTINS: &[(&str, &str)] = &[
    ("stack", "`stack(a.layers[0..24], b.layers[8..32])`: layer ranges one after another, renumbered (depth up-scaling)"),
    ("select", "`select(m, \"pattern\", ...; regex: \"...\")`: the tensors of `m` whose names match"),
    ("graft", "`graft(onto, part)`: `onto` with the tensors `part` has replaced by `part`'s"),
    ("rename", "`rename(m, \"from\", \"to\")`: tensor names starting with `from` start with `to` instead"),
    ("moe", "`moe(base, expert { positive: [...] }, ..., gate: \"hidden\")`: a mixture of experts from dense models"),
    ("lora", "`lora(m, \"adapter\", scale: 1.0)`: `m` with a PEFT LoRA adapter applied (W + scale·(alpha/r)·B·A)"),
];

fn param_doc(p: &ParamSpec) -> String {
    let default = match p.default {
        methods::Default::Required => "required".to_string(),
        methods::Default::Number(v) => format!("default {v}"),
        methods::Default::Bool(b) => format!("default {b}"),
    };
    let scope = if p.per_model {
        "per model or for the call"
    } else {
        "for the call"
    };
    format!(
        "`{}`: {} ({default}, {}, {scope})",
        p.name,
        p.doc,
        p.range.describe()
    )
}

fn method_doc(m: &MethodSig) -> String {
    let mut doc = format!("**{}**: {}\n", m.name, m.summary);
    if m.base == methods::Base::Required {
        doc.push_str("\nThe first model is the base.\n");
    }
    for p in m.params {
        doc.push_str(&format!("\n- {}", param_doc(p)));
    }
    doc
}

/// Markdown for the word at `at`: a method or built-in, a parameter, or a binding's
/// definition.
pub fn hover(text: &str, at: usize) -> Option<(String, usize, usize)> {
    let (word, start, end) = word_at(text, at)?;
    let after = text[end..].trim_start();
    if let Some(m) = method(word) {
        return Some((method_doc(m), start, end));
    }
    if let Some((name, doc)) = BUILTINS.iter().find(|(n, _)| *n == word) {
        return Some((format!("**{name}**: {doc}"), start, end));
    }
    if after.starts_with(':') {
        let sig = enclosing_call(text, start);
        let p = match sig {
            Some(sig) => sig.param(word),
            // A YAML key, or a parameter outside a call: the first method that has it.
            None => methods::METHODS.iter().find_map(|m| m.param(word)),
        };
        if let Some(p) = p {
            return Some((param_doc(p), start, end));
        }
    }
    let (def_start, _) = definition(text, word)?;
    let line_end = text[def_start..].find('\n').map_or(text.len(), |i| def_start + i);
    let line_start = text[..def_start].rfind('\n').map_or(0, |i| i + 1);
    Some((
        format!("```merge\n{}\n```", text[line_start..line_end].trim()),
        start,
        end,
    ))
}

fn bindings_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"(?m)^[ \t]*(?:model|let)[ \t]+([A-Za-z_][A-Za-z0-9_]*)")
            .unwrap_or_else(|_| unreachable!())
    })
}

fn models_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r#"(?m)^[ \t]*(?:model[ \t]+[A-Za-z_][A-Za-z0-9_]*[ \t]*=[ \t]*"([^"]*)"|[ \t]*-?[ \t]*(?:base_)?model:[ \t]*"?([^"\s#]+))"#)
            .unwrap_or_else(|_| unreachable!())
    })
}

/// Every `model NAME` and `let NAME` binding, with the range of its name.
pub fn bindings(text: &str) -> Vec<(&str, usize, usize)> {
    bindings_regex()
        .captures_iter(text)
        .filter_map(|c| c.get(1))
        .map(|m| (m.as_str(), m.start(), m.end()))
        .collect()
}

/// Where `name` is bound.
pub fn definition(text: &str, name: &str) -> Option<(usize, usize)> {
    bindings(text)
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, s, e)| (s, e))
}

/// The model references the document names (`model x = "..."`, YAML `model: ...`).
fn model_references(text: &str) -> Vec<&str> {
    models_regex()
        .captures_iter(text)
        .filter_map(|c| c.get(1).or_else(|| c.get(2)))
        .map(|m| m.as_str())
        .collect()
}

/// What completes the text at `at`.
#[derive(Debug, PartialEq)]
pub enum Item {
    Method(&'static str, String),
    Param(&'static str, String),
    Binding(String),
    Pattern(String),
    Keyword(&'static str),
}

pub fn complete(path: &Path, text: &str, at: usize, lang: Lang, cache: &mut HeaderCache) -> Vec<Item> {
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = &text[line_start..at];
    let quotes = line.matches('"').count();
    let in_string = quotes % 2 == 1 || (lang == Lang::Yaml && line.trim_start().starts_with("- filter:"));
    if in_string || (lang == Lang::Yaml && line.contains("filter:")) {
        let key = line.trim_start().trim_start_matches("- ");
        if ["model ", "model:", "base_model:"]
            .iter()
            .any(|k| key.starts_with(k))
        {
            return Vec::new(); // a model path: the file system's business
        }
        let names = cache.tensor_names(model_references(text), &folder(path));
        return patterns(&names).into_iter().map(Item::Pattern).collect();
    }
    if lang == Lang::Yaml {
        if line.contains("merge_method:") {
            return methods::METHODS
                .iter()
                .map(|m| Item::Method(m.name, method_doc(m)))
                .collect();
        }
        let mut params: Vec<&'static ParamSpec> = Vec::new();
        for p in methods::METHODS.iter().flat_map(|m| m.params) {
            if !params.iter().any(|q| q.name == p.name) {
                params.push(p);
            }
        }
        return params
            .into_iter()
            .map(|p| Item::Param(p.name, param_doc(p)))
            .collect();
    }
    let mut items = Vec::new();
    if line.trim_start().starts_with("set ") {
        return crate::sema::SETTINGS.into_iter().map(Item::Keyword).collect();
    }
    if let Some(sig) = enclosing_call(text, at) {
        items.extend(sig.params.iter().map(|p| Item::Param(p.name, param_doc(p))));
    }
    let mut seen = BTreeSet::new();
    for (name, _, _) in bindings(text) {
        if seen.insert(name) {
            items.push(Item::Binding(name.to_string()));
        }
    }
    items.extend(
        methods::METHODS
            .iter()
            .map(|m| Item::Method(m.name, method_doc(m))),
    );
    items.extend(BUILTINS.iter().map(|(n, d)| Item::Method(n, d.to_string())));
    items.push(Item::Keyword("match tensor"));
    items
}

/// Tensor-name patterns from a model's names: each name with layer numbers as `*`, and
/// the module paths a `match tensor` arm usually names (`self_attn`, `mlp.down_proj`).
fn patterns(names: &BTreeSet<String>) -> Vec<String> {
    let mut out = BTreeSet::new();
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        let glob: Vec<&str> = parts
            .iter()
            .map(|p| {
                if p.chars().all(|c| c.is_ascii_digit()) {
                    "*"
                } else {
                    p
                }
            })
            .collect();
        out.insert(glob.join("."));
        // The parts after the layer number (or after `model.`), without `weight`/`bias`.
        let tail_from = parts
            .iter()
            .rposition(|p| p.chars().all(|c| c.is_ascii_digit()))
            .map_or(usize::from(parts.first() == Some(&"model")), |i| i + 1);
        let tail: Vec<&str> = parts[tail_from.min(parts.len())..]
            .iter()
            .copied()
            .filter(|p| *p != "weight" && *p != "bias")
            .collect();
        for n in 1..=tail.len() {
            out.insert(tail[..n].join("."));
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_read_once_until_a_file_changes() {
        let tmp = tempfile::tempdir().unwrap();
        crate::synth::write_demo_models(tmp.path()).unwrap();
        let mut cache = HeaderCache::default();
        let first = cache.index(["models/base"], tmp.path());
        let second = cache.index(["models/base"], tmp.path());
        let get = |i: &ModelIndex| Arc::clone(i.get("models/base").unwrap().as_ref().unwrap());
        assert!(Arc::ptr_eq(&get(&first), &get(&second)));
        // A rewritten model is read again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let config = tmp.path().join("models/base/config.json");
        std::fs::write(&config, std::fs::read(&config).unwrap()).unwrap();
        let third = cache.index(["models/base"], tmp.path());
        assert!(!Arc::ptr_eq(&get(&first), &get(&third)));
    }

    #[test]
    fn other_yaml_files_get_no_diagnostics() {
        let mut cache = HeaderCache::default();
        let ci = "on: push\njobs:\n  test:\n    runs-on: ubuntu-latest\n";
        assert!(diagnostics(Path::new("ci.yml"), ci, Lang::Yaml, &mut cache).is_empty());
        let typo = "merge_method: tie\nmodels:\n  - model: a\n";
        assert!(!diagnostics(Path::new("c.yml"), typo, Lang::Yaml, &mut cache).is_empty());
    }

    #[test]
    fn completion_by_context() {
        let tmp = tempfile::tempdir().unwrap();
        crate::synth::write_demo_models(tmp.path()).unwrap();
        let mut cache = HeaderCache::default();
        let script = tmp.path().join("x.merge");
        let text = "model base = \"models/base\"\nlet t = match tensor { \"model.\" => 1, _ => 0 }\n";
        let at = text.find("model.\"").unwrap() + "model.".len();
        let items = complete(&script, text, at, Lang::Merge, &mut cache);
        assert!(
            items.contains(&Item::Pattern("model.layers.*.mlp.up_proj.weight".into())),
            "{items:?}"
        );
        // A model path is left to the file system.
        let at = text.find("models/").unwrap() + 3;
        assert!(complete(&script, text, at, Lang::Merge, &mut cache).is_empty());

        let config = tmp.path().join("c.yml");
        let yaml = "merge_method: \nbase_model: models/base\nparameters:\n  \n";
        let methods = complete(&config, yaml, "merge_method: ".len(), Lang::Yaml, &mut cache);
        assert!(
            methods.iter().any(|i| matches!(i, Item::Method("ties", _))),
            "{methods:?}"
        );
        let params = complete(&config, yaml, yaml.len() - 1, Lang::Yaml, &mut cache);
        assert!(
            params.iter().any(|i| matches!(i, Item::Param("density", _))),
            "{params:?}"
        );
    }

    #[test]
    fn patterns_from_tensor_names() {
        let names: BTreeSet<String> = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
            .map(String::from)
            .into();
        let p = patterns(&names);
        for want in [
            "self_attn",
            "self_attn.q_proj",
            "model.layers.*.self_attn.q_proj.weight",
            "lm_head",
        ] {
            assert!(p.iter().any(|x| x == want), "{want}: {p:?}");
        }
    }
}
