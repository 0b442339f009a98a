//! mergekit-moe configs (`base_model`, `experts`, `gate_mode`, ...) -> `moe(...)`.

use super::super::pretty::quote;
use super::slices::Body;
use super::*;

pub(super) const MOE_KEYS: &[&str] = &[
    "base_model",
    "experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "shared_experts",
    "architecture",
];

const EXPERT_KEYS: &[&str] = &[
    "source_model",
    "positive_prompts",
    "negative_prompts",
    "noise_scale",
    "residual_scale",
];

/// mergekit-moe's output architectures, by the name its `architecture` key is a prefix
/// of, with the script's name for each.
const ARCHITECTURES: &[(&str, &str)] = &[
    ("mixtral", "mixtral"),
    ("deepseek moe", "deepseek"),
    ("qwen moe", "qwen2_moe"),
    ("qwen3 moe", "qwen3_moe"),
];

pub(super) struct Moe {
    experts: Vec<Expert>,
    shared: Option<Expert>,
    gate: Option<(String, Span)>,
    /// The script's architecture, and the YAML place it came from.
    architecture: Option<(&'static str, Span)>,
    experts_per_token: Option<Expr>,
    /// The `experts` key: where problems of the whole mixture are shown.
    span: Span,
}

struct Expert {
    model: RefAt,
    /// The block's entries: prompts, noise and residual scales.
    entries: Vec<Expr>,
    /// The prompts as written, to compare experts as mergekit does.
    prompts: (Vec<String>, Vec<String>),
}

/// Whether a document is a mergekit-moe config: it lists `experts` and has no `merge_method`.
pub(super) fn is_moe(node: &Node) -> bool {
    let Value::Map(entries) = &node.value else {
        return false;
    };
    let has = |k: &str| entries.iter().any(|(key, _)| key.as_str() == Some(k));
    has("experts") && !has("merge_method")
}

impl Translator<'_> {
    /// A mergekit-moe document: a `moe(...)` of the base and the experts.
    pub(super) fn moe_doc<'n>(&mut self, node: &'n Node, multi: bool) -> Doc<'n> {
        let mut doc = Doc::new(node.span);
        if multi {
            self.err(
                Code::E0603,
                "a mergekit-moe config cannot be one document of several",
                first_line(node),
                "a mergekit-moe config",
            )
            .help
            .push("mergekit-multi runs mergekit-yaml configs only: put the mixture of experts in a file of its own".into());
        }
        let mut moe = Moe {
            experts: Vec::new(),
            shared: None,
            gate: None,
            architecture: None,
            experts_per_token: None,
            span: first_line(node),
        };
        let mut arch: Option<(String, Span)> = None;
        let mut shared: Vec<Expert> = Vec::new();
        for (key, kspan, v) in self.entries(node, MOE_KEYS, "a mergekit-moe configuration") {
            match key {
                "base_model" => doc.base = self.reference(v),
                "experts" => {
                    moe.span = kspan;
                    moe.experts = self.experts(v, "experts");
                }
                "shared_experts" => shared = self.experts(v, "shared_experts"),
                "gate_mode" => match v.as_str() {
                    Some(s) => moe.gate = Some((s.to_string(), v.span)),
                    None => {
                        self.err(Code::E0603, "`gate_mode` must be a name", v.span, "here");
                    }
                },
                "dtype" => doc.dtype = self.dtype(v),
                "experts_per_token" => moe.experts_per_token = self.number(v),
                "architecture" => match v.as_str() {
                    Some(s) => arch = Some((s.to_string(), v.span)),
                    None => {
                        self.err(Code::E0603, "`architecture` must be a name", v.span, "here");
                    }
                },
                _ => {}
            }
        }
        if doc.base.is_none() && !self.diags.has_errors() {
            self.err(
                Code::E0603,
                "the mergekit-moe config has no `base_model`",
                first_line(node),
                "in this config",
            )
            .help
            .push("add `base_model:`: it gives the attention, norms and embeddings".into());
        }
        if moe.experts.is_empty() && !self.diags.has_errors() {
            self.err(Code::E0603, "`experts` is empty", moe.span, "no experts");
        }
        if shared.len() > 1 {
            self.err(
                Code::E0701,
                format!(
                    "{} shared experts: no mixture-of-experts architecture takes more than one",
                    shared.len()
                ),
                first_line_of(shared[1].model.span),
                "second shared expert",
            );
        }
        moe.shared = shared.into_iter().next();
        moe.architecture = arch.and_then(|(a, span)| self.architecture(&a, span, moe.shared.is_some()));
        self.moe_prompts_checked(&moe);
        doc.body = Some(Body::Moe(Box::new(moe)));
        doc
    }

    fn experts(&mut self, v: &Node, key: &str) -> Vec<Expert> {
        let Value::Seq(items) = &v.value else {
            if v.value != Value::Null {
                self.err(
                    Code::E0603,
                    format!("`{key}` must be a list, found {}", v.describe()),
                    v.span,
                    "expected `- source_model: ...` items",
                );
            }
            return Vec::new();
        };
        items.iter().filter_map(|item| self.expert(item)).collect()
    }

    fn expert(&mut self, item: &Node) -> Option<Expert> {
        let mut model = None;
        let mut entries = Vec::new();
        let mut prompts: (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
        for (key, _, v) in self.entries(item, EXPERT_KEYS, "an expert") {
            match key {
                "source_model" => model = self.reference(v),
                "positive_prompts" | "negative_prompts" => {
                    // Null or empty: no prompts, as mergekit reads it.
                    let Some((value, texts)) = self.prompts(v).filter(|(_, t)| !t.is_empty()) else {
                        continue;
                    };
                    if key == "positive_prompts" {
                        entries.push(Expr::named("positive", value));
                        prompts.0 = texts;
                    } else {
                        entries.push(Expr::named("negative", value));
                        prompts.1 = texts;
                    }
                }
                _ if v.value == Value::Null => {}
                _ => {
                    if let Some(x) = self.number(v) {
                        entries.push(Expr::named(key, x));
                    }
                }
            }
        }
        if model.is_none() && matches!(item.value, Value::Map(_)) && !self.diags.has_errors() {
            self.err(
                Code::E0603,
                "an expert needs `source_model`",
                first_line(item),
                "no model here",
            );
        }
        Some(Expert {
            model: model?,
            entries,
            prompts,
        })
    }

    /// Prompts: a list of strings, or one string (one prompt).
    fn prompts(&mut self, v: &Node) -> Option<(Expr, Vec<String>)> {
        match &v.value {
            Value::Null => None,
            Value::Str(s) => Some((Expr::atom(quote(s)).at(v.span), vec![s.clone()])),
            Value::Seq(items) => {
                let mut texts = Vec::new();
                for i in items {
                    match i.as_str() {
                        Some(s) => texts.push(s.to_string()),
                        None => {
                            self.err(
                                Code::E0603,
                                format!("a prompt must be a string, found {}", i.describe()),
                                i.span,
                                "not a string",
                            )
                            .help
                            .push("quote it: `- \"...\"`".into());
                            return None;
                        }
                    }
                }
                let list = Expr::List(texts.iter().map(|t| Expr::atom(quote(t))).collect());
                Some((list.at(v.span), texts))
            }
            _ => {
                self.err(
                    Code::E0603,
                    format!("prompts must be a list of strings, found {}", v.describe()),
                    v.span,
                    "here",
                );
                None
            }
        }
    }

    /// mergekit-moe's `architecture`: a prefix of an output architecture's name; the script's
    /// name when it picks one mergec builds.
    fn architecture(&mut self, name: &str, span: Span, has_shared: bool) -> Option<(&'static str, Span)> {
        let prefix = name.to_lowercase();
        let fits: Vec<&(&str, &str)> = ARCHITECTURES
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .collect();
        let built: Vec<&str> = fits.iter().map(|(_, s)| *s).collect();
        match (fits.len(), built.as_slice()) {
            (0, _) => {
                self.err(
                    Code::E0701,
                    format!("no output architecture's name starts with `{name}`"),
                    span,
                    "not an output architecture",
                )
                .help
                .push(
                    "mergekit-moe builds `mixtral`, `deepseek`, `qwen` (Qwen2-MoE) and `qwen3` (Qwen3-MoE)"
                        .into(),
                );
                None
            }
            // Every architecture: as if none were named.
            (n, _) if n == ARCHITECTURES.len() => None,
            (_, [one]) => Some((one, span)),
            // `qwen`: Qwen2-MoE takes exactly one shared expert, Qwen3-MoE none.
            _ if prefix.starts_with("qwen") => {
                Some((if has_shared { "qwen2_moe" } else { "qwen3_moe" }, span))
            }
            _ => None,
        }
    }

    /// mergekit-moe refuses experts without positive prompts, and experts that all have the
    /// same prompts, for every gate but `random`; the script checks them only for the gates
    /// that read prompts, so `uniform_random` is checked here.
    fn moe_prompts_checked(&mut self, moe: &Moe) {
        let Some((gate, span)) = &moe.gate else {
            return;
        };
        if gate != "uniform_random" {
            return;
        }
        for (i, e) in moe.experts.iter().enumerate() {
            if e.prompts.0.is_empty() {
                self.err(
                    Code::E0702,
                    format!("expert {i} has no positive prompts"),
                    e.model.span,
                    "no `positive_prompts`",
                )
                .help
                .push("mergekit-moe refuses experts without prompts for every gate but `random`: give each expert `positive_prompts`, or use `gate_mode: random`".into());
            }
        }
        if moe.experts.len() > 1
            && moe.experts.iter().all(|e| !e.prompts.0.is_empty())
            && moe.experts.iter().all(|e| e.prompts == moe.experts[0].prompts)
        {
            self.err(
                Code::E0702,
                "every expert has the same prompts",
                *span,
                "mergekit-moe refuses this for every gate but `random`",
            )
            .help
            .push("give each expert prompts of what it should get".into());
        }
    }

    /// `moe(base, expert { ... }, ..., settings)`.
    pub(super) fn moe_expr(&self, doc: &Doc, moe: &Moe, idents: &[String]) -> Expr {
        let Some(base) = doc.base else {
            return Expr::atom("");
        };
        let member = |e: &Expert| {
            let name = Expr::atom(self.ref_name(e.model.r, idents)).at(e.model.span);
            if e.entries.is_empty() {
                name
            } else {
                Expr::Block(Box::new(name), e.entries.clone())
            }
        };
        let mut args = vec![Expr::atom(self.ref_name(base.r, idents)).at(base.span)];
        args.extend(moe.experts.iter().map(member));
        if let Some(s) = &moe.shared {
            args.push(Expr::named("shared", member(s)));
        }
        if let Some((g, span)) = &moe.gate {
            args.push(Expr::named("gate", Expr::atom(quote(g)).at(*span)));
        }
        if let Some((a, span)) = moe.architecture {
            args.push(Expr::named("architecture", Expr::atom(quote(a)).at(span)));
        }
        if let Some(k) = &moe.experts_per_token {
            args.push(Expr::named("experts_per_token", k.clone()));
        }
        // mergekit-moe checks nothing more for the `random` gate, same experts included.
        let random = moe.gate.as_ref().is_some_and(|(g, _)| g == "random");
        let all_same = moe.experts.iter().all(|e| e.model.r == moe.experts[0].model.r);
        if self.opts.allow_same_experts || (random && all_same) {
            args.push(Expr::named("allow_same_experts", Expr::atom("true")));
        }
        Expr::Call("moe".into(), args).at(moe.span)
    }
}
