//! The TIES magnitude trim as thresholds: each model's `k`-th largest `|δ|` found from a
//! sampled window or from multi-level histograms, then one counting pass, so no
//! per-element key or mask is stored.

use rayon::prelude::*;

use super::super::select::abs_key;
use super::super::{Inputs, Scratch, CHUNK};
use super::masks::l1_factor;
use super::{chunk_buffers, keeps, Kept, Mask, Take, Top};

/// Buckets per level of the exact windows of [`magnitude_tops`]: 4096 `u32` counts per
/// model stay in the first-level cache. Keys are 31 bits (bit 31 of an `abs_key` is 0):
/// levels of 12, 12 and 7 bits narrow a window down to one key.
pub(super) const LEVEL_BITS: u32 = 12;
pub(super) const KEY_BITS: u32 = 31;

/// Tensors with fewer elements skip the sample and find their windows by histogram.
pub(super) const SAMPLE_MIN: usize = 1 << 18;
/// The sample: `SAMPLE_BLOCK` consecutive elements every `SAMPLE_STRIDE` (1/16 of them);
/// the sample's size and the cap on collected keys are part of TIES's declared memory
/// cost (`ops::cost`).
pub(super) const SAMPLE_STRIDE: usize = 16 * SAMPLE_BLOCK;
pub(super) use crate::ops::cost::{candidate_cap, SAMPLE_BLOCK};

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
pub(super) fn magnitude_tops(inputs: &Inputs, trims: &[(usize, usize)], rescale: bool) -> Vec<Kept> {
    magnitude_tops_capped(inputs, trims, rescale, candidate_cap(inputs.numel()))
}

pub(super) fn magnitude_tops_capped(
    inputs: &Inputs,
    trims: &[(usize, usize)],
    rescale: bool,
    cap: usize,
) -> Vec<Kept> {
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
pub(super) fn delta_keys(
    inputs: &Inputs,
    input: usize,
    start: usize,
    base: &[f32],
    x: &mut [f32],
    keys: &mut [u32],
) {
    inputs.decode(input, start..start + x.len(), x);
    for ((k, v), b) in keys.iter_mut().zip(x.iter()).zip(base) {
        *k = abs_key(*v - *b);
    }
}

/// Windows from a sample of every model's keys (blocks spread over the whole tensor).
pub(super) fn sample_windows(inputs: &Inputs, trims: &[(usize, usize)]) -> Vec<(u32, u32)> {
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
pub(super) fn exact_windows(
    inputs: &Inputs,
    trims: &[(usize, usize)],
    which: &[usize],
    cap: usize,
) -> Vec<(u32, u32)> {
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
pub(super) struct Found {
    above: usize,
    inside: usize,
    keys: Option<Vec<u32>>,
}

/// One pass: per chunk and model (`[chunk][model]`), the keys above the model's window and
/// inside it. Inside keys are stored while the model's total stays within `cap` (not for
/// a one-key window, where the counts say everything).
pub(super) fn collect_window(
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
pub(super) fn resolve(k: usize, found: &[Vec<Found>], j: usize, window: (u32, u32)) -> Option<Top> {
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
pub(super) fn top_scales(inputs: &Inputs, trims: &[(usize, usize)], tops: &[Top]) -> Vec<f32> {
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
