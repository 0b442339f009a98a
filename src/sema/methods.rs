//! The registry of merge methods: name, models taken, parameters (kind, default, range,
//! per-model or global). sema checks calls against it; spec/ops.md documents it.

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum ParamKind {
    Number,
    Bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Default {
    Required,
    Bool(bool),
}

/// Allowed values of a numeric parameter (inclusive bounds unless said otherwise).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Range {
    Any,
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
    pub name: &'static str,
    pub summary: &'static str,
    pub min_models: usize,
    pub max_models: Option<usize>,
    pub params: &'static [ParamSpec],
}

impl MethodSig {
    pub fn param(&self, name: &str) -> Option<&'static ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }
}

pub(crate) static METHODS: &[MethodSig] = &[MethodSig {
    name: "linear",
    summary: "weighted average: Σ wᵢ·xᵢ, divided by Σ wᵢ when normalize is on",
    min_models: 1,
    max_models: None,
    params: &[
        ParamSpec {
            name: "weight",
            kind: ParamKind::Number,
            per_model: true,
            default: Default::Required,
            range: Range::Any,
            doc: "the model's weight",
        },
        ParamSpec {
            name: "normalize",
            kind: ParamKind::Bool,
            per_model: false,
            default: Default::Bool(true),
            range: Range::Any,
            doc: "divide by the sum of the weights",
        },
    ],
}];

pub(crate) fn lookup(name: &str) -> Option<&'static MethodSig> {
    METHODS.iter().find(|m| m.name == name)
}
