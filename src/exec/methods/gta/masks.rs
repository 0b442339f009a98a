//! The bitset masks of the sparsifiers that need one (a magnitude trim taken whole,
//! breadcrumbs' outlier window, DARE's Bernoulli draws, DELLA's rank-scaled draws) and
//! their L1 rescale factors.

use rayon::prelude::*;

use super::super::rng;
use super::super::select::{abs_key, select_top_k, Selection};
use super::super::{Inputs, CHUNK};
use super::{chunk_buffers, decode_delta, Kept, Mask, Model, Sparsifier, RESCALE_EPS, WORDS};

/// Which elements of one model's delta survive its sparsifier, and the rescale factor.
pub(super) fn sparsify(
    inputs: &Inputs,
    sparsifier: Sparsifier,
    model: &Model,
    row: usize,
    rescale: bool,
    scratch: &mut Vec<u32>,
) -> Kept {
    let n = inputs.numel();
    let density = model.density;
    if sparsifier == Sparsifier::None || density >= 1.0 {
        return Kept::all();
    }
    let words = n.div_ceil(64);
    let (bits, sums) = match sparsifier {
        Sparsifier::None => return Kept::all(),
        Sparsifier::Magnitude if density <= 0.0 => (vec![0u64; words], Vec::new()),
        Sparsifier::Della if density <= 0.0 => (vec![0u64; words], Vec::new()),
        Sparsifier::Magnitude => {
            let keys = abs_keys(inputs, model.input, scratch);
            let k = ((density * n as f64) as usize).max(1);
            let bits = selection_bits(keys, &select_top_k(keys, k));
            let sums = key_sums(keys, &bits, rescale);
            (bits, sums)
        }
        Sparsifier::Outliers => {
            let keys = abs_keys(inputs, model.input, scratch);
            let target = ((density * n as f64) as usize).min(n);
            let top = ((model.gamma * n as f64) as usize).min(n - target);
            let mut bits = selection_bits(keys, &select_top_k(keys, top + target));
            if top > 0 {
                let above = selection_bits(keys, &select_top_k(keys, top));
                bits.par_iter_mut()
                    .zip(above.par_iter())
                    .for_each(|(b, a)| *b &= !a);
            }
            let sums = key_sums(keys, &bits, rescale);
            (bits, sums)
        }
        Sparsifier::Bernoulli => {
            let p = density as f32;
            random_bits(inputs, model, move |_| p)
        }
        Sparsifier::Della => {
            let ranks = row_ranks(inputs, model.input, row, scratch);
            let low = (density - model.epsilon) as f32;
            let span = (2.0 * model.epsilon) as f32;
            let denom = (row.max(2) - 1) as f32;
            random_bits(inputs, model, |j| {
                let rn = if row > 1 { ranks[j] as f32 / denom } else { 0.0 };
                low + rn * span
            })
        }
    };
    let scale = if rescale { l1_factor(&sums) } else { 1.0 };
    Kept {
        mask: Mask::Bits(bits),
        scale,
    }
}

/// `‖δ‖₁ / ‖mask·δ‖₁` from per-chunk `(before, after)` sums, 1 when either is below eps.
pub(super) fn l1_factor(sums: &[(f64, f64)]) -> f32 {
    let (before, after) = sums
        .iter()
        .fold((0f64, 0f64), |(b, a), (cb, ca)| (b + cb, a + ca));
    if before < RESCALE_EPS || after < RESCALE_EPS {
        1.0
    } else {
        (before / after) as f32
    }
}

/// `abs_key(δ)` of every element of model `input`, in `scratch`.
pub(super) fn abs_keys<'s>(inputs: &Inputs, input: usize, scratch: &'s mut Vec<u32>) -> &'s [u32] {
    scratch.resize(inputs.numel(), 0);
    scratch
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each_init(chunk_buffers, |(base, delta), (c, keys)| {
            let len = keys.len();
            decode_delta(inputs, input, c * CHUNK, &mut base[..len], &mut delta[..len]);
            for (k, d) in keys.iter_mut().zip(delta.iter()) {
                *k = abs_key(*d);
            }
        });
    scratch
}

/// The bits of `sel` over `keys` (ties at the threshold: lowest indices first).
pub(super) fn selection_bits(keys: &[u32], sel: &Selection) -> Vec<u64> {
    let mut bits = vec![0u64; keys.len().div_ceil(64)];
    if !sel.any {
        return bits;
    }
    let t = sel.threshold;
    if sel.take_equal == sel.equal_total {
        // Every key equal to the threshold is taken: a plain comparison, word by word.
        bits.par_chunks_mut(WORDS)
            .zip(keys.par_chunks(CHUNK))
            .for_each(|(ws, ks)| {
                for (w, group) in ws.iter_mut().zip(ks.chunks(64)) {
                    *w = group
                        .iter()
                        .enumerate()
                        .fold(0u64, |acc, (b, &k)| acc | (((k >= t) as u64) << b));
                }
            });
        return bits;
    }
    // how many threshold-equal keys each chunk takes: the first take_equal overall
    let equal: Vec<usize> = keys
        .par_chunks(CHUNK)
        .map(|ks| ks.iter().filter(|&&k| k == t).count())
        .collect();
    let mut left = sel.take_equal;
    let budgets: Vec<usize> = equal
        .iter()
        .map(|&e| {
            let take = e.min(left);
            left -= take;
            take
        })
        .collect();
    bits.par_chunks_mut(WORDS)
        .zip(keys.par_chunks(CHUNK))
        .zip(budgets.par_iter())
        .for_each(|((ws, ks), &budget)| {
            let mut left = budget;
            for (j, &k) in ks.iter().enumerate() {
                let keep = if k == t && left > 0 {
                    left -= 1;
                    true
                } else {
                    k > t
                };
                if keep {
                    ws[j / 64] |= 1 << (j % 64);
                }
            }
        });
    bits
}

/// Per-chunk `(Σ|δ|, Σ|δ| over kept)` from the magnitude keys (empty unless `rescale`).
pub(super) fn key_sums(keys: &[u32], bits: &[u64], rescale: bool) -> Vec<(f64, f64)> {
    if !rescale {
        return Vec::new();
    }
    keys.par_chunks(CHUNK)
        .zip(bits.par_chunks(WORDS))
        .map(|(ks, ws)| {
            let (mut before, mut after) = (0f64, 0f64);
            for (j, &k) in ks.iter().enumerate() {
                let a = f32::from_bits(k) as f64;
                before += a;
                if ws[j / 64] >> (j % 64) & 1 == 1 {
                    after += a;
                }
            }
            (before, after)
        })
        .collect()
}

/// Keeps element `j` when `uniform(key, j) < p(j)`; also the per-chunk L1 sums.
pub(super) fn random_bits(
    inputs: &Inputs,
    model: &Model,
    p: impl Fn(usize) -> f32 + Sync,
) -> (Vec<u64>, Vec<(f64, f64)>) {
    let n = inputs.numel();
    let mut bits = vec![0u64; n.div_ceil(64)];
    let sums: Vec<(f64, f64)> = bits
        .par_chunks_mut(WORDS)
        .enumerate()
        .map_init(chunk_buffers, |(base, delta), (c, ws)| {
            let start = c * CHUNK;
            let len = CHUNK.min(n - start);
            decode_delta(inputs, model.input, start, &mut base[..len], &mut delta[..len]);
            let (mut before, mut after) = (0f64, 0f64);
            for (j, d) in delta[..len].iter().enumerate() {
                let a = d.abs() as f64;
                before += a;
                let index = start + j;
                if rng::bernoulli(model.key, index as u64, p(index)) {
                    ws[j / 64] |= 1 << (j % 64);
                    after += a;
                }
            }
            (before, after)
        })
        .collect();
    (bits, sums)
}

/// The 0-based ascending rank of `|δ|` within its row (ties: lower index first), in
/// `scratch`.
pub(super) fn row_ranks<'s>(
    inputs: &Inputs,
    input: usize,
    row: usize,
    scratch: &'s mut Vec<u32>,
) -> &'s [u32] {
    scratch.resize(inputs.numel(), 0);
    let rows_per_task = (CHUNK / row).max(1);
    scratch
        .par_chunks_mut(rows_per_task * row)
        .enumerate()
        .for_each(|(c, ranks)| {
            let len = ranks.len();
            let mut base = vec![0f32; len];
            let mut delta = vec![0f32; len];
            decode_delta(inputs, input, c * rows_per_task * row, &mut base, &mut delta);
            // (key, index) packed: one u64 sort orders by |δ|, then by index
            let mut order: Vec<u64> = Vec::with_capacity(row);
            for (rs, ds) in ranks.chunks_mut(row).zip(delta.chunks(row)) {
                order.clear();
                order.extend(
                    ds.iter()
                        .enumerate()
                        .map(|(j, d)| (abs_key(*d) as u64) << 32 | j as u64),
                );
                order.sort_unstable();
                for (r, &o) in order.iter().enumerate() {
                    rs[o as u32 as usize] = r as u32;
                }
            }
        });
    scratch
}
