//! Layer surgery beyond the mergekit fixtures: per-layer config lists that follow the
//! stack, a stack that repeats layers (read once), tied embeddings, chat templates, and the
//! diagnostics of bad ranges.

mod common;

use std::path::Path;

use common::*;
use mergec::io::DType;
use mergec::synth::{self, SynthSpec};
use serde_json::{json, Value};

/// A tiny synthetic model with a `layer_types` list and a sliding-window pattern naming
/// each layer after the model (`A0`..`A3`), so the output's lists show each layer's source.
fn model_with_layer_lists(dir: &Path, tag: &str, variant: u32, tied: bool) {
    let mut spec = SynthSpec::tiny(variant);
    spec.dtype = DType::F32;
    spec.tie_embeddings = tied;
    synth::write_model(&spec, dir, true).unwrap();
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let names: Vec<Value> = (0..4).map(|i| json!(format!("{tag}{i}"))).collect();
    config["layer_types"] = Value::Array(names);
    config["sliding_window_pattern"] = json!([true, false, true, false]);
    config["text_config"] = json!({ "num_hidden_layers": 4, "layer_types": [format!("{tag}t0"), format!("{tag}t1"), format!("{tag}t2"), format!("{tag}t3")] });
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), br#"{"model_max_length": 128}"#).unwrap();
}

fn compile_and_run(dir: &Path, script: &str) -> mergec::driver::Compiled {
    let script = mergec::driver::Script::from_text("s.merge", script.to_string(), dir.to_path_buf());
    let compiled = match mergec::driver::compile(&script, false, &mergec::plan::Limits::default()) {
        Ok(c) => c,
        Err(d) => panic!("{}", render(&script, &d)),
    };
    run_compiled(&compiled, 2);
    compiled
}

#[test]
fn a_stack_that_repeats_layers_follows_the_config_and_reads_each_layer_once() {
    let tmp = tempfile::tempdir().unwrap();
    model_with_layer_lists(&tmp.path().join("a"), "A", 1, false);
    model_with_layer_lists(&tmp.path().join("b"), "B", 2, false);
    let compiled = compile_and_run(
        tmp.path(),
        r#"
model a = "a"
model b = "b"
save stack(a.layers[0..3], b.layers[1..4], a.layers[2..4]) to "out"
"#,
    );
    let out = tmp.path().join("out");
    let config: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 8);
    assert_eq!(
        config["layer_types"],
        json!(["A0", "A1", "A2", "B1", "B2", "B3", "A2", "A3"])
    );
    assert_eq!(
        config["sliding_window_pattern"],
        json!([true, false, true, false, true, false, true, false])
    );
    assert_eq!(config["text_config"]["num_hidden_layers"], 8);
    assert_eq!(
        config["text_config"]["layer_types"],
        json!(["At0", "At1", "At2", "Bt1", "Bt2", "Bt3", "At2", "At3"])
    );
    assert_eq!(config["tie_word_embeddings"], false);

    let a = load_folder(&tmp.path().join("a"));
    let b = load_folder(&tmp.path().join("b"));
    let merged = load_folder(&out);
    let sources = [
        (&a, 0),
        (&a, 1),
        (&a, 2),
        (&b, 1),
        (&b, 2),
        (&b, 3),
        (&a, 2),
        (&a, 3),
    ];
    for (i, (model, layer)) in sources.iter().enumerate() {
        for (name, t) in model
            .iter()
            .filter(|(n, _)| n.starts_with(&format!("model.layers.{layer}.")))
        {
            let out_name = name.replacen(
                &format!("model.layers.{layer}."),
                &format!("model.layers.{i}."),
                1,
            );
            assert_eq!(merged[&out_name].values, t.values, "{out_name}");
        }
    }
    // embeddings from the first segment, final norm and lm_head from the last (both `a`)
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] {
        assert_eq!(merged[name].values, a[name].values, "{name}");
    }
    assert_eq!(merged.len(), 8 * 9 + 3);
    // layer 2 of `a` is written twice but read once: the plan reads each input tensor once
    let unique: u64 = compiled
        .program
        .models
        .iter()
        .map(|m| m.info.total_bytes())
        .sum::<u64>();
    assert!(compiled.plan.read_bytes < unique, "only the used layers are read");
    let read_layers_a = compiled
        .plan
        .steps
        .iter()
        .flat_map(|s| &s.inputs)
        .filter(|i| {
            i.tensor == "model.layers.2.mlp.up_proj.weight"
                && compiled.program.models[i.model.0 as usize].name == "a"
        })
        .count();
    assert_eq!(read_layers_a, 2, "used by two output layers");
    let graph_loads = compiled
        .graph
        .nodes
        .node_weights()
        .filter(|n| matches!(&n.op, mergec::graph::Op::Load { tensor, .. } if tensor == "model.layers.2.mlp.up_proj.weight"))
        .count();
    assert_eq!(
        graph_loads, 2,
        "one load per model, shared by both uses of a's layer 2"
    );
}

#[test]
fn tied_embeddings_stay_tied_and_explicit_donors_are_used() {
    let tmp = tempfile::tempdir().unwrap();
    model_with_layer_lists(&tmp.path().join("t"), "T", 1, true);
    model_with_layer_lists(&tmp.path().join("u"), "U", 2, false);
    compile_and_run(
        tmp.path(),
        r#"
model t = "t"
model u = "u"
# a tied model stacked on itself: no lm_head, tie_word_embeddings stays true
save stack(t.layers[0..2], t.layers[2..4], t.layers[1..3]) to "tied"
# explicit donors: embeddings from u, final norm and lm_head from u as well
save stack(t.layers[0..2], t.layers[2..4], embed: u, head: u) to "untied"
"#,
    );
    let tied = load_folder(&tmp.path().join("tied"));
    assert!(!tied.contains_key("lm_head.weight"));
    let config: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("tied/config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["num_hidden_layers"], 6);

    let untied = load_folder(&tmp.path().join("untied"));
    let u = load_folder(&tmp.path().join("u"));
    assert_eq!(untied["lm_head.weight"].values, u["lm_head.weight"].values);
    assert_eq!(
        untied["model.embed_tokens.weight"].values,
        u["model.embed_tokens.weight"].values
    );
    let config: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("untied/config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], false);
}

#[test]
fn blended_ranges_follow_their_own_layer_positions() {
    // The SOLAR smooth seam: within a 3-layer blend, t = 0, 0.5, 1 whatever its place in the stack.
    let tmp = tempfile::tempdir().unwrap();
    model_with_layer_lists(&tmp.path().join("a"), "A", 1, false);
    model_with_layer_lists(&tmp.path().join("b"), "B", 2, false);
    compile_and_run(
        tmp.path(),
        r#"
model a = "a"
model b = "b"
save stack(
    a.layers[0..2],
    linear(a.layers[1..4] { weight: [1, 0] }, b.layers[0..3] { weight: [0, 1] }),
    b.layers[3..4],
) to "seam"
"#,
    );
    let (a, b) = (
        load_folder(&tmp.path().join("a")),
        load_folder(&tmp.path().join("b")),
    );
    let seam = load_folder(&tmp.path().join("seam"));
    let name = |l: usize| format!("model.layers.{l}.mlp.up_proj.weight");
    for (local, t) in [(0usize, 0.0f32), (1, 0.5), (2, 1.0)] {
        let out = &seam[&name(2 + local)].values;
        let (x, y) = (&a[&name(1 + local)].values, &b[&name(local)].values);
        for k in 0..out.len() {
            let expected = ((1.0 - t) * x[k] + t * y[k]) / 1.0;
            assert!(
                (out[k] - expected).abs() <= 1e-6 * expected.abs().max(1.0),
                "layer {local}: {} vs {expected}",
                out[k]
            );
        }
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("seam/config.json")).unwrap()).unwrap();
    assert_eq!(config["layer_types"], json!(["A0", "A1", "A1", "A2", "A3", "B3"]));
}

#[test]
fn chat_templates_by_name_or_text() {
    let tmp = tempfile::tempdir().unwrap();
    model_with_layer_lists(&tmp.path().join("a"), "A", 1, false);
    compile_and_run(
        tmp.path(),
        r#"
model a = "a"
save a to "named" { chat_template: "chatml" }
save a to "literal" { chat_template: "{% for m in messages %}{{ m['content'] }}{% endfor %}" }
"#,
    );
    let named = std::fs::read_to_string(tmp.path().join("named/chat_template.jinja")).unwrap();
    assert!(named.contains("<|im_start|>"));
    let tokenizer: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("named/tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tokenizer["chat_template"].as_str().unwrap(), named);
    assert_eq!(
        tokenizer["model_max_length"], 128,
        "the donor's settings are kept"
    );
    let literal = std::fs::read_to_string(tmp.path().join("literal/chat_template.jinja")).unwrap();
    assert_eq!(literal, "{% for m in messages %}{{ m['content'] }}{% endfor %}");
    let card = std::fs::read_to_string(tmp.path().join("named/README.md")).unwrap();
    assert!(card.contains("## Script"));
}
