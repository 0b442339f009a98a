//! nuslerp, multislerp, karcher, model_stock and nearswap in 16 bits, op for op as
//! mergekit 0.1.5 runs them on torch's CPU backend (`merge_methods/nuslerp.py`,
//! `multislerp.py`, `karcher.py`, `model_stock.py`, `nearswap.py`).
//!
//! Every element-wise step rounds its result to the compute dtype ([`Torch::r`]); the
//! places where torch does otherwise are spelled out where they happen:
//! * a Python float multiplying or dividing a 16-bit tensor stays an f32 scalar, while one
//!   that is added, subtracted, compared or used as a `clamp` bound is first rounded to the
//!   compute dtype (torch's add kernel has no f32-scalar path);
//! * a 0-dim f32 tensor (karcher's norms) divides a 16-bit tensor at f32 precision, but as
//!   the *left* operand of a multiply it is first rounded to the compute dtype;
//! * `scalar / tensor` is `tensor.reciprocal() * scalar` (two roundings);
//! * reductions (sum, mean, norm, dot) accumulate in f32 and round once; a sum over the
//!   stacked models (`.sum(0)`) adds them in model order in f32; Python's `sum(tensors)`
//!   rounds after every add.
//!
//! Departures from mergekit, all on inputs where it fails or divides 0 by 0:
//! * f32 reductions are modelled as exact sums rounded to f32 (torch's vectorised
//!   cascade sums differ from that by a few f32 ulps, far below a 16-bit ulp);
//! * multislerp with more than two models whose unit vectors cancel returns the
//!   weighted sum (mergekit raises), as the f32 method does;
//! * with `tol <= 0`, karcher skips a member at exactly the mean (θ = 0), stops on a zero
//!   tangent and keeps the first unit vector for a zero mean, where mergekit computes 0/0;
//! * a lone model (or only a base) is returned as it is, as the f32 methods do.

use super::super::chunks::Layout;
use super::{Inputs, Torch};
use crate::ops::MethodOp;

pub(super) fn apply(op: &MethodOp, t: &Torch, inputs: &Inputs) -> Vec<f32> {
    let xs = t.tensors(inputs);
    let shape = inputs.shape;
    match op {
        MethodOp::Nuslerp {
            weights,
            flatten,
            row_wise,
            with_base,
        } => nuslerp(t, *weights, *flatten, *row_wise, *with_base, shape, xs),
        MethodOp::Multislerp {
            weights,
            normalize_weights,
            eps,
            with_base,
        } => multislerp(t, weights, *normalize_weights, *eps, *with_base, xs),
        MethodOp::Karcher { max_iter, tol } => karcher(t, *max_iter, *tol, xs),
        MethodOp::ModelStock { filter_wise } => model_stock(t, *filter_wise, shape, xs),
        MethodOp::Nearswap { t: swap } => nearswap(t, *swap, xs),
        // `half::apply` sends only the five methods above here.
        _ => super::in_f32(op, t, inputs),
    }
}

// ---------------------------------------------------------------------------------------
// torch's reductions
// ---------------------------------------------------------------------------------------

/// An f32 accumulation, modelled as the exact sum rounded to f32.
fn acc32(values: impl Iterator<Item = f32>) -> f32 {
    values.map(f64::from).sum::<f64>() as f32
}

/// `torch.linalg.vector_norm` of an f32 tensor (squares and sum in f32, sqrt in f32).
fn norm32(x: &[f32]) -> f32 {
    acc32(x.iter().map(|v| v * v)).sqrt()
}

/// The number of vectors `layout` splits `numel` elements into.
fn vector_count(layout: Layout, numel: usize) -> usize {
    match layout {
        Layout::Flat => 1,
        Layout::Rows(len) => numel.div_ceil(len.max(1)),
        Layout::Cols { inner, .. } => inner,
    }
}

/// Per-vector f32 sums of `term(e)` over the elements `e` of each vector of `layout`,
/// not yet rounded to the compute dtype.
fn vector_sums32(layout: Layout, numel: usize, term: impl Fn(usize) -> f32) -> Vec<f32> {
    let mut acc = vec![0f64; vector_count(layout, numel)];
    for e in 0..numel {
        acc[layout.vector_of(e)] += f64::from(term(e));
    }
    acc.into_iter().map(|s| s as f32).collect()
}

/// Per-vector reductions (`.sum(dim=-1)` on a 16-bit tensor): rounded once.
fn vector_sums(t: &Torch, layout: Layout, numel: usize, term: impl Fn(usize) -> f32) -> Vec<f32> {
    let mut sums = vector_sums32(layout, numel, term);
    t.round_all(&mut sums);
    sums
}

/// Per-vector 16-bit norms (`torch.norm(x, dim=-1)` on a 16-bit tensor).
fn vector_norms(t: &Torch, layout: Layout, x: &[f32]) -> Vec<f32> {
    let squares = vector_sums32(layout, x.len(), |e| x[e] * x[e]);
    squares.into_iter().map(|s| t.r(s.sqrt())).collect()
}

/// `a - b` element-wise (task vectors).
fn sub(t: &Torch, a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(a, b)| t.r(a - b)).collect()
}

/// `x.clamp(min=lo)`: NaN stays NaN.
fn clamp_min(x: f32, lo: f32) -> f32 {
    if x < lo {
        lo
    } else {
        x
    }
}

// ---------------------------------------------------------------------------------------
// nuslerp
// ---------------------------------------------------------------------------------------

/// Inputs `[a, b]` or `[base, a, b]`; with a base, `base + nuslerp(a - base, b - base)`.
fn nuslerp(
    t: &Torch,
    weights: [f64; 2],
    flatten: bool,
    row_wise: bool,
    with_base: bool,
    shape: &[usize],
    mut xs: Vec<Vec<f32>>,
) -> Vec<f32> {
    let first = usize::from(with_base);
    let models = xs.len().saturating_sub(first);
    if models < 2 {
        // mergekit returns a lone tensor as it is; the model, else the base.
        return xs.swap_remove(if models == 1 { first } else { 0 });
    }
    let total = weights[0] + weights[1];
    let w = if total.abs() < 1e-6 {
        0.5
    } else {
        weights[1] / total
    };
    let numel = xs[0].len();
    let layout = if flatten {
        Layout::Flat
    } else if row_wise {
        Layout::cols(shape, numel)
    } else {
        Layout::rows(shape, numel)
    };
    let base = with_base.then(|| xs[0].clone());
    let (v0, v1) = match &base {
        Some(b) => (sub(t, &xs[1], b), sub(t, &xs[2], b)),
        None => (std::mem::take(&mut xs[0]), std::mem::take(&mut xs[1])),
    };

    // _normalize: x / norm(x).clamp(min=1e-7), the bound in the compute dtype.
    let floor = t.r(1e-7);
    let unit = |x: &[f32]| -> Vec<f32> {
        let d: Vec<f32> = vector_norms(t, layout, x)
            .into_iter()
            .map(|n| clamp_min(n, floor))
            .collect();
        x.iter()
            .enumerate()
            .map(|(e, v)| t.r(v / d[layout.vector_of(e)]))
            .collect()
    };
    let (u0, u1) = (unit(&v0), unit(&v1));
    let cos: Vec<f32> = vector_sums(t, layout, numel, |e| t.r(u0[e] * u1[e]))
        .into_iter()
        .map(|c| c.clamp(-1.0, 1.0))
        .collect();
    drop((u0, u1));

    // Per vector: colinear when 1 - cos² <= eps² (eps = 1e-8, compared in the compute
    // dtype); then θ, sin θ and the two sines, each rounded.
    let eps2 = t.r(1e-16);
    let one_minus_w = (1.0 - w) as f32;
    let w32 = w as f32;
    struct Coef {
        colinear: bool,
        s0: f32,
        s1: f32,
        sin_theta: f32,
    }
    let coefs: Vec<Coef> = cos
        .iter()
        .map(|&c| {
            let colinear = t.r(1.0 - t.r(c * c)) <= eps2;
            let angle_cos = if colinear { 0.0 } else { c };
            let theta = t.r(angle_cos.acos());
            Coef {
                colinear,
                s0: t.r(t.r(one_minus_w * theta).sin()),
                s1: t.r(t.r(w32 * theta).sin()),
                sin_theta: t.r(theta.sin()),
            }
        })
        .collect();

    (0..numel)
        .map(|e| {
            let k = &coefs[layout.vector_of(e)];
            let y = if k.colinear {
                t.r(t.r(one_minus_w * v0[e]) + t.r(w32 * v1[e]))
            } else {
                t.r(t.r(t.r(k.s0 * v0[e]) + t.r(k.s1 * v1[e])) / k.sin_theta)
            };
            match &base {
                Some(b) => t.r(b[e] + y),
                None => y,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// multislerp
// ---------------------------------------------------------------------------------------

/// Inputs `[m...]` or `[base, m...]` (then on task vectors). The whole tensor is one
/// vector.
fn multislerp(
    t: &Torch,
    weights: &[f64],
    normalize: bool,
    eps: f64,
    with_base: bool,
    mut xs: Vec<Vec<f32>>,
) -> Vec<f32> {
    let first = usize::from(with_base);
    let m = xs.len().saturating_sub(first);
    if m < 2 {
        // mergekit returns a lone model as it is (no base arithmetic).
        return xs.swap_remove(if m == 1 { first } else { 0 });
    }
    let base = with_base.then(|| xs.remove(0));
    if let Some(b) = &base {
        // `tensors -= base_tensor`
        xs = xs.iter().map(|x| sub(t, x, b)).collect();
    }
    let numel = xs[0].len();
    // torch.tensor(weights, dtype=...) rounds each; the normalising sum is a reduction.
    let mut w: Vec<f32> = (0..m)
        .map(|i| t.r(weights.get(i).copied().unwrap_or(0.0) as f32))
        .collect();
    if normalize {
        let s = t.sum(&w);
        w.iter_mut().for_each(|x| *x = t.r(*x / s));
    }
    // `norms + eps`: an added Python float is rounded to the compute dtype first.
    let eps_h = t.r(eps as f32);
    let norms: Vec<f32> = xs.iter().map(|x| t.r(norm32(x))).collect();
    let units: Vec<Vec<f32>> = xs
        .iter()
        .zip(&norms)
        .map(|(x, n)| {
            let d = t.r(n + eps_h);
            x.iter().map(|v| t.r(v / d)).collect()
        })
        .collect();

    // (stack * weights.view(-1, 1)).sum(0): rounded products, added in model order in f32.
    let weighted_sum = |vs: &[Vec<f32>], k: usize| -> f32 {
        let s = vs.iter().zip(&w).fold(0f32, |acc, (v, wi)| acc + t.r(v[k] * wi));
        t.r(s)
    };
    let mut mean: Vec<f32> = (0..numel).map(|k| weighted_sum(&units, k)).collect();
    let mean_norm = t.r(norm32(&mean));
    if mean_norm < eps_h {
        // mergekit falls back to the weighted sum for two models (and raises for more):
        // each product rounded, then rounded after every add.
        return (0..numel)
            .map(|k| {
                let mut y = t.r(xs[0][k] * w[0]);
                for (x, wi) in xs.iter().zip(&w).skip(1) {
                    y = t.r(y + t.r(x[k] * wi));
                }
                match &base {
                    Some(b) => t.r(y + b[k]),
                    None => y,
                }
            })
            .collect();
    }
    mean.iter_mut().for_each(|x| *x = t.r(*x / mean_norm));

    // Tangent space at the mean: u_i - (u_i·m̂) m̂, then their weighted sum.
    let dots: Vec<f32> = units
        .iter()
        .map(|u| t.r(acc32(u.iter().zip(&mean).map(|(a, b)| t.r(a * b)))))
        .collect();
    let mut tangent = units;
    for (u, d) in tangent.iter_mut().zip(&dots) {
        for (x, mh) in u.iter_mut().zip(&mean) {
            *x = t.r(*x - t.r(d * mh));
        }
    }
    let tangent_result: Vec<f32> = (0..numel).map(|k| weighted_sum(&tangent, k)).collect();
    drop(tangent);

    // Exponential map back to the sphere, scaled by the weighted input norm.
    let theta = t.r(t.r(norm32(&tangent_result)) + eps_h);
    let c = t.r(theta.cos());
    let sinc = t.r(t.r(theta.sin()) / theta);
    let avg_norm = t.r(acc32(norms.iter().zip(&w).map(|(n, wi)| t.r(n * wi))));
    mean.iter()
        .zip(&tangent_result)
        .enumerate()
        .map(|(k, (mh, tr))| {
            let r = t.r(t.r(t.r(mh * c) + t.r(tr * sinc)) * avg_norm);
            match &base {
                Some(b) => t.r(r + b[k]),
                None => r,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// karcher
// ---------------------------------------------------------------------------------------

/// Inputs `[m...]`, equal weights. Norms are f32 tensors (`.to(float32)`); units, the
/// mean and the tangent are in the compute dtype.
fn karcher(t: &Torch, max_iter: u32, tol: f64, mut xs: Vec<Vec<f32>>) -> Vec<f32> {
    let n = xs.len();
    if n == 1 {
        return xs.swap_remove(0);
    }
    let numel = xs[0].len();
    let alpha = 1.0 / n as f64;
    let norms: Vec<f32> = xs.iter().map(|x| norm32(x)).collect();
    // tensor / f32 norm: the 0-dim divisor keeps its f32 value.
    let units: Vec<Vec<f32>> = xs
        .iter()
        .zip(&norms)
        .map(|(x, &nm)| {
            if nm == 0.0 {
                vec![0.0; numel]
            } else {
                x.iter().map(|v| t.r(v / nm)).collect()
            }
        })
        .collect();
    let valid: Vec<usize> = (0..n).filter(|&i| f64::from(norms[i]) > tol).collect();
    if valid.is_empty() {
        // sum(tensor * 0 for tensor in tensors): zeros (NaN where an input is not finite).
        return (0..numel)
            .map(|k| xs.iter().fold(0f32, |acc, x| t.r(acc + t.r(x[k] * 0.0))))
            .collect();
    }
    drop(xs);
    let alpha_sum: f64 = valid.iter().map(|_| alpha).sum();
    // Python floats, so f32 scalars where they meet a tensor.
    let a32 = (alpha / alpha_sum) as f32;

    // mean += alpha * unit, rounded at each step.
    let mut mean = vec![0f32; numel];
    for &i in &valid {
        for (m, u) in mean.iter_mut().zip(&units[i]) {
            *m = t.r(*m + t.r(a32 * u));
        }
    }
    let mean_norm = norm32(&mean);
    if f64::from(mean_norm) < tol || mean_norm == 0.0 {
        mean.copy_from_slice(&units[valid[0]]);
    } else {
        mean.iter_mut().for_each(|m| *m = t.r(*m / mean_norm));
    }

    let mut tangent = vec![0f32; numel];
    for _ in 0..max_iter {
        tangent.iter_mut().for_each(|x| *x = 0.0);
        for &i in &valid {
            let unit = &units[i];
            // torch.dot of two 16-bit vectors: f32 products and sum, rounded once.
            let dot = t
                .r(acc32(mean.iter().zip(unit).map(|(a, b)| a * b)))
                .clamp(-1.0, 1.0);
            let theta = t.r(dot.acos());
            if f64::from(theta) < tol || theta == 0.0 {
                continue;
            }
            let ratio = t.r(theta / t.r(theta.sin()));
            let coef = t.r(a32 * ratio);
            for ((g, u), m) in tangent.iter_mut().zip(unit).zip(&mean) {
                *g = t.r(*g + t.r(coef * t.r(u - t.r(dot * m))));
            }
        }
        let tangent_norm = norm32(&tangent);
        if f64::from(tangent_norm) < tol || tangent_norm == 0.0 {
            break;
        }
        // cos(‖τ‖) and sin(‖τ‖) are f32 tensors on the left of a multiply, so they are
        // rounded to the compute dtype; `tangent / ‖τ‖` divides by the f32 value.
        let c = t.r(tangent_norm.cos());
        let s = t.r(tangent_norm.sin());
        for (m, g) in mean.iter_mut().zip(&tangent) {
            *m = t.r(t.r(c * *m) + t.r(s * t.r(g / tangent_norm)));
        }
        let unit_norm = norm32(&mean);
        if f64::from(unit_norm) > tol && unit_norm > 0.0 {
            mean.iter_mut().for_each(|m| *m = t.r(*m / unit_norm));
        }
    }

    // scale = sum(alpha * norm): f32 0-dim tensors added in order (every input counts),
    // then rounded as the left operand of `scale * mean`.
    let alpha32 = alpha as f32;
    let scale = t.r(norms.iter().fold(0f32, |acc, nm| acc + alpha32 * nm));
    mean.iter_mut().for_each(|m| *m = t.r(scale * *m));
    mean
}

// ---------------------------------------------------------------------------------------
// model_stock
// ---------------------------------------------------------------------------------------

/// Inputs `[base, m_1..m_N]`; one cosine per tensor, or per row when `filter_wise`.
fn model_stock(t: &Torch, filter_wise: bool, shape: &[usize], mut xs: Vec<Vec<f32>>) -> Vec<f32> {
    let n = xs.len().saturating_sub(1);
    if n < 2 {
        // Only the base, or one fine-tune (mergekit raises: no pair to take an angle
        // from): the base, as the f32 method.
        return xs.swap_remove(0);
    }
    let w0 = xs.remove(0);
    let numel = w0.len();
    let layout = if filter_wise {
        Layout::rows(shape, numel)
    } else {
        Layout::Flat
    };
    let offsets: Vec<Vec<f32>> = xs.iter().map(|x| sub(t, x, &w0)).collect();
    let norms: Vec<Vec<f32>> = offsets.iter().map(|o| vector_norms(t, layout, o)).collect();
    let vectors = vector_count(layout, numel);

    // Pairwise cosines, dot / norm_product.clamp(min=1e-6), clamped to [-1, 1].
    let floor = t.r(1e-6);
    let mut cos_pairs: Vec<Vec<f32>> = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            let (a, b) = (&offsets[i], &offsets[j]);
            let dots = vector_sums(t, layout, numel, |e| t.r(a[e] * b[e]));
            cos_pairs.push(
                (0..vectors)
                    .map(|v| {
                        let np = clamp_min(t.r(norms[i][v] * norms[j][v]), floor);
                        t.r(dots[v] / np).clamp(-1.0, 1.0)
                    })
                    .collect(),
            );
        }
    }
    drop(offsets);
    // torch.stack(cos).mean(0): summed and divided in f32, rounded once.
    let pairs = cos_pairs.len() as f32;
    let count = n as f32;
    let ts: Vec<f32> = (0..vectors)
        .map(|v| {
            let cos = t.r(acc32(cos_pairs.iter().map(|c| c[v])) / pairs);
            let den = t.r(1.0 + t.r((count - 1.0) * cos));
            // |den| < 1e-6 (compared in the compute dtype): keep the base.
            if den.abs() < floor {
                0.0
            } else {
                t.r(t.r(count * cos) / den)
            }
        })
        .collect();

    // sum(ws) / count: rounded after every add; then t·avg + (1 - t)·w0.
    (0..numel)
        .map(|e| {
            let sum = xs.iter().skip(1).fold(xs[0][e], |acc, x| t.r(acc + x[e]));
            let avg = t.r(sum / count);
            let tv = ts[layout.vector_of(e)];
            t.r(t.r(tv * avg) + t.r(t.r(1.0 - tv) * w0[e]))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// nearswap
// ---------------------------------------------------------------------------------------

/// Inputs `[base, m]`. `w = clamp(t / max(|base - m|, 1e-6), 0, 1)`,
/// `out = w·m + (1 - w)·base`.
fn nearswap(t: &Torch, swap: f64, mut xs: Vec<Vec<f32>>) -> Vec<f32> {
    if xs.len() < 2 {
        return xs.swap_remove(0);
    }
    let floor = t.r(1e-6);
    let s = swap as f32;
    xs[0]
        .iter()
        .zip(&xs[1])
        .map(|(&a, &b)| {
            let absdiff = t.r(a - b).abs();
            // t / x is x.reciprocal() * t: two roundings.
            let w = t.r(t.r(1.0 / clamp_min(absdiff, floor)) * s).clamp(0.0, 1.0);
            t.r(t.r(w * b) + t.r(t.r(1.0 - w) * a))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::exec::methods::{Inputs, MethodInput};
    use crate::io::DType;
    use crate::ops::{Compute, Half, MethodOp};

    /// `op` in bf16 over f32-stored inputs (cast to bf16 first, as `half::apply` does).
    fn run(op: &MethodOp, half: Half, shape: &[usize], data: &[Vec<f32>]) -> Vec<f32> {
        let bytes: Vec<Vec<u8>> = data
            .iter()
            .map(|d| d.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let tensors: Vec<MethodInput> = bytes
            .iter()
            .map(|b| MethodInput {
                bytes: b,
                dtype: DType::F32,
            })
            .collect();
        super::super::apply(
            op,
            half,
            &Inputs {
                tensors: &tensors,
                shape,
            },
        )
    }

    fn f32_method(op: &MethodOp, shape: &[usize], data: &[Vec<f32>]) -> Vec<f32> {
        let bytes: Vec<Vec<u8>> = data
            .iter()
            .map(|d| d.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let tensors: Vec<MethodInput> = bytes
            .iter()
            .map(|b| MethodInput {
                bytes: b,
                dtype: DType::F32,
            })
            .collect();
        crate::exec::methods::apply(
            op,
            Compute::F32,
            &Inputs {
                tensors: &tensors,
                shape,
            },
        )
        .unwrap()
    }

    #[test]
    fn nearswap_bf16_hand_computed() {
        let base = vec![0.0, 1.0, 5.0, 3.0];
        let model = vec![0.5, 1.0, -5.0, 3.5];
        let out = run(&MethodOp::Nearswap { t: 0.1 }, Half::Bf16, &[4], &[base, model]);
        // [0, 0.5]: w = bf16(2 · 0.1) = 0.2001953125, w·0.5 exactly.
        // [1, 1]: |d| clamps to bf16(1e-6), w = 1: the model.
        // [5, -5]: 1/10 rounds to 0.10009765625, w = 0.010009765625, 1 - w = 0.98828125,
        //   (1 - w)·5 = 4.9375, w·(-5) = -0.050048828125, sum 4.8874… rounds to 4.875
        //   (f32 gives 4.9).
        // [3, 3.5]: w = 0.2001953125, w·3.5 rounds to 0.69921875, (1 - w)·3 to 2.40625,
        //   their sum 3.10546875 to 3.109375.
        // 0.10009765625 = 205/2048
        assert_eq!(out, vec![205.0 / 2048.0, 1.0, 4.875, 3.109_375]);
    }

    #[test]
    fn model_stock_bf16_hand_computed() {
        // Task vectors (1, 1) and (1, 0): ‖a‖ = bf16(√2) = 1.4140625, cos = bf16(1/1.4140625)
        // = 0.70703125; 1 + cos = 1.70703125 ties to 1.703125; 2cos = 1.4140625;
        // t = bf16(1.4140625 / 1.703125) = 0.83203125 (f64: t = 0.8284).
        // avg = (1, 0.5); out = t·avg + (1 - t)·0.
        let op = MethodOp::ModelStock { filter_wise: false };
        let base = vec![0.0, 0.0];
        let out = run(&op, Half::Bf16, &[2], &[base, vec![1.0, 1.0], vec![1.0, 0.0]]);
        // 0.83203125 = 213/256
        assert_eq!(out, vec![213.0 / 256.0, 213.0 / 512.0]);
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    /// Every method's 16-bit result holds only values of the compute dtype and stays
    /// within a few 16-bit ulps of the f32 method on the same (cast) inputs.
    #[test]
    fn results_are_16_bit_values_near_the_f32_method() {
        let shape = [6usize, 10];
        let numel = 60;
        for half in [Half::Bf16, Half::F16] {
            let xs: Vec<Vec<f32>> = (0..4)
                .map(|i| random(numel, 7 + i).iter().map(|x| half.round(*x)).collect())
                .collect();
            let ops = [
                (
                    MethodOp::Nuslerp {
                        weights: [0.3, 0.7],
                        flatten: false,
                        row_wise: true,
                        with_base: true,
                    },
                    3,
                ),
                (
                    MethodOp::Nuslerp {
                        weights: [0.3, 0.7],
                        flatten: true,
                        row_wise: false,
                        with_base: false,
                    },
                    2,
                ),
                (
                    MethodOp::Multislerp {
                        weights: vec![0.5, 1.0, 0.5],
                        normalize_weights: true,
                        eps: 1e-8,
                        with_base: true,
                    },
                    4,
                ),
                (
                    MethodOp::Karcher {
                        max_iter: 10,
                        tol: 1e-5,
                    },
                    3,
                ),
                (MethodOp::ModelStock { filter_wise: true }, 4),
                (MethodOp::Nearswap { t: 0.05 }, 2),
            ];
            for (op, k) in ops {
                let out = run(&op, half, &shape, &xs[..k]);
                let want = f32_method(&op, &shape, &xs[..k]);
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (o, w) in out.iter().zip(&want) {
                    assert_eq!(*o, half.round(*o), "{op:?} {half:?}");
                    // a few ulps of the largest value (bf16: 2^-8 relative, f16: 2^-11)
                    let ulp = match half {
                        Half::Bf16 => scale / 128.0,
                        Half::F16 => scale / 1024.0,
                    };
                    assert!((o - w).abs() <= 4.0 * ulp, "{op:?} {half:?}: {o} vs {w}");
                }
            }
        }
    }
}
