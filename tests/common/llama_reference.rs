//! A naive f64 forward pass of Llama-family decoders, written independently of
//! `exec::moe::forward` (its own config parsing, weights read with the `safetensors`
//! crate), to check the forward pass and the `hidden` gate against.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

pub type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/conformance/models")
        .join(name)
}

/// Reads a single-file safetensors model with the `safetensors` crate, not mergec's reader.
pub fn read_safetensors(dir: &Path) -> Tensors {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                    .collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

pub fn read_config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------
// The reference: the transformers forward pass written out in f64 loops, one token at a
// time, reading config.json by itself.

pub struct RefConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub eps: f64,
    pub inv_freq: Vec<f64>,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: bool,
    /// Per layer: how many tokens (itself included) a token sees, when the layer slides.
    pub windows: Vec<Option<usize>>,
}

pub fn ref_config(c: &Value) -> RefConfig {
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    let heads = n("num_attention_heads");
    let hidden = n("hidden_size");
    let head_dim = c["head_dim"]
        .as_u64()
        .map(|d| d as usize)
        .unwrap_or(hidden / heads);
    let model_type = c["model_type"].as_str().unwrap();
    let bias = c["attention_bias"].as_bool().unwrap_or(false);
    let rp = if c["rope_parameters"].is_object() {
        &c["rope_parameters"]
    } else {
        &c["rope_scaling"]
    };
    let theta = rp["rope_theta"]
        .as_f64()
        .or(c["rope_theta"].as_f64())
        .unwrap_or(10000.0);
    let mut inv_freq: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    if rp["rope_type"].as_str() == Some("llama3") {
        let factor = rp["factor"].as_f64().unwrap();
        let lo = rp["low_freq_factor"].as_f64().unwrap();
        let hi = rp["high_freq_factor"].as_f64().unwrap();
        let old = rp["original_max_position_embeddings"].as_f64().unwrap();
        for f in inv_freq.iter_mut() {
            let wavelen = 2.0 * std::f64::consts::PI / *f;
            if wavelen > old / lo {
                *f /= factor;
            } else if wavelen >= old / hi {
                let s = (old / wavelen - lo) / (hi - lo);
                *f = (1.0 - s) * *f / factor + s * *f;
            }
        }
    }
    // transformers' configs: an explicit `layer_types`, else Mistral slides everywhere and
    // Qwen2/Qwen3 (with use_sliding_window) from layer max_window_layers (default 28) on.
    let layers = n("num_hidden_layers");
    let window = c["sliding_window"].as_u64().map(|w| w as usize);
    let windows = (0..layers)
        .map(|l| {
            let slides = match c["layer_types"].as_array() {
                Some(types) => types[l] == "sliding_attention",
                None => match model_type {
                    "mistral" => true,
                    "qwen2" | "qwen3" => {
                        c["use_sliding_window"] == true
                            && l as u64 >= c["max_window_layers"].as_u64().unwrap_or(28)
                    }
                    _ => false,
                },
            };
            if slides {
                window
            } else {
                None
            }
        })
        .collect();
    RefConfig {
        windows,
        hidden,
        layers,
        heads,
        kv_heads: c["num_key_value_heads"]
            .as_u64()
            .map(|k| k as usize)
            .unwrap_or(heads),
        head_dim,
        inter: n("intermediate_size"),
        eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        inv_freq,
        qkv_bias: model_type == "qwen2" || (model_type != "mistral" && bias),
        o_bias: model_type != "qwen2" && model_type != "mistral" && bias,
        qk_norm: model_type == "qwen3",
    }
}

pub fn get(w: &Tensors, name: &str) -> Vec<f64> {
    w[name].1.iter().map(|&v| v as f64).collect()
}

pub fn ref_rms(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| v * r * g).collect()
}

pub fn ref_linear(x: &[f64], w: &[f64], b: Option<Vec<f64>>, out: usize) -> Vec<f64> {
    let inp = x.len();
    (0..out)
        .map(|o| {
            let mut s = b.as_ref().map_or(0.0, |b| b[o]);
            for i in 0..inp {
                s += x[i] * w[o * inp + i];
            }
            s
        })
        .collect()
}

/// Rotates each head of `x` (rotate-half pairs `(i, i + d/2)`) by position `pos`.
pub fn ref_rope(x: &mut [f64], head_dim: usize, inv_freq: &[f64], pos: usize) {
    let half = head_dim / 2;
    for head in x.chunks_mut(head_dim) {
        for i in 0..half {
            let a = pos as f64 * inv_freq[i];
            let (x1, x2) = (head[i], head[i + half]);
            head[i] = x1 * a.cos() - x2 * a.sin();
            head[i + half] = x2 * a.cos() + x1 * a.sin();
        }
    }
}

/// `[layer][position][hidden]`: the input of every layer.
pub fn reference(config: &Value, w: &Tensors, tokens: &[u32]) -> Vec<Vec<Vec<f64>>> {
    let c = ref_config(config);
    let (h, d) = (c.hidden, c.head_dim);
    let embed = get(w, "model.embed_tokens.weight");
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| embed[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    let mut states = Vec::new();
    for l in 0..c.layers {
        states.push(x.clone());
        let p = format!("model.layers.{l}");
        let t = |s: &str| get(w, &format!("{p}.{s}"));
        let bias = |s: &str, on: bool| on.then(|| t(&format!("self_attn.{s}_proj.bias")));
        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (pos, xt) in x.iter().enumerate() {
            let xn = ref_rms(xt, &t("input_layernorm.weight"), c.eps);
            let mut q = ref_linear(
                &xn,
                &t("self_attn.q_proj.weight"),
                bias("q", c.qkv_bias),
                c.heads * d,
            );
            let mut k = ref_linear(
                &xn,
                &t("self_attn.k_proj.weight"),
                bias("k", c.qkv_bias),
                c.kv_heads * d,
            );
            let v = ref_linear(
                &xn,
                &t("self_attn.v_proj.weight"),
                bias("v", c.qkv_bias),
                c.kv_heads * d,
            );
            if c.qk_norm {
                let (qn, kn) = (t("self_attn.q_norm.weight"), t("self_attn.k_norm.weight"));
                q = q.chunks(d).flat_map(|hd| ref_rms(hd, &qn, c.eps)).collect();
                k = k.chunks(d).flat_map(|hd| ref_rms(hd, &kn, c.eps)).collect();
            }
            ref_rope(&mut q, d, &c.inv_freq, pos);
            ref_rope(&mut k, d, &c.inv_freq, pos);
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let mut next = Vec::new();
        for (i, xt) in x.iter().enumerate() {
            let mut attn = vec![0.0; c.heads * d];
            for hq in 0..c.heads {
                let hk = hq * c.kv_heads / c.heads;
                let lo = c.windows[l].map_or(0, |w| (i + 1).saturating_sub(w));
                let scores: Vec<f64> = (lo..=i)
                    .map(|j| {
                        (0..d).map(|e| qs[i][hq * d + e] * ks[j][hk * d + e]).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (j, s) in (lo..=i).zip(&scores) {
                    for e in 0..d {
                        attn[hq * d + e] += (s - m).exp() / z * vs[j][hk * d + e];
                    }
                }
            }
            let o_b = c.o_bias.then(|| t("self_attn.o_proj.bias"));
            let o = ref_linear(&attn, &t("self_attn.o_proj.weight"), o_b, h);
            let x1: Vec<f64> = xt.iter().zip(&o).map(|(a, b)| a + b).collect();
            let xn = ref_rms(&x1, &t("post_attention_layernorm.weight"), c.eps);
            let g = ref_linear(&xn, &t("mlp.gate_proj.weight"), None, c.inter);
            let u = ref_linear(&xn, &t("mlp.up_proj.weight"), None, c.inter);
            let a: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = ref_linear(&a, &t("mlp.down_proj.weight"), None, h);
            next.push(x1.iter().zip(&down).map(|(a, b)| a + b).collect());
        }
        x = next;
    }
    states
}
