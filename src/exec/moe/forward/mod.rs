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

mod attention;
mod layer;
mod matmul;
mod weights;

pub use attention::{attention, rope, RopeTable};
pub use layer::{add, rms_norm, swiglu};
pub use matmul::{dot, matmul};
pub use weights::{ModelWeights, Weights};

use crate::io::decoder_config::{ConfigError, DecoderConfig};
use crate::io::reader::ReadError;
use layer::{layer_forward, load_layer};
use weights::wrong_shape;

/// Why the hidden states could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Config(#[from] ConfigError),
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
            let window = cfg.layer_windows.get(l).copied().flatten();
            layer_forward(cfg, &layer, &mut x, &spans, &table, window);
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
