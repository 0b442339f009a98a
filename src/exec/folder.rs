//! What goes into an output folder besides the weights: config.json from the donor with
//! dtype and layer count updated, the donor's tokenizer and generation files, a model card.

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::io::{DType, OutputSpec};
use crate::plan::Step;
use crate::sema::hir;

/// The writer spec of output `index`, whose tensors are `steps` (in write order).
pub(crate) fn output_spec(program: &hir::Program, index: usize, steps: &[&Step], force: bool) -> OutputSpec {
    let out = &program.outputs[index];
    let tensors = steps
        .iter()
        .map(|s| (s.tensor.clone(), s.dtype, s.shape.clone()))
        .collect();
    let config = out
        .config_from
        .and_then(|m| program.model(m).info.config.clone())
        .map(|c| updated_config(c, out, steps));
    let copied_files = out
        .tokenizer_from
        .map(|m| {
            program
                .model(m)
                .info
                .donor_files
                .iter()
                .filter_map(|p| Some((p.file_name()?.to_string_lossy().into_owned(), p.clone())))
                .filter(|(name, _)| name != "README.md")
                .collect()
        })
        .unwrap_or_default();
    let mut protected: Vec<PathBuf> = Vec::new();
    for m in &program.models {
        protected.extend(m.info.protected_paths());
    }
    OutputSpec {
        dir: out.dir.clone(),
        max_shard_bytes: out.max_shard_bytes,
        tensors,
        config,
        copied_files,
        generated_files: vec![("README.md".to_string(), model_card(program, out).into_bytes())],
        force,
        protected,
    }
}

/// The dtype that config.json records: the save's, else the first float tensor's.
fn config_dtype(out: &hir::Output, steps: &[&Step]) -> Option<DType> {
    out.dtype
        .or_else(|| steps.iter().map(|s| s.dtype).find(|d| d.is_mergeable()))
}

fn updated_config(mut config: Map<String, Value>, out: &hir::Output, steps: &[&Step]) -> Map<String, Value> {
    if let Some(dtype) = config_dtype(out, steps) {
        let name = Value::String(dtype.torch_name().to_string());
        let mut set_any = false;
        for key in ["torch_dtype", "dtype"] {
            if config.contains_key(key) {
                config.insert(key.to_string(), name.clone());
                set_any = true;
            }
        }
        if !set_any {
            config.insert("torch_dtype".to_string(), name);
        }
    }
    if let Some(layers) = out.layer_count {
        for key in ["num_hidden_layers", "n_layer", "num_layers"] {
            if let Some(v) = config.get_mut(key) {
                if v.is_u64() {
                    *v = Value::from(layers as u64);
                }
            }
        }
        if let Some(Value::Object(text)) = config.get_mut("text_config") {
            if let Some(v) = text.get_mut("num_hidden_layers") {
                *v = Value::from(layers as u64);
            }
        }
    }
    config
}

/// A Hugging Face model card: YAML front matter, the inputs, and the script itself.
fn model_card(program: &hir::Program, out: &hir::Output) -> String {
    let hub_ids: Vec<String> = out
        .inputs
        .iter()
        .filter_map(|m| {
            let reference = &program.model(*m).info.reference;
            let id = reference.strip_prefix("hf:")?;
            Some(id.split('@').next().unwrap_or(id).to_string())
        })
        .collect();
    let mut card = String::from("---\n");
    if !hub_ids.is_empty() {
        card.push_str("base_model:\n");
        for id in &hub_ids {
            card.push_str(&format!("- {id}\n"));
        }
    }
    card.push_str("library_name: transformers\ntags:\n- merge\n- mergec\n---\n\n");
    let title = out
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged model".to_string());
    card.push_str(&format!(
        "# {title}\n\nThis model is a merge of pre-trained language models, made with mergec.\n\n"
    ));
    card.push_str("## Inputs\n\n");
    for m in &out.inputs {
        let model = program.model(*m);
        card.push_str(&format!("- `{}`: `{}`\n", model.name, model.info.reference));
    }
    card.push_str(&format!(
        "\nSeed of the random masks (`set seed`): {}.\n",
        program.seed
    ));
    card.push_str("\n## Script\n\nThe output was produced by this script:\n\n```merge\n");
    card.push_str(program.script_text.trim_end());
    card.push_str("\n```\n");
    card
}
