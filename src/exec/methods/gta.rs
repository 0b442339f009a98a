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
//! at most [`candidate_cap`] per model; [`MethodOp::working_bytes`] states the bound); for the other
//! sparsifiers, one bit per element per sparsified model (`n/8` bytes each) and, while a
//! mask is built, one `u32` per element (`4n`: keys or ranks, reused model after model and
//! freed before the output is allocated) and, for breadcrumbs, a second bitset; per
//! worker, chunk buffers of `(M + 3)·CHUNK` f32, kept by the thread between calls.

use rayon::prelude::*;

use super::rng;
use super::select::{abs_key, select_top_k, Selection};
use super::{Inputs, Scratch, CHUNK};
use crate::ops::cost::{candidate_cap, SAMPLE_BLOCK};
use crate::ops::{MethodOp, Sparsifier};

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

pub(super) fn apply(op: &MethodOp, inputs: &Inputs) -> Vec<f32> {
    let n = inputs.numel();
    let MethodOp::Gta {
        kind,
        weights,
        densities,
        gammas,
        epsilons,
        lambda,
        normalize,
        rescale,
        keys,
    } = op
    else {
        return vec![f32::NAN; n];
    };
    if n == 0 {
        return Vec::new();
    }
    if inputs.is_empty() {
        return vec![f32::NAN; n];
    }
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

/// Which elements of one model's delta survive its sparsifier, and the rescale factor.
fn sparsify(
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

/// Buckets per level of the exact windows of [`magnitude_tops`]: 4096 `u32` counts per
/// model stay in the first-level cache. Keys are 31 bits (bit 31 of an `abs_key` is 0):
/// levels of 12, 12 and 7 bits narrow a window down to one key.
const LEVEL_BITS: u32 = 12;
const KEY_BITS: u32 = 31;

/// Tensors with fewer elements skip the sample and find their windows by histogram.
const SAMPLE_MIN: usize = 1 << 18;
/// The sample: `SAMPLE_BLOCK` consecutive elements every `SAMPLE_STRIDE` (1/16 of them).
const SAMPLE_STRIDE: usize = 16 * SAMPLE_BLOCK;

/// The magnitude trims of several models (`(input, k)`: keep the `k` largest `|δ|`, ties
/// by lower index) as thresholds, so no per-element key or mask is ever stored.
///
/// Each model gets a window `[lo, hi]` of keys meant to hold its `k`-th largest key: from
/// a sample of 1/16 of the elements (wide enough that missing is a 5-sigma event), or,
/// for small tensors and when the sample missed, exactly, from histograms that narrow the
/// range level by level until it holds at most [`candidate_cap`] keys or is one key. One
/// pass over the inputs (decoding each chunk of the base once for every model) then counts
/// the keys above the window and collects the keys inside it, chunk by chunk, up to the
/// cap; when the `k`-th largest key is among them, a selection over the collected keys
/// gives the threshold and each chunk's share of the keys equal to it (for a one-key
/// window, the per-chunk counts give both). With `rescale`, a last pass sums `|δ|` before
/// and after the trim (per chunk, in f64, as `key_sums` does).
///
/// The result keeps exactly the elements [`select_top_k`] over all keys would.
fn magnitude_tops(inputs: &Inputs, trims: &[(usize, usize)], rescale: bool) -> Vec<Kept> {
    magnitude_tops_capped(inputs, trims, rescale, candidate_cap(inputs.numel()))
}

fn magnitude_tops_capped(inputs: &Inputs, trims: &[(usize, usize)], rescale: bool, cap: usize) -> Vec<Kept> {
    if trims.is_empty() {
        return Vec::new();
    }
    let n = inputs.numel();
    let q = trims.len();
    let mut tops: Vec<Option<Top>> = (0..q).map(|_| None).collect();
    let mut pending: Vec<usize> = (0..q).collect();
    let mut windows: Vec<(u32, u32)> = if n >= SAMPLE_MIN {
        sample_windows(inputs, trims)
    } else {
        exact_windows(inputs, trims, &pending, cap)
    };
    // Two rounds at most: the sampled windows, then exact ones for the models they missed
    // (an exact window never misses and never overflows the cap).
    for round in 0..2 {
        let subset: Vec<(usize, usize)> = pending.iter().map(|&i| trims[i]).collect();
        let found = collect_window(inputs, &subset, &windows, cap);
        let mut missed = Vec::new();
        for (j, &i) in pending.iter().enumerate() {
            match resolve(trims[i].1, &found, j, windows[j]) {
                Some(top) => tops[i] = Some(top),
                None => missed.push(i),
            }
        }
        if missed.is_empty() || round == 1 {
            break;
        }
        windows = exact_windows(inputs, trims, &missed, cap);
        pending = missed;
    }
    // An exact window never misses; this only guards against a broken invariant.
    let tops: Vec<Top> = tops
        .into_iter()
        .map(|t| {
            t.unwrap_or(Top {
                threshold: 0,
                takes: vec![Take::All; n.div_ceil(CHUNK)],
            })
        })
        .collect();
    let scales = if rescale {
        top_scales(inputs, trims, &tops)
    } else {
        vec![1.0; q]
    };
    tops.into_iter()
        .zip(scales)
        .map(|(top, scale)| Kept {
            mask: Mask::Top(top),
            scale,
        })
        .collect()
}

/// `abs_key(δ)` of input `input` from element `start` on into `keys`, with `base` already
/// decoded from the same element (`x` is scratch of the same length).
fn delta_keys(inputs: &Inputs, input: usize, start: usize, base: &[f32], x: &mut [f32], keys: &mut [u32]) {
    inputs.decode(input, start..start + x.len(), x);
    for ((k, v), b) in keys.iter_mut().zip(x.iter()).zip(base) {
        *k = abs_key(*v - *b);
    }
}

/// Windows from a sample of every model's keys (blocks spread over the whole tensor).
fn sample_windows(inputs: &Inputs, trims: &[(usize, usize)]) -> Vec<(u32, u32)> {
    let n = inputs.numel();
    let blocks = n.div_ceil(SAMPLE_STRIDE);
    let samples: Vec<Vec<Vec<u32>>> = (0..blocks)
        .into_par_iter()
        .map(|blk| {
            let start = blk * SAMPLE_STRIDE;
            let len = SAMPLE_BLOCK.min(n - start);
            let mut base = vec![0f32; len];
            let mut x = vec![0f32; len];
            inputs.decode(0, start..start + len, &mut base);
            trims
                .iter()
                .map(|&(input, _)| {
                    let mut keys = vec![0u32; len];
                    delta_keys(inputs, input, start, &base, &mut x, &mut keys);
                    keys
                })
                .collect()
        })
        .collect();
    trims
        .iter()
        .enumerate()
        .map(|(j, &(_, k))| {
            let mut keys: Vec<u32> = samples.iter().flat_map(|b| b[j].iter().copied()).collect();
            let s = keys.len();
            let p = k as f64 / n as f64;
            let r = p * s as f64;
            let margin = 5.0 * (s as f64 * p * (1.0 - p)).sqrt() + 32.0;
            let (hi_rank, lo_rank) = (r - margin, r + margin);
            let mut nth = |rank: usize| *keys.select_nth_unstable_by(rank, |a, b| b.cmp(a)).1;
            let hi = if hi_rank < 0.0 || s == 0 {
                u32::MAX
            } else {
                nth(hi_rank as usize)
            };
            let lo = if lo_rank >= s as f64 || s == 0 {
                0
            } else {
                nth(lo_rank.ceil() as usize)
            };
            (lo, hi.max(lo))
        })
        .collect()
}

/// Exact windows for models `which`: starting from all keys, a histogram of the window's
/// next bits (counting only keys inside it) finds the bucket holding the `k`-th largest
/// key, which becomes the window, until it holds at most `cap` keys or one key value.
fn exact_windows(inputs: &Inputs, trims: &[(usize, usize)], which: &[usize], cap: usize) -> Vec<(u32, u32)> {
    let n = inputs.numel();
    // Per model: the window, the keys above it, and whether it is final.
    let mut state: Vec<((u32, u32), usize, bool)> = which
        .iter()
        .map(|_| ((0, (1 << KEY_BITS) - 1), 0, false))
        .collect();
    let mut bits_left = KEY_BITS;
    while bits_left > 0 && state.iter().any(|s| !s.2) {
        let level = LEVEL_BITS.min(bits_left);
        let shift = bits_left - level;
        let buckets = 1usize << level;
        let open: Vec<usize> = (0..which.len()).filter(|&j| !state[j].2).collect();
        let q = open.len();
        let hist: Vec<u32> = (0..n.div_ceil(CHUNK))
            .into_par_iter()
            .fold(
                || (chunk_buffers(), vec![0u32; q * buckets]),
                |((mut base, mut x), mut hist), c| {
                    let start = c * CHUNK;
                    let len = CHUNK.min(n - start);
                    inputs.decode(0, start..start + len, &mut base[..len]);
                    for (&j, hist) in open.iter().zip(hist.chunks_mut(buckets)) {
                        let ((lo, hi), _, _) = state[j];
                        inputs.decode(trims[which[j]].0, start..start + len, &mut x[..len]);
                        for (v, b) in x[..len].iter().zip(&base[..len]) {
                            let key = abs_key(*v - *b);
                            if key.wrapping_sub(lo) <= hi - lo {
                                hist[((key - lo) >> shift) as usize & (buckets - 1)] += 1;
                            }
                        }
                    }
                    ((base, x), hist)
                },
            )
            .map(|(_, hist)| hist)
            .reduce(
                || vec![0u32; q * buckets],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += *y);
                    a
                },
            );
        for (&j, hist) in open.iter().zip(hist.chunks(buckets)) {
            let ((lo, _), above, _) = state[j];
            let k = trims[which[j]].1;
            let mut above = above;
            let mut bucket = 0usize;
            for b in (0..buckets).rev() {
                let count = hist[b] as usize;
                if above + count >= k {
                    bucket = b;
                    break;
                }
                above += count;
            }
            let blo = lo + ((bucket as u32) << shift);
            let bhi = blo + ((1u32 << shift) - 1);
            let done = hist[bucket] as usize <= cap || shift == 0;
            state[j] = ((blo, bhi), above, done);
        }
        bits_left = shift;
    }
    state.into_iter().map(|(w, _, _)| w).collect()
}

/// What one pass found for one model in one chunk: keys above the window, keys inside it,
/// and the inside keys themselves when they were stored.
struct Found {
    above: usize,
    inside: usize,
    keys: Option<Vec<u32>>,
}

/// One pass: per chunk and model (`[chunk][model]`), the keys above the model's window and
/// inside it. Inside keys are stored while the model's total stays within `cap` (not for
/// a one-key window, where the counts say everything).
fn collect_window(
    inputs: &Inputs,
    trims: &[(usize, usize)],
    windows: &[(u32, u32)],
    cap: usize,
) -> Vec<Vec<Found>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let n = inputs.numel();
    let stored: Vec<AtomicUsize> = trims.iter().map(|_| AtomicUsize::new(0)).collect();
    (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map_init(
            || (chunk_buffers(), Scratch::<u32>::new(CHUNK)),
            |((base, x), found), c| {
                let start = c * CHUNK;
                let len = CHUNK.min(n - start);
                inputs.decode(0, start..start + len, &mut base[..len]);
                trims
                    .iter()
                    .zip(windows)
                    .zip(&stored)
                    .map(|((&(input, _), &(lo, hi)), stored)| {
                        inputs.decode(input, start..start + len, &mut x[..len]);
                        // Branch-free: every key is stored, the count moves only for keys
                        // inside the window.
                        let (mut above, mut count) = (0usize, 0usize);
                        for (v, b) in x[..len].iter().zip(&base[..len]) {
                            let key = abs_key(*v - *b);
                            above += (key > hi) as usize;
                            found[count] = key;
                            count += (key.wrapping_sub(lo) <= hi - lo) as usize;
                        }
                        // Reserve room under the cap before allocating.
                        let keys = (lo != hi && stored.fetch_add(count, Ordering::Relaxed) + count <= cap)
                            .then(|| found[..count].to_vec());
                        Found {
                            above,
                            inside: count,
                            keys,
                        }
                    })
                    .collect()
            },
        )
        .collect()
}

/// The [`Top`] of model `j` when its `k`-th largest key is inside its window and the
/// window's keys were stored (or it is one key).
fn resolve(k: usize, found: &[Vec<Found>], j: usize, window: (u32, u32)) -> Option<Top> {
    let above: usize = found.iter().map(|c| c[j].above).sum();
    let total: usize = found.iter().map(|c| c[j].inside).sum();
    if k <= above || k > above + total {
        return None;
    }
    let (threshold, greater) = if window.0 == window.1 {
        (window.0, above)
    } else {
        if found.iter().any(|c| c[j].keys.is_none()) {
            return None;
        }
        let mut keys: Vec<u32> = found
            .iter()
            .flat_map(|c| c[j].keys.iter().flatten().copied())
            .collect();
        let threshold = *keys.select_nth_unstable_by(k - above - 1, |a, b| b.cmp(a)).1;
        let greater = above + keys.iter().filter(|&&key| key > threshold).count();
        (threshold, greater)
    };
    let mut left = k - greater;
    let takes = found
        .iter()
        .map(|c| {
            let equal = match &c[j].keys {
                Some(keys) => keys.iter().filter(|&&key| key == threshold).count(),
                None => c[j].inside,
            };
            let take = equal.min(left);
            left -= take;
            if take == equal {
                Take::All
            } else if take == 0 {
                Take::None
            } else {
                Take::First(take)
            }
        })
        .collect();
    Some(Top { threshold, takes })
}

/// `‖δ‖₁ / ‖mask·δ‖₁` of every trimmed model, with `key_sums`' order of additions.
fn top_scales(inputs: &Inputs, trims: &[(usize, usize)], tops: &[Top]) -> Vec<f32> {
    let n = inputs.numel();
    let sums: Vec<Vec<(f64, f64)>> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map_init(chunk_buffers, |(base, x), c| {
            let start = c * CHUNK;
            let len = CHUNK.min(n - start);
            inputs.decode(0, start..start + len, &mut base[..len]);
            trims
                .iter()
                .zip(tops)
                .map(|(&(input, _), top)| {
                    inputs.decode(input, start..start + len, &mut x[..len]);
                    let (t, take) = (top.threshold, top.takes[c]);
                    let mut left = match take {
                        Take::First(n) => n,
                        _ => 0,
                    };
                    let (mut before, mut after) = (0f64, 0f64);
                    for (v, b) in x[..len].iter().zip(&base[..len]) {
                        let key = abs_key(*v - *b);
                        let a = f32::from_bits(key) as f64;
                        before += a;
                        if keeps(key, t, take, &mut left) {
                            after += a;
                        }
                    }
                    (before, after)
                })
                .collect()
        })
        .collect();
    (0..trims.len())
        .map(|j| l1_factor(&sums.iter().map(|s| s[j]).collect::<Vec<_>>()))
        .collect()
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

/// `‖δ‖₁ / ‖mask·δ‖₁` from per-chunk `(before, after)` sums, 1 when either is below eps.
fn l1_factor(sums: &[(f64, f64)]) -> f32 {
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
fn abs_keys<'s>(inputs: &Inputs, input: usize, scratch: &'s mut Vec<u32>) -> &'s [u32] {
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
fn selection_bits(keys: &[u32], sel: &Selection) -> Vec<u64> {
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
fn key_sums(keys: &[u32], bits: &[u64], rescale: bool) -> Vec<(f64, f64)> {
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
fn random_bits(
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
fn row_ranks<'s>(inputs: &Inputs, input: usize, row: usize, scratch: &'s mut Vec<u32>) -> &'s [u32] {
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

/// Elements per sub-block of the combine pass (a multiple of 64 dividing CHUNK).
const SUB: usize = 8192;

/// Pass 2: the merged tensor, chunk by chunk.
fn combine(
    inputs: &Inputs,
    consensus: bool,
    weights: &[f32],
    kept: &[Kept],
    normalize: bool,
    lambda: f32,
) -> Vec<f32> {
    let n = inputs.numel();
    let m = kept.len();
    let linear_div = {
        let s = weights.iter().fold(0f32, |s, w| s + w);
        if s.abs() < 1e-8 {
            1.0
        } else {
            s
        }
    };
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || {
            (
                Scratch::<f32>::new(SUB),
                Scratch::<f32>::new(m * SUB),
                Scratch::<f32>::new(SUB),
                Scratch::<f32>::new(SUB),
                vec![0usize; m],
            )
        },
        |(base, wd, sum, div, lefts), (c, chunk_out)| {
            // The equal keys a Take::First chunk still keeps, carried across sub-blocks.
            for (left, kept) in lefts.iter_mut().zip(kept) {
                *left = match &kept.mask {
                    Mask::Top(top) => match top.takes[c] {
                        Take::First(n) => n,
                        _ => 0,
                    },
                    _ => 0,
                };
            }
            // Sub-blocks small enough that the M + 3 working arrays stay in cache; every
            // element still sees the same operations in the same order.
            for (sb, out) in chunk_out.chunks_mut(SUB).enumerate() {
                let start = c * CHUNK + sb * SUB;
                let len = out.len();
                let base = &mut base[..len];
                inputs.decode(0, start..start + len, base);
                for (i, (kept, &w)) in kept.iter().zip(weights).enumerate() {
                    let wd = &mut wd[i * SUB..i * SUB + len];
                    inputs.decode(i + 1, start..start + len, wd);
                    // Branch-free: the kept bit selects between the delta and 0 (a branch on
                    // random mask bits mispredicts half the time).
                    let scale = kept.scale;
                    match &kept.mask {
                        Mask::All => {
                            for (v, b) in wd.iter_mut().zip(base.iter()) {
                                *v = ((*v - *b) * scale) * w;
                            }
                        }
                        Mask::Bits(bits) => {
                            // SUB is a multiple of 64, so a sub-block starts on a word boundary.
                            let words = &bits[start / 64..];
                            for (j, (v, b)) in wd.iter_mut().zip(base.iter()).enumerate() {
                                let keep = (words[j / 64] >> (j % 64)) & 1 == 1;
                                let d = (*v - *b) * scale;
                                *v = if keep { d } else { 0.0 } * w;
                            }
                        }
                        Mask::Top(top) => {
                            let t = top.threshold;
                            match top.takes[c] {
                                Take::All => {
                                    for (v, b) in wd.iter_mut().zip(base.iter()) {
                                        let d = *v - *b;
                                        let keep = abs_key(d) >= t;
                                        *v = if keep { d * scale } else { 0.0 } * w;
                                    }
                                }
                                Take::None => {
                                    for (v, b) in wd.iter_mut().zip(base.iter()) {
                                        let d = *v - *b;
                                        let keep = abs_key(d) > t;
                                        *v = if keep { d * scale } else { 0.0 } * w;
                                    }
                                }
                                take @ Take::First(_) => {
                                    let left = &mut lefts[i];
                                    for (v, b) in wd.iter_mut().zip(base.iter()) {
                                        let d = *v - *b;
                                        let keep = keeps(abs_key(d), t, take, left);
                                        *v = if keep { d * scale } else { 0.0 } * w;
                                    }
                                }
                            }
                        }
                    }
                }
                // Model by model over the whole chunk, so each loop is straight-line and
                // vectorises; per element, the models are still added in model order.
                let mixed = out;
                let wd_of = |i: usize| &wd[i * SUB..i * SUB + len];
                mixed.fill(0.0);
                if consensus {
                    let sum = &mut sum[..len];
                    sum.fill(0.0);
                    for i in 0..m {
                        sum.iter_mut().zip(wd_of(i)).for_each(|(s, v)| *s += *v);
                    }
                    let div = &mut div[..len];
                    div.fill(0.0);
                    for (i, &w) in weights.iter().enumerate() {
                        for ((x, d), (v, s)) in mixed
                            .iter_mut()
                            .zip(div.iter_mut())
                            .zip(wd_of(i).iter().zip(sum.iter()))
                        {
                            let agrees = if *s >= 0.0 { *v > 0.0 } else { *v < 0.0 };
                            *x += if agrees { *v } else { 0.0 };
                            *d += if agrees { w } else { 0.0 };
                        }
                    }
                    if normalize {
                        mixed
                            .iter_mut()
                            .zip(div.iter())
                            .for_each(|(x, d)| *x /= if *d == 0.0 { 1.0 } else { *d });
                    }
                } else {
                    for i in 0..m {
                        mixed.iter_mut().zip(wd_of(i)).for_each(|(x, v)| *x += *v);
                    }
                    if normalize {
                        mixed.iter_mut().for_each(|x| *x /= linear_div);
                    }
                }
                if lambda != 1.0 {
                    mixed.iter_mut().for_each(|x| *x *= lambda);
                }
                mixed.iter_mut().zip(base.iter()).for_each(|(x, b)| *x += *b);
            }
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::super::{Inputs, MethodInput, CHUNK};
    use super::*;
    use crate::io::DType;
    use crate::ops::{rng_key, GtaKind};

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn run(op: &MethodOp, tensors: &[Vec<f32>], shape: &[usize]) -> Vec<f32> {
        let stored: Vec<Vec<u8>> = tensors.iter().map(|t| bytes(t)).collect();
        let inputs: Vec<MethodInput> = stored
            .iter()
            .map(|b| MethodInput {
                bytes: b,
                dtype: DType::F32,
            })
            .collect();
        apply(
            op,
            &Inputs {
                tensors: &inputs,
                shape,
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn gta(
        kind: GtaKind,
        weights: &[f64],
        densities: &[f64],
        gammas: &[f64],
        epsilons: &[f64],
        lambda: f64,
        normalize: bool,
        rescale: bool,
    ) -> MethodOp {
        let m = weights.len();
        let or = |v: &[f64], d: f64| if v.is_empty() { vec![d; m] } else { v.to_vec() };
        MethodOp::Gta {
            kind,
            weights: weights.to_vec(),
            densities: or(densities, 1.0),
            gammas: or(gammas, 0.01),
            epsilons: or(epsilons, 0.0),
            lambda,
            normalize,
            rescale,
            keys: (0..m as u64).map(|i| 0x5eed_0000 + 77 * i).collect(),
        }
    }

    fn simple(kind: GtaKind, weights: &[f64], densities: &[f64], normalize: bool) -> MethodOp {
        gta(kind, weights, densities, &[], &[], 1.0, normalize, false)
    }

    // ---- an independent whole-tensor reference (sorts, no chunks, no bitsets) ----

    /// Indices by descending |x|, ties by lower index.
    fn order_desc(d: &[f32]) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..d.len()).collect();
        idx.sort_by(|&a, &b| d[b].abs().total_cmp(&d[a].abs()).then(a.cmp(&b)));
        idx
    }

    fn reference(op: &MethodOp, tensors: &[Vec<f32>], shape: &[usize]) -> Vec<f32> {
        let MethodOp::Gta {
            kind,
            weights,
            densities,
            gammas,
            epsilons,
            lambda,
            normalize,
            rescale,
            keys,
        } = op
        else {
            unreachable!()
        };
        let base = &tensors[0];
        let n = base.len();
        let row = *shape.last().unwrap();
        let mut wds = Vec::new();
        for (i, x) in tensors[1..].iter().enumerate() {
            let d: Vec<f32> = x.iter().zip(base).map(|(x, b)| x - b).collect();
            let dens = densities[i];
            let mask: Option<Vec<bool>> = if dens >= 1.0 {
                None
            } else {
                let mut mask = vec![false; n];
                match kind {
                    GtaKind::TaskArithmetic => mask = vec![true; n],
                    GtaKind::Ties if dens > 0.0 => {
                        let k = ((dens * n as f64) as usize).max(1);
                        for &j in &order_desc(&d)[..k] {
                            mask[j] = true;
                        }
                    }
                    GtaKind::Breadcrumbs | GtaKind::BreadcrumbsTies => {
                        // mergekit's index arithmetic on the ascending order, where the
                        // ascending order is the descending one reversed
                        let target = (dens * n as f64) as i64;
                        let mut n_top = (gammas[i] * n as f64) as i64;
                        let mut n_bot = n as i64 - target - n_top;
                        if n_bot < 0 {
                            n_top += n_bot;
                            n_bot = 0;
                        }
                        let asc: Vec<usize> = order_desc(&d).into_iter().rev().collect();
                        for &j in &asc[n_bot as usize..n - n_top as usize] {
                            mask[j] = true;
                        }
                    }
                    GtaKind::DareTies | GtaKind::DareLinear => {
                        for (j, m) in mask.iter_mut().enumerate() {
                            *m = rng::uniform(keys[i], j as u64) < dens as f32;
                        }
                    }
                    GtaKind::Della | GtaKind::DellaLinear if dens > 0.0 => {
                        let eps = epsilons[i];
                        for r in 0..n / row {
                            let rd = &d[r * row..(r + 1) * row];
                            let asc: Vec<usize> = order_desc(rd).into_iter().rev().collect();
                            // reversing turns index-ascending ties into descending ones:
                            // restore index order among equal magnitudes
                            let mut asc = asc;
                            asc.sort_by(|&a, &b| rd[a].abs().total_cmp(&rd[b].abs()).then(a.cmp(&b)));
                            for (rank, &j) in asc.iter().enumerate() {
                                let rn = if row > 1 {
                                    rank as f32 / (row - 1) as f32
                                } else {
                                    0.0
                                };
                                let p = (dens - eps) as f32 + rn * (2.0 * eps) as f32;
                                let g = r * row + j;
                                mask[g] = rng::uniform(keys[i], g as u64) < p;
                            }
                        }
                    }
                    _ => {}
                }
                Some(mask)
            };
            let mut s = 1f32;
            if let Some(mask) = &mask {
                if *rescale {
                    let before: f64 = d.iter().map(|v| v.abs() as f64).sum();
                    let after: f64 = d
                        .iter()
                        .zip(mask)
                        .filter(|(_, &m)| m)
                        .map(|(v, _)| v.abs() as f64)
                        .sum();
                    if before >= 1e-7 && after >= 1e-7 {
                        s = (before / after) as f32;
                    }
                }
            }
            let w = weights[i] as f32;
            wds.push(
                (0..n)
                    .map(|j| {
                        let keep = mask.as_ref().is_none_or(|m| m[j]);
                        (if keep { d[j] * s } else { 0.0 }) * w
                    })
                    .collect::<Vec<f32>>(),
            );
        }
        let ws: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
        (0..n)
            .map(|j| {
                let (mut mixed, mut div) = (0f32, 0f32);
                if kind.consensus() {
                    let sum: f32 = wds.iter().fold(0.0, |s, wd| s + wd[j]);
                    let maj = if sum >= 0.0 { 1.0 } else { -1.0 };
                    for (wd, &w) in wds.iter().zip(&ws) {
                        if wd[j] != 0.0 && wd[j].signum() == maj {
                            mixed += wd[j];
                            div += w;
                        }
                    }
                    if div == 0.0 {
                        div = 1.0;
                    }
                } else {
                    for (wd, &w) in wds.iter().zip(&ws) {
                        mixed += wd[j];
                        div += w;
                    }
                    if div.abs() < 1e-8 {
                        div = 1.0;
                    }
                }
                if *normalize {
                    mixed /= div;
                }
                base[j] + mixed * *lambda as f32
            })
            .collect()
    }

    const KINDS: [GtaKind; 8] = [
        GtaKind::TaskArithmetic,
        GtaKind::Ties,
        GtaKind::DareTies,
        GtaKind::DareLinear,
        GtaKind::Breadcrumbs,
        GtaKind::BreadcrumbsTies,
        GtaKind::Della,
        GtaKind::DellaLinear,
    ];

    /// Inputs with many tied magnitudes (deltas on a coarse grid), spanning several chunks.
    fn random_models(n: usize, m: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut s = seed;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let base: Vec<f32> = (0..n).map(|_| (next() % 1000) as f32 / 512.0 - 1.0).collect();
        let mut out = vec![base.clone()];
        for _ in 0..m {
            out.push(
                base.iter()
                    .map(|b| b + ((next() % 33) as f32 - 16.0) / 64.0)
                    .collect(),
            );
        }
        out
    }

    #[test]
    fn all_kinds_match_the_whole_tensor_reference() {
        for (shape, seed) in [
            (vec![3, 50_000], 1u64),
            (vec![1300, 130], 2),
            (vec![2 * CHUNK + 5], 3),
            (vec![40, 1], 4),
        ] {
            let n: usize = shape.iter().product();
            let t = random_models(n, 3, seed);
            for kind in KINDS {
                for (normalize, rescale) in [(false, false), (true, true)] {
                    let op = gta(
                        kind,
                        &[0.7, -0.3, 0.9],
                        &[0.45, 0.8, 0.3],
                        &[0.05, 0.0, 0.2],
                        &[0.2, 0.1, 0.25],
                        0.9,
                        normalize,
                        rescale,
                    );
                    let ours = run(&op, &t, &shape);
                    let want = reference(&op, &t, &shape);
                    let err = ours
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        err <= 1e-6,
                        "{kind:?} {shape:?} normalize {normalize}: max err {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let shape = [5, 40_000];
        let t = random_models(200_000, 3, 9);
        for kind in KINDS {
            let op = gta(
                kind,
                &[0.5, 0.6, 0.7],
                &[0.3, 0.5, 0.7],
                &[0.02; 3],
                &[0.1; 3],
                1.0,
                true,
                true,
            );
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| run(&op, &t, &shape));
            let three = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap()
                .install(|| run(&op, &t, &shape));
            assert!(
                one.iter().zip(&three).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{kind:?}"
            );
        }
    }

    /// What [`magnitude_tops`] keeps, element by element.
    fn top_mask(top: &Top, keys: &[u32]) -> Vec<bool> {
        let mut mask = Vec::with_capacity(keys.len());
        for (c, ks) in keys.chunks(CHUNK).enumerate() {
            let take = top.takes[c];
            let mut left = match take {
                Take::First(n) => n,
                _ => 0,
            };
            mask.extend(ks.iter().map(|&k| keeps(k, top.threshold, take, &mut left)));
        }
        mask
    }

    fn stored(tensors: &[Vec<f32>]) -> Vec<Vec<u8>> {
        tensors.iter().map(|t| bytes(t)).collect()
    }

    /// The thresholds keep exactly what the bitset path (all keys, `select_top_k`) keeps,
    /// and the merged result is the same bits: sampled windows, histogram windows, and a
    /// sample that misses (its blocks hold only small deltas) so the exact round runs.
    #[test]
    fn magnitude_thresholds_match_the_bitset_path() {
        let sampled = SAMPLE_MIN + 3 * CHUNK + 777;
        let mut missed = random_models(sampled, 3, 21);
        let base = missed[0].clone();
        for (j, v) in missed[1].iter_mut().enumerate() {
            if j % SAMPLE_STRIDE < SAMPLE_BLOCK {
                *v = base[j] + 1.0 / 4096.0;
            }
        }
        // Few distinct |δ|: masses of keys equal to the threshold.
        let mut ties = random_models(2 * CHUNK + 9, 3, 13);
        let base = ties[0].clone();
        for (i, model) in ties.iter_mut().enumerate().skip(1) {
            for (j, v) in model.iter_mut().enumerate() {
                *v = base[j] + ((j * i) % 5) as f32 * 0.25 - 0.5;
            }
        }
        let cases = [
            (random_models(sampled, 3, 11), "sampled"),
            (random_models(3 * CHUNK + 5, 3, 12), "histogram"),
            (missed, "missed sample"),
            (ties, "mass ties"),
        ];
        for (tensors, what) in &cases {
            let n = tensors[0].len();
            let raw = stored(tensors);
            let ins: Vec<MethodInput> = raw
                .iter()
                .map(|b| MethodInput {
                    bytes: b,
                    dtype: DType::F32,
                })
                .collect();
            let inputs = Inputs {
                tensors: &ins,
                shape: &[n],
            };
            for densities in [[0.5, 0.3, 0.9], [0.01, 0.99, 1.0 / n as f64]] {
                let trims: Vec<(usize, usize)> = densities
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (i + 1, ((d * n as f64) as usize).max(1)))
                    .collect();
                // The default cap, and caps that force narrower windows (down to one key)
                // and collections that overflow.
                for (rescale, cap) in [
                    (false, candidate_cap(n)),
                    (true, candidate_cap(n)),
                    (false, 1),
                    (true, 1000),
                ] {
                    let tops = magnitude_tops_capped(&inputs, &trims, rescale, cap);
                    let mut scratch = Vec::new();
                    let mut old = Vec::new();
                    for ((input, k), new) in trims.iter().zip(&tops) {
                        let keys = abs_keys(&inputs, *input, &mut scratch).to_vec();
                        let sel = select_top_k(&keys, *k);
                        let Mask::Top(top) = &new.mask else {
                            panic!("{what}: not a threshold")
                        };
                        assert_eq!(
                            top_mask(top, &keys),
                            sel.mask(&keys),
                            "{what} {densities:?} cap {cap}"
                        );
                        let bits = selection_bits(&keys, &sel);
                        let sums = key_sums(&keys, &bits, rescale);
                        let scale = if rescale { l1_factor(&sums) } else { 1.0 };
                        assert_eq!(new.scale.to_bits(), scale.to_bits(), "{what}");
                        old.push(Kept {
                            mask: Mask::Bits(bits),
                            scale,
                        });
                    }
                    let weights = [0.5f32, -0.3, 0.8];
                    let a = combine(&inputs, true, &weights, &tops, true, 0.9);
                    let b = combine(&inputs, true, &weights, &old, true, 0.9);
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{what}"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_tensor_and_base_only() {
        for kind in KINDS {
            let op = simple(kind, &[1.0], &[0.5], true);
            assert!(run(&op, &[vec![], vec![]], &[0, 4]).is_empty());
            let base = vec![1.0, -2.0, 3.5];
            assert_eq!(
                run(&simple(kind, &[], &[], true), std::slice::from_ref(&base), &[3]),
                base
            );
        }
    }

    #[test]
    fn task_arithmetic_weights_lambda_and_normalize() {
        let base = vec![1.0, 2.0, 3.0];
        let a = vec![2.0, 2.0, 1.0];
        let b = vec![1.0, 4.0, 3.0];
        let t = [base, a, b];
        let op = gta(
            GtaKind::TaskArithmetic,
            &[0.5, 2.0],
            &[],
            &[],
            &[],
            0.5,
            false,
            false,
        );
        // deltas (1, 0, -2) and (0, 2, 0)
        assert_eq!(run(&op, &t, &[3]), vec![1.25, 4.0, 2.5]);
        let op = gta(
            GtaKind::TaskArithmetic,
            &[0.5, 2.0],
            &[],
            &[],
            &[],
            1.0,
            true,
            false,
        );
        assert_eq!(run(&op, &t, &[3]), vec![1.2, 3.6, 2.6]);
        // weights summing to 0: the divisor becomes 1
        let op = simple(GtaKind::TaskArithmetic, &[1.0, -1.0], &[], true);
        assert_eq!(run(&op, &t, &[3]), vec![2.0, 0.0, 1.0]);
    }

    #[test]
    fn ties_zero_delta_neither_agrees_nor_divides() {
        let base = vec![1.0, 2.0, 3.0, 4.0];
        let a = vec![1.5, 1.5, 3.25, 4.0];
        let t = [base.clone(), a.clone(), base.clone()];
        let op = simple(GtaKind::Ties, &[1.0, 1.0], &[1.0, 1.0], true);
        assert_eq!(run(&op, &t, &[4]), a);
        // disagreeing signs: the sum elects, the loser is dropped
        let b = vec![0.0, 2.25, 3.0, 3.0];
        let op = simple(GtaKind::Ties, &[1.0, 3.0], &[1.0, 1.0], true);
        // weighted deltas (0.5, -0.5, 0.25, 0) and (-3, 0.75, 0, -3)
        assert_eq!(run(&op, &[base.clone(), a, b], &[4]), vec![0.0, 2.25, 3.25, 3.0]);
        // weights summing to 0 over the agreeing models: divisor 1
        let op = simple(GtaKind::Ties, &[1.0, -1.0], &[1.0, 1.0], true);
        let up = vec![2.0, 2.0, 3.0, 4.0];
        let down = vec![0.0, 2.0, 3.0, 4.0];
        assert_eq!(
            run(&op, &[base.clone(), up, down], &[4]),
            vec![3.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn ties_trim_keeps_at_least_one_and_breaks_ties_by_index() {
        let base = vec![0.0; 4];
        let x = vec![1.0, -1.0, 1.0, 0.5];
        let t = [base.clone(), x];
        assert_eq!(
            run(&simple(GtaKind::Ties, &[1.0], &[0.5], true), &t, &[4]),
            vec![1.0, -1.0, 0.0, 0.0]
        );
        // int(0.01 * 4) = 0, but one element is kept
        assert_eq!(
            run(&simple(GtaKind::Ties, &[1.0], &[0.01], true), &t, &[4]),
            vec![1.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(run(&simple(GtaKind::Ties, &[1.0], &[0.0], true), &t, &[4]), base);
        // rescaled: the kept L1 2 of 3.5
        let op = gta(GtaKind::Ties, &[1.0], &[0.5], &[], &[], 1.0, false, true);
        assert_eq!(run(&op, &t, &[4]), vec![1.75, -1.75, 0.0, 0.0]);
    }

    #[test]
    fn breadcrumbs_window() {
        let base = vec![0.0; 10];
        let x: Vec<f32> = (1..=10)
            .map(|v| if v % 2 == 0 { v as f32 } else { -(v as f32) })
            .collect();
        let t = [base, x.clone()];
        let keep = |dens: f64, gamma: f64| {
            let op = gta(
                GtaKind::Breadcrumbs,
                &[1.0],
                &[dens],
                &[gamma],
                &[],
                1.0,
                false,
                false,
            );
            let out = run(&op, &t, &[10]);
            (0..10)
                .filter(|&j| out[j] != 0.0)
                .map(|j| j + 1)
                .collect::<Vec<usize>>()
        };
        // gamma·n < 1: no outliers removed, the top `density` kept (mergekit zeroes all)
        assert_eq!(keep(0.3, 0.0), vec![8, 9, 10]);
        assert_eq!(keep(0.3, 0.05), vec![8, 9, 10]);
        assert_eq!(keep(0.3, 0.1), vec![7, 8, 9]);
        assert_eq!(keep(0.3, 0.25), vec![6, 7, 8]);
        // target + top > n: the window starts at the bottom
        assert_eq!(keep(0.9, 0.2), (1..=9).collect::<Vec<_>>());
        assert_eq!(keep(0.0, 0.1), Vec::<usize>::new());
        assert_eq!(keep(1.0, 0.5), (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn zero_delta_with_rescale_stays_zero() {
        let base = vec![0.25f32; 300];
        for kind in KINDS {
            let op = gta(
                kind,
                &[1.0, 1.0],
                &[0.5, 0.5],
                &[0.1, 0.1],
                &[0.1, 0.1],
                1.0,
                true,
                true,
            );
            let out = run(&op, &[base.clone(), base.clone(), base.clone()], &[10, 30]);
            assert_eq!(out, base, "{kind:?}");
        }
    }

    #[test]
    fn dare_keeps_density_and_preserves_l1() {
        let n = 100_000;
        let t = random_models(n, 1, 5);
        let op = gta(GtaKind::DareLinear, &[1.0], &[0.3], &[], &[], 1.0, false, true);
        let out = run(&op, &t, &[n]);
        let d: Vec<f32> = out.iter().zip(&t[0]).map(|(o, b)| o - b).collect();
        let delta: Vec<f32> = t[1].iter().zip(&t[0]).map(|(x, b)| x - b).collect();
        let kept = d.iter().filter(|v| **v != 0.0).count() as f64;
        let nonzero = delta.iter().filter(|v| **v != 0.0).count() as f64;
        assert!((kept / nonzero - 0.3).abs() < 0.01, "kept {}", kept / nonzero);
        let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
        assert!((l1(&d) / l1(&delta) - 1.0).abs() < 1e-5);
        // kept elements are the draws below the density
        for j in 0..n {
            if delta[j] != 0.0 {
                assert_eq!(d[j] != 0.0, rng::uniform(op_key(&op), j as u64) < 0.3);
            }
        }
    }

    fn op_key(op: &MethodOp) -> u64 {
        match op {
            MethodOp::Gta { keys, .. } => keys[0],
            _ => unreachable!(),
        }
    }

    #[test]
    fn della_edges_and_rank_probabilities() {
        // density <= 0: nothing kept
        let t = random_models(1000, 1, 6);
        let op = gta(
            GtaKind::DellaLinear,
            &[1.0],
            &[0.0],
            &[],
            &[0.1],
            1.0,
            false,
            true,
        );
        assert_eq!(run(&op, &t, &[10, 100]), t[0]);
        // one-element rows: rn = 0, p = density - epsilon (no NaN)
        let n = 20_000;
        let t = random_models(n, 1, 7);
        let op = gta(
            GtaKind::DellaLinear,
            &[1.0],
            &[0.5],
            &[],
            &[0.2],
            1.0,
            false,
            false,
        );
        let out = run(&op, &t, &[n, 1]);
        for j in 0..n {
            let delta = t[1][j] - t[0][j];
            let kept = rng::uniform(op_key(&op), j as u64) < 0.3;
            assert_eq!(out[j], t[0][j] + if kept { delta } else { 0.0 });
        }
        // the keep share rises with the rank, exactly (no bf16 rank rounding) in long rows
        let row = 2000;
        let t = random_models(10 * row, 1, 8);
        let base = t[0].clone();
        let x: Vec<f32> = (0..10 * row)
            .map(|j| base[j] + ((j % row) as f32 + 1.0) * 1e-3)
            .collect();
        let op = gta(
            GtaKind::DellaLinear,
            &[1.0],
            &[0.5],
            &[],
            &[0.4],
            1.0,
            false,
            false,
        );
        let out = run(&op, &[base.clone(), x], &[10, row]);
        let (mut lo, mut hi) = (0, 0);
        for j in 0..10 * row {
            let p = 0.1f32 + ((j % row) as f32 / (row - 1) as f32) * 0.8f32;
            let kept = out[j] != base[j];
            assert_eq!(kept, rng::uniform(op_key(&op), j as u64) < p, "element {j}");
            if j % row < row / 4 {
                lo += kept as u32;
            } else if j % row >= 3 * row / 4 {
                hi += kept as u32;
            }
        }
        assert!(hi > lo * 3, "lowest / highest quartile kept {lo} / {hi}");
    }

    // ---- mergekit 0.1.5 fixtures ----

    fn fixture_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conformance")
    }

    fn read(path: std::path::PathBuf) -> Vec<u8> {
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn model_file(model: &str) -> Vec<u8> {
        read(fixture_dir().join(format!("models/micro-llama-{model}-f32/model.safetensors")))
    }

    fn expected_file(name: &str) -> Vec<u8> {
        read(fixture_dir().join(format!("expected/{name}/model.safetensors")))
    }

    fn f32s(view: &safetensors::tensor::TensorView) -> Vec<f32> {
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        view.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    struct Merged {
        name: String,
        base: Vec<f32>,
        reference: Vec<f32>,
        ours: Vec<f32>,
    }

    /// Runs `make_op(tensor name)` on every tensor of the fixture `name`.
    fn merge_fixture(name: &str, models: &[&str], make_op: impl Fn(&str) -> MethodOp) -> Vec<Merged> {
        let base_file = model_file("base");
        let model_files: Vec<Vec<u8>> = models.iter().map(|m| model_file(m)).collect();
        let expected_file = expected_file(name);
        let base = safetensors::SafeTensors::deserialize(&base_file).unwrap();
        let others: Vec<_> = model_files
            .iter()
            .map(|f| safetensors::SafeTensors::deserialize(f).unwrap())
            .collect();
        let expected = safetensors::SafeTensors::deserialize(&expected_file).unwrap();
        let mut names: Vec<&str> = base.names();
        names.sort();
        assert_eq!(names.len(), 39);
        names
            .into_iter()
            .map(|tensor| {
                let views: Vec<_> = std::iter::once(base.tensor(tensor).unwrap())
                    .chain(others.iter().map(|o| o.tensor(tensor).unwrap()))
                    .collect();
                let inputs: Vec<MethodInput> = views
                    .iter()
                    .map(|v| {
                        assert_eq!(v.dtype(), safetensors::Dtype::F32);
                        MethodInput {
                            bytes: v.data(),
                            dtype: DType::F32,
                        }
                    })
                    .collect();
                let shape = views[0].shape().to_vec();
                let ours = apply(
                    &make_op(tensor),
                    &Inputs {
                        tensors: &inputs,
                        shape: &shape,
                    },
                );
                let reference = expected.tensor(tensor).unwrap();
                assert_eq!(reference.shape(), &shape[..]);
                Merged {
                    name: tensor.to_string(),
                    base: f32s(&views[0]),
                    reference: f32s(&reference),
                    ours,
                }
            })
            .collect()
    }

    fn check_f32_rule(name: &str, models: &[&str], op: MethodOp) {
        let mut worst = 0f64;
        for t in merge_fixture(name, models, |_| op.clone()) {
            let max_ref = t.reference.iter().fold(0f32, |m, v| m.max(v.abs()));
            let bound = 1e-5 * max_ref.max(1.0);
            let err = t
                .reference
                .iter()
                .zip(&t.ours)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            worst = worst.max((err / bound) as f64);
            assert!(
                err <= bound,
                "{name} {}: max err {err:e} > bound {bound:e}",
                t.name
            );
        }
        println!("{name}: worst max err / bound = {worst:.3e}");
    }

    #[test]
    fn fixture_task_arithmetic_f32() {
        let op = gta(
            GtaKind::TaskArithmetic,
            &[0.8, 0.4, 0.6],
            &[],
            &[],
            &[],
            0.75,
            false,
            false,
        );
        check_f32_rule("task_arithmetic_f32", &["ft1", "ft2", "ft3"], op);
    }

    #[test]
    fn fixture_ties_f32() {
        let op = gta(
            GtaKind::Ties,
            &[0.9, 0.4, 0.65],
            &[0.6, 0.8, 0.35],
            &[],
            &[],
            1.0,
            true,
            false,
        );
        check_f32_rule("ties_f32", &["ft1", "ft2", "ft3"], op);
    }

    #[test]
    fn fixture_breadcrumbs_f32() {
        let op = gta(
            GtaKind::Breadcrumbs,
            &[0.7, 0.9],
            &[0.75, 0.5],
            &[0.03, 0.08],
            &[],
            1.0,
            false,
            false,
        );
        check_f32_rule("breadcrumbs_f32", &["ft1", "ft3"], op);
    }

    #[test]
    fn fixture_breadcrumbs_ties_f32() {
        let op = gta(
            GtaKind::BreadcrumbsTies,
            &[0.55, 0.8, 0.4],
            &[0.7, 0.5, 0.9],
            &[0.06, 0.02, 0.01],
            &[],
            1.15,
            false,
            false,
        );
        check_f32_rule("breadcrumbs_ties_f32", &["ft1", "ft2", "ft3"], op);
    }

    fn cosine(a: &[f64], b: &[f64]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        dot / (na * nb)
    }

    /// compare.py's stats mode: kept fraction and L1 of `d = out - base` pooled and per
    /// tensor, and the mean cosine against the reference vs the reference's second seed.
    fn check_stats(name: &str, models: &[&str], op: MethodOp) {
        let seed = 20_260_501u64;
        let make = |tensor: &str| {
            let mut op = op.clone();
            if let MethodOp::Gta { keys, .. } = &mut op {
                for (i, k) in keys.iter_mut().enumerate() {
                    *k = rng_key(seed, i as u32 + 1, tensor);
                }
            }
            op
        };
        let merged = merge_fixture(name, models, make);
        let seed8_file = expected_file(&format!("{name}.seed8"));
        let seed8 = safetensors::SafeTensors::deserialize(&seed8_file).unwrap();
        let (mut n_all, mut kept_ref, mut kept_ours, mut l1_ref, mut l1_ours) =
            (0usize, 0usize, 0usize, 0f64, 0f64);
        let (mut cos_ours, mut cos_seed8) = (Vec::new(), Vec::new());
        let mut kept_seed8 = 0usize;
        for t in &merged {
            let diff = |v: &[f32]| {
                v.iter()
                    .zip(&t.base)
                    .map(|(o, b)| (o - b) as f64)
                    .collect::<Vec<f64>>()
            };
            let (dr, d) = (diff(&t.reference), diff(&t.ours));
            let d8 = diff(&f32s(&seed8.tensor(&t.name).unwrap()));
            kept_seed8 += d8.iter().filter(|v| **v != 0.0).count();
            let n = d.len();
            let (kr, ko) = (
                dr.iter().filter(|v| **v != 0.0).count(),
                d.iter().filter(|v| **v != 0.0).count(),
            );
            let (lr, lo) = (
                dr.iter().map(|v| v.abs()).sum::<f64>(),
                d.iter().map(|v| v.abs()).sum::<f64>(),
            );
            n_all += n;
            kept_ref += kr;
            kept_ours += ko;
            l1_ref += lr;
            l1_ours += lo;
            if n >= 256 {
                let (pa, pb) = (kr as f64 / n as f64, ko as f64 / n as f64);
                let p = (pa + pb) / 2.0;
                let ktol = f64::max(0.02, 6.0 * (2.0 * p * (1.0 - p) / n as f64).sqrt());
                assert!(
                    (pa - pb).abs() <= ktol,
                    "{name} {}: kept {pa:.4} vs {pb:.4}",
                    t.name
                );
                let m1 = lr / n as f64;
                let var = dr.iter().map(|v| (v.abs() - m1).powi(2)).sum::<f64>() / n as f64;
                let rel_sd = if m1 > 0.0 {
                    (var / n as f64).sqrt() / m1
                } else {
                    0.0
                };
                let ltol = f64::max(0.05, 6.0 * 2f64.sqrt() * rel_sd);
                let rel = if lr > 0.0 { (lo - lr).abs() / lr } else { lo };
                assert!(rel <= ltol, "{name} {}: L1 {lr:e} vs {lo:e}", t.name);
                let nonzero = |v: &[f64]| v.iter().any(|x| *x != 0.0);
                if nonzero(&dr) && nonzero(&d) {
                    cos_ours.push(cosine(&dr, &d));
                }
                if nonzero(&dr) && nonzero(&d8) {
                    cos_seed8.push(cosine(&dr, &d8));
                }
            }
        }
        let (kr, ko) = (kept_ref as f64 / n_all as f64, kept_ours as f64 / n_all as f64);
        let l1_rel = (l1_ours - l1_ref) / l1_ref;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (co, c8) = (mean(&cos_ours), mean(&cos_seed8));
        let k8 = kept_seed8 as f64 / n_all as f64;
        println!(
            "{name}: kept {kr:.4} (ref) {k8:.4} (ref seed8) vs {ko:.4}; L1 rel diff {l1_rel:+.4}; mean cos(ref, ours) {co:.4} vs cos(ref, seed8) {c8:.4}"
        );
        assert!(
            (kr - ko).abs() <= 0.02,
            "{name}: pooled kept fraction {kr} vs {ko}"
        );
        assert!(l1_rel.abs() <= 0.05, "{name}: pooled L1 rel diff {l1_rel}");
        assert!((co - c8).abs() <= 0.02, "{name}: mean cosine {co} vs {c8}");
    }

    #[test]
    fn fixture_dare_ties_f32_stats() {
        let op = gta(
            GtaKind::DareTies,
            &[0.8, 0.5, 0.35],
            &[0.35, 0.65, 0.45],
            &[],
            &[],
            1.0,
            false,
            true,
        );
        check_stats("dare_ties_f32", &["ft1", "ft2", "ft3"], op);
    }

    #[test]
    fn fixture_dare_linear_f32_stats() {
        let op = gta(
            GtaKind::DareLinear,
            &[0.55, 0.45],
            &[0.3, 0.7],
            &[],
            &[],
            1.0,
            false,
            true,
        );
        check_stats("dare_linear_f32", &["ft1", "ft3"], op);
    }

    #[test]
    fn fixture_della_f32_stats() {
        let op = gta(
            GtaKind::Della,
            &[0.7, 0.45, 0.9],
            &[0.55, 0.4, 0.6],
            &[],
            &[0.25, 0.15, 0.3],
            0.95,
            true,
            true,
        );
        check_stats("della_f32", &["ft1", "ft2", "ft3"], op);
    }

    #[test]
    fn fixture_della_linear_f32_stats() {
        let op = gta(
            GtaKind::DellaLinear,
            &[0.6, 0.4],
            &[0.45, 0.65],
            &[],
            &[0.2, 0.25],
            1.0,
            false,
            true,
        );
        check_stats("della_linear_f32", &["ft2", "ft3"], op);
    }
}
