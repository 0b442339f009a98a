//! What expressions evaluate to during checking.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::hir::ModelId;
use super::methods::MethodSig;
use super::params::Param;
use crate::io::DType;
use crate::source::Span;
use crate::syntax::ast::Ident;

#[derive(Clone, Debug)]
pub(crate) enum Value {
    Model(ModelVal),
    /// A list of models (a method's `models` argument).
    Models(Vec<ModelVal>),
    Param(Param),
    Bool(bool),
    Str,
    Size(u64),
    /// The result of an expression that already failed: it produces no further errors.
    Error,
}

impl Value {
    /// How the value is named in type errors.
    pub fn describe(&self) -> &'static str {
        match self {
            Value::Model(_) => "a model",
            Value::Models(..) => "a list of models",
            Value::Param(Param::Number(_)) => "a number",
            Value::Param(Param::Gradient(_)) => "a layer gradient",
            Value::Param(Param::Table(_)) => "a tensor table",
            Value::Bool(_) => "a boolean",
            Value::Str => "a string",
            Value::Size(_) => "a size",
            Value::Error => "an invalid value",
        }
    }
}

/// Shape and storage dtype of one tensor of a model value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TensorSig {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// A model-valued expression: its tensor set (checked) and how to compute each tensor.
#[derive(Clone, Debug)]
pub(crate) struct ModelVal {
    pub expr: Rc<MExpr>,
    pub tensors: Rc<BTreeMap<String, TensorSig>>,
    /// Where each layer comes from: (input model, its layer index), in output order.
    pub layer_sources: Rc<[(ModelId, usize)]>,
    pub span: Span,
    /// Input models read, in script order; the first donates config and tokenizer by default.
    pub inputs: Vec<ModelId>,
    /// Per-model parameters from a `{ ... }` block, consumed by the enclosing method call.
    pub params: Vec<ParamEntry>,
}

impl ModelVal {
    /// Number of transformer layers, if the model has any.
    pub fn layers(&self) -> Option<usize> {
        (!self.layer_sources.is_empty()).then_some(self.layer_sources.len())
    }
}

#[derive(Clone, Debug)]
pub(crate) struct ParamEntry {
    pub name: Ident,
    pub value: Value,
    pub span: Span,
}

/// How each tensor of a model value is computed, before per-tensor resolution.
#[derive(Debug)]
pub(crate) enum MExpr {
    Input(ModelId),
    /// Layers `start..` of `inner`, renumbered from 0 (tensors outside the layers pass through).
    Layers {
        inner: Rc<MExpr>,
        start: usize,
        /// The layer module ranged over (`model.layers.`); other tensors pass through.
        module: Rc<str>,
    },
    /// Segments' layers one after another; embeddings from `pre`, the other non-layer
    /// tensors from `post`. Each segment is its own layer-position domain (mergekit's slices).
    Stack {
        segments: Vec<Segment>,
        pre: Rc<MExpr>,
        post: Rc<MExpr>,
        /// The layer module stacked; everything else comes from `pre` or `post`.
        module: Rc<str>,
    },
    /// `onto`'s tensors, those named in `part_names` taken from `part` instead.
    Graft {
        onto: Rc<MExpr>,
        part: Rc<MExpr>,
        part_names: Rc<std::collections::BTreeSet<String>>,
    },
    /// Tensors renamed: output name -> the name `inner` has for it.
    Rename {
        inner: Rc<MExpr>,
        map: Rc<BTreeMap<String, String>>,
    },
    Neg(Rc<MExpr>),
    Add(Rc<MExpr>, Rc<MExpr>),
    Sub(Rc<MExpr>, Rc<MExpr>),
    Scale(Rc<MExpr>, Param, Span),
    Divide(Rc<MExpr>, Param, Span),
    Method(MethodCall),
    /// A mixture of experts (`moe(...)`): a model to save, not to merge further.
    Moe(Box<MoeExpr>),
    /// `inner` with a LoRA adapter applied (`lora(m, "adapter")`).
    Lora(Box<LoraExpr>),
}

#[derive(Debug)]
pub(crate) struct LoraExpr {
    pub inner: Rc<MExpr>,
    /// The adapter's weights, read as an input model.
    pub adapter: ModelId,
    /// What the adapter does to each tensor it changes, by the model's tensor name.
    pub edits: BTreeMap<String, LoraEdit>,
    /// The `scale:` argument (1 by default), and where it is written.
    pub scale: Param,
    pub scale_span: Span,
}

#[derive(Debug)]
pub(crate) enum LoraEdit {
    /// `W + scale·scaling·(B·A)` (transposed for `fan_in_fan_out` and embeddings).
    LowRank {
        a: String,
        b: String,
        rank: usize,
        /// PEFT's alpha/r (alpha/sqrt(r) with rslora) for this module.
        scaling: f64,
        transpose: bool,
        /// The model's dtype for this tensor: mergekit's merge rounds to it.
        dtype: DType,
    },
    /// The adapter's tensor of this name replaces the model's (`modules_to_save`).
    Replace { tensor: String },
}

impl MExpr {
    /// The model expressions this one is computed from.
    pub fn children(&self) -> Vec<&Rc<MExpr>> {
        match self {
            MExpr::Input(_) => Vec::new(),
            MExpr::Layers { inner, .. }
            | MExpr::Rename { inner, .. }
            | MExpr::Neg(inner)
            | MExpr::Scale(inner, ..)
            | MExpr::Divide(inner, ..) => vec![inner],
            MExpr::Stack {
                segments, pre, post, ..
            } => segments.iter().map(|s| &s.expr).chain([pre, post]).collect(),
            MExpr::Graft { onto, part, .. } => vec![onto, part],
            MExpr::Add(a, b) | MExpr::Sub(a, b) => vec![a, b],
            MExpr::Method(call) => call
                .base
                .iter()
                .chain(call.models.iter().map(|m| &m.expr))
                .collect(),
            MExpr::Moe(moe) => std::iter::once(&moe.base)
                .chain(moe.members.iter().map(|m| &m.expr))
                .collect(),
            MExpr::Lora(l) => vec![&l.inner],
        }
    }
}

#[derive(Debug)]
pub(crate) struct MoeExpr {
    pub base: Rc<MExpr>,
    /// Routed experts in order, then the shared expert when there is one.
    pub members: Vec<MoeMember>,
    /// Where each output tensor comes from.
    pub sources: BTreeMap<String, MoeSource>,
    /// Everything but the tensor lists (`assembled`, `generated`), which instantiation fills.
    pub spec: crate::sema::hir::MoeOutput,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct MoeMember {
    pub expr: Rc<MExpr>,
    pub noise_scale: f64,
    pub residual_scale: f64,
}

#[derive(Debug)]
pub(crate) enum MoeSource {
    /// The base model's tensor of this name.
    Base,
    /// `name` of member `member` (per-expert layout, or the shared expert).
    Member {
        member: usize,
        name: String,
    },
    /// Parts written one after another: (member, tensor name, its shape) each.
    Parts(Vec<(usize, String, Vec<usize>)>),
    Generated(crate::sema::hir::Generate),
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub expr: Rc<MExpr>,
    /// First output layer of this segment.
    pub offset: usize,
    pub len: usize,
}

#[derive(Debug)]
pub(crate) struct MethodCall {
    pub sig: &'static MethodSig,
    /// The base model (first positional model, or `base:` where optional).
    pub base: Option<Rc<MExpr>>,
    pub models: Vec<CallModel>,
    /// Parameters given once for the whole call (named arguments).
    pub globals: BTreeMap<&'static str, ArgValue>,
    pub span: Span,
}

#[derive(Debug)]
pub(crate) struct CallModel {
    pub expr: Rc<MExpr>,
    pub params: BTreeMap<&'static str, ArgValue>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub(crate) enum ArgValue {
    Param(Param, Span),
    Bool(bool),
}
