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
    /// A mergekit-moe config.
    Moe(Box<super::moe::Moe>),
}

pub(super) fn slice_bases(d: &Doc) -> Vec<RefAt> {
    match &d.body {
        Some(Body::Slices(slices, _)) => slices.iter().filter_map(|s| s.base).collect(),
        _ => Vec::new(),
    }
}

impl Translator<'_> {
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
        self.no_repeats(&out);
        out
    }

    /// mergekit keys a merge's inputs by model: a model listed twice is merged once, with
    /// the first entry's parameters. Refused as the surprise it is.
    pub(super) fn no_repeats(&mut self, sources: &[Source]) {
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
