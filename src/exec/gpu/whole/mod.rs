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
//!
//! One module per method family, each the twin of its CPU file in `exec::methods`
//! ([`geometry`], [`gta`], [`sce`], [`ram`], [`arcee`]; [`select`] for top-k on the
//! device); this module runs the program and dispatches to them.

use crate::io::DType;
use crate::ops::{Elementwise, GtaKind, GtaOp, MethodOp};
use crate::plan::Instr;

mod arcee;
mod geometry;
mod gta;
mod lowrank;
mod ram;
mod sce;
mod select;
#[cfg(test)]
mod tests;

use super::device::{Device, Params, Tensor};
use super::GpuError;
use arcee::arcee_fusion;
use geometry::{karcher, model_stock, multislerp, nearswap, nuslerp, slerp};
use gta::gta;
use ram::ram;
use sce::sce;

/// Whether `op` has a GPU implementation; `Err` names why not.
pub(crate) fn supported(op: &MethodOp) -> Result<(), String> {
    match op {
        MethodOp::Slerp { .. }
        | MethodOp::Nuslerp { .. }
        | MethodOp::Multislerp { .. }
        | MethodOp::Karcher { .. }
        | MethodOp::ModelStock { .. }
        | MethodOp::Nearswap { .. }
        | MethodOp::Gta(_)
        | MethodOp::Ram { .. }
        | MethodOp::RamPlusTl { .. }
        | MethodOp::Sce { .. }
        | MethodOp::ArceeFusion => Ok(()),
        // A MoE expert's noise draws normals through f64 ln and cos (Box-Muller).
        MethodOp::Noise { .. } => Err("expert noise (`noise_scale`) has no GPU kernel".to_string()),
        MethodOp::LowRank { .. } => Ok(()),
    }
}

/// Rows that one chunk must hold whole: DELLA ranks `|δ|` within rows, arcee_fusion takes
/// a KL divergence per row.
pub(crate) fn row_alignment(program: &[Instr], shape: &[usize]) -> usize {
    let by_rows = program.iter().any(|i| {
        matches!(
            i,
            Instr::Method {
                op: MethodOp::Gta(GtaOp {
                    kind: GtaKind::Della | GtaKind::DellaLinear,
                    ..
                }) | MethodOp::ArceeFusion,
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
        // The LoRA product reads its factors as stored: they have their own shapes.
        if let Instr::Method {
            op:
                MethodOp::LowRank {
                    scale,
                    rank,
                    transpose,
                },
            ..
        } = instr
        {
            let [Item::Slot(b), Item::Slot(a)] = args.as_slice() else {
                return Err(internal("a low-rank product of computed factors"));
            };
            let factor = |s: usize| lowrank::Factor {
                bytes: inputs[s],
                dtype: dtypes[s],
            };
            let out = lowrank::low_rank(dev, factor(*b), factor(*a), shape, *scale, *rank, *transpose)?;
            stack.push(Item::Dev(out));
            continue;
        }
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
            Instr::Elementwise(op) => {
                let mut it = tensors.into_iter();
                let acc = it
                    .next()
                    .ok_or_else(|| internal("an operation without operands"))?;
                let rest: Vec<Tensor> = it.collect();
                elementwise_op(dev, op, &acc, &rest)?;
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

/// An element-wise op on device tensors (`Elementwise::apply`'s arithmetic through the
/// device's map kernels, in the same order), into `acc`.
fn elementwise_op(dev: &mut Device, op: &Elementwise, acc: &Tensor, rest: &[Tensor]) -> Result<(), GpuError> {
    let p = Params::default();
    match op {
        Elementwise::Neg => dev.map("neg", &[acc], p),
        Elementwise::Round(_) => dev.map(op.name(), &[acc], p),
        Elementwise::Scale(f) => dev.map("scale", &[acc], p.f(&[*f])),
        Elementwise::Divide(d) => dev.map("divide", &[acc], p.f(&[*d])),
        Elementwise::Add => dev.map("add", &[acc, operand(rest, 0)?], p),
        Elementwise::Sub => dev.map("sub", &[acc, operand(rest, 0)?], p),
        Elementwise::WeightedSum { weights, divisor } => {
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
        MethodOp::Gta(g) => gta(dev, g, xs, shape),
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

/// `a − b` as a new tensor.
fn difference(dev: &mut Device, a: &Tensor, b: &Tensor) -> Result<Tensor, GpuError> {
    let out = dev.alloc();
    dev.map("difference", &[a, b, &out], Params::default())?;
    Ok(out)
}
