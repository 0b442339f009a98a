//! The generalized task-arithmetic family in 16 bits, following mergekit 0.1.5's
//! `GeneralizedTaskArithmeticMerge.merge_group` (generalized_task_arithmetic.py) and
//! sparsify.py op for op, with torch's CPU rules for 16-bit tensors (see the parent
//! module). Inputs are `[base, m...]`; `r` is rounding to the compute dtype.
//!
//! Order followed, per non-base model `i`:
//! 1. `δ_i = r(x_i − base)`;
//! 2. sparsified (when the kind has a sparsifier and `density < 1`):
//!    * magnitude (TIES): keep the `k = max(1, int(density·n))` largest `|δ|`;
//!    * magnitude_outliers (breadcrumbs): the window `[n_bot, n_bot + int(density·n))` of
//!      the ascending `|δ|` order, `n_bot = max(0, n − target − int(gamma·n))`;
//!    * bernoulli (DARE): keep with probability `density` as the work dtype holds it;
//!    * della_magprune: per-row rank probabilities computed in the work dtype;
//!
//!    then, with `rescale`, the L1 rescale `masked · r(before / after)` where `before`
//!    and `after` are f32-accumulated `|·|` sums rounded once, skipped when either is
//!    below `eps` (1e-7 as the work dtype holds it). The random sparsifiers compute in
//!    the work dtype (bf16 stays bf16; f16 upcasts to f32, as mergekit does because
//!    torch.bernoulli lacks f16 on CPU) and round to the compute dtype at the end;
//! 3. `wd_i = r(δ_i · r(w_i))` (`torch.tensor(weights, dtype=…)` rounds the weights).
//!
//! Then, with sign consensus: majority `+` where `r(Σ wd_i) >= 0`; `mixed = r(Σ agreeing
//! wd_i)` and `div = r(Σ agreeing r(w_i))` (a zero delta never agrees; `div == 0 → 1`);
//! without: `mixed = r(Σ wd_i)`, `div = r(Σ r(w_i))` (`|div| < r(1e-8) → 1`, the
//! threshold rounded as torch rounds a scalar compared with a 16-bit tensor). Sums
//! accumulate in f32 in model order. `mixed = r(mixed / div)` when `normalize`,
//! `r(mixed · lambda)` when `lambda != 1` (lambda an f32 scalar), and `r(base + mixed)`.
//!
//! Departures from mergekit, shared with the f32 method so both draw the same masks:
//! * the random masks come from this crate's keyed Philox stream ([`rng::bernoulli`]
//!   over the flattened element index), not torch's generator, so only their
//!   statistics match;
//! * sort ties (torch's CPU sort is not stable) are broken by lower element index:
//!   first in descending `|δ|` order for magnitude and outliers, first in ascending
//!   order for DELLA's ranks;
//! * DELLA ranks along the last dimension (mergekit: dim 1, the same for 2-D tensors)
//!   and gives a one-element row probability `density − ε` (mergekit's rank norm is
//!   0/0 there).
//!
//! Memory: the base, one f32 vector per model (its weighted delta), a key or rank
//! vector and a keep mask while one model is sparsified, and the result.

use rayon::prelude::*;

use super::super::rng;
use super::super::CHUNK;
use super::{Inputs, Torch};
use crate::ops::{GtaOp, Half, Sparsifier};
use std::ops::Range;

/// mergekit's `eps` below which a rescale norm leaves the masked delta as it is.
const RESCALE_EPS: f32 = 1e-7;

/// A plain-sum divisor below this (in magnitude) becomes 1.
const DIVISOR_EPS: f32 = 1e-8;

/// The dtype the random sparsifiers work in: the compute dtype for bf16, f32 for f16.
#[derive(Clone, Copy)]
struct Work {
    /// `None`: f32, where every f32 op is already the op's result.
    half: Option<Torch>,
}

impl Work {
    fn of(t: &Torch) -> Work {
        match t.half {
            Half::Bf16 => Work { half: Some(*t) },
            Half::F16 => Work { half: None },
        }
    }

    fn r(&self, x: f32) -> f32 {
        match &self.half {
            Some(t) => t.r(x),
            None => x,
        }
    }
}

/// The per-model parameters of one non-base model.
struct Model {
    density: f64,
    gamma: f64,
    epsilon: f64,
    key: u64,
}

pub(super) fn apply(op: &GtaOp, t: &Torch, inputs: &Inputs) -> Vec<f32> {
    let base = inputs.to_f32(0);
    let m = inputs.len() - 1;
    if m == 0 {
        return base;
    }
    let row = inputs.shape.last().copied().unwrap_or(1).max(1);
    let sparsifier = op.kind.sparsifier();
    // sema gives every model every parameter; the defaults only guard malformed ops
    let weights: Vec<f32> = (0..m)
        .map(|i| t.r(op.weights.get(i).copied().unwrap_or(1.0) as f32))
        .collect();
    let deltas: Vec<Vec<f32>> = (0..m)
        .map(|i| {
            let model = Model {
                density: op.densities.get(i).copied().unwrap_or(1.0),
                gamma: op.gammas.get(i).copied().unwrap_or(0.01),
                epsilon: op.epsilons.get(i).copied().unwrap_or(0.0),
                key: op.keys.get(i).copied().unwrap_or(0),
            };
            let mut delta = inputs.to_f32(i + 1);
            delta
                .par_iter_mut()
                .zip(base.par_iter())
                .for_each(|(d, b)| *d = t.r(*d - *b));
            sparsify(t, sparsifier, &model, row, op.rescale, &mut delta);
            let w = weights[i];
            delta.par_iter_mut().for_each(|d| *d = t.r(*d * w));
            delta
        })
        .collect();
    combine(t, op, &base, &deltas, &weights)
}

/// Everything after `deltas.mul_(weights)`: the sign election or plain sum, the divisor,
/// lambda and the base.
fn combine(t: &Torch, op: &GtaOp, base: &[f32], deltas: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
    let consensus = op.kind.consensus();
    let lambda = (op.lambda != 1.0).then_some(op.lambda as f32);
    let plain_divisor = {
        let div = t.r(weights.iter().sum());
        if div.abs() < t.r(DIVISOR_EPS) {
            1.0
        } else {
            div
        }
    };
    let mut out = vec![0f32; base.len()];
    out.par_iter_mut().enumerate().for_each(|(j, out)| {
        let (mixed, divisor) = if consensus {
            let total: f32 = deltas.iter().map(|d| d[j]).sum();
            let majority = if t.r(total) >= 0.0 { 1.0 } else { -1.0 };
            let (mut mixed, mut divisor) = (0f32, 0f32);
            for (d, &w) in deltas.iter().zip(weights) {
                // sign(0) is 0, which matches neither majority
                if sign(d[j]) == majority {
                    mixed += d[j];
                    divisor += w;
                }
            }
            let divisor = t.r(divisor);
            (t.r(mixed), if divisor == 0.0 { 1.0 } else { divisor })
        } else {
            (t.r(deltas.iter().map(|d| d[j]).sum()), plain_divisor)
        };
        let mut mixed = mixed;
        if op.normalize {
            mixed = t.r(mixed / divisor);
        }
        if let Some(lambda) = lambda {
            mixed = t.r(mixed * lambda);
        }
        *out = t.r(base[j] + mixed);
    });
    out
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// mergekit's `sparsify` of one delta, in place (the delta and result in the compute
/// dtype).
fn sparsify(t: &Torch, sparsifier: Sparsifier, model: &Model, row: usize, rescale: bool, delta: &mut [f32]) {
    let n = delta.len();
    let density = model.density;
    if sparsifier == Sparsifier::None || density >= 1.0 {
        return;
    }
    // The magnitude sparsifiers work in the tensor's dtype, the random ones in `Work`.
    let same = Work { half: Some(*t) };
    match sparsifier {
        Sparsifier::None => {}
        Sparsifier::Magnitude if density <= 0.0 => delta.fill(0.0),
        Sparsifier::Magnitude => {
            // argsort(|δ| as f32, descending)[:k]
            let k = ((density * n as f64) as usize).clamp(1, n);
            let keep = kept_range(delta, Order::Descending, 0..k);
            masked_rescaled(same, delta, &keep, rescale);
        }
        Sparsifier::Outliers => {
            // sort(|δ| as f32).indices[n_bot : n_bot + target], Python's int() and slicing
            let target = (density * n as f64) as i64;
            let outliers = (model.gamma * n as f64) as i64;
            let n_bot = (n as i64 - target - outliers).max(0);
            let start = n_bot.min(n as i64) as usize;
            let end = (n_bot + target).clamp(start as i64, n as i64) as usize;
            let keep = kept_range(delta, Order::Ascending, start..end);
            masked_rescaled(same, delta, &keep, rescale);
        }
        Sparsifier::Bernoulli => {
            let work = Work::of(t);
            // torch.full_like(…, density, dtype=work_dtype)
            let p = work.r(density as f32);
            let keep: Vec<bool> = (0..n)
                .into_par_iter()
                .map(|j| rng::bernoulli(model.key, j as u64, p))
                .collect();
            masked_rescaled(work, delta, &keep, rescale);
            t.round_all(delta);
        }
        Sparsifier::Della if density <= 0.0 => delta.fill(0.0),
        Sparsifier::Della => {
            let work = Work::of(t);
            let probs = della_probs(work, delta, row, density, model.epsilon);
            let keep: Vec<bool> = probs
                .par_iter()
                .enumerate()
                .map(|(j, &p)| rng::bernoulli(model.key, j as u64, p))
                .collect();
            drop(probs);
            masked_rescaled(work, delta, &keep, rescale);
            t.round_all(delta);
        }
    }
}

/// mergekit's `rescaled_masked_tensor` with the L1 norm (or none), every op rounded to
/// `work`.
fn masked_rescaled(work: Work, delta: &mut [f32], keep: &[bool], rescale: bool) {
    let before = rescale.then(|| work.r(abs_sum(delta)));
    delta.par_iter_mut().zip(keep.par_iter()).for_each(|(d, &k)| {
        if !k {
            *d = 0.0;
        }
    });
    let Some(before) = before else { return };
    let after = work.r(abs_sum(delta));
    // the comparison casts the Python eps to the tensor's dtype
    let eps = work.r(RESCALE_EPS);
    if before < eps || after < eps {
        return;
    }
    let factor = work.r(before / after);
    delta.par_iter_mut().for_each(|d| *d = work.r(*d * factor));
}

/// `Σ|x|` as torch's f32-accumulated sum gives it (accumulated in f64 here, in a fixed
/// chunk order, so the result does not depend on the thread schedule).
fn abs_sum(xs: &[f32]) -> f32 {
    let partial: Vec<f64> = xs
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|x| x.abs() as f64).sum::<f64>())
        .collect();
    partial.iter().sum::<f64>() as f32
}

/// della_magprune's keep probability of every element, computed in `work` as mergekit
/// does: `ranks = r(rank) + 1` (0-based ascending `|δ|` rank in the row),
/// `rank_norm = r(r(ranks − min) / r(max − min))` clamped to `[0, 1]`, and
/// `probs = r(r(r(rank_norm · 2) · ε) + (density − ε))`.
fn della_probs(work: Work, delta: &[f32], row: usize, density: f64, epsilon: f64) -> Vec<f32> {
    let rank_value = |rank: usize| work.r(work.r(rank as f32) + 1.0);
    let min_rank = rank_value(0);
    let max_rank = rank_value(row - 1);
    let span = work.r(max_rank - min_rank);
    let epsilon32 = epsilon as f32;
    // (density - epsilon) is a Python float, an f32 scalar to the tensor
    let low = (density - epsilon) as f32;
    let prob = |rank: usize| {
        let rank_norm = if span > 0.0 {
            work.r(work.r(rank_value(rank) - min_rank) / span).clamp(0.0, 1.0)
        } else {
            0.0
        };
        work.r(work.r(work.r(rank_norm * 2.0) * epsilon32) + low)
    };
    let mut probs = vec![0f32; delta.len()];
    probs
        .par_chunks_mut(row)
        .zip(delta.par_chunks(row))
        .for_each(|(ps, ds)| {
            for (rank, j) in argsort::<usize>(ds, Order::Ascending, |_, _| true)
                .into_iter()
                .enumerate()
            {
                ps[j] = prob(rank);
            }
        });
    probs
}

/// The elements at sorted positions `range` of `|delta|` in torch's CPU sort order.
fn kept_range(delta: &[f32], order: Order, range: Range<usize>) -> Vec<bool> {
    fn with<I: Index>(delta: &[f32], order: Order, range: Range<usize>) -> Vec<bool> {
        let cuts = [range.start, range.end];
        // only the ranges that straddle a cut need their order resolved
        let sorted = argsort::<I>(delta, order, |first, last| {
            cuts.iter().any(|&c| first < c && c < last)
        });
        let mut keep = vec![false; delta.len()];
        for j in &sorted[range] {
            keep[j.get()] = true;
        }
        keep
    }
    if delta.len() <= u32::MAX as usize {
        with::<u32>(delta, order, range)
    } else {
        with::<usize>(delta, order, range)
    }
}

/// A sort direction with torch's CPU comparators (`KeyValueCompAsc`/`Desc`: NaN sorts
/// as the largest value).
#[derive(Clone, Copy)]
enum Order {
    Ascending,
    Descending,
}

impl Order {
    fn less(self, a: f32, b: f32) -> bool {
        match self {
            Order::Ascending => (!a.is_nan() && b.is_nan()) || a < b,
            Order::Descending => (a.is_nan() && !b.is_nan()) || a > b,
        }
    }
}

/// An element index as the sort carries it (u32 halves the pairs' memory).
trait Index: Copy {
    fn new(j: usize) -> Self;
    fn get(self) -> usize;
}

impl Index for u32 {
    fn new(j: usize) -> u32 {
        j as u32
    }
    fn get(self) -> usize {
        self as usize
    }
}

impl Index for usize {
    fn new(j: usize) -> usize {
        j
    }
    fn get(self) -> usize {
        self
    }
}

/// The indices of `|values|` as `torch.sort(…, stable=False)` orders them on the CPU.
/// torch runs libstdc++'s `std::sort` (introsort) on (value, index) pairs compared by
/// value, so the order of ties is that algorithm's; it is emulated step for step. A
/// range whose elements all land on one side of every position the caller cares about
/// needs no inner order: `needs(first, last)` says whether `[first, last)` does, and the
/// others are left unsorted (so a top-k costs about as much as a quickselect).
fn argsort<I: Index>(values: &[f32], order: Order, needs: impl Fn(usize, usize) -> bool) -> Vec<I> {
    let mut pairs: Vec<(f32, I)> = values
        .iter()
        .enumerate()
        .map(|(j, v)| (v.abs(), I::new(j)))
        .collect();
    std_sort(&mut pairs, |a, b| order.less(a.0, b.0), needs);
    pairs.into_iter().map(|(_, j)| j).collect()
}

/// libstdc++'s `_S_threshold`: introsort leaves ranges this small to insertion sort.
const INSERTION_THRESHOLD: usize = 16;

/// libstdc++'s `std::sort`: `__introsort_loop` (median-of-three pivot moved to the front,
/// unguarded partition, heapsort past depth `2·floor(log2 n)`), then
/// `__final_insertion_sort`. Partitioning leaves every element of a left range not
/// greater than every element of the ranges right of it, so the final insertion sort
/// (which moves an element only past strictly greater ones) never crosses from one
/// leaf range to another: it is done here leaf by leaf, and skipped for the leaves and
/// the whole ranges `needs` rules out.
fn std_sort<T: Copy>(a: &mut [T], less: impl Fn(&T, &T) -> bool, needs: impl Fn(usize, usize) -> bool) {
    let n = a.len();
    if n < 2 {
        return;
    }
    let depth_limit = 2 * (usize::BITS - 1 - n.leading_zeros()) as usize;
    let mut ranges = vec![(0, n, depth_limit)];
    while let Some((first, mut last, mut depth)) = ranges.pop() {
        loop {
            if !needs(first, last) {
                break;
            }
            let range = &mut a[first..last];
            if range.len() <= INSERTION_THRESHOLD {
                insertion_sort(range, &less);
                break;
            }
            if depth == 0 {
                heap_sort(range, &less);
                break;
            }
            depth -= 1;
            let cut = first + partition_pivot(range, &less);
            ranges.push((cut, last, depth));
            last = cut;
        }
    }
}

/// `__unguarded_partition_pivot`: the cut of `a` (length > 16) around its median of
/// three.
fn partition_pivot<T: Copy>(a: &mut [T], less: &impl Fn(&T, &T) -> bool) -> usize {
    let (x, y, z) = (1, a.len() / 2, a.len() - 1);
    // __move_median_to_first
    let median = if less(&a[x], &a[y]) {
        if less(&a[y], &a[z]) {
            y
        } else if less(&a[x], &a[z]) {
            z
        } else {
            x
        }
    } else if less(&a[x], &a[z]) {
        x
    } else if less(&a[y], &a[z]) {
        z
    } else {
        y
    };
    a.swap(0, median);
    // __unguarded_partition over [1, len) with the pivot at 0
    let (mut first, mut last) = (1, a.len());
    loop {
        while less(&a[first], &a[0]) {
            first += 1;
        }
        last -= 1;
        while less(&a[0], &a[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        a.swap(first, last);
        first += 1;
    }
}

/// Insertion sort that moves an element only past strictly greater ones (stable).
fn insertion_sort<T: Copy>(a: &mut [T], less: &impl Fn(&T, &T) -> bool) {
    for i in 1..a.len() {
        let value = a[i];
        let mut hole = i;
        while hole > 0 && less(&value, &a[hole - 1]) {
            a[hole] = a[hole - 1];
            hole -= 1;
        }
        a[hole] = value;
    }
}

/// `__partial_sort(first, last, last)`: `__make_heap` then `__sort_heap`.
fn heap_sort<T: Copy>(a: &mut [T], less: &impl Fn(&T, &T) -> bool) {
    let len = a.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        adjust_heap(a, parent, len, a[parent], less);
        if parent == 0 {
            break;
        }
        parent -= 1;
    }
    let mut last = len;
    while last > 1 {
        last -= 1;
        let value = a[last];
        a[last] = a[0];
        adjust_heap(a, 0, last, value, less);
    }
}

/// `__adjust_heap` (with its `__push_heap`) over `a[..len]`.
fn adjust_heap<T: Copy>(a: &mut [T], mut hole: usize, len: usize, value: T, less: &impl Fn(&T, &T) -> bool) {
    let top = hole;
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if less(&a[child], &a[child - 1]) {
            child -= 1;
        }
        a[hole] = a[child];
        hole = child;
    }
    if len.is_multiple_of(2) && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        a[hole] = a[child - 1];
        hole = child - 1;
    }
    while hole > top {
        let parent = (hole - 1) / 2;
        if !less(&a[parent], &value) {
            break;
        }
        a[hole] = a[parent];
        hole = parent;
    }
    a[hole] = value;
}
