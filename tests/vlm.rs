//! Any architecture from tensor names alone: LLaVA-style (both hub namings) and
//! Qwen2-VL-style models, module-wise layer positions, sub-module merges grafted back,
//! renamed decoders, and nothing dropped.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

/// Writes a model of the given tensor names (all [4, 4] f32, or [8] for norms) with
/// deterministic values depending on `seed`.
fn write_model(dir: &Path, names: &[String], seed: u32, config: Value) {
    std::fs::create_dir_all(dir).unwrap();
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let shape = if name.contains("norm") {
            vec![8]
        } else {
            vec![4, 4]
        };
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| {
                let x = ((seed as usize * 131 + k * 17 + i * 7) % 23) as f32 / 23.0 - 0.5;
                x.to_le_bytes()
            })
            .collect();
        data.push((name.clone(), shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
}

fn layers(prefix: &str, count: usize, parts: &[&str]) -> Vec<String> {
    (0..count)
        .flat_map(|i| parts.iter().map(move |p| format!("{prefix}{i}.{p}")))
        .collect()
}

/// transformers-5 LLaVA naming: 4 text layers, 2 vision layers.
fn llava_v5() -> Vec<String> {
    let mut names = layers(
        "model.language_model.layers.",
        4,
        &[
            "self_attn.q_proj.weight",
            "mlp.up_proj.weight",
            "input_layernorm.weight",
        ],
    );
    names.extend(layers(
        "model.vision_tower.vision_model.encoder.layers.",
        2,
        &["self_attn.q_proj.weight", "layer_norm1.weight"],
    ));
    names.extend(
        [
            "model.language_model.embed_tokens.weight",
            "model.language_model.norm.weight",
            "lm_head.weight",
            "model.multi_modal_projector.linear_1.weight",
        ]
        .map(String::from),
    );
    names
}

/// The older hub naming of the same model.
fn llava_hub() -> Vec<String> {
    let mut names = layers(
        "language_model.model.layers.",
        4,
        &[
            "self_attn.q_proj.weight",
            "mlp.up_proj.weight",
            "input_layernorm.weight",
        ],
    );
    names.extend(layers(
        "vision_tower.vision_model.encoder.layers.",
        2,
        &["self_attn.q_proj.weight", "layer_norm1.weight"],
    ));
    names.extend(
        [
            "language_model.model.embed_tokens.weight",
            "language_model.model.norm.weight",
            "language_model.lm_head.weight",
            "multi_modal_projector.linear_1.weight",
        ]
        .map(String::from),
    );
    names
}

/// Qwen2-VL naming: the decoder at `model.layers.N`, the vision tower at `visual.blocks.N`.
fn qwen2_vl() -> Vec<String> {
    let mut names = layers(
        "model.layers.",
        4,
        &[
            "self_attn.q_proj.weight",
            "mlp.up_proj.weight",
            "input_layernorm.weight",
        ],
    );
    names.extend(layers("visual.blocks.", 2, &["attn.qkv.weight", "norm1.weight"]));
    names.extend(
        [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "visual.merger.mlp.0.weight",
        ]
        .map(String::from),
    );
    names
}

/// A text-only Llama: what gets renamed into a VLM's language model.
fn llama_text() -> Vec<String> {
    let mut names = layers(
        "model.layers.",
        4,
        &[
            "self_attn.q_proj.weight",
            "mlp.up_proj.weight",
            "input_layernorm.weight",
        ],
    );
    names.extend(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"].map(String::from));
    names
}

fn llava_config() -> Value {
    json!({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
           "text_config": {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"]},
           "vision_config": {"num_hidden_layers": 2}})
}

fn run(dir: &Path, script: &str) -> mergec::driver::Compiled {
    let script = mergec::driver::Script::from_text("vlm.merge", script.to_string(), dir.to_path_buf());
    let compiled = match mergec::driver::compile(&script, false, &mergec::plan::Limits::default()) {
        Ok(c) => c,
        Err(d) => panic!("{}", render(&script, &d)),
    };
    run_compiled(&compiled, 2);
    compiled
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6)
}

#[test]
fn each_module_has_its_own_depth() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(&tmp.path().join("a"), &llava_v5(), 1, llava_config());
    write_model(&tmp.path().join("b"), &llava_v5(), 2, llava_config());
    run(
        tmp.path(),
        r#"
model a = "a"
model b = "b"
save linear(a { weight: [0, 1] }, b { weight: [1, 0] }, normalize: false) to "out"
"#,
    );
    let (a, b, out) = (
        load_folder(&tmp.path().join("a")),
        load_folder(&tmp.path().join("b")),
        load_folder(&tmp.path().join("out")),
    );
    assert_eq!(out.len(), llava_v5().len(), "nothing dropped");
    let check = |name: &str, t: f32| {
        let expected: Vec<f32> = a[name]
            .values
            .iter()
            .zip(&b[name].values)
            .map(|(x, y)| t * x + (1.0 - t) * y)
            .collect();
        assert!(close(&out[name].values, &expected), "{name} at t = {t}");
    };
    // text layers 0..4: t = i/3; vision layers 0..2: t = j/1; outside the layers t = 0
    check("model.language_model.layers.1.mlp.up_proj.weight", 1.0 / 3.0);
    check("model.language_model.layers.3.mlp.up_proj.weight", 1.0);
    check(
        "model.vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight",
        1.0,
    );
    check("model.multi_modal_projector.linear_1.weight", 0.0);
}

#[test]
fn merging_only_the_language_model_and_grafting_it_back() {
    for (names, lm) in [
        (llava_v5(), "model.language_model."),
        (llava_hub(), "language_model."),
        (qwen2_vl(), "model."),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        write_model(&tmp.path().join("a"), &names, 1, llava_config());
        write_model(&tmp.path().join("b"), &names, 2, llava_config());
        let compiled = run(
            tmp.path(),
            &format!(
                r#"
model a = "a"
model b = "b"
let text = linear(select(a, "{lm}*") {{ weight: 0.5 }}, select(b, "{lm}*") {{ weight: 0.5 }})
save graft(a, text) to "out"
"#
            ),
        );
        let (a, b, out) = (
            load_folder(&tmp.path().join("a")),
            load_folder(&tmp.path().join("b")),
            load_folder(&tmp.path().join("out")),
        );
        assert_eq!(
            out.keys().collect::<Vec<_>>(),
            a.keys().collect::<Vec<_>>(),
            "every tensor of the target"
        );
        for (name, t) in &out {
            if name.starts_with(lm) {
                let mean: Vec<f32> = a[name]
                    .values
                    .iter()
                    .zip(&b[name].values)
                    .map(|(x, y)| (0.5 * x + 0.5 * y) / 1.0)
                    .collect();
                assert!(close(&t.values, &mean), "{name} is merged");
            } else {
                assert_eq!(t.values, a[name].values, "{name} comes from the target");
            }
        }
        // b's other tensors are not written, and the warning says so (nothing silent)
        let warned = compiled
            .warnings
            .iter()
            .any(|d| d.code == mergec::diag::Code::W0002 && d.message.contains("`b`"));
        assert!(warned, "{lm}: expected W0002 for b");
    }
}

#[test]
fn a_text_only_decoder_renamed_into_a_vlm() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(&tmp.path().join("vlm"), &llava_v5(), 1, llava_config());
    write_model(
        &tmp.path().join("text"),
        &llama_text(),
        2,
        json!({"num_hidden_layers": 4}),
    );
    run(
        tmp.path(),
        r#"
model vlm = "vlm"
model text = "text"
let decoder = rename(select(text, "model.*"), "model.", "model.language_model.")
save graft(vlm, linear(select(vlm, "model.language_model.*") { weight: 0.5 }, decoder { weight: 0.5 })) to "out"
"#,
    );
    let (vlm, text, out) = (
        load_folder(&tmp.path().join("vlm")),
        load_folder(&tmp.path().join("text")),
        load_folder(&tmp.path().join("out")),
    );
    assert_eq!(out.len(), vlm.len());
    let name = "model.language_model.layers.2.mlp.up_proj.weight";
    let expected: Vec<f32> = vlm[name]
        .values
        .iter()
        .zip(&text["model.layers.2.mlp.up_proj.weight"].values)
        .map(|(x, y)| (0.5 * x + 0.5 * y) / 1.0)
        .collect();
    assert!(close(&out[name].values, &expected));
    assert_eq!(
        out["lm_head.weight"].values, vlm["lm_head.weight"].values,
        "lm_head was not selected"
    );
}

#[test]
fn layer_ranges_cut_the_decoder_and_leave_the_vision_tower() {
    let tmp = tempfile::tempdir().unwrap();
    let config = json!({"architectures": ["Qwen2VLForConditionalGeneration"], "num_hidden_layers": 4,
                        "vision_config": {"depth": 2}, "layer_types": ["a", "b", "c", "d"]});
    write_model(&tmp.path().join("q"), &qwen2_vl(), 1, config);
    run(
        tmp.path(),
        r#"
model q = "q"
save stack(q.layers[0..2], q.layers[1..4]) to "deep"
"#,
    );
    let out = load_folder(&tmp.path().join("deep"));
    let q = load_folder(&tmp.path().join("q"));
    assert!(out.contains_key("model.layers.4.mlp.up_proj.weight"));
    assert!(!out.contains_key("model.layers.5.mlp.up_proj.weight"));
    for name in q.keys().filter(|n| n.starts_with("visual.")) {
        assert_eq!(out[name].values, q[name].values, "{name} passes through");
    }
    assert_eq!(
        out["model.layers.2.mlp.up_proj.weight"].values,
        q["model.layers.1.mlp.up_proj.weight"].values
    );
    let config: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("deep/config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 5);
    assert_eq!(config["layer_types"], json!(["a", "b", "b", "c", "d"]));
    assert_eq!(config["vision_config"]["depth"], 2);
}
