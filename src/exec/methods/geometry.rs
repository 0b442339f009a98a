//! Geometric merges: slerp, nuslerp, multislerp, karcher, model_stock, nearswap.
//!
//! Values are stored and combined element-wise in f32 (plain multiplies and adds, never
//! fused). Norms and dot products accumulate in f64 in a fixed order: per
//! [`CHUNK`](super::CHUNK) of a flattened tensor, the chunks' partial sums then combined in
//! chunk order; per row or per column, sequentially along the vector (the passes are in
//! [`chunks`](super::chunks)). Scalar coefficients (angles, sines) are computed in f64 from
//! those sums and rounded to f32 once. So a result never depends on the thread count.
//! Inputs are decoded chunk by chunk in every pass; only karcher holds whole f32 vectors
//! (its running mean and tangent).

use rayon::prelude::*;

use super::chunks::{
    copy_of, map_chunks, norms_pairs, reduce_chunks, update_chunks, vector_sums, Block, Layout,
};
use super::Inputs;

// ---------------------------------------------------------------------------------------
// slerp
// ---------------------------------------------------------------------------------------

/// Inputs `[v0, v1]`. One angle for the whole flattened tensor (mergekit's numpy slerp):
/// each side is normalised only when its norm exceeds 1e-8, and `|cos| > 0.9995` (also
/// anti-parallel) falls back to lerp.
pub(super) fn slerp(t: f64, inputs: &Inputs) -> Vec<f32> {
    if inputs.len() < 2 {
        return copy_of(inputs, 0);
    }
    let s = vector_sums(inputs, Layout::Flat, false, &[(0, 0), (1, 1), (0, 1)]);
    let (c0, c1) = slerp_coefficients(t, s[0], s[1], s[2]);
    let numel = inputs.numel();
    map_chunks(numel, |range, o| {
        let b = Block::load(inputs, range, false);
        for ((o, a), v) in o.iter_mut().zip(&b.xs[0]).zip(&b.xs[1]) {
            *o = c0 * *a + c1 * *v;
        }
    })
}

pub(crate) fn slerp_coefficients(t: f64, s00: f64, s11: f64, s01: f64) -> (f32, f32) {
    const EPS: f64 = 1e-8;
    const DOT_THRESHOLD: f64 = 0.9995;
    let n0 = s00.sqrt();
    let n1 = s11.sqrt();
    let d0 = if n0 > EPS { n0 } else { 1.0 };
    let d1 = if n1 > EPS { n1 } else { 1.0 };
    let dot = s01 / (d0 * d1);
    if dot.abs() > DOT_THRESHOLD {
        return ((1.0 - t) as f32, t as f32);
    }
    // |dot| <= 0.9995 here (or NaN, which propagates as in mergekit), so sin θ > 0.03.
    let theta = dot.acos();
    let s = theta.sin();
    (
        ((theta - t * theta).sin() / s) as f32,
        ((t * theta).sin() / s) as f32,
    )
}

// ---------------------------------------------------------------------------------------
// nuslerp
// ---------------------------------------------------------------------------------------

/// Inputs `[a, b]` or `[base, a, b]`; with a base, `base + nuslerp(t, a - base, b - base)`.
pub(super) fn nuslerp(
    weights: [f64; 2],
    flatten: bool,
    row_wise: bool,
    with_base: bool,
    inputs: &Inputs,
) -> Vec<f32> {
    let first = usize::from(with_base);
    let models = inputs.len().saturating_sub(first);
    if models < 2 {
        // mergekit returns a lone tensor as it is (and rejects a base with one model);
        // the model, else the base, is the sensible answer.
        return copy_of(inputs, if models == 1 { first } else { 0 });
    }
    let sum = weights[0] + weights[1];
    let t = if sum.abs() < 1e-6 { 0.5 } else { weights[1] / sum };
    let numel = inputs.numel();
    let layout = if flatten {
        Layout::Flat
    } else if row_wise {
        Layout::cols(inputs.shape, numel)
    } else {
        Layout::rows(inputs.shape, numel)
    };
    let sums = vector_sums(inputs, layout, with_base, &[(0, 0), (1, 1), (0, 1)]);
    let coefs: Vec<(f32, f32)> = sums
        .chunks_exact(3)
        .map(|s| nuslerp_coefficients(t, s[0], s[1], s[2]))
        .collect();
    map_chunks(numel, |range, o| {
        let start = range.start;
        let b = Block::load(inputs, range, with_base);
        for (k, o) in o.iter_mut().enumerate() {
            let (c0, c1) = coefs
                .get(layout.vector_of(start + k))
                .copied()
                .unwrap_or((f32::NAN, f32::NAN));
            let y = c0 * b.xs[0][k] + c1 * b.xs[1][k];
            *o = if with_base { b.base[k] + y } else { y };
        }
    })
}

/// mergekit: `u = v / max(‖v‖, 1e-7)`, `θ = acos(clamp(u0·u1, -1, 1))`, lerp when
/// `|sin θ| < 1e-8`. In f64 the anti-parallel case really is colinear (sin π ≈ 1e-16);
/// mergekit's f32 `sin(acos(-1))` is -8.7e-8 and blows up instead.
pub(crate) fn nuslerp_coefficients(t: f64, s00: f64, s11: f64, s01: f64) -> (f32, f32) {
    let n0 = s00.sqrt().max(1e-7);
    let n1 = s11.sqrt().max(1e-7);
    let cos = (s01 / (n0 * n1)).clamp(-1.0, 1.0);
    let theta = cos.acos();
    let s = theta.sin();
    if s.abs() < 1e-8 {
        ((1.0 - t) as f32, t as f32)
    } else {
        (
            (((1.0 - t) * theta).sin() / s) as f32,
            ((t * theta).sin() / s) as f32,
        )
    }
}

// ---------------------------------------------------------------------------------------
// multislerp
// ---------------------------------------------------------------------------------------

/// Per-element evaluation of mergekit's multislerp, identical in every pass.
struct Multi {
    /// Weights (normalised when asked), f32 as mergekit's tensor.
    w: Vec<f32>,
    /// `n_i + eps`, the divisor of each unit vector.
    den: Vec<f32>,
}

impl Multi {
    /// `u_i = x_i / (n_i + eps)` into `u`; returns `m = Σ w_i u_i`.
    fn mean(&self, xs: &[Vec<f32>], k: usize, u: &mut [f32]) -> f32 {
        let mut m = 0f32;
        for (i, ((u, w), d)) in u.iter_mut().zip(&self.w).zip(&self.den).enumerate() {
            // A zero divisor (eps = 0 and a zero vector) only divides zeros.
            *u = if *d == 0.0 { 0.0 } else { xs[i][k] / *d };
            m += *w * *u;
        }
        m
    }

    /// `τ = Σ w_i (u_i - d_i m̂)` for the unit mean element `mh`.
    fn tangent(&self, u: &[f32], dots: &[f32], mh: f32) -> f32 {
        let mut tau = 0f32;
        for ((u, w), d) in u.iter().zip(&self.w).zip(dots) {
            tau += (*u - *d * mh) * *w;
        }
        tau
    }
}

/// Inputs `[m...]` or `[base, m...]` (then on task vectors). mergekit's one-step
/// tangent-space barycenter, eps placed as there: `u_i = x_i/(‖x_i‖+eps)`,
/// `θ = ‖τ‖ + eps`. The whole tensor is one vector.
pub(super) fn multislerp(
    weights: &[f64],
    normalize: bool,
    eps: f64,
    with_base: bool,
    inputs: &Inputs,
) -> Vec<f32> {
    let first = usize::from(with_base);
    let m = inputs.len().saturating_sub(first);
    if m < 2 {
        // mergekit returns a lone model as it is (no base arithmetic).
        return copy_of(inputs, if m == 1 { first } else { 0 });
    }
    let mut w: Vec<f64> = (0..m).map(|i| weights.get(i).copied().unwrap_or(0.0)).collect();
    let sum: f64 = w.iter().sum();
    // mergekit divides by the sum unguarded (all weights inf/NaN when it is 0); we keep
    // the raw weights then.
    if normalize && sum != 0.0 {
        w.iter_mut().for_each(|x| *x /= sum);
    }
    let numel = inputs.numel();
    let norms: Vec<f64> = vector_sums(inputs, Layout::Flat, with_base, &norms_pairs(m))
        .into_iter()
        .map(f64::sqrt)
        .collect();
    let multi = Multi {
        w: w.iter().map(|x| *x as f32).collect(),
        den: norms.iter().map(|n| (n + eps) as f32).collect(),
    };

    // Pass 2: ‖m‖² and u_i·m.
    let sums = reduce_chunks(numel, 1 + m, |range, acc| {
        let b = Block::load(inputs, range.clone(), with_base);
        let mut u = vec![0f32; m];
        for k in 0..range.len() {
            let me = multi.mean(&b.xs, k, &mut u);
            acc[0] += f64::from(me) * f64::from(me);
            for (a, ui) in acc[1..].iter_mut().zip(&u) {
                *a += f64::from(*ui) * f64::from(me);
            }
        }
    });
    let mnorm = sums[0].sqrt();
    if mnorm < eps || mnorm == 0.0 {
        // The unit vectors cancel (antipodal inputs with balancing weights). mergekit
        // falls back to the weighted sum for two models and raises for more; the weighted
        // sum is the sensible answer for any count, so we use it throughout.
        return map_chunks(numel, |range, o| {
            let b = Block::load(inputs, range, with_base);
            for (k, o) in o.iter_mut().enumerate() {
                let mut y = 0f32;
                for (x, wi) in b.xs.iter().zip(&multi.w) {
                    y += x[k] * *wi;
                }
                *o = if with_base { b.base[k] + y } else { y };
            }
        });
    }
    let mnorm32 = mnorm as f32;
    let dots: Vec<f32> = sums[1..].iter().map(|s| (s / mnorm) as f32).collect();

    // Pass 3: ‖τ‖².
    let tau2 = reduce_chunks(numel, 1, |range, acc| {
        let b = Block::load(inputs, range.clone(), with_base);
        let mut u = vec![0f32; m];
        for k in 0..range.len() {
            let mh = multi.mean(&b.xs, k, &mut u) / mnorm32;
            let tau = multi.tangent(&u, &dots, mh);
            acc[0] += f64::from(tau) * f64::from(tau);
        }
    });
    let theta = tau2[0].sqrt() + eps;
    let ca = theta.cos() as f32;
    // sin θ / θ → 1 as θ → 0 (only reachable with eps = 0 and τ = 0).
    let sa = if theta == 0.0 {
        1.0
    } else {
        (theta.sin() / theta) as f32
    };
    let scale = norms.iter().zip(&w).map(|(n, w)| n * w).sum::<f64>() as f32;

    // Pass 4: r = (m̂ cos θ + τ sin θ / θ) · Σ w_i n_i (+ base).
    map_chunks(numel, |range, o| {
        let b = Block::load(inputs, range, with_base);
        let mut u = vec![0f32; m];
        for (k, o) in o.iter_mut().enumerate() {
            let mh = multi.mean(&b.xs, k, &mut u) / mnorm32;
            let tau = multi.tangent(&u, &dots, mh);
            let r = (mh * ca + tau * sa) * scale;
            *o = if with_base { b.base[k] + r } else { r };
        }
    })
}

// ---------------------------------------------------------------------------------------
// karcher
// ---------------------------------------------------------------------------------------

/// Inputs `[m...]`, equal weights. mergekit's Riemannian gradient iteration on the unit
/// sphere, then scaled by the mean input norm.
pub(super) fn karcher(max_iter: u32, tol: f64, inputs: &Inputs) -> Vec<f32> {
    let n = inputs.len();
    if n == 1 {
        return copy_of(inputs, 0);
    }
    let numel = inputs.numel();
    let alpha = 1.0 / n as f64;
    let norms: Vec<f64> = vector_sums(inputs, Layout::Flat, false, &norms_pairs(n))
        .into_iter()
        .map(f64::sqrt)
        .collect();
    // Zero-norm inputs have zero unit vectors; only those above `tol` take part.
    let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; numel];
    }
    let norm32: Vec<f32> = norms.iter().map(|x| *x as f32).collect();
    let unit = |x: f32, i: usize| {
        if norm32[i] == 0.0 {
            0.0
        } else {
            x / norm32[i]
        }
    };
    let valid_alpha = alpha * valid.len() as f64;
    let abar: Vec<f32> = valid.iter().map(|_| (alpha / valid_alpha) as f32).collect();

    // The weighted mean of the unit vectors, and its norm.
    let mut mean = vec![0f32; numel];
    let s = update_chunks(&mut mean, 1, |range, o, acc| {
        let b = Block::load(inputs, range, false);
        for (k, o) in o.iter_mut().enumerate() {
            let mut y = 0f32;
            for (&i, a) in valid.iter().zip(&abar) {
                y += *a * unit(b.xs[i][k], i);
            }
            *o = y;
            acc[0] += f64::from(y) * f64::from(y);
        }
    });
    let mean_norm = s[0].sqrt();
    // (`== 0` only matters for tol <= 0: there is no direction to normalise.)
    if mean_norm < tol || mean_norm == 0.0 {
        let i0 = valid[0];
        update_chunks(&mut mean, 0, |range, o, _| {
            let b = Block::load(inputs, range, false);
            for (o, x) in o.iter_mut().zip(&b.xs[i0]) {
                *o = unit(*x, i0);
            }
        });
    } else {
        let d = mean_norm as f32;
        mean.par_iter_mut().for_each(|x| *x /= d);
    }

    let mut tangent = vec![0f32; numel];
    for _ in 0..max_iter {
        // cos θ_i = clamp(mean·u_i, -1, 1).
        let dots = reduce_chunks(numel, valid.len(), |range, acc| {
            let b = Block::load(inputs, range.clone(), false);
            let mean = &mean[range];
            for (a, &i) in acc.iter_mut().zip(&valid) {
                let mut s = *a;
                for (m, x) in mean.iter().zip(&b.xs[i]) {
                    s += f64::from(*m) * f64::from(unit(*x, i));
                }
                *a = s;
            }
        });
        // Members already at the mean (θ < tol) do not pull.
        let mut active: Vec<(usize, f32, f32)> = Vec::new();
        for ((&i, d), a) in valid.iter().zip(&dots).zip(&abar) {
            let dot = d.clamp(-1.0, 1.0);
            let theta = dot.acos();
            // θ = 0 (also with tol <= 0) means u_i is the mean: no pull, and θ/sin θ is 0/0.
            if theta < tol || theta == 0.0 {
                continue;
            }
            // 0 < θ ≤ π, so sin θ > 0 (sin π ≈ 1.2e-16 in f64).
            active.push((i, *a * (theta / theta.sin()) as f32, dot as f32));
        }
        let mean_ref = &mean;
        let s = update_chunks(&mut tangent, 1, |range, o, acc| {
            let b = Block::load(inputs, range.clone(), false);
            let mean = &mean_ref[range];
            for (k, o) in o.iter_mut().enumerate() {
                let mut y = 0f32;
                for &(i, c, dot) in &active {
                    y += c * (unit(b.xs[i][k], i) - dot * mean[k]);
                }
                *o = y;
                acc[0] += f64::from(y) * f64::from(y);
            }
        });
        let tn = s[0].sqrt();
        // tn = 0 (possible when tol <= 0) would make sin(tn)/tn 0/0; there is no step.
        if tn < tol || tn == 0.0 {
            break;
        }
        let ct = tn.cos() as f32;
        let st = (tn.sin() / tn) as f32;
        let tangent_ref = &tangent;
        let s = update_chunks(&mut mean, 1, |range, o, acc| {
            for (o, t) in o.iter_mut().zip(&tangent_ref[range]) {
                let y = ct * *o + st * *t;
                *o = y;
                acc[0] += f64::from(y) * f64::from(y);
            }
        });
        let un = s[0].sqrt();
        if un > tol && un > 0.0 {
            let d = un as f32;
            mean.par_iter_mut().for_each(|x| *x /= d);
        }
    }

    let scale = norms.iter().map(|x| alpha * x).sum::<f64>() as f32;
    mean.par_iter_mut().for_each(|x| *x *= scale);
    mean
}

// ---------------------------------------------------------------------------------------
// model_stock
// ---------------------------------------------------------------------------------------

/// Inputs `[base, m_1..m_N]`. `cos` = mean pairwise cosine of the task vectors (per tensor,
/// or per row when `filter_wise`), `t = N·cos / (1 + (N-1)·cos)`,
/// `out = t·mean(m) + (1 - t)·base`.
pub(super) fn model_stock(filter_wise: bool, inputs: &Inputs) -> Vec<f32> {
    let n = inputs.len().saturating_sub(1);
    if n < 2 {
        // Only the base: mergekit returns it. One fine-tune: mergekit raises (there is no
        // pair to take an angle from); with no angle we take cos = 0, i.e. t = 0, the base
        // (as a zero task vector counts as cos 0).
        return copy_of(inputs, 0);
    }
    let numel = inputs.numel();
    let layout = if filter_wise {
        Layout::rows(inputs.shape, numel)
    } else {
        Layout::Flat
    };
    let mut pairs = norms_pairs(n);
    for i in 0..n {
        for j in i + 1..n {
            pairs.push((i, j));
        }
    }
    let p = pairs.len();
    let sums = vector_sums(inputs, layout, true, &pairs);
    let ts: Vec<(f32, f32)> = sums
        .chunks_exact(p)
        .map(|s| model_stock_t(s, &pairs, n))
        .collect();
    let n32 = n as f32;
    map_chunks(numel, |range, o| {
        let start = range.start;
        let b = Block::load(inputs, range, false);
        for (k, o) in o.iter_mut().enumerate() {
            let (t, u) = ts
                .get(layout.vector_of(start + k))
                .copied()
                .unwrap_or((f32::NAN, f32::NAN));
            let mut sum = 0f32;
            for x in &b.xs[1..] {
                sum += x[k];
            }
            let avg = sum / n32;
            *o = t * avg + u * b.xs[0][k];
        }
    })
}

/// `(t, 1 - t)` of one vector from its sums over `pairs`: the `n` norms `(i, i)` first,
/// then every pair `(i, j)`, `i < j`.
pub(crate) fn model_stock_t(s: &[f64], pairs: &[(usize, usize)], n: usize) -> (f32, f32) {
    let p = pairs.len();
    let mut total = 0.0f64;
    for (q, &(i, j)) in pairs.iter().enumerate().skip(n) {
        let norm_product = (s[i].sqrt() * s[j].sqrt()).max(1e-6);
        total += (s[q] / norm_product).clamp(-1.0, 1.0);
    }
    let cos = total / (p - n) as f64;
    let den = 1.0 + (n as f64 - 1.0) * cos;
    // mergekit divides unguarded. The denominator vanishes at cos = -1/(N-1), where
    // the task vectors point as far apart as N vectors can, so their mean offset is
    // (near) zero and `t·mean offset` is 0·∞. The limit-sensible result is no offset:
    // t = 0, the base. Same threshold as the fixtures' float64 re-derivation.
    let t = if den.abs() < 1e-6 {
        0.0
    } else {
        n as f64 * cos / den
    };
    (t as f32, (1.0 - t) as f32)
}

// ---------------------------------------------------------------------------------------
// nearswap
// ---------------------------------------------------------------------------------------

/// Inputs `[base, m]`. `w = clamp(t / max(|base - m|, 1e-6), 0, 1)`,
/// `out = w·m + (1 - w)·base`.
pub(super) fn nearswap(t: f64, inputs: &Inputs) -> Vec<f32> {
    if inputs.len() < 2 {
        return copy_of(inputs, 0);
    }
    let t = t as f32;
    map_chunks(inputs.numel(), |range, o| {
        let b = Block::load(inputs, range, false);
        for ((o, base), x) in o.iter_mut().zip(&b.xs[0]).zip(&b.xs[1]) {
            let d = (*base - *x).abs();
            let d = if d < 1e-6 { 1e-6 } else { d };
            let w = (t / d).clamp(0.0, 1.0);
            *o = w * *x + (1.0 - w) * *base;
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use safetensors::{Dtype, SafeTensors};

    use super::*;
    use crate::exec::methods::MethodInput;
    use crate::ops::MethodOp;

    /// The method through the one dispatch, unwrapped (tests give it inputs).
    pub(crate) fn apply(op: &MethodOp, inputs: &Inputs) -> Vec<f32> {
        crate::exec::methods::apply(op, crate::ops::Compute::F32, inputs).unwrap()
    }
    use crate::io::DType;

    // ------------------------------------------------------------------------------
    // helpers
    // ------------------------------------------------------------------------------

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn from_bytes(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Runs `op` on f32 tensors of `shape`.
    fn run(op: &MethodOp, shape: &[usize], data: &[Vec<f32>]) -> Vec<f32> {
        let bytes: Vec<Vec<u8>> = data.iter().map(|d| f32_bytes(d)).collect();
        let tensors: Vec<MethodInput> = bytes
            .iter()
            .map(|b| MethodInput {
                bytes: b,
                dtype: DType::F32,
            })
            .collect();
        apply(
            op,
            &Inputs {
                tensors: &tensors,
                shape,
            },
        )
    }

    /// max |a - b| / (1e-5 · max(1, max|a|)): at most 1 passes the conformance f32 rule.
    fn ratio(reference: &[f64], ours: &[f32]) -> f64 {
        assert_eq!(reference.len(), ours.len());
        let max_ref = reference.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = reference
            .iter()
            .zip(ours)
            .map(|(r, o)| {
                let d = (r - f64::from(*o)).abs();
                if d.is_nan() {
                    f64::INFINITY
                } else {
                    d
                }
            })
            .fold(0.0f64, f64::max);
        err / (1e-5 * max_ref.max(1.0))
    }

    fn assert_close(reference: &[f64], ours: &[f32], what: &str) {
        let r = ratio(reference, ours);
        assert!(r <= 1.0, "{what}: error {r:.3} of the bound");
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|x| f64::from(*x)).collect()
    }

    /// The element indices of each vector, as a float64 reference sees them.
    fn vectors(layout: Layout, numel: usize) -> Vec<Vec<usize>> {
        match layout {
            Layout::Flat => vec![(0..numel).collect()],
            Layout::Rows(len) => (0..numel / len)
                .map(|r| (r * len..(r + 1) * len).collect())
                .collect(),
            Layout::Cols { len, inner } => (0..inner)
                .map(|c| (0..len).map(|r| r * inner + c).collect())
                .collect(),
        }
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn naive_nuslerp(t: f64, v0: &[f64], v1: &[f64], layout: Layout) -> Vec<f64> {
        let mut out = vec![0.0; v0.len()];
        for idx in vectors(layout, v0.len()) {
            let a: Vec<f64> = idx.iter().map(|&i| v0[i]).collect();
            let b: Vec<f64> = idx.iter().map(|&i| v1[i]).collect();
            let na = dot(&a, &a).sqrt().max(1e-7);
            let nb = dot(&b, &b).sqrt().max(1e-7);
            let cos = (dot(&a, &b) / (na * nb)).clamp(-1.0, 1.0);
            let th = cos.acos();
            let s = th.sin();
            for (k, &i) in idx.iter().enumerate() {
                out[i] = if s.abs() < 1e-8 {
                    (1.0 - t) * a[k] + t * b[k]
                } else {
                    (((1.0 - t) * th).sin() * a[k] + (t * th).sin() * b[k]) / s
                };
            }
        }
        out
    }

    fn naive_multislerp(xs: &[Vec<f64>], w: &[f64], base: Option<&[f64]>, eps: f64) -> Vec<f64> {
        let n = xs[0].len();
        let xs: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| match base {
                Some(b) => x.iter().zip(b).map(|(x, b)| x - b).collect(),
                None => x.clone(),
            })
            .collect();
        let sw: f64 = w.iter().sum();
        let w: Vec<f64> = w.iter().map(|x| x / sw).collect();
        let norms: Vec<f64> = xs.iter().map(|x| dot(x, x).sqrt()).collect();
        let us: Vec<Vec<f64>> = xs
            .iter()
            .zip(&norms)
            .map(|(x, nm)| x.iter().map(|v| v / (nm + eps)).collect())
            .collect();
        let mut m = vec![0.0; n];
        for (u, wi) in us.iter().zip(&w) {
            for (m, u) in m.iter_mut().zip(u) {
                *m += wi * u;
            }
        }
        let mn = dot(&m, &m).sqrt();
        m.iter_mut().for_each(|x| *x /= mn);
        let mut tau = vec![0.0; n];
        for (u, wi) in us.iter().zip(&w) {
            let d = dot(u, &m);
            for ((t, u), m) in tau.iter_mut().zip(u).zip(&m) {
                *t += wi * (u - d * m);
            }
        }
        let th = dot(&tau, &tau).sqrt() + eps;
        let scale: f64 = norms.iter().zip(&w).map(|(a, b)| a * b).sum();
        (0..n)
            .map(|e| {
                let r = (m[e] * th.cos() + tau[e] * th.sin() / th) * scale;
                r + base.map_or(0.0, |b| b[e])
            })
            .collect()
    }

    fn naive_karcher(xs: &[Vec<f64>], max_iter: u32, tol: f64) -> Vec<f64> {
        let n = xs.len();
        let norms: Vec<f64> = xs.iter().map(|x| dot(x, x).sqrt()).collect();
        let units: Vec<Vec<f64>> = xs
            .iter()
            .zip(&norms)
            .map(|(x, nm)| x.iter().map(|v| if *nm > 0.0 { v / nm } else { 0.0 }).collect())
            .collect();
        let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
        if valid.is_empty() {
            return vec![0.0; xs[0].len()];
        }
        let a = 1.0 / valid.len() as f64;
        let mut mean = vec![0.0; xs[0].len()];
        for &i in &valid {
            for (m, u) in mean.iter_mut().zip(&units[i]) {
                *m += a * u;
            }
        }
        let mn = dot(&mean, &mean).sqrt();
        if mn < tol {
            mean = units[valid[0]].clone();
        } else {
            mean.iter_mut().for_each(|x| *x /= mn);
        }
        for _ in 0..max_iter {
            let mut tang = vec![0.0; mean.len()];
            for &i in &valid {
                let d = dot(&mean, &units[i]).clamp(-1.0, 1.0);
                let th = d.acos();
                if th < tol {
                    continue;
                }
                for ((t, u), m) in tang.iter_mut().zip(&units[i]).zip(&mean) {
                    *t += a * (th / th.sin()) * (u - d * m);
                }
            }
            let tn = dot(&tang, &tang).sqrt();
            if tn < tol {
                break;
            }
            for (m, t) in mean.iter_mut().zip(&tang) {
                *m = tn.cos() * *m + tn.sin() * t / tn;
            }
            let un = dot(&mean, &mean).sqrt();
            if un > tol {
                mean.iter_mut().for_each(|x| *x /= un);
            }
        }
        let scale: f64 = norms.iter().sum::<f64>() / n as f64;
        mean.iter().map(|m| m * scale).collect()
    }

    fn naive_model_stock(base: &[f64], xs: &[Vec<f64>], layout: Layout) -> Vec<f64> {
        let n = xs.len();
        let mut out = vec![0.0; base.len()];
        for idx in vectors(layout, base.len()) {
            let offs: Vec<Vec<f64>> = xs
                .iter()
                .map(|x| idx.iter().map(|&i| x[i] - base[i]).collect())
                .collect();
            let mut cs = Vec::new();
            for i in 0..n {
                for j in i + 1..n {
                    let den = (dot(&offs[i], &offs[i]).sqrt() * dot(&offs[j], &offs[j]).sqrt()).max(1e-6);
                    cs.push((dot(&offs[i], &offs[j]) / den).clamp(-1.0, 1.0));
                }
            }
            let c = cs.iter().sum::<f64>() / cs.len() as f64;
            let t = n as f64 * c / (1.0 + (n as f64 - 1.0) * c);
            for &i in &idx {
                let avg = xs.iter().map(|x| x[i]).sum::<f64>() / n as f64;
                out[i] = t * avg + (1.0 - t) * base[i];
            }
        }
        out
    }

    fn all_ops() -> Vec<MethodOp> {
        vec![
            MethodOp::Slerp { t: 0.3 },
            MethodOp::Nuslerp {
                weights: [1.0, 2.0],
                flatten: true,
                row_wise: false,
                with_base: false,
            },
            MethodOp::Nuslerp {
                weights: [1.0, 2.0],
                flatten: false,
                row_wise: true,
                with_base: true,
            },
            MethodOp::Nuslerp {
                weights: [1.0, 2.0],
                flatten: false,
                row_wise: false,
                with_base: true,
            },
            MethodOp::Multislerp {
                weights: vec![0.2, 0.3, 0.5],
                normalize_weights: true,
                eps: 1e-8,
                with_base: false,
            },
            MethodOp::Multislerp {
                weights: vec![0.2, 0.3],
                normalize_weights: true,
                eps: 1e-8,
                with_base: true,
            },
            MethodOp::Karcher {
                max_iter: 10,
                tol: 1e-5,
            },
            MethodOp::ModelStock { filter_wise: false },
            MethodOp::ModelStock { filter_wise: true },
            MethodOp::Nearswap { t: 0.01 },
        ]
    }

    // ------------------------------------------------------------------------------
    // edge cases
    // ------------------------------------------------------------------------------

    #[test]
    fn empty_and_degenerate_inputs_do_not_panic() {
        for op in all_ops() {
            // numel 0
            for k in 0..4 {
                let data = vec![Vec::new(); k];
                assert!(run(&op, &[0, 4], &data).is_empty(), "{op:?}");
                assert!(run(&op, &[0], &data).is_empty(), "{op:?}");
            }
            // no inputs at all: a bug elsewhere, reported, not made-up values
            let none = crate::exec::methods::apply(
                &op,
                crate::ops::Compute::F32,
                &Inputs {
                    tensors: &[],
                    shape: &[3],
                },
            );
            assert!(
                matches!(none, Err(crate::exec::methods::MethodError::NoInputs(_))),
                "{op:?}"
            );
            // a single input comes back unchanged
            let x = vec![1.5f32, -2.0, 0.25];
            assert_eq!(run(&op, &[3], std::slice::from_ref(&x)), x, "{op:?}");
            // all-zero tensors, scalars and 1-element tensors give finite values
            for shape in [&[4usize, 3][..], &[1], &[], &[1, 1], &[5]] {
                let numel: usize = shape.iter().product();
                for k in 2..5 {
                    let zeros = vec![vec![0f32; numel]; k];
                    let out = run(&op, shape, &zeros);
                    assert_eq!(out.len(), numel);
                    assert!(out.iter().all(|v| *v == 0.0), "{op:?} {shape:?} {out:?}");
                    let data: Vec<Vec<f32>> = (0..k).map(|i| random(numel, 7 + i as u64)).collect();
                    let out = run(&op, shape, &data);
                    assert!(out.iter().all(|v| v.is_finite()), "{op:?} {shape:?} {out:?}");
                }
            }
        }
    }

    #[test]
    fn slerp_hand_computed() {
        let h = std::f64::consts::FRAC_1_SQRT_2;
        let out = run(
            &MethodOp::Slerp { t: 0.5 },
            &[2],
            &[vec![1.0, 0.0], vec![0.0, 1.0]],
        );
        assert_close(&[h, h], &out, "unit quarter circle");
        // Un-normalised inputs: θ = π/2, coefficients sin(2π/6) and sin(π/6).
        let out = run(
            &MethodOp::Slerp { t: 1.0 / 3.0 },
            &[1, 2],
            &[vec![2.0, 0.0], vec![0.0, 3.0]],
        );
        assert_close(&[3f64.sqrt(), 1.5], &out, "scaled");
        // A zero side is not normalised: cos 0, so sin(tπ/2)·v1.
        let v1 = random(10, 3);
        let out = run(&MethodOp::Slerp { t: 0.25 }, &[10], &[vec![0.0; 10], v1.clone()]);
        let s = (0.25 * std::f64::consts::FRAC_PI_2).sin();
        let want: Vec<f64> = v1.iter().map(|x| s * f64::from(*x)).collect();
        assert_close(&want, &out, "zero v0");
    }

    #[test]
    fn slerp_takes_the_lerp_branch_near_parallel() {
        let a = random(1000, 1);
        // identical
        let out = run(&MethodOp::Slerp { t: 0.3 }, &[10, 100], &[a.clone(), a.clone()]);
        for (o, x) in out.iter().zip(&a) {
            assert_eq!(*o, 0.7f32 * *x + 0.3f32 * *x);
        }
        // nearly parallel (cos ≈ 0.9999) and anti-parallel: exactly (1-t)a + tb
        let b: Vec<f32> = a
            .iter()
            .zip(random(1000, 2))
            .map(|(x, e)| *x + 0.01 * e)
            .collect();
        let c: Vec<f32> = a.iter().map(|x| -*x).collect();
        for other in [b, c] {
            let out = run(&MethodOp::Slerp { t: 0.3 }, &[1000], &[a.clone(), other.clone()]);
            for ((o, x), y) in out.iter().zip(&a).zip(&other) {
                assert_eq!(*o, 0.7f32 * *x + 0.3f32 * *y);
            }
        }
        // 1-element tensors are always (anti-)parallel
        let out = run(&MethodOp::Slerp { t: 0.5 }, &[1], &[vec![2.0], vec![3.0]]);
        assert_eq!(out, vec![2.5]);
    }

    #[test]
    fn nuslerp_zero_task_vector_and_antiparallel() {
        let base = random(24, 1);
        let v1 = random(24, 2);
        let b: Vec<f32> = base.iter().zip(&v1).map(|(b, v)| b + v).collect();
        let op = MethodOp::Nuslerp {
            weights: [3.0, 1.0],
            flatten: false,
            row_wise: true,
            with_base: true,
        };
        // [4, 6]: every column of the zero task vector gives cos 0
        let out = run(&op, &[4, 6], &[base.clone(), base.clone(), b.clone()]);
        let s = (0.25 * std::f64::consts::FRAC_PI_2).sin();
        let want: Vec<f64> = base
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) + s * (f64::from(*y) - f64::from(*x)))
            .collect();
        assert_close(&want, &out, "zero task vector");
        // anti-parallel rows are colinear: lerp, not a blow-up
        let a = random(12, 5);
        let c: Vec<f32> = a.iter().map(|x| -2.0 * x).collect();
        let op = MethodOp::Nuslerp {
            weights: [1.0, 1.0],
            flatten: false,
            row_wise: false,
            with_base: false,
        };
        let out = run(&op, &[3, 4], &[a.clone(), c]);
        let want: Vec<f64> = a.iter().map(|x| -0.5 * f64::from(*x)).collect();
        assert_close(&want, &out, "anti-parallel");
        // weights summing to ~0 give t = 0.5
        let op = MethodOp::Nuslerp {
            weights: [1.0, -1.0],
            flatten: true,
            row_wise: false,
            with_base: false,
        };
        let out = run(&op, &[2], &[vec![1.0, 0.0], vec![0.0, 1.0]]);
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert_close(&[h, h], &out, "t = 0.5");
    }

    #[test]
    fn nuslerp_layouts_match_a_float64_reference() {
        let t = 0.6;
        let op = |flatten, row_wise, with_base| MethodOp::Nuslerp {
            weights: [0.4, 0.6],
            flatten,
            row_wise,
            with_base,
        };
        // small 3-D, a 1-D, and multi-chunk shapes (rows longer than a chunk, many columns)
        for shape in [
            vec![3usize, 5, 7],
            vec![9],
            vec![300, 500],
            vec![2, 70_000],
            vec![70_000, 2],
        ] {
            let numel: usize = shape.iter().product();
            let base = random(numel, 11);
            let a = random(numel, 12);
            let b = random(numel, 13);
            for (flatten, row_wise) in [(true, false), (false, false), (false, true)] {
                let layout = if flatten {
                    Layout::Flat
                } else if row_wise {
                    Layout::cols(&shape, numel)
                } else {
                    Layout::rows(&shape, numel)
                };
                let out = run(&op(flatten, row_wise, false), &shape, &[a.clone(), b.clone()]);
                let want = naive_nuslerp(t, &f64s(&a), &f64s(&b), layout);
                assert_close(&want, &out, &format!("{shape:?} {layout:?}"));
                let out = run(
                    &op(flatten, row_wise, true),
                    &shape,
                    &[base.clone(), a.clone(), b.clone()],
                );
                let ta: Vec<f64> = a.iter().zip(&base).map(|(x, y)| f64::from(x - y)).collect();
                let tb: Vec<f64> = b.iter().zip(&base).map(|(x, y)| f64::from(x - y)).collect();
                let d = naive_nuslerp(t, &ta, &tb, layout);
                let want: Vec<f64> = d.iter().zip(&base).map(|(d, b)| d + f64::from(*b)).collect();
                assert_close(&want, &out, &format!("{shape:?} {layout:?} base"));
            }
        }
    }

    #[test]
    fn multislerp_matches_a_float64_reference() {
        for shape in [vec![7usize], vec![300, 500]] {
            let numel: usize = shape.iter().product();
            let xs: Vec<Vec<f32>> = (0..4).map(|i| random(numel, 20 + i)).collect();
            let w = [0.5, 1.0, 0.25];
            let op = MethodOp::Multislerp {
                weights: w.to_vec(),
                normalize_weights: true,
                eps: 1e-8,
                with_base: false,
            };
            let out = run(&op, &shape, &xs[1..]);
            let want = naive_multislerp(
                &xs[1..].iter().map(|x| f64s(x)).collect::<Vec<_>>(),
                &w,
                None,
                1e-8,
            );
            assert_close(&want, &out, &format!("{shape:?}"));
            let op = MethodOp::Multislerp {
                weights: w.to_vec(),
                normalize_weights: true,
                eps: 1e-8,
                with_base: true,
            };
            let out = run(&op, &shape, &xs);
            let base = f64s(&xs[0]);
            let want = naive_multislerp(
                &xs[1..].iter().map(|x| f64s(x)).collect::<Vec<_>>(),
                &w,
                Some(&base),
                1e-8,
            );
            assert_close(&want, &out, &format!("{shape:?} base"));
        }
    }

    #[test]
    fn multislerp_cancelling_units_fall_back_to_the_weighted_sum() {
        let a = random(20, 1);
        // -2a: exactly antipodal in f32 too (a power-of-two scale), so m = 0 exactly
        let neg: Vec<f32> = a.iter().map(|x| -2.0 * x).collect();
        let op = MethodOp::Multislerp {
            weights: vec![1.0, 1.0],
            normalize_weights: true,
            eps: 1e-8,
            with_base: false,
        };
        let out = run(&op, &[20], &[a.clone(), neg.clone()]);
        let want: Vec<f64> = a.iter().map(|x| -0.5 * f64::from(*x)).collect();
        assert_close(&want, &out, "two antipodal");
        // three: a, -a, and a zero vector (its unit is zero): mergekit raises
        let op = MethodOp::Multislerp {
            weights: vec![1.0, 1.0, 2.0],
            normalize_weights: true,
            eps: 1e-8,
            with_base: false,
        };
        let out = run(&op, &[20], &[a.clone(), neg, vec![0.0; 20]]);
        let want: Vec<f64> = a.iter().map(|x| -0.25 * f64::from(*x)).collect();
        assert_close(&want, &out, "three cancelling");
    }

    #[test]
    fn karcher_matches_a_float64_reference() {
        for shape in [vec![5usize], vec![300, 500]] {
            let numel: usize = shape.iter().product();
            let shared = random(numel, 40);
            let xs: Vec<Vec<f32>> = (0..3)
                .map(|i| {
                    random(numel, 41 + i)
                        .iter()
                        .zip(&shared)
                        .map(|(e, s)| s + 0.3 * (i as f32 + 1.0) * e)
                        .collect()
                })
                .collect();
            let op = MethodOp::Karcher {
                max_iter: 12,
                tol: 5e-6,
            };
            let out = run(&op, &shape, &xs);
            let want = naive_karcher(&xs.iter().map(|x| f64s(x)).collect::<Vec<_>>(), 12, 5e-6);
            assert_close(&want, &out, &format!("{shape:?}"));
            // a zero input drops out of the mean but counts in the scale
            let mut with_zero = xs.clone();
            with_zero.push(vec![0.0; numel]);
            let out = run(&op, &shape, &with_zero);
            let want = naive_karcher(&with_zero.iter().map(|x| f64s(x)).collect::<Vec<_>>(), 12, 5e-6);
            assert_close(&want, &out, &format!("{shape:?} zero member"));
        }
        // identical inputs: the mean is the input
        let a = random(50, 3);
        let out = run(
            &MethodOp::Karcher {
                max_iter: 10,
                tol: 1e-5,
            },
            &[50],
            &[a.clone(), a.clone()],
        );
        assert_close(&f64s(&a), &out, "identical");
    }

    #[test]
    fn model_stock_matches_a_float64_reference() {
        for shape in [vec![4usize, 6], vec![9], vec![300, 500], vec![2, 70_000]] {
            let numel: usize = shape.iter().product();
            let xs: Vec<Vec<f32>> = (0..4).map(|i| random(numel, 60 + i)).collect();
            let base = f64s(&xs[0]);
            let others: Vec<Vec<f64>> = xs[1..].iter().map(|x| f64s(x)).collect();
            for filter_wise in [false, true] {
                let layout = if filter_wise {
                    Layout::rows(&shape, numel)
                } else {
                    Layout::Flat
                };
                let out = run(&MethodOp::ModelStock { filter_wise }, &shape, &xs);
                let want = naive_model_stock(&base, &others, layout);
                assert_close(&want, &out, &format!("{shape:?} {filter_wise}"));
            }
        }
    }

    #[test]
    fn model_stock_edges() {
        let base = random(12, 1);
        let a = random(12, 2);
        let op = MethodOp::ModelStock { filter_wise: false };
        // opposite task vectors: cos = -1, N = 2, denominator 0 → the base
        let b: Vec<f32> = base.iter().zip(&a).map(|(b, a)| b - (a - b)).collect();
        let out = run(&op, &[12], &[base.clone(), a.clone(), b]);
        assert_close(&f64s(&base), &out, "1 + (N-1) cos = 0");
        // a zero task vector counts as cos 0: N = 2 gives t = 0
        let out = run(&op, &[12], &[base.clone(), a.clone(), base.clone()]);
        assert_close(&f64s(&base), &out, "zero task vector");
        // identical fine-tunes: cos 1, t = 1, the fine-tune
        let out = run(&op, &[3, 4], &[base.clone(), a.clone(), a.clone(), a.clone()]);
        assert_close(&f64s(&a), &out, "identical");
        // one fine-tune: the base
        let out = run(&op, &[12], &[base.clone(), a]);
        assert_eq!(out, base);
    }

    #[test]
    fn nearswap_hand_computed() {
        let base = vec![0.0f32, 1.0, 2.0, 3.0, 5.0];
        let x = vec![0.5f32, 1.0, 2.05, 3.0000001, -5.0];
        let out = run(&MethodOp::Nearswap { t: 0.1 }, &[5], &[base.clone(), x.clone()]);
        // w = clamp(0.1 / max(|d|, 1e-6), 0, 1): 0.2, 1, 1, 1, 0.01
        let want = [0.1, 1.0, 2.05, 3.0000001, 5.0 - 0.1];
        assert_close(&want, &out, "nearswap");
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let shape = [300usize, 500];
        let numel = 150_000;
        let xs: Vec<Vec<f32>> = (0..4).map(|i| random(numel, 80 + i)).collect();
        let mut ops = all_ops();
        ops.push(MethodOp::Karcher {
            max_iter: 3,
            tol: 1e-9,
        });
        for op in ops {
            let k = match &op {
                MethodOp::Slerp { .. } | MethodOp::Nearswap { .. } => 2,
                MethodOp::Nuslerp { with_base, .. } => 2 + usize::from(*with_base),
                MethodOp::Multislerp {
                    weights, with_base, ..
                } => weights.len() + usize::from(*with_base),
                _ => 4,
            };
            let results: Vec<Vec<u32>> = [1usize, 2, 3]
                .iter()
                .map(|&threads| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(|| run(&op, &shape, &xs[..k]))
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                })
                .collect();
            assert_eq!(results[0], results[1], "{op:?}");
            assert_eq!(results[0], results[2], "{op:?}");
        }
    }

    // ------------------------------------------------------------------------------
    // mergekit 0.1.5 conformance fixtures
    // ------------------------------------------------------------------------------

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conformance")
    }

    /// Runs `op(tensor name)` over every tensor of `expected/NAME` with the given input
    /// models (in the op's input order) and checks the f32 rule; returns the worst
    /// error / bound.
    fn conformance(name: &str, models: &[&str], op: impl Fn(&str) -> MethodOp) -> f64 {
        let dir = fixtures();
        let model_bytes: Vec<Vec<u8>> = models
            .iter()
            .map(|m| std::fs::read(dir.join("models").join(m).join("model.safetensors")).unwrap())
            .collect();
        let sts: Vec<SafeTensors> = model_bytes
            .iter()
            .map(|b| SafeTensors::deserialize(b).unwrap())
            .collect();
        let exp_bytes = std::fs::read(dir.join("expected").join(name).join("model.safetensors")).unwrap();
        let expected = SafeTensors::deserialize(&exp_bytes).unwrap();
        let mut worst = (0.0f64, String::new());
        let mut count = 0;
        for (tensor, view) in expected.tensors() {
            assert_eq!(view.dtype(), Dtype::F32);
            let views: Vec<_> = sts.iter().map(|s| s.tensor(&tensor).unwrap()).collect();
            for v in &views {
                assert_eq!(v.shape(), view.shape(), "{tensor}");
                assert_eq!(v.dtype(), Dtype::F32);
            }
            let tensors: Vec<MethodInput> = views
                .iter()
                .map(|v| MethodInput {
                    bytes: v.data(),
                    dtype: DType::F32,
                })
                .collect();
            let ours = apply(
                &op(&tensor),
                &Inputs {
                    tensors: &tensors,
                    shape: view.shape(),
                },
            );
            let r = ratio(&f64s(&from_bytes(view.data())), &ours);
            assert!(r <= 1.0, "{name} {tensor}: error {r:.3} of the bound");
            if r >= worst.0 {
                worst = (r, tensor.clone());
            }
            count += 1;
        }
        assert!(count > 0);
        eprintln!(
            "{name}: {count} tensors pass, worst error {:.4} of the bound ({})",
            worst.0, worst.1
        );
        worst.0
    }

    const BASE: &str = "micro-llama-base-f32";
    const FT1: &str = "micro-llama-ft1-f32";
    const FT2: &str = "micro-llama-ft2-f32";
    const FT3: &str = "micro-llama-ft3-f32";

    #[test]
    fn conformance_nuslerp_flat() {
        conformance("nuslerp_flat_f32", &[FT1, FT3], |_| MethodOp::Nuslerp {
            weights: [0.25, 0.75],
            flatten: true,
            row_wise: false,
            with_base: false,
        });
    }

    #[test]
    fn conformance_nuslerp_rowwise_base() {
        conformance("nuslerp_rowwise_base_f32", &[BASE, FT2, FT3], |_| {
            MethodOp::Nuslerp {
                weights: [1.5, 0.5],
                flatten: false,
                row_wise: true,
                with_base: true,
            }
        });
    }

    #[test]
    fn conformance_multislerp() {
        conformance("multislerp_f32", &[FT2, FT3], |_| MethodOp::Multislerp {
            weights: vec![0.2, 0.8],
            normalize_weights: true,
            eps: 1e-8,
            with_base: false,
        });
    }

    #[test]
    fn conformance_multislerp_base() {
        conformance("multislerp_base_f32", &[BASE, FT1, FT2, FT3], |_| {
            MethodOp::Multislerp {
                weights: vec![0.5, 1.0, 0.5],
                normalize_weights: true,
                eps: 1e-8,
                with_base: true,
            }
        });
    }

    #[test]
    fn conformance_karcher() {
        conformance("karcher_f32", &[FT1, FT2, FT3], |_| MethodOp::Karcher {
            max_iter: 12,
            tol: 5e-6,
        });
    }

    #[test]
    fn conformance_model_stock_2() {
        conformance("model_stock_2_f32", &[BASE, FT1, FT3], |_| MethodOp::ModelStock {
            filter_wise: false,
        });
    }

    #[test]
    fn conformance_model_stock_3() {
        conformance("model_stock_3_f32", &[BASE, FT1, FT2, FT3], |_| {
            MethodOp::ModelStock { filter_wise: false }
        });
    }

    #[test]
    fn conformance_nearswap() {
        conformance("nearswap_f32", &[BASE, FT2], |_| MethodOp::Nearswap { t: 0.0015 });
    }

    #[test]
    fn conformance_vlm_slerp() {
        conformance(
            "vlm_slerp_f32",
            &["micro-llava-base-f32", "micro-llava-ft1-f32"],
            |tensor| MethodOp::Slerp {
                t: if tensor.contains("vision_tower") { 0.3 } else { 0.7 },
            },
        );
    }
}
