//! PEFT LoRA adapters applied in the graph: `lora(m, "adapter")` and mergekit's
//! `model+lora` references, checked against a straightforward computation of
//! W + scale·(alpha/r)·B·A here, for every form PEFT saves (rank and alpha patterns,
//! rslora, fan_in_fan_out, modules_to_save, embedding adapters, adapter names).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::adapters::*;
use common::*;
use serde_json::json;

fn models() -> PathBuf {
    conformance_dir().join("models")
}

/// Compiles and runs `script` (with `MODELS` and `ADAPTER` substituted) in `dir`; returns
/// the tensors of `out/x`.
fn run(script: &str, dir: &Path, adapter: &Path) -> BTreeMap<String, Tensor> {
    let text = script
        .replace("MODELS", &models().display().to_string())
        .replace("ADAPTER", &adapter.display().to_string());
    let out = dir.join("out");
    let (_, compiled) = match compile_text(&text, dir, &out) {
        Ok(c) => c,
        Err((s, d)) => panic!("{}", render(&s, &d)),
    };
    run_compiled(&compiled, 2);
    load_folder(&out.join("x"))
}

fn check_errors(script: &str, dir: &Path, adapter: &Path) -> String {
    let text = script
        .replace("MODELS", &models().display().to_string())
        .replace("ADAPTER", &adapter.display().to_string());
    match compile_text(&text, dir, &dir.join("out")) {
        Ok((s, c)) => format!("ok\n{}", render(&s, &c.warnings)),
        Err((s, d)) => render(&s, &d),
    }
}

/// `W + s·B·A` in f64 (or its transpose added when `transpose`), as the test computes it.
fn expected(w: &[f32], b: &Factor, a: &Factor, s: f64, transpose: bool) -> Vec<f64> {
    let (p, r, q) = (b.shape[0], b.shape[1], a.shape[1]);
    let mut out: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    for i in 0..p {
        for j in 0..q {
            let mut acc = 0f64;
            for k in 0..r {
                acc += b.values[i * r + k] as f64 * a.values[k * q + j] as f64;
            }
            let at = if transpose { j * p + i } else { i * q + j };
            out[at] += s * acc;
        }
    }
    out
}

fn assert_close(ours: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(ours.len(), want.len(), "{what}");
    for (i, (o, w)) in ours.iter().zip(want).enumerate() {
        assert!(
            (*o as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {o} vs {w}"
        );
    }
}

fn find<'a>(factors: &'a [Factor], module: &str, part: &str) -> &'a Factor {
    factors
        .iter()
        .find(|f| {
            f.name.contains(&format!("{module}.lora_{part}"))
                || f.name.contains(&format!("{module}.lora_embedding_{part}"))
        })
        .unwrap_or_else(|| panic!("no {part} for {module}"))
}

const APPLY: &str = r#"
model base = "MODELS/micro-llama-base-f32"
save lora(base, "ADAPTER") to "out/x"
"#;

#[test]
fn applies_each_module_as_peft_merges_it() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    let factors = attention_factors(4);
    write_adapter(
        &adapter,
        &lora_config(4, 8.0, json!(["q_proj", "v_proj"])),
        &factors,
    );
    let base = load_folder(&models().join("micro-llama-base-f32"));
    let out = run(APPLY, tmp.path(), &adapter);
    assert_eq!(out.len(), base.len());
    let mut adapted = 0;
    for (name, t) in &out {
        let module = name.trim_end_matches(".weight");
        if module.ends_with("q_proj") || module.ends_with("v_proj") {
            let want = expected(
                &base[name].values,
                find(&factors, module, "B"),
                find(&factors, module, "A"),
                8.0 / 4.0,
                false,
            );
            assert_close(&t.values, &want, 1e-6, name);
            adapted += 1;
        } else {
            assert_eq!(t.values, base[name].values, "{name} must be untouched");
        }
    }
    assert_eq!(adapted, 8);
    // the adapter's weights are read in place: nothing but the output is written
    let written: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(written.len(), 2, "{written:?}");
}

#[test]
fn scale_rank_and_alpha_patterns_and_adapter_names() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    let mut config = lora_config(4, 8.0, json!(["q_proj", "v_proj"]));
    // q_proj of layer 1 has rank 2; every v_proj has alpha 2
    config["rank_pattern"] = json!({"layers.1.self_attn.q_proj": 2});
    config["alpha_pattern"] = json!({"v_proj": 2});
    let mut factors = attention_factors(4);
    for f in &mut factors {
        if f.name.contains("layers.1.self_attn.q_proj") {
            *f = if f.name.contains("lora_A") {
                factor(&f.name, &[2, 32], 91)
            } else {
                factor(&f.name, &[32, 2], 92)
            };
        }
        // older PEFT files keep the adapter name
        f.name = f.name.replace(".lora_A.weight", ".lora_A.default.weight");
    }
    write_adapter(&adapter, &config, &factors);
    let base = load_folder(&models().join("micro-llama-base-f32"));
    let out = run(
        r#"
model base = "MODELS/micro-llama-base-f32"
save lora(base, "ADAPTER", scale: 0.5) to "out/x"
"#,
        tmp.path(),
        &adapter,
    );
    for layer in 0..4 {
        for proj in ["q_proj", "v_proj"] {
            let module = format!("model.layers.{layer}.self_attn.{proj}");
            let (r, alpha) = match (layer, proj) {
                (1, "q_proj") => (2.0, 8.0),
                (_, "q_proj") => (4.0, 8.0),
                _ => (4.0, 2.0),
            };
            let name = format!("{module}.weight");
            let want = expected(
                &base[&name].values,
                find(&factors, &module, "B"),
                find(&factors, &module, "A"),
                0.5 * alpha / r,
                false,
            );
            assert_close(&out[&name].values, &want, 1e-6, &name);
        }
    }
}

#[test]
fn rslora_scales_by_the_square_root_of_the_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    let mut config = lora_config(4, 8.0, json!("model\\.layers\\.[0-3]\\.self_attn\\.(q|v)_proj"));
    config["use_rslora"] = json!(true);
    let factors = attention_factors(4);
    write_adapter(&adapter, &config, &factors);
    let base = load_folder(&models().join("micro-llama-base-f32"));
    let out = run(APPLY, tmp.path(), &adapter);
    let module = "model.layers.2.self_attn.v_proj";
    let name = format!("{module}.weight");
    let want = expected(
        &base[&name].values,
        find(&factors, module, "B"),
        find(&factors, module, "A"),
        8.0 / 2.0, // alpha / sqrt(4)
        false,
    );
    assert_close(&out[&name].values, &want, 1e-6, &name);
}

#[test]
fn modules_to_save_and_embedding_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    let mut config = lora_config(4, 16.0, json!(["q_proj", "v_proj", "embed_tokens"]));
    config["modules_to_save"] = json!(["lm_head"]);
    let mut factors = attention_factors(4);
    // embedding factors: A [r, vocab], B [hidden, r]; PEFT saves them without `.weight`
    factors.push(factor(
        "base_model.model.model.embed_tokens.lora_embedding_A",
        &[4, 64],
        70,
    ));
    factors.push(factor(
        "base_model.model.model.embed_tokens.lora_embedding_B",
        &[32, 4],
        71,
    ));
    let head = factor("base_model.model.lm_head.weight", &[64, 32], 72);
    let head_values = head.values.clone();
    factors.push(head);
    write_adapter(&adapter, &config, &factors);
    let base = load_folder(&models().join("micro-llama-base-f32"));
    let out = run(APPLY, tmp.path(), &adapter);
    assert_eq!(
        out["lm_head.weight"].values, head_values,
        "lm_head is replaced whole"
    );
    let name = "model.embed_tokens.weight";
    let want = expected(
        &base[name].values,
        find(&factors, "model.embed_tokens", "B"),
        find(&factors, "model.embed_tokens", "A"),
        16.0 / 4.0,
        true,
    );
    assert_close(&out[name].values, &want, 1e-6, name);
}

/// A GPT-2-style model whose linear layers store [in, out] (transformers' Conv1D).
fn write_conv1d_model(dir: &Path) {
    let tensors = [
        factor("transformer.h.0.attn.c_attn.weight", &[8, 24], 1),
        factor("transformer.h.0.attn.c_proj.weight", &[8, 8], 2),
        factor("transformer.h.0.ln_1.weight", &[8], 3),
        factor("transformer.wte.weight", &[16, 8], 4),
    ];
    write_adapter(dir, &json!({}), &tensors);
    std::fs::rename(
        dir.join("adapter_model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2", "n_layer": 1}"#).unwrap();
}

#[test]
fn fan_in_fan_out_adds_the_transposed_product() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("gpt");
    write_conv1d_model(&model);
    let adapter = tmp.path().join("adapter");
    let mut config = lora_config(2, 4.0, json!(["c_attn"]));
    config["fan_in_fan_out"] = json!(true);
    // Conv1D [in 8, out 24]: A [r, in], B [out, r]
    let factors = vec![
        factor(&peft_name("transformer.h.0.attn.c_attn", "A"), &[2, 8], 11),
        factor(&peft_name("transformer.h.0.attn.c_attn", "B"), &[24, 2], 12),
    ];
    write_adapter(&adapter, &config, &factors);
    let script = format!(
        "model gpt = \"{}\"\nsave lora(gpt, \"ADAPTER\") to \"out/x\"\n",
        model.display()
    );
    let out = run(&script, tmp.path(), &adapter);
    let base = load_folder(&model);
    let name = "transformer.h.0.attn.c_attn.weight";
    let want = expected(&base[name].values, &factors[1], &factors[0], 2.0, true);
    assert_close(&out[name].values, &want, 1e-6, name);
}

#[test]
fn bf16_compute_rounds_as_peft_merges_in_the_models_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    let mut factors = attention_factors(4);
    for f in &mut factors {
        f.dtype = safetensors::Dtype::BF16;
        f.values = f
            .values
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect();
    }
    write_adapter(
        &adapter,
        &lora_config(4, 8.0, json!(["q_proj", "v_proj"])),
        &factors,
    );
    let base = load_folder(&models().join("micro-llama-base-bf16"));
    let script = r#"
model base = "MODELS/micro-llama-base-bf16"
save lora(base, "ADAPTER") to "out/x" { compute: bf16 }
"#;
    let out = run(script, tmp.path(), &adapter);
    let module = "model.layers.3.self_attn.q_proj";
    let name = format!("{module}.weight");
    let zero = vec![0f32; base[&name].values.len()];
    let delta = expected(
        &zero,
        find(&factors, module, "B"),
        find(&factors, module, "A"),
        2.0,
        false,
    );
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();
    for (i, (o, w)) in out[&name].values.iter().zip(&base[&name].values).enumerate() {
        // the f32 delta rounded to bf16, added, the sum rounded to bf16
        let want = bf(w + bf(delta[i] as f32));
        assert!(
            (o - want).abs() <= (want.abs() * 2f32.powi(-8)).max(1e-30),
            "{name}[{i}]: {o} vs {want}"
        );
    }
    assert_eq!(out[&name].dtype, "BF16");
}

#[test]
fn check_refuses_adapters_that_do_not_fit() {
    let bad = repo().join("tests/fixtures/adapters");
    let tmp = tempfile::tempdir().unwrap();
    for (fixture, code) in [
        ("no-rank", "E0902"),
        ("dora", "E0903"),
        ("wide-q-proj", "E0905"),
        ("unknown-module", "E0904"),
        ("resized-vocab", "E0906"),
        ("bin-only", "E0901"),
        ("missing", "E0901"),
    ] {
        let rendered = check_errors(APPLY, tmp.path(), &bad.join(fixture));
        assert!(rendered.contains(&format!("[{code}]")), "{fixture}:\n{rendered}");
        assert!(!rendered.starts_with("ok"), "{fixture}:\n{rendered}");
    }
    let rendered = check_errors(APPLY, tmp.path(), &bad.join("untargeted"));
    assert!(
        rendered.starts_with("ok") && rendered.contains("[W0020]"),
        "{rendered}"
    );
    let rendered = check_errors(APPLY, tmp.path(), &bad.join("no-effect"));
    assert!(rendered.contains("[W0021]"), "{rendered}");
}

#[test]
fn committed_fixtures_are_what_the_generator_writes() {
    let tmp = tempfile::tempdir().unwrap();
    write_fixtures(tmp.path());
    if std::env::var_os("MERGEC_WRITE_FIXTURES").is_some() {
        write_fixtures(&repo().join("tests/fixtures"));
    }
    for dir in [
        "conformance/adapters/micro-llama-lora-f32",
        "adapters/dora",
        "adapters/resized-vocab",
    ] {
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            let ours = std::fs::read(tmp.path().join(dir).join(file)).unwrap();
            let committed = std::fs::read(repo().join("tests/fixtures").join(dir).join(file))
                .unwrap_or_else(|e| panic!("{dir}/{file}: {e} (MERGEC_WRITE_FIXTURES=1 writes it)"));
            assert_eq!(
                ours, committed,
                "{dir}/{file} (MERGEC_WRITE_FIXTURES=1 rewrites it)"
            );
        }
    }
}

/// Translates and runs a mergekit YAML from the conformance folder; returns the output.
fn run_yaml(yaml: &str, out: &Path) -> BTreeMap<String, Tensor> {
    use mergec::import::{self, Options};
    let opts = Options::new("config.yml", &conformance_dir(), out);
    let imp = match import::translate("config.yml", yaml.to_string(), &opts) {
        Ok(i) => i,
        Err(f) => panic!(
            "{}",
            mergec::diag::render::render_text(&f.diagnostics.0, &f.sources, false)
        ),
    };
    assert!(imp.text().contains("lora("), "{}", imp.text());
    let (_, compiled) = imp
        .compile(false, &mergec::plan::Limits::default())
        .unwrap_or_else(|(s, d)| panic!("{}\n{}", imp.text(), render(&s, &d)));
    run_compiled(&compiled, 2);
    load_folder(out)
}

#[test]
fn mergekit_plus_lora_references_run() {
    let tmp = tempfile::tempdir().unwrap();
    // `+lora` on a model, on the base model, and as a `{model, lora}` map in slices
    let yaml = r#"
models:
  - model: models/micro-llama-ft1-f32+adapters/micro-llama-lora-f32
    parameters: {weight: 0.5}
  - model: models/micro-llama-ft2-f32
    parameters: {weight: 0.5}
merge_method: task_arithmetic
base_model: models/micro-llama-base-f32+adapters/micro-llama-lora-f32
dtype: float32
"#;
    let ours = run_yaml(yaml, &tmp.path().join("yaml"));
    let script = format!(
        r#"
model base = "{m}/micro-llama-base-f32"
model ft1 = "{m}/micro-llama-ft1-f32"
model ft2 = "{m}/micro-llama-ft2-f32"
let base_l = lora(base, "ADAPTER")
let ft1_l = lora(ft1, "ADAPTER")
save task_arithmetic(base_l, ft1_l {{ weight: 0.5 }}, ft2 {{ weight: 0.5 }}) to "out/x" {{ compute: f32 }}
"#,
        m = models().display()
    );
    let adapter = conformance_dir().join("adapters/micro-llama-lora-f32");
    let by_hand = run(&script, &tmp.path().join("hand"), &adapter);
    assert_eq!(ours.len(), by_hand.len());
    for (name, t) in &by_hand {
        assert_eq!(ours[name].values, t.values, "{name}");
    }
    // the adapter changed what it targets: ft2's q_proj moved by -0.5·delta
    let plain = load_folder(&models().join("micro-llama-ft2-f32"));
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_ne!(ours[q].values, plain[q].values);

    let slices = r#"
slices:
  - sources:
      - model: {model: models/micro-llama-ft1-f32, lora: adapters/micro-llama-lora-f32}
        layer_range: [0, 2]
  - sources:
      - model: models/micro-llama-ft2-f32+adapters/micro-llama-lora-f32
        layer_range: [2, 4]
merge_method: passthrough
dtype: float32
"#;
    let stacked = run_yaml(slices, &tmp.path().join("slices"));
    let ft1 = load_folder(&models().join("micro-llama-ft1-f32"));
    let name = "model.layers.1.self_attn.v_proj.weight";
    let factors = attention_factors(4);
    let module = "model.layers.1.self_attn.v_proj";
    let want = expected(
        &ft1[name].values,
        find(&factors, module, "B"),
        find(&factors, module, "A"),
        2.0,
        false,
    );
    assert_close(&stacked[name].values, &want, 1e-6, name);
}

#[test]
fn mergekit_moe_takes_plus_lora_models() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = r#"
base_model: models/micro-llama-base-f32+adapters/micro-llama-lora-f32
gate_mode: random
dtype: float32
experts:
  - source_model: models/micro-llama-ft1-f32+adapters/micro-llama-lora-f32
  - source_model: models/micro-llama-ft2-f32
"#;
    let out = run_yaml(yaml, &tmp.path().join("moe"));
    // attention comes from the base, with the adapter applied
    let base = load_folder(&models().join("micro-llama-base-f32"));
    let factors = attention_factors(4);
    let module = "model.layers.2.self_attn.q_proj";
    let name = format!("{module}.weight");
    let want = expected(
        &base[&name].values,
        find(&factors, module, "B"),
        find(&factors, module, "A"),
        2.0,
        false,
    );
    assert_close(&out[&name].values, &want, 1e-6, &name);
}

/// The plan charges the product: its f32 result and both factors in f32, and reads each
/// factor once, by its own size.
#[test]
fn the_plan_counts_the_factors() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = conformance_dir().join("adapters/micro-llama-lora-f32");
    let text = APPLY
        .replace("MODELS", &models().display().to_string())
        .replace("ADAPTER", &adapter.display().to_string());
    let (_, compiled) = compile_text(&text, tmp.path(), &tmp.path().join("out"))
        .unwrap_or_else(|(s, d)| panic!("{}", render(&s, &d)));
    let plan = &compiled.plan;
    let step = plan
        .steps
        .iter()
        .find(|s| s.tensor == "model.layers.0.self_attn.v_proj.weight")
        .unwrap();
    assert!(
        matches!(step.kernel, mergec::plan::Kernel::Whole(_)),
        "{:?}",
        step.kernel
    );
    // W [16, 32] f32, B [16, 4], A [4, 32]
    let sizes: Vec<u64> = step.inputs.iter().map(|i| i.bytes).collect();
    assert_eq!(sizes, vec![16 * 32 * 4, 16 * 4 * 4, 4 * 32 * 4]);
    let working = step.kernel.working_bytes(&step.shape, 1);
    assert!(working >= 4 * 16 * 32 + 4 * 4 * (16 + 32), "{working}");
    // every factor read once: the base's bytes plus the adapter's
    let base_bytes: u64 = plan.model(mergec::sema::hir::ModelId(0)).info.total_bytes();
    let adapter_bytes: u64 = plan.model(mergec::sema::hir::ModelId(1)).info.total_bytes();
    assert_eq!(plan.read_bytes, base_bytes + adapter_bytes);
    assert!(plan.peak_bytes >= working);
}

/// `mergec check` and `mergec run` on a mergekit YAML with `+lora`: the check reads
/// headers only, the run writes the output folder and nothing else.
#[test]
fn cli_checks_and_runs_a_plus_lora_config() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = format!(
        "models:\n  - model: {m}/micro-llama-ft1-f32+{a}\n    parameters: {{weight: 0.5}}\n  - model: {m}/micro-llama-ft2-f32\n    parameters: {{weight: 0.5}}\nmerge_method: linear\ndtype: bfloat16\n",
        m = models().display(),
        a = conformance_dir().join("adapters/micro-llama-lora-f32").display()
    );
    std::fs::write(tmp.path().join("config.yml"), yaml).unwrap();
    let mergec = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mergec"))
            .args(args)
            .current_dir(tmp.path())
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = mergec(&["check", "config.yml"]);
    assert!(ok, "{text}");
    assert!(text.contains("from 2 models and 1 adapter"), "{text}");
    let (ok, text) = mergec(&["run", "config.yml", "merged"]);
    assert!(ok, "{text}");
    let mut entries: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["config.yml", "merged"]);
    let merged = load_folder(&tmp.path().join("merged"));
    assert_eq!(merged["model.layers.0.self_attn.q_proj.weight"].dtype, "BF16");
}

/// Factors that contradict their own config, or come alone, are refused when the adapter
/// is read (E0905), as PEFT fails to load them.
#[test]
fn factors_must_agree_with_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    // the config says rank 8, the factors have rank 4
    let wrong_rank = tmp.path().join("wrong-rank");
    write_adapter(
        &wrong_rank,
        &lora_config(8, 8.0, json!(["q_proj", "v_proj"])),
        &attention_factors(4),
    );
    let rendered = check_errors(APPLY, tmp.path(), &wrong_rank);
    assert!(
        rendered.contains("[E0905]") && rendered.contains("rank 4"),
        "{rendered}"
    );
    // lora_A without lora_B
    let half = tmp.path().join("half");
    let mut factors = attention_factors(4);
    factors.retain(|f| !f.name.contains("layers.3.self_attn.q_proj.lora_B"));
    write_adapter(&half, &lora_config(4, 8.0, json!(["q_proj", "v_proj"])), &factors);
    let rendered = check_errors(APPLY, tmp.path(), &half);
    assert!(
        rendered.contains("[E0905]") && rendered.contains("only one of its two factors"),
        "{rendered}"
    );
    // exclude_modules leaves layer 0's q_proj as the model has it
    let excluded = tmp.path().join("excluded");
    let mut config = lora_config(4, 8.0, json!(["q_proj", "v_proj"]));
    config["exclude_modules"] = json!("model\\.layers\\.0\\.self_attn\\.q_proj");
    write_adapter(&excluded, &config, &attention_factors(4));
    let out = run(APPLY, tmp.path(), &excluded);
    let base = load_folder(&models().join("micro-llama-base-f32"));
    let q0 = "model.layers.0.self_attn.q_proj.weight";
    let q1 = "model.layers.1.self_attn.q_proj.weight";
    assert_eq!(out[q0].values, base[q0].values);
    assert_ne!(out[q1].values, base[q1].values);
}

/// An f32 model under `compute: bf16`: PEFT merges in f32, and the merged weight is then
/// cast to bf16 once (not the weight cast first and the delta added after).
#[test]
fn bf16_compute_on_an_f32_model_rounds_the_merged_weight_once() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = conformance_dir().join("adapters/micro-llama-lora-f32");
    let script = r#"
model base = "MODELS/micro-llama-base-f32"
save lora(base, "ADAPTER") to "out/x" { compute: bf16, dtype: f32 }
"#;
    let out = run(script, tmp.path(), &adapter);
    let base = load_folder(&models().join("micro-llama-base-f32"));
    let factors = attention_factors(4);
    let module = "model.layers.1.self_attn.v_proj";
    let name = format!("{module}.weight");
    let (b, a) = (find(&factors, module, "B"), find(&factors, module, "A"));
    let (r, q) = (4, 32);
    for (i, (o, w)) in out[&name].values.iter().zip(&base[&name].values).enumerate() {
        // the f32 product summed in rank order, as PEFT's f32 merge, then one rounding
        let (row, col) = (i / q, i % q);
        let mut acc = 0f32;
        for k in 0..r {
            acc += b.values[row * r + k] * a.values[k * q + col];
        }
        let want = half::bf16::from_f32(w + acc * 2.0).to_f32();
        assert_eq!(o.to_bits(), want.to_bits(), "{name}[{i}]: {o} vs {want}");
    }
}
