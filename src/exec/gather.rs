//! Computes an [`ops::gather::Gather`](crate::ops::gather::Gather): the rows of an input's
//! vocabulary tensor in the output vocabulary's order. Copied rows are byte copies (exact);
//! a mean is summed in the given order and divided, each step rounded to the dtype (as
//! mergekit computes it in the tensors' dtype); padding rows are the mean of the token rows
//! (accumulated in f64, rounded once).

use super::cpu::{decode, encode};
use crate::io::vocab::Row;
use crate::io::DType;
use crate::ops::gather::Gather;

/// Rounds `x` to what `dtype` holds.
fn round(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// The gathered tensor's bytes; `sources[i]` are the bytes of `g.sources[i]`. A source
/// too short for a row it is asked for yields `Err` with its index.
pub fn gather(g: &Gather, sources: &[&[u8]]) -> Result<Vec<u8>, usize> {
    let dtype = g.dtype();
    let size = dtype.size_bytes();
    let w = g.width;
    let mut out = vec![0u8; g.plan.len() * w * size];
    let mut row_f32 = vec![0f32; w];
    let mut acc = vec![0f32; w];
    let read = |src: u32, row: u32, buf: &mut [f32]| -> Result<(), usize> {
        let s = src as usize;
        let (_, _, d) = g.sources.get(s).ok_or(s)?;
        let bytes = sources.get(s).ok_or(s)?;
        let start = row as usize * w * d.size_bytes();
        let part = bytes.get(start..start + w * d.size_bytes()).ok_or(s)?;
        decode(part, *d, buf);
        Ok(())
    };
    for (i, r) in g.plan.rows.iter().enumerate() {
        let dst = &mut out[i * w * size..(i + 1) * w * size];
        match r {
            Row::Copy { src, row } if g.sources.get(*src as usize).is_some_and(|s| s.2 == dtype) => {
                let s = *src as usize;
                let start = *row as usize * w * size;
                let part = sources
                    .get(s)
                    .and_then(|b| b.get(start..start + w * size))
                    .ok_or(s)?;
                dst.copy_from_slice(part);
            }
            Row::Copy { src, row } => {
                read(*src, *row, &mut row_f32)?;
                encode(&row_f32, dtype, dst);
            }
            Row::Mean(terms) => {
                acc.iter_mut().for_each(|a| *a = 0.0);
                for (src, row) in terms {
                    read(*src, *row, &mut row_f32)?;
                    for (a, x) in acc.iter_mut().zip(&row_f32) {
                        *a = round(*a + x, dtype);
                    }
                }
                let n = terms.len().max(1) as f32;
                for a in acc.iter_mut() {
                    *a = round(*a / n, dtype);
                }
                encode(&acc, dtype, dst);
            }
            Row::Zero => encode(&vec![0f32; w], dtype, dst),
        }
    }
    if g.plan.pad > 0 {
        let n = g.plan.rows.len();
        let mut sum = vec![0f64; w];
        for i in 0..n {
            decode(&out[i * w * size..(i + 1) * w * size], dtype, &mut row_f32);
            sum.iter_mut().zip(&row_f32).for_each(|(s, x)| *s += *x as f64);
        }
        let mean: Vec<f32> = sum.iter().map(|s| (s / n.max(1) as f64) as f32).collect();
        for i in n..g.plan.len() {
            encode(&mean, dtype, &mut out[i * w * size..(i + 1) * w * size]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ids::ModelId;
    use crate::io::vocab::RowPlan;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn copies_means_zeros_and_pads() {
        let a = f32s(&[1.0, 2.0, 3.0, 4.0]);
        let b = f32s(&[10.0, 20.0, 30.0, 40.0]);
        let g = Gather {
            sources: vec![
                (ModelId(0), "e".into(), DType::F32),
                (ModelId(1), "e".into(), DType::F32),
            ],
            own: 0,
            plan: Arc::new(RowPlan {
                rows: vec![
                    Row::Copy { src: 0, row: 1 },
                    Row::Mean(vec![(0, 0), (1, 1)]),
                    Row::Zero,
                ],
                pad: 1,
            }),
            width: 2,
        };
        let out = gather(&g, &[&a, &b]).unwrap();
        let v: Vec<f32> = out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&v[..6], &[3.0, 4.0, 15.5, 21.0, 0.0, 0.0]);
        assert_eq!(&v[6..], &[18.5 / 3.0, 25.0 / 3.0]);
        // a row past a source's end is an error naming the source
        let bad = Gather {
            plan: Arc::new(RowPlan {
                rows: vec![Row::Copy { src: 1, row: 9 }],
                pad: 0,
            }),
            ..g
        };
        assert_eq!(gather(&bad, &[&a, &b]), Err(1));
    }
}
