//! The checked program: every output tensor with its shape, dtype and a plain expression
//! over input tensors, every parameter already resolved to a number for that tensor.

use std::path::PathBuf;
use std::sync::Arc;

use crate::io::{DType, ModelInfo};
use crate::ops::MethodOp;
use crate::source::Span;

/// Index of an input model in [`Program::models`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub u32);

impl std::fmt::Display for ModelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "m{}", self.0)
    }
}

#[derive(Clone, Debug)]
pub struct Program {
    pub models: Vec<InputModel>,
    pub outputs: Vec<Output>,
    /// The script's text, recorded in each output's model card.
    pub script_text: String,
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
    /// Number of transformer layers in the output, when it has any.
    pub layer_count: Option<usize>,
    /// Where each output layer comes from: (input model, its layer index). Per-layer lists
    /// in config.json (layer_types, ...) follow this.
    pub layer_sources: Vec<(ModelId, usize)>,
    /// The input models this output reads, in script order.
    pub inputs: Vec<ModelId>,
    /// A chat template to write (chat_template.jinja and tokenizer_config.json).
    pub chat_template: Option<String>,
    /// The methods the model is made with, outermost first (for the model card).
    pub methods: Vec<String>,
    /// Set when the output is a mixture of experts made by `moe(...)`.
    pub moe: Option<Arc<MoeOutput>>,
}

/// The sparse architecture a `moe(...)` output is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeArch {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
}

impl MoeArch {
    pub const ALL: [MoeArch; 3] = [MoeArch::Mixtral, MoeArch::Qwen2Moe, MoeArch::Qwen3Moe];

    /// The name scripts use (`architecture: "mixtral"`), also config.json's model_type.
    pub fn name(self) -> &'static str {
        match self {
            MoeArch::Mixtral => "mixtral",
            MoeArch::Qwen2Moe => "qwen2_moe",
            MoeArch::Qwen3Moe => "qwen3_moe",
        }
    }

    pub fn class_name(self) -> &'static str {
        match self {
            MoeArch::Mixtral => "MixtralForCausalLM",
            MoeArch::Qwen2Moe => "Qwen2MoeForCausalLM",
            MoeArch::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }
}

/// How the router (gate) vectors are initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateMode {
    /// The base model's hidden state of each prompt's last token, per layer.
    Hidden,
    /// As `Hidden`, averaged over the prompt's tokens.
    HiddenAvg,
    /// The normalised sum of the prompts' token embeddings, the same for every layer.
    CheapEmbed,
    /// Standard normal draws.
    Random,
    /// Uniform draws in ±1/sqrt(hidden_size) (torch.nn.Linear's initialisation).
    UniformRandom,
}

impl GateMode {
    pub const NAMES: [&'static str; 5] = ["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random"];

    pub fn from_name(name: &str) -> Option<GateMode> {
        Some(match name {
            "hidden" | "hidden_last" => GateMode::Hidden,
            "hidden_avg" => GateMode::HiddenAvg,
            "cheap_embed" => GateMode::CheapEmbed,
            "random" => GateMode::Random,
            "uniform_random" => GateMode::UniformRandom,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GateMode::Hidden => "hidden",
            GateMode::HiddenAvg => "hidden_avg",
            GateMode::CheapEmbed => "cheap_embed",
            GateMode::Random => "random",
            GateMode::UniformRandom => "uniform_random",
        }
    }

    /// Whether the gate is computed from prompts (and so needs them).
    pub fn uses_prompts(self) -> bool {
        !matches!(self, GateMode::Random | GateMode::UniformRandom)
    }
}

/// How expert MLP weights are laid out in the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertLayout {
    /// transformers 5: one `experts.gate_up_proj` [E, 2I, H] and one `experts.down_proj`
    /// [E, H, I] per layer.
    Fused,
    /// One tensor per expert and projection (transformers 4, llama.cpp's converter).
    PerExpert,
}

/// One expert's routing prompts.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeExpert {
    /// How the script names the expert's model (for messages).
    pub label: String,
    pub positive: Vec<String>,
    pub negative: Vec<String>,
}

/// An output tensor written as its parts one after another (the fused layout's
/// concatenation over experts); each part is an [`OutputTensor`] named `{name}#{k}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Assembled {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub parts: Vec<String>,
}

/// A tensor the run computes before the merge starts, not from input tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub what: Generate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generate {
    /// The routed experts' gate of a layer, [experts, hidden].
    Router { layer: usize },
    /// The shared expert's gate of a layer, [1, hidden] (Qwen2-MoE).
    SharedRouter { layer: usize },
    /// Zeros (the attention biases Qwen2-MoE needs and Llama models lack).
    Zeros,
}

/// What a `moe(...)` output needs beyond its ordinary tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeOutput {
    pub arch: MoeArch,
    pub gate: GateMode,
    pub layout: ExpertLayout,
    /// The model the gate is computed from (its tokenizer, embeddings and layers).
    pub base: ModelId,
    pub experts: Vec<MoeExpert>,
    pub shared: Option<MoeExpert>,
    pub experts_per_token: usize,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub shared_intermediate_size: Option<usize>,
    pub seed: u64,
    pub assembled: Vec<Assembled>,
    pub generated: Vec<Generated>,
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

/// An element-wise expression over input tensors of one shape. Computation is in f32.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorExpr {
    Load {
        model: ModelId,
        name: String,
    },
    Neg(Box<TensorExpr>),
    Add(Box<TensorExpr>, Box<TensorExpr>),
    Sub(Box<TensorExpr>, Box<TensorExpr>),
    /// `x * factor`
    Scale(Box<TensorExpr>, f64),
    /// `x / divisor`
    Divide(Box<TensorExpr>, f64),
    /// `(Σ weight·x) / divisor`, summed in the order given (mergekit's `linear`).
    WeightedSum {
        terms: Vec<(TensorExpr, f64)>,
        divisor: Option<f64>,
    },
    /// A whole-tensor merge method over `inputs`, in the order the op documents.
    Method {
        op: MethodOp,
        inputs: Vec<TensorExpr>,
    },
}
