//! CPU reference of every whole-tensor merge method ([`MethodOp`]).
//!
//! Inputs stay in their stored form (usually memory-mapped) and are decoded to f32 in
//! chunks as a method needs them; reductions accumulate in f64 in a fixed order, so results
//! never depend on the thread count. Each method returns its f32 result.

pub(crate) mod arcee;
pub(crate) mod chunks;
mod deltas;
pub(crate) mod geometry;
mod gta;
mod half;
mod lowrank;
pub(crate) mod portable;
mod ram;
pub mod rng;
mod sce;
pub mod select;

use std::ops::Range;

use crate::exec::cpu::decode;
use crate::io::DType;
use crate::ops::{Compute, MethodOp};

/// One input tensor as stored.
#[derive(Clone, Copy, Debug)]
pub struct MethodInput<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
}

/// The inputs of one method application: same shape, in the order the op documents.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub tensors: &'a [MethodInput<'a>],
    pub shape: &'a [usize],
}

impl Inputs<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Decodes elements `range` of input `i` into `out` (`out.len() == range.len()`).
    pub fn decode(&self, i: usize, range: Range<usize>, out: &mut [f32]) {
        let t = &self.tensors[i];
        let size = t.dtype.size_bytes();
        decode(&t.bytes[range.start * size..range.end * size], t.dtype, out);
    }

    /// The whole of input `i` as f32.
    pub fn to_f32(&self, i: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.decode(i, 0..self.numel(), &mut out);
        out
    }
}

pub use crate::ops::cost::CHUNK;
use crate::ops::cost::POOL_KEEP;

/// Element types with a per-thread pool of [`Scratch`] buffers.
pub(crate) trait Pooled: Copy + Default + 'static {
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> R;
}

macro_rules! pooled {
    ($t:ty) => {
        impl Pooled for $t {
            fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<$t>>) -> R) -> R {
                thread_local! {
                    static POOL: std::cell::RefCell<Vec<Vec<$t>>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                POOL.with(|p| f(&mut p.borrow_mut()))
            }
        }
    };
}
pooled!(f32);
pooled!(u32);

/// A chunk-sized buffer from this thread's pool, given back when dropped, so the passes
/// over every tensor neither allocate nor zero fresh pages. Its contents are whatever an
/// earlier user left: every user writes before it reads.
pub(crate) struct Scratch<T: Pooled> {
    buf: Vec<T>,
    len: usize,
}

impl<T: Pooled> Scratch<T> {
    pub(crate) fn new(len: usize) -> Scratch<T> {
        let mut buf = T::with_pool(|p| p.pop()).unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, T::default());
        }
        Scratch { buf, len }
    }
}

impl<T: Pooled> std::ops::Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[..self.len]
    }
}

impl<T: Pooled> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[..self.len]
    }
}

impl<T: Pooled> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        T::with_pool(|p| {
            if p.len() < POOL_KEEP {
                p.push(buf);
            }
        });
    }
}

/// What a method refuses: inputs that sema and the plan checker rule out, so any of these
/// is a bug in mergec, reported as one rather than written as made-up values.
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    #[error("`{0}` was given no input tensors (a bug in mergec)")]
    NoInputs(&'static str),
    #[error("`{0}` was given factors of the wrong size (a bug in mergec)")]
    FactorSize(&'static str),
}

/// Computes `op` over `inputs` in `compute`; the result has `inputs.numel()` values. The
/// one dispatch of every method to its CPU reference.
pub fn apply(op: &MethodOp, compute: Compute, inputs: &Inputs) -> Result<Vec<f32>, MethodError> {
    if inputs.numel() == 0 {
        return Ok(Vec::new());
    }
    if inputs.is_empty() {
        return Err(MethodError::NoInputs(op.name()));
    }
    // A LoRA delta is computed in f32 in every compute dtype (as PEFT does on the CPU);
    // sema rounds it where mergekit would.
    if let MethodOp::LowRank {
        scale,
        rank,
        transpose,
    } = op
    {
        return lowrank::apply(*scale, *rank, *transpose, inputs);
    }
    if let Compute::Half(half) = compute {
        return Ok(half::apply(op, half, inputs));
    }
    Ok(match op {
        MethodOp::Slerp { t } => geometry::slerp(*t, inputs),
        MethodOp::Nuslerp {
            weights,
            flatten,
            row_wise,
            with_base,
        } => geometry::nuslerp(*weights, *flatten, *row_wise, *with_base, inputs),
        MethodOp::Multislerp {
            weights,
            normalize_weights,
            eps,
            with_base,
        } => geometry::multislerp(weights, *normalize_weights, *eps, *with_base, inputs),
        MethodOp::Karcher { max_iter, tol } => geometry::karcher(*max_iter, *tol, inputs),
        MethodOp::ModelStock { filter_wise } => geometry::model_stock(*filter_wise, inputs),
        MethodOp::Nearswap { t } => geometry::nearswap(*t, inputs),
        MethodOp::Gta(g) => gta::apply(g, inputs),
        MethodOp::Sce { select_topk } => deltas::or_base(inputs, |i| sce::sce(i, *select_topk)),
        MethodOp::Ram { epsilon } => deltas::or_base(inputs, |i| ram::ram(i, *epsilon, None)),
        MethodOp::RamPlusTl { r, alpha, epsilon } => {
            deltas::or_base(inputs, |i| ram::ram(i, *epsilon, Some((*r, *alpha))))
        }
        MethodOp::ArceeFusion => deltas::or_base(inputs, arcee::arcee_fusion),
        MethodOp::Noise { scale, key } => rng::add_noise(inputs, *scale, *key),
        MethodOp::LowRank { .. } => Vec::new(), // handled above
    })
}
