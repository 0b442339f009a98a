//! One decoder layer: its weights loaded by name, the norms and the SwiGLU MLP, and its
//! forward step on the tokens of all prompts.

use rayon::prelude::*;

use super::attention::{attention, rope, RopeTable};
use super::matmul::{dot, matmul};
use super::weights::{wrong_shape, Weights};
use super::ForwardError;
use crate::io::decoder_config::DecoderConfig;

/// RMSNorm of each `width`-long row of `x`, in place:
/// `x * 1/sqrt(mean(x²) + eps) * weight`, the squares summed in f32 by [`dot`].
pub fn rms_norm(x: &mut [f32], width: usize, weight: &[f32], eps: f64) {
    let eps = eps as f32;
    for row in x.chunks_exact_mut(width.max(1)) {
        let mean = dot(row, row) / width as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, &g) in row.iter_mut().zip(weight) {
            *v = g * (*v * scale);
        }
    }
}

/// The SwiGLU gate: `silu(gate) * up`, element-wise, with `silu(x) = x / (1 + e^-x)`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// The residual connection: `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

struct Linear {
    w: Vec<f32>,
    out: usize,
    inp: usize,
    bias: Option<Vec<f32>>,
}

impl Linear {
    fn apply(&self, x: &[f32], rows: usize) -> Vec<f32> {
        matmul(x, rows, &self.w, self.out, self.inp, self.bias.as_deref())
    }
}

pub(super) struct Layer {
    input_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Tensor `name`, which must have shape `shape`.
fn fetch(weights: &dyn Weights, name: &str, shape: &[usize]) -> Result<Vec<f32>, ForwardError> {
    let (found, values) = weights.tensor(name)?;
    if found != shape || values.len() != shape.iter().product::<usize>() {
        return Err(wrong_shape(name, shape, &found));
    }
    Ok(values)
}

fn linear(
    weights: &dyn Weights,
    prefix: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<Linear, ForwardError> {
    let w = fetch(weights, &format!("{prefix}.weight"), &[out, inp])?;
    let bias = if bias {
        Some(fetch(weights, &format!("{prefix}.bias"), &[out])?)
    } else {
        None
    };
    Ok(Linear { w, out, inp, bias })
}

pub(super) fn load_layer(
    cfg: &DecoderConfig,
    weights: &dyn Weights,
    l: usize,
) -> Result<Layer, ForwardError> {
    let p = format!("model.layers.{l}");
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (qw, kw) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let norm = |name: &str, width: usize| fetch(weights, &format!("{p}.{name}.weight"), &[width]);
    Ok(Layer {
        input_norm: norm("input_layernorm", h)?,
        q: linear(weights, &format!("{p}.self_attn.q_proj"), qw, h, cfg.qkv_bias)?,
        k: linear(weights, &format!("{p}.self_attn.k_proj"), kw, h, cfg.qkv_bias)?,
        v: linear(weights, &format!("{p}.self_attn.v_proj"), kw, h, cfg.qkv_bias)?,
        o: linear(weights, &format!("{p}.self_attn.o_proj"), h, qw, cfg.o_bias)?,
        q_norm: if cfg.qk_norm {
            Some(norm("self_attn.q_norm", d)?)
        } else {
            None
        },
        k_norm: if cfg.qk_norm {
            Some(norm("self_attn.k_norm", d)?)
        } else {
            None
        },
        post_norm: norm("post_attention_layernorm", h)?,
        gate: linear(weights, &format!("{p}.mlp.gate_proj"), i, h, false)?,
        up: linear(weights, &format!("{p}.mlp.up_proj"), i, h, false)?,
        down: linear(weights, &format!("{p}.mlp.down_proj"), h, i, false)?,
    })
}

/// One decoder layer on the tokens of all prompts, `x` `[tokens, hidden]` in place;
/// `spans` are the prompts' token ranges (attention and positions stay within a prompt).
pub(super) fn layer_forward(
    cfg: &DecoderConfig,
    layer: &Layer,
    x: &mut [f32],
    spans: &[(usize, usize)],
    table: &RopeTable,
    window: Option<usize>,
) {
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let (qw, kw) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let rows = x.len() / h;

    let mut normed = x.to_vec();
    rms_norm(&mut normed, h, &layer.input_norm, cfg.rms_norm_eps);
    let mut q = layer.q.apply(&normed, rows);
    let mut k = layer.k.apply(&normed, rows);
    let v = layer.v.apply(&normed, rows);
    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
        rms_norm(&mut q, d, qn, cfg.rms_norm_eps);
        rms_norm(&mut k, d, kn, cfg.rms_norm_eps);
    }
    let mut attn = vec![0f32; rows * qw];
    let parts: Vec<Vec<f32>> = spans
        .par_iter()
        .map(|&(start, end)| {
            let mut qp = q[start * qw..end * qw].to_vec();
            let mut kp = k[start * kw..end * kw].to_vec();
            rope(&mut qp, cfg.num_heads, d, table);
            rope(&mut kp, cfg.num_kv_heads, d, table);
            attention(
                &qp,
                &kp,
                &v[start * kw..end * kw],
                end - start,
                cfg.num_heads,
                cfg.num_kv_heads,
                d,
                window,
            )
        })
        .collect();
    for (&(start, end), part) in spans.iter().zip(&parts) {
        attn[start * qw..end * qw].copy_from_slice(part);
    }
    add(x, &layer.o.apply(&attn, rows));

    let mut normed = x.to_vec();
    rms_norm(&mut normed, h, &layer.post_norm, cfg.rms_norm_eps);
    let gate = layer.gate.apply(&normed, rows);
    let up = layer.up.apply(&normed, rows);
    add(x, &layer.down.apply(&swiglu(&gate, &up), rows));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_gives_unit_rms() {
        let mut x = vec![3.0f32, 4.0, 0.0, 0.0];
        rms_norm(&mut x, 4, &[1.0; 4], 0.0);
        assert!((x[0] - 1.2).abs() < 1e-6 && (x[1] - 1.6).abs() < 1e-6);
    }

    #[test]
    fn swiglu_is_silu_times_up() {
        let y = swiglu(&[0.0, 1.0], &[5.0, 2.0]);
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-7);
    }
}
