//! What each merge method costs in memory: part of the op's definition, so the plan
//! proves its budget from here and the executors are written to stay within it.
//!
//! The figures come from reading each CPU method (`exec::methods`): every allocation that
//! grows with the tensor is counted. The constants below fix the shapes of the methods'
//! passes; the executors use them, so a change here changes both sides at once.

use super::{Compute, GtaKind, MethodOp, Sparsifier};

/// Elements per chunk for chunked passes over inputs.
pub const CHUNK: usize = 1 << 16;

/// Chunk buffers a worker thread keeps in its pool between chunked passes.
pub const POOL_KEEP: usize = 16;

/// TIES's sample of `|delta|` keys: `SAMPLE_BLOCK` consecutive elements every
/// `16 * SAMPLE_BLOCK` (1/16 of them).
pub const SAMPLE_BLOCK: usize = 1024;

/// Most keys TIES collects per model: `max(n/16, CHUNK)`. A window holding more is
/// narrowed by another histogram level instead, so TIES never holds more than this per
/// model (the bound below counts on it).
pub fn candidate_cap(n: usize) -> usize {
    (n / 16).max(CHUNK)
}

impl MethodOp {
    /// An upper bound on the bytes one application of the method to `inputs` tensors of
    /// `shape` allocates in `compute` with `threads` workers, its f32 result included (its
    /// inputs stay mapped and are counted by the plan as inputs).
    pub fn working_bytes(&self, compute: Compute, inputs: usize, shape: &[usize], threads: usize) -> u64 {
        let n = shape.iter().product::<usize>() as u64;
        let m = inputs as u64;
        let f32s = 4 * n;
        if let MethodOp::LowRank { rank, .. } = self {
            // the f32 result and both factors decoded to f32, whatever the compute dtype
            return f32s + super::lowrank::factor_bytes(shape, *rank);
        }
        if let Compute::Half(_) = compute {
            // `exec::methods::half` holds whole tensors as torch does: the inputs cast to
            // the compute dtype (2 bytes each), then at most two f32 copies of each input
            // (values, task vectors) and eight tensor-sized temporaries (masks, ranks,
            // products, the result).
            return 2 * n * m + (2 * m + 8) * f32s;
        }
        // Per-vector f64 sums of the geometry methods (one vector, rows or columns) and
        // their f32 coefficients: at most n / min(first, last dimension) vectors.
        let first = shape.first().copied().unwrap_or(1).max(1) as u64;
        let last = shape.last().copied().unwrap_or(1).max(1) as u64;
        let vectors = n / first.min(last) + 1;
        let sums = 8 * (m * m + 4) * vectors;
        // Per worker: the pooled chunk buffers (f32 and u32) and the per-split buffers of
        // chunk or row length (bases, deltas, DELLA's orders, arcee's f64 rows).
        let per_thread = 2 * (POOL_KEEP as u64) * CHUNK as u64 * 4 + 8 * (m + 6) * (CHUNK as u64).max(last);
        let fixed = per_thread * threads.max(1) as u64;
        fixed
            + match self {
                MethodOp::Slerp { .. }
                | MethodOp::Nuslerp { .. }
                | MethodOp::Multislerp { .. }
                | MethodOp::ModelStock { .. }
                | MethodOp::Nearswap { .. } => f32s + sums,
                // the mean (the result) and the tangent
                MethodOp::Karcher { .. } => 2 * f32s + sums,
                MethodOp::Ram { .. } | MethodOp::RamPlusTl { .. } | MethodOp::Noise { .. } => f32s,
                // the variance keys and the result; per-chunk selections
                MethodOp::Sce { .. } => 2 * f32s + 64 * n.div_ceil(CHUNK as u64),
                // the importance keys and the result
                MethodOp::ArceeFusion => 2 * f32s,
                MethodOp::Gta(g) => gta_bytes(g.kind, n, m),
                MethodOp::LowRank { .. } => f32s,
            }
    }
}

/// The bytes a GTA call allocates for `n` elements and `inputs` tensors, its f32 result
/// included (the per-worker buffers aside).
fn gta_bytes(kind: GtaKind, n: u64, inputs: u64) -> u64 {
    let f32s = 4 * n;
    let bits = 8 * n.div_ceil(64);
    let models = inputs.saturating_sub(1);
    match kind.sparsifier() {
        Sparsifier::None => f32s,
        // sampled keys (1/16 of each model's, and a copy of one model's), then the
        // collected keys under the cap (and a copy of one model's), then the result
        Sparsifier::Magnitude => {
            let sample = n / 16 + SAMPLE_BLOCK as u64;
            let cap = candidate_cap(n as usize) as u64;
            f32s + 4 * (sample + cap) * (models + 1)
        }
        // keys (reused model after model), a bitset per model, a second bitset and the
        // per-word counts and budgets while one is built, then the result
        Sparsifier::Outliers => 2 * f32s + bits * (models + 1) + 16 * n.div_ceil(32),
        Sparsifier::Bernoulli => f32s + bits * models,
        // ranks (reused), a bitset per model, then the result
        Sparsifier::Della => 2 * f32s + bits * models,
    }
}

/// An upper bound on the bytes a MoE router job allocates while it computes the routers
/// of `moe` from its base model `base` (`exec::moe`), the generated tensors' own bytes
/// aside (the plan holds those until the output is written).
///
/// - `hidden`, `hidden_avg`: one decoder layer decoded to f32 at a time (the largest), the
///   activations of every prompt token through it (each linear layer's output, the
///   normed copies and per-prompt rope copies: three times the layer's widths per token),
///   attention scores (`heads * len^2` per prompt), each prompt's per-layer states, and
///   the experts' f64 accumulators. A prompt has at most one token per byte, plus the
///   beginning-of-sequence token and one more for a prefix space.
/// - `cheap_embed`: the prompts' embedding rows and the accumulators.
/// - the random modes: the vectors only.
///
/// The tokenizer's in-memory form is charged at 16 times its tokenizer.json, an estimate
/// (its vocabulary and merges as hash maps and strings), not a proof.
pub fn router_bytes(moe: &crate::moe_spec::MoeOutput, base: &crate::io::ModelInfo) -> u64 {
    use crate::moe_spec::GateMode;
    let h = moe.hidden_size as u64;
    let layers = moe.num_layers as u64;
    let experts: Vec<_> = moe.experts.iter().chain(moe.shared.as_ref()).collect();
    let vectors = 2 * 4 * layers * experts.len() as u64 * h;
    if !moe.gate.uses_prompts() {
        return vectors;
    }
    let prompts: Vec<u64> = experts
        .iter()
        .flat_map(|e| e.positive.iter().chain(&e.negative))
        .map(|p| p.len() as u64 + BOS_BYTES + 1)
        .collect();
    let tokens: u64 = prompts.iter().sum();
    let tokenizer = std::fs::metadata(base.root.join("tokenizer.json")).map_or(0, |m| m.len()) * 16;
    // per expert and layer, the f64 sum and the vector it becomes
    let accumulators = 2 * 8 * layers * experts.len() as u64 * h;
    let fixed = vectors + tokenizer + accumulators + 4 * tokens * h;
    if moe.gate == GateMode::CheapEmbed {
        return fixed;
    }
    let mut layer_bytes = 0u64;
    let mut layer_widths = 0u64;
    for l in 0..moe.num_layers {
        let prefix = format!("model.layers.{l}.");
        let (bytes, widths) = base
            .tensors
            .range(prefix.clone()..)
            .take_while(|(name, _)| name.starts_with(&prefix))
            .fold((0u64, 0u64), |(b, w), (_, t)| {
                (
                    b + 4 * t.numel(),
                    w + t.shape.first().copied().unwrap_or(0) as u64,
                )
            });
        layer_bytes = layer_bytes.max(bytes);
        layer_widths = layer_widths.max(widths);
    }
    let heads = base
        .config
        .as_ref()
        .and_then(|c| c.get("num_attention_heads"))
        .and_then(|v| v.as_u64())
        .unwrap_or(layer_widths);
    let activations = 4 * 3 * tokens * (layer_widths + h);
    let scores: u64 = prompts.iter().map(|&len| 4 * heads * len * len).sum();
    let states = 2 * 4 * prompts.len() as u64 * layers * h;
    fixed + layer_bytes + activations + scores + states
}

/// Bytes a beginning-of-sequence token's text may take (`<|begin_of_text|>` is 17).
const BOS_BYTES: u64 = 32;
