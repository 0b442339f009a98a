//! `moe(base, expert { positive: [...] }, ...; gate: "hidden")`: a mixture of experts
//! built from dense models (mergekit-moe's job), checked like every other expression.
//!
//! Attention, norms and embeddings come from `base`; each expert's MLP becomes one routed
//! expert; the routers are computed at run time from the prompts (see `exec::moe`).

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use serde_json::Value as Json;

use super::hir::{ExpertLayout, GateMode, Generate, MoeArch, MoeExpert, MoeOutput};
use super::value::{MExpr, ModelVal, MoeExpr, MoeMember, MoeSource, TensorSig, Value};
use super::{names, union_inputs, wrong_type, Checker};
use crate::diag::{Code, Diagnostic};
use crate::io::tokenizer::{self, MAX_PROMPT_TOKENS};
use crate::source::Span;
use crate::syntax::ast::{Arg, Expr, ExprKind, Named};

const NAMED: &[&str] = &[
    "gate",
    "architecture",
    "experts_per_token",
    "shared",
    "layout",
    "allow_same_experts",
];
const MEMBER_KEYS: &[&str] = &["positive", "negative", "noise_scale", "residual_scale"];
const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
const EXAMPLE: &str = "moe(base, coder { positive: [\"def f(x):\"] }, writer { positive: [\"Once upon a time\"] }, gate: \"hidden\")";

/// A model argument of `moe` with its `{ ... }` settings.
struct Member {
    model: ModelVal,
    span: Span,
    positive: Vec<String>,
    negative: Vec<String>,
    /// Where each prompt is written: the positive ones, then the negative ones.
    prompt_spans: Vec<Span>,
    noise_scale: f64,
    residual_scale: f64,
    /// Whether a `{ ... }` block was given.
    has_block: Option<Span>,
}

/// The MLP of one member: intermediate size and its layer count.
struct MlpShape {
    intermediate: usize,
}

fn mlp_name(layer: usize, proj: &str) -> String {
    format!("model.layers.{layer}.mlp.{proj}.weight")
}

fn is_mlp_projection(name: &str) -> bool {
    names::layer_in(name, "model.layers.").is_some()
        && PROJECTIONS
            .iter()
            .any(|p| name.ends_with(&format!(".mlp.{p}.weight")))
}

fn model_type(checker: &Checker, m: &ModelVal) -> Option<String> {
    let id = m.inputs.first()?;
    let config = checker.models.get(id.0 as usize)?.info.config.as_ref()?;
    let text = match config.get("text_config") {
        Some(Json::Object(t)) if !config.contains_key("model_type") => t,
        _ => config,
    };
    text.get("model_type").and_then(Json::as_str).map(str::to_string)
}

impl Checker<'_> {
    pub(super) fn moe(&mut self, args: &[Arg], span: Span) -> Value {
        let mut members: Vec<Member> = Vec::new();
        let mut named: BTreeMap<&str, &Named> = BTreeMap::new();
        let mut seen: HashMap<&str, Span> = HashMap::new();
        let mut failed = false;
        for arg in args {
            match arg {
                Arg::Positional(e) => match self.moe_member(e) {
                    Some(m) => members.push(m),
                    None => failed = true,
                },
                Arg::Named(n) => {
                    let key = n.name.name.as_str();
                    if let Some(first) = seen.insert(key, n.name.span) {
                        failed = true;
                        self.diags.push(
                            Diagnostic::error(Code::E0207, format!("argument `{key}` is given twice"))
                                .at(n.name.span, "given again here")
                                .with_label(first, "first given here"),
                        );
                        continue;
                    }
                    match NAMED.iter().find(|k| **k == key) {
                        Some(k) => {
                            named.insert(k, n);
                        }
                        None => {
                            failed = true;
                            let mut d =
                                Diagnostic::error(Code::E0204, format!("`moe` has no parameter `{key}`"))
                                    .at(n.name.span, "unknown parameter");
                            d = match names::did_you_mean(key, NAMED.iter().copied()) {
                                Some(s) => d.with_help(format!("did you mean `{s}`?")),
                                None => d.with_help(format!("`moe` takes: {}", NAMED.join(", "))),
                            };
                            self.diags.push(d);
                        }
                    }
                }
            }
        }
        let shared = match named.get("shared") {
            Some(n) => match self.moe_member(&n.value) {
                Some(m) => Some(m),
                None => return Value::Error,
            },
            None => None,
        };
        let gate = match named.get("gate") {
            Some(n) => self.moe_choice(n, "gate", &GateMode::NAMES, GateMode::from_name),
            None => Some(GateMode::Hidden),
        };
        let layout = match named.get("layout") {
            Some(n) => self.moe_choice(n, "layout", &["fused", "per_expert"], |s| match s {
                "fused" => Some(ExpertLayout::Fused),
                "per_expert" => Some(ExpertLayout::PerExpert),
                _ => None,
            }),
            None => Some(ExpertLayout::Fused),
        };
        let arch_names: Vec<&str> = MoeArch::ALL.iter().map(|a| a.name()).collect();
        let arch = match named.get("architecture") {
            Some(n) => self
                .moe_choice(n, "architecture", &arch_names, |s| {
                    MoeArch::ALL.into_iter().find(|a| a.name() == s)
                })
                .map(|a| Some((a, n.value.span))),
            None => Some(None),
        };
        let allow_same = match named.get("allow_same_experts") {
            Some(n) => match self.expr(&n.value) {
                Value::Bool(b) => Some(b),
                Value::Error => None,
                other => {
                    self.diags.push(wrong_type(
                        "`allow_same_experts` expects true or false",
                        n.value.span,
                        &other,
                    ));
                    None
                }
            },
            None => Some(false),
        };
        let (Some(gate), Some(layout), Some(arch), Some(allow_same)) = (gate, layout, arch, allow_same)
        else {
            return Value::Error;
        };
        if failed {
            return Value::Error;
        }
        if members.len() < 2 {
            return self.error(
                Diagnostic::error(
                    Code::E0206,
                    format!(
                        "`moe` takes a base model and at least one expert, but got {} model{}",
                        members.len(),
                        if members.len() == 1 { "" } else { "s" }
                    ),
                )
                .at(span, "")
                .with_help(format!("for example: `{EXAMPLE}`")),
            );
        }
        let base = members.remove(0);
        if let Some(block) = base.has_block {
            self.diags.push(
                Diagnostic::error(Code::W0003, "the base model's settings are ignored")
                    .at(
                        block,
                        "the base gives attention, norms and embeddings; it is not an expert",
                    )
                    .with_help("to route to the base's own MLP too, pass it again as an expert"),
            );
        }
        let experts_per_token = match named.get("experts_per_token") {
            Some(n) => match self.expr(&n.value) {
                Value::Param(super::params::Param::Number(k))
                    if k.fract() == 0.0 && k >= 1.0 && k <= members.len() as f64 =>
                {
                    k as usize
                }
                Value::Error => return Value::Error,
                _ => {
                    return self.error(
                        Diagnostic::error(Code::E0305, "`experts_per_token` is out of range").at(
                            n.value.span,
                            format!(
                                "must be a whole number from 1 to {} (the number of experts)",
                                members.len()
                            ),
                        ),
                    )
                }
            },
            None if members.len() < 2 => {
                return self.error(
                    Diagnostic::error(Code::E0305, "one expert cannot route two experts per token")
                        .at(span, "experts_per_token is 2 by default")
                        .with_help("add experts, or set `experts_per_token: 1`"),
                )
            }
            None => 2,
        };

        // Every member's MLP must fit the base's layers.
        let Some(layers) = base.model.layers() else {
            return self.error(
                Diagnostic::error(Code::E0302, "the base model has no transformer layers")
                    .at(base.span, "no `model.layers.N.` tensors"),
            );
        };
        let Some(hidden) = self.moe_mlp(&base, layers, None).map(|_| ()).and_then(|_| {
            base.model
                .tensors
                .get(&mlp_name(0, "gate_proj"))
                .and_then(|s| s.shape.get(1).copied())
        }) else {
            return Value::Error;
        };
        let mut routed_size: Option<(usize, Span)> = None;
        let mut ok = true;
        for m in &members {
            match self.moe_mlp(m, layers, Some(hidden)) {
                Some(shape) => {
                    match routed_size {
                        Some((size, first)) if size != shape.intermediate => {
                            ok = false;
                            self.diags.push(
                            Diagnostic::error(Code::E0303, "experts' MLP sizes differ")
                                .at(m.span, format!("intermediate size {}", shape.intermediate))
                                .with_label(first, format!("intermediate size {size}"))
                                .with_help("every routed expert has the same MLP shape; a shared expert may differ"),
                        );
                        }
                        Some(_) => {}
                        None => routed_size = Some((shape.intermediate, m.span)),
                    }
                }
                None => ok = false,
            }
        }
        let shared_size = match &shared {
            Some(s) => match self.moe_mlp(s, layers, Some(hidden)) {
                Some(shape) => Some(shape.intermediate),
                None => return Value::Error,
            },
            None => None,
        };
        let Some((intermediate, _)) = routed_size.filter(|_| ok) else {
            return Value::Error;
        };

        let shape = ShapeFit {
            gate,
            shared_is_routed_size: shared_size.is_none_or(|s| s == intermediate),
        };
        let Some((arch, refused)) = self.moe_arch(arch, &base, &members, shared.as_ref(), shape, span) else {
            return Value::Error;
        };
        // DeepSeek-MoE stores one tensor per expert (its modelling code has no fused form).
        let layout = match (arch, named.get("layout")) {
            (MoeArch::DeepSeek, Some(n)) if layout == ExpertLayout::Fused => {
                return self.error(
                    Diagnostic::error(Code::E0701, "DeepSeek-MoE has no fused expert layout")
                        .at(n.value.span, "`layout: \"fused\"`")
                        .with_help("leave `layout` out, or write `layout: \"per_expert\"`"),
                );
            }
            (MoeArch::DeepSeek, _) => ExpertLayout::PerExpert,
            _ => layout,
        };
        // Only Qwen2-MoE gates its shared expert, so only there does it need prompts.
        let gated_shared = shared.as_ref().filter(|_| arch == MoeArch::Qwen2Moe);
        if !self.moe_prompts(gate, &members, gated_shared, allow_same, span) {
            return Value::Error;
        }
        if gate.uses_prompts() && !self.moe_gate_source(gate, &base) {
            return Value::Error;
        }
        if !self.moe_prompt_lengths(gate, &base, &members, shared.as_ref()) {
            return Value::Error;
        }
        if !members.len().is_power_of_two() {
            self.diags.push(
                Diagnostic::error(
                    Code::W0004,
                    format!("{} experts is not a power of two", members.len()),
                )
                .at(span, "this mixture of experts")
                .with_note("llama.cpp and some inference servers only load power-of-two expert counts"),
            );
        }

        // The output's tensors and where each comes from.
        let mut tensors: BTreeMap<String, TensorSig> = BTreeMap::new();
        let mut sources: BTreeMap<String, MoeSource> = BTreeMap::new();
        for (name, sig) in base.model.tensors.iter() {
            if is_mlp_projection(name) {
                continue;
            }
            if name.contains(".mlp.") {
                return self.error(
                    Diagnostic::error(
                        Code::E0302,
                        format!("the base's MLP has a tensor `moe` cannot place: `{name}`"),
                    )
                    .at(base.span, "base model")
                    .with_note(
                        "experts are made of `mlp.gate_proj`, `mlp.up_proj` and `mlp.down_proj` weights only",
                    ),
                );
            }
            tensors.insert(name.clone(), sig.clone());
            sources.insert(name.clone(), MoeSource::Base);
        }
        let dtype = base
            .model
            .tensors
            .get(&mlp_name(0, "gate_proj"))
            .map(|s| s.dtype)
            .unwrap_or(crate::io::DType::F32);
        let sig = |shape: Vec<usize>| TensorSig { shape, dtype };
        let routed = members.len();
        for l in 0..layers {
            let (router, experts_prefix) = match (arch, layout) {
                (MoeArch::Mixtral, ExpertLayout::PerExpert) => (
                    format!("model.layers.{l}.block_sparse_moe.gate.weight"),
                    format!("model.layers.{l}.block_sparse_moe.experts"),
                ),
                _ => (
                    format!("model.layers.{l}.mlp.gate.weight"),
                    format!("model.layers.{l}.mlp.experts"),
                ),
            };
            tensors.insert(router.clone(), sig(vec![routed, hidden]));
            sources.insert(router, MoeSource::Generated(Generate::Router { layer: l }));
            match layout {
                ExpertLayout::Fused => {
                    let gate_up = format!("{experts_prefix}.gate_up_proj");
                    let down = format!("{experts_prefix}.down_proj");
                    tensors.insert(gate_up.clone(), sig(vec![routed, 2 * intermediate, hidden]));
                    tensors.insert(down.clone(), sig(vec![routed, hidden, intermediate]));
                    let gate_up_parts = (0..routed)
                        .flat_map(|e| {
                            [
                                (e, mlp_name(l, "gate_proj"), vec![intermediate, hidden]),
                                (e, mlp_name(l, "up_proj"), vec![intermediate, hidden]),
                            ]
                        })
                        .collect();
                    let down_parts = (0..routed)
                        .map(|e| (e, mlp_name(l, "down_proj"), vec![hidden, intermediate]))
                        .collect();
                    sources.insert(gate_up, MoeSource::Parts(gate_up_parts));
                    sources.insert(down, MoeSource::Parts(down_parts));
                }
                ExpertLayout::PerExpert => {
                    for e in 0..routed {
                        for proj in PROJECTIONS {
                            let out_name = match arch {
                                MoeArch::Mixtral => {
                                    let w = match proj {
                                        "gate_proj" => "w1",
                                        "down_proj" => "w2",
                                        _ => "w3",
                                    };
                                    format!("{experts_prefix}.{e}.{w}.weight")
                                }
                                _ => format!("{experts_prefix}.{e}.{proj}.weight"),
                            };
                            let shape = match proj {
                                "down_proj" => vec![hidden, intermediate],
                                _ => vec![intermediate, hidden],
                            };
                            tensors.insert(out_name.clone(), sig(shape));
                            sources.insert(
                                out_name,
                                MoeSource::Member {
                                    member: e,
                                    name: mlp_name(l, proj),
                                },
                            );
                        }
                    }
                }
            }
            if let Some(size) = shared_size {
                let shared_prefix = match arch {
                    MoeArch::DeepSeek => "shared_experts",
                    _ => "shared_expert",
                };
                for proj in PROJECTIONS {
                    let out_name = format!("model.layers.{l}.mlp.{shared_prefix}.{proj}.weight");
                    let shape = match proj {
                        "down_proj" => vec![hidden, size],
                        _ => vec![size, hidden],
                    };
                    tensors.insert(out_name.clone(), sig(shape));
                    sources.insert(
                        out_name,
                        MoeSource::Member {
                            member: routed,
                            name: mlp_name(l, proj),
                        },
                    );
                }
                if arch == MoeArch::Qwen2Moe {
                    let gate = format!("model.layers.{l}.mlp.shared_expert_gate.weight");
                    tensors.insert(gate.clone(), sig(vec![1, hidden]));
                    sources.insert(gate, MoeSource::Generated(Generate::SharedRouter { layer: l }));
                }
            }
            if arch == MoeArch::Qwen2Moe {
                // Qwen2-MoE's attention has q/k/v biases; a Llama base has none: zeros.
                for p in ["q_proj", "k_proj", "v_proj"] {
                    let bias = format!("model.layers.{l}.self_attn.{p}.bias");
                    if tensors.contains_key(&bias) {
                        continue;
                    }
                    let weight = format!("model.layers.{l}.self_attn.{p}.weight");
                    if let Some(rows) = base.model.tensors.get(&weight).and_then(|s| s.shape.first()) {
                        tensors.insert(bias.clone(), sig(vec![*rows]));
                        sources.insert(bias, MoeSource::Generated(Generate::Zeros));
                    }
                }
            }
        }

        let expert_of = |m: &Member| MoeExpert {
            label: self.source_text(m.span),
            positive: m.positive.clone(),
            negative: m.negative.clone(),
        };
        let spec = MoeOutput {
            arch,
            gate,
            layout,
            base: base
                .model
                .inputs
                .first()
                .copied()
                .unwrap_or(super::hir::ModelId(0)),
            experts: members.iter().map(expert_of).collect(),
            shared: shared.as_ref().map(expert_of),
            experts_per_token,
            num_layers: layers,
            hidden_size: hidden,
            intermediate_size: intermediate,
            shared_intermediate_size: shared_size,
            refused,
            seed: self.seed,
            assembled: Vec::new(),
            generated: Vec::new(),
        };
        let all: Vec<&Member> = std::iter::once(&base)
            .chain(&members)
            .chain(shared.as_ref())
            .collect();
        let inputs = union_inputs(all.iter().flat_map(|m| m.model.inputs.iter()));
        let moe = MoeExpr {
            base: Rc::clone(&base.model.expr),
            members: members
                .iter()
                .chain(shared.as_ref())
                .map(|m| MoeMember {
                    expr: Rc::clone(&m.model.expr),
                    noise_scale: m.noise_scale,
                    residual_scale: m.residual_scale,
                })
                .collect(),
            sources,
            spec,
            span,
        };
        Value::Model(ModelVal {
            expr: Rc::new(MExpr::Moe(Box::new(moe))),
            tensors: Rc::new(tensors),
            layer_sources: Rc::clone(&base.model.layer_sources),
            span,
            inputs,
            params: Vec::new(),
        })
    }

    /// How the script spells `span` (an expert's model, for messages and the model card).
    fn source_text(&self, span: Span) -> String {
        self.script_text
            .get(span.start as usize..span.end as usize)
            .map(|s| s.split('{').next().unwrap_or(s).trim().to_string())
            .unwrap_or_default()
    }

    /// One model argument: `m` or `m { positive: [...], negative: [...], noise_scale: x,
    /// residual_scale: y }`.
    fn moe_member(&mut self, e: &Expr) -> Option<Member> {
        let (target, params): (&Expr, &[Named]) = match &e.kind {
            ExprKind::Params { target, params } => (target, params),
            _ => (e, &[]),
        };
        let model = match self.expr(target) {
            Value::Model(m) => self.no_params(m),
            Value::Error => return None,
            other => {
                self.diags.push(
                    wrong_type(
                        format!("`moe` takes models, found {}", other.describe()),
                        target.span,
                        &other,
                    )
                    .with_help(format!("for example: `{EXAMPLE}`")),
                );
                return None;
            }
        };
        let mut member = Member {
            model,
            span: target.span,
            positive: Vec::new(),
            negative: Vec::new(),
            prompt_spans: Vec::new(),
            noise_scale: 0.0,
            residual_scale: 1.0,
            has_block: (!params.is_empty()).then(|| {
                params
                    .iter()
                    .fold(params[0].name.span, |s, p| s.join(p.value.span))
            }),
        };
        let mut ok = true;
        for p in params {
            match p.name.name.as_str() {
                "positive" => member.positive = self.strings(&p.value)?,
                "negative" => member.negative = self.strings(&p.value)?,
                // Spans follow below, once both lists are known.
                key @ ("noise_scale" | "residual_scale") => {
                    let value = match self.expr(&p.value) {
                        Value::Param(super::params::Param::Number(x)) => x,
                        Value::Error => return None,
                        other => {
                            self.diags.push(wrong_type(
                                format!("`{key}` expects a number"),
                                p.value.span,
                                &other,
                            ));
                            ok = false;
                            continue;
                        }
                    };
                    if !value.is_finite() || (key == "noise_scale" && value < 0.0) {
                        self.diags.push(
                            Diagnostic::error(Code::E0305, format!("`{key}` is out of range"))
                                .at(p.value.span, "must be a finite number (noise_scale: 0 or more)"),
                        );
                        ok = false;
                    }
                    if key == "noise_scale" {
                        member.noise_scale = value;
                    } else {
                        member.residual_scale = value;
                    }
                }
                other => {
                    ok = false;
                    let mut d = Diagnostic::error(Code::E0204, format!("an expert has no setting `{other}`"))
                        .at(p.name.span, "unknown setting");
                    d = match names::did_you_mean(other, MEMBER_KEYS.iter().copied()) {
                        Some(s) => d.with_help(format!("did you mean `{s}`?")),
                        None => d.with_help(format!("an expert takes: {}", MEMBER_KEYS.join(", "))),
                    };
                    self.diags.push(d);
                }
            }
        }
        // As `strings` reads them, the last of a repeated key winning.
        let spans_of = |key: &str| -> Vec<Span> {
            match params.iter().rev().find(|p| p.name.name == key) {
                Some(p) => match &p.value.kind {
                    ExprKind::List(items) => items.iter().map(|i| i.span).collect(),
                    _ => vec![p.value.span],
                },
                None => Vec::new(),
            }
        };
        member.prompt_spans = spans_of("positive");
        member.prompt_spans.extend(spans_of("negative"));
        ok.then_some(member)
    }

    /// A list of strings (or one string).
    fn strings(&mut self, e: &Expr) -> Option<Vec<String>> {
        let items: Vec<&Expr> = match &e.kind {
            ExprKind::List(items) => items.iter().collect(),
            _ => vec![e],
        };
        let mut out = Vec::new();
        for item in items {
            match &item.kind {
                ExprKind::Str(s) => out.push(s.clone()),
                _ => {
                    let found = self.expr(item);
                    self.diags.push(
                        wrong_type("prompts are strings", item.span, &found)
                            .with_help("for example: `positive: [\"Write a poem\", \"Tell me a story\"]`"),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    /// A string argument that must be one of `choices`.
    fn moe_choice<T>(
        &mut self,
        n: &Named,
        what: &str,
        choices: &[&str],
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let ExprKind::Str(text) = &n.value.kind else {
            let found = self.expr(&n.value);
            self.diags.push(
                wrong_type(format!("`{what}` expects a string"), n.value.span, &found)
                    .with_help(format!("one of: {}", choices.join(", "))),
            );
            return None;
        };
        if let Some(v) = parse(text) {
            return Some(v);
        }
        let article = if what.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        let mut d = Diagnostic::error(Code::E0305, format!("unknown {what} `{text}`"))
            .at(n.value.span, format!("not {article} {what}"));
        d = match names::did_you_mean(text, choices.iter().copied()) {
            Some(s) => d.with_help(format!("did you mean \"{s}\"?")),
            None => d.with_help(format!("one of: {}", choices.join(", "))),
        };
        self.diags.push(d);
        None
    }

    /// Checks that `m` has Llama-style MLP weights in every layer of the base (`hidden`
    /// columns when given); returns its intermediate size.
    fn moe_mlp(&mut self, m: &Member, layers: usize, hidden: Option<usize>) -> Option<MlpShape> {
        if m.model.layers() != Some(layers) {
            self.diags.push(
                Diagnostic::error(Code::E0302, "an expert's layer count differs from the base's")
                    .at(m.span, format!("{} layers", m.model.layers().unwrap_or(0)))
                    .with_note(format!(
                        "the base has {layers} layers; every expert needs the same"
                    )),
            );
            return None;
        }
        let get = |name: &str| m.model.tensors.get(name).map(|s| s.shape.clone());
        let Some(first) = get(&mlp_name(0, "gate_proj")).filter(|s| s.len() == 2) else {
            self.diags.push(
                Diagnostic::error(Code::E0302, "no Llama-style MLP weights")
                    .at(m.span, format!("no `{}`", mlp_name(0, "gate_proj")))
                    .with_note("`moe` builds experts from `model.layers.N.mlp.{gate,up,down}_proj.weight` (Llama, Mistral, Qwen2, Qwen3)"),
            );
            return None;
        };
        let (intermediate, h) = (first[0], first[1]);
        let hidden = hidden.unwrap_or(h);
        for l in 0..layers {
            for proj in PROJECTIONS {
                let name = mlp_name(l, proj);
                let want = match proj {
                    "down_proj" => vec![hidden, intermediate],
                    _ => vec![intermediate, hidden],
                };
                match get(&name) {
                    Some(shape) if shape == want => {}
                    Some(shape) => {
                        self.diags.push(
                            Diagnostic::error(
                                Code::E0303,
                                format!("`{name}` has shape {shape:?}, expected {want:?}"),
                            )
                            .at(m.span, "this model")
                            .with_note(format!("the base's hidden size is {hidden}")),
                        );
                        return None;
                    }
                    None => {
                        self.diags.push(
                            Diagnostic::error(Code::E0302, format!("missing tensor `{name}`"))
                                .at(m.span, "this model"),
                        );
                        return None;
                    }
                }
            }
        }
        Some(MlpShape { intermediate })
    }

    /// The output architecture: the one asked for if the models fit it, else mergekit's
    /// choice (Mixtral when it fits, then Qwen2-MoE, then Qwen3-MoE).
    fn moe_arch(
        &mut self,
        asked: Option<(MoeArch, Span)>,
        base: &Member,
        members: &[Member],
        shared: Option<&Member>,
        shape: ShapeFit,
        span: Span,
    ) -> Option<(MoeArch, Vec<(MoeArch, String)>)> {
        let mut types: Vec<(String, Span)> = Vec::new();
        for m in std::iter::once(base).chain(members).chain(shared) {
            match model_type(self, &m.model) {
                Some(t) => types.push((t, m.span)),
                None => {
                    self.diags.push(
                        Diagnostic::error(Code::E0404, "the model has no `model_type` in config.json")
                            .at(m.span, "this model")
                            .with_note("the output architecture is chosen from the inputs' model_type"),
                    );
                    return None;
                }
            }
        }
        if let Some((odd, odd_span)) = types.iter().find(|(t, _)| *t != types[0].0) {
            self.diags.push(
                Diagnostic::error(
                    Code::E0701,
                    "the models of a mixture of experts must share one architecture",
                )
                .at(*odd_span, format!("model_type `{odd}`"))
                .with_label(types[0].1, format!("model_type `{}`", types[0].0)),
            );
            return None;
        }
        let kind = types[0].0.as_str();
        let fits = |a: MoeArch| -> Result<(), String> {
            match a {
                MoeArch::Mixtral if shared.is_some() => Err("Mixtral has no shared expert".into()),
                MoeArch::Mixtral if !matches!(kind, "llama" | "mistral") => Err(format!(
                    "Mixtral is built from llama or mistral models, not {kind}"
                )),
                MoeArch::DeepSeek
                    if shared.is_some_and(|s| !s.positive.is_empty() || !s.negative.is_empty()) =>
                {
                    Err("DeepSeek-MoE does not gate its shared expert, so it takes no prompts".into())
                }
                MoeArch::DeepSeek if !shape.shared_is_routed_size => {
                    Err("DeepSeek-MoE's shared expert has the routed experts' MLP size".into())
                }
                MoeArch::DeepSeek if !matches!(kind, "llama" | "mistral") => Err(format!(
                    "DeepSeek-MoE is built from llama or mistral models, not {kind}"
                )),
                MoeArch::Qwen2Moe if shared.is_none() => {
                    Err("Qwen2-MoE needs exactly one shared expert (`shared: m { positive: [...] }`)".into())
                }
                MoeArch::Qwen2Moe
                    if shape.gate.uses_prompts() && shared.is_some_and(|s| s.positive.is_empty()) =>
                {
                    Err("Qwen2-MoE gates its shared expert by prompts: give it `positive: [...]`".into())
                }
                MoeArch::Qwen2Moe if !matches!(kind, "llama" | "mistral" | "qwen2") => Err(format!(
                    "Qwen2-MoE is built from llama, mistral or qwen2 models, not {kind}"
                )),
                MoeArch::Qwen3Moe if shared.is_some() => Err("Qwen3-MoE has no shared expert".into()),
                MoeArch::Qwen3Moe if kind != "qwen3" => {
                    Err(format!("Qwen3-MoE is built from qwen3 models, not {kind}"))
                }
                _ => Ok(()),
            }
        };
        // Why each other architecture cannot hold these models (`mergec check` says).
        let refused: Vec<(MoeArch, String)> = MoeArch::ALL
            .into_iter()
            .filter_map(|a| fits(a).err().map(|why| (a, why)))
            .collect();
        if let Some((a, asked_span)) = asked {
            return match fits(a) {
                Ok(()) => Some((a, refused)),
                Err(why) => {
                    self.diags.push(
                        Diagnostic::error(
                            Code::E0701,
                            format!("cannot build {} from these models", a.name()),
                        )
                        .at(asked_span, why)
                        .with_label(base.span, format!("model_type `{kind}`")),
                    );
                    None
                }
            };
        }
        if let Some(a) = MoeArch::ALL.into_iter().find(|a| fits(*a).is_ok()) {
            return Some((a, refused));
        }
        let reasons: Vec<String> = refused
            .iter()
            .map(|(a, why)| format!("{}: {why}", a.name()))
            .collect();
        self.diags.push(
            Diagnostic::error(
                Code::E0701,
                format!("no mixture-of-experts architecture takes {kind} models like this"),
            )
            .at(span, "this mixture of experts")
            .with_note(reasons.join("\n")),
        );
        None
    }

    /// mergekit's refusals: prompts missing where the gate needs them, the same prompts
    /// for every expert, every expert the same model.
    fn moe_prompts(
        &mut self,
        gate: GateMode,
        members: &[Member],
        shared: Option<&Member>,
        allow_same: bool,
        span: Span,
    ) -> bool {
        if gate.uses_prompts() {
            let mut ok = true;
            for m in members.iter().chain(shared) {
                if m.positive.is_empty() {
                    ok = false;
                    self.diags.push(
                        Diagnostic::error(Code::E0702, "this expert has no positive prompts")
                            .at(m.span, "no `positive: [...]`")
                            .with_help(format!(
                                "the `{}` gate routes by prompts: give each expert examples of what it should get, e.g. `m {{ positive: [\"Write a poem\"] }}`; or use gate: \"random\"",
                                gate.name()
                            )),
                    );
                }
            }
            if !ok {
                return false;
            }
            let prompts = |m: &Member| (m.positive.clone(), m.negative.clone());
            if members.len() > 1 && members.iter().all(|m| prompts(m) == prompts(&members[0])) {
                let mut d = Diagnostic::error(Code::E0702, "every expert has the same prompts")
                    .at(span, "the router could not tell the experts apart");
                for m in members {
                    d = d.with_label(m.span, "same prompts");
                }
                self.diags
                    .push(d.with_help("give each expert prompts for what it should handle"));
                return false;
            }
        }
        let same = |a: &ModelVal, b: &ModelVal| matches!((&*a.expr, &*b.expr), (MExpr::Input(x), MExpr::Input(y)) if x == y);
        if !allow_same && members.len() > 1 && members.iter().all(|m| same(&m.model, &members[0].model)) {
            self.diags.push(
                Diagnostic::error(Code::E0703, "every expert is the same model")
                    .at(span, "this model is bigger and slower than its expert, with the same outputs")
                    .with_help("use different fine-tunes as experts, or set `allow_same_experts: true` if you will train the result"),
            );
            return false;
        }
        true
    }

    /// Refuses a routing prompt with more tokens than the gate takes. A prompt is tokenised (with the base's
    /// tokenizer) only when its length in bytes allows more tokens than the limit, so
    /// checking stays fast for the usual short prompts.
    fn moe_prompt_lengths(
        &mut self,
        gate: GateMode,
        base: &Member,
        members: &[Member],
        shared: Option<&Member>,
    ) -> bool {
        if !gate.uses_prompts() {
            return true;
        }
        let MExpr::Input(id) = &*base.model.expr else {
            return true; // refused by `moe_gate_source`
        };
        let info = Arc::clone(&self.models[id.0 as usize].info);
        let bos = tokenizer::bos_token(&info.root).unwrap_or_default();
        let limit = MAX_PROMPT_TOKENS;
        let why = format!(
            "the `{}` gate takes prompts of at most {MAX_PROMPT_TOKENS} tokens",
            gate.name()
        );
        let mut loaded: Option<Result<tokenizers::Tokenizer, String>> = None;
        let mut ok = true;
        for m in members.iter().chain(shared) {
            let prompts = m.positive.iter().chain(&m.negative);
            for (prompt, &span) in prompts.zip(&m.prompt_spans) {
                let bound = tokenizer::token_bound(&bos, prompt);
                let mut exact = false;
                let mut count = bound;
                if bound > limit {
                    let loaded =
                        loaded.get_or_insert_with(|| tokenizer::load(&info.root).map_err(|e| e.to_string()));
                    if let Ok(n) = loaded
                        .as_ref()
                        .map_err(String::clone)
                        .and_then(|t| tokenizer::count_tokens(t, &bos, prompt))
                    {
                        (count, exact) = (n, true);
                    }
                }
                if count > limit {
                    ok = false;
                    let (message, label) = if exact {
                        (
                            format!("this routing prompt has {count} tokens; at most {limit} are allowed"),
                            format!("{count} tokens"),
                        )
                    } else {
                        (
                            format!("this routing prompt may have up to {count} tokens; at most {limit} are allowed"),
                            format!("{} bytes", prompt.len()),
                        )
                    };
                    self.diags.push(
                        Diagnostic::error(Code::E0410, message)
                            .at(span, label)
                            .with_note(format!(
                                "{why}: the forward pass over a prompt costs time that grows with its length, faster than linearly"
                            ))
                            .with_help("a sentence or two typical of what the expert should handle routes as well as a long text"),
                    );
                }
            }
        }
        ok
    }

    /// The prompt gates read the base from disk: it must be an input model with a
    /// tokenizer (and, for `hidden`, a config the forward pass understands).
    fn moe_gate_source(&mut self, gate: GateMode, base: &Member) -> bool {
        let MExpr::Input(id) = &*base.model.expr else {
            self.diags.push(
                Diagnostic::error(
                    Code::E0704,
                    format!("the `{}` gate needs the base model as stored", gate.name()),
                )
                .at(base.span, "a computed model")
                .with_help(
                    "pass a declared model as the base (merge it and save it first), or use gate: \"random\"",
                ),
            );
            return false;
        };
        let info = &self.models[id.0 as usize].info;
        if !info.donor_files.iter().any(|p| p.ends_with("tokenizer.json")) {
            self.diags.push(
                Diagnostic::error(Code::E0704, format!("the `{}` gate needs the base's tokenizer.json", gate.name()))
                    .at(base.span, format!("`{}` has no tokenizer.json", info.reference))
                    .with_help("prompts are tokenised with the base model's tokenizer; add its tokenizer.json, or use gate: \"random\""),
            );
            return false;
        }
        if matches!(gate, GateMode::Hidden | GateMode::HiddenAvg) {
            if let Err(e) = crate::io::decoder_config::DecoderConfig::from_model(info) {
                self.diags.push(
                    Diagnostic::error(Code::E0704, format!("the `{}` gate cannot run the base model", gate.name()))
                        .at(base.span, e.to_string())
                        .with_help("the forward pass runs Llama, Mistral, Qwen2 and Qwen3 decoders; use gate: \"cheap_embed\" or \"random\" for others"),
                );
                return false;
            }
        }
        if !info.tensors.contains_key("model.embed_tokens.weight") {
            self.diags.push(
                Diagnostic::error(
                    Code::E0704,
                    format!("the `{}` gate needs the base's token embeddings", gate.name()),
                )
                .at(base.span, "no `model.embed_tokens.weight`"),
            );
            return false;
        }
        true
    }
}

/// What the output architecture's choice needs to know besides the models' types.
#[derive(Clone, Copy)]
struct ShapeFit {
    gate: GateMode,
    /// No shared expert, or one with the routed experts' intermediate size.
    shared_is_routed_size: bool,
}
