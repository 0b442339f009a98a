//! arcee_fusion on the GPU: the twin of `exec::methods::arcee`.

use super::super::device::{Device, Params, Tensor};
use super::super::GpuError;
use super::select::select_top_k_of;
use crate::exec::methods::arcee::{arcee_quartile_ranks, arcee_threshold};
use crate::exec::methods::select::ord_key;

/// Inputs `[base, m]`: methods/arcee.rs `arcee_fusion`. The importance keys come out of
/// `shaders/arcee.wgsl` with the CPU's bits (software f64, the portable exp and ln), so
/// the quartiles, the threshold and the fused tensor are the CPU's too.
pub(super) fn arcee_fusion(dev: &mut Device, xs: &[Tensor], shape: &[usize]) -> Result<Tensor, GpuError> {
    let [base, ft] = xs else {
        return Err(GpuError::Unsupported(format!(
            "`arcee_fusion` of {} tensors (it takes a base and one model)",
            xs.len()
        )));
    };
    let n = dev.n;
    let row = shape.last().copied().unwrap_or(1).max(1);
    let keys = arcee_keys(dev, base, ft, row)?;
    let mut quartiles = [0u32; 3];
    for (key, rank) in quartiles.iter_mut().zip(arcee_quartile_ranks(n)) {
        *key = select_top_k_of(dev, &keys, n - rank, true)?.threshold;
    }
    let threshold = arcee_threshold(quartiles);
    let p = Params::default().u(&[ord_key(threshold), u32::from(threshold.is_nan())]);
    dev.map("arcee_fuse", &[base, ft, &keys], p)?;
    Ok(keys)
}

/// methods/arcee_importance_keys` over rows of `row` elements.
pub(super) fn arcee_keys(
    dev: &mut Device,
    base: &Tensor,
    ft: &Tensor,
    row: usize,
) -> Result<Tensor, GpuError> {
    let (p_lo, p_hi, b_lo, b_hi) = (dev.alloc(), dev.alloc(), dev.alloc(), dev.alloc());
    for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
        // Chunks hold whole rows (`row_alignment`).
        let rows = (hi - lo) / row;
        let per_row = |slot: u32| {
            Params {
                n: rows as u32,
                start: lo as u32,
                ..Params::default()
            }
            .u(&[row as u32, slot])
        };
        let per_element = Params::default().over(lo, hi).u(&[row as u32]);
        let (rows64, elements) = (rows as u64, (hi - lo) as u64);
        let maxes = dev.zeros_small(rows);
        let sums = dev.zeros_small(4 * rows);
        for (x, e_lo, e_hi, slot) in [(ft, &p_lo, &p_hi, 0), (base, &b_lo, &b_hi, 2)] {
            let (x, e_lo, e_hi) = (&x.chunks[c], &e_lo.chunks[c], &e_hi.chunks[c]);
            dev.dispatch("arcee_row_max", &[x, &maxes], per_row(slot), rows64)?;
            dev.dispatch("arcee_exp", &[x, &maxes, e_lo, e_hi], per_element, elements)?;
            dev.dispatch("arcee_row_sum", &[e_lo, e_hi, &sums], per_row(slot), rows64)?;
        }
        let (pl, ph) = (&p_lo.chunks[c], &p_hi.chunks[c]);
        let (bl, bh) = (&b_lo.chunks[c], &b_hi.chunks[c]);
        dev.dispatch("arcee_term", &[pl, ph, bl, bh, &sums], per_element, elements)?;
        dev.dispatch("arcee_row_sum", &[pl, ph, &sums], per_row(0), rows64)?;
        let (f, b) = (&ft.chunks[c], &base.chunks[c]);
        dev.dispatch("arcee_importance", &[f, b, &sums, pl], per_element, elements)?;
        dev.give_small(maxes);
        dev.give_small(sums);
    }
    for t in [p_hi, b_lo, b_hi] {
        dev.free(t);
    }
    Ok(p_lo)
}
