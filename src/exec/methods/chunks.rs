//! The chunked passes over a method's inputs: chunk ranges (elements `c·CHUNK ..` of a
//! tensor), per-thread pools of decoded blocks, and the reductions (dot products per
//! vector, per-chunk partial sums) that run chunks in parallel and combine their sums in
//! chunk order, so no result depends on the thread count.

use std::ops::Range;

use rayon::prelude::*;

use super::{Inputs, CHUNK};

/// How many chunks cover `n` elements.
pub(crate) fn num_chunks(n: usize) -> usize {
    n.div_ceil(CHUNK)
}

/// The elements of chunk `c` of a tensor of `n` elements.
pub(crate) fn chunk_range(c: usize, n: usize) -> Range<usize> {
    chunk_range_of(c, n, CHUNK)
}

/// The elements of chunk `c` of `n` elements in chunks of `len` (the last may be shorter).
pub(crate) fn chunk_range_of(c: usize, n: usize, len: usize) -> Range<usize> {
    let start = c * len;
    start..n.min(start + len)
}

/// How a tensor splits into the vectors a method normalises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// The whole flattened tensor is one vector.
    Flat,
    /// Vectors along the last dim: element `e` belongs to vector `e / len`.
    Rows(usize),
    /// Vectors along dim 0 (`len = shape[0]`): element `e` belongs to vector `e % inner`.
    Cols { len: usize, inner: usize },
}

impl Layout {
    /// Vectors along the last dim; a 1-D (or 0-D) tensor is one vector.
    pub(crate) fn rows(shape: &[usize], numel: usize) -> Layout {
        match shape {
            [.., last] if *last > 0 && shape.len() >= 2 => Layout::Rows(*last),
            _ => Layout::Rows(numel.max(1)),
        }
    }

    /// Vectors along dim 0 (mergekit's `transpose(0, -1)`); a no-op transpose for 1-D.
    pub(crate) fn cols(shape: &[usize], numel: usize) -> Layout {
        match shape {
            [first, _, ..] if *first > 0 => Layout::Cols {
                len: *first,
                inner: numel / *first,
            },
            _ => Layout::Rows(numel.max(1)),
        }
    }

    pub(super) fn vector_of(self, e: usize) -> usize {
        match self {
            Layout::Flat => 0,
            Layout::Rows(len) => e / len.max(1),
            Layout::Cols { inner, .. } => e % inner.max(1),
        }
    }
}

/// Decoded values of one element range: `base` is input 0 when task vectors were asked
/// for, and `xs` the other inputs minus it (else `xs` is every input as stored).
#[derive(Default)]
pub(super) struct Block {
    pub(super) base: Vec<f32>,
    pub(super) xs: Vec<Vec<f32>>,
}

thread_local! {
    /// Blocks a thread has used, so a pass over a tensor does not allocate (and zero) new
    /// buffers chunk after chunk.
    static BLOCKS: std::cell::RefCell<Vec<Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A [`Block`] from this thread's pool, returned to it when dropped.
pub(super) struct PooledBlock(Block);

impl std::ops::Deref for PooledBlock {
    type Target = Block;
    fn deref(&self) -> &Block {
        &self.0
    }
}

impl Drop for PooledBlock {
    fn drop(&mut self) {
        let block = std::mem::take(&mut self.0);
        BLOCKS.with(|b| {
            let mut pool = b.borrow_mut();
            if pool.len() < 4 {
                pool.push(block);
            }
        });
    }
}

impl Block {
    /// Every value of the block is written by `fill` before anyone reads it.
    pub(super) fn load(inputs: &Inputs, range: Range<usize>, task_vectors: bool) -> PooledBlock {
        let mut block = BLOCKS.with(|b| b.borrow_mut().pop()).unwrap_or_default();
        block.fill(inputs, range, task_vectors);
        PooledBlock(block)
    }

    pub(super) fn fill(&mut self, inputs: &Inputs, range: Range<usize>, task_vectors: bool) {
        let n = range.len();
        let first = usize::from(task_vectors);
        let models = inputs.len().saturating_sub(first);
        if task_vectors {
            self.base.resize(n, 0.0);
            inputs.decode(0, range.clone(), &mut self.base);
        }
        self.xs.resize_with(models, Vec::new);
        for (k, x) in self.xs.iter_mut().enumerate() {
            x.resize(n, 0.0);
            inputs.decode(first + k, range.clone(), x);
            if task_vectors {
                for (v, b) in x.iter_mut().zip(&self.base) {
                    *v -= *b;
                }
            }
        }
    }
}

/// Runs `f` on every chunk (in parallel) with `p` zeroed accumulators each, and sums the
/// chunks' accumulators in chunk order.
pub(super) fn reduce_chunks<F>(numel: usize, p: usize, f: F) -> Vec<f64>
where
    F: Fn(Range<usize>, &mut [f64]) + Sync + Send,
{
    let partials: Vec<Vec<f64>> = (0..numel.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0.0f64; p];
            f(chunk_range(c, numel), &mut acc);
            acc
        })
        .collect();
    sum_in_chunk_order(&partials, p)
}

/// The element-wise sum of the chunks' `p` accumulators, added in chunk order.
fn sum_in_chunk_order(partials: &[Vec<f64>], p: usize) -> Vec<f64> {
    let mut total = vec![0.0f64; p];
    for part in partials {
        for (t, v) in total.iter_mut().zip(part) {
            *t += *v;
        }
    }
    total
}

/// Writes the output chunk by chunk (in parallel): `f(range, out)`.
pub(super) fn map_chunks<F>(numel: usize, f: F) -> Vec<f32>
where
    F: Fn(Range<usize>, &mut [f32]) + Sync + Send,
{
    let mut out = vec![0f32; numel];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let start = c * CHUNK;
        f(start..start + o.len(), o);
    });
    out
}

/// Like [`map_chunks`] over an existing buffer, also summing `f`'s `p` per-chunk
/// accumulators in chunk order.
pub(super) fn update_chunks<F>(buf: &mut [f32], p: usize, f: F) -> Vec<f64>
where
    F: Fn(Range<usize>, &mut [f32], &mut [f64]) + Sync + Send,
{
    let partials: Vec<Vec<f64>> = buf
        .par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(c, o)| {
            let mut acc = vec![0.0f64; p];
            let start = c * CHUNK;
            f(start..start + o.len(), o, &mut acc);
            acc
        })
        .collect();
    sum_in_chunk_order(&partials, p)
}

/// `acc[q] += Σ_{e in local} xs[i][e]·xs[j][e]` for each `pairs[q] = (i, j)`, element by
/// element in order. Up to three sums share one loop: each keeps its own order of
/// additions, and their independent chains overlap instead of waiting on each other.
pub(super) fn accumulate(xs: &[Vec<f32>], pairs: &[(usize, usize)], local: Range<usize>, acc: &mut [f64]) {
    let mut sums: Vec<(&mut f64, &[f32], &[f32])> = acc
        .iter_mut()
        .zip(pairs)
        .filter_map(|(a, &(i, j))| {
            let x = xs.get(i)?.get(local.clone())?;
            let y = xs.get(j)?.get(local.clone())?;
            Some((a, x, y))
        })
        .collect();
    for group in sums.chunks_mut(3) {
        match group {
            [(a, x, y)] => {
                let mut s = **a;
                for (u, v) in x.iter().zip(y.iter()) {
                    s += f64::from(*u) * f64::from(*v);
                }
                **a = s;
            }
            [(a, x0, y0), (b, x1, y1)] => {
                let (mut s, mut t) = (**a, **b);
                for (((u0, v0), u1), v1) in x0.iter().zip(y0.iter()).zip(x1.iter()).zip(y1.iter()) {
                    s += f64::from(*u0) * f64::from(*v0);
                    t += f64::from(*u1) * f64::from(*v1);
                }
                (**a, **b) = (s, t);
            }
            [(a, x0, y0), (b, x1, y1), (c, x2, y2)] => {
                let (mut s, mut t, mut r) = (**a, **b, **c);
                let n = x0
                    .len()
                    .min(y0.len())
                    .min(x1.len())
                    .min(y1.len())
                    .min(x2.len())
                    .min(y2.len());
                for e in 0..n {
                    s += f64::from(x0[e]) * f64::from(y0[e]);
                    t += f64::from(x1[e]) * f64::from(y1[e]);
                    r += f64::from(x2[e]) * f64::from(y2[e]);
                }
                (**a, **b, **c) = (s, t, r);
            }
            _ => {}
        }
    }
}

/// Per vector of `layout`, the sums `Σ x_i·x_j` for each of `pairs`, where the `x` are the
/// inputs (minus input 0 when `task_vectors`). Vector-major: `nvec × pairs.len()` values.
pub(super) fn vector_sums(
    inputs: &Inputs,
    layout: Layout,
    task_vectors: bool,
    pairs: &[(usize, usize)],
) -> Vec<f64> {
    let numel = inputs.numel();
    let p = pairs.len();
    match layout {
        Layout::Flat => reduce_chunks(numel, p, |range, acc| {
            let block = Block::load(inputs, range.clone(), task_vectors);
            accumulate(&block.xs, pairs, 0..range.len(), acc);
        }),
        Layout::Rows(len) => {
            let len = len.max(1);
            let nrows = numel / len;
            let per_block = (CHUNK / len).max(1);
            let blocks: Vec<Vec<f64>> = (0..nrows.div_ceil(per_block))
                .into_par_iter()
                .map(|bi| {
                    let r0 = bi * per_block;
                    let r1 = (r0 + per_block).min(nrows);
                    let mut acc = vec![0.0f64; (r1 - r0) * p];
                    let mut block = Block::default();
                    let (start, end) = (r0 * len, r1 * len);
                    let mut pos = start;
                    while pos < end {
                        let seg_end = (pos + CHUNK).min(end);
                        block.fill(inputs, pos..seg_end, task_vectors);
                        let mut e = pos;
                        while e < seg_end {
                            let row = e / len;
                            let row_end = ((row + 1) * len).min(seg_end);
                            let at = (row - r0) * p;
                            accumulate(&block.xs, pairs, e - pos..row_end - pos, &mut acc[at..at + p]);
                            e = row_end;
                        }
                        pos = seg_end;
                    }
                    acc
                })
                .collect();
            blocks.concat()
        }
        Layout::Cols { len, inner } => {
            const WIDTH: usize = 256;
            let blocks: Vec<Vec<f64>> = (0..inner.div_ceil(WIDTH))
                .into_par_iter()
                .map(|bi| {
                    let c0 = bi * WIDTH;
                    let c1 = (c0 + WIDTH).min(inner);
                    let mut acc = vec![0.0f64; (c1 - c0) * p];
                    let mut block = Block::default();
                    for r in 0..len {
                        block.fill(inputs, r * inner + c0..r * inner + c1, task_vectors);
                        for k in 0..c1 - c0 {
                            accumulate(&block.xs, pairs, k..k + 1, &mut acc[k * p..(k + 1) * p]);
                        }
                    }
                    acc
                })
                .collect();
            blocks.concat()
        }
    }
}

/// A copy of input `i` as f32 (mergekit returns a lone input unchanged).
pub(super) fn copy_of(inputs: &Inputs, i: usize) -> Vec<f32> {
    if i < inputs.len() {
        map_chunks(inputs.numel(), |range, o| inputs.decode(i, range, o))
    } else {
        vec![f32::NAN; inputs.numel()]
    }
}

pub(super) fn norms_pairs(m: usize) -> Vec<(usize, usize)> {
    (0..m).map(|i| (i, i)).collect()
}
