//! The registry of merge methods: name, models taken, base requirement, parameters (kind,
//! default, range, per-model or call-wide). sema checks calls against it; spec/ops.md
//! documents it, and a test fails when the two disagree.

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum ParamKind {
    Number,
    Integer,
    Bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Default {
    Required,
    Number(f64),
    Bool(bool),
}

/// Allowed values of a numeric parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Range {
    Any,
    /// `(0, 1]`
    Density,
    /// `[0, 1]`
    Unit,
    /// `>= 0`
    NonNegative,
    /// `> 0`
    Positive,
    /// `>= 1`
    AtLeastOne,
}

impl Range {
    pub fn contains(self, v: f64) -> bool {
        match self {
            Range::Any => v.is_finite(),
            Range::Density => v > 0.0 && v <= 1.0,
            Range::Unit => (0.0..=1.0).contains(&v),
            Range::NonNegative => v >= 0.0 && v.is_finite(),
            Range::Positive => v > 0.0 && v.is_finite(),
            Range::AtLeastOne => v >= 1.0 && v.is_finite(),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Range::Any => "any finite number",
            Range::Density => "in (0, 1]",
            Range::Unit => "in [0, 1]",
            Range::NonNegative => "at least 0",
            Range::Positive => "above 0",
            Range::AtLeastOne => "at least 1",
        }
    }
}

/// Whether a method merges relative to a base model, given as its first positional model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Base {
    /// No base: every positional model is merged.
    None,
    /// The first positional model is the base.
    Required,
    /// An optional `base: m` argument; with it, the method works on task vectors.
    Optional,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    /// Set per model (`m { weight: 0.5 }`); may also be given once for all models.
    pub per_model: bool,
    pub default: Default,
    pub range: Range,
    pub doc: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MethodSig {
    pub method: Method,
    pub name: &'static str,
    pub summary: &'static str,
    pub base: Base,
    /// Models merged, not counting the base.
    pub min_models: usize,
    pub max_models: Option<usize>,
    pub params: &'static [ParamSpec],
    /// Draws random masks (seeded by `set seed = N`).
    pub random: bool,
}

impl MethodSig {
    pub fn param(&self, name: &str) -> Option<&'static ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }
}

const fn p(
    name: &'static str,
    kind: ParamKind,
    per_model: bool,
    default: Default,
    range: Range,
    doc: &'static str,
) -> ParamSpec {
    ParamSpec {
        name,
        kind,
        per_model,
        default,
        range,
        doc,
    }
}

use self::Default::{Bool as B, Number as N, Required as Req};
use crate::ops::{GtaKind, Method};
use ParamKind::{Bool, Integer, Number};

const WEIGHT: ParamSpec = p("weight", Number, true, Req, Range::Any, "the model's weight");
const DENSITY: ParamSpec = p(
    "density",
    Number,
    true,
    N(1.0),
    Range::Density,
    "fraction of the task vector kept",
);
const GAMMA: ParamSpec = p(
    "gamma",
    Number,
    true,
    N(0.01),
    Range::Unit,
    "fraction of the largest differences removed",
);
const EPSILON_DELLA: ParamSpec = p(
    "epsilon",
    Number,
    true,
    N(0.15),
    Range::NonNegative,
    "spread of keep probabilities around the density",
);
const LAMBDA: ParamSpec = p(
    "lambda",
    Number,
    false,
    N(1.0),
    Range::Any,
    "scale of the merged task vector",
);
const INT8_MASK: ParamSpec = p(
    "int8_mask",
    Bool,
    false,
    B(false),
    Range::Any,
    "accepted for mergekit compatibility; masks are always exact, so it changes nothing",
);
const fn normalize(default: bool) -> ParamSpec {
    p(
        "normalize",
        Bool,
        false,
        B(default),
        Range::Any,
        "divide by the sum of the weights",
    )
}
const fn rescale(default: bool) -> ParamSpec {
    p(
        "rescale",
        Bool,
        false,
        B(default),
        Range::Any,
        "restore each sparsified task vector's L1 norm",
    )
}

pub(crate) static METHODS: &[MethodSig] = &[
    MethodSig {
        method: Method::Linear,

        name: "linear",
        summary: "weighted average: Σ wᵢ·xᵢ, divided by Σ wᵢ when normalize is on",
        base: Base::None,
        min_models: 1,
        max_models: None,
        params: &[WEIGHT, normalize(true)],
        random: false,
    },
    MethodSig {
        method: Method::Slerp,

        name: "slerp",
        summary: "spherical interpolation between two models, the first at t = 0",
        base: Base::None,
        min_models: 2,
        max_models: Some(2),
        params: &[p(
            "t",
            Number,
            false,
            Req,
            Range::Any,
            "interpolation factor, 0 = first model",
        )],
        random: false,
    },
    MethodSig {
        method: Method::Nuslerp,

        name: "nuslerp",
        summary: "spherical interpolation by weights, of models or of task vectors from a base",
        base: Base::Optional,
        min_models: 2,
        max_models: Some(2),
        params: &[
            WEIGHT,
            p(
                "nuslerp_flatten",
                Bool,
                false,
                B(true),
                Range::Any,
                "treat the tensor as one vector",
            ),
            p(
                "nuslerp_row_wise",
                Bool,
                false,
                B(false),
                Range::Any,
                "interpolate along dim 0 (columns)",
            ),
        ],
        random: false,
    },
    MethodSig {
        method: Method::Multislerp,

        name: "multislerp",
        summary: "spherical barycenter of several models (one tangent-space step)",
        base: Base::Optional,
        min_models: 2,
        max_models: None,
        params: &[
            WEIGHT,
            p(
                "normalize_weights",
                Bool,
                false,
                B(true),
                Range::Any,
                "divide the weights by their sum",
            ),
            p("eps", Number, false, N(1e-8), Range::Positive, "numerical guard"),
        ],
        random: false,
    },
    MethodSig {
        method: Method::Karcher,

        name: "karcher",
        summary: "Karcher (Riemannian) mean of several models, equal weights",
        base: Base::None,
        min_models: 2,
        max_models: None,
        params: &[
            p(
                "max_iter",
                Integer,
                false,
                N(10.0),
                Range::AtLeastOne,
                "iterations at most",
            ),
            p(
                "tol",
                Number,
                false,
                N(1e-5),
                Range::Positive,
                "convergence tolerance",
            ),
        ],
        random: false,
    },
    MethodSig {
        method: Method::Gta(GtaKind::TaskArithmetic),

        name: "task_arithmetic",
        summary: "base + λ·Σ wᵢ·(xᵢ − base)",
        base: Base::Required,
        min_models: 1,
        max_models: None,
        params: &[WEIGHT, normalize(false), LAMBDA],
        random: false,
    },
    MethodSig {
        method: Method::Gta(GtaKind::Ties),

        name: "ties",
        summary: "task vectors trimmed to the largest |δ|, sign election, mean of the agreeing",
        base: Base::Required,
        min_models: 1,
        max_models: None,
        params: &[
            WEIGHT,
            DENSITY,
            normalize(true),
            rescale(false),
            LAMBDA,
            INT8_MASK,
        ],
        random: false,
    },
    MethodSig {
        method: Method::Gta(GtaKind::DareTies),

        name: "dare_ties",
        summary: "task vectors randomly dropped and L1-rescaled, then sign election",
        base: Base::Required,
        min_models: 1,
        max_models: None,
        params: &[
            WEIGHT,
            DENSITY,
            normalize(false),
            rescale(true),
            LAMBDA,
            INT8_MASK,
        ],
        random: true,
    },
    MethodSig {
        method: Method::Gta(GtaKind::DareLinear),

        name: "dare_linear",
        summary: "task vectors randomly dropped and L1-rescaled, then summed",
        base: Base::Required,
        min_models: 1,
        max_models: None,
        params: &[WEIGHT, DENSITY, normalize(false), rescale(true), LAMBDA],
        random: true,
    },
    MethodSig {
        method: Method::Gta(GtaKind::Breadcrumbs),

        name: "breadcrumbs",
        summary: "task vectors without their smallest and largest |δ|, summed",
        base: Base::Required,
        min_models: 1,
        max_models: None,
        params: &[WEIGHT, DENSITY, GAMMA, normalize(false), rescale(false), LAMBDA],
        random: false,
    },
    MethodSig {
        method: Method::Gta(GtaKind::BreadcrumbsTies),

        name: "breadcrumbs_ties",
        summary: "breadcrumbs sparsification, then sign election",
        base: Base::Required,
        min_models: 1,
        max_models: None,
        params: &[
            WEIGHT,
            DENSITY,
            GAMMA,
            normalize(false),
            rescale(false),
            LAMBDA,
            INT8_MASK,
        ],
        random: false,
    },
    MethodSig {
        method: Method::Gta(GtaKind::Della),

        name: "della",
        summary: "magnitude-ranked random drop (DELLA), L1-rescaled, then sign election",
        base: Base::Required,
        min_models: 1,
        max_models: None,
        params: &[
            WEIGHT,
            DENSITY,
            EPSILON_DELLA,
            normalize(true),
            rescale(true),
            LAMBDA,
            INT8_MASK,
        ],
        random: true,
    },
    MethodSig {
        method: Method::Gta(GtaKind::DellaLinear),

        name: "della_linear",
        summary: "magnitude-ranked random drop (DELLA), L1-rescaled, then summed",
        base: Base::Required,
        min_models: 1,
        max_models: None,
        params: &[
            WEIGHT,
            DENSITY,
            EPSILON_DELLA,
            normalize(false),
            rescale(true),
            LAMBDA,
        ],
        random: true,
    },
    MethodSig {
        method: Method::Sce,

        name: "sce",
        summary: "select high-variance elements, elect signs, weight by task-vector energy",
        base: Base::Required,
        min_models: 1,
        max_models: None,
        params: &[
            p(
                "select_topk",
                Number,
                false,
                N(1.0),
                Range::Unit,
                "fraction of elements kept by variance",
            ),
            INT8_MASK,
        ],
        random: false,
    },
    MethodSig {
        method: Method::Ram,

        name: "ram",
        summary: "per element, the mean of the task vectors above epsilon",
        base: Base::Required,
        min_models: 1,
        max_models: None,
        params: &[p(
            "epsilon",
            Number,
            false,
            N(1e-5),
            Range::NonNegative,
            "activity threshold on the absolute delta",
        )],
        random: false,
    },
    MethodSig {
        method: Method::RamPlusTl,

        name: "ramplus_tl",
        summary: "RAM with unique elements boosted by the model's overlap ratio",
        base: Base::Required,
        min_models: 1,
        max_models: None,
        params: &[
            p(
                "epsilon",
                Number,
                false,
                N(1e-5),
                Range::NonNegative,
                "activity threshold on the absolute delta",
            ),
            p("r", Number, false, N(0.1), Range::NonNegative, "boost strength"),
            p(
                "alpha",
                Number,
                false,
                N(0.2),
                Range::NonNegative,
                "cap of the overlap ratio",
            ),
        ],
        random: false,
    },
    MethodSig {
        method: Method::ModelStock,

        name: "model_stock",
        summary: "interpolate the fine-tunes' mean toward the base by their task vectors' angle",
        base: Base::Required,
        min_models: 2,
        max_models: None,
        params: &[p(
            "filter_wise",
            Bool,
            false,
            B(false),
            Range::Any,
            "one angle per row",
        )],
        random: false,
    },
    MethodSig {
        method: Method::Nearswap,

        name: "nearswap",
        summary: "take the other model where it is within t of the base",
        base: Base::Required,
        min_models: 1,
        max_models: Some(1),
        params: &[p("t", Number, false, Req, Range::Positive, "distance scale")],
        random: false,
    },
    MethodSig {
        method: Method::ArceeFusion,

        name: "arcee_fusion",
        summary: "keep the changes whose importance passes an outlier threshold",
        base: Base::Required,
        min_models: 1,
        max_models: Some(1),
        params: &[],
        random: false,
    },
    MethodSig {
        method: Method::Passthrough,

        name: "passthrough",
        summary: "one model unchanged, optionally scaled",
        base: Base::None,
        min_models: 1,
        max_models: Some(1),
        params: &[p(
            "scale",
            Number,
            true,
            N(1.0),
            Range::Any,
            "factor applied to every element",
        )],
        random: false,
    },
];

pub(crate) fn lookup(name: &str) -> Option<&'static MethodSig> {
    METHODS.iter().find(|m| m.name == name)
}

/// The registry entry of `name` as the Markdown block spec/ops.md must contain verbatim
/// (a test compares them, so the spec cannot drift from the code).
pub fn registry_markdown(name: &str) -> Option<String> {
    let sig = lookup(name)?;
    let models = match sig.max_models {
        Some(max) if max == sig.min_models => format!("exactly {max}"),
        Some(max) => format!("{} to {max}", sig.min_models),
        None => format!("at least {}", sig.min_models),
    };
    let base = match sig.base {
        Base::None => "none",
        Base::Required => "required: the first positional model",
        Base::Optional => "optional: `base: m`",
    };
    let besides = if sig.base == Base::None {
        ""
    } else {
        " (besides the base)"
    };
    let mut out = format!(
        "- models: {models}{besides}\n- base: {base}\n- random: {}\n",
        if sig.random { "yes (`set seed = N`)" } else { "no" }
    );
    if sig.params.is_empty() {
        out.push_str("- parameters: none\n");
        return Some(out);
    }
    out.push_str(
        "\n| parameter | kind | per model | default | allowed | meaning |\n|---|---|---|---|---|---|\n",
    );
    for p in sig.params {
        let kind = match p.kind {
            ParamKind::Number => "number",
            ParamKind::Integer => "integer",
            ParamKind::Bool => "bool",
        };
        let default = match p.default {
            Default::Required => "required".to_string(),
            Default::Number(v) => format!("{v}"),
            Default::Bool(b) => format!("{b}"),
        };
        let allowed = if p.kind == ParamKind::Bool {
            "true, false"
        } else {
            p.range.describe()
        };
        out.push_str(&format!(
            "| `{}` | {kind} | {} | {default} | {allowed} | {} |\n",
            p.name,
            if p.per_model { "yes" } else { "no" },
            p.doc
        ));
    }
    Some(out)
}

/// The registry's one-line summary of `method`.
pub(crate) fn summary(method: Method) -> &'static str {
    METHODS
        .iter()
        .find(|m| m.method == method)
        .map_or("", |m| m.summary)
}

/// Every method's name, in registry order.
pub fn method_names() -> impl Iterator<Item = &'static str> {
    METHODS.iter().map(|m| m.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each registry entry's handle names it, and every method has exactly one entry.
    #[test]
    fn every_method_has_one_entry_named_by_its_handle() {
        let mut handles: Vec<Method> = vec![
            Method::Linear,
            Method::Slerp,
            Method::Nuslerp,
            Method::Multislerp,
            Method::Karcher,
            Method::Sce,
            Method::Ram,
            Method::RamPlusTl,
            Method::ModelStock,
            Method::Nearswap,
            Method::ArceeFusion,
            Method::Passthrough,
        ];
        handles.extend(GtaKind::ALL.map(Method::Gta));
        for sig in METHODS {
            assert_eq!(sig.name, sig.method.name());
        }
        for h in handles {
            let entries = METHODS.iter().filter(|m| m.method == h).count();
            assert_eq!(entries, 1, "{}", h.name());
        }
    }
}
