//! sce, ram, ramplus_tl and arcee_fusion (reference/mergekit.md 1.8, 1.9, 1.12), as mergekit
//! 0.1.5 computes them in float32.
//!
//! Inputs are `[base, m...]` (arcee_fusion `[base, m]`). Task vectors `δ_i = m_i − base` are
//! formed in f32, as mergekit subtracts in the compute dtype. Tensor-wide reductions (sums
//! of squares, counts) accumulate in f64 per [`CHUNK`] and are combined in chunk order, so
//! no result depends on the thread count. Per-element combinations over the models are f32
//! operations in model order with separate multiplies and adds, as torch's elementwise ops
//! and its dim-0 sums over the stacked models are.
//!
//! Where mergekit is fragile we decide, and say so at the place:
//! * sce's top-k over |variance| is the exact radix selection of [`select_top_k`], ties
//!   going to the lower element index, where mergekit uses `torch.topk` (unspecified order
//!   among equal values);
//! * arcee_fusion's quartiles are exact over the whole importance tensor (mergekit samples
//!   1M elements at random above 1M elements), and its softmax/KL run in f64;
//! * every method returns f32 values; the save dtype decides the stored form (mergekit's
//!   arcee_fusion promotes to f32 through its float mask).

use std::ops::Range;

use rayon::prelude::*;

use super::portable;
use super::select::{abs_key, select_top_k, Selection};
use super::{Inputs, CHUNK};
use crate::ops::MethodOp;

pub(super) fn apply(op: &MethodOp, inputs: &Inputs) -> Vec<f32> {
    let n = inputs.numel();
    if n == 0 {
        return Vec::new();
    }
    if inputs.is_empty() {
        // sema never builds a method op without inputs; make the mistake visible.
        return vec![f32::NAN; n];
    }
    if inputs.len() == 1 {
        // Only the base: mergekit returns it unchanged ("if not tensors: return base").
        return inputs.to_f32(0);
    }
    match op {
        MethodOp::Sce { select_topk } => sce(inputs, *select_topk),
        MethodOp::Ram { epsilon } => ram(inputs, *epsilon, None),
        MethodOp::RamPlusTl { r, alpha, epsilon } => ram(inputs, *epsilon, Some((*r, *alpha))),
        MethodOp::ArceeFusion => arcee_fusion(inputs),
        // Dispatched elsewhere by `methods::apply`.
        _ => vec![f32::NAN; n],
    }
}

fn num_chunks(n: usize) -> usize {
    n.div_ceil(CHUNK)
}

fn chunk_range(c: usize, n: usize) -> Range<usize> {
    let start = c * CHUNK;
    start..n.min(start + CHUNK)
}

/// One chunk of the base and of the task vectors `δ_i = m_i − base` (f32 subtraction).
struct Chunk {
    base: Vec<f32>,
    deltas: Vec<Vec<f32>>,
}

fn decode_deltas(inputs: &Inputs, range: Range<usize>) -> Chunk {
    let len = range.len();
    let mut base = vec![0f32; len];
    inputs.decode(0, range.clone(), &mut base);
    let deltas = (1..inputs.len())
        .map(|i| {
            let mut d = vec![0f32; len];
            inputs.decode(i, range.clone(), &mut d);
            d.iter_mut().zip(&base).for_each(|(x, &b)| *x -= b);
            d
        })
        .collect();
    Chunk { base, deltas }
}

// ---------------------------------------------------------------------------------------
// sce
// ---------------------------------------------------------------------------------------

/// A top-k selection over a whole tensor, read back chunk by chunk: how many elements equal
/// to the threshold precede each chunk tells how many of its own equal ones are taken.
struct ChunkedSelection {
    keys: Vec<u32>,
    sel: Selection,
    equal_before: Vec<usize>,
}

impl ChunkedSelection {
    fn new(keys: Vec<u32>, k: usize) -> ChunkedSelection {
        let sel = select_top_k(&keys, k);
        let counts: Vec<usize> = keys
            .par_chunks(CHUNK)
            .map(|ch| ch.iter().filter(|&&key| key == sel.threshold).count())
            .collect();
        let mut equal_before = Vec::with_capacity(counts.len());
        let mut acc = 0usize;
        for c in counts {
            equal_before.push(acc);
            acc += c;
        }
        ChunkedSelection {
            keys,
            sel,
            equal_before,
        }
    }

    /// The selected elements of chunk `c`.
    fn chunk_mask(&self, c: usize) -> Vec<bool> {
        let range = chunk_range(c, self.keys.len());
        let before = self.equal_before.get(c).copied().unwrap_or(0);
        let local = Selection {
            threshold: self.sel.threshold,
            take_equal: self.sel.take_equal.saturating_sub(before),
            // `mask` does not use the total; it walks the chunk in index order.
            equal_total: 0,
            any: self.sel.any,
        };
        local.mask(&self.keys[range])
    }
}

/// mergekit's `sce_mask`: the `k = int(count_nonzero(var) · select_topk)` elements of largest
/// |variance over the models| (population variance), shared by all models.
fn sce_variance_selection(inputs: &Inputs, select_topk: f64) -> ChunkedSelection {
    let n = inputs.numel();
    let m = (inputs.len() - 1) as f64;
    let mut keys = vec![0u32; n];
    keys.par_chunks_mut(CHUNK).enumerate().for_each(|(c, kc)| {
        let ch = decode_deltas(inputs, chunk_range(c, n));
        for (j, key) in kc.iter_mut().enumerate() {
            // Two-pass variance in f64 (exactly 0 when all deltas are equal), then rounded to
            // f32 like torch's float32 `var`; the ranking uses those f32 values.
            let mean = ch.deltas.iter().map(|d| d[j] as f64).sum::<f64>() / m;
            let ss: f64 = ch
                .deltas
                .iter()
                .map(|d| {
                    let e = d[j] as f64 - mean;
                    e * e
                })
                .sum();
            *key = abs_key((ss / m) as f32);
        }
    });
    let k = if select_topk <= 0.0 {
        0
    } else {
        let nonzero = keys.par_iter().filter(|&&key| key != 0).count();
        // torch: `int(count_nonzero(var) * density)` multiplies an int64 tensor by a Python
        // float, which is a float32 product (default dtype); `as` truncates like `int()`.
        ((nonzero as f32) * (select_topk as f32)) as usize
    };
    // Decision: exact top-k with ties to the lower index (torch.topk leaves the order of
    // equal |variance| unspecified; the fixtures have no tie at the cut-off).
    ChunkedSelection::new(keys, k)
}

fn sce(inputs: &Inputs, select_topk: f64) -> Vec<f32> {
    let n = inputs.numel();
    let models = inputs.len() - 1;
    // Select: only below 1 (mergekit skips the mask otherwise); k == 0 selects nothing.
    let selection = (select_topk < 1.0).then(|| sce_variance_selection(inputs, select_topk));
    let masked = |c: usize| {
        let mut ch = decode_deltas(inputs, chunk_range(c, n));
        if let Some(sel) = &selection {
            let keep = sel.chunk_mask(c);
            for d in &mut ch.deltas {
                d.iter_mut().zip(&keep).for_each(|(x, &k)| {
                    if !k {
                        *x = 0.0;
                    }
                });
            }
        }
        ch
    };

    // Calculate: w_i = mean(δ_i²) of the masked deltas, f64 sums per chunk in chunk order.
    let partials: Vec<Vec<f64>> = (0..num_chunks(n))
        .into_par_iter()
        .map(|c| {
            masked(c)
                .deltas
                .iter()
                .map(|d| d.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect()
        })
        .collect();
    let mut sums = vec![0f64; models];
    for p in &partials {
        sums.iter_mut().zip(p).for_each(|(s, &x)| *s += x);
    }
    let means: Vec<f64> = sums.iter().map(|s| s / n as f64).collect();
    let total: f64 = means.iter().sum();
    // mergekit: uniform weights when |Σ_i mean(δ_i²)| < 1e-6 (an absolute threshold).
    let weights: Vec<f32> = if total.abs() < 1e-6 {
        vec![(1.0 / models as f64) as f32; models]
    } else {
        means.iter().map(|w| (w / total) as f32).collect()
    };

    // Erase and combine, per element in f32 (model order).
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let ch = masked(c);
        for (j, out_j) in o.iter_mut().enumerate() {
            // Sign election on the unweighted deltas: the sign of their f32 sum, >= 0 is +.
            let mut s = 0f32;
            for d in &ch.deltas {
                s += d[j];
            }
            let majority = if s >= 0.0 { 1.0f32 } else { -1.0 };
            let mut num = 0f32;
            let mut den = 0f32;
            for (d, &w) in ch.deltas.iter().zip(&weights) {
                let x = d[j];
                // A zero delta has sign 0 and never agrees.
                let ew = if sign(x) == majority { w } else { 0.0 };
                num += x * ew;
                den += ew;
            }
            let den = if den < 1e-6 { 1e-6 } else { den };
            *out_j = ch.base[j] + num / den;
        }
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

// ---------------------------------------------------------------------------------------
// ram, ramplus_tl
// ---------------------------------------------------------------------------------------

/// RAM: a delta is active when `|δ_i| > ε`; with `c` active models at an element, a lone
/// active delta is kept (times `λ_i` for ramplus_tl) and `c > 1` active ones are averaged.
/// `plus = Some((r, alpha))` gives ramplus_tl: `λ_i = 1 + r·clamp(shared_i / max(uniq_i, ε),
/// 0, α)` from the tensor-wide counts of model i's active elements that are shared / unique.
fn ram(inputs: &Inputs, epsilon: f64, plus: Option<(f64, f64)>) -> Vec<f32> {
    let n = inputs.numel();
    let models = inputs.len() - 1;
    // torch compares the f32 tensor with the Python float in f32.
    let eps = epsilon as f32;
    let active = move |x: f32| x.abs() > eps;

    let lambdas: Vec<f32> = match plus {
        None => vec![1.0; models],
        Some((r, alpha)) => {
            // Integer counts: exact, so their order does not matter.
            let partials: Vec<Vec<(u64, u64)>> = (0..num_chunks(n))
                .into_par_iter()
                .map(|c| {
                    let ch = decode_deltas(inputs, chunk_range(c, n));
                    let mut counts = vec![(0u64, 0u64); models];
                    for j in 0..ch.base.len() {
                        let cnt = ch.deltas.iter().filter(|d| active(d[j])).count();
                        for (d, (shared, uniq)) in ch.deltas.iter().zip(counts.iter_mut()) {
                            if active(d[j]) {
                                if cnt == 1 {
                                    *uniq += 1;
                                } else {
                                    *shared += 1;
                                }
                            }
                        }
                    }
                    counts
                })
                .collect();
            let mut totals = vec![(0u64, 0u64); models];
            for p in &partials {
                for (t, x) in totals.iter_mut().zip(p) {
                    t.0 += x.0;
                    t.1 += x.1;
                }
            }
            // Computed in f64 and rounded once (mergekit: float32 tensor ops). The clamp is
            // `min(max(ρ, 0), α)`, torch's order when α < 0; `uniq = 0` gives a huge ρ.
            totals
                .iter()
                .map(|&(shared, uniq)| {
                    let rho = shared as f64 / (uniq as f64).max(epsilon);
                    (1.0 + r * rho.max(0.0).min(alpha)) as f32
                })
                .collect()
        }
    };

    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let ch = decode_deltas(inputs, chunk_range(c, n));
        for (j, out_j) in o.iter_mut().enumerate() {
            let cnt = ch.deltas.iter().filter(|d| active(d[j])).count();
            let mut merged = 0f32;
            if cnt == 1 {
                for (d, &lambda) in ch.deltas.iter().zip(&lambdas) {
                    if active(d[j]) {
                        merged += d[j] * lambda;
                    }
                }
            } else if cnt > 1 {
                let div = cnt as f32;
                for d in &ch.deltas {
                    if active(d[j]) {
                        merged += d[j] / div;
                    }
                }
            }
            *out_j = ch.base[j] + merged;
        }
    });
    out
}

// ---------------------------------------------------------------------------------------
// arcee_fusion
// ---------------------------------------------------------------------------------------

/// An order-preserving map of f32 values to u32 (negative values below positive ones).
pub(crate) fn ord_key(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

pub(crate) fn from_ord_key(key: u32) -> f32 {
    if key & 0x8000_0000 != 0 {
        f32::from_bits(key & 0x7fff_ffff)
    } else {
        f32::from_bits(!key)
    }
}

/// `Σ_j P_j·ln(P_j/Q_j)` with `P = softmax(p) + 1e-8`, `Q = softmax(b) + 1e-8`, in f64 in
/// element order, through [`portable`]'s `exp` and `ln` so that the GPU's software f64
/// (`shaders/f64.wgsl`) gives the same bits. `ep`, `eb` are scratch rows of `p.len()`.
fn row_kl(p: &[f32], b: &[f32], ep: &mut [f64], eb: &mut [f64]) -> f64 {
    fn exps(x: &[f32], e: &mut [f64]) -> f64 {
        // The largest non-NaN value, +0 above −0 (the GPU compares order keys).
        let max = x
            .iter()
            .filter(|v| !v.is_nan())
            .map(|&v| ord_key(v))
            .max()
            .map_or(f64::NEG_INFINITY, |k| from_ord_key(k) as f64);
        let mut sum = 0f64;
        for (ej, &v) in e.iter_mut().zip(x) {
            *ej = portable::exp(v as f64 - max);
            sum += *ej;
        }
        sum
    }
    let sp = exps(p, ep);
    let sb = exps(b, eb);
    let mut kl = 0f64;
    for (&a, &c) in ep.iter().zip(eb.iter()) {
        let pj = a / sp + 1e-8;
        let qj = c / sb + 1e-8;
        kl += pj * portable::ln(pj / qj);
    }
    kl
}

/// The ascending ranks of the first quartile, the median and the third quartile of `n`
/// values: `q(x) = s[floor(x·(n−1))]`.
pub(crate) fn arcee_quartile_ranks(n: usize) -> [usize; 3] {
    let last = n.saturating_sub(1);
    [last / 4, last / 2, last.saturating_mul(3) / 4]
}

/// `median + 1.5·IQR` from the order keys of the elements of [`arcee_quartile_ranks`].
pub(crate) fn arcee_threshold([q1, med, q3]: [u32; 3]) -> f32 {
    let (q1, med, q3) = (from_ord_key(q1), from_ord_key(med), from_ord_key(q3));
    med + 1.5f32 * (q3 - q1)
}

/// The order keys of arcee_fusion's importance `|p − b| · KL_row` (rows of the last
/// dimension; a 0-D or 1-D tensor is one row), NaN as `f32::NAN`.
pub(crate) fn arcee_importance_keys(inputs: &Inputs) -> Vec<u32> {
    let n = inputs.numel();
    let row = inputs.shape.last().copied().unwrap_or(1).max(1);
    let rows_per_group = (CHUNK / row).max(1);
    let group = rows_per_group * row;

    // Decision: softmax and KL in f64 (mergekit: float32, where the KL of two nearly equal
    // softmaxes is mostly rounding noise).
    let mut keys = vec![0u32; n];
    keys.par_chunks_mut(group).enumerate().for_each(|(g, kc)| {
        let start = g * group;
        let range = start..start + kc.len();
        let mut b = vec![0f32; kc.len()];
        let mut p = vec![0f32; kc.len()];
        inputs.decode(0, range.clone(), &mut b);
        inputs.decode(1, range, &mut p);
        let mut ep = vec![0f64; row];
        let mut eb = vec![0f64; row];
        for ((rp, rb), rk) in p.chunks(row).zip(b.chunks(row)).zip(kc.chunks_mut(row)) {
            let kl = row_kl(rp, rb, &mut ep, &mut eb);
            for ((&x, &y), k) in rp.iter().zip(rb).zip(rk.iter_mut()) {
                let diff = (x - y).abs();
                let importance = (diff as f64 * kl) as f32;
                // One NaN (the GPU's), whatever payload the arithmetic left.
                *k = ord_key(if importance.is_nan() { f32::NAN } else { importance });
            }
        }
    });
    keys
}

/// Elements with `imp >= median + 1.5·IQR` take the fine-tune's value.
fn arcee_fusion(inputs: &Inputs) -> Vec<f32> {
    let n = inputs.numel();
    let keys = arcee_importance_keys(inputs);

    // Decision: exact quartiles over all elements, `q(x) = s[floor(x·(n−1))]` of the
    // ascending order (mergekit samples 1M elements with torch.randint above 1M elements).
    // The element of ascending rank r is the threshold of the top n − r.
    let threshold =
        arcee_threshold(arcee_quartile_ranks(n).map(|rank| select_top_k(&keys, n - rank).threshold));

    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let range = chunk_range(c, n);
        let mut p = vec![0f32; o.len()];
        inputs.decode(0, range.clone(), o);
        inputs.decode(1, range.clone(), &mut p);
        for ((out_j, &x), &key) in o.iter_mut().zip(&p).zip(&keys[range]) {
            let keep = if from_ord_key(key) >= threshold {
                1.0f32
            } else {
                0.0
            };
            let b = *out_j;
            *out_j = b + (x - b) * keep;
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::super::MethodInput;
    use super::*;
    use crate::io::DType;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Applies `op` to f32 tensors of `shape`.
    fn run(op: &MethodOp, shape: &[usize], tensors: &[Vec<f32>]) -> Vec<f32> {
        let raw: Vec<Vec<u8>> = tensors.iter().map(|t| bytes(t)).collect();
        let ins: Vec<MethodInput> = raw
            .iter()
            .map(|b| MethodInput {
                bytes: b,
                dtype: DType::F32,
            })
            .collect();
        apply(op, &Inputs { tensors: &ins, shape })
    }

    fn all_ops() -> Vec<MethodOp> {
        vec![
            MethodOp::Sce { select_topk: 0.5 },
            MethodOp::Sce { select_topk: 1.0 },
            MethodOp::Ram { epsilon: 1e-5 },
            MethodOp::RamPlusTl {
                r: 0.1,
                alpha: 0.2,
                epsilon: 1e-5,
            },
            MethodOp::ArceeFusion,
        ]
    }

    /// A deterministic pseudo-random sequence in [-1, 1).
    fn noise(seed: u64, n: usize) -> Vec<f32> {
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

    #[test]
    fn numel_zero_gives_empty() {
        for op in all_ops() {
            assert!(run(&op, &[0, 4], &[vec![], vec![]]).is_empty());
            assert!(run(&op, &[0], &[vec![], vec![], vec![]]).is_empty());
        }
    }

    #[test]
    fn zero_deltas_give_the_base() {
        let base = noise(1, 40);
        for op in all_ops() {
            let out = run(&op, &[5, 8], &[base.clone(), base.clone(), base.clone()]);
            assert_eq!(out, base, "{op:?}");
            let out = run(&op, &[5, 8], &[base.clone(), base.clone()]);
            assert_eq!(out, base, "{op:?}");
        }
    }

    #[test]
    fn only_the_base_gives_the_base() {
        let base = noise(2, 6);
        for op in all_ops() {
            assert_eq!(run(&op, &[6], std::slice::from_ref(&base)), base);
        }
    }

    #[test]
    fn one_element_tensors() {
        let (b, m) = (vec![0.5f32], vec![0.75f32]);
        for op in all_ops() {
            for shape in [&[1usize][..], &[][..], &[1, 1][..]] {
                let out = run(&op, shape, &[b.clone(), m.clone()]);
                // One model, one element: every method keeps its delta (sce: variance 0,
                // so select_topk 0.5 keeps nothing and gives the base).
                let want = match op {
                    MethodOp::Sce { select_topk } if select_topk < 1.0 => 0.5,
                    _ => 0.75,
                };
                assert_eq!(out, vec![want], "{op:?} {shape:?}");
            }
        }
    }

    #[test]
    fn sce_single_model_is_the_model_where_selected() {
        // One model: the variance is 0 everywhere, so any select_topk < 1 keeps nothing.
        let base = noise(3, 64);
        let m = noise(4, 64);
        let out = run(
            &MethodOp::Sce { select_topk: 0.5 },
            &[64],
            &[base.clone(), m.clone()],
        );
        assert_eq!(out, base);
        let out = run(
            &MethodOp::Sce { select_topk: 1.0 },
            &[8, 8],
            &[base.clone(), m.clone()],
        );
        for j in 0..64 {
            let d = m[j] - base[j];
            // weight 1 (normalised), agrees with itself unless zero
            let want = if d == 0.0 {
                base[j]
            } else {
                base[j] + d * 1.0 / 1.0
            };
            assert_eq!(out[j], want);
        }
    }

    #[test]
    fn sce_select_erase_by_hand() {
        // Two models, 4 elements; variance is largest at elements 1 and 3.
        let base = vec![0.0f32; 4];
        let a = vec![1.0f32, 2.0, 0.5, -3.0];
        let b = vec![1.0f32, -2.0, 0.25, 1.0];
        // var: 0, 4, 0.015625, 4 -> nonzero 3, k = int(3 * 0.67) = 2 -> elements 1 and 3.
        let out = run(&MethodOp::Sce { select_topk: 0.67 }, &[4], &[base, a, b]);
        // w_a = (4 + 9) / 4, w_b = (4 + 1) / 4 -> normalised 13/18, 5/18.
        // element 1: sum 0 -> majority +, only a agrees: 2.0.
        // element 3: sum -2 -> majority -, only a agrees: -3.0.
        let wa = (3.25f64 / 4.5) as f32;
        assert_eq!(out, vec![0.0, 2.0, 0.0, (-3.0 * wa) / wa]);
    }

    #[test]
    fn sce_ties_at_the_cut_go_to_the_lower_index() {
        let base = vec![0.0f32; 6];
        let a = vec![1.0f32; 6];
        let b = vec![-1.0f32; 6];
        // all variances equal 1; k = int(6 * 0.5) = 3 -> elements 0, 1, 2. Sums are 0 -> +.
        let out = run(&MethodOp::Sce { select_topk: 0.5 }, &[2, 3], &[base, a, b]);
        assert_eq!(out, vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn sce_uniform_weights_when_deltas_are_tiny() {
        let base = vec![0.0f32; 2];
        let a = vec![1e-4f32, 1e-4];
        let b = vec![3e-4f32, 3e-4];
        // means of squares sum to 1e-7 < 1e-6: weights 1/2 each -> plain mean 2e-4.
        let out = run(
            &MethodOp::Sce { select_topk: 1.0 },
            &[2],
            &[base, a.clone(), b.clone()],
        );
        let w = 0.5f32;
        let want = (a[0] * w + b[0] * w) / (w + w);
        assert_eq!(out, vec![want, want]);
    }

    #[test]
    fn ram_by_hand() {
        let base = vec![1.0f32; 5];
        let a = vec![1.0f32, 1.5, 1.5, 1.000001, 3.0];
        let b = vec![1.0f32, 1.0, 2.0, 1.0, 0.0];
        // active: a = [F, T, T, F, T], b = [F, F, T, F, T]
        let out = run(&MethodOp::Ram { epsilon: 1e-5 }, &[5], &[base.clone(), a, b]);
        assert_eq!(
            out,
            vec![
                1.0,
                1.5,
                1.0 + (0.5 / 2.0 + 1.0 / 2.0),
                1.0,
                1.0 + (2.0 / 2.0 + -1.0 / 2.0)
            ]
        );
    }

    #[test]
    fn ramplus_by_hand() {
        let base = vec![0.0f32; 4];
        let a = vec![1.0f32, 1.0, 1.0, 0.0];
        let b = vec![0.0f32, 0.0, 2.0, 2.0];
        // a: unique 2, shared 1 -> rho 0.5 -> clamp 0.2 -> lambda 1 + 0.1 * 0.2
        // b: unique 1, shared 1 -> rho 1 -> lambda 1.02 too
        let op = MethodOp::RamPlusTl {
            r: 0.1,
            alpha: 0.2,
            epsilon: 1e-5,
        };
        let out = run(&op, &[4], &[base, a, b]);
        let l = (1.0f64 + 0.1 * 0.2) as f32;
        assert_eq!(out, vec![l, l, 1.0 / 2.0 + 2.0 / 2.0, 2.0 * l]);
        // a model with no unique element: rho = shared / epsilon, clamped at alpha.
        let out = run(&op, &[2], &[vec![0.0; 2], vec![1.0, 1.0], vec![1.0, 1.0]]);
        assert_eq!(out, vec![1.0, 1.0]);
        let out = run(
            &MethodOp::RamPlusTl {
                r: 0.5,
                alpha: 10.0,
                epsilon: 1e-5,
            },
            &[3],
            &[vec![0.0; 3], vec![1.0, 1.0, 1.0], vec![0.0, 1.0, 0.0]],
        );
        // a: unique 2, shared 1 -> lambda 1.25; b: unique 0 -> rho 1e5 -> clamp 10 -> 6
        assert_eq!(out, vec![1.25, 1.0, 1.25]);
    }

    #[test]
    fn ram_matches_across_chunks() {
        // More than one chunk, with ragged end; the result must not depend on chunking,
        // which equals the result computed element by element on small pieces.
        let n = CHUNK * 2 + 123;
        let base = noise(5, n);
        let ms: Vec<Vec<f32>> = (6..9)
            .map(|s| {
                noise(s, n)
                    .iter()
                    .zip(&base)
                    .map(|(x, b)| if x.abs() < 0.3 { *b } else { b + x * 1e-3 })
                    .collect()
            })
            .collect();
        let mut all = vec![base.clone()];
        all.extend(ms.iter().cloned());
        let op = MethodOp::Ram { epsilon: 2e-4 };
        let whole = run(&op, &[n], &all);
        for start in [0, CHUNK - 5, n - 7] {
            let piece: Vec<Vec<f32>> = all.iter().map(|t| t[start..start + 7].to_vec()).collect();
            assert_eq!(run(&op, &[7], &piece), whole[start..start + 7].to_vec());
        }
    }

    #[test]
    fn sce_chunked_selection_matches_the_whole_mask() {
        // Many ties across chunk borders: the chunked read-back equals Selection::mask.
        let n = CHUNK * 3 + 17;
        let keys: Vec<u32> = (0..n).map(|i| (i % 7) as u32).collect();
        for k in [0, 1, n / 7, n / 2, n - 1, n] {
            let whole = select_top_k(&keys, k).mask(&keys);
            let cs = ChunkedSelection::new(keys.clone(), k);
            let chunked: Vec<bool> = (0..num_chunks(n)).flat_map(|c| cs.chunk_mask(c)).collect();
            assert_eq!(chunked, whole, "k {k}");
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let shape = [2 * CHUNK / 64 + 1, 64];
        let n = shape[0] * shape[1];
        let base = noise(10, n);
        let mut all = vec![base.clone()];
        for s in 11..14 {
            all.push(noise(s, n).iter().zip(&base).map(|(x, b)| b + x * 1e-3).collect());
        }
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for op in all_ops() {
            let ins: &[Vec<f32>] = if op == MethodOp::ArceeFusion {
                &all[..2]
            } else {
                &all
            };
            let a = one.install(|| run(&op, &shape, ins));
            let b = three.install(|| run(&op, &shape, ins));
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{op:?}"
            );
            assert!(a.iter().all(|x| x.is_finite()), "{op:?}");
        }
    }

    #[test]
    fn ord_key_orders_like_values() {
        let vals = [-f32::INFINITY, -2.0, -1e-30, -0.0, 0.0, 1e-40, 1.0, f32::INFINITY];
        for w in vals.windows(2) {
            assert!(ord_key(w[0]) < ord_key(w[1]), "{w:?}");
        }
        for v in vals {
            assert_eq!(from_ord_key(ord_key(v)).to_bits(), v.to_bits());
        }
    }

    #[test]
    fn arcee_fusion_keeps_the_outliers() {
        // 1-D: one row; quartiles of imp = |d| · KL: the large deltas are kept.
        let n = 64;
        let base = vec![0.0f32; n];
        let mut ft = vec![0.01f32; n];
        ft[5] = 2.0;
        ft[40] = -1.5;
        let out = run(&MethodOp::ArceeFusion, &[n], &[base.clone(), ft.clone()]);
        for j in 0..n {
            // All |d| = 0.01 tie at the median and the IQR is 0: they are kept too (>=).
            assert_eq!(out[j], ft[j]);
        }
        // Varying small deltas: only the outliers pass median + 1.5·IQR.
        let small: Vec<f32> = noise(9, n).iter().map(|x| x * 0.01).collect();
        let mut ft = small.clone();
        ft[5] = 2.0;
        ft[40] = -1.5;
        let out = run(&MethodOp::ArceeFusion, &[n], &[base.clone(), ft.clone()]);
        assert_eq!(out[5], 2.0);
        assert_eq!(out[40], -1.5);
        let kept = (0..n).filter(|&j| out[j] != 0.0).count();
        assert!(kept < n / 4, "kept {kept}");
        // Rows of one element have KL 0: all importances 0, all kept.
        let out = run(&MethodOp::ArceeFusion, &[n, 1], &[base, ft.clone()]);
        assert_eq!(out, ft);
    }

    // ---- fixtures ---------------------------------------------------------------------

    mod fixtures {
        use super::*;
        use safetensors::SafeTensors;

        fn dir() -> String {
            format!("{}/tests/fixtures/conformance", env!("CARGO_MANIFEST_DIR"))
        }

        fn read(path: &str) -> Vec<u8> {
            std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
        }

        fn model(name: &str) -> Vec<u8> {
            read(&format!(
                "{}/models/micro-llama-{name}-f32/model.safetensors",
                dir()
            ))
        }

        fn f32s(b: &[u8]) -> Vec<f64> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect()
        }

        struct Report {
            name: String,
            numel: usize,
            max_err: f64,
            bound: f64,
            n_over: usize,
            cos: f64,
        }

        /// Runs `op` on every tensor with inputs `[base, models...]` against expected/`fixture`.
        fn check(fixture: &str, op: &MethodOp, models: &[&str]) -> Vec<Report> {
            let mut files = vec![model("base")];
            files.extend(models.iter().map(|m| model(m)));
            let expected = read(&format!("{}/expected/{fixture}/model.safetensors", dir()));
            let sts: Vec<SafeTensors> = files
                .iter()
                .map(|f| SafeTensors::deserialize(f).unwrap())
                .collect();
            let exp = SafeTensors::deserialize(&expected).unwrap();
            let mut names: Vec<String> = sts[0].names().into_iter().map(String::from).collect();
            names.sort();
            assert_eq!(names.len(), exp.len());
            names
                .iter()
                .map(|name| {
                    let views: Vec<_> = sts.iter().map(|s| s.tensor(name).unwrap()).collect();
                    let shape = views[0].shape().to_vec();
                    let ins: Vec<MethodInput> = views
                        .iter()
                        .map(|v| {
                            assert_eq!(v.dtype(), safetensors::Dtype::F32);
                            MethodInput {
                                bytes: v.data(),
                                dtype: DType::F32,
                            }
                        })
                        .collect();
                    let ours = apply(
                        op,
                        &Inputs {
                            tensors: &ins,
                            shape: &shape,
                        },
                    );
                    let e = exp.tensor(name).unwrap();
                    assert_eq!(e.shape(), &shape[..], "{name}");
                    let reference = f32s(e.data());
                    let ref_max = reference.iter().fold(0f64, |a, x| a.max(x.abs()));
                    let bound = 1e-5 * ref_max.max(1.0);
                    let diffs: Vec<f64> = reference
                        .iter()
                        .zip(&ours)
                        .map(|(r, &o)| {
                            let d = (r - o as f64).abs();
                            if d.is_nan() {
                                f64::INFINITY
                            } else {
                                d
                            }
                        })
                        .collect();
                    let dot: f64 = reference.iter().zip(&ours).map(|(r, &o)| r * o as f64).sum();
                    let nr = reference.iter().map(|r| r * r).sum::<f64>().sqrt();
                    let no = ours.iter().map(|&o| (o as f64) * (o as f64)).sum::<f64>().sqrt();
                    Report {
                        name: name.clone(),
                        numel: reference.len(),
                        max_err: diffs.iter().fold(0f64, |a, &d| a.max(d)),
                        bound,
                        n_over: diffs.iter().filter(|&&d| d > bound).count(),
                        cos: dot / (nr * no),
                    }
                })
                .collect()
        }

        fn assert_f32_rule(fixture: &str, op: MethodOp) {
            let reports = check(fixture, &op, &["ft1", "ft2", "ft3"]);
            let worst = reports
                .iter()
                .max_by(|a, b| (a.max_err / a.bound).total_cmp(&(b.max_err / b.bound)))
                .unwrap();
            println!(
                "{fixture}: {} tensors, worst {} max err {:.3e} = {:.4} of the bound",
                reports.len(),
                worst.name,
                worst.max_err,
                worst.max_err / worst.bound
            );
            for r in &reports {
                assert!(
                    r.max_err <= r.bound,
                    "{fixture} {}: {:e} > {:e}",
                    r.name,
                    r.max_err,
                    r.bound
                );
            }
        }

        #[test]
        fn sce_f32() {
            assert_f32_rule("sce_f32", MethodOp::Sce { select_topk: 0.35 });
        }

        #[test]
        fn ram_f32() {
            assert_f32_rule("ram_f32", MethodOp::Ram { epsilon: 0.0006 });
        }

        #[test]
        fn ramplus_tl_f32() {
            let op = MethodOp::RamPlusTl {
                r: 0.3,
                alpha: 0.5,
                epsilon: 0.0008,
            };
            assert_f32_rule("ramplus_tl_f32", op);
        }

        #[test]
        fn arcee_fusion_f32() {
            let reports = check("arcee_fusion_f32", &MethodOp::ArceeFusion, &["ft3"]);
            let mut total_over = 0;
            let mut worst_share = 0f64;
            let mut worst_name = "";
            for r in &reports {
                let allowed = ((0.01 * r.numel as f64) as usize).max(4);
                total_over += r.n_over;
                let share = r.n_over as f64 / allowed as f64;
                if share > worst_share {
                    worst_share = share;
                    worst_name = &r.name;
                }
                assert!(
                    r.n_over <= allowed && (r.n_over == 0 || r.cos >= 0.999),
                    "arcee_fusion_f32 {}: {} of {} over (allowed {allowed}), cos {}",
                    r.name,
                    r.n_over,
                    r.numel,
                    r.cos
                );
            }
            let numel: usize = reports.iter().map(|r| r.numel).sum();
            let exact = reports.iter().filter(|r| r.n_over == 0).count();
            let worst_in = reports
                .iter()
                .filter(|r| r.n_over == 0)
                .map(|r| r.max_err / r.bound)
                .fold(0f64, f64::max);
            println!(
                "arcee_fusion_f32: {total_over} of {numel} elements over the bound; {exact} of {} \
                 tensors within it (worst {worst_in:.4} of the bound); worst tensor {worst_name} \
                 uses {worst_share:.2} of its allowance",
                reports.len()
            );
        }
    }
}
