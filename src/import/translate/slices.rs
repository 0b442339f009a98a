//! The body of a merge: `models:` entries, or `slices:` of layer ranges.

use super::*;

pub(super) struct Source<'a> {
    pub(super) model: RefAt,
    pub(super) range: Option<(i64, i64, Span)>,
    pub(super) params: Vec<Param<'a>>,
}

pub(super) struct Slice<'a> {
    pub(super) sources: Vec<Source<'a>>,
    pub(super) base: Option<RefAt>,
    pub(super) params: Vec<Param<'a>>,
    pub(super) span: Span,
}

pub(super) enum Body<'a> {
    Models(Vec<Source<'a>>),
    Slices(Vec<Slice<'a>>, Span),
    /// `modules:`: one merge per module of a multi-module model.
    Modules(Vec<Module<'a>>),
    /// A mergekit-moe config.
    Moe(Box<super::moe::Moe>),
}

/// One entry of `modules:`: a merge of the tensors whose names hold `pattern`.
pub(super) struct Module<'a> {
    pub(super) pattern: String,
    /// The module's name in the YAML.
    pub(super) span: Span,
    pub(super) sources: Vec<Source<'a>>,
    pub(super) params: Vec<Param<'a>>,
}

/// The substring that picks a module's tensors out of a model: its weight prefix in
/// mergekit's architecture files (`language_model.` for the text decoder, else the
/// module's own name).
fn module_pattern(name: &str) -> String {
    match name {
        "text_decoder" => "language_model.".to_string(),
        _ => format!("{name}."),
    }
}

pub(super) fn slice_bases(d: &Doc) -> Vec<RefAt> {
    match &d.body {
        Some(Body::Slices(slices, _)) => slices.iter().filter_map(|s| s.base).collect(),
        _ => Vec::new(),
    }
}

impl Translator<'_> {
    /// `modules:`, a mapping of module names to `{models, parameters}`.
    pub(super) fn modules<'n>(&mut self, v: &'n Node) -> Vec<Module<'n>> {
        let Value::Map(entries) = &v.value else {
            self.err(
                Code::E0603,
                format!(
                    "`modules` must be a mapping of module names, found {}",
                    v.describe()
                ),
                v.span,
                "expected `NAME: {models: ...}` entries",
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, body) in entries {
            let Some(name) = k.as_str() else {
                self.err(Code::E0603, "a module name must be a string", k.span, "here");
                continue;
            };
            let mut module = Module {
                pattern: module_pattern(name),
                span: k.span,
                sources: Vec::new(),
                params: Vec::new(),
            };
            let mut has_models = false;
            for (key, kspan, value) in self.entries(body, &["models", "slices", "parameters"], "a module") {
                match key {
                    "models" => {
                        has_models = true;
                        module.sources = self.models_list(value);
                    }
                    "parameters" => module.params = self.params(value, "a module's `parameters`"),
                    _ => {
                        self.err(
                            Code::E0606,
                            "`slices` inside a module are not supported yet",
                            kspan,
                            "not supported yet",
                        )
                        .help
                        .push("give the module `models:`; a script can cut a module's layers with `select` and `.layers[..]`".into());
                    }
                }
            }
            if !has_models && matches!(body.value, Value::Map(_)) && !self.diags.has_errors() {
                self.err(
                    Code::E0603,
                    format!("the module `{name}` has no `models`"),
                    k.span,
                    "this module",
                )
                .help
                .push("mergekit takes exactly one of `models` and `slices` for each module".into());
            }
            out.push(module);
        }
        if out.is_empty() {
            self.err(Code::E0603, "`modules` is empty", v.span, "no modules");
        }
        out
    }

    pub(super) fn models_list<'n>(&mut self, v: &'n Node) -> Vec<Source<'n>> {
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
        self.no_repeats(&mut out);
        out
    }

    /// mergekit keys a merge's inputs by model: a model listed twice is one input, in the
    /// first entry's place, each parameter from the first entry that sets it, and (in a
    /// slice) the last entry's layer range. The entries are folded into that one input,
    /// with a warning.
    pub(super) fn no_repeats(&mut self, sources: &mut Vec<Source>) {
        let mut kept: Vec<Source> = Vec::with_capacity(sources.len());
        let mut first_of: HashMap<Ref, usize> = HashMap::new();
        for again in std::mem::take(sources) {
            let Some(&first) = first_of.get(&again.model.r) else {
                first_of.insert(again.model.r, kept.len());
                kept.push(again);
                continue;
            };
            let sources = &mut kept;
            let ranged = again.range.is_some()
                && again.range.map(|r| (r.0, r.1)) != sources[first].range.map(|r| (r.0, r.1));
            let mut d = Diagnostic::error(Code::W0005, "a model is listed twice in one merge")
                .at(again.model.span, "again here")
                .with_label(sources[first].model.span, "first here")
                .with_help("list each model once");
            d = d.with_note(if ranged {
                "mergekit takes it once: the first entry's place, each parameter from the first entry that sets it, and this entry's layers; so does mergec"
            } else {
                "mergekit takes it once, each parameter from the first entry that sets it; so does mergec"
            });
            self.tolerated(Code::E0603, d);
            if again.range.is_some() {
                sources[first].range = again.range;
            }
            // mergekit looks each parameter up entry by entry: the first that sets it wins.
            sources[first].params.extend(again.params);
        }
        *sources = kept;
    }

    pub(super) fn slices_list<'n>(&mut self, v: &'n Node) -> Vec<Slice<'n>> {
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
                    _ => self.tolerated(
                        Code::E0603,
                        Diagnostic::error(Code::W0005, "`residual_weight` has no effect")
                            .at(kspan, "ignored")
                            .with_note("mergekit reads it but never uses it; mergec ignores it too")
                            .with_help("remove it"),
                    ),
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
            self.no_repeats(&mut slice.sources);
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

    pub(super) fn source<'n>(&mut self, item: &'n Node, slice: bool) -> Option<Source<'n>> {
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

    pub(super) fn layer_range(&mut self, v: &Node) -> Option<(i64, i64, Span)> {
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
}
