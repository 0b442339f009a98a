//! Tiny PEFT LoRA adapters written with the safetensors crate, and the committed adapter
//! fixtures (`tests/fixtures/conformance/adapters`, `tests/fixtures/adapters`) they make.

use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

/// One tensor to write: name, shape, f32 values, stored dtype.
pub struct Factor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub dtype: Dtype,
}

/// Deterministic values in [-scale, scale): a 64-bit LCG keyed by `seed`.
pub fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (x >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            (2.0 * u - 1.0) * scale
        })
        .collect()
}

pub fn factor(name: &str, shape: &[usize], seed: u64) -> Factor {
    let n = shape.iter().product();
    Factor {
        name: name.to_string(),
        shape: shape.to_vec(),
        values: values(seed, n, 0.5),
        dtype: Dtype::F32,
    }
}

fn bytes_of(f: &Factor) -> Vec<u8> {
    match f.dtype {
        Dtype::BF16 => f
            .values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        Dtype::F16 => f
            .values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        _ => f.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
pub fn write_adapter(dir: &Path, config: &Value, factors: &[Factor]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(config).unwrap() + "\n",
    )
    .unwrap();
    let data: Vec<Vec<u8>> = factors.iter().map(bytes_of).collect();
    let views: Vec<(&str, TensorView)> = factors
        .iter()
        .zip(&data)
        .map(|(f, d)| {
            (
                f.name.as_str(),
                TensorView::new(f.dtype, f.shape.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
}

/// PEFT's saved name of a factor: `base_model.model.<module>.lora_<A|B>.weight`.
pub fn peft_name(module: &str, part: &str) -> String {
    format!("base_model.model.{module}.lora_{part}.weight")
}

/// A PEFT config with the given rank, alpha and targets (and PEFT's usual other fields).
pub fn lora_config(r: usize, alpha: f64, targets: Value) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "micro-llama-base-f32",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "target_modules": targets,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// The 4-layer micro-llama's q_proj [32, 32] and v_proj [16, 32] factors of rank `r`.
pub fn attention_factors(r: usize) -> Vec<Factor> {
    let mut out = Vec::new();
    for layer in 0..4 {
        for (proj, rows) in [("q_proj", 32), ("v_proj", 16)] {
            let module = format!("model.layers.{layer}.self_attn.{proj}");
            let seed = layer as u64 * 10 + rows as u64;
            out.push(factor(&peft_name(&module, "A"), &[r, 32], seed));
            out.push(factor(&peft_name(&module, "B"), &[rows, r], seed + 1));
        }
    }
    out
}

/// Writes every committed adapter fixture under `fixtures` (`tests/fixtures`).
pub fn write_fixtures(fixtures: &Path) {
    let good = fixtures.join("conformance/adapters");
    // A rank-4 adapter on every attention q_proj and v_proj of micro-llama.
    write_adapter(
        &good.join("micro-llama-lora-f32"),
        &lora_config(4, 8.0, json!(["q_proj", "v_proj"])),
        &attention_factors(4),
    );
    let bad = fixtures.join("adapters");
    // The config has no rank.
    let mut no_rank = lora_config(4, 8.0, json!(["q_proj"]));
    no_rank.as_object_mut().unwrap().remove("r");
    write_adapter(&bad.join("no-rank"), &no_rank, &attention_factors(4));
    // A DoRA adapter.
    let mut dora = lora_config(4, 8.0, json!(["q_proj", "v_proj"]));
    dora["use_dora"] = json!(true);
    write_adapter(&bad.join("dora"), &dora, &attention_factors(4));
    // Trained on a model with a wider q_proj (48 inputs).
    let mut wide = attention_factors(4);
    wide[0] = factor(&peft_name("model.layers.0.self_attn.q_proj", "A"), &[4, 48], 1);
    write_adapter(
        &bad.join("wide-q-proj"),
        &lora_config(4, 8.0, json!(["q_proj", "v_proj"])),
        &wide,
    );
    // Adapts a module the model lacks.
    let mut extra = attention_factors(4);
    extra.push(factor(
        &peft_name("model.layers.0.self_attn.qkv_proj", "A"),
        &[4, 32],
        5,
    ));
    extra.push(factor(
        &peft_name("model.layers.0.self_attn.qkv_proj", "B"),
        &[64, 4],
        6,
    ));
    write_adapter(
        &bad.join("unknown-module"),
        &lora_config(4, 8.0, json!(["q_proj", "v_proj", "qkv_proj"])),
        &extra,
    );
    // Saves lm_head whole over a resized vocabulary (66 tokens instead of 64).
    let mut resized = lora_config(4, 8.0, json!(["q_proj", "v_proj"]));
    resized["modules_to_save"] = json!(["lm_head"]);
    let mut with_head = attention_factors(4);
    with_head.push(factor("base_model.model.lm_head.weight", &[66, 32], 7));
    write_adapter(&bad.join("resized-vocab"), &resized, &with_head);
    // Factors of v_proj that `target_modules` leaves out (PEFT does not load them).
    write_adapter(
        &bad.join("untargeted"),
        &lora_config(4, 8.0, json!(["q_proj"])),
        &attention_factors(4),
    );
    // Targets only layers the model does not have: nothing to change.
    let mut nothing = lora_config(4, 8.0, json!(["q_proj", "v_proj"]));
    nothing["layers_to_transform"] = json!([7]);
    write_adapter(&bad.join("no-effect"), &nothing, &attention_factors(4));
    // Only PyTorch weights.
    let bin = bad.join("bin-only");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("adapter_config.json"),
        serde_json::to_string_pretty(&lora_config(4, 8.0, json!(["q_proj"]))).unwrap() + "\n",
    )
    .unwrap();
    std::fs::write(bin.join("adapter_model.bin"), b"PK\x03\x04 not a real pickle").unwrap();
}
