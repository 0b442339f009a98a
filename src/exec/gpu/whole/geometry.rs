//! Geometric merges on the GPU (slerp, nuslerp, multislerp, karcher, model_stock,
//! nearswap): the twin of `exec::methods::geometry`.

use super::super::device::{Device, Params, Tensor, Vectors};
use super::super::GpuError;
use super::difference;
use crate::exec::methods::chunks::Layout;
use crate::exec::methods::geometry::{model_stock_t, nuslerp_coefficients, slerp_coefficients};

/// How `lin2` finds an element's vector, and the reduction's vectors.
pub(super) fn vectors_of(layout: Layout, n: usize) -> (Vectors, [u32; 2]) {
    match layout {
        Layout::Flat => (Vectors::flat(n), [0, 0]),
        Layout::Rows(len) => (Vectors::rows(n, len), [1, len as u32]),
        Layout::Cols { len, inner } => (Vectors::cols(len, inner), [2, inner as u32]),
    }
}

/// `out = c0[v]·a + c1[v]·b (+ base)`, `coefs` holding `(c0, c1)` per vector.
pub(super) fn lin2(
    dev: &mut Device,
    a: &Tensor,
    b: &Tensor,
    base: Option<&Tensor>,
    coefs: &[(f32, f32)],
    mode: [u32; 2],
) -> Result<Tensor, GpuError> {
    let flat: Vec<f32> = coefs.iter().flat_map(|(x, y)| [*x, *y]).collect();
    let coefs = dev.small(&flat);
    let out = dev.alloc();
    let p = Params::default().u(&[mode[0], mode[1], u32::from(base.is_some())]);
    let base = base.unwrap_or(a);
    for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
        let p = p.over(lo, hi);
        let bufs = [
            &a.chunks[c],
            &b.chunks[c],
            &base.chunks[c],
            &coefs,
            &out.chunks[c],
        ];
        dev.dispatch("lin2", &bufs, p, (hi - lo) as u64)?;
    }
    dev.give_small(coefs);
    Ok(out)
}

pub(super) fn slerp(dev: &mut Device, t: f64, xs: &[Tensor]) -> Result<Tensor, GpuError> {
    if xs.len() < 2 {
        return Ok(dev.copy(&xs[0]));
    }
    let (a, b) = (&xs[0], &xs[1]);
    let s = dev.dots3(a, b, Vectors::flat(dev.n))?;
    let c = slerp_coefficients(t, s[0][0], s[1][0], s[2][0]);
    lin2(dev, a, b, None, &[c], [0, 0])
}

pub(super) fn nuslerp(
    dev: &mut Device,
    weights: [f64; 2],
    flatten: bool,
    row_wise: bool,
    with_base: bool,
    xs: &[Tensor],
    shape: &[usize],
) -> Result<Tensor, GpuError> {
    let first = usize::from(with_base);
    let models = xs.len().saturating_sub(first);
    if models < 2 {
        return Ok(dev.copy(&xs[if models == 1 { first } else { 0 }]));
    }
    let sum = weights[0] + weights[1];
    let t = if sum.abs() < 1e-6 { 0.5 } else { weights[1] / sum };
    let n = dev.n;
    let layout = if flatten {
        Layout::Flat
    } else if row_wise {
        Layout::cols(shape, n)
    } else {
        Layout::rows(shape, n)
    };
    let (vectors, mode) = vectors_of(layout, n);
    let deltas = if with_base {
        Some((difference(dev, &xs[1], &xs[0])?, difference(dev, &xs[2], &xs[0])?))
    } else {
        None
    };
    let (a, b) = match &deltas {
        Some((a, b)) => (a, b),
        None => (&xs[0], &xs[1]),
    };
    let s = dev.dots3(a, b, vectors)?;
    let coefs: Vec<(f32, f32)> = (0..vectors.count)
        .map(|v| nuslerp_coefficients(t, s[0][v], s[1][v], s[2][v]))
        .collect();
    let out = lin2(dev, a, b, with_base.then(|| &xs[0]), &coefs, mode)?;
    if let Some((a, b)) = deltas {
        dev.free(a);
        dev.free(b);
    }
    Ok(out)
}

pub(super) fn model_stock(
    dev: &mut Device,
    filter_wise: bool,
    xs: &[Tensor],
    shape: &[usize],
) -> Result<Tensor, GpuError> {
    let n = xs.len().saturating_sub(1);
    if n < 2 {
        return Ok(dev.copy(&xs[0]));
    }
    let numel = dev.n;
    let layout = if filter_wise {
        Layout::rows(shape, numel)
    } else {
        Layout::Flat
    };
    let (vectors, mode) = vectors_of(layout, numel);
    let mut pairs: Vec<(usize, usize)> = (0..n).map(|i| (i, i)).collect();
    for i in 0..n {
        for j in i + 1..n {
            pairs.push((i, j));
        }
    }
    let deltas: Vec<Tensor> = (1..=n)
        .map(|i| difference(dev, &xs[i], &xs[0]))
        .collect::<Result<_, _>>()?;
    let tensor_pairs: Vec<(&Tensor, &Tensor)> =
        pairs.iter().map(|&(i, j)| (&deltas[i], &deltas[j])).collect();
    let sums = dev.dots(&tensor_pairs, vectors)?;
    for d in deltas {
        dev.free(d);
    }
    let ts: Vec<(f32, f32)> = (0..vectors.count)
        .map(|v| {
            let s: Vec<f64> = sums.iter().map(|per_pair| per_pair[v]).collect();
            model_stock_t(&s, &pairs, n)
        })
        .collect();
    let avg = dev.zeros();
    for x in &xs[1..] {
        dev.map("add", &[&avg, x], Params::default())?;
    }
    dev.map("divide", &[&avg], Params::default().f(&[n as f32]))?;
    let out = lin2(dev, &avg, &xs[0], None, &ts, mode)?;
    dev.free(avg);
    Ok(out)
}

pub(super) fn nearswap(dev: &mut Device, t: f64, xs: &[Tensor]) -> Result<Tensor, GpuError> {
    if xs.len() < 2 {
        return Ok(dev.copy(&xs[0]));
    }
    let out = dev.alloc();
    dev.map(
        "nearswap",
        &[&xs[0], &xs[1], &out],
        Params::default().f(&[t as f32, 1e-6f32]),
    )?;
    Ok(out)
}

/// Inputs `[m...]` or `[base, m...]`: geometry.rs `multislerp`, pass by pass.
pub(super) fn multislerp(
    dev: &mut Device,
    weights: &[f64],
    normalize: bool,
    eps: f64,
    with_base: bool,
    xs: &[Tensor],
) -> Result<Tensor, GpuError> {
    let first = usize::from(with_base);
    let m = xs.len().saturating_sub(first);
    if m < 2 {
        return Ok(dev.copy(&xs[if m == 1 { first } else { 0 }]));
    }
    let mut w: Vec<f64> = (0..m).map(|i| weights.get(i).copied().unwrap_or(0.0)).collect();
    let sum: f64 = w.iter().sum();
    if normalize && sum != 0.0 {
        w.iter_mut().for_each(|x| *x /= sum);
    }
    let owned: Vec<Tensor> = if with_base {
        (0..m)
            .map(|i| difference(dev, &xs[first + i], &xs[0]))
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let x: Vec<&Tensor> = if with_base {
        owned.iter().collect()
    } else {
        xs.iter().collect()
    };
    let norms: Vec<f64> = dev
        .dots(
            &x.iter().map(|t| (*t, *t)).collect::<Vec<_>>(),
            Vectors::flat(dev.n),
        )?
        .into_iter()
        .map(|s| s[0].sqrt())
        .collect();
    let w32: Vec<f32> = w.iter().map(|x| *x as f32).collect();
    let den: Vec<f32> = norms.iter().map(|n| (n + eps) as f32).collect();
    // u_i = x_i / den_i and the weighted mean m.
    let mut units = Vec::with_capacity(m);
    let mean = dev.zeros();
    for i in 0..m {
        let u = dev.alloc();
        dev.map("unit", &[x[i], &u], Params::default().f(&[den[i]]))?;
        dev.map("axpy", &[&mean, &u], Params::default().f(&[w32[i]]))?;
        units.push(u);
    }
    let mut pairs: Vec<(&Tensor, &Tensor)> = vec![(&mean, &mean)];
    pairs.extend(units.iter().map(|u| (u, &mean)));
    let sums: Vec<f64> = dev
        .dots(&pairs, Vectors::flat(dev.n))?
        .into_iter()
        .map(|s| s[0])
        .collect();
    let base = with_base.then(|| &xs[0]);
    let mnorm = sums[0].sqrt();
    let out = if mnorm < eps || mnorm == 0.0 {
        let y = dev.zeros();
        for i in 0..m {
            dev.map("axpy", &[&y, x[i]], Params::default().f(&[w32[i]]))?;
        }
        if let Some(b) = base {
            dev.map("add", &[&y, b], Params::default())?;
        }
        y
    } else {
        let mnorm32 = mnorm as f32;
        let dots: Vec<f32> = sums[1..].iter().map(|s| (s / mnorm) as f32).collect();
        let mh = dev.copy(&mean);
        dev.map("divide", &[&mh], Params::default().f(&[mnorm32]))?;
        let tau = dev.zeros();
        for i in 0..m {
            dev.map(
                "tangent",
                &[&tau, &units[i], &mh],
                Params::default().f(&[dots[i], w32[i]]),
            )?;
        }
        let tau2 = dev.dots(&[(&tau, &tau)], Vectors::flat(dev.n))?[0][0];
        let theta = tau2.sqrt() + eps;
        let ca = theta.cos() as f32;
        let sa = if theta == 0.0 {
            1.0
        } else {
            (theta.sin() / theta) as f32
        };
        let scale = norms.iter().zip(&w).map(|(n, w)| n * w).sum::<f64>() as f32;
        let out = dev.alloc();
        let p = Params::default().f(&[ca, sa, scale]).u(&[u32::from(with_base)]);
        dev.map("multislerp_out", &[&mh, &tau, base.unwrap_or(&mh), &out], p)?;
        dev.free(mh);
        dev.free(tau);
        out
    };
    dev.free(mean);
    for t in units.into_iter().chain(owned) {
        dev.free(t);
    }
    Ok(out)
}

/// Inputs `[m...]`: geometry.rs `karcher`, iteration by iteration.
pub(super) fn karcher(dev: &mut Device, max_iter: u32, tol: f64, xs: &[Tensor]) -> Result<Tensor, GpuError> {
    let n = xs.len();
    if n == 1 {
        return Ok(dev.copy(&xs[0]));
    }
    let alpha = 1.0 / n as f64;
    let norms: Vec<f64> = dev
        .dots(
            &xs.iter().map(|t| (t, t)).collect::<Vec<_>>(),
            Vectors::flat(dev.n),
        )?
        .into_iter()
        .map(|s| s[0].sqrt())
        .collect();
    let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return Ok(dev.zeros());
    }
    let norm32: Vec<f32> = norms.iter().map(|x| *x as f32).collect();
    let valid_alpha = alpha * valid.len() as f64;
    let abar = (alpha / valid_alpha) as f32;
    let units: Vec<Tensor> = valid
        .iter()
        .map(|&i| {
            let u = dev.alloc();
            dev.map("unit", &[&xs[i], &u], Params::default().f(&[norm32[i]]))
                .map(|()| u)
        })
        .collect::<Result<_, _>>()?;
    let mut mean = dev.zeros();
    for u in &units {
        dev.map("axpy", &[&mean, u], Params::default().f(&[abar]))?;
    }
    let mean_norm = dev.dots(&[(&mean, &mean)], Vectors::flat(dev.n))?[0][0].sqrt();
    if mean_norm < tol || mean_norm == 0.0 {
        dev.free(mean);
        mean = dev.copy(&units[0]);
    } else {
        dev.map("divide", &[&mean], Params::default().f(&[mean_norm as f32]))?;
    }
    for _ in 0..max_iter {
        let pairs: Vec<(&Tensor, &Tensor)> = units.iter().map(|u| (&mean, u)).collect();
        let dots = dev.dots(&pairs, Vectors::flat(dev.n))?;
        let mut active: Vec<(usize, f32, f32)> = Vec::new();
        for (k, d) in dots.iter().enumerate() {
            let dot = d[0].clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol || theta == 0.0 {
                continue;
            }
            active.push((k, abar * (theta / theta.sin()) as f32, dot as f32));
        }
        let tangent = dev.zeros();
        for &(k, c, dot) in &active {
            dev.map(
                "tangent",
                &[&tangent, &units[k], &mean],
                Params::default().f(&[dot, c]),
            )?;
        }
        let tn = dev.dots(&[(&tangent, &tangent)], Vectors::flat(dev.n))?[0][0].sqrt();
        if tn < tol || tn == 0.0 {
            dev.free(tangent);
            break;
        }
        let ct = tn.cos() as f32;
        let st = (tn.sin() / tn) as f32;
        let next = lin2(dev, &mean, &tangent, None, &[(ct, st)], [0, 0])?;
        dev.free(tangent);
        dev.free(mean);
        mean = next;
        let un = dev.dots(&[(&mean, &mean)], Vectors::flat(dev.n))?[0][0].sqrt();
        if un > tol && un > 0.0 {
            dev.map("divide", &[&mean], Params::default().f(&[un as f32]))?;
        }
    }
    let scale = norms.iter().map(|x| alpha * x).sum::<f64>() as f32;
    dev.map("scale", &[&mean], Params::default().f(&[scale]))?;
    for u in units {
        dev.free(u);
    }
    Ok(mean)
}
