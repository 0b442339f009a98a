//! arcee_fusion (reference/mergekit.md 1.12): the fine-tune's value where its importance
//! `|p − b| · KL_row` is an outlier above `median + 1.5·IQR`, the base's elsewhere.

use rayon::prelude::*;

use super::chunks::chunk_range;
use super::portable;
use super::select::{from_ord_key, ord_key, select_top_k};
use super::{Inputs, CHUNK};

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
pub(super) fn arcee_fusion(inputs: &Inputs) -> Vec<f32> {
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
    use super::*;
    use crate::exec::methods::deltas::tests::apply;
    use crate::exec::methods::deltas::tests::{noise, run};
    use crate::exec::methods::MethodInput;
    use crate::io::DType;
    use crate::ops::MethodOp;

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
