//! Rotary position embeddings and causal grouped-query attention of one prompt.

use super::matmul::dot;
use crate::io::decoder_config::{Rope, RopeScaling};

/// Cosines and sines of the rotary angles, `[positions, head_dim/2]` each.
#[derive(Clone, Debug)]
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// The inverse frequencies `theta^(-2i/head_dim)`, `i < head_dim/2`, rescaled as the
    /// scaling says; computed in f64, rounded to f32 as transformers keeps them.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let f = self.theta.powf(-((2 * i) as f64) / head_dim as f64);
                let f = match self.scaling {
                    RopeScaling::Default => f,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings: old,
                    } => {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < old / high_freq_factor {
                            f
                        } else if wavelen > old / low_freq_factor {
                            f / factor
                        } else {
                            let smooth =
                                (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                };
                f as f32
            })
            .collect()
    }

    /// The table for positions `0..positions`. The angle `position * inv_freq` is
    /// rounded to f32 as in transformers before its cosine and sine are taken.
    pub fn table(&self, head_dim: usize, positions: usize) -> RopeTable {
        let inv = self.inv_freq(head_dim);
        let half = inv.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inv {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }
}

/// Rotary embedding in place on `x`, `[tokens, heads * head_dim]` for positions
/// `0..tokens`, in the rotate-half convention: dimension `i` pairs with `i + head_dim/2`.
pub fn rope(x: &mut [f32], heads: usize, head_dim: usize, table: &RopeTable) {
    let half = table.half;
    if half == 0 || head_dim != 2 * half {
        return;
    }
    for (p, token) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (cos, sin) = match (
            table.cos.get(p * half..(p + 1) * half),
            table.sin.get(p * half..(p + 1) * half),
        ) {
            (Some(c), Some(s)) => (c, s),
            _ => return,
        };
        for head in token.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for (((x1, x2), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                let (u, v) = (*x1, *x2);
                *x1 = u * c - v * s;
                *x2 = v * c + u * s;
            }
        }
    }
}

/// Causal grouped-query attention of one prompt: `q` is `[n, heads * head_dim]`, `k` and
/// `v` `[n, kv_heads * head_dim]`; query head `h` reads kv head `h / (heads / kv_heads)`.
/// Scores are scaled by `1/sqrt(head_dim)` and soft-maxed in f32. With a sliding `window`,
/// token `i` attends to tokens `i + 1 − window ..= i` only. Returns `[n, heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
    let group = (heads / kv_heads.max(1)).max(1);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; n * qw];
    let mut scores = vec![0f32; n];
    for h in 0..heads {
        let kvh = h / group;
        for i in 0..n {
            let qi = &q[i * qw + h * head_dim..i * qw + (h + 1) * head_dim];
            let first = window.map_or(0, |w| (i + 1).saturating_sub(w));
            let s = &mut scores[first..=i];
            for (j, sj) in (first..).zip(s.iter_mut()) {
                *sj = dot(qi, &k[j * kw + kvh * head_dim..j * kw + (kvh + 1) * head_dim]) * scale;
            }
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for sj in s.iter_mut() {
                *sj = (*sj - max).exp();
                sum += *sj;
            }
            let o = &mut out[i * qw + h * head_dim..i * qw + (h + 1) * head_dim];
            for (j, &sj) in (first..).zip(s.iter()) {
                let p = sj / sum;
                let vj = &v[j * kw + kvh * head_dim..j * kw + (kvh + 1) * head_dim];
                for (ov, &vv) in o.iter_mut().zip(vj) {
                    *ov += p * vv;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_half_a_head_apart() {
        let table = Rope {
            theta: 10000.0,
            scaling: RopeScaling::Default,
        }
        .table(4, 2);
        // Position 0 is the identity; position 1 rotates (x0, x2) by 1 rad.
        let mut x = vec![1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        rope(&mut x, 1, 4, &table);
        assert_eq!(&x[..4], &[1.0, 0.0, 0.0, 0.0]);
        assert!((x[4] - 1f32.cos()).abs() < 1e-6 && (x[6] - 1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let base = Rope {
            theta: 500000.0,
            scaling: RopeScaling::Default,
        };
        let scaled = Rope {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let (b, s) = (base.inv_freq(128), scaled.inv_freq(128));
        assert_eq!(b[0], s[0]);
        assert!((s[63] * 8.0 - b[63]).abs() <= b[63] * 1e-6);
    }

    #[test]
    fn attention_of_one_token_is_its_value() {
        let out = attention(&[1.0, 2.0], &[0.5, 0.5], &[7.0, -3.0], 1, 1, 1, 2, None);
        assert_eq!(out, vec![7.0, -3.0]);
    }

    #[test]
    fn a_window_of_one_token_sees_only_itself() {
        // Three tokens, one head of width 1: with window 1 each output is its own value.
        let (q, k, v) = ([1.0, 1.0, 1.0], [0.3, -2.0, 5.0], [7.0, -3.0, 0.5]);
        assert_eq!(attention(&q, &k, &v, 3, 1, 1, 1, Some(1)), v.to_vec());
        let full = attention(&q, &k, &v, 3, 1, 1, 1, None);
        assert_ne!(full[2], v[2]);
        // Window 2: token 2 mixes tokens 1 and 2 only, as the full pass over them does.
        let two = attention(&q, &k, &v, 3, 1, 1, 1, Some(2));
        let pair = attention(&q[1..], &k[1..], &v[1..], 2, 1, 1, 1, None);
        assert_eq!(two[2], pair[1]);
    }
}
