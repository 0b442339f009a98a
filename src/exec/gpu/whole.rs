//! [`Kernel::Whole`](crate::plan::Kernel::Whole) steps on the GPU: the CPU executor's
//! stack machine over whole tensors (`exec::cpu::whole`), with every tensor on the
//! device, and each method orchestrated from the primitives of [`super::device`] in the
//! structure of its CPU reference (`exec::methods`).
//!
//! What is exact and what is not: element-wise arithmetic, selections (top-k thresholds,
//! ranks) and random masks give the CPU's bits. Reductions (norms, dot products, L1
//! norms) are summed in f32 segments on the device and in f64 on the host, in another
//! order than the CPU's, so coefficients derived from them may differ in their last
//! bits; spec/ops.md ("GPU tolerances") states the bound.

use crate::exec::methods::arcee::{arcee_quartile_ranks, arcee_threshold};
use crate::exec::methods::chunks::Layout;
use crate::exec::methods::geometry::{model_stock_t, nuslerp_coefficients, slerp_coefficients};
use crate::exec::methods::select::ord_key;
use crate::io::DType;
use crate::ops::{GtaKind, MethodOp};
use crate::plan::Instr;

use super::device::{Buf, Device, Mask, Params, Tensor, Vectors};
use super::GpuError;

/// Whether `op` has a GPU implementation; `Err` names why not.
pub(crate) fn supported(op: &MethodOp) -> Result<(), String> {
    match op {
        MethodOp::Slerp { .. }
        | MethodOp::Nuslerp { .. }
        | MethodOp::Multislerp { .. }
        | MethodOp::Karcher { .. }
        | MethodOp::ModelStock { .. }
        | MethodOp::Nearswap { .. }
        | MethodOp::Gta { .. }
        | MethodOp::Ram { .. }
        | MethodOp::RamPlusTl { .. }
        | MethodOp::Sce { .. }
        | MethodOp::ArceeFusion => Ok(()),
        // A MoE expert's noise draws normals through f64 ln and cos (Box-Muller).
        MethodOp::Noise { .. } => Err("expert noise (`noise_scale`) has no GPU kernel".to_string()),
    }
}

/// Rows that one chunk must hold whole: DELLA ranks `|δ|` within rows, arcee_fusion takes
/// a KL divergence per row.
pub(crate) fn row_alignment(program: &[Instr], shape: &[usize]) -> usize {
    let by_rows = program.iter().any(|i| {
        matches!(
            i,
            Instr::Method {
                op: MethodOp::Gta {
                    kind: GtaKind::Della | GtaKind::DellaLinear,
                    ..
                } | MethodOp::ArceeFusion,
                ..
            }
        )
    });
    if by_rows {
        shape.last().copied().unwrap_or(1).max(1)
    } else {
        1
    }
}

enum Item {
    Slot(usize),
    Dev(Tensor),
}

/// Runs `program` over `inputs` (stored bytes of `dtypes`) into bytes of `out_dtype`.
pub(crate) fn run(
    dev: &mut Device,
    program: &[Instr],
    inputs: &[&[u8]],
    dtypes: &[DType],
    shape: &[usize],
    out_dtype: DType,
) -> Result<Vec<u8>, GpuError> {
    let mut stack: Vec<Item> = Vec::new();
    for instr in program {
        let (pops, _) = instr.stack_effect();
        if stack.len() < pops {
            return Err(internal("the program underflows its stack"));
        }
        let args = stack.split_off(stack.len() - pops);
        let mut tensors = Vec::with_capacity(args.len());
        if !matches!(instr, Instr::Load(_)) {
            for a in args {
                tensors.push(tensor(dev, a, inputs, dtypes)?);
            }
        }
        let result = match instr {
            Instr::Load(slot) => {
                if *slot >= inputs.len() {
                    return Err(internal("the program loads a missing slot"));
                }
                Item::Slot(*slot)
            }
            Instr::Method { op, .. } => {
                let out = method(dev, op, &tensors, shape)?;
                for t in tensors {
                    dev.free(t);
                }
                Item::Dev(out)
            }
            elementwise => {
                let mut it = tensors.into_iter();
                let acc = it
                    .next()
                    .ok_or_else(|| internal("an operation without operands"))?;
                let rest: Vec<Tensor> = it.collect();
                elementwise_op(dev, elementwise, &acc, &rest)?;
                for t in rest {
                    dev.free(t);
                }
                Item::Dev(acc)
            }
        };
        stack.push(result);
    }
    let top = stack
        .pop()
        .ok_or_else(|| internal("the program leaves no value"))?;
    let top = tensor(dev, top, inputs, dtypes)?;
    let out = dev.download(&top, out_dtype)?;
    dev.free(top);
    for item in stack {
        if let Item::Dev(t) = item {
            dev.free(t);
        }
    }
    Ok(out)
}

fn internal(what: &str) -> GpuError {
    GpuError::Device {
        during: "running a whole-tensor program".to_string(),
        message: format!("internal error: {what}"),
    }
}

fn tensor(dev: &mut Device, item: Item, inputs: &[&[u8]], dtypes: &[DType]) -> Result<Tensor, GpuError> {
    match item {
        Item::Dev(t) => Ok(t),
        Item::Slot(s) => dev.upload(inputs[s], dtypes[s]),
    }
}

/// `exec::cpu::whole::apply_elementwise` on device tensors.
fn elementwise_op(dev: &mut Device, instr: &Instr, acc: &Tensor, rest: &[Tensor]) -> Result<(), GpuError> {
    let p = Params::default();
    match instr {
        Instr::Neg => dev.map("neg", &[acc], p),
        Instr::Scale(f) => dev.map("scale", &[acc], p.f(&[*f])),
        Instr::Divide(d) => dev.map("divide", &[acc], p.f(&[*d])),
        Instr::Add => dev.map("add", &[acc, operand(rest, 0)?], p),
        Instr::Sub => dev.map("sub", &[acc, operand(rest, 0)?], p),
        Instr::WeightedSum { weights, divisor } => {
            let w0 = weights.first().copied().unwrap_or(1.0);
            dev.map("scale", &[acc], p.f(&[w0]))?;
            for (b, w) in rest.iter().zip(weights.iter().skip(1)) {
                dev.map("axpy", &[acc, b], p.f(&[*w]))?;
            }
            if let Some(d) = divisor {
                dev.map("divide", &[acc], p.f(&[*d]))?;
            }
            Ok(())
        }
        Instr::Load(_) | Instr::Method { .. } => Ok(()),
    }
}

fn operand(rest: &[Tensor], i: usize) -> Result<&Tensor, GpuError> {
    rest.get(i).ok_or_else(|| internal("a missing operand"))
}

fn method(dev: &mut Device, op: &MethodOp, xs: &[Tensor], shape: &[usize]) -> Result<Tensor, GpuError> {
    if xs.is_empty() {
        return Err(GpuError::Unsupported(format!("`{}` of no tensors", op.name())));
    }
    if dev.n == 0 {
        return Ok(dev.alloc());
    }
    match op {
        MethodOp::Slerp { t } => slerp(dev, *t, xs),
        MethodOp::Nuslerp {
            weights,
            flatten,
            row_wise,
            with_base,
        } => nuslerp(dev, *weights, *flatten, *row_wise, *with_base, xs, shape),
        MethodOp::ModelStock { filter_wise } => model_stock(dev, *filter_wise, xs, shape),
        MethodOp::Nearswap { t } => nearswap(dev, *t, xs),
        MethodOp::Multislerp {
            weights,
            normalize_weights,
            eps,
            with_base,
        } => multislerp(dev, weights, *normalize_weights, *eps, *with_base, xs),
        MethodOp::Karcher { max_iter, tol } => karcher(dev, *max_iter, *tol, xs),
        MethodOp::Gta { .. } => gta(dev, op, xs, shape),
        MethodOp::Ram { epsilon } => ram(dev, *epsilon, None, xs),
        MethodOp::RamPlusTl { r, alpha, epsilon } => ram(dev, *epsilon, Some((*r, *alpha)), xs),
        MethodOp::Sce { select_topk } => sce(dev, *select_topk, xs),
        MethodOp::ArceeFusion => arcee_fusion(dev, xs, shape),
        other => Err(GpuError::Unsupported(format!(
            "the method `{}` has no GPU kernel",
            other.name()
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// geometry
// ---------------------------------------------------------------------------------------

/// How `lin2` finds an element's vector, and the reduction's vectors.
fn vectors_of(layout: Layout, n: usize) -> (Vectors, [u32; 2]) {
    match layout {
        Layout::Flat => (Vectors::flat(n), [0, 0]),
        Layout::Rows(len) => (Vectors::rows(n, len), [1, len as u32]),
        Layout::Cols { len, inner } => (Vectors::cols(len, inner), [2, inner as u32]),
    }
}

/// `out = c0[v]·a + c1[v]·b (+ base)`, `coefs` holding `(c0, c1)` per vector.
fn lin2(
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
        let p = Params {
            n: (hi - lo) as u32,
            start: lo as u32,
            ..p
        };
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

fn slerp(dev: &mut Device, t: f64, xs: &[Tensor]) -> Result<Tensor, GpuError> {
    if xs.len() < 2 {
        return Ok(dev.copy(&xs[0]));
    }
    let (a, b) = (&xs[0], &xs[1]);
    let s = dev.dots3(a, b, Vectors::flat(dev.n))?;
    let c = slerp_coefficients(t, s[0][0], s[1][0], s[2][0]);
    lin2(dev, a, b, None, &[c], [0, 0])
}

fn nuslerp(
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

/// `a − b` as a new tensor.
fn difference(dev: &mut Device, a: &Tensor, b: &Tensor) -> Result<Tensor, GpuError> {
    let out = dev.alloc();
    dev.map("difference", &[a, b, &out], Params::default())?;
    Ok(out)
}

fn model_stock(
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

fn nearswap(dev: &mut Device, t: f64, xs: &[Tensor]) -> Result<Tensor, GpuError> {
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
fn multislerp(
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
fn karcher(dev: &mut Device, max_iter: u32, tol: f64, xs: &[Tensor]) -> Result<Tensor, GpuError> {
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

// ---------------------------------------------------------------------------------------
// generalized task arithmetic
// ---------------------------------------------------------------------------------------

/// Norms below this leave the masked delta unscaled (gta.rs `RESCALE_EPS`).
const RESCALE_EPS: f64 = 1e-7;

/// gta.rs `l1_factor`.
fn l1_factor(before: f64, after: f64) -> f32 {
    if before < RESCALE_EPS || after < RESCALE_EPS {
        1.0
    } else {
        (before / after) as f32
    }
}

/// select.rs `Selection`, found on the device.
struct Selection {
    threshold: u32,
    take_equal: usize,
    equal_total: usize,
    any: bool,
}

/// select.rs `bucket_of_kth`: the bucket holding the `k`-th largest (1-based) and how
/// many lie above it.
fn bucket_of_kth(hist: &[u32], k: usize) -> (u32, usize) {
    let mut above = 0usize;
    for bucket in (0..hist.len()).rev() {
        let count = hist[bucket] as usize;
        if above + count >= k {
            return (bucket as u32, above);
        }
        above += count;
    }
    (0, above)
}

/// A 16-bit histogram of the keys `|x|`, or of the bits of `x` themselves under `raw`
/// (high halves, or low halves under `high`).
fn histogram(dev: &mut Device, x: &Tensor, high: Option<u32>, raw: bool) -> Result<Vec<u32>, GpuError> {
    let hist = dev.zeros_small(1 << 16);
    let (name, u) = match high {
        None => ("histogram_high", 0),
        Some(h) => ("histogram_low", h),
    };
    for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
        let p = Params {
            n: (hi - lo) as u32,
            start: lo as u32,
            ..Params::default()
        }
        .u(&[u, u32::from(raw)]);
        dev.dispatch(name, &[&x.chunks[c], &hist], p, (hi - lo) as u64)?;
    }
    let bytes = dev.read(&[&hist])?;
    dev.give_small(hist);
    Ok(bytemuck::pod_collect_to_vec(&bytes[0]))
}

/// select.rs `select_top_k` over the keys `|x|`, with the same two histograms.
fn select_top_k(dev: &mut Device, x: &Tensor, k: usize) -> Result<Selection, GpuError> {
    select_top_k_of(dev, x, k, false)
}

/// [`select_top_k`] over the keys `|x|`, or over the bits of `x` under `raw`.
fn select_top_k_of(dev: &mut Device, x: &Tensor, k: usize, raw: bool) -> Result<Selection, GpuError> {
    let k = k.min(dev.n);
    if k == 0 {
        return Ok(Selection {
            threshold: u32::MAX,
            take_equal: 0,
            equal_total: 0,
            any: false,
        });
    }
    let hist = histogram(dev, x, None, raw)?;
    let (high, above_high) = bucket_of_kth(&hist, k);
    let hist = histogram(dev, x, Some(high), raw)?;
    let (low, above_low) = bucket_of_kth(&hist, k - above_high);
    Ok(Selection {
        threshold: (high << 16) | low,
        take_equal: k - above_high - above_low,
        equal_total: hist[low as usize] as usize,
        any: true,
    })
}

/// The mask of a selection (ties at the threshold: lowest indices first).
fn selection_mask(dev: &mut Device, x: &Tensor, sel: &Selection) -> Result<Mask, GpuError> {
    let mask = dev.alloc_mask();
    let ranges = dev.ranges();
    let words = |(lo, hi): (usize, usize)| (hi - lo).div_ceil(32);
    if !sel.any {
        dev.clear_mask(&mask);
        return Ok(mask);
    }
    let t = sel.threshold;
    if sel.take_equal == sel.equal_total {
        for (c, &(lo, hi)) in ranges.iter().enumerate() {
            let p = Params {
                n: (hi - lo) as u32,
                start: lo as u32,
                ..Params::default()
            }
            .u(&[t]);
            dev.dispatch(
                "mask_at_least",
                &[&x.chunks[c], &mask.chunks[c]],
                p,
                words((lo, hi)) as u64,
            )?;
        }
        return Ok(mask);
    }
    // How many threshold-equal keys each word takes: the first take_equal overall.
    let mut counts = Vec::new();
    for (c, &(lo, hi)) in ranges.iter().enumerate() {
        let out = dev.zeros_small(words((lo, hi)));
        let p = Params {
            n: (hi - lo) as u32,
            start: lo as u32,
            ..Params::default()
        }
        .u(&[t]);
        dev.dispatch("count_equal", &[&x.chunks[c], &out], p, words((lo, hi)) as u64)?;
        counts.push(out);
    }
    let read = dev.read(&counts.iter().collect::<Vec<_>>())?;
    for b in counts {
        dev.give_small(b);
    }
    let mut left = sel.take_equal;
    for (c, (&(lo, hi), bytes)) in ranges.iter().zip(&read).enumerate() {
        let budgets: Vec<u32> = bytemuck::pod_collect_to_vec::<u8, u32>(bytes)
            .into_iter()
            .map(|e| {
                let take = (e as usize).min(left);
                left -= take;
                take as u32
            })
            .collect();
        let budget = dev.small(&budgets);
        let p = Params {
            n: (hi - lo) as u32,
            start: lo as u32,
            ..Params::default()
        }
        .u(&[t]);
        dev.dispatch(
            "mask_budget",
            &[&x.chunks[c], &budget, &mask.chunks[c]],
            p,
            words((lo, hi)) as u64,
        )?;
        dev.give_small(budget);
    }
    Ok(mask)
}

/// The mask of a random keep test per element: `bernoulli` with probability `p`, or the
/// DELLA rank-dependent probability when `ranks` are given.
fn random_mask(
    dev: &mut Device,
    key: u64,
    p: f32,
    della: Option<(&Tensor, usize, f32, f32)>,
) -> Result<Mask, GpuError> {
    let mask = dev.alloc_mask();
    let key = [key as u32, (key >> 32) as u32];
    for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
        let words = (hi - lo).div_ceil(32) as u64;
        let base = Params {
            n: (hi - lo) as u32,
            start: lo as u32,
            ..Params::default()
        };
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
fn sparsify(
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
fn gta(dev: &mut Device, op: &MethodOp, xs: &[Tensor], shape: &[usize]) -> Result<Tensor, GpuError> {
    let MethodOp::Gta {
        kind,
        weights,
        densities,
        gammas,
        epsilons,
        lambda,
        normalize,
        rescale,
        keys,
    } = op
    else {
        return Err(internal("not a task-vector method"));
    };
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
            let p = Params {
                n: (hi - lo) as u32,
                start: lo as u32,
                ..p
            };
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

// ---------------------------------------------------------------------------------------
// ram, ramplus_tl
// ---------------------------------------------------------------------------------------

/// Inputs `[base, m...]`: other.rs `ram`, one model per pass.
fn ram(dev: &mut Device, epsilon: f64, plus: Option<(f64, f64)>, xs: &[Tensor]) -> Result<Tensor, GpuError> {
    if xs.len() == 1 {
        return Ok(dev.copy(&xs[0]));
    }
    let models = xs.len() - 1;
    let eps = epsilon as f32;
    let base = &xs[0];
    // Active models per element, as u32 (zeros have the same bits as f32 zeros).
    let count = dev.zeros();
    for x in &xs[1..] {
        dev.map("ram_count", &[base, x, &count], Params::default().f(&[eps]))?;
    }
    let lambdas: Vec<f32> = match plus {
        None => vec![1.0; models],
        Some((r, alpha)) => {
            let seg = super::device::SEGMENT as usize;
            let mut lambdas = Vec::with_capacity(models);
            for x in &xs[1..] {
                let mut parts = Vec::new();
                for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
                    let inv = (hi - lo).div_ceil(seg);
                    let out = dev.zeros_small(2 * inv);
                    let p = Params {
                        n: inv as u32,
                        start: lo as u32,
                        ..Params::default()
                    }
                    .u(&[seg as u32, (hi - lo) as u32])
                    .f(&[eps]);
                    dev.dispatch(
                        "ram_tally",
                        &[&base.chunks[c], &x.chunks[c], &count.chunks[c], &out],
                        p,
                        inv as u64,
                    )?;
                    parts.push(out);
                }
                let read = dev.read(&parts.iter().collect::<Vec<_>>())?;
                for b in parts {
                    dev.give_small(b);
                }
                let (mut shared, mut uniq) = (0u64, 0u64);
                for bytes in &read {
                    for pair in bytemuck::pod_collect_to_vec::<u8, u32>(bytes).chunks_exact(2) {
                        shared += u64::from(pair[0]);
                        uniq += u64::from(pair[1]);
                    }
                }
                let rho = shared as f64 / (uniq as f64).max(epsilon);
                lambdas.push((1.0 + r * rho.max(0.0).min(alpha)) as f32);
            }
            lambdas
        }
    };
    let merged = dev.zeros();
    for (x, lambda) in xs[1..].iter().zip(&lambdas) {
        dev.map(
            "ram_merge",
            &[base, x, &count, &merged],
            Params::default().f(&[eps, *lambda]),
        )?;
    }
    dev.free(count);
    dev.map("add", &[&merged, base], Params::default())?;
    Ok(merged)
}

// ---------------------------------------------------------------------------------------
// sce
// ---------------------------------------------------------------------------------------

/// Inputs `[base, m...]`: other.rs `sce`. The variance that ranks elements is computed
/// with the software f64 of `shaders/sce.wgsl`, so the selection is the CPU's.
fn sce(dev: &mut Device, select_topk: f64, xs: &[Tensor]) -> Result<Tensor, GpuError> {
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
            // other.rs: a float32 product, truncated.
            ((nonzero as f32) * (select_topk as f32)) as usize
        };
        let sel = select_top_k(dev, &variance, k)?;
        let mask = selection_mask(dev, &variance, &sel)?;
        for d in &deltas {
            for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
                let p = Params {
                    n: (hi - lo) as u32,
                    start: lo as u32,
                    ..Params::default()
                };
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

// ---------------------------------------------------------------------------------------
// arcee_fusion
// ---------------------------------------------------------------------------------------

/// Inputs `[base, m]`: other.rs `arcee_fusion`. The importance keys come out of
/// `shaders/arcee.wgsl` with the CPU's bits (software f64, the portable exp and ln), so
/// the quartiles, the threshold and the fused tensor are the CPU's too.
fn arcee_fusion(dev: &mut Device, xs: &[Tensor], shape: &[usize]) -> Result<Tensor, GpuError> {
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

/// other.rs `arcee_importance_keys` over rows of `row` elements.
fn arcee_keys(dev: &mut Device, base: &Tensor, ft: &Tensor, row: usize) -> Result<Tensor, GpuError> {
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
        let per_element = Params {
            n: (hi - lo) as u32,
            start: lo as u32,
            ..Params::default()
        }
        .u(&[row as u32]);
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

/// How many elements have the key `|x|` equal to `key`.
fn count_key(dev: &mut Device, x: &Tensor, key: u32) -> Result<usize, GpuError> {
    let mut counts = Vec::new();
    for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
        let words = (hi - lo).div_ceil(32);
        let out = dev.zeros_small(words);
        let p = Params {
            n: (hi - lo) as u32,
            start: lo as u32,
            ..Params::default()
        }
        .u(&[key]);
        dev.dispatch("count_equal", &[&x.chunks[c], &out], p, words as u64)?;
        counts.push(out);
    }
    let read = dev.read(&counts.iter().collect::<Vec<_>>())?;
    for b in counts {
        dev.give_small(b);
    }
    Ok(read
        .iter()
        .flat_map(|bytes| bytemuck::pod_collect_to_vec::<u8, u32>(bytes))
        .map(|c| c as usize)
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::gpu::GpuContext;
    use crate::exec::methods::portable;
    use crate::exec::methods::select::from_ord_key;
    use crate::exec::GpuExecutor;

    fn executor() -> Option<GpuExecutor> {
        match GpuContext::new(None, true) {
            Ok(Some(ctx)) => Some(GpuExecutor::new(ctx)),
            _ if std::env::var_os("MERGEC_REQUIRE_GPU").is_some() => {
                panic!("MERGEC_REQUIRE_GPU is set but there is no GPU adapter")
            }
            _ => None,
        }
    }

    /// other.rs's variance key: f64 sum, mean, sum of squares, rounded to f32; also the
    /// mean and the sum of squares.
    fn cpu_variance(ds: &[f32]) -> (f64, f64, f32) {
        let m = ds.len() as f64;
        let mean = ds.iter().map(|d| *d as f64).sum::<f64>() / m;
        let ss: f64 = ds
            .iter()
            .map(|d| {
                let e = *d as f64 - mean;
                e * e
            })
            .sum();
        (mean, ss, (ss / m) as f32)
    }

    fn f64s(dev: &mut Device, lo: &Tensor, hi: &Tensor) -> Vec<f64> {
        let lo: Vec<u32> = bytemuck::pod_collect_to_vec(&dev.download(lo, DType::F32).unwrap());
        let hi: Vec<u32> = bytemuck::pod_collect_to_vec(&dev.download(hi, DType::F32).unwrap());
        lo.iter()
            .zip(&hi)
            .map(|(l, h)| f64::from_bits((*h as u64) << 32 | *l as u64))
            .collect()
    }

    /// A device for `n` elements in rows of `row`, with storage bindings of `binding` bytes.
    fn device(gpu: &GpuExecutor, n: usize, row: usize, binding: u64) -> Device<'_> {
        Device::new(
            &gpu.ctx,
            &gpu.pipelines,
            &gpu.pool,
            binding,
            gpu.max_workgroups_per_dimension,
            n,
            row,
        )
        .unwrap()
    }

    /// `arcee_exp` against portable.rs `exp`, bit for bit, over its whole domain: rows
    /// `[0, v...]` have max 0, so each element is `exp(v)`.
    #[test]
    fn software_exp_is_portable_exp() {
        let Some(gpu) = executor() else { return };
        let mut values: Vec<f32> = vec![0.0, -0.0, f32::NEG_INFINITY, -708.0, -708.001, -745.2];
        let mut v = -800.0f32;
        while v < 0.0 {
            values.push(v);
            v += 0.0137;
        }
        // Tiny magnitudes, subnormals included (up to 2^-1).
        values.extend((0..2000).map(|k| -f32::from_bits(0x0000_0001 + k * 0x0001_fc01)));
        assert!(values.iter().all(|v| *v <= 0.0));
        let row = values.len() + 1;
        let mut x = vec![0.0f32];
        x.extend(&values);
        let mut dev = device(&gpu, row, row, 4 << 20);
        let t = dev.upload(bytemuck::cast_slice(&x), DType::F32).unwrap();
        let maxes = dev.zeros_small(1);
        let (lo, hi) = (dev.alloc(), dev.alloc());
        let rows = Params {
            n: 1,
            ..Params::default()
        }
        .u(&[row as u32]);
        let elements = Params {
            n: row as u32,
            ..Params::default()
        }
        .u(&[row as u32]);
        dev.dispatch("arcee_row_max", &[&t.chunks[0], &maxes], rows, 1)
            .unwrap();
        dev.dispatch(
            "arcee_exp",
            &[&t.chunks[0], &maxes, &lo.chunks[0], &hi.chunks[0]],
            elements,
            row as u64,
        )
        .unwrap();
        let got = f64s(&mut dev, &lo, &hi);
        let mut bad = 0;
        for (v, g) in x.iter().zip(&got) {
            let want = portable::exp(*v as f64);
            if want.to_bits() != g.to_bits() {
                bad += 1;
                eprintln!("exp({v:e}) = {want:e}, GPU {g:e}");
            }
        }
        assert_eq!(bad, 0, "of {row}");
    }

    /// arcee_fusion's importance keys against the CPU's, bit for bit: rows of several
    /// lengths; nearly equal rows (KL near rounding), identical rows (KL 0), peaked
    /// softmaxes, −inf, +inf and NaN elements, large and subnormal differences.
    #[test]
    fn arcee_importance_keys_are_the_cpus() {
        let Some(gpu) = executor() else { return };
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut unit = move || ((next() >> 11) as f64 / (1u64 << 53) as f64) as f32;
        for row in [1usize, 2, 7, 64, 300, 1000] {
            let rows = 12usize;
            let n = row * rows;
            let (mut b, mut p) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for r in 0..rows {
                for j in 0..row {
                    let x = unit() * 2.0 - 1.0;
                    let (bv, pv) = match r {
                        0 => (x, x),
                        1 => (x, f32::from_bits(x.to_bits() ^ 1)),
                        2 => (x * 80.0, x * 80.0 + unit()),
                        3 => (x, x + 1e-3 * unit()),
                        4 if j == 0 => (f32::NEG_INFINITY, x),
                        5 if j == row / 2 => (x, f32::NEG_INFINITY),
                        6 if j == 0 => (f32::INFINITY, x),
                        7 if j == row - 1 => (x, f32::NAN),
                        8 => (x * 1e-38, x * 1e-39),
                        9 => (x * 3e38, -x * 3e38),
                        _ => (x, unit() * 2.0 - 1.0),
                    };
                    b.push(bv);
                    p.push(pv);
                }
            }
            let ins = [
                crate::exec::methods::MethodInput {
                    bytes: bytemuck::cast_slice(&b),
                    dtype: DType::F32,
                },
                crate::exec::methods::MethodInput {
                    bytes: bytemuck::cast_slice(&p),
                    dtype: DType::F32,
                },
            ];
            let shape = [rows, row];
            let want = crate::exec::methods::arcee::arcee_importance_keys(&crate::exec::methods::Inputs {
                tensors: &ins,
                shape: &shape,
            });
            let mut dev = device(&gpu, n, row, 4 << 20);
            let tb = dev.upload(bytemuck::cast_slice(&b), DType::F32).unwrap();
            let tp = dev.upload(bytemuck::cast_slice(&p), DType::F32).unwrap();
            let keys = arcee_keys(&mut dev, &tb, &tp, row).unwrap();
            let got: Vec<u32> = bytemuck::pod_collect_to_vec(&dev.download(&keys, DType::F32).unwrap());
            let bad: Vec<usize> = (0..n).filter(|&i| want[i] != got[i]).collect();
            for &i in bad.iter().take(10) {
                eprintln!(
                    "row {row}, element {i}: CPU {:e}, GPU {:e}",
                    from_ord_key(want[i]),
                    from_ord_key(got[i])
                );
            }
            assert!(bad.is_empty(), "{} of {n} keys differ (rows of {row})", bad.len());
            // The cases are what they say: zero, NaN and finite nonzero importances occur.
            let values: Vec<f32> = want.iter().map(|&k| from_ord_key(k)).collect();
            assert!(values.contains(&0.0));
            assert!(values.iter().any(|v| v.is_nan()));
            // (A row of one element has KL 0.)
            assert!(row == 1 || values.iter().any(|v| v.is_finite() && *v != 0.0));
        }
    }

    fn same(a: f64, b: f64) -> bool {
        // Zeros of either sign are the same here (see `shaders/sce.wgsl`: the CPU's sum
        // may start from −0.0; no key depends on the sign of a zero sum).
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) || (a == 0.0 && b == 0.0)
    }

    /// The software f64 of `shaders/sce.wgsl` against the CPU's f64, bit for bit: random
    /// bit patterns of every finite exponent, subnormals, zeros, near-equal values whose
    /// variance cancels, values whose variance is a subnormal f32 or overflows.
    #[test]
    fn software_f64_variance_is_the_cpus() {
        let Some(gpu) = executor() else { return };
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for models in 1..=5usize {
            let n = 20_000;
            let mut ds: Vec<Vec<f32>> = vec![Vec::with_capacity(n); models];
            for e in 0..n {
                let kind = e % 6;
                let centre = f32::from_bits((next() as u32) & 0x7f7f_ffff);
                for d in ds.iter_mut() {
                    let r = next();
                    let v = match kind {
                        // any finite value
                        0 => f32::from_bits((r as u32) & 0xff7f_ffff | ((r >> 40) as u32 & 1) << 31),
                        // near-equal values: the variance cancels
                        1 => f32::from_bits(centre.to_bits().wrapping_add((r % 5) as u32)),
                        // subnormals and zeros
                        2 => f32::from_bits((r as u32) & 0x8000_00ff),
                        // tiny normals: subnormal or zero variance
                        3 => f32::from_bits((r as u32) & 0x80ff_ffff | 0x0080_0000),
                        // huge values: an overflowing variance
                        4 => f32::from_bits((r as u32) & 0x807f_ffff | 0x7f00_0000),
                        _ => ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 0.01,
                    };
                    d.push(v);
                }
            }
            let mut dev = device(&gpu, n, 1, 4 * 8192);
            let tensors: Vec<Tensor> = ds
                .iter()
                .map(|d| dev.upload(bytemuck::cast_slice(d), DType::F32).unwrap())
                .collect();
            let m = Params::default().u(&[models as u32]);
            let (lo, hi) = (dev.zeros(), dev.zeros());
            for t in &tensors {
                dev.map("sce_sum", &[t, &lo, &hi], Params::default()).unwrap();
            }
            dev.map("sce_mean", &[&lo, &hi], m).unwrap();
            let means = f64s(&mut dev, &lo, &hi);
            let (ss_lo, ss_hi) = (dev.zeros(), dev.zeros());
            for t in &tensors {
                dev.map("sce_squares", &[t, &lo, &hi, &ss_lo, &ss_hi], Params::default())
                    .unwrap();
            }
            let variance = dev.alloc();
            dev.map("sce_variance", &[&ss_lo, &ss_hi, &variance], m).unwrap();
            let squares = f64s(&mut dev, &ss_lo, &ss_hi);
            let got: Vec<f32> = bytemuck::pod_collect_to_vec(&dev.download(&variance, DType::F32).unwrap());
            let mut bad = 0;
            let (mut subnormal, mut infinite, mut zero) = (0, 0, 0);
            for e in 0..n {
                let column: Vec<f32> = ds.iter().map(|d| d[e]).collect();
                let (mean, ss, want) = cpu_variance(&column);
                let ok = same(mean, means[e])
                    && same(ss, squares[e])
                    && (want.to_bits() == got[e].to_bits() || (want.is_nan() && got[e].is_nan()));
                if !ok {
                    bad += 1;
                    eprintln!(
                        "{models} models, {column:?}: mean {mean:e} / {:e}, ss {ss:e} / {:e}, variance {want:e} / {:e}",
                        means[e], squares[e], got[e]
                    );
                }
                subnormal += usize::from(want.is_subnormal());
                infinite += usize::from(want.is_infinite());
                zero += usize::from(want == 0.0);
            }
            if models > 1 {
                assert!(
                    subnormal > 100 && infinite > 100 && zero > 100,
                    "{subnormal} {infinite} {zero}"
                );
            }
            assert_eq!(bad, 0, "{models} models");
        }
    }

    /// One pass of `dot3` gives exactly the sums of three `dot` passes, for every layout,
    /// across chunk boundaries.
    #[test]
    fn dot3_is_three_dots() {
        let Some(gpu) = executor() else { return };
        let (rows, cols) = (37usize, 91usize);
        let n = rows * cols;
        let values = |seed: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 20_011) as f32 / 1000.0 - 10.0)
                .collect()
        };
        let (x, y) = (values(1), values(7));
        // 1 KiB bindings: 256-element chunks, so rows and columns cross chunk boundaries.
        let mut dev = Device::new(&gpu.ctx, &gpu.pipelines, &gpu.pool, 1024, 65535, n, 1).unwrap();
        assert!(dev.ranges().len() > 10);
        let a = dev.upload(bytemuck::cast_slice(&x), DType::F32).unwrap();
        let b = dev.upload(bytemuck::cast_slice(&y), DType::F32).unwrap();
        for vectors in [
            Vectors::flat(n),
            Vectors::rows(n, cols),
            Vectors::cols(rows, cols),
        ] {
            let three = dev.dots3(&a, &b, vectors).unwrap();
            let one = dev.dots(&[(&a, &a), (&b, &b), (&a, &b)], vectors).unwrap();
            assert_eq!(three.to_vec(), one, "{vectors:?}");
            assert_eq!(one[2].len(), vectors.count);
            // And close to a plain f64 sum.
            for (v, got) in one[2].iter().enumerate() {
                let exact: f64 = (0..vectors.len)
                    .map(|j| v * vectors.sv + j * vectors.sj)
                    .map(|e| x[e] as f64 * y[e] as f64)
                    .sum();
                assert!(
                    (got - exact).abs() <= 1e-12 * exact.abs().max(1.0),
                    "{vectors:?} {v}"
                );
            }
        }
    }
}
