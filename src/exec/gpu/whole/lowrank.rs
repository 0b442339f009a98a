//! The LoRA product on the GPU: the twin of `exec::methods::lowrank`. Both factors are
//! decoded on the host (they are small: rank × (rows + columns)) and bound whole; each
//! chunk of the result is one dispatch of `low_rank` (shaders/lowrank.wgsl).

use super::super::device::{Device, Params, Tensor};
use super::super::GpuError;
use crate::io::DType;
use crate::ops::lowrank::factor_shapes;

/// A factor as stored.
pub(super) struct Factor<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
}

/// `scale·(B·A)` (or its transpose) with the result's `shape`, as a new device tensor.
pub(super) fn low_rank(
    dev: &mut Device,
    b: Factor,
    a: Factor,
    shape: &[usize],
    scale: f64,
    rank: usize,
    transpose: bool,
) -> Result<Tensor, GpuError> {
    let Some(([p, _], [_, q])) = factor_shapes(shape, rank, transpose) else {
        return Err(GpuError::Unsupported(
            "a low-rank product that is not a matrix".to_string(),
        ));
    };
    let decode = |f: &Factor, n: usize| -> Result<Vec<f32>, GpuError> {
        if f.bytes.len() != n * f.dtype.size_bytes() {
            return Err(GpuError::InputSize {
                slot: 0,
                expected: (n * f.dtype.size_bytes()) as u64,
                got: f.bytes.len() as u64,
            });
        }
        if n > dev.cap {
            return Err(GpuError::Unsupported(format!(
                "a LoRA factor of {n} elements does not fit one storage binding"
            )));
        }
        let mut out = vec![0f32; n];
        crate::exec::cpu::decode(f.bytes, f.dtype, &mut out);
        Ok(out)
    };
    let b = decode(&b, p * rank)?;
    let a = decode(&a, rank * q)?;
    let out = dev.alloc();
    if dev.n == 0 {
        return Ok(out);
    }
    let (b, a) = (dev.small(&b), dev.small(&a));
    let cols = shape[1] as u32;
    let params = Params::default()
        .u(&[p as u32, rank as u32, q as u32, u32::from(transpose), cols])
        .f(&[scale as f32]);
    for (c, (lo, hi)) in dev.ranges().into_iter().enumerate() {
        dev.dispatch(
            "low_rank",
            &[&b, &a, &out.chunks[c]],
            params.over(lo, hi),
            (hi - lo) as u64,
        )?;
    }
    dev.give_small(b);
    dev.give_small(a);
    Ok(out)
}
