//! Generalized task arithmetic: `task_arithmetic`, `ties`, `dare_ties`, `dare_linear`,
//! `breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear` (mergekit's GTA table).
//!
//! For each non-base model `i`: `δ_i = x_i − base`, sparsified by the kind's rule (below)
//! and optionally L1-rescaled; then `wd_i = w_i·δ̃_i`; with sign consensus the sign of
//! `Σ wd_i` (`>= 0` is +) is elected and only agreeing nonzero `wd_i` are summed (divisor:
//! the sum of their weights, 0 → 1); otherwise everything is summed (divisor `Σ w_i`,
//! `|div| < 1e-8` → 1). `mixed / div` when `normalize`, `× lambda`, `base + mixed`.
//!
//! Sparsifiers (all return `δ` unchanged when `density >= 1`):
//! * magnitude (TIES): the `k = max(1, floor(density·n))` largest `|δ|`, ties by lower
//!   element index; `density <= 0` keeps nothing.
//! * magnitude outliers (breadcrumbs): with `t = floor(density·n)`, `g = floor(gamma·n)`,
//!   the elements at positions `[g', g' + t)` of the descending `|δ|` order (ties by lower
//!   index), `g' = min(g, n − t)`. `g = 0` keeps the top `t` (mergekit zeroes the tensor).
//! * bernoulli (DARE): element `j` kept when `uniform(key_i, j) < density`.
//! * della_magprune: per row (the last dimension; a 1-D tensor is one row), `r` is the
//!   0-based rank of `|δ|` ascending (ties by lower index), `rn = r / (len − 1)` (0 for a
//!   1-element row), `p = (density − ε) + rn·2ε`, kept when `uniform(key_i, j) < p`;
//!   `density <= 0` keeps nothing.
//!
//! L1 rescale (when `rescale` and the sparsifier ran): `δ̃ = mask·δ·(‖δ‖₁ / ‖mask·δ‖₁)`,
//! factor 1 when either norm is below 1e-7. Norms accumulate in f64, per chunk, combined in
//! chunk order; the per-element combination is f32 with separate multiply and add, in
//! model order.
//!
//! The magnitude trim (TIES) stores nothing per element: each model's `k`-th largest `|δ|`
//! is found as a threshold (see [`magnitude_tops`]: a sample, one counting pass, a
//! selection among the keys near the threshold) and the combine pass applies it as it
//! goes, so a TIES merge reads its inputs about twice and decodes the base once per chunk
//! for all models.
//!
//! Memory per call, besides the output (`4n` bytes): for TIES, a sample of 1/16 of each
//! model's keys, then the keys inside each model's window (typically well under 1% of `n`,
//! at most `candidate_cap` per model; [`MethodOp::working_bytes`] states the bound); for the other
//! sparsifiers, one bit per element per sparsified model (`n/8` bytes each) and, while a
//! mask is built, one `u32` per element (`4n`: keys or ranks, reused model after model and
//! freed before the output is allocated) and, for breadcrumbs, a second bitset; per
//! worker, chunk buffers of `(M + 3)·CHUNK` f32, kept by the thread between calls.

use super::{Inputs, Scratch, CHUNK};
use crate::ops::{GtaOp, Sparsifier};

mod combine;
mod masks;
#[cfg(test)]
mod tests;
mod threshold;

use combine::combine;
use masks::sparsify;
use threshold::magnitude_tops;

/// Mask words per chunk.
const WORDS: usize = CHUNK / 64;

/// Norms below this leave the masked delta unscaled (mergekit's `eps`).
const RESCALE_EPS: f64 = 1e-7;

/// One model's sparsification: which elements are kept and the rescale factor.
struct Kept {
    mask: Mask,
    scale: f32,
}

/// Which elements of one model's delta are kept.
enum Mask {
    All,
    /// One bit per element (bit `j % 64` of word `j / 64`).
    Bits(Vec<u64>),
    /// A magnitude trim as a rule the combine pass applies to each element's key.
    Top(Top),
}

impl Kept {
    fn all() -> Kept {
        Kept {
            mask: Mask::All,
            scale: 1.0,
        }
    }
}

/// The `k` largest `abs_key(δ)` (ties by lower index) as a rule: keys above `threshold`
/// are kept and, of the keys equal to it, the first ones up to the count that `k` leaves;
/// `takes[c]` says how many of chunk `c`'s equal keys that is.
struct Top {
    threshold: u32,
    takes: Vec<Take>,
}

/// How many of one chunk's threshold-equal keys are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Take {
    All,
    None,
    /// The first `n` of them (element order); the chunk where the count runs out.
    First(usize),
}

/// The parameters of one non-base model.
struct Model {
    input: usize,
    density: f64,
    gamma: f64,
    epsilon: f64,
    key: u64,
}

/// Whether an element with `key` is kept by a [`Top`] in a chunk whose rule is `take`;
/// `left` counts down the equal keys a `Take::First` chunk still keeps.
#[inline]
fn keeps(key: u32, threshold: u32, take: Take, left: &mut usize) -> bool {
    match take {
        Take::All => key >= threshold,
        Take::None => key > threshold,
        Take::First(_) => {
            if key == threshold && *left > 0 {
                *left -= 1;
                true
            } else {
                key > threshold
            }
        }
    }
}

/// The merge over `inputs` (`[base, m...]`, at least the base: `methods::apply` checks).
pub(super) fn apply(op: &GtaOp, inputs: &Inputs) -> Vec<f32> {
    let GtaOp {
        kind,
        weights,
        densities,
        gammas,
        epsilons,
        lambda,
        normalize,
        rescale,
        keys,
    } = op;
    let n = inputs.numel();
    let m = inputs.len() - 1;
    if m == 0 {
        return inputs.to_f32(0);
    }
    // sema gives every model every parameter; the defaults only guard malformed ops
    let weights: Vec<f32> = (0..m)
        .map(|i| weights.get(i).copied().unwrap_or(1.0) as f32)
        .collect();
    let row = inputs.shape.last().copied().unwrap_or(1).max(1);
    let sparsifier = kind.sparsifier();
    let models: Vec<Model> = (0..m)
        .map(|i| Model {
            input: i + 1,
            density: densities.get(i).copied().unwrap_or(1.0),
            gamma: gammas.get(i).copied().unwrap_or(0.01),
            epsilon: epsilons.get(i).copied().unwrap_or(0.0),
            key: keys.get(i).copied().unwrap_or(0),
        })
        .collect();
    // Magnitude trims of all models at once, as thresholds (no per-element keys or bits).
    let trimmed: Vec<usize> = (0..m)
        .filter(|&i| {
            let d = models[i].density;
            sparsifier == Sparsifier::Magnitude && d > 0.0 && d < 1.0 && n <= u32::MAX as usize
        })
        .collect();
    let trims: Vec<(usize, usize)> = trimmed
        .iter()
        .map(|&i| (i + 1, ((models[i].density * n as f64) as usize).max(1)))
        .collect();
    let mut tops = magnitude_tops(inputs, &trims, *rescale).into_iter();
    let mut scratch: Vec<u32> = Vec::new();
    let kept: Vec<Kept> = models
        .iter()
        .enumerate()
        .map(|(i, model)| {
            if trimmed.contains(&i) {
                if let Some(kept) = tops.next() {
                    return kept;
                }
            }
            sparsify(inputs, sparsifier, model, row, *rescale, &mut scratch)
        })
        .collect();
    drop(scratch);
    combine(
        inputs,
        kind.consensus(),
        &weights,
        &kept,
        *normalize,
        *lambda as f32,
    )
}

/// Decodes the base and model `input` from element `start` on and writes `δ = x − base` to
/// `delta` (`base` is scratch of the same length).
fn decode_delta(inputs: &Inputs, input: usize, start: usize, base: &mut [f32], delta: &mut [f32]) {
    let range = start..start + delta.len();
    inputs.decode(0, range.clone(), base);
    inputs.decode(input, range, delta);
    for (d, b) in delta.iter_mut().zip(base.iter()) {
        *d -= *b;
    }
}

fn chunk_buffers() -> (Scratch<f32>, Scratch<f32>) {
    (Scratch::new(CHUNK), Scratch::new(CHUNK))
}
