//! Writing an extraction as a PEFT LoRA adapter folder: `adapter_model.safetensors`
//! (one file, as PEFT loads it) and `adapter_config.json`, through the atomic writer.
//!
//! Tensor names are PEFT's: `base_model.model.<module>.lora_A.weight` (`r × in`),
//! `….lora_B.weight` (`out × r`), `….lora_B.bias` (the bias delta, with `lora_bias`),
//! and `base_model.model.<tensor>` for the tensors of `modules_to_save`. The config sets
//! `lora_alpha = r` (and `alpha_pattern` = `rank_pattern`), so every module's scale
//! `alpha / r` is 1 and `W + B·A` is the fine-tune's weight up to the truncation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{module_of, Decomposed, ExtractError, Extraction};
use crate::io::model::ModelInfo;
use crate::io::writer::{self, ModelWriter, OutputSpec, WrittenModel};
use crate::io::{DType, TensorReader};

pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";
const PREFIX: &str = "base_model.model.";

/// Where and how the adapter is written.
pub struct AdapterSpec<'a> {
    pub out: &'a Path,
    /// The base as the user named it: the config's `base_model_name_or_path`.
    pub base_reference: &'a str,
    pub force: bool,
    /// The input models, which the output may never overwrite.
    pub protected: Vec<PathBuf>,
}

/// Where one output tensor's values come from.
enum Source<'a> {
    A(&'a Decomposed),
    B(&'a Decomposed),
    Bias(DType, &'a [f32]),
    /// A tensor of the fine-tune, copied as it is.
    Whole(&'a str),
}

/// The modules saved whole (`modules_to_save`), in name order.
pub fn saved_modules(extraction: &Extraction) -> Vec<String> {
    let decomposed: BTreeSet<&str> = extraction.modules.iter().map(|d| d.module.as_str()).collect();
    extraction
        .whole
        .iter()
        .map(|name| module_of(name).to_owned())
        .filter(|m| !decomposed.contains(m.as_str()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The tensors of the adapter file, by name (the order they are written in).
fn tensors<'a>(
    extraction: &'a Extraction,
    finetune: &'a ModelInfo,
) -> BTreeMap<String, (DType, Vec<usize>, Source<'a>)> {
    let mut out = BTreeMap::new();
    for d in &extraction.modules {
        let stem = format!("{PREFIX}{}", d.module);
        out.insert(
            format!("{stem}.lora_A.weight"),
            (d.dtype, vec![d.rank, d.cols], Source::A(d)),
        );
        out.insert(
            format!("{stem}.lora_B.weight"),
            (d.dtype, vec![d.rows, d.rank], Source::B(d)),
        );
        if let Some((dtype, delta)) = extraction.biases.get(&d.module) {
            out.insert(
                format!("{stem}.lora_B.bias"),
                (*dtype, vec![delta.len()], Source::Bias(*dtype, delta)),
            );
        }
    }
    // Every tensor of a module saved whole, changed or not: PEFT replaces the module.
    let saved: BTreeSet<String> = saved_modules(extraction).into_iter().collect();
    for (name, info) in &finetune.tensors {
        if saved.contains(module_of(name)) {
            out.insert(
                format!("{PREFIX}{name}"),
                (info.dtype, info.shape.clone(), Source::Whole(name)),
            );
        }
    }
    out
}

/// `target_modules`: the last name component (`q_proj`) where the adapter covers every
/// matrix module of that name, as PEFT matches names by suffix; the full module names
/// otherwise, so no module outside the adapter gets a LoRA layer.
fn target_modules(extraction: &Extraction, finetune: &ModelInfo) -> Vec<String> {
    let decomposed: BTreeSet<&str> = extraction.modules.iter().map(|d| d.module.as_str()).collect();
    let last = |m: &str| m.rsplit('.').next().unwrap_or(m).to_owned();
    let mut by_suffix: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for (name, info) in &finetune.tensors {
        if let Some(module) = name.strip_suffix(".weight") {
            if info.shape.len() == 2 {
                by_suffix.entry(last(module)).or_default().insert(module);
            }
        }
    }
    let suffixes: BTreeSet<String> = decomposed.iter().map(|m| last(m)).collect();
    let covered = suffixes.iter().all(|s| {
        by_suffix
            .get(s)
            .is_some_and(|modules| modules.iter().all(|m| decomposed.contains(m)))
    });
    if covered {
        suffixes.into_iter().collect()
    } else {
        decomposed.into_iter().map(str::to_owned).collect()
    }
}

/// `hf:org/name@rev` as PEFT names it: (`org/name`, Some(`rev`)); a path as given.
fn base_name(reference: &str) -> (String, Option<String>) {
    match reference.strip_prefix("hf:") {
        Some(repo) => match repo.split_once('@') {
            Some((name, rev)) => (name.to_owned(), Some(rev.to_owned())),
            None => (repo.to_owned(), None),
        },
        None => (reference.to_owned(), None),
    }
}

/// adapter_config.json, keys sorted as PEFT writes them.
pub fn config(extraction: &Extraction, finetune: &ModelInfo, base_reference: &str) -> Value {
    let r = extraction.modules.iter().map(|d| d.rank).max().unwrap_or(0);
    let pattern: Map<String, Value> = extraction
        .modules
        .iter()
        .filter(|d| d.rank != r)
        .map(|d| (d.module.clone(), json!(d.rank)))
        .collect();
    let saved = saved_modules(extraction);
    let (name, revision) = base_name(base_reference);
    let mut config = Map::new();
    let mut put = |key: &str, value: Value| {
        config.insert(key.to_owned(), value);
    };
    put("alpha_pattern", Value::Object(pattern.clone()));
    put("base_model_name_or_path", json!(name));
    put("bias", json!("none"));
    put("fan_in_fan_out", json!(false));
    put("inference_mode", json!(true));
    put("init_lora_weights", json!(true));
    put("lora_alpha", json!(r));
    put("lora_bias", json!(!extraction.biases.is_empty()));
    put("lora_dropout", json!(0.0));
    put(
        "modules_to_save",
        if saved.is_empty() {
            Value::Null
        } else {
            json!(saved)
        },
    );
    put("peft_type", json!("LORA"));
    put("r", json!(r));
    put("rank_pattern", Value::Object(pattern));
    put("revision", revision.map_or(Value::Null, Value::from));
    put("target_modules", json!(target_modules(extraction, finetune)));
    put("task_type", json!("CAUSAL_LM"));
    put("use_dora", json!(false));
    put("use_rslora", json!(false));
    Value::Object(config)
}

/// Writes the adapter folder atomically: everything goes to a temporary folder beside
/// `spec.out`, which replaces it only once complete (and an existing folder only with
/// `force`, only one mergec wrote).
pub fn write(
    spec: &AdapterSpec<'_>,
    extraction: &Extraction,
    finetune: &ModelInfo,
    reader: &TensorReader,
) -> Result<WrittenModel, ExtractError> {
    let tensors = tensors(extraction, finetune);
    let mut config_text = serde_json::to_vec_pretty(&config(extraction, finetune, spec.base_reference))
        .map_err(|e| writer::WriteError::BadSpec {
            dir: spec.out.to_path_buf(),
            reason: e.to_string(),
        })?;
    config_text.push(b'\n');
    let output = OutputSpec {
        dir: spec.out.to_path_buf(),
        max_shard_bytes: u64::MAX,
        tensors: tensors
            .iter()
            .map(|(name, (dtype, shape, _))| (name.clone(), *dtype, shape.clone()))
            .collect(),
        config: None,
        copied_files: Vec::new(),
        generated_files: vec![(CONFIG_FILE.to_owned(), config_text.into())],
        force: spec.force,
        protected: spec.protected.clone(),
    };
    let mut out = ModelWriter::create_named(output, WEIGHTS_FILE)?;
    for (name, (dtype, _, source)) in &tensors {
        match source {
            Source::A(d) => out.write_tensor(name, &encode(&d.a, *dtype))?,
            Source::B(d) => out.write_tensor(name, &encode(&d.b, *dtype))?,
            Source::Bias(dtype, delta) => out.write_tensor(name, &encode(delta, *dtype))?,
            Source::Whole(tensor) => {
                let bytes = reader.read(finetune, tensor)?;
                out.write_tensor(name, &bytes)?;
                bytes.release();
            }
        }
    }
    Ok(out.finish()?)
}

/// f32 values in `dtype`'s little-endian storage (rounded to nearest even).
fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut bytes = vec![0u8; values.len() * dtype.size_bytes()];
    crate::exec::cpu::encode(values, dtype, &mut bytes);
    bytes
}
