//! Generalized task arithmetic on the GPU (task_arithmetic, ties, dare, breadcrumbs,
//! della): the twin of `exec::methods::gta`.

use super::super::device::{Buf, Device, Mask, Params, Tensor};
use super::super::GpuError;
use super::difference;
use super::select::{select_top_k, selection_mask};
use crate::ops::{GtaKind, GtaOp};

/// Norms below this leave the masked delta unscaled (gta.rs `RESCALE_EPS`).
pub(super) const RESCALE_EPS: f64 = 1e-7;

/// gta.rs `l1_factor`.
pub(super) fn l1_factor(before: f64, after: f64) -> f32 {
    if before < RESCALE_EPS || after < RESCALE_EPS {
        1.0
    } else {
        (before / after) as f32
    }
}

/// The mask of a random keep test per element: `bernoulli` with probability `p`, or the
/// DELLA rank-dependent probability when `ranks` are given.
pub(super) fn random_mask(
    dev: &mut Device,
    key: u64,
    p: f32,
    della: Option<(&Tensor, usize, f32, f32)>,
) -> Result<Mask, GpuError> {
    let mask = dev.alloc_mask();
    let key = [key as u32, (key >> 32) as u32];
    for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
        let words = (hi - lo).div_ceil(32) as u64;
        let base = Params::default().over(lo, hi);
        match della {
            None => {
                dev.dispatch("bernoulli", &[&mask.chunks[c]], base.u(&key).f(&[p]), words)?;
            }
            Some((ranks, row, span, denom)) => {
                let params = base.u(&[key[0], key[1], row as u32]).f(&[p, span, denom]);
                dev.dispatch("della", &[&ranks.chunks[c], &mask.chunks[c]], params, words)?;
            }
        }
    }
    Ok(mask)
}

/// Which elements of one model's delta survive, and the rescale factor (gta.rs
/// `sparsify`); `None` keeps every element.
#[allow(clippy::too_many_arguments)]
pub(super) fn sparsify(
    dev: &mut Device,
    kind: GtaKind,
    delta: &Tensor,
    density: f64,
    gamma: f64,
    epsilon: f64,
    key: u64,
    row: usize,
    rescale: bool,
) -> Result<Option<(Mask, f32)>, GpuError> {
    let n = dev.n;
    if kind == GtaKind::TaskArithmetic || density >= 1.0 {
        return Ok(None);
    }
    let magnitude = matches!(kind, GtaKind::Ties);
    let della = matches!(kind, GtaKind::Della | GtaKind::DellaLinear);
    if (magnitude || della) && density <= 0.0 {
        let mask = dev.alloc_mask();
        dev.clear_mask(&mask);
        return Ok(Some((mask, 1.0)));
    }
    let mask = match kind {
        GtaKind::Ties => {
            let k = ((density * n as f64) as usize).max(1);
            let sel = select_top_k(dev, delta, k)?;
            selection_mask(dev, delta, &sel)?
        }
        GtaKind::Breadcrumbs | GtaKind::BreadcrumbsTies => {
            let target = ((density * n as f64) as usize).min(n);
            let top = ((gamma * n as f64) as usize).min(n - target);
            let sel = select_top_k(dev, delta, top + target)?;
            let mask = selection_mask(dev, delta, &sel)?;
            if top > 0 {
                let sel = select_top_k(dev, delta, top)?;
                let above = selection_mask(dev, delta, &sel)?;
                for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
                    let words = (hi - lo).div_ceil(32);
                    let p = Params {
                        n: words as u32,
                        start: lo as u32,
                        ..Params::default()
                    };
                    dev.dispatch("and_not", &[&mask.chunks[c], &above.chunks[c]], p, words as u64)?;
                }
                dev.free_mask(above);
            }
            mask
        }
        GtaKind::DareTies | GtaKind::DareLinear => random_mask(dev, key, density as f32, None)?,
        GtaKind::Della | GtaKind::DellaLinear => {
            let ranks = dev.alloc();
            // Rows of 256 or more: 256 elements of one row per workgroup, the row read in
            // tiles through workgroup memory (see `shaders/select.wgsl`). Shorter rows:
            // one invocation per element.
            let per_row = row.div_ceil(256);
            let tiled = row >= 256;
            for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
                let (name, invocations) = if tiled {
                    ("row_ranks_tiled", (hi - lo) / row * per_row * 256)
                } else {
                    ("row_ranks", hi - lo)
                };
                let p = Params {
                    n: invocations as u32,
                    start: lo as u32,
                    ..Params::default()
                }
                .u(&[row as u32, per_row as u32]);
                dev.dispatch(name, &[&delta.chunks[c], &ranks.chunks[c]], p, invocations as u64)?;
            }
            let low = (density - epsilon) as f32;
            let span = (2.0 * epsilon) as f32;
            let denom = (row.max(2) - 1) as f32;
            let mask = random_mask(dev, key, low, Some((&ranks, row, span, denom)))?;
            dev.free(ranks);
            mask
        }
        GtaKind::TaskArithmetic => return Ok(None),
    };
    let scale = if rescale {
        let (before, after) = dev.l1(delta, &mask)?;
        l1_factor(before, after)
    } else {
        1.0
    };
    Ok(Some((mask, scale)))
}

/// Inputs `[base, m...]`: gta.rs `apply`, then its `combine` one model per pass.
pub(super) fn gta(dev: &mut Device, op: &GtaOp, xs: &[Tensor], shape: &[usize]) -> Result<Tensor, GpuError> {
    let GtaOp {
        kind,
        weights,
        densities,
        gammas,
        epsilons,
        lambda,
        normalize,
        rescale,
        keys,
    } = op;
    let m = xs.len() - 1;
    if m == 0 {
        return Ok(dev.copy(&xs[0]));
    }
    let weights: Vec<f32> = (0..m)
        .map(|i| weights.get(i).copied().unwrap_or(1.0) as f32)
        .collect();
    let row = shape.last().copied().unwrap_or(1).max(1);
    let mut kept: Vec<Option<(Mask, f32)>> = Vec::with_capacity(m);
    for i in 0..m {
        let density = densities.get(i).copied().unwrap_or(1.0);
        if *kind == GtaKind::TaskArithmetic || density >= 1.0 {
            kept.push(None);
            continue;
        }
        let delta = difference(dev, &xs[i + 1], &xs[0])?;
        let k = sparsify(
            dev,
            *kind,
            &delta,
            density,
            gammas.get(i).copied().unwrap_or(0.01),
            epsilons.get(i).copied().unwrap_or(0.0),
            keys.get(i).copied().unwrap_or(0),
            row,
            *rescale,
        );
        dev.free(delta);
        kept.push(k?);
    }
    let base = &xs[0];
    let pass = |dev: &mut Device, name: &'static str, i: usize, extra: &[&Tensor]| -> Result<(), GpuError> {
        let (mask, scale, has) = match &kept[i] {
            Some((mask, scale)) => (Some(mask), *scale, 1),
            None => (None, 1.0, 0),
        };
        let p = Params::default().u(&[has]).f(&[scale, weights[i]]);
        for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
            let mut bufs: Vec<&Buf> = vec![
                &base.chunks[c],
                &xs[i + 1].chunks[c],
                mask.map_or(&base.chunks[c], |m| &m.chunks[c]),
            ];
            bufs.extend(extra.iter().map(|t| &t.chunks[c]));
            let p = p.over(lo, hi);
            dev.dispatch(name, &bufs, p, (hi - lo) as u64)?;
        }
        Ok(())
    };
    let consensus = kind.consensus();
    let mixed = dev.zeros();
    let mut div = None;
    if consensus {
        let sum = dev.zeros();
        for i in 0..m {
            pass(dev, "gta_sum", i, &[&sum])?;
        }
        let d = dev.zeros();
        for i in 0..m {
            pass(dev, "gta_vote", i, &[&sum, &mixed, &d])?;
        }
        dev.free(sum);
        div = Some(d);
    } else {
        for i in 0..m {
            pass(dev, "gta_sum", i, &[&mixed])?;
        }
    }
    let linear_div = {
        let s = weights.iter().fold(0f32, |s, w| s + w);
        if s.abs() < 1e-8 {
            1.0
        } else {
            s
        }
    };
    let lambda = *lambda as f32;
    let p = Params::default()
        .u(&[
            u32::from(consensus),
            u32::from(*normalize),
            u32::from(lambda != 1.0),
        ])
        .f(&[linear_div, lambda]);
    dev.map("gta_finish", &[base, &mixed, div.as_ref().unwrap_or(base)], p)?;
    if let Some(d) = div {
        dev.free(d);
    }
    for (mask, _) in kept.into_iter().flatten() {
        dev.free_mask(mask);
    }
    Ok(mixed)
}
