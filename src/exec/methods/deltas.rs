//! The task-vector methods sce, ram, ramplus_tl and arcee_fusion (reference/mergekit.md 1.8,
//! 1.9, 1.12; one module each), as mergekit 0.1.5 computes them in float32: their shared
//! entry and the chunked decoding of task vectors.
//!
//! Inputs are `[base, m...]` (arcee_fusion `[base, m]`). Task vectors `δ_i = m_i − base` are
//! formed in f32, as mergekit subtracts in the compute dtype. Tensor-wide reductions (sums
//! of squares, counts) accumulate in f64 per [`CHUNK`] and are combined in chunk order, so
//! no result depends on the thread count. Per-element combinations over the models are f32
//! operations in model order with separate multiplies and adds, as torch's elementwise ops
//! and its dim-0 sums over the stacked models are.
//!
//! Where mergekit is fragile we decide, and say so at the place:
//! * sce's top-k over |variance| is the exact radix selection of [`select_top_k`](super::select::select_top_k), ties
//!   going to the lower element index, where mergekit uses `torch.topk` (unspecified order
//!   among equal values);
//! * arcee_fusion's quartiles are exact over the whole importance tensor (mergekit samples
//!   1M elements at random above 1M elements), and its softmax/KL run in f64;
//! * every method returns f32 values; the save dtype decides the stored form (mergekit's
//!   arcee_fusion promotes to f32 through its float mask).

use std::ops::Range;

use super::Inputs;

/// `f` over `inputs` (`[base, m...]`), or the base unchanged when there is no model
/// besides it (mergekit: "if not tensors: return base").
pub(super) fn or_base(inputs: &Inputs, f: impl FnOnce(&Inputs) -> Vec<f32>) -> Vec<f32> {
    if inputs.len() == 1 {
        return inputs.to_f32(0);
    }
    f(inputs)
}

/// One chunk of the base and of the task vectors `δ_i = m_i − base` (f32 subtraction).
pub(super) struct Chunk {
    pub(super) base: Vec<f32>,
    pub(super) deltas: Vec<Vec<f32>>,
}

pub(super) fn decode_deltas(inputs: &Inputs, range: Range<usize>) -> Chunk {
    let len = range.len();
    let mut base = vec![0f32; len];
    inputs.decode(0, range.clone(), &mut base);
    let deltas = (1..inputs.len())
        .map(|i| {
            let mut d = vec![0f32; len];
            inputs.decode(i, range.clone(), &mut d);
            d.iter_mut().zip(&base).for_each(|(x, &b)| *x -= b);
            d
        })
        .collect();
    Chunk { base, deltas }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::{MethodInput, CHUNK};
    use super::*;
    use crate::io::DType;
    use crate::ops::MethodOp;

    /// The method through the one dispatch, unwrapped (tests give it inputs).
    pub(crate) fn apply(op: &MethodOp, inputs: &Inputs) -> Vec<f32> {
        crate::exec::methods::apply(op, crate::ops::Compute::F32, inputs).unwrap()
    }

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Applies `op` to f32 tensors of `shape`.
    pub(crate) fn run(op: &MethodOp, shape: &[usize], tensors: &[Vec<f32>]) -> Vec<f32> {
        let raw: Vec<Vec<u8>> = tensors.iter().map(|t| bytes(t)).collect();
        let ins: Vec<MethodInput> = raw
            .iter()
            .map(|b| MethodInput {
                bytes: b,
                dtype: DType::F32,
            })
            .collect();
        apply(op, &Inputs { tensors: &ins, shape })
    }

    fn all_ops() -> Vec<MethodOp> {
        vec![
            MethodOp::Sce { select_topk: 0.5 },
            MethodOp::Sce { select_topk: 1.0 },
            MethodOp::Ram { epsilon: 1e-5 },
            MethodOp::RamPlusTl {
                r: 0.1,
                alpha: 0.2,
                epsilon: 1e-5,
            },
            MethodOp::ArceeFusion,
        ]
    }

    /// A deterministic pseudo-random sequence in [-1, 1).
    pub(crate) fn noise(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn numel_zero_gives_empty() {
        for op in all_ops() {
            assert!(run(&op, &[0, 4], &[vec![], vec![]]).is_empty());
            assert!(run(&op, &[0], &[vec![], vec![], vec![]]).is_empty());
        }
    }

    #[test]
    fn zero_deltas_give_the_base() {
        let base = noise(1, 40);
        for op in all_ops() {
            let out = run(&op, &[5, 8], &[base.clone(), base.clone(), base.clone()]);
            assert_eq!(out, base, "{op:?}");
            let out = run(&op, &[5, 8], &[base.clone(), base.clone()]);
            assert_eq!(out, base, "{op:?}");
        }
    }

    #[test]
    fn only_the_base_gives_the_base() {
        let base = noise(2, 6);
        for op in all_ops() {
            assert_eq!(run(&op, &[6], std::slice::from_ref(&base)), base);
        }
    }

    #[test]
    fn one_element_tensors() {
        let (b, m) = (vec![0.5f32], vec![0.75f32]);
        for op in all_ops() {
            for shape in [&[1usize][..], &[][..], &[1, 1][..]] {
                let out = run(&op, shape, &[b.clone(), m.clone()]);
                // One model, one element: every method keeps its delta (sce: variance 0,
                // so select_topk 0.5 keeps nothing and gives the base).
                let want = match op {
                    MethodOp::Sce { select_topk } if select_topk < 1.0 => 0.5,
                    _ => 0.75,
                };
                assert_eq!(out, vec![want], "{op:?} {shape:?}");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let shape = [2 * CHUNK / 64 + 1, 64];
        let n = shape[0] * shape[1];
        let base = noise(10, n);
        let mut all = vec![base.clone()];
        for s in 11..14 {
            all.push(noise(s, n).iter().zip(&base).map(|(x, b)| b + x * 1e-3).collect());
        }
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for op in all_ops() {
            let ins: &[Vec<f32>] = if op == MethodOp::ArceeFusion {
                &all[..2]
            } else {
                &all
            };
            let a = one.install(|| run(&op, &shape, ins));
            let b = three.install(|| run(&op, &shape, ins));
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{op:?}"
            );
            assert!(a.iter().all(|x| x.is_finite()), "{op:?}");
        }
    }
}
