//! ram and ramplus_tl on the GPU: the twin of `exec::methods::ram`.

use super::super::device::{Device, Params, Tensor};
use super::super::GpuError;

/// Inputs `[base, m...]`: methods/ram.rs `ram`, one model per pass.
pub(super) fn ram(
    dev: &mut Device,
    epsilon: f64,
    plus: Option<(f64, f64)>,
    xs: &[Tensor],
) -> Result<Tensor, GpuError> {
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
            let seg = super::super::device::SEGMENT as usize;
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
