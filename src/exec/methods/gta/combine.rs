//! The GTA combine pass: per chunk, each model's kept and weighted delta, the sign
//! election when consensus applies, the divisor, and `base + lambda·mixed`.

use rayon::prelude::*;

use super::super::select::abs_key;
use super::super::{Inputs, Scratch, CHUNK};
use super::{keeps, Kept, Mask, Take};

/// Elements per sub-block of the combine pass (a multiple of 64 dividing CHUNK).
pub(super) const SUB: usize = 8192;

/// Pass 2: the merged tensor, chunk by chunk.
pub(super) fn combine(
    inputs: &Inputs,
    consensus: bool,
    weights: &[f32],
    kept: &[Kept],
    normalize: bool,
    lambda: f32,
) -> Vec<f32> {
    let n = inputs.numel();
    let m = kept.len();
    let linear_div = {
        let s = weights.iter().fold(0f32, |s, w| s + w);
        if s.abs() < 1e-8 {
            1.0
        } else {
            s
        }
    };
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || {
            (
                Scratch::<f32>::new(SUB),
                Scratch::<f32>::new(m * SUB),
                Scratch::<f32>::new(SUB),
                Scratch::<f32>::new(SUB),
                vec![0usize; m],
            )
        },
        |(base, wd, sum, div, lefts), (c, chunk_out)| {
            // The equal keys a Take::First chunk still keeps, carried across sub-blocks.
            for (left, kept) in lefts.iter_mut().zip(kept) {
                *left = match &kept.mask {
                    Mask::Top(top) => match top.takes[c] {
                        Take::First(n) => n,
                        _ => 0,
                    },
                    _ => 0,
                };
            }
            // Sub-blocks small enough that the M + 3 working arrays stay in cache; every
            // element still sees the same operations in the same order.
            for (sb, out) in chunk_out.chunks_mut(SUB).enumerate() {
                let start = c * CHUNK + sb * SUB;
                let len = out.len();
                let base = &mut base[..len];
                inputs.decode(0, start..start + len, base);
                for (i, (kept, &w)) in kept.iter().zip(weights).enumerate() {
                    let wd = &mut wd[i * SUB..i * SUB + len];
                    inputs.decode(i + 1, start..start + len, wd);
                    // Branch-free: the kept bit selects between the delta and 0 (a branch on
                    // random mask bits mispredicts half the time).
                    let scale = kept.scale;
                    match &kept.mask {
                        Mask::All => {
                            for (v, b) in wd.iter_mut().zip(base.iter()) {
                                *v = ((*v - *b) * scale) * w;
                            }
                        }
                        Mask::Bits(bits) => {
                            // SUB is a multiple of 64, so a sub-block starts on a word boundary.
                            let words = &bits[start / 64..];
                            for (j, (v, b)) in wd.iter_mut().zip(base.iter()).enumerate() {
                                let keep = (words[j / 64] >> (j % 64)) & 1 == 1;
                                let d = (*v - *b) * scale;
                                *v = if keep { d } else { 0.0 } * w;
                            }
                        }
                        Mask::Top(top) => {
                            let t = top.threshold;
                            match top.takes[c] {
                                Take::All => {
                                    for (v, b) in wd.iter_mut().zip(base.iter()) {
                                        let d = *v - *b;
                                        let keep = abs_key(d) >= t;
                                        *v = if keep { d * scale } else { 0.0 } * w;
                                    }
                                }
                                Take::None => {
                                    for (v, b) in wd.iter_mut().zip(base.iter()) {
                                        let d = *v - *b;
                                        let keep = abs_key(d) > t;
                                        *v = if keep { d * scale } else { 0.0 } * w;
                                    }
                                }
                                take @ Take::First(_) => {
                                    let left = &mut lefts[i];
                                    for (v, b) in wd.iter_mut().zip(base.iter()) {
                                        let d = *v - *b;
                                        let keep = keeps(abs_key(d), t, take, left);
                                        *v = if keep { d * scale } else { 0.0 } * w;
                                    }
                                }
                            }
                        }
                    }
                }
                // Model by model over the whole chunk, so each loop is straight-line and
                // vectorises; per element, the models are still added in model order.
                let mixed = out;
                let wd_of = |i: usize| &wd[i * SUB..i * SUB + len];
                mixed.fill(0.0);
                if consensus {
                    let sum = &mut sum[..len];
                    sum.fill(0.0);
                    for i in 0..m {
                        sum.iter_mut().zip(wd_of(i)).for_each(|(s, v)| *s += *v);
                    }
                    let div = &mut div[..len];
                    div.fill(0.0);
                    for (i, &w) in weights.iter().enumerate() {
                        for ((x, d), (v, s)) in mixed
                            .iter_mut()
                            .zip(div.iter_mut())
                            .zip(wd_of(i).iter().zip(sum.iter()))
                        {
                            let agrees = if *s >= 0.0 { *v > 0.0 } else { *v < 0.0 };
                            *x += if agrees { *v } else { 0.0 };
                            *d += if agrees { w } else { 0.0 };
                        }
                    }
                    if normalize {
                        mixed
                            .iter_mut()
                            .zip(div.iter())
                            .for_each(|(x, d)| *x /= if *d == 0.0 { 1.0 } else { *d });
                    }
                } else {
                    for i in 0..m {
                        mixed.iter_mut().zip(wd_of(i)).for_each(|(x, v)| *x += *v);
                    }
                    if normalize {
                        mixed.iter_mut().for_each(|x| *x /= linear_div);
                    }
                }
                if lambda != 1.0 {
                    mixed.iter_mut().for_each(|x| *x *= lambda);
                }
                mixed.iter_mut().zip(base.iter()).for_each(|(x, b)| *x += *b);
            }
        },
    );
    out
}
