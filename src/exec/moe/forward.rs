//! A forward pass of a dense decoder (Llama, Mistral, Qwen2, Qwen3) for the `hidden`
//! gate mode: the per-layer hidden states of prompts.
//!
//! The maths follows the eager forward of Hugging Face transformers for one unpadded
//! prompt at positions `0..n`, computed in f32. Each operation is one small function
//! ([`matmul`], [`rms_norm`], [`rope`], [`attention`], [`swiglu`], [`add`]) so another
//! backend can mirror them op for op.
//!
//! Work is layer-major: a layer's weights are decoded once and every token of every prompt
//! goes through it, so each weight is read once per call whatever the number of prompts.
//! Dot products accumulate in f32, plain multiply then add (no fused multiply-add), in
//! index order, exactly as a naive loop would; each is computed whole by one thread, so
//! results are bit-identical whatever the number of threads.

use rayon::prelude::*;
use serde_json::Value;

use crate::exec::cpu::decode;
use crate::io::reader::ReadError;
use crate::io::{DType, ModelInfo, TensorReader};

/// Why the hidden states could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("config.json has no `{0}`, which the forward pass needs")]
    MissingKey(String),
    #[error("config key `{key}` is {found}, expected {expected}")]
    BadKey {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("unsupported {what} (the forward pass supports {supported})")]
    Unsupported { what: String, supported: &'static str },
    #[error("invalid decoder config: {0}")]
    InvalidConfig(String),
    #[error("the model has no tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` is {dtype}; the forward pass reads only f32, f16 and bf16")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("cannot read tensor `{name}`: {source}")]
    Read { name: String, source: ReadError },
    #[error("prompt {prompt} is empty")]
    EmptyPrompt { prompt: usize },
    #[error(
        "prompt {prompt}, position {position}: token id {token} is not below the vocabulary size {vocab}"
    )]
    TokenOutOfVocab {
        prompt: usize,
        position: usize,
        token: u32,
        vocab: usize,
    },
    #[error(
        "prompt {prompt} has {len} tokens, more than the sliding attention window ({window}), which the forward pass does not implement"
    )]
    PromptTooLong {
        prompt: usize,
        len: usize,
        window: usize,
    },
}

/// The decoder families the forward pass knows; they differ only in biases and norms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

/// How the rotary frequencies are scaled.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq[i] = theta^(-2i/head_dim)`.
    Default,
    /// Llama 3.1's piecewise rescaling of long wavelengths.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary position embedding parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// What the forward pass needs from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rms_norm_eps: f64,
    pub rope: Rope,
    pub vocab_size: usize,
    /// Biases on the q, k and v projections (Qwen2 always; Llama and Qwen3 with
    /// `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama and Qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// RMSNorm of each query and key head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Sliding attention window, where one applies; longer prompts are refused.
    pub sliding_window: Option<usize>,
}

const SUPPORTED_ARCHS: &str = "llama, mistral, qwen2 and qwen3";
const SUPPORTED_ROPE: &str = "rope types default and llama3";

fn key<'a>(config: &'a Value, name: &str) -> Option<&'a Value> {
    config.get(name).filter(|v| !v.is_null())
}

fn found(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text
    }
}

fn usize_key(config: &Value, name: &str) -> Result<Option<usize>, ForwardError> {
    match key(config, name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| ForwardError::BadKey {
                key: name.to_owned(),
                expected: "a non-negative integer",
                found: found(v),
            }),
    }
}

fn required_usize(config: &Value, name: &str) -> Result<usize, ForwardError> {
    usize_key(config, name)?.ok_or_else(|| ForwardError::MissingKey(name.to_owned()))
}

fn f64_key(config: &Value, name: &str) -> Result<Option<f64>, ForwardError> {
    match key(config, name) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| ForwardError::BadKey {
            key: name.to_owned(),
            expected: "a number",
            found: found(v),
        }),
    }
}

fn bool_key(config: &Value, name: &str) -> Result<Option<bool>, ForwardError> {
    match key(config, name) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| ForwardError::BadKey {
            key: name.to_owned(),
            expected: "true or false",
            found: found(v),
        }),
    }
}

fn architecture(config: &Value) -> Result<Architecture, ForwardError> {
    let unsupported = |what: String| ForwardError::Unsupported {
        what,
        supported: SUPPORTED_ARCHS,
    };
    if let Some(v) = key(config, "model_type") {
        let name = v.as_str().ok_or_else(|| ForwardError::BadKey {
            key: "model_type".into(),
            expected: "a string",
            found: found(v),
        })?;
        return match name {
            "llama" => Ok(Architecture::Llama),
            "mistral" => Ok(Architecture::Mistral),
            "qwen2" => Ok(Architecture::Qwen2),
            "qwen3" => Ok(Architecture::Qwen3),
            other => Err(unsupported(format!("model type `{other}`"))),
        };
    }
    // Older or hand-written configs may name only the class.
    let class = key(config, "architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .ok_or_else(|| ForwardError::MissingKey("model_type".into()))?;
    match class {
        "LlamaForCausalLM" => Ok(Architecture::Llama),
        "MistralForCausalLM" => Ok(Architecture::Mistral),
        "Qwen2ForCausalLM" => Ok(Architecture::Qwen2),
        "Qwen3ForCausalLM" => Ok(Architecture::Qwen3),
        other => Err(unsupported(format!("architecture `{other}`"))),
    }
}

/// Theta and scaling from `rope_theta`/`rope_scaling` (transformers 4) or
/// `rope_parameters` (transformers 5).
fn rope_from_config(config: &Value) -> Result<Rope, ForwardError> {
    let params = key(config, "rope_parameters");
    let theta = match params {
        Some(p) => f64_key(p, "rope_theta")?,
        None => None,
    };
    // Transformers' default base when the config names none.
    let theta = match theta {
        Some(t) => t,
        None => f64_key(config, "rope_theta")?.unwrap_or(10000.0),
    };
    if !(theta.is_finite() && theta > 0.0) {
        return Err(ForwardError::InvalidConfig(format!(
            "rope_theta must be positive, got {theta}"
        )));
    }
    let (section, scaling) = match (key(config, "rope_scaling"), params) {
        (Some(s), _) => ("rope_scaling", Some(s)),
        (None, p) => ("rope_parameters", p),
    };
    let Some(scaling) = scaling else {
        return Ok(Rope {
            theta,
            scaling: RopeScaling::Default,
        });
    };
    let kind = match key(scaling, "rope_type").or_else(|| key(scaling, "type")) {
        None => "default",
        Some(v) => v.as_str().ok_or_else(|| ForwardError::BadKey {
            key: "rope_type".into(),
            expected: "a string",
            found: found(v),
        })?,
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "llama3" => {
            let get = |name: &str| {
                f64_key(scaling, name)?.ok_or_else(|| ForwardError::MissingKey(format!("{section}.{name}")))
            };
            let (factor, low, high, old) = (
                get("factor")?,
                get("low_freq_factor")?,
                get("high_freq_factor")?,
                get("original_max_position_embeddings")?,
            );
            if !(factor > 0.0 && low > 0.0 && high > low && old > 0.0) {
                return Err(ForwardError::InvalidConfig(format!(
                    "llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and \
                     original_max_position_embeddings > 0; got {factor}, {low}, {high}, {old}"
                )));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: old,
            }
        }
        other => {
            return Err(ForwardError::Unsupported {
                what: format!("rope type `{other}`"),
                supported: SUPPORTED_ROPE,
            })
        }
    };
    Ok(Rope { theta, scaling })
}

impl DecoderConfig {
    /// Reads a Hugging Face `config.json` of a Llama, Mistral, Qwen2 or Qwen3 model.
    pub fn from_config_json(config: &Value) -> Result<DecoderConfig, ForwardError> {
        let architecture = architecture(config)?;
        if let Some(v) = key(config, "hidden_act") {
            if v.as_str() != Some("silu") {
                return Err(ForwardError::Unsupported {
                    what: format!("activation {}", found(v)),
                    supported: "silu",
                });
            }
        }
        if bool_key(config, "mlp_bias")? == Some(true) {
            return Err(ForwardError::Unsupported {
                what: "MLP biases (`mlp_bias: true`)".into(),
                supported: "MLPs without biases",
            });
        }
        let hidden_size = required_usize(config, "hidden_size")?;
        let num_heads = required_usize(config, "num_attention_heads")?;
        let num_kv_heads = usize_key(config, "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match usize_key(config, "head_dim")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let attention_bias = bool_key(config, "attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Llama | Architecture::Qwen3 => (attention_bias, attention_bias),
            Architecture::Mistral => (false, false),
            Architecture::Qwen2 => (true, false),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => usize_key(config, "sliding_window")?,
            Architecture::Qwen2 | Architecture::Qwen3 => {
                if bool_key(config, "use_sliding_window")?.unwrap_or(false) {
                    usize_key(config, "sliding_window")?
                } else {
                    None
                }
            }
            Architecture::Llama => None,
        };
        let cfg = DecoderConfig {
            architecture,
            hidden_size,
            num_layers: required_usize(config, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: required_usize(config, "intermediate_size")?,
            // Transformers' default for all four families.
            rms_norm_eps: f64_key(config, "rms_norm_eps")?.unwrap_or(1e-6),
            rope: rope_from_config(config)?,
            vocab_size: required_usize(config, "vocab_size")?,
            qkv_bias,
            o_bias,
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the config of a loaded model.
    pub fn from_model(model: &ModelInfo) -> Result<DecoderConfig, ForwardError> {
        let config = model
            .config
            .as_ref()
            .ok_or_else(|| ForwardError::MissingKey("config.json".into()))?;
        DecoderConfig::from_config_json(&Value::Object(config.clone()))
    }

    /// Checks the sizes the forward pass relies on.
    pub fn validate(&self) -> Result<(), ForwardError> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(ForwardError::InvalidConfig(format!("{name} must be positive")));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ForwardError::InvalidConfig(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ForwardError::InvalidConfig(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            )));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(ForwardError::InvalidConfig(format!(
                "rms_norm_eps must be a non-negative number, got {}",
                self.rms_norm_eps
            )));
        }
        Ok(())
    }
}

/// Per prompt: for each layer `l`, the hidden state input to layer `l` (`hidden_states[l]`
/// in transformers: index 0 is the embedding output; the final norm is never applied).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptStates {
    /// `[layers][hidden]`: at the last token.
    pub last: Vec<Vec<f32>>,
    /// `[layers][hidden]`: averaged over the prompt's tokens.
    pub mean: Vec<Vec<f32>>,
}

/// Where the forward pass gets its weights, decoded to f32.
pub trait Weights {
    /// The shape and the values (row-major) of tensor `name`.
    fn tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ForwardError>;

    /// The shape of 2-D tensor `name` and its rows `rows`, concatenated in that order. The
    /// default decodes the whole tensor; readers of mapped files decode only the rows.
    fn rows(&self, name: &str, rows: &[usize]) -> Result<(Vec<usize>, Vec<f32>), ForwardError> {
        let (shape, values) = self.tensor(name)?;
        let width = match shape.as_slice() {
            [_, w] => *w,
            _ => return Err(wrong_shape(name, &[0, 0], &shape)),
        };
        let mut out = Vec::with_capacity(rows.len() * width);
        for &r in rows {
            let row = values
                .get(r * width..(r + 1) * width)
                .ok_or_else(|| wrong_shape(name, &[r + 1, width], &shape))?;
            out.extend_from_slice(row);
        }
        Ok((shape, out))
    }
}

fn wrong_shape(name: &str, expected: &[usize], found: &[usize]) -> ForwardError {
    ForwardError::WrongShape {
        name: name.to_owned(),
        expected: expected.to_vec(),
        found: found.to_vec(),
    }
}

/// [`Weights`] over a model's mapped safetensors files.
pub struct ModelWeights<'a> {
    model: &'a ModelInfo,
    reader: &'a TensorReader,
}

/// Elements decoded per task: large enough to amortise scheduling.
const DECODE_CHUNK: usize = 1 << 16;

impl<'a> ModelWeights<'a> {
    pub fn new(model: &'a ModelInfo, reader: &'a TensorReader) -> ModelWeights<'a> {
        ModelWeights { model, reader }
    }

    fn info(&self, name: &str) -> Result<(&'a crate::io::TensorInfo, usize), ForwardError> {
        let info = self
            .model
            .tensors
            .get(name)
            .ok_or_else(|| ForwardError::MissingTensor(name.to_owned()))?;
        if !matches!(info.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(ForwardError::UnsupportedDtype {
                name: name.to_owned(),
                dtype: info.dtype.to_string(),
            });
        }
        Ok((info, info.dtype.size_bytes()))
    }

    fn read(&self, name: &str) -> Result<crate::io::reader::TensorBytes, ForwardError> {
        self.reader.read(self.model, name).map_err(|source| match source {
            ReadError::UnknownTensor { .. } => ForwardError::MissingTensor(name.to_owned()),
            source => ForwardError::Read {
                name: name.to_owned(),
                source,
            },
        })
    }
}

impl Weights for ModelWeights<'_> {
    fn tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ForwardError> {
        let (info, size) = self.info(name)?;
        let numel: usize = info.shape.iter().product();
        let bytes = self.read(name)?;
        if bytes.len() != numel * size {
            return Err(wrong_shape(name, &info.shape, &[bytes.len() / size.max(1)]));
        }
        let mut out = vec![0f32; numel];
        out.par_chunks_mut(DECODE_CHUNK)
            .zip(bytes.par_chunks(DECODE_CHUNK * size))
            .for_each(|(o, b)| decode(b, info.dtype, o));
        // The values now live in `out`; drop the file pages so memory does not grow
        // with the model.
        bytes.release();
        Ok((info.shape.clone(), out))
    }

    fn rows(&self, name: &str, rows: &[usize]) -> Result<(Vec<usize>, Vec<f32>), ForwardError> {
        let (info, size) = self.info(name)?;
        let (n, width) = match info.shape.as_slice() {
            [n, w] => (*n, *w),
            _ => return Err(wrong_shape(name, &[0, 0], &info.shape)),
        };
        let bytes = self.read(name)?;
        if bytes.len() != n * width * size {
            return Err(wrong_shape(name, &info.shape, &[bytes.len() / size.max(1)]));
        }
        let mut out = vec![0f32; rows.len() * width];
        let row_bytes = width * size;
        for (o, &r) in out.chunks_mut(width.max(1)).zip(rows) {
            let b = bytes
                .get(r * row_bytes..(r + 1) * row_bytes)
                .ok_or_else(|| wrong_shape(name, &[r + 1, width], &info.shape))?;
            decode(b, info.dtype, o);
        }
        bytes.release();
        Ok((info.shape.clone(), out))
    }
}

// ---------------------------------------------------------------------------------------
// Operations. Activations are row-major `[tokens, width]` f32 buffers.

/// `sum(a[i] * b[i])` in f32, plain multiply then add, in index order.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (&x, &y) in a.iter().zip(b) {
        sum += x * y;
    }
    sum
}

/// Tokens per tile of the transposed activations in [`matmul`]: a tile's accumulators for
/// two weight rows fit in registers.
const TILE: usize = 16;

/// Weight rows per parallel task in [`matmul`] (even, so rows pair up).
const MATMUL_BLOCK: usize = 16;

/// For each weight row `ws[j]`, the dot products with the `TILE` tokens of `xtile`
/// (`[inp][TILE]`, transposed), each summed in index order like [`dot`]. The tokens are
/// the vector dimension, so the sums vectorise without reordering any of them.
fn tile_dots<const R: usize>(xtile: &[f32], ws: [&[f32]; R]) -> [[f32; TILE]; R] {
    let mut acc = [[0f32; TILE]; R];
    for (i, xs) in xtile.chunks_exact(TILE).enumerate() {
        for (a, w) in acc.iter_mut().zip(ws) {
            let wv = w[i];
            for (s, &xv) in a.iter_mut().zip(xs) {
                *s += xv * wv;
            }
        }
    }
    acc
}

/// `x @ w^T (+ bias)`: `x` is `[rows, inp]`, `w` is `[out, inp]` (a linear layer's
/// weight), the result `[rows, out]`. Each element is `dot(x[r], w[o])` (then `+ bias[o]`)
/// to the bit, computed by one thread, so the result does not depend on the number of
/// threads. Threads take blocks of weight rows, so each weight is read once per call.
pub fn matmul(x: &[f32], rows: usize, w: &[f32], out: usize, inp: usize, bias: Option<&[f32]>) -> Vec<f32> {
    if rows == 0 || out == 0 || inp == 0 {
        return vec![0f32; rows * out];
    }
    // Tokens in tiles of TILE, each tile transposed to [inp][TILE] (zero-padded).
    let tiles = rows.div_ceil(TILE);
    let mut xt = vec![0f32; tiles * inp * TILE];
    for (t, xr) in x.chunks_exact(inp).take(rows).enumerate() {
        let tile = &mut xt[(t / TILE) * inp * TILE..(t / TILE + 1) * inp * TILE];
        for (i, &v) in xr.iter().enumerate() {
            tile[i * TILE + t % TILE] = v;
        }
    }
    // Computed transposed ([out, rows]) so tasks own whole blocks of weight rows.
    let mut t = vec![0f32; out * rows];
    t.par_chunks_mut(MATMUL_BLOCK * rows)
        .enumerate()
        .for_each(|(block, dst)| {
            let n = dst.len() / rows;
            let wblock = &w[block * MATMUL_BLOCK * inp..(block * MATMUL_BLOCK + n) * inp];
            for (tile, xtile) in xt.chunks_exact(inp * TILE).enumerate() {
                let (t0, tw) = (tile * TILE, TILE.min(rows - tile * TILE));
                let mut store = |o: usize, acc: &[f32; TILE]| {
                    dst[o * rows + t0..o * rows + t0 + tw].copy_from_slice(&acc[..tw]);
                };
                let mut pairs = wblock.chunks_exact(2 * inp);
                for (p, wp) in pairs.by_ref().enumerate() {
                    let (w0, w1) = wp.split_at(inp);
                    let [a0, a1] = tile_dots(xtile, [w0, w1]);
                    store(2 * p, &a0);
                    store(2 * p + 1, &a1);
                }
                if !pairs.remainder().is_empty() {
                    let [a] = tile_dots(xtile, [pairs.remainder()]);
                    store(n - 1, &a);
                }
            }
        });
    let mut y = vec![0f32; rows * out];
    for (r, yr) in y.chunks_exact_mut(out).enumerate() {
        for (o, v) in yr.iter_mut().enumerate() {
            *v = t[o * rows + r];
        }
        if let Some(b) = bias {
            for (v, &b) in yr.iter_mut().zip(b) {
                *v += b;
            }
        }
    }
    y
}

/// RMSNorm of each `width`-long row of `x`, in place:
/// `x * 1/sqrt(mean(x²) + eps) * weight`, the squares summed in f32 by [`dot`].
pub fn rms_norm(x: &mut [f32], width: usize, weight: &[f32], eps: f64) {
    let eps = eps as f32;
    for row in x.chunks_exact_mut(width.max(1)) {
        let mean = dot(row, row) / width as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, &g) in row.iter_mut().zip(weight) {
            *v = g * (*v * scale);
        }
    }
}

/// Cosines and sines of the rotary angles, `[positions, head_dim/2]` each.
#[derive(Clone, Debug)]
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// The inverse frequencies `theta^(-2i/head_dim)`, `i < head_dim/2`, rescaled as the
    /// scaling says; computed in f64, rounded to f32 as transformers keeps them.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let f = self.theta.powf(-((2 * i) as f64) / head_dim as f64);
                let f = match self.scaling {
                    RopeScaling::Default => f,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings: old,
                    } => {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < old / high_freq_factor {
                            f
                        } else if wavelen > old / low_freq_factor {
                            f / factor
                        } else {
                            let smooth =
                                (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                };
                f as f32
            })
            .collect()
    }

    /// The table for positions `0..positions`. The angle `position * inv_freq` is
    /// rounded to f32 as in transformers before its cosine and sine are taken.
    pub fn table(&self, head_dim: usize, positions: usize) -> RopeTable {
        let inv = self.inv_freq(head_dim);
        let half = inv.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inv {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }
}

/// Rotary embedding in place on `x`, `[tokens, heads * head_dim]` for positions
/// `0..tokens`, in the rotate-half convention: dimension `i` pairs with `i + head_dim/2`.
pub fn rope(x: &mut [f32], heads: usize, head_dim: usize, table: &RopeTable) {
    let half = table.half;
    if half == 0 || head_dim != 2 * half {
        return;
    }
    for (p, token) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (cos, sin) = match (
            table.cos.get(p * half..(p + 1) * half),
            table.sin.get(p * half..(p + 1) * half),
        ) {
            (Some(c), Some(s)) => (c, s),
            _ => return,
        };
        for head in token.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for (((x1, x2), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                let (u, v) = (*x1, *x2);
                *x1 = u * c - v * s;
                *x2 = v * c + u * s;
            }
        }
    }
}

/// Causal grouped-query attention of one prompt: `q` is `[n, heads * head_dim]`, `k` and
/// `v` `[n, kv_heads * head_dim]`; query head `h` reads kv head `h / (heads / kv_heads)`.
/// Scores are scaled by `1/sqrt(head_dim)` and soft-maxed in f32. Returns
/// `[n, heads * head_dim]`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
    let group = (heads / kv_heads.max(1)).max(1);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; n * qw];
    let mut scores = vec![0f32; n];
    for h in 0..heads {
        let kvh = h / group;
        for i in 0..n {
            let qi = &q[i * qw + h * head_dim..i * qw + (h + 1) * head_dim];
            let s = &mut scores[..=i];
            for (j, sj) in s.iter_mut().enumerate() {
                *sj = dot(qi, &k[j * kw + kvh * head_dim..j * kw + (kvh + 1) * head_dim]) * scale;
            }
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for sj in s.iter_mut() {
                *sj = (*sj - max).exp();
                sum += *sj;
            }
            let o = &mut out[i * qw + h * head_dim..i * qw + (h + 1) * head_dim];
            for (j, &sj) in s.iter().enumerate() {
                let p = sj / sum;
                let vj = &v[j * kw + kvh * head_dim..j * kw + (kvh + 1) * head_dim];
                for (ov, &vv) in o.iter_mut().zip(vj) {
                    *ov += p * vv;
                }
            }
        }
    }
    out
}

/// The SwiGLU gate: `silu(gate) * up`, element-wise, with `silu(x) = x / (1 + e^-x)`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// The residual connection: `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

// ---------------------------------------------------------------------------------------
// The model.

/// A linear layer: `[out, inp]` weight and an optional `[out]` bias.
struct Linear {
    w: Vec<f32>,
    out: usize,
    inp: usize,
    bias: Option<Vec<f32>>,
}

impl Linear {
    fn apply(&self, x: &[f32], rows: usize) -> Vec<f32> {
        matmul(x, rows, &self.w, self.out, self.inp, self.bias.as_deref())
    }
}

struct Layer {
    input_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Tensor `name`, which must have shape `shape`.
fn fetch(weights: &dyn Weights, name: &str, shape: &[usize]) -> Result<Vec<f32>, ForwardError> {
    let (found, values) = weights.tensor(name)?;
    if found != shape || values.len() != shape.iter().product::<usize>() {
        return Err(wrong_shape(name, shape, &found));
    }
    Ok(values)
}

fn linear(
    weights: &dyn Weights,
    prefix: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<Linear, ForwardError> {
    let w = fetch(weights, &format!("{prefix}.weight"), &[out, inp])?;
    let bias = if bias {
        Some(fetch(weights, &format!("{prefix}.bias"), &[out])?)
    } else {
        None
    };
    Ok(Linear { w, out, inp, bias })
}

fn load_layer(cfg: &DecoderConfig, weights: &dyn Weights, l: usize) -> Result<Layer, ForwardError> {
    let p = format!("model.layers.{l}");
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (qw, kw) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let norm = |name: &str, width: usize| fetch(weights, &format!("{p}.{name}.weight"), &[width]);
    Ok(Layer {
        input_norm: norm("input_layernorm", h)?,
        q: linear(weights, &format!("{p}.self_attn.q_proj"), qw, h, cfg.qkv_bias)?,
        k: linear(weights, &format!("{p}.self_attn.k_proj"), kw, h, cfg.qkv_bias)?,
        v: linear(weights, &format!("{p}.self_attn.v_proj"), kw, h, cfg.qkv_bias)?,
        o: linear(weights, &format!("{p}.self_attn.o_proj"), h, qw, cfg.o_bias)?,
        q_norm: if cfg.qk_norm {
            Some(norm("self_attn.q_norm", d)?)
        } else {
            None
        },
        k_norm: if cfg.qk_norm {
            Some(norm("self_attn.k_norm", d)?)
        } else {
            None
        },
        post_norm: norm("post_attention_layernorm", h)?,
        gate: linear(weights, &format!("{p}.mlp.gate_proj"), i, h, false)?,
        up: linear(weights, &format!("{p}.mlp.up_proj"), i, h, false)?,
        down: linear(weights, &format!("{p}.mlp.down_proj"), h, i, false)?,
    })
}

/// One decoder layer on the tokens of all prompts, `x` `[tokens, hidden]` in place;
/// `spans` are the prompts' token ranges (attention and positions stay within a prompt).
fn layer_forward(
    cfg: &DecoderConfig,
    layer: &Layer,
    x: &mut [f32],
    spans: &[(usize, usize)],
    table: &RopeTable,
) {
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let (qw, kw) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let rows = x.len() / h;

    let mut normed = x.to_vec();
    rms_norm(&mut normed, h, &layer.input_norm, cfg.rms_norm_eps);
    let mut q = layer.q.apply(&normed, rows);
    let mut k = layer.k.apply(&normed, rows);
    let v = layer.v.apply(&normed, rows);
    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
        rms_norm(&mut q, d, qn, cfg.rms_norm_eps);
        rms_norm(&mut k, d, kn, cfg.rms_norm_eps);
    }
    let mut attn = vec![0f32; rows * qw];
    let parts: Vec<Vec<f32>> = spans
        .par_iter()
        .map(|&(start, end)| {
            let mut qp = q[start * qw..end * qw].to_vec();
            let mut kp = k[start * kw..end * kw].to_vec();
            rope(&mut qp, cfg.num_heads, d, table);
            rope(&mut kp, cfg.num_kv_heads, d, table);
            attention(
                &qp,
                &kp,
                &v[start * kw..end * kw],
                end - start,
                cfg.num_heads,
                cfg.num_kv_heads,
                d,
            )
        })
        .collect();
    for (&(start, end), part) in spans.iter().zip(&parts) {
        attn[start * qw..end * qw].copy_from_slice(part);
    }
    add(x, &layer.o.apply(&attn, rows));

    let mut normed = x.to_vec();
    rms_norm(&mut normed, h, &layer.post_norm, cfg.rms_norm_eps);
    let gate = layer.gate.apply(&normed, rows);
    let up = layer.up.apply(&normed, rows);
    add(x, &layer.down.apply(&swiglu(&gate, &up), rows));
}

/// The hidden states at the input of every layer, for each prompt (token ids, no padding,
/// positions `0..n`). The last layer itself is never run: its input is the last state.
pub fn hidden_states(
    cfg: &DecoderConfig,
    weights: &dyn Weights,
    prompts: &[Vec<u32>],
) -> Result<Vec<PromptStates>, ForwardError> {
    cfg.validate()?;
    let h = cfg.hidden_size;
    let mut spans = Vec::with_capacity(prompts.len());
    let mut tokens = Vec::new();
    for (p, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            return Err(ForwardError::EmptyPrompt { prompt: p });
        }
        if let Some(window) = cfg.sliding_window.filter(|&w| prompt.len() > w) {
            return Err(ForwardError::PromptTooLong {
                prompt: p,
                len: prompt.len(),
                window,
            });
        }
        for (position, &token) in prompt.iter().enumerate() {
            if token as usize >= cfg.vocab_size {
                return Err(ForwardError::TokenOutOfVocab {
                    prompt: p,
                    position,
                    token,
                    vocab: cfg.vocab_size,
                });
            }
            tokens.push(token as usize);
        }
        spans.push((tokens.len() - prompt.len(), tokens.len()));
    }
    if prompts.is_empty() {
        return Ok(Vec::new());
    }

    let embed = "model.embed_tokens.weight";
    let (shape, mut x) = weights.rows(embed, &tokens)?;
    if shape != [cfg.vocab_size, h] || x.len() != tokens.len() * h {
        return Err(wrong_shape(embed, &[cfg.vocab_size, h], &shape));
    }
    let longest = spans.iter().map(|(s, e)| e - s).max().unwrap_or(0);
    let table = cfg.rope.table(cfg.head_dim, longest);

    let mut states: Vec<PromptStates> = spans
        .iter()
        .map(|_| PromptStates {
            last: Vec::with_capacity(cfg.num_layers),
            mean: Vec::with_capacity(cfg.num_layers),
        })
        .collect();
    for l in 0..cfg.num_layers {
        for (state, &(start, end)) in states.iter_mut().zip(&spans) {
            state.last.push(x[(end - 1) * h..end * h].to_vec());
            state.mean.push(mean_rows(&x[start * h..end * h], h));
        }
        if l + 1 < cfg.num_layers {
            let layer = load_layer(cfg, weights, l)?;
            layer_forward(cfg, &layer, &mut x, &spans, &table);
        }
    }
    Ok(states)
}

/// The mean of the `width`-long rows of `x`, summed in f64 in row order.
fn mean_rows(x: &[f32], width: usize) -> Vec<f32> {
    let mut sum = vec![0f64; width];
    let rows = x.len() / width.max(1);
    for row in x.chunks_exact(width.max(1)) {
        for (s, &v) in sum.iter_mut().zip(row) {
            *s += v as f64;
        }
    }
    sum.iter().map(|s| (s / rows.max(1) as f64) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> Value {
        json!({
            "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
            "vocab_size": 16, "rms_norm_eps": 1e-5, "rope_theta": 500000.0
        })
    }

    #[test]
    fn config_defaults_and_families() {
        let cfg = DecoderConfig::from_config_json(&config()).unwrap();
        assert_eq!(cfg.head_dim, 8);
        assert_eq!(
            cfg.rope,
            Rope {
                theta: 500000.0,
                scaling: RopeScaling::Default
            }
        );
        assert!(!cfg.qkv_bias && !cfg.qk_norm);

        let mut c = config();
        c["model_type"] = json!("qwen2");
        let cfg = DecoderConfig::from_config_json(&c).unwrap();
        assert!(cfg.qkv_bias && !cfg.o_bias);
        c["model_type"] = json!("qwen3");
        c["head_dim"] = json!(16);
        let cfg = DecoderConfig::from_config_json(&c).unwrap();
        assert!(cfg.qk_norm && !cfg.qkv_bias);
        assert_eq!(cfg.head_dim, 16);
    }

    #[test]
    fn rope_parameters_of_transformers_5() {
        let mut c = config();
        c.as_object_mut().unwrap().remove("rope_theta");
        c["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let cfg = DecoderConfig::from_config_json(&c).unwrap();
        assert_eq!(cfg.rope.theta, 1e6);
        assert!(matches!(cfg.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn config_errors_name_the_problem() {
        let mut c = config();
        c.as_object_mut().unwrap().remove("hidden_size");
        let e = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
        assert!(e.contains("`hidden_size`"), "{e}");

        let mut c = config();
        c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = DecoderConfig::from_config_json(&c).unwrap_err();
        assert!(matches!(e, ForwardError::Unsupported { .. }));
        assert!(e.to_string().contains("rope type `yarn`"), "{e}");

        let mut c = config();
        c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        let e = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
        assert!(e.contains("`rope_scaling.low_freq_factor`"), "{e}");

        let mut c = config();
        c["model_type"] = json!("gemma");
        let e = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
        assert!(e.contains("model type `gemma`"), "{e}");

        let mut c = config();
        c["num_key_value_heads"] = json!(3);
        let e = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
        assert!(e.contains("not a multiple"), "{e}");

        let mut c = config();
        c["hidden_size"] = json!("big");
        let e = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
        assert!(e.contains("`hidden_size` is \"big\""), "{e}");
    }

    #[test]
    fn matmul_is_a_plain_f32_sum_per_element_plus_bias() {
        // Sizes beyond a tile of tokens and a block of rows, with an odd number of rows.
        for (rows, out, inp) in [(1, 1, 1), (6, 35, 3), (19, 35, 13), (33, 4, 40)] {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i * 37 % 101) as f32 * 0.13).sin())
                .collect();
            let w: Vec<f32> = (0..out * inp)
                .map(|i| ((i * 53 % 97) as f32 * 0.29).cos())
                .collect();
            let bias: Vec<f32> = (0..out).map(|i| i as f32 * 0.5).collect();
            let y = matmul(&x, rows, &w, out, inp, Some(&bias));
            for r in 0..rows {
                for o in 0..out {
                    let mut want = 0f32;
                    for i in 0..inp {
                        want += x[r * inp + i] * w[o * inp + i];
                    }
                    assert_eq!(
                        y[r * out + o].to_bits(),
                        (want + bias[o]).to_bits(),
                        "{rows}x{out}x{inp}"
                    );
                }
            }
        }
    }

    #[test]
    fn rms_norm_gives_unit_rms() {
        let mut x = vec![3.0f32, 4.0, 0.0, 0.0];
        rms_norm(&mut x, 4, &[1.0; 4], 0.0);
        assert!((x[0] - 1.2).abs() < 1e-6 && (x[1] - 1.6).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_half_a_head_apart() {
        let table = Rope {
            theta: 10000.0,
            scaling: RopeScaling::Default,
        }
        .table(4, 2);
        // Position 0 is the identity; position 1 rotates (x0, x2) by 1 rad.
        let mut x = vec![1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        rope(&mut x, 1, 4, &table);
        assert_eq!(&x[..4], &[1.0, 0.0, 0.0, 0.0]);
        assert!((x[4] - 1f32.cos()).abs() < 1e-6 && (x[6] - 1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let base = Rope {
            theta: 500000.0,
            scaling: RopeScaling::Default,
        };
        let scaled = Rope {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let (b, s) = (base.inv_freq(128), scaled.inv_freq(128));
        assert_eq!(b[0], s[0]);
        assert!((s[63] * 8.0 - b[63]).abs() <= b[63] * 1e-6);
    }

    #[test]
    fn attention_of_one_token_is_its_value() {
        let out = attention(&[1.0, 2.0], &[0.5, 0.5], &[7.0, -3.0], 1, 1, 1, 2);
        assert_eq!(out, vec![7.0, -3.0]);
    }

    #[test]
    fn swiglu_is_silu_times_up() {
        let y = swiglu(&[0.0, 1.0], &[5.0, 2.0]);
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-7);
    }
}
