//! sce (reference/mergekit.md 1.8): the task vectors' elements of largest variance over the
//! models, weighted by each model's share of the squared deltas and erased where their sign
//! disagrees with the majority.

use rayon::prelude::*;

use super::chunks::{chunk_range, num_chunks};
use super::deltas::decode_deltas;
use super::select::{abs_key, select_top_k, Selection};
use super::{Inputs, CHUNK};

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

pub(super) fn sce(inputs: &Inputs, select_topk: f64) -> Vec<f32> {
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

/// `torch.sign`, with NaN (never equal to ±1) as 0; shared by the sign-election methods.
pub(super) fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::methods::deltas::tests::{noise, run};
    use crate::ops::MethodOp;

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
}
