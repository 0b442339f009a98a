//! mergekit's arithmetic in a 16-bit compute dtype (`compute: bf16 | f16`), method by
//! method as mergekit 0.1.5 runs it on torch's CPU backend.
//!
//! The f32 methods in the parent module are written for accuracy and bounded memory
//! (streamed chunks, f64 reductions). These are written for fidelity instead: each
//! follows mergekit's code op for op, with torch's rules for 16-bit tensors:
//! * inputs are cast to the compute dtype first ([`cast`]);
//! * an element-wise op computes in f32 and rounds its result ([`Torch::r`]);
//! * a Python float meeting a 16-bit tensor stays an f32 scalar (torch's "opmath"), while
//!   a parameter mergekit turns into a tensor of the compute dtype is rounded to it;
//! * reductions (sum, mean, norm, dot) accumulate in f32 and round their result.
//!
//! Each works on whole tensors held as f32 vectors whose values are all representable in
//! the compute dtype; `ops::cost` bounds their memory.

mod geometry;
mod gta;
mod select;
mod torch;

pub(crate) use torch::Torch;

use super::{Inputs, MethodInput};
use crate::exec::cpu::encode;
use crate::ops::{Compute, Half, MethodOp};

/// `op` over `inputs` in compute dtype `half`; the result's values are all values of
/// `half`. `inputs` is non-empty and its tensors non-empty (`methods::apply` checks).
pub(super) fn apply(op: &MethodOp, half: Half, inputs: &Inputs) -> Vec<f32> {
    let cast = cast(half, inputs);
    let tensors: Vec<MethodInput> = cast
        .iter()
        .zip(inputs.tensors)
        .map(|(bytes, t)| match bytes {
            Some(b) => MethodInput {
                bytes: b,
                dtype: half.dtype(),
            },
            None => *t,
        })
        .collect();
    let inputs = Inputs {
        tensors: &tensors,
        shape: inputs.shape,
    };
    let t = Torch::new(half);
    match op {
        // mergekit's slerp computes in f32 from the cast inputs and rounds once; the MoE
        // builder's noise is added the same way.
        MethodOp::Slerp { .. } | MethodOp::Noise { .. } => in_f32(op, &t, &inputs),
        // `methods::apply` computes the LoRA product in f32 before it gets here.
        MethodOp::LowRank { .. } => in_f32(op, &t, &inputs),
        MethodOp::Nuslerp { .. }
        | MethodOp::Multislerp { .. }
        | MethodOp::Karcher { .. }
        | MethodOp::ModelStock { .. }
        | MethodOp::Nearswap { .. } => geometry::apply(op, &t, &inputs),
        MethodOp::Gta(g) => gta::apply(g, &t, &inputs),
        MethodOp::Sce { .. } | MethodOp::Ram { .. } | MethodOp::RamPlusTl { .. } | MethodOp::ArceeFusion => {
            select::apply(op, &t, &inputs)
        }
    }
}

/// The f32 method over the cast inputs, its result rounded once.
fn in_f32(op: &MethodOp, t: &Torch, inputs: &Inputs) -> Vec<f32> {
    // `apply` only fails on empty inputs, which the caller has ruled out.
    let mut out = super::apply(op, Compute::F32, inputs).unwrap_or_default();
    t.round_all(&mut out);
    out
}

/// Each input re-encoded in the compute dtype, or `None` where it is stored in it already.
fn cast(half: Half, inputs: &Inputs) -> Vec<Option<Vec<u8>>> {
    (0..inputs.len())
        .map(|i| {
            if half.represents(inputs.tensors[i].dtype) {
                return None;
            }
            let values = inputs.to_f32(i);
            let mut bytes = vec![0u8; values.len() * half.dtype().size_bytes()];
            encode(&values, half.dtype(), &mut bytes);
            Some(bytes)
        })
        .collect()
}
