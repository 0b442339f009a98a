//! `moe(...)`: tensor names, shapes and config.json for each output architecture, expert
//! weights taken exactly, routers checked against independent computations, the random
//! gates reproducible from the seed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn models() -> PathBuf {
    conformance_dir().join("models")
}

/// Compiles and runs `script` (`MODELS` is the fixture folder); returns the output folder's
/// tensors, its config.json and the run's warnings.
fn run_moe(script: &str, base_dir: &Path) -> (BTreeMap<String, Tensor>, Value, Vec<String>) {
    let out = tempfile::tempdir().unwrap();
    let text = script.replace("MODELS", &models().display().to_string());
    let (script, compiled) = match compile_text(&text, base_dir, out.path()) {
        Ok(c) => c,
        Err((s, d)) => panic!("{}", render(&s, &d)),
    };
    let _ = script;
    let report = run_compiled(&compiled, 2);
    let dir = out.path().join("moe");
    let config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    (load_folder(&dir), config, report.warnings)
}

fn run_here(script: &str) -> (BTreeMap<String, Tensor>, Value, Vec<String>) {
    run_moe(script, &repo())
}

const MIXTRAL: &str = r#"
model base = "MODELS/micro-llama-base-f32"
model ft1 = "MODELS/micro-llama-ft1-f32"
model ft2 = "MODELS/micro-llama-ft2-f32"
save moe(base,
    ft1 { positive: ["the cat sat on the mat", "a dog ran"] },
    ft2 { positive: ["one two three four"], negative: ["the cat"], residual_scale: 0.5 },
    gate: "GATE", LAYOUT) to "out/moe"
"#;

fn mixtral(gate: &str, layout: &str) -> String {
    MIXTRAL.replace("GATE", gate).replace("LAYOUT", layout)
}

fn expert_models() -> [BTreeMap<String, Tensor>; 2] {
    [
        load_folder(&models().join("micro-llama-ft1-f32")),
        load_folder(&models().join("micro-llama-ft2-f32")),
    ]
}

#[test]
fn mixtral_fused_layout_has_transformers_5_names_shapes_and_the_experts_weights() {
    let (out, config, _) = run_here(&mixtral("random", "layout: \"fused\""));
    let base = load_folder(&models().join("micro-llama-base-f32"));
    let experts = expert_models();
    let (h, i, layers) = (32, 64, 4);
    // Everything but the MLP comes from the base, bit for bit.
    for (name, t) in &base {
        if name.contains(".mlp.") {
            assert!(!out.contains_key(name), "{name} should be replaced by experts");
            continue;
        }
        assert_eq!(out[name].values, t.values, "{name}");
    }
    for l in 0..layers {
        let gate_up = &out[&format!("model.layers.{l}.mlp.experts.gate_up_proj")];
        let down = &out[&format!("model.layers.{l}.mlp.experts.down_proj")];
        let router = &out[&format!("model.layers.{l}.mlp.gate.weight")];
        assert_eq!(gate_up.shape, vec![2, 2 * i, h]);
        assert_eq!(down.shape, vec![2, h, i]);
        assert_eq!(router.shape, vec![2, h]);
        for (e, ft) in experts.iter().enumerate() {
            let g = &ft[&format!("model.layers.{l}.mlp.gate_proj.weight")].values;
            let u = &ft[&format!("model.layers.{l}.mlp.up_proj.weight")].values;
            let d = &ft[&format!("model.layers.{l}.mlp.down_proj.weight")].values;
            let block = &gate_up.values[e * 2 * i * h..(e + 1) * 2 * i * h];
            assert_eq!(&block[..i * h], &g[..], "layer {l} expert {e}: gate rows first");
            assert_eq!(&block[i * h..], &u[..], "layer {l} expert {e}: then up rows");
            let scale = if e == 1 { 0.5f32 } else { 1.0 };
            let want: Vec<f32> = d.iter().map(|x| x * scale).collect();
            assert_eq!(
                &down.values[e * h * i..(e + 1) * h * i],
                &want[..],
                "layer {l} expert {e} down"
            );
        }
    }
    assert_eq!(config["architectures"][0], "MixtralForCausalLM");
    assert_eq!(config["model_type"], "mixtral");
    assert_eq!(config["num_local_experts"], 2);
    assert_eq!(config["num_experts_per_tok"], 2);
    assert_eq!(config["intermediate_size"], 64);
    assert_eq!(config["num_hidden_layers"], 4);
    assert_eq!(config["hidden_size"], 32);
    assert!(config["sliding_window"].is_null());
}

#[test]
fn mixtral_per_expert_layout_names_w1_w2_w3() {
    let (out, _, _) = run_here(&mixtral("uniform_random", "layout: \"per_expert\""));
    let experts = expert_models();
    for l in 0..4 {
        assert_eq!(
            out[&format!("model.layers.{l}.block_sparse_moe.gate.weight")].shape,
            vec![2, 32]
        );
        for (e, ft) in experts.iter().enumerate() {
            let p = format!("model.layers.{l}.block_sparse_moe.experts.{e}");
            let src = |proj: &str| &ft[&format!("model.layers.{l}.mlp.{proj}.weight")].values;
            assert_eq!(&out[&format!("{p}.w1.weight")].values, src("gate_proj"));
            assert_eq!(&out[&format!("{p}.w3.weight")].values, src("up_proj"));
            assert_eq!(out[&format!("{p}.w2.weight")].shape, vec![32, 64]);
        }
    }
    assert!(!out.keys().any(|k| k.contains(".mlp.")));
}

#[test]
fn qwen2_moe_has_a_shared_expert_its_gate_and_zero_attention_biases() {
    let script = r#"
model base = "MODELS/micro-llama-base-f32"
model ft1 = "MODELS/micro-llama-ft1-f32"
model ft2 = "MODELS/micro-llama-ft2-f32"
model ft3 = "MODELS/micro-llama-ft3-f32"
save moe(base,
    ft1 { positive: ["the cat sat"] },
    ft2 { positive: ["one two three"] },
    shared: ft3 { positive: ["hello there"] },
    gate: "cheap_embed", experts_per_token: 1) to "out/moe" { dtype: bf16 }
"#;
    let (out, config, _) = run_here(script);
    let ft3 = load_folder(&models().join("micro-llama-ft3-f32"));
    assert_eq!(config["architectures"][0], "Qwen2MoeForCausalLM");
    assert_eq!(config["model_type"], "qwen2_moe");
    assert_eq!(config["num_experts"], 2);
    assert_eq!(config["num_experts_per_tok"], 1);
    assert_eq!(config["moe_intermediate_size"], 64);
    assert_eq!(config["shared_expert_intermediate_size"], 64);
    assert_eq!(config["decoder_sparse_step"], 1);
    assert_eq!(config["norm_topk_prob"], true);
    assert_eq!(
        config["torch_dtype"].as_str().or(config["dtype"].as_str()),
        Some("bfloat16")
    );
    for l in 0..4 {
        let shared = &out[&format!("model.layers.{l}.mlp.shared_expert.up_proj.weight")];
        let want = &ft3[&format!("model.layers.{l}.mlp.up_proj.weight")].values;
        assert_eq!(shared.dtype, "BF16");
        // bf16 rounding of the f32 source, to nearest even.
        for (got, w) in shared.values.iter().zip(want) {
            assert_eq!(*got, half::bf16::from_f32(*w).to_f32());
        }
        assert_eq!(
            out[&format!("model.layers.{l}.mlp.shared_expert_gate.weight")].shape,
            vec![1, 32]
        );
        assert_eq!(
            out[&format!("model.layers.{l}.mlp.experts.gate_up_proj")].shape,
            vec![2, 128, 32]
        );
        for (p, rows) in [("q_proj", 32), ("k_proj", 16), ("v_proj", 16)] {
            let bias = &out[&format!("model.layers.{l}.self_attn.{p}.bias")];
            assert_eq!(bias.shape, vec![rows]);
            assert!(bias.values.iter().all(|v| *v == 0.0));
        }
    }
}

/// A shared expert without prompts is DeepSeek-MoE, as mergekit-moe chooses it (Mixtral has
/// no shared expert; Qwen2-MoE gates its shared expert by prompts): mergekit's tensor names
/// and config keys, the experts' weights as they are, and the same routers Mixtral gets.
#[test]
fn deepseek_moe_from_llama_models_with_an_ungated_shared_expert() {
    let script = r#"
model base = "MODELS/micro-llama-base-f32"
model ft1 = "MODELS/micro-llama-ft1-f32"
model ft2 = "MODELS/micro-llama-ft2-f32"
model ft3 = "MODELS/micro-llama-ft3-f32"
save moe(base,
    ft1 { positive: ["the cat sat on the mat", "a dog ran"] },
    ft2 { positive: ["one two three four"], negative: ["the cat"], residual_scale: 0.5 },
    SHARED gate: "cheap_embed") to "out/moe"
"#;
    let (out, config, _) = run_here(&script.replace("SHARED", "shared: ft3,"));
    let (mixtral, _, _) = run_here(&script.replace("SHARED", "layout: \"per_expert\","));
    let ft3 = load_folder(&models().join("micro-llama-ft3-f32"));
    assert_eq!(config["architectures"][0], "DeepseekForCausalLM");
    assert_eq!(config["model_type"], "deepseek");
    assert_eq!(config["n_routed_experts"], 2);
    assert_eq!(config["n_shared_experts"], 1);
    assert_eq!(config["num_experts_per_tok"], 2);
    assert_eq!(config["moe_intermediate_size"], 64);
    assert_eq!(config["first_k_dense_replace"], 0);
    assert_eq!(config["moe_layer_freq"], 1);
    assert_eq!(config["scoring_func"], "softmax");
    assert_eq!(config["norm_topk_prob"], true);
    assert!(config["auto_map"]["AutoModelForCausalLM"]
        .as_str()
        .unwrap()
        .ends_with("modeling_deepseek.DeepseekForCausalLM"));
    for l in 0..4 {
        let p = format!("model.layers.{l}.mlp");
        let mp = format!("model.layers.{l}.block_sparse_moe");
        assert_eq!(
            out[&format!("{p}.gate.weight")].values,
            mixtral[&format!("{mp}.gate.weight")].values
        );
        for e in 0..2 {
            for (proj, w) in [("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")] {
                assert_eq!(
                    out[&format!("{p}.experts.{e}.{proj}.weight")].values,
                    mixtral[&format!("{mp}.experts.{e}.{w}.weight")].values,
                    "layer {l} expert {e} {proj}"
                );
            }
        }
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            assert_eq!(
                out[&format!("{p}.shared_experts.{proj}.weight")].values,
                ft3[&format!("{p}.{proj}.weight")].values
            );
        }
    }
    // Only the routed experts' router: DeepSeek-MoE does not gate the shared expert.
    assert!(!out.keys().any(|k| k.contains("shared_expert_gate")));
    assert_eq!(out.len(), mixtral.len() + 4 * 3);
}

#[test]
fn deepseek_moe_refuses_what_it_cannot_hold() {
    let base = r#"
model base = "MODELS/micro-llama-base-f32"
model ft1 = "MODELS/micro-llama-ft1-f32"
model ft2 = "MODELS/micro-llama-ft2-f32"
model ft3 = "MODELS/micro-llama-ft3-f32"
save moe(base, ft1 { positive: ["a b"] }, ft2 { positive: ["c d"] }, ARGS) to "out/moe"
"#;
    let errors = |args: &str| -> String {
        let out = tempfile::tempdir().unwrap();
        let text = base
            .replace("ARGS", args)
            .replace("MODELS", &models().display().to_string());
        match compile_text(&text, &repo(), out.path()) {
            Ok(_) => panic!("{args}: compiled"),
            Err((s, d)) => render(&s, &d),
        }
    };
    let fused = errors(r#"shared: ft3, architecture: "deepseek", layout: "fused""#);
    assert!(
        fused.contains("E0701") && fused.contains("no fused expert layout"),
        "{fused}"
    );
    let gated = errors(r#"shared: ft3 { positive: ["e f"] }, architecture: "deepseek""#);
    assert!(gated.contains("does not gate its shared expert"), "{gated}");
    // Qwen2-MoE needs the shared expert's prompts for its shared gate.
    let qwen = errors(r#"shared: ft3, architecture: "qwen2_moe""#);
    assert!(qwen.contains("gates its shared expert by prompts"), "{qwen}");
}

/// Copies a fixture model with its config.json's model_type changed.
fn retyped(src: &str, model_type: &str, class: &str, into: &Path) -> PathBuf {
    let dir = into.join(src);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(models().join(src)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let mut config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    config["model_type"] = Value::from(model_type);
    config["architectures"] = serde_json::json!([class]);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    dir
}

/// A fixture model retyped as Qwen3, with the per-head q/k norm weights Qwen3 has (the
/// llama fixtures lack them): non-trivial gains, so the forward pass must apply them.
fn qwen3_model(src: &str, into: &Path) -> PathBuf {
    let dir = retyped(src, "qwen3", "Qwen3ForCausalLM", into);
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    for l in 0..4 {
        for (k, which) in ["q_norm", "k_norm"].into_iter().enumerate() {
            let gains: Vec<u8> = (0..8)
                .flat_map(|i| (1.0f32 + 0.1 * ((l * 16 + k * 8 + i) as f32).sin()).to_le_bytes())
                .collect();
            tensors.push((
                format!("model.layers.{l}.self_attn.{which}.weight"),
                safetensors::Dtype::F32,
                vec![8],
                gains,
            ));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
    dir
}

/// Qwen3-MoE end to end, as Mixtral and Qwen2-MoE: names, config, the experts' weights, and
/// `hidden` routers against the independent forward pass (with Qwen3's q/k norms).
#[test]
fn qwen3_moe_from_qwen3_models() {
    use common::llama_reference::{read_config, read_safetensors, reference};
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = [
        "micro-llama-base-f32",
        "micro-llama-ft1-f32",
        "micro-llama-ft2-f32",
    ]
    .iter()
    .map(|m| qwen3_model(m, tmp.path()))
    .collect();
    let script = r#"
model base = "micro-llama-base-f32"
model ft1 = "micro-llama-ft1-f32"
model ft2 = "micro-llama-ft2-f32"
save moe(base, ft1 { positive: ["the cat"] }, ft2 { positive: ["one two"] }, gate: "hidden") to "out/moe"
"#;
    let (out, config, _) = run_moe(script, tmp.path());
    assert_eq!(config["architectures"][0], "Qwen3MoeForCausalLM");
    assert_eq!(config["model_type"], "qwen3_moe");
    assert_eq!(config["num_experts"], 2);
    assert_eq!(config["num_experts_per_tok"], 2);
    assert_eq!(config["moe_intermediate_size"], 64);
    assert_eq!(config["decoder_sparse_step"], 1);
    assert_eq!(config["norm_topk_prob"], true);
    assert!(config.get("shared_expert_intermediate_size").is_none());
    assert!(!out
        .keys()
        .any(|k| k.contains("shared_expert") || k.ends_with("_proj.bias")));
    let (base_config, base) = (read_config(&dirs[0]), read_safetensors(&dirs[0]));
    let experts = [load_folder(&dirs[1]), load_folder(&dirs[2])];
    for l in 0..4 {
        // Attention (with the q/k norms) from the base; experts' MLPs fused, gate rows first.
        let q_norm = format!("model.layers.{l}.self_attn.q_norm.weight");
        assert_eq!(out[&q_norm].values, load_folder(&dirs[0])[&q_norm].values);
        let gate_up = &out[&format!("model.layers.{l}.mlp.experts.gate_up_proj")];
        assert_eq!(gate_up.shape, vec![2, 128, 32]);
        assert_eq!(
            out[&format!("model.layers.{l}.mlp.experts.down_proj")].shape,
            vec![2, 32, 64]
        );
        for (e, ft) in experts.iter().enumerate() {
            let g = &ft[&format!("model.layers.{l}.mlp.gate_proj.weight")].values;
            assert_eq!(&gate_up.values[e * 128 * 32..e * 128 * 32 + 64 * 32], &g[..]);
        }
    }
    // Each expert's router row: the base's hidden state at the layer's input at the
    // prompt's last token, normalised.
    let last = |prompt: &str| -> Vec<Vec<f64>> {
        reference(&base_config, &base, &tokenize(prompt))
            .into_iter()
            .map(|positions| positions[positions.len() - 1].clone())
            .collect()
    };
    let (cat, one) = (last("the cat"), last("one two"));
    for l in 0..4 {
        let want: Vec<f64> = normalized(cat[l].clone())
            .into_iter()
            .chain(normalized(one[l].clone()))
            .collect();
        let got = &out[&format!("model.layers.{l}.mlp.gate.weight")].values;
        assert_eq!(
            out[&format!("model.layers.{l}.mlp.gate.weight")].shape,
            vec![2, 32]
        );
        assert_close(got, &want, 1e-4, &format!("qwen3 router of layer {l}"));
    }
    // The q/k norms matter: without them the routers of layers past 0 differ.
    let mut plain = base_config.clone();
    plain["model_type"] = Value::from("llama");
    let unnormed = reference(&plain, &base, &tokenize("the cat"));
    let l3 = &unnormed[3];
    assert!(l3[l3.len() - 1]
        .iter()
        .zip(&cat[3])
        .any(|(a, b)| (a - b).abs() > 1e-4));
}

/// The base's tokenizer, as an independent path to token ids.
fn tokenize(text: &str) -> Vec<u32> {
    let t = tokenizers::Tokenizer::from_file(models().join("micro-llama-base-f32/tokenizer.json")).unwrap();
    t.encode(format!("<s>{text}"), false).unwrap().get_ids().to_vec()
}

fn normalized(v: Vec<f64>) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-8);
    v.into_iter().map(|x| x / n).collect()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol, "{what}[{k}]: {g} vs {w}");
    }
}

#[test]
fn cheap_embed_routers_are_normalised_prompt_embedding_sums() {
    let (out, _, _) = run_here(&mixtral("cheap_embed", "layout: \"fused\""));
    let base = load_folder(&models().join("micro-llama-base-f32"));
    let embed = &base["model.embed_tokens.weight"].values;
    let sum = |prompts: &[&str]| -> Vec<f64> {
        let mut s = vec![0f64; 32];
        for p in prompts {
            let ids = tokenize(p);
            assert!(ids.len() > 1 && ids[0] == 1, "BOS first: {ids:?}");
            for id in ids {
                for (k, x) in s.iter_mut().enumerate() {
                    *x += embed[id as usize * 32 + k] as f64;
                }
            }
        }
        normalized(s)
    };
    let e0 = sum(&["the cat sat on the mat", "a dog ran"]);
    let pos1 = sum(&["one two three four"]);
    let neg1 = sum(&["the cat"]);
    let e1 = normalized(pos1.iter().zip(&neg1).map(|(p, n)| p - n).collect());
    let want: Vec<f64> = e0.iter().chain(&e1).copied().collect();
    for l in 0..4 {
        // The same vector for every layer (mergekit's cheap_embed).
        assert_close(
            &out[&format!("model.layers.{l}.mlp.gate.weight")].values,
            &want,
            1e-6,
            "router",
        );
    }
}

#[test]
fn random_gates_are_reproducible_from_the_seed_and_have_their_distribution() {
    let script = |gate: &str, seed: u64| format!("set seed = {seed}\n{}", mixtral(gate, "layout: \"fused\""));
    let routers = |out: &BTreeMap<String, Tensor>| -> Vec<f32> {
        (0..4)
            .flat_map(|l| out[&format!("model.layers.{l}.mlp.gate.weight")].values.clone())
            .collect()
    };
    let a = routers(&run_here(&script("random", 7)).0);
    let b = routers(&run_here(&script("random", 7)).0);
    let c = routers(&run_here(&script("random", 8)).0);
    assert_eq!(a, b, "same seed, same routers");
    assert_ne!(a, c, "another seed, other routers");
    let n = a.len() as f64;
    let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!(
        mean.abs() < 0.2 && (0.7..1.3).contains(&var),
        "N(0,1)? mean {mean} var {var}"
    );
    // Layers and experts get different draws.
    assert_ne!(a[..32], a[32..64]);
    assert_ne!(a[..64], a[64..128]);

    let u = routers(&run_here(&script("uniform_random", 7)).0);
    let bound = (1.0f32 / 32.0).sqrt();
    assert!(u.iter().all(|x| x.abs() <= bound));
    let spread = u.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(spread > 0.8 * bound, "draws fill the interval: max |x| {spread}");
}

#[test]
fn noise_scale_adds_seeded_gaussian_noise_to_an_expert() {
    let script = r#"
set seed = 3
model base = "MODELS/micro-llama-base-f32"
model ft1 = "MODELS/micro-llama-ft1-f32"
model ft2 = "MODELS/micro-llama-ft2-f32"
save moe(base, ft1 { noise_scale: 0.01 }, ft2, gate: "random", layout: "per_expert") to "out/moe"
"#;
    let (out, _, _) = run_here(script);
    let (again, _, _) = run_here(script);
    let ft = expert_models();
    let mut diffs = Vec::new();
    for l in 0..4 {
        let name = format!("model.layers.{l}.block_sparse_moe.experts.0.w1.weight");
        let src = &ft[0][&format!("model.layers.{l}.mlp.gate_proj.weight")].values;
        diffs.extend(out[&name].values.iter().zip(src).map(|(o, s)| (o - s) as f64));
        assert_eq!(out[&name].values, again[&name].values, "seeded");
        let clean = format!("model.layers.{l}.block_sparse_moe.experts.1.w1.weight");
        assert_eq!(
            &out[&clean].values,
            &ft[1][&format!("model.layers.{l}.mlp.gate_proj.weight")].values
        );
    }
    let n = diffs.len() as f64;
    let mean = diffs.iter().sum::<f64>() / n;
    let std = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        mean.abs() < 0.002 && (0.008..0.012).contains(&std),
        "mean {mean} std {std}"
    );
}

#[test]
fn noise_is_the_same_in_the_fused_and_per_expert_layouts() {
    let script = |layout: &str| {
        format!(
            r#"
set seed = 5
model base = "MODELS/micro-llama-base-f32"
model ft1 = "MODELS/micro-llama-ft1-f32"
model ft2 = "MODELS/micro-llama-ft2-f32"
save moe(base, ft1 {{ noise_scale: 0.01 }}, ft2 {{ noise_scale: 0.02, residual_scale: 0.5 }},
    gate: "random", layout: "{layout}") to "out/moe"
"#
        )
    };
    let (fused, _, _) = run_here(&script("fused"));
    let (per, _, _) = run_here(&script("per_expert"));
    let ft = expert_models();
    let (h, i) = (32, 64);
    for l in 0..4 {
        let gate_up = &fused[&format!("model.layers.{l}.mlp.experts.gate_up_proj")].values;
        let down = &fused[&format!("model.layers.{l}.mlp.experts.down_proj")].values;
        for e in 0..2 {
            let p = format!("model.layers.{l}.block_sparse_moe.experts.{e}");
            // The fused gate_up block of expert e is its gate rows, then its up rows.
            let block = &gate_up[e * 2 * i * h..(e + 1) * 2 * i * h];
            assert_eq!(
                &block[..i * h],
                &per[&format!("{p}.w1.weight")].values[..],
                "{p} gate"
            );
            assert_eq!(
                &block[i * h..],
                &per[&format!("{p}.w3.weight")].values[..],
                "{p} up"
            );
            let d = &down[e * h * i..(e + 1) * h * i];
            assert_eq!(d, &per[&format!("{p}.w2.weight")].values[..], "{p} down");
            // The noise is really there, so equality is not vacuous.
            let src = &ft[e][&format!("model.layers.{l}.mlp.gate_proj.weight")].values;
            assert_ne!(&block[..i * h], &src[..], "{p} has noise");
        }
    }
}

/// Runs the built `mergec` with `args` in `cwd`; returns its stdout (it must succeed).
fn mergec_cli(args: &[&str], cwd: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mergec"))
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn run_and_check_summaries_count_the_tensors_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let script = mixtral("random", "layout: \"fused\"").replace("MODELS", &models().display().to_string());
    std::fs::write(dir.path().join("s.merge"), script).unwrap();
    let checked = mergec_cli(&["check", "s.merge"], dir.path());
    let json = mergec_cli(&["check", "s.merge", "--format", "json"], dir.path());
    let ran = mergec_cli(&["run", "s.merge"], dir.path());
    // Each fused tensor once, the generated routers included.
    let written = load_folder(&dir.path().join("out/moe")).len();
    assert!(written > 0);
    // Only the base's tensors are copied unchanged; fused parts are not written as such.
    let copied = written - 3 * 4;
    assert!(
        checked.contains(&format!(": {written} tensors ({copied} copied unchanged)")),
        "check says:\n{checked}\nwritten: {written}"
    );
    let json: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(json["outputs"][0]["tensors"], written);
    // The byte figures count the generated routers too: the tensor data written.
    let data: u64 = load_folder(&dir.path().join("out/moe"))
        .values()
        .map(|t| t.values.len() as u64 * if t.dtype == "F32" { 4 } else { 2 })
        .sum();
    assert_eq!(json["outputs"][0]["bytes"], data);
    assert_eq!(json["write_bytes"], data);
    assert!(
        ran.contains(&format!("\n{written} tensors, read ")),
        "run says:\n{ran}\nwritten: {written}"
    );
}

#[test]
fn nearly_identical_prompts_warn_about_degenerate_routers() {
    let script = r#"
model base = "MODELS/micro-llama-base-f32"
model ft1 = "MODELS/micro-llama-ft1-f32"
model ft2 = "MODELS/micro-llama-ft2-f32"
save moe(base, ft1 { positive: ["the cat sat on the mat"] }, ft2 { positive: ["the cat sat on the mat."] },
    gate: "cheap_embed") to "out/moe"
"#;
    let (_, _, warnings) = run_here(script);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("every layer") && warnings[0].contains("degenerate"),
        "{}",
        warnings[0]
    );
    let (_, _, none) = run_here(&mixtral("random", "layout: \"fused\""));
    assert!(none.is_empty(), "{none:?}");
}

#[test]
fn the_example_runs_with_the_hidden_gate_on_the_demo_models() {
    let tmp = tempfile::tempdir().unwrap();
    let examples = demo_checkout(tmp.path());
    let text = std::fs::read_to_string(repo().join("examples/moe.merge")).unwrap();
    let (out, config, _) = run_moe(&text, &examples);
    assert_eq!(config["model_type"], "mixtral");
    assert_eq!(
        config["torch_dtype"].as_str().or(config["dtype"].as_str()),
        Some("bfloat16")
    );
    for l in 0..4 {
        let router = &out[&format!("model.layers.{l}.mlp.gate.weight")];
        assert_eq!(
            (router.dtype.as_str(), router.shape.as_slice()),
            ("BF16", &[2usize, 32][..])
        );
        let (chat, math) = router.values.split_at(32);
        for row in [chat, math] {
            let norm = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 0.01, "layer {l}: unit rows, got {norm}");
        }
        assert_ne!(chat, math, "layer {l}: the experts' prompts differ");
    }
}

#[test]
fn hidden_routers_match_a_naive_forward_pass_of_the_base() {
    use common::llama_reference::{read_config, read_safetensors, reference};
    let dir = models().join("micro-llama-base-f32");
    let (config, weights) = (read_config(&dir), read_safetensors(&dir));
    for (gate, average) in [("hidden", false), ("hidden_avg", true)] {
        let (out, _, _) = run_here(&mixtral(gate, "layout: \"fused\""));
        // Per prompt: [layer][hidden], the state at the layer's input (last token or mean).
        let states = |prompt: &str| -> Vec<Vec<f64>> {
            reference(&config, &weights, &tokenize(prompt))
                .into_iter()
                .map(|positions| {
                    if average {
                        let n = positions.len() as f64;
                        (0..32)
                            .map(|k| positions.iter().map(|p| p[k]).sum::<f64>() / n)
                            .collect()
                    } else {
                        positions[positions.len() - 1].clone()
                    }
                })
                .collect()
        };
        let mean = |prompts: &[&str]| -> Vec<Vec<f64>> {
            let all: Vec<Vec<Vec<f64>>> = prompts.iter().map(|p| states(p)).collect();
            (0..4)
                .map(|l| {
                    (0..32)
                        .map(|k| all.iter().map(|s| s[l][k]).sum::<f64>() / all.len() as f64)
                        .collect()
                })
                .collect()
        };
        let e0 = mean(&["the cat sat on the mat", "a dog ran"]);
        let (pos1, neg1) = (mean(&["one two three four"]), mean(&["the cat"]));
        for l in 0..4 {
            let e1: Vec<f64> = pos1[l].iter().zip(&neg1[l]).map(|(p, n)| p - n).collect();
            let want: Vec<f64> = normalized(e0[l].clone())
                .into_iter()
                .chain(normalized(e1))
                .collect();
            let got = &out[&format!("model.layers.{l}.mlp.gate.weight")].values;
            assert_close(got, &want, 1e-4, &format!("{gate} router of layer {l}"));
        }
        // Layers differ: the gate follows the hidden state through the model.
        let r0 = &out["model.layers.0.mlp.gate.weight"].values;
        let r3 = &out["model.layers.3.mlp.gate.weight"].values;
        assert!(r0.iter().zip(r3).any(|(a, b)| (a - b).abs() > 1e-3));
    }
}

/// mergekit-moe's own DeepSeek-MoE output (`tests/fixtures/moe/deepseek_mergekit`, made by
/// mergekit 0.1.5 from the config stored beside it; see the README there) against the same
/// YAML run through `mergec run`: the same tensor names, shapes and dtypes, every tensor but
/// the routers bit for bit, the prompt routers above cosine 1 - 1e-9, and the config keys that
/// describe the model equal.
#[test]
fn deepseek_moe_yaml_matches_mergekit_moe() {
    let fixture = repo().join("tests/fixtures/moe/deepseek_mergekit");
    let tmp = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string(fixture.join("mergekit_moe_config.yml"))
        .unwrap()
        .replace("MODELS", &models().display().to_string());
    let config_path = tmp.path().join("moe.yml");
    std::fs::write(&config_path, yaml).unwrap();
    let out_dir = tmp.path().join("out");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_mergec"))
        .arg("run")
        .arg(&config_path)
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let expected = load_folder(&fixture);
    let ours = load_folder(&out_dir);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, want) in &expected {
        let got = &ours[name];
        assert_eq!((&got.dtype, &got.shape), (&want.dtype, &want.shape), "{name}");
        if name.ends_with(".mlp.gate.weight") {
            let dot: f64 = got
                .values
                .iter()
                .zip(&want.values)
                .map(|(a, b)| f64::from(a * b))
                .sum();
            let norm = |v: &[f32]| v.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt();
            let cosine = dot / (norm(&got.values) * norm(&want.values));
            assert!(cosine > 1.0 - 1e-9, "{name}: cosine {cosine}");
        } else {
            assert_eq!(got.values, want.values, "{name}");
        }
    }

    let read = |dir: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
    };
    let (want, got) = (read(&fixture), read(&out_dir));
    // What transformers' PretrainedConfig adds to every config it writes, and what names
    // the writer: not part of the model.
    let generic = [
        "_name_or_path",
        "transformers_version",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
    ];
    for (key, value) in want.as_object().unwrap() {
        if generic.contains(&key.as_str()) {
            continue;
        }
        assert_eq!(got.get(key), Some(value), "config.json `{key}`");
    }
}
