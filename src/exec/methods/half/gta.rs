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
//! Sorts follow torch's CPU order, ties included: torch runs libstdc++'s unstable
//! `std::sort`, emulated here step for step ([`std_sort`]), so a top-k picks the same
//! tied elements as mergekit (for a top-k only the partitions holding a cut are sorted).
//!
//! Departures from mergekit, shared with the f32 method so both draw the same masks:
//! * the random masks come from this crate's keyed Philox stream ([`rng::bernoulli`]
//!   over the flattened element index), not torch's generator, so only their
//!   statistics match (the keep probabilities are mergekit's, rounded as it rounds them);
//! * DELLA ranks along the last dimension (mergekit: dim 1, the same for 2-D tensors)
//!   and gives a one-element row probability `density − ε` (mergekit's rank norm is
//!   0/0 there);
//! * the `|δ|` sums of the rescale accumulate in f64 (torch: f32, cascaded) before
//!   their one rounding.
//!
//! In f16, `r(1e-8)` is 0: a plain-sum divisor of exactly 0 stays 0 and the division
//! gives inf or NaN, as it does in mergekit.
//!
//! Memory: the base, one f32 vector per model (its weighted delta), while one model is
//! sparsified (value, index) sort pairs (8 bytes an element) or DELLA's probabilities,
//! and a keep mask, and the result.

use rayon::prelude::*;

use super::super::rng;
use super::super::sce::sign;
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

#[cfg(test)]
mod tests {
    use super::super::super::MethodInput;
    use super::*;
    use crate::exec::cpu::encode;
    use crate::ops::GtaKind;

    /// The merge of bf16 `tensors` (`[base, m...]`, each value a bf16 value).
    fn merge_bf16(op: &GtaOp, tensors: &[Vec<f32>]) -> Vec<f32> {
        merge(Half::Bf16, op, tensors)
    }

    /// The merge of `tensors` stored and computed in `half`.
    fn merge(half: Half, op: &GtaOp, tensors: &[Vec<f32>]) -> Vec<f32> {
        let stored: Vec<Vec<u8>> = tensors
            .iter()
            .map(|v| {
                let mut bytes = vec![0u8; v.len() * 2];
                encode(v, half.dtype(), &mut bytes);
                bytes
            })
            .collect();
        let inputs: Vec<MethodInput> = stored
            .iter()
            .map(|b| MethodInput {
                bytes: b,
                dtype: half.dtype(),
            })
            .collect();
        let shape = [tensors[0].len()];
        let inputs = Inputs {
            tensors: &inputs,
            shape: &shape,
        };
        apply(op, &Torch::new(half), &inputs)
    }

    fn ties(weights: &[f64], densities: &[f64], lambda: f64, normalize: bool, rescale: bool) -> GtaOp {
        GtaOp {
            kind: GtaKind::Ties,
            weights: weights.to_vec(),
            densities: densities.to_vec(),
            gammas: vec![0.01; weights.len()],
            epsilons: vec![0.0; weights.len()],
            lambda,
            normalize,
            rescale,
            keys: vec![0; weights.len()],
        }
    }

    #[test]
    fn ties_rounds_weights_to_bf16_but_not_lambda() {
        // m1 keeps its two largest |δ| (6.25 and -1); its weight 0.3 is bf16 0.30078125,
        // so 6.25·w = 1.8798828125 rounds to 1.8828125 (0.3 in f32 would give 1.875).
        // Element 0: Σ = 1.8828125 - 1 >= 0 elects +, so only m1 counts; element 2: m1's
        // dropped delta is 0, which never agrees; element 3: nothing is kept.
        let base = vec![0.0, 0.0, 0.0, 0.0];
        let m1 = vec![6.25, -1.0, 0.5, 0.25];
        let m2 = vec![-1.0, 3.0, 0.5, 0.0];
        let op = ties(&[0.3, 1.0], &[0.5, 1.0], 1.0, false, false);
        assert_eq!(merge_bf16(&op, &[base, m1, m2]), vec![1.8828125, 3.0, 0.5, 0.0]);
        // lambda stays an f32 scalar: r(6.25 · 0.3f32) = 1.875, not r(6.25 · 0.30078125)
        let op = ties(&[1.0], &[1.0], 0.3, false, false);
        assert_eq!(merge_bf16(&op, &[vec![0.0], vec![6.25]]), vec![1.875]);
    }

    #[test]
    fn ties_normalize_divides_by_the_rounded_weight_sum() {
        // w = bf16(0.3), bf16(0.7) = 0.30078125, 0.69921875: divisor r(1.0) = 1.
        // wd = 0.150390625 and 0.1748046875; their sum 0.3251953125 rounds to 0.32421875;
        // base + mixed = 1.32421875 rounds (to even) to 1.328125.
        let op = ties(&[0.3, 0.7], &[1.0, 1.0], 1.0, true, false);
        let out = merge_bf16(&op, &[vec![1.0], vec![1.5], vec![1.25]]);
        assert_eq!(out, vec![1.328125]);
    }

    #[test]
    fn l1_rescale_rounds_the_norms_and_their_quotient() {
        // k = int(0.34·3) = 1 keeps 1.375; before = 1.875, after = 1.375, the factor
        // r(1.3636…) = 1.3671875 and r(1.375 · 1.3671875) = 1.8828125 (1.875 unrounded).
        let op = ties(&[1.0], &[0.34], 1.0, false, true);
        let out = merge_bf16(&op, &[vec![0.0; 3], vec![1.375, 0.25, 0.25]]);
        assert_eq!(out, vec![1.8828125, 0.0, 0.0]);
    }

    #[test]
    fn magnitude_ties_fall_as_torch_sorts_them() {
        // README of the conformance fixtures: ties_bf16, model.layers.0.input_layernorm,
        // ft2, k = 6: torch keeps elements 23 and 25 of those with |δ| = 7·2^-8 (a stable
        // sort would keep 5 and 12).
        let sixteenths = [
            1, 0, 0, 0, 4, 7, 8, 10, 8, 2, 2, 6, 7, 1, 5, 6, 7, 7, 8, 0, 1, 2, 4, 7, 2, 7, 0, 2, 7, 4, 1, 0,
        ];
        let delta: Vec<f32> = sixteenths.iter().map(|&v| v as f32 / 256.0).collect();
        let keep = kept_range(&delta, Order::Descending, 0..6);
        let kept: Vec<usize> = (0..delta.len()).filter(|&j| keep[j]).collect();
        assert_eq!(kept, vec![6, 7, 8, 18, 23, 25]);
    }

    #[test]
    fn dare_in_f16_rescales_in_f32_and_rounds_once() {
        // torch.bernoulli lacks f16 on the CPU, so mergekit masks and rescales in f32:
        // every kept delta of 1 becomes f16(n / kept) (kept ≈ n/2, 6 sigma = 192).
        let n = 4096;
        let op = GtaOp {
            kind: GtaKind::DareLinear,
            weights: vec![1.0],
            densities: vec![0.5],
            gammas: vec![0.01],
            epsilons: vec![0.0],
            lambda: 1.0,
            normalize: true,
            rescale: true,
            keys: vec![7],
        };
        let out = merge(Half::F16, &op, &[vec![0.0; n], vec![1.0; n]]);
        let kept = out.iter().filter(|&&x| x != 0.0).count();
        assert!(kept.abs_diff(n / 2) < 192, "kept {kept}");
        let scaled = Half::F16.round(n as f32 / kept as f32);
        assert!(out.iter().all(|&x| x == 0.0 || x == scaled));
    }

    #[test]
    fn della_probabilities_follow_the_rank() {
        // f32 work (f16 tensors): ranks 1, 2, 3 normalise to 0, 0.5, 1 over the row
        let probs = della_probs(Work { half: None }, &[0.3, -0.1, 0.2], 3, 0.5, 0.25);
        assert_eq!(probs, vec![0.75, 0.25, 0.5]);
    }

    /// A few thousand values from a small set (many ties), deterministic.
    fn tied_values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|j| ((j as u64).wrapping_mul(2_654_435_761) >> 7) % 37)
            .map(|v| v as f32 - 18.0)
            .collect()
    }

    #[test]
    fn pruned_sort_agrees_with_the_full_sort_at_its_cuts() {
        let values = tied_values(5000);
        for order in [Order::Ascending, Order::Descending] {
            let full = argsort::<u32>(&values, order, |_, _| true);
            // a permutation, ordered by |value|
            let mut seen = vec![false; values.len()];
            full.iter().for_each(|&j| seen[j as usize] = true);
            assert!(seen.iter().all(|&s| s));
            for w in full.windows(2) {
                let (a, b) = (values[w[0] as usize].abs(), values[w[1] as usize].abs());
                assert!(!order.less(b, a));
            }
            for range in [0..1, 0..777, 1200..4100, 4999..5000] {
                let keep = kept_range(&values, order, range.clone());
                let mut expected = vec![false; values.len()];
                full[range].iter().for_each(|&j| expected[j as usize] = true);
                assert_eq!(keep, expected);
            }
        }
    }

    #[test]
    fn heap_sort_sorts_with_ties() {
        let mut values: Vec<(f32, usize)> = tied_values(1001)
            .into_iter()
            .enumerate()
            .map(|(j, v)| (v, j))
            .collect();
        let less = |a: &(f32, usize), b: &(f32, usize)| Order::Ascending.less(a.0, b.0);
        heap_sort(&mut values, &less);
        assert!(values.windows(2).all(|w| !less(&w[1], &w[0])));
    }
}
