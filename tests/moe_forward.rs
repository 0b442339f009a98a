//! The decoder forward pass of `exec::moe::forward` against an independent, naive f64
//! reference written here, on the fixture models and on small synthetic configs.

use std::path::{Path, PathBuf};

use mergec::exec::moe::forward::{hidden_states, ForwardError, ModelWeights, PromptStates, Weights};
use mergec::io::decoder_config::{ConfigError, DecoderConfig};
use mergec::io::model::load_model;
use mergec::io::TensorReader;
use serde_json::{json, Value};

mod common;

use common::llama_reference::*;

/// How far `got` is from the reference, in units of the tolerance
/// `1e-4 * (1 + max |value|)`: at most 1 passes.
fn excess(got: &PromptStates, want: &[Vec<Vec<f64>>]) -> f64 {
    assert_eq!(got.last.len(), want.len());
    assert_eq!(got.mean.len(), want.len());
    let mut worst: f64 = 0.0;
    for (l, states) in want.iter().enumerate() {
        let n = states.len();
        let last = &states[n - 1];
        let mean: Vec<f64> = (0..last.len())
            .map(|e| states.iter().map(|s| s[e]).sum::<f64>() / n as f64)
            .collect();
        for (g, w) in [(&got.last[l], last), (&got.mean[l], &mean)] {
            assert_eq!(g.len(), w.len());
            let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
            let diff = g
                .iter()
                .zip(w)
                .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
            worst = worst.max(diff / (1e-4 * (1.0 + scale)));
        }
    }
    worst
}

fn check_against_reference(
    config: &Value,
    weights: &dyn Weights,
    reference_weights: &Tensors,
    prompts: &[Vec<u32>],
) {
    let cfg = DecoderConfig::from_config_json(config).unwrap();
    let got = hidden_states(&cfg, weights, prompts).unwrap();
    assert_eq!(got.len(), prompts.len());
    for (prompt, states) in prompts.iter().zip(&got) {
        let e = excess(states, &reference(config, reference_weights, prompt));
        assert!(e <= 1.0, "prompt {prompt:?}: off by {e} tolerances");
    }
}

// ---------------------------------------------------------------------------------------
// In-memory weights.

struct MemWeights(Tensors);

impl Weights for MemWeights {
    fn tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ForwardError> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| ForwardError::MissingTensor(name.to_owned()))
    }
}

/// Another source with one element changed.
struct Perturbed<'a> {
    inner: &'a dyn Weights,
    name: &'a str,
    index: usize,
    delta: f32,
}

impl Weights for Perturbed<'_> {
    fn tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ForwardError> {
        let (shape, mut values) = self.inner.tensor(name)?;
        if name == self.name {
            values[self.index] += self.delta;
        }
        Ok((shape, values))
    }
}

/// A deterministic generator of values in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.next()).collect()
    }
}

/// Random weights for the decoder `config` describes, with the tensors its family has.
fn synth_weights(config: &Value, seed: u64) -> Tensors {
    let c = ref_config(config);
    let (h, d, i) = (c.hidden, c.head_dim, c.inter);
    let (qw, kw) = (c.heads * d, c.kv_heads * d);
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    let mut rng = Lcg(seed);
    let mut t = Tensors::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        t.insert(name, (shape, rng.vec(n, scale, offset)));
    };
    put("model.embed_tokens.weight".into(), vec![vocab, h], 1.0, 0.0);
    for l in 0..c.layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), vec![h], 0.2, 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), vec![h], 0.2, 1.0);
        for (name, rows, cols) in [("q", qw, h), ("k", kw, h), ("v", kw, h), ("o", h, qw)] {
            put(
                format!("{p}.self_attn.{name}_proj.weight"),
                vec![rows, cols],
                0.5,
                0.0,
            );
            let has_bias = if name == "o" { c.o_bias } else { c.qkv_bias };
            if has_bias {
                put(format!("{p}.self_attn.{name}_proj.bias"), vec![rows], 0.5, 0.0);
            }
        }
        if c.qk_norm {
            put(format!("{p}.self_attn.q_norm.weight"), vec![d], 0.3, 1.0);
            put(format!("{p}.self_attn.k_norm.weight"), vec![d], 0.3, 1.0);
        }
        put(format!("{p}.mlp.gate_proj.weight"), vec![i, h], 0.4, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), vec![i, h], 0.4, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), vec![h, i], 0.3, 0.0);
    }
    t
}

fn synth_config(model_type: &str) -> Value {
    json!({
        "model_type": model_type, "hidden_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24,
        "vocab_size": 20, "rms_norm_eps": 1e-6, "rope_theta": 100.0, "hidden_act": "silu"
    })
}

const PROMPTS: [&[u32]; 3] = [&[5], &[3, 19], &[0, 7, 7, 2, 11, 13, 1]];

fn prompts() -> Vec<Vec<u32>> {
    PROMPTS.iter().map(|p| p.to_vec()).collect()
}

fn check_synth(config: &Value, seed: u64) {
    let tensors = synth_weights(config, seed);
    let weights = MemWeights(tensors.clone());
    let mut ps = prompts();
    ps.push(vec![4, 9, 9, 9, 1, 0, 17, 18, 2]);
    check_against_reference(config, &weights, &tensors, &ps);
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn fixture_f32_matches_the_reference() {
    let dir = fixture("micro-llama-base-f32");
    let model = load_model(dir.to_str().unwrap(), Path::new(".")).unwrap();
    let reader = TensorReader::new();
    let cfg = DecoderConfig::from_model(&model).unwrap();
    assert_eq!(
        (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim),
        (32, 4, 2, 8)
    );
    check_against_reference(
        &read_config(&dir),
        &ModelWeights::new(&model, &reader),
        &read_safetensors(&dir),
        &prompts(),
    );
}

#[test]
fn fixture_bf16_runs_and_matches_the_reference() {
    let dir = fixture("micro-llama-base-bf16");
    let model = load_model(dir.to_str().unwrap(), Path::new(".")).unwrap();
    let reader = TensorReader::new();
    check_against_reference(
        &read_config(&dir),
        &ModelWeights::new(&model, &reader),
        &read_safetensors(&dir),
        &prompts(),
    );
}

#[test]
fn layer_zero_is_the_embedding_and_there_is_one_state_per_layer() {
    let dir = fixture("micro-llama-base-f32");
    let tensors = read_safetensors(&dir);
    let cfg = DecoderConfig::from_config_json(&read_config(&dir)).unwrap();
    let got = hidden_states(&cfg, &MemWeights(tensors.clone()), &[vec![3, 9]]).unwrap();
    let embed = &tensors["model.embed_tokens.weight"].1;
    assert_eq!(got[0].last.len(), 4);
    assert_eq!(got[0].last[0], embed[9 * 32..10 * 32].to_vec());
    let mean: Vec<f32> = (0..32)
        .map(|e| ((embed[3 * 32 + e] as f64 + embed[9 * 32 + e] as f64) / 2.0) as f32)
        .collect();
    assert_eq!(got[0].mean[0], mean);
}

#[test]
fn the_comparison_catches_a_changed_weight() {
    let dir = fixture("micro-llama-base-f32");
    let config = read_config(&dir);
    let tensors = read_safetensors(&dir);
    let cfg = DecoderConfig::from_config_json(&config).unwrap();
    let real = MemWeights(tensors.clone());
    let ps = prompts();
    // A small change in an MLP weight, and a larger one in a key projection (its effect
    // passes through a softmax of near-zero scores in this tiny model).
    let changes = [
        ("model.layers.1.mlp.down_proj.weight", 5, 0.05),
        ("model.layers.0.self_attn.k_proj.weight", 40, 2.0),
    ];
    for (name, index, delta) in changes {
        let changed = Perturbed {
            inner: &real,
            name,
            index,
            delta,
        };
        let got = hidden_states(&cfg, &changed, &ps).unwrap();
        let worst = got
            .iter()
            .zip(&ps)
            .map(|(states, p)| excess(states, &reference(&config, &tensors, p)))
            .fold(0f64, f64::max);
        assert!(
            worst > 1.0,
            "changing {name}[{index}] moved the states by only {worst} tolerances"
        );
    }
}

#[test]
fn qwen2_biases_match_the_reference() {
    check_synth(&synth_config("qwen2"), 1);
}

#[test]
fn llama_attention_bias_matches_the_reference() {
    let mut c = synth_config("llama");
    c["attention_bias"] = json!(true);
    check_synth(&c, 2);
}

#[test]
fn qwen3_qk_norm_with_wide_heads_matches_the_reference() {
    let mut c = synth_config("qwen3");
    // Heads wider than hidden / heads, as in real Qwen3 models.
    c["head_dim"] = json!(8);
    check_synth(&c, 3);
}

#[test]
fn llama3_rope_scaling_matches_the_reference_and_matters() {
    let mut c = synth_config("llama");
    c.as_object_mut().unwrap().remove("rope_theta");
    // Theta 100, head_dim 8: wavelengths 6.3 (kept, < 64/4), 19.9 and 62.8 (smoothed)
    // and 199 (divided by the factor, > 64/1), so every band is exercised.
    c["head_dim"] = json!(8);
    c["num_attention_heads"] = json!(2);
    c["num_key_value_heads"] = json!(2);
    c["rope_parameters"] = json!({"rope_theta": 100.0, "rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    check_synth(&c, 4);

    // The same weights with plain rope give states outside the tolerance.
    let tensors = synth_weights(&c, 4);
    let mut plain = c.clone();
    plain["rope_parameters"] = json!({"rope_theta": 100.0, "rope_type": "default"});
    let cfg = DecoderConfig::from_config_json(&plain).unwrap();
    let p = vec![0, 7, 7, 2, 11, 13, 1];
    let got = hidden_states(&cfg, &MemWeights(tensors.clone()), std::slice::from_ref(&p)).unwrap();
    assert!(excess(&got[0], &reference(&c, &tensors, &p)) > 1.0);
}

#[test]
fn rope_scaling_of_transformers_4_matches_the_reference() {
    let mut c = synth_config("llama");
    c["rope_theta"] = json!(100.0);
    c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 2.0, "original_max_position_embeddings": 32});
    check_synth(&c, 5);
}

#[test]
fn one_kv_head_shared_by_all_query_heads_matches_the_reference() {
    let mut c = synth_config("mistral");
    c["num_key_value_heads"] = json!(1);
    c["sliding_window"] = json!(4096);
    check_synth(&c, 6);
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let config = synth_config("llama");
    let mut tensors = synth_weights(&config, 7);
    tensors.remove("model.layers.1.self_attn.k_proj.weight");
    let cfg = DecoderConfig::from_config_json(&config).unwrap();
    let err = hidden_states(&cfg, &MemWeights(tensors), &prompts()).unwrap_err();
    assert!(matches!(err, ForwardError::MissingTensor(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("`model.layers.1.self_attn.k_proj.weight`"),
        "{err}"
    );

    // Also through the model reader: a Qwen2 config over a Llama checkpoint lacks biases.
    let dir = fixture("micro-llama-base-f32");
    let model = load_model(dir.to_str().unwrap(), Path::new(".")).unwrap();
    let reader = TensorReader::new();
    let mut c = read_config(&dir);
    c["model_type"] = json!("qwen2");
    let cfg = DecoderConfig::from_config_json(&c).unwrap();
    let err = hidden_states(&cfg, &ModelWeights::new(&model, &reader), &prompts()).unwrap_err();
    assert!(
        err.to_string().contains("model.layers.0.self_attn.q_proj.bias"),
        "{err}"
    );
}

#[test]
fn wrong_shape_is_an_error_naming_both_shapes() {
    let config = synth_config("llama");
    let mut tensors = synth_weights(&config, 8);
    tensors.get_mut("model.layers.0.mlp.up_proj.weight").unwrap().0 = vec![16, 24];
    let cfg = DecoderConfig::from_config_json(&config).unwrap();
    let err = hidden_states(&cfg, &MemWeights(tensors), &prompts())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`model.layers.0.mlp.up_proj.weight` has shape [16, 24], expected [24, 16]"),
        "{err}"
    );
}

#[test]
fn token_outside_the_vocabulary_is_an_error() {
    let dir = fixture("micro-llama-base-f32");
    let model = load_model(dir.to_str().unwrap(), Path::new(".")).unwrap();
    let reader = TensorReader::new();
    let cfg = DecoderConfig::from_model(&model).unwrap();
    let err = hidden_states(
        &cfg,
        &ModelWeights::new(&model, &reader),
        &[vec![1, 2], vec![3, 64]],
    )
    .unwrap_err();
    assert!(matches!(
        err,
        ForwardError::TokenOutOfVocab {
            prompt: 1,
            position: 1,
            token: 64,
            vocab: 64
        }
    ));
    assert_eq!(
        err.to_string(),
        "prompt 1, position 1: token id 64 is not below the vocabulary size 64"
    );
}

#[test]
fn empty_prompt_is_an_error() {
    let config = synth_config("llama");
    let cfg = DecoderConfig::from_config_json(&config).unwrap();
    let weights = MemWeights(synth_weights(&config, 9));
    let err = hidden_states(&cfg, &weights, &[vec![1], vec![]]).unwrap_err();
    assert_eq!(err.to_string(), "prompt 1 is empty");
    // No prompts at all is no work, not an error.
    assert!(hidden_states(&cfg, &weights, &[]).unwrap().is_empty());
}

#[test]
fn unsupported_rope_type_is_an_error_naming_it() {
    let mut c = read_config(&fixture("micro-llama-base-f32"));
    c["rope_parameters"] = json!({"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0});
    let err = DecoderConfig::from_config_json(&c).unwrap_err();
    assert!(matches!(err, ConfigError::Unsupported { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "unsupported rope type `yarn` (the forward pass supports rope types default and llama3)"
    );
}

#[test]
fn missing_config_key_and_architecture_are_errors() {
    let mut c = synth_config("llama");
    c.as_object_mut().unwrap().remove("num_hidden_layers");
    let err = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
    assert_eq!(
        err,
        "config.json has no `num_hidden_layers`, which the forward pass needs"
    );
    let c = json!({"architectures": ["GPT2LMHeadModel"], "hidden_size": 8});
    let err = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
    assert!(err.contains("architecture `GPT2LMHeadModel`"), "{err}");
}

/// Prompts longer than the window attend through it (Mistral: every layer), as the
/// reference does; and the window changes the result, so the test could fail.
#[test]
fn sliding_window_attention_matches_the_reference() {
    let mut c = synth_config("mistral");
    c["sliding_window"] = json!(3);
    check_synth(&c, 10);
    let cfg = DecoderConfig::from_config_json(&c).unwrap();
    assert_eq!(cfg.layer_windows, vec![Some(3); 3]);
    let weights = MemWeights(synth_weights(&c, 10));
    let windowed = hidden_states(&cfg, &weights, &prompts()).unwrap();
    c["sliding_window"] = json!(null);
    let full = hidden_states(
        &DecoderConfig::from_config_json(&c).unwrap(),
        &weights,
        &prompts(),
    )
    .unwrap();
    // Prompts of at most 3 tokens see no difference; the 7-token one does.
    assert_eq!(bits(&windowed[..2]), bits(&full[..2]));
    assert_ne!(bits(&windowed[2..]), bits(&full[2..]));
}

/// Qwen2 with `use_sliding_window` slides from layer `max_window_layers` on; an explicit
/// `layer_types` list decides per layer.
#[test]
fn qwen2_window_layers_match_the_reference() {
    let mut c = synth_config("qwen2");
    c["use_sliding_window"] = json!(true);
    c["sliding_window"] = json!(2);
    c["max_window_layers"] = json!(1);
    check_synth(&c, 11);
    assert_eq!(
        DecoderConfig::from_config_json(&c).unwrap().layer_windows,
        vec![None, Some(2), Some(2)]
    );
    c["layer_types"] = json!(["sliding_attention", "full_attention", "sliding_attention"]);
    check_synth(&c, 12);
    assert_eq!(
        DecoderConfig::from_config_json(&c).unwrap().layer_windows,
        vec![Some(2), None, Some(2)]
    );
    c["use_sliding_window"] = json!(false);
    c.as_object_mut().unwrap().remove("layer_types");
    assert_eq!(
        DecoderConfig::from_config_json(&c).unwrap().layer_windows,
        vec![None; 3]
    );
}

fn bits(states: &[PromptStates]) -> Vec<u32> {
    states
        .iter()
        .flat_map(|s| s.last.iter().chain(&s.mean))
        .flatten()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let dir = fixture("micro-llama-base-f32");
    let model = load_model(dir.to_str().unwrap(), Path::new(".")).unwrap();
    let reader = TensorReader::new();
    let weights = ModelWeights::new(&model, &reader);
    let cfg = DecoderConfig::from_model(&model).unwrap();
    // Wider layers than the fixture's so matmuls span many blocks of rows.
    let mut wide = synth_config("qwen2");
    wide["hidden_size"] = json!(64);
    wide["intermediate_size"] = json!(200);
    wide["num_attention_heads"] = json!(8);
    let wide_cfg = DecoderConfig::from_config_json(&wide).unwrap();
    let wide_weights = MemWeights(synth_weights(&wide, 11));
    let mut ps = prompts();
    ps.push((0..19).map(|i| (i * 7 % 20) as u32).collect());
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let a = hidden_states(&cfg, &weights, &ps).unwrap();
            let b = hidden_states(&wide_cfg, &wide_weights, &ps).unwrap();
            (bits(&a), bits(&b))
        })
    };
    let (one, two, three) = (run(1), run(2), run(3));
    assert_eq!(one, two);
    assert_eq!(one, three);
}

/// Times 8 prompts of 24 tokens on the 354M-parameter synthetic benchmark model:
/// `cargo test --release --test moe_forward -- --ignored --nocapture`. Reads the model
/// folder named by `MERGEC_FWD_MODEL`, or writes one to a temporary folder.
#[test]
#[ignore]
fn time_hidden_states_on_a_354m_model() {
    use mergec::synth::{write_model, SynthSpec};
    let tmp = tempfile::tempdir().unwrap();
    let dir = match std::env::var_os("MERGEC_FWD_MODEL") {
        Some(d) => PathBuf::from(d),
        None => {
            let d = tmp.path().join("bench350m");
            write_model(&SynthSpec::bench_350m(0), &d, false).unwrap();
            d
        }
    };
    let model = load_model(dir.to_str().unwrap(), Path::new(".")).unwrap();
    let reader = TensorReader::new();
    let weights = ModelWeights::new(&model, &reader);
    let cfg = DecoderConfig::from_model(&model).unwrap();
    let mut rng = Lcg(12);
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|_| {
            (0..24)
                .map(|_| ((rng.next() + 1.0) / 2.0 * cfg.vocab_size as f32) as u32 % cfg.vocab_size as u32)
                .collect()
        })
        .collect();
    for run in ["first (cold pages)", "second"] {
        let start = std::time::Instant::now();
        let states = hidden_states(&cfg, &weights, &prompts).unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(states[0].last.len(), cfg.num_layers);
        eprintln!(
            "hidden_states, {run} run: {secs:.3} s for 8 prompts x 24 tokens, {} layers, {} threads",
            cfg.num_layers,
            rayon::current_num_threads()
        );
    }
}
