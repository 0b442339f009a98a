//! sce, ram, ramplus_tl and arcee_fusion in 16 bits, op for op as mergekit 0.1.5 runs
//! `merge_methods/sce.py`, `ram.py` and `arcee_fusion.py` on torch's CPU backend.
//!
//! Every function below names the torch op each step stands for. The rules it follows:
//! * `m − base` and every other element-wise op on 16-bit tensors compute in f32 and round
//!   ([`Torch::r`]); a Python float operand stays f32, while the bound of `clamp(min=…)`
//!   and the scalar of a comparison (`|δ| > ε`) are cast to the 16-bit dtype first;
//! * sums over the models (`sum(dim=0)`) accumulate in f32 in model order and round once;
//! * `torch.var` runs Welford in f64 and rounds through f32;
//! * long f32 sums (a mean over a tensor, a softmax's denominator, a KL row) are taken as
//!   the f64 sum rounded to f32: torch's vectorised cascade sums depend on the CPU's
//!   vector width, and both agree with the f64 sum to well under a 16-bit ulp.
//!
//! Where mergekit promotes a 16-bit merge to f32 (ramplus_tl's f32 `λ`, arcee_fusion's
//! float mask), its f32 steps are followed and the result is rounded to the compute dtype
//! once at the end: a merge keeps the dtype it was asked for.
//!
//! Departures, as in the f32 methods: sce's top-k over |variance| takes ties at the cut in
//! index order (`torch.topk` leaves it unspecified), and arcee_fusion's quartiles are exact
//! over the whole tensor (mergekit samples 1M elements at random above 1M elements).

use rayon::prelude::*;

use super::super::sce::sign;
use super::{Inputs, Torch};
use crate::exec::methods::select::{abs_key, from_ord_key, ord_key, select_top_k};
use crate::exec::methods::CHUNK;
use crate::ops::MethodOp;

pub(super) fn apply(op: &MethodOp, t: &Torch, inputs: &Inputs) -> Vec<f32> {
    let mut tensors = t.tensors(inputs);
    let base = tensors.remove(0);
    // mergekit: "if not tensors: return base".
    if tensors.is_empty() {
        return base;
    }
    match op {
        MethodOp::Sce { select_topk } => {
            let tvs = task_vectors(t, &base, tensors);
            sce(t, &base, tvs, *select_topk)
        }
        MethodOp::Ram { epsilon } => {
            let tvs = task_vectors(t, &base, tensors);
            ram(t, &base, &tvs, *epsilon, None)
        }
        MethodOp::RamPlusTl { r, alpha, epsilon } => {
            let tvs = task_vectors(t, &base, tensors);
            ram(t, &base, &tvs, *epsilon, Some((*r, *alpha)))
        }
        MethodOp::ArceeFusion => arcee_fusion(t, &base, &tensors[0], inputs.shape),
        _ => unreachable!("half::select given {}", op.name()),
    }
}

/// `torch.stack([m - base for m in models])`: each difference rounded, computed over the
/// models' own buffers so no second copy is held.
fn task_vectors(t: &Torch, base: &[f32], mut models: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    for m in &mut models {
        m.par_iter_mut()
            .zip(base.par_iter())
            .for_each(|(x, &b)| *x = t.r(*x - b));
    }
    models
}

/// A float32 sum over a whole tensor (see the module doc): f64 partial sums per [`CHUNK`],
/// combined in chunk order so the result does not depend on the thread count.
fn f32_sum(xs: &[f32]) -> f32 {
    f32_sum_of(xs, |x| x)
}

/// [`f32_sum`] of `f(x)` for each `x` of `xs`, without holding the mapped tensor.
fn f32_sum_of(xs: &[f32], f: impl Fn(f32) -> f32 + Sync) -> f32 {
    let partials: Vec<f64> = xs
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&x| f(x) as f64).sum())
        .collect();
    partials.iter().sum::<f64>() as f32
}

/// `x.clamp(min=lo)` on a 16-bit tensor: the bound is cast to the tensor's dtype; NaN stays.
fn clamp_min(t: &Torch, x: f32, lo: f64) -> f32 {
    let lo = t.r(lo as f32);
    if x < lo {
        lo
    } else {
        x
    }
}

// ---- sce -----------------------------------------------------------------------------

/// `sce_merge`: select (top-k |variance|), weight (mean δ² per model, normalised), erase
/// (sign election on the sum) and combine.
fn sce(t: &Torch, base: &[f32], mut tvs: Vec<Vec<f32>>, select_topk: f64) -> Vec<f32> {
    if select_topk < 1.0 {
        let keep = sce_mask(t, &tvs, select_topk);
        for d in &mut tvs {
            // `task_vectors * mask`: a dropped element becomes ±0, as torch's product does.
            d.par_iter_mut().zip(keep.par_iter()).for_each(|(x, &k)| {
                if !k {
                    *x *= 0.0;
                }
            });
        }
    }
    let weights = sce_weights(t, &tvs);
    base.par_iter()
        .enumerate()
        .map(|(j, &b)| {
            // get_mask(method="sum"): the majority sign is that of the rounded sum, >= 0 is +.
            let sum = t.r(tvs.iter().fold(0f32, |acc, d| acc + d[j]));
            let majority = if sum >= 0.0 { 1.0 } else { -1.0 };
            // erased_weights = w · (sign(δ) == majority); (δ · w).sum(0) and w.sum(0).
            let mut merged = 0f32;
            let mut weight = 0f32;
            for (d, &w) in tvs.iter().zip(&weights) {
                let x = d[j];
                let ew = if sign(x) == majority { w } else { 0.0 };
                merged += t.r(x * ew);
                weight += ew;
            }
            let weight = clamp_min(t, t.r(weight), 1e-6);
            t.r(b + t.r(t.r(merged) / weight))
        })
        .collect()
}

/// `sce_mask`: the `k = int(count_nonzero(var) · density)` elements of largest |variance|
/// over the models (`torch.var(unbiased=False)` of the 16-bit task vectors).
fn sce_mask(t: &Torch, tvs: &[Vec<f32>], density: f64) -> Vec<bool> {
    let n = tvs[0].len();
    if density <= 0.0 {
        return vec![false; n];
    }
    let keys: Vec<u32> = (0..n)
        .into_par_iter()
        .map(|j| abs_key(t.r(welford_variance(tvs.iter().map(|d| d[j])) as f32)))
        .collect();
    let nonzero = keys.par_iter().filter(|&&key| key != 0).count();
    // An int64 tensor times a Python float is a float32 product; `int()` truncates.
    let k = ((nonzero as f32) * (density as f32)) as usize;
    if k == 0 {
        return vec![false; n];
    }
    select_top_k(&keys, k).mask(&keys)
}

/// torch's CPU `var(unbiased=False)` of 16-bit values: Welford's update in f64, in order.
fn welford_variance(xs: impl Iterator<Item = f32>) -> f64 {
    let (mut count, mut mean, mut m2) = (0f64, 0f64, 0f64);
    for x in xs {
        let x = x as f64;
        count += 1.0;
        let delta = x - mean;
        mean += delta / count;
        m2 += delta * (x - mean);
    }
    m2 / count
}

/// `sce_weight`: `mean(δ_i²)` per model (f32 sum, f32 division, rounded once), divided by
/// their rounded sum; uniform `1/M` when that sum is below 1e-6.
fn sce_weights(t: &Torch, tvs: &[Vec<f32>]) -> Vec<f32> {
    let models = tvs.len();
    let means: Vec<f32> = tvs
        .iter()
        // `tvs.square()` (rounded), then the mean.
        .map(|d| t.r(f32_sum_of(d, |x| t.r(x * x)) / d.len() as f32))
        .collect();
    // `torch.sum(weights).item()`
    let total = t.sum(&means);
    if (total as f64).abs() < 1e-6 {
        // `ones_like(weights) / M`
        vec![t.r(1.0 / models as f32); models]
    } else {
        // `weights / weight_sum`: the Python float (a 16-bit value) stays f32.
        means.iter().map(|&w| t.r(w / total)).collect()
    }
}

// ---- ram, ramplus_tl ------------------------------------------------------------------

/// `ram_merge` (`plus = None`) and `ramplus_tl_merge` (`plus = Some((r, alpha))`).
fn ram(t: &Torch, base: &[f32], tvs: &[Vec<f32>], epsilon: f64, plus: Option<(f64, f64)>) -> Vec<f32> {
    // `tv.abs() > epsilon`: torch casts the scalar to the 16-bit dtype and compares there.
    let eps = t.r(epsilon as f32);
    let active = |x: f32| x.abs() > eps;
    let counts: Vec<u32> = (0..base.len())
        .into_par_iter()
        .map(|j| tvs.iter().filter(|d| active(d[j])).count() as u32)
        .collect();

    let Some((r, alpha)) = plus else {
        // All in the 16-bit dtype: a lone active delta as it is, shared ones divided by
        // their count (rounded), summed over the models in f32 and rounded, then added.
        return base
            .par_iter()
            .enumerate()
            .map(|(j, &b)| {
                let c = counts[j];
                let merged = tvs.iter().fold(0f32, |acc, d| {
                    let x = d[j];
                    acc + if !active(x) || c == 0 {
                        0.0
                    } else if c == 1 {
                        x
                    } else {
                        t.r(x / c as f32)
                    }
                });
                t.r(b + t.r(merged))
            })
            .collect();
    };

    let lambdas = ramplus_lambdas(tvs, &counts, active, epsilon, r, alpha);
    // mergekit promotes to f32 here: `tv · unique · λ` is an f32 product, the shared term
    // stays 16-bit, their sum over the models and `base + merged` are f32 operations.
    base.par_iter()
        .enumerate()
        .map(|(j, &b)| {
            let c = counts[j];
            let merged = tvs.iter().zip(&lambdas).fold(0f32, |acc, (d, &lambda)| {
                let x = d[j];
                acc + if !active(x) || c == 0 {
                    0.0
                } else if c == 1 {
                    x * lambda
                } else {
                    t.r(x / c as f32)
                }
            });
            t.r(b + merged)
        })
        .collect()
}

/// ramplus_tl's `λ_i = 1 + r·clamp(shared_i / clamp(unique_i, min=ε), 0, α)`, in f32:
/// the int64 counts meet Python floats, which promotes them to float32.
fn ramplus_lambdas(
    tvs: &[Vec<f32>],
    counts: &[u32],
    active: impl Fn(f32) -> bool + Sync,
    epsilon: f64,
    r: f64,
    alpha: f64,
) -> Vec<f32> {
    tvs.iter()
        .map(|d| {
            let (shared, unique) = d
                .par_iter()
                .zip(counts.par_iter())
                .filter(|(&x, _)| active(x))
                .map(|(_, &c)| if c > 1 { (1u64, 0u64) } else { (0, 1) })
                .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            let unique = (unique as f32).max(epsilon as f32);
            let rho = shared as f32 / unique;
            // torch's clamp is min(max(ρ, 0), α).
            let rho = rho.max(0.0).min(alpha as f32);
            1.0 + (r as f32) * rho
        })
        .collect()
}

// ---- arcee_fusion ---------------------------------------------------------------------

/// `arcee_fusion_merge_method`: the fine-tune's value where `|p − b| · KL_row(p‖b)` reaches
/// `median + 1.5·IQR` of those importances, the base's elsewhere.
fn arcee_fusion(t: &Torch, base: &[f32], ft: &[f32], shape: &[usize]) -> Vec<f32> {
    let n = base.len();
    let importance = arcee_importance(t, base, ft, shape);
    // One NaN, sorting above +inf as in torch.sort.
    let keys: Vec<u32> = importance
        .par_iter()
        .map(|&x| ord_key(if x.is_nan() { f32::NAN } else { x }))
        .collect();
    // `(q · (numel − 1)).long()` with q a float32 tensor: an f32 product, truncated. The
    // value of ascending rank `i` is the threshold of the top `n − i`.
    let quantile = |q: f32| {
        let rank = (q * (n - 1) as f32) as usize;
        from_ord_key(select_top_k(&keys, n - rank).threshold)
    };
    let (q1, median, q3) = (quantile(0.25), quantile(0.5), quantile(0.75));
    // `median + 1.5 * (q3 - q1)` on 0-d 16-bit tensors: each op rounded.
    let threshold = t.r(median + t.r(1.5 * t.r(q3 - q1)));
    base.par_iter()
        .zip(ft.par_iter())
        .zip(importance.par_iter())
        .map(|((&b, &p), &imp)| {
            // `(imp >= threshold).float()`: the product with the mask and the sum with the
            // base are f32 ops; the result is then rounded to the compute dtype.
            let keep = if imp >= threshold { 1.0f32 } else { 0.0 };
            t.r(b + t.r(p - b) * keep)
        })
        .collect()
}

/// `_compute_importance`: `|p − b| · Σ_row P·log(P/Q)` with `P = softmax(p) + 1e-8`,
/// `Q = softmax(b) + 1e-8` over rows of the last dimension, every op in the 16-bit dtype.
fn arcee_importance(t: &Torch, base: &[f32], ft: &[f32], shape: &[usize]) -> Vec<f32> {
    // A 0-D or 1-D tensor is one row.
    let row = shape.last().copied().unwrap_or(1).max(1);
    let mut importance = vec![0f32; base.len()];
    importance
        .par_chunks_mut(row)
        .zip(base.par_chunks(row).zip(ft.par_chunks(row)))
        .for_each(|(out, (b, p))| {
            let sp = softmax(t, p);
            let sb = softmax(t, b);
            let terms: Vec<f32> = sp
                .iter()
                .zip(&sb)
                .map(|(&x, &y)| {
                    let pj = t.r(x + 1e-8);
                    let qj = t.r(y + 1e-8);
                    let log = t.r((t.r(pj / qj) as f64).ln() as f32);
                    t.r(pj * log)
                })
                .collect();
            let kl = t.r(f32_sum(&terms));
            for ((o, &x), &y) in out.iter_mut().zip(p).zip(b) {
                *o = t.r(t.r(x - y).abs() * kl);
            }
        });
    importance
}

/// `F.softmax(x, dim=-1)` of one 16-bit row on the CPU: in f32, `exp(x − max)` times the
/// reciprocal of their sum, rounded.
fn softmax(t: &Torch, x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|&v| ((v - max) as f64).exp() as f32).collect();
    let inv = 1.0 / f32_sum(&e);
    e.iter().map(|&v| t.r(v * inv)).collect()
}

#[cfg(test)]
mod tests {
    use crate::exec::methods::{apply, Inputs, MethodInput};
    use crate::io::DType;
    use crate::ops::{Compute, Half, MethodOp};
    use half::bf16;

    fn bf(x: f32) -> f32 {
        bf16::from_f32(x).to_f32()
    }

    /// `op` in bf16 compute over bf16-stored `tensors` of `shape`.
    fn run(op: &MethodOp, shape: &[usize], tensors: &[Vec<f32>]) -> Vec<f32> {
        let raw: Vec<Vec<u8>> = tensors
            .iter()
            .map(|t| t.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect())
            .collect();
        let ins: Vec<MethodInput> = raw
            .iter()
            .map(|b| MethodInput {
                bytes: b,
                dtype: DType::BF16,
            })
            .collect();
        let inputs = Inputs { tensors: &ins, shape };
        apply(op, Compute::Half(Half::Bf16), &inputs).unwrap()
    }

    #[test]
    fn ram_tests_the_rounded_delta() {
        // 3 − (−3·2⁻¹⁰) = 3.0029296875 rounds to bf16 3.0, and ε = 3.001 rounds to 3.0 as
        // well: the delta is not active (3.0 > 3.0 is false), although in f32 it would be.
        // The next bf16 delta, 3.015625, is.
        let base = vec![-0.0029296875f32, 0.0];
        let m = vec![3.0f32, 3.015625];
        let out = run(&MethodOp::Ram { epsilon: 3.001 }, &[2], &[base.clone(), m]);
        assert_eq!(out, vec![base[0], 3.015625]);
    }

    #[test]
    fn ram_divides_shared_deltas_in_bf16() {
        // Three active deltas of 1.5: each 1.5/3 = 0.5, their sum 1.5 on base 0.25.
        // One of 1.0 and one of 0.01 shared: 0.5 + bf(0.005) (= 0.0050048828125), summed
        // in f32 and rounded.
        let base = vec![0.25f32, 0.0];
        let a = vec![1.75f32, 1.0];
        let b = vec![1.75f32, bf(0.01)];
        let c = vec![1.75f32, 0.0];
        let out = run(&MethodOp::Ram { epsilon: 1e-5 }, &[2], &[base, a, b, c]);
        assert_eq!(out, vec![bf(0.25 + 1.5), bf(0.5 + bf(bf(0.01) / 2.0))]);
    }

    #[test]
    fn ramplus_scales_by_the_f32_lambda() {
        // a: unique at 0 and 1, shared at 2 -> ρ 0.5; b: unique at 3, shared at 2 -> ρ 1.
        // Both clamp to α = 0.5: λ = 1 + 0.3·0.5 in f32. 3·λ = 3.45 rounds to 3.453125;
        // with λ rounded to bf16 first (1.1484375) it would give 3.4375.
        let base = vec![0.0f32; 4];
        let a = vec![3.0f32, 1.0, 1.0, 0.0];
        let b = vec![0.0f32, 0.0, 1.0, 1.0];
        let op = MethodOp::RamPlusTl {
            r: 0.3,
            alpha: 0.5,
            epsilon: 1e-5,
        };
        let out = run(&op, &[4], &[base, a, b]);
        let lambda = 1.0 + 0.3f32 * 0.5;
        assert_eq!(out, vec![3.453125, bf(lambda), 1.0, bf(lambda)]);
        assert_ne!(out[0], bf(3.0 * bf(lambda)));
    }

    #[test]
    fn sce_by_hand_in_bf16() {
        // Two models, 4 elements; |variance| is largest at elements 1 and 3 (k = 2).
        let base = vec![0.0f32; 4];
        let a = vec![1.0f32, 2.0, 0.5, -5.0];
        let b = vec![1.0f32, -2.0, 0.25, 1.0];
        let out = run(&MethodOp::Sce { select_topk: 0.67 }, &[4], &[base, a, b]);
        // Masked: a = [0, 2, 0, -5], b = [0, -2, 0, 1]; mean squares 29/4 and 5/4, a's
        // weight is 7.25 / 8.5 rounded.
        let wa = bf(7.25 / 8.5);
        // Element 1: the sum 0 elects +, only a agrees: bf(2·wa) / wa.
        // Element 3: the sum −4 elects −, only a agrees: bf(−5·wa) / wa.
        let want1 = bf(bf(2.0 * wa) / wa);
        let want3 = bf(bf(-5.0 * wa) / wa);
        assert_eq!(out, vec![0.0, want1, 0.0, want3]);
    }

    #[test]
    fn arcee_fusion_keeps_outliers_in_bf16() {
        let n = 64;
        let base = vec![0.0f32; n];
        let mut ft: Vec<f32> = (0..n).map(|j| bf(0.001 * (j % 7) as f32)).collect();
        ft[5] = 2.0;
        ft[40] = -1.5;
        let out = run(&MethodOp::ArceeFusion, &[n], &[base, ft.clone()]);
        assert_eq!(out[5], 2.0);
        assert_eq!(out[40], -1.5);
        assert!(out.iter().all(|&x| bf(x) == x));
        let kept = out.iter().filter(|&&x| x != 0.0).count();
        assert!(kept < n / 4, "kept {kept}");
    }

    #[test]
    fn only_the_base_gives_the_base() {
        let base = vec![0.5f32, -1.25];
        for op in [
            MethodOp::Sce { select_topk: 0.5 },
            MethodOp::Ram { epsilon: 1e-5 },
            MethodOp::ArceeFusion,
        ] {
            assert_eq!(run(&op, &[2], std::slice::from_ref(&base)), base);
        }
    }
}
