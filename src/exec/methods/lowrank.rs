//! The CPU run of the LoRA product ([`crate::ops::lowrank`]): both factors decoded to
//! f32 once, then the output rows in parallel, each summed as the op defines.

use rayon::prelude::*;

use super::{Inputs, MethodError};
use crate::ops::lowrank;

/// `scale·(B·A)` (or its transpose) for inputs `[b, a]`, with the result's shape.
pub(super) fn apply(
    scale: f64,
    rank: usize,
    transpose: bool,
    inputs: &Inputs,
) -> Result<Vec<f32>, MethodError> {
    let Some(([p, _], [_, q])) = lowrank::factor_shapes(inputs.shape, rank, transpose) else {
        return Err(MethodError::FactorSize("low_rank"));
    };
    let decode = |i: usize, n: usize| -> Result<Vec<f32>, MethodError> {
        let t = inputs.tensors.get(i).ok_or(MethodError::FactorSize("low_rank"))?;
        if t.bytes.len() != n * t.dtype.size_bytes() {
            return Err(MethodError::FactorSize("low_rank"));
        }
        let mut out = vec![0f32; n];
        crate::exec::cpu::decode(t.bytes, t.dtype, &mut out);
        Ok(out)
    };
    let b = decode(0, p * rank)?;
    let a = decode(1, rank * q)?;
    let cols = inputs.shape[1];
    let mut out = vec![0f32; inputs.numel()];
    if cols == 0 {
        return Ok(out);
    }
    let scale = scale as f32;
    out.par_chunks_mut(cols)
        .enumerate()
        .for_each(|(i, row)| lowrank::row(&b, &a, p, rank, q, scale, transpose, i, row));
    Ok(out)
}
