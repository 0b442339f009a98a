//! The checked program: every output tensor with its shape, dtype and a plain expression
//! over input tensors, every parameter already resolved to a number for that tensor.

use std::path::PathBuf;
use std::sync::Arc;

use crate::io::{DType, ModelInfo};
use crate::ops::gather::Gather;
use crate::ops::{Compute, Elementwise, Half, MethodOp};
use crate::source::Span;

pub use crate::ids::ModelId;
pub use crate::moe_spec::{
    Assembled, ExpertLayout, GateMode, Generate, Generated, MoeArch, MoeExpert, MoeOutput,
};

#[derive(Clone, Debug)]
pub struct Program {
    pub models: Vec<InputModel>,
    pub outputs: Vec<Output>,
    /// The script's text without trailing whitespace, recorded in each output's model
    /// card (shared: a script with many saves holds it once).
    pub script_text: Arc<str>,
    /// The mergekit YAML the script was translated from, if any.
    pub mergekit_config: Option<Arc<str>>,
    /// The seed of every random mask (`set seed = N`, default 0).
    pub seed: u64,
    /// The memory budget the script asks for (`set max_memory = 8GB`).
    pub max_memory: Option<u64>,
}

impl Program {
    pub fn model(&self, id: ModelId) -> &InputModel {
        &self.models[id.0 as usize]
    }
}

#[derive(Clone, Debug)]
pub struct InputModel {
    /// The name bound by `model NAME = ...`.
    pub name: String,
    pub info: Arc<ModelInfo>,
    pub span: Span,
    /// The weights of a LoRA adapter (`lora(m, "adapter")`), not a model of its own.
    pub adapter: bool,
}

#[derive(Clone, Debug)]
pub struct Output {
    /// Where the folder goes, resolved against the script's folder.
    pub dir: PathBuf,
    pub span: Span,
    pub tensors: Vec<OutputTensor>,
    pub max_shard_bytes: u64,
    /// The model whose config.json is written (with dtype and layer count updated).
    pub config_from: Option<ModelId>,
    /// The model whose tokenizer and generation files are copied.
    pub tokenizer_from: Option<ModelId>,
    /// The dtype the save asked for, if any (otherwise each tensor keeps its input dtype).
    pub dtype: Option<DType>,
    /// The arithmetic its merges compute in.
    pub compute: Compute,
    /// Number of transformer layers in the output, when it has any.
    pub layer_count: Option<usize>,
    /// Where each output layer comes from: (input model, its layer index). Per-layer lists
    /// in config.json (layer_types, ...) follow this.
    pub layer_sources: Vec<(ModelId, usize)>,
    /// The input models this output reads, in script order.
    pub inputs: Vec<ModelId>,
    /// A chat template to write (chat_template.jinja and tokenizer_config.json).
    pub chat_template: Option<String>,
    /// What the model is made with, outermost first (for the model card).
    pub methods: Vec<Construct>,
    /// Set when the output is a mixture of experts made by `moe(...)`.
    pub moe: Option<Arc<MoeOutput>>,
    /// Set when the output's vocabulary is rebuilt (`tokenizer: union | base | MODEL`, or
    /// truncated): the tokenizer.json to write and the embedding rows.
    pub vocab: Option<Arc<VocabOut>>,
}

/// An output's rebuilt vocabulary.
#[derive(Clone, Debug)]
pub struct VocabOut {
    /// tokenizer.json's text; `None` when the donor's tokenizer files are copied as they
    /// are (a truncation).
    pub tokenizer_json: Option<String>,
    /// Rows of the output's vocabulary tensors (config.json's `vocab_size`).
    pub size: usize,
    /// What `mergec check` prints: the vocabulary, then per input the tokens it lacks and
    /// where their rows come from.
    pub report: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub expr: TensorExpr,
}

impl OutputTensor {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size_bytes() as u64
    }
}

/// What a saved model is made with: a merge method or one of the language's own
/// constructs. The model card lists them with their descriptions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Construct {
    Method(crate::ops::Method),
    LayerSelection,
    Stack,
    Arithmetic,
    Graft,
    Moe,
    Lora,
}

impl Construct {
    /// As the card names it (a method by its script name).
    pub fn name(self) -> &'static str {
        match self {
            Construct::Method(m) => m.name(),
            Construct::LayerSelection => "layer selection",
            Construct::Stack => "stack",
            Construct::Arithmetic => "arithmetic",
            Construct::Graft => "graft",
            Construct::Moe => "moe",
            Construct::Lora => "lora",
        }
    }

    /// One line for the model card.
    pub fn summary(self) -> &'static str {
        match self {
            Construct::Method(m) => super::methods::summary(m),
            Construct::LayerSelection => "a range of layers",
            Construct::Stack => "the layers of several ranges one after another (depth up-scaling)",
            Construct::Arithmetic => "arithmetic on the models' tensors",
            Construct::Graft => "one model's tensors put in place of another's (a sub-module merged on its own and put back)",
            Construct::Lora => "a LoRA adapter applied to the model's weights (W + scale·(alpha/r)·B·A)",
            Construct::Moe => {
                "a mixture of experts: attention, norms and embeddings from the base, each expert's MLP from its model"
            }
        }
    }
}

/// An expression over input tensors of one shape. Computation is in f32.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorExpr {
    Load {
        model: ModelId,
        name: String,
    },
    /// An input's vocabulary tensor with its rows in the output vocabulary's order
    /// (`ops::gather`): a load whose rows come from several inputs.
    Gather(Arc<Gather>),
    /// An element-wise op over `operands` (as many as the op's arity).
    Elementwise {
        op: Elementwise,
        operands: Vec<TensorExpr>,
    },
    /// A whole-tensor merge method over `inputs`, in the order the op documents, computed
    /// in `compute`.
    Method {
        op: MethodOp,
        compute: Compute,
        inputs: Vec<TensorExpr>,
    },
}

impl std::ops::Neg for TensorExpr {
    type Output = TensorExpr;
    fn neg(self) -> TensorExpr {
        TensorExpr::op(Elementwise::Neg, vec![self])
    }
}

impl std::ops::Add for TensorExpr {
    type Output = TensorExpr;
    fn add(self, b: TensorExpr) -> TensorExpr {
        TensorExpr::op(Elementwise::Add, vec![self, b])
    }
}

impl std::ops::Sub for TensorExpr {
    type Output = TensorExpr;
    fn sub(self, b: TensorExpr) -> TensorExpr {
        TensorExpr::op(Elementwise::Sub, vec![self, b])
    }
}

/// Parameters are resolved in f64 and rounded to f32 here, once, where they enter the
/// computation.
impl TensorExpr {
    fn op(op: Elementwise, operands: Vec<TensorExpr>) -> TensorExpr {
        TensorExpr::Elementwise { op, operands }
    }

    /// `x * factor`
    pub fn scale(x: TensorExpr, factor: f64) -> TensorExpr {
        TensorExpr::op(Elementwise::Scale(factor as f32), vec![x])
    }

    /// `x / divisor`
    pub fn divide(x: TensorExpr, divisor: f64) -> TensorExpr {
        TensorExpr::op(Elementwise::Divide(divisor as f32), vec![x])
    }

    /// `(Σ weight·x) / divisor`, summed in the order given (mergekit's `linear`).
    pub fn weighted_sum(terms: Vec<(TensorExpr, f64)>, divisor: Option<f64>) -> TensorExpr {
        let (operands, weights): (Vec<TensorExpr>, Vec<f32>) =
            terms.into_iter().map(|(x, w)| (x, w as f32)).unzip();
        TensorExpr::op(
            Elementwise::WeightedSum {
                weights,
                divisor: divisor.map(|d| d as f32),
            },
            operands,
        )
    }

    /// `x` rounded to `half` (a 16-bit compute dtype's rounding after an op).
    pub fn round(x: TensorExpr, half: Half) -> TensorExpr {
        TensorExpr::op(Elementwise::Round(half), vec![x])
    }

    /// The expressions this one computes from, in operand order.
    pub fn operands(&self) -> &[TensorExpr] {
        match self {
            TensorExpr::Load { .. } | TensorExpr::Gather(_) => &[],
            TensorExpr::Elementwise { operands, .. } => operands,
            TensorExpr::Method { inputs, .. } => inputs,
        }
    }
}

/// A stable text form of the program for `mergec debug hir` and snapshots.
pub fn dump(program: &Program) -> String {
    let mut text = String::new();
    for o in &program.outputs {
        text.push_str(&format!("output {}\n", o.dir.display()));
        for t in &o.tensors {
            text.push_str(&format!(
                "  {} {} {:?} = {:?}\n",
                t.name, t.dtype, t.shape, t.expr
            ));
        }
    }
    text
}
