//! sce on the GPU: the twin of `exec::methods::sce`.

use super::super::device::{Device, Params, Tensor, Vectors};
use super::super::GpuError;
use super::difference;
use super::select::{count_key, select_top_k, selection_mask};

/// Inputs `[base, m...]`: methods/sce.rs `sce`. The variance that ranks elements is computed
/// with the software f64 of `shaders/sce.wgsl`, so the selection is the CPU's.
pub(super) fn sce(dev: &mut Device, select_topk: f64, xs: &[Tensor]) -> Result<Tensor, GpuError> {
    if xs.len() == 1 {
        return Ok(dev.copy(&xs[0]));
    }
    let models = xs.len() - 1;
    let n = dev.n;
    let base = &xs[0];
    let deltas: Vec<Tensor> = xs[1..]
        .iter()
        .map(|x| difference(dev, x, base))
        .collect::<Result<_, _>>()?;
    if select_topk < 1.0 {
        let m = Params::default().u(&[models as u32]);
        let (lo, hi) = (dev.zeros(), dev.zeros());
        for d in &deltas {
            dev.map("sce_sum", &[d, &lo, &hi], Params::default())?;
        }
        dev.map("sce_mean", &[&lo, &hi], m)?;
        let (ss_lo, ss_hi) = (dev.zeros(), dev.zeros());
        for d in &deltas {
            dev.map("sce_squares", &[d, &lo, &hi, &ss_lo, &ss_hi], Params::default())?;
        }
        let variance = dev.alloc();
        dev.map("sce_variance", &[&ss_lo, &ss_hi, &variance], m)?;
        for t in [lo, hi, ss_lo, ss_hi] {
            dev.free(t);
        }
        let k = if select_topk <= 0.0 {
            0
        } else {
            let nonzero = n - count_key(dev, &variance, 0)?;
            // methods/sce.rs: a float32 product, truncated.
            ((nonzero as f32) * (select_topk as f32)) as usize
        };
        let sel = select_top_k(dev, &variance, k)?;
        let mask = selection_mask(dev, &variance, &sel)?;
        for d in &deltas {
            for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
                let p = Params::default().over(lo, hi);
                dev.dispatch("sce_mask", &[&d.chunks[c], &mask.chunks[c]], p, (hi - lo) as u64)?;
            }
        }
        dev.free_mask(mask);
        dev.free(variance);
    }
    // w_i = mean(δ_i²) of the masked deltas.
    let pairs: Vec<(&Tensor, &Tensor)> = deltas.iter().map(|d| (d, d)).collect();
    let means: Vec<f64> = dev
        .dots(&pairs, Vectors::flat(n))?
        .into_iter()
        .map(|s| s[0] / n as f64)
        .collect();
    let total: f64 = means.iter().sum();
    let weights: Vec<f32> = if total.abs() < 1e-6 {
        vec![(1.0 / models as f64) as f32; models]
    } else {
        means.iter().map(|w| (w / total) as f32).collect()
    };
    let sum = dev.zeros();
    for d in &deltas {
        dev.map("add", &[&sum, d], Params::default())?;
    }
    let (num, den) = (dev.zeros(), dev.zeros());
    for (d, w) in deltas.iter().zip(&weights) {
        dev.map("sce_vote", &[d, &sum, &num, &den], Params::default().f(&[*w]))?;
    }
    dev.map("sce_finish", &[base, &num, &den], Params::default().f(&[1e-6f32]))?;
    for t in deltas.into_iter().chain([sum, den]) {
        dev.free(t);
    }
    Ok(num)
}
