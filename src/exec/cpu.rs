//! The CPU executor: the numerical reference for every kernel, and the fallback when no
//! GPU is present. Each fused kernel runs chunk by chunk on all cores (rayon); inputs are
//! decoded to f32, the program runs on chunk-sized buffers, and the result is rounded once
//! (round-to-nearest-even) into the output dtype.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::exec::methods::MethodError;
use crate::io::DType;
use crate::ops::Elementwise;
use crate::plan::{Instr, Kernel, Step};

pub struct CpuExecutor {
    pool: rayon::ThreadPool,
    chunk: usize,
}

impl CpuExecutor {
    pub fn new(threads: usize, chunk_elems: usize) -> Result<CpuExecutor, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("mergec-cpu-{i}"))
            .build()?;
        Ok(CpuExecutor {
            pool,
            chunk: chunk_elems.max(1),
        })
    }

    /// Computes `step` over `inputs` (raw bytes, one per input slot) into its output bytes.
    /// Fails only on what the plan checker rules out (a bug in mergec).
    pub fn compute(&self, step: &Step, inputs: &[&[u8]]) -> Result<Vec<u8>, MethodError> {
        let in_dtypes: Vec<DType> = step.inputs.iter().map(|i| i.dtype).collect();
        let out_size = step.dtype.size_bytes();
        let mut out = vec![0u8; step.out_bytes() as usize];
        let program = match &step.kernel {
            Kernel::Fused(program) => program,
            Kernel::Whole(program) => {
                let values = self
                    .pool
                    .install(|| whole::run(program, inputs, &in_dtypes, &step.shape))?;
                self.pool.install(|| {
                    out.par_chunks_mut(self.chunk * out_size)
                        .zip(values.par_chunks(self.chunk))
                        .for_each(|(o, v)| encode(v, step.dtype, o));
                });
                return Ok(out);
            }
            Kernel::Copy => {
                // Copies normally go straight to the writer; this keeps the executor total.
                if let Some(first) = inputs.first() {
                    let n = out.len().min(first.len());
                    out[..n].copy_from_slice(&first[..n]);
                }
                return Ok(out);
            }
        };
        let chunk = self.chunk;
        self.pool.install(|| {
            out.par_chunks_mut(chunk * out_size).enumerate().for_each_init(
                Scratch::default,
                |scratch, (ci, out_chunk)| {
                    let start = ci * chunk;
                    let n = out_chunk.len() / out_size;
                    let top = scratch.run(program, inputs, &in_dtypes, start, n);
                    encode(&scratch.bufs[top][..n], step.dtype, out_chunk);
                },
            );
        });
        Ok(out)
    }
}

/// Per-worker chunk buffers, reused across chunks.
#[derive(Default)]
struct Scratch {
    bufs: Vec<Vec<f32>>,
    free: Vec<usize>,
    stack: Vec<usize>,
}

impl Scratch {
    fn take(&mut self, n: usize) -> usize {
        let i = self.free.pop().unwrap_or_else(|| {
            self.bufs.push(Vec::new());
            self.bufs.len() - 1
        });
        self.bufs[i].resize(n, 0.0);
        i
    }

    /// Runs `program` on elements `start..start + n`; returns the buffer holding the result.
    fn run(
        &mut self,
        program: &[Instr],
        inputs: &[&[u8]],
        dtypes: &[DType],
        start: usize,
        n: usize,
    ) -> usize {
        self.free = (0..self.bufs.len()).collect();
        self.stack.clear();
        for instr in program {
            match instr {
                Instr::Load(slot) => {
                    let b = self.take(n);
                    let size = dtypes[*slot].size_bytes();
                    decode(
                        &inputs[*slot][start * size..(start + n) * size],
                        dtypes[*slot],
                        &mut self.bufs[b],
                    );
                    self.stack.push(b);
                }
                Instr::Elementwise(op) => self.elementwise(op),
                // Fused kernels hold no methods (plan::kernel puts those in Whole kernels).
                Instr::Method { .. } => {}
            }
        }
        self.stack.last().copied().unwrap_or(0)
    }

    /// Pops the op's operands, computes it into the first one's buffer and pushes that.
    fn elementwise(&mut self, op: &Elementwise) {
        let k = op.arity();
        if k == 0 || self.stack.len() < k {
            return; // plan::check rules this out
        }
        let operands = self.stack.split_off(self.stack.len() - k);
        let acc = operands[0];
        let mut values = std::mem::take(&mut self.bufs[acc]);
        let rest: Vec<&[f32]> = operands[1..].iter().map(|&b| self.bufs[b].as_slice()).collect();
        op.apply(&mut values, &rest);
        self.bufs[acc] = values;
        self.free.extend_from_slice(&operands[1..]);
        self.stack.push(acc);
    }
}

/// Kernels with whole-tensor methods: a stack machine over whole tensors. Inputs stay in
/// their stored bytes until an operation needs them decoded; methods read them directly.
mod whole {
    use rayon::prelude::*;

    use super::decode;
    use crate::exec::methods::{self, Inputs, MethodError, MethodInput};
    use crate::io::DType;
    use crate::plan::Instr;

    enum Item {
        Slot(usize),
        Values(Vec<f32>),
    }

    pub(super) fn run(
        program: &[Instr],
        inputs: &[&[u8]],
        dtypes: &[DType],
        shape: &[usize],
    ) -> Result<Vec<f32>, MethodError> {
        let numel: usize = shape.iter().product();
        let values = |item: Item| -> Vec<f32> {
            match item {
                Item::Values(v) => v,
                Item::Slot(s) => {
                    let mut v = vec![0f32; numel];
                    let size = dtypes[s].size_bytes();
                    v.par_chunks_mut(methods::CHUNK)
                        .zip(inputs[s].par_chunks(methods::CHUNK * size))
                        .for_each(|(o, b)| decode(b, dtypes[s], o));
                    v
                }
            }
        };
        let mut stack: Vec<Item> = Vec::new();
        for instr in program {
            let (pops, _) = instr.stack_effect();
            if stack.len() < pops {
                break; // plan::check rules this out
            }
            let mut args: Vec<Item> = stack.split_off(stack.len() - pops);
            let result = match instr {
                Instr::Load(slot) => Item::Slot(*slot),
                Instr::Method { op, compute, .. } => {
                    // Computed operands are handed over as little-endian f32 bytes.
                    let owned: Vec<Option<Vec<u8>>> = args
                        .iter()
                        .map(|a| match a {
                            Item::Values(v) => Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                            Item::Slot(_) => None,
                        })
                        .collect();
                    let tensors: Vec<MethodInput> = args
                        .iter()
                        .zip(&owned)
                        .map(|(a, o)| match (a, o) {
                            (Item::Slot(s), _) => MethodInput {
                                bytes: inputs[*s],
                                dtype: dtypes[*s],
                            },
                            (_, Some(bytes)) => MethodInput {
                                bytes,
                                dtype: DType::F32,
                            },
                            (_, None) => MethodInput {
                                bytes: &[],
                                dtype: DType::F32,
                            },
                        })
                        .collect();
                    Item::Values(methods::apply(
                        op,
                        *compute,
                        &Inputs {
                            tensors: &tensors,
                            shape,
                        },
                    )?)
                }
                Instr::Elementwise(op) => {
                    let mut bufs: Vec<Vec<f32>> = args.drain(..).map(&values).collect();
                    let mut acc = bufs.remove(0);
                    // The op chunk by chunk in parallel: the same arithmetic per element.
                    acc.par_chunks_mut(methods::CHUNK)
                        .enumerate()
                        .for_each(|(c, part)| {
                            let start = c * methods::CHUNK;
                            let rest: Vec<&[f32]> =
                                bufs.iter().map(|b| &b[start..start + part.len()]).collect();
                            op.apply(part, &rest);
                        });
                    Item::Values(acc)
                }
            };
            stack.push(result);
        }
        Ok(stack.pop().map(values).unwrap_or_default())
    }
}

/// Little-endian storage -> f32.
pub fn decode(bytes: &[u8], dtype: DType, out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        // sema only lets float tensors into arithmetic.
        _ => out.iter_mut().for_each(|o| *o = f32::NAN),
    }
}

/// f32 -> little-endian storage, rounding to nearest even.
pub fn encode(values: &[f32], dtype: DType, out: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::BF16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        DType::F16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values; even mantissa wins (1.0).
        let mut out = [0u8; 2];
        encode(&[1.0 + 2f32.powi(-8)], DType::BF16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f80);
        // 1 + 3·2^-8 lies between 1+2^-7 (odd) and 1+2^-6 (even): rounds up to even.
        encode(&[1.0 + 3.0 * 2f32.powi(-8)], DType::BF16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f82);
        let mut back = [0f32; 1];
        decode(&out, DType::BF16, &mut back);
        assert_eq!(back[0], 1.0 + 2f32.powi(-6));
    }

    #[test]
    fn specials_survive_a_round_trip() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let values = [0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, 1.5, -2.25];
            let mut bytes = vec![0u8; values.len() * dtype.size_bytes()];
            encode(&values, dtype, &mut bytes);
            let mut back = vec![0f32; values.len()];
            decode(&bytes, dtype, &mut back);
            for (a, b) in values.iter().zip(&back) {
                assert_eq!(a.to_bits(), b.to_bits(), "{dtype}");
            }
            let mut nan = vec![0u8; dtype.size_bytes()];
            encode(&[f32::NAN], dtype, &mut nan);
            let mut back = [0f32];
            decode(&nan, dtype, &mut back);
            assert!(back[0].is_nan(), "{dtype}");
        }
    }
}
