//! What goes into an output folder besides the weights, decided when the plan is made:
//! config.json from the donor with dtype and layer count updated, the donor's tokenizer and
//! generation files, the model card's text.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::Step;
use crate::io::writer::Contents;
use crate::io::{DType, OutputSpec};
use crate::sema::hir;

/// The writer spec of output `index`, whose tensors are `steps` (in write order).
pub(super) fn output_spec(program: &hir::Program, index: usize, steps: &[&Step], force: bool) -> OutputSpec {
    let out = &program.outputs[index];
    let tensors = match out.moe.as_deref() {
        Some(moe) => moe_tensors(moe, steps),
        None => steps
            .iter()
            .map(|s| (s.tensor.clone(), s.dtype, s.shape.clone()))
            .collect(),
    };
    let config = match out.moe.as_deref() {
        Some(moe) => program
            .model(moe.base)
            .info
            .config
            .clone()
            .map(|c| moe_config(c, out, moe)),
        None => out
            .config_from
            .and_then(|m| program.model(m).info.config.clone())
            .zip(out.config_from)
            .map(|(c, donor)| updated_config(program, donor, c, out, steps)),
    };
    let mut copied_files: Vec<(String, PathBuf)> = out
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
    let mut generated_files = vec![("README.md".to_string(), model_card(program, out))];
    if let Some(yaml) = &program.mergekit_config {
        let shared: Arc<[u8]> = yaml.clone().into();
        generated_files.push(("mergekit_config.yml".to_string(), Contents::from_parts([shared])));
    }
    if let Some(template) = &out.chat_template {
        // The template goes where transformers reads it (chat_template.jinja) and replaces
        // any the donor's tokenizer_config.json or chat_template.json carried.
        copied_files.retain(|(name, _)| name != "chat_template.jinja" && name != "chat_template.json");
        generated_files.push(("chat_template.jinja".to_string(), template.clone().into()));
        if let Some(i) = copied_files
            .iter()
            .position(|(name, _)| name == "tokenizer_config.json")
        {
            // Unreadable now: leave it to the copy, which reports the error with its path.
            if let Some(bytes) = with_chat_template(&copied_files[i].1, template) {
                copied_files.remove(i);
                generated_files.push(("tokenizer_config.json".to_string(), bytes.into()));
            }
        }
    }
    if let Some(json) = out.vocab.as_ref().and_then(|v| v.tokenizer_json.clone()) {
        // The rebuilt vocabulary's tokenizer replaces the donor's.
        copied_files.retain(|(name, _)| name != "tokenizer.json" && name != "tokenizer.model");
        generated_files.retain(|(name, _)| name != "tokenizer.json");
        generated_files.push(("tokenizer.json".to_string(), json.into()));
    }
    OutputSpec {
        dir: out.dir.clone(),
        max_shard_bytes: out.max_shard_bytes,
        tensors,
        config,
        copied_files,
        generated_files,
        force,
        protected,
    }
}

/// A MoE output's tensors in write order: each assembled tensor where its first part is,
/// its other parts dropped, then the generated tensors (routers, zero biases).
fn moe_tensors(moe: &hir::MoeOutput, steps: &[&Step]) -> Vec<(String, DType, Vec<usize>)> {
    let mut out = Vec::with_capacity(steps.len() + moe.generated.len());
    for s in steps {
        match moe.assembled.iter().find(|a| a.parts.contains(&s.tensor)) {
            Some(a) if a.parts.first() == Some(&s.tensor) => {
                out.push((a.name.clone(), a.dtype, a.shape.clone()))
            }
            Some(_) => {}
            None => out.push((s.tensor.clone(), s.dtype, s.shape.clone())),
        }
    }
    out.extend(
        moe.generated
            .iter()
            .map(|g| (g.name.clone(), g.dtype, g.shape.clone())),
    );
    out
}

/// The base's config.json turned into the MoE architecture's (what mergekit-moe writes
/// through transformers' config classes: the base's keys, the MoE keys set).
fn moe_config(mut config: Map<String, Value>, out: &hir::Output, moe: &hir::MoeOutput) -> Map<String, Value> {
    use hir::MoeArch;
    let mut set = |k: &str, v: Value| {
        config.insert(k.to_string(), v);
    };
    set("architectures", Value::from(vec![moe.arch.class_name()]));
    set("model_type", Value::from(moe.arch.name()));
    set("num_experts_per_tok", Value::from(moe.experts_per_token as u64));
    set("intermediate_size", Value::from(moe.intermediate_size as u64));
    let experts = Value::from(moe.experts.len() as u64);
    match moe.arch {
        MoeArch::Mixtral => {
            set("num_local_experts", experts);
            set("sliding_window", Value::Null);
        }
        // mergekit-moe's DeepSeek config: the base's keys plus these, and the remote
        // modelling code of deepseek-moe-16b.
        MoeArch::DeepSeek => {
            set("n_routed_experts", experts);
            set(
                "n_shared_experts",
                moe.shared.as_ref().map_or(Value::Null, |_| Value::from(1u64)),
            );
            set("first_k_dense_replace", Value::from(0u64));
            set("moe_layer_freq", Value::from(1u64));
            set("scoring_func", Value::from("softmax"));
            set("norm_topk_prob", Value::Bool(true));
            set("moe_intermediate_size", Value::from(moe.intermediate_size as u64));
            let remote = "deepseek-ai/deepseek-moe-16b-base--";
            set(
                "auto_map",
                serde_json::json!({
                    "AutoConfig": format!("{remote}configuration_deepseek.DeepseekConfig"),
                    "AutoModel": format!("{remote}modeling_deepseek.DeepseekModel"),
                    "AutoModelForCausalLM": format!("{remote}modeling_deepseek.DeepseekForCausalLM"),
                }),
            );
        }
        MoeArch::Qwen2Moe | MoeArch::Qwen3Moe => {
            set("sliding_window", Value::Null);
            set("num_experts", experts);
            set("moe_intermediate_size", Value::from(moe.intermediate_size as u64));
            set("decoder_sparse_step", Value::from(1u64));
            set("norm_topk_prob", Value::Bool(true));
            set("mlp_only_layers", Value::Array(Vec::new()));
        }
    }
    if moe.arch == MoeArch::Qwen2Moe {
        set("use_sliding_window", Value::Bool(false));
        set("qkv_bias", Value::Bool(true));
        if let Some(size) = moe.shared_intermediate_size {
            set("shared_expert_intermediate_size", Value::from(size as u64));
        }
    }
    if let Some(dtype) = out.dtype {
        set_dtype(&mut config, dtype);
    }
    if moe.arch == MoeArch::DeepSeek {
        // Its remote modelling code predates transformers 5's `dtype` and reads only
        // `torch_dtype`, which mergekit-moe writes for it.
        if let Some(dtype) = config.get("dtype").or(config.get("torch_dtype")).cloned() {
            config.insert("torch_dtype".to_string(), dtype);
        }
    }
    config
}

/// The donor's tokenizer_config.json with `chat_template` set (the file as it was when it is
/// not a JSON object, so nothing of the donor's is lost).
fn with_chat_template(path: &std::path::Path, template: &str) -> Option<Vec<u8>> {
    let original = crate::io::input_file::read_capped(path, crate::io::input_file::MAX_JSON_BYTES)
        .ok()
        .flatten()?;
    match serde_json::from_slice::<Value>(&original) {
        Ok(Value::Object(mut map)) => {
            map.insert("chat_template".to_string(), Value::String(template.to_string()));
            let mut text = serde_json::to_string_pretty(&Value::Object(map)).ok()?;
            text.push('\n');
            Some(text.into_bytes())
        }
        _ => Some(original),
    }
}

/// Records `dtype` where the config keeps it (`torch_dtype` and/or transformers 5's
/// `dtype`; `torch_dtype` when it has neither).
fn set_dtype(config: &mut Map<String, Value>, dtype: DType) {
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

/// The dtype that config.json records: the save's, else the first float tensor's.
fn config_dtype(out: &hir::Output, steps: &[&Step]) -> Option<DType> {
    out.dtype
        .or_else(|| steps.iter().map(|s| s.dtype).find(|d| d.is_mergeable()))
}

/// The donor's config.json, made true of the output: dtype, layer count (also under
/// `text_config`), every per-layer list rebuilt layer by layer from the layers' sources,
/// vocab_size from the embeddings, and tie_word_embeddings from whether lm_head is written.
fn updated_config(
    program: &hir::Program,
    donor: hir::ModelId,
    mut config: Map<String, Value>,
    out: &hir::Output,
    steps: &[&Step],
) -> Map<String, Value> {
    if let Some(dtype) = config_dtype(out, steps) {
        set_dtype(&mut config, dtype);
    }
    if let Some(layers) = out.layer_count {
        let donor_layers = program.model(donor).info.num_layers();
        follow_layers(
            program,
            &mut config,
            None,
            layers,
            donor_layers,
            &out.layer_sources,
        );
        if let Some(Value::Object(mut text)) = config.remove("text_config") {
            let donor_text_layers = text
                .get("num_hidden_layers")
                .and_then(Value::as_u64)
                .map(|n| n as usize);
            follow_layers(
                program,
                &mut text,
                Some("text_config"),
                layers,
                donor_text_layers,
                &out.layer_sources,
            );
            config.insert("text_config".to_string(), Value::Object(text));
        }
    }
    if let Some(embed) = steps
        .iter()
        .find(|s| s.tensor.ends_with("embed_tokens.weight") || s.tensor.ends_with("wte.weight"))
    {
        if let (Some(rows), Some(v)) = (embed.shape.first(), config.get_mut("vocab_size")) {
            *v = Value::from(*rows as u64);
        }
    }
    // A rebuilt vocabulary's size goes where the model keeps it (a VLM's text_config).
    if let Some(size) = out.vocab.as_ref().map(|v| v.size) {
        if let Some(Value::Object(text)) = config.get_mut("text_config") {
            if text.contains_key("vocab_size") {
                text.insert("vocab_size".to_string(), Value::from(size as u64));
            }
        }
        if config.contains_key("vocab_size") {
            config.insert("vocab_size".to_string(), Value::from(size as u64));
        }
    }
    let has_lm_head = steps.iter().any(|s| s.tensor == "lm_head.weight");
    let has_embed = steps.iter().any(|s| s.tensor.contains("embed_tokens"));
    if has_embed && (config.contains_key("tie_word_embeddings") || !has_lm_head) {
        // An output without lm_head only works with tied embeddings; one with it must not tie.
        config.insert("tie_word_embeddings".to_string(), Value::Bool(!has_lm_head));
    }
    config
}

/// Sets the layer count and rebuilds every list whose length is the donor's layer count
/// (`layer_types`, sliding-window patterns, ...) from each output layer's source: that
/// model's own list where it has one, else the donor's entry.
fn follow_layers(
    program: &hir::Program,
    config: &mut Map<String, Value>,
    section: Option<&str>,
    layers: usize,
    donor_layers: Option<usize>,
    sources: &[(hir::ModelId, usize)],
) {
    for key in ["num_hidden_layers", "n_layer", "num_layers"] {
        if let Some(v) = config.get_mut(key) {
            if v.is_u64() {
                *v = Value::from(layers as u64);
            }
        }
    }
    let Some(donor_layers) = donor_layers else { return };
    if sources.len() != layers {
        return;
    }
    let list_keys: Vec<String> = config
        .iter()
        .filter(|(_, v)| {
            v.as_array()
                .is_some_and(|a| a.len() == donor_layers && donor_layers > 1)
        })
        .map(|(k, _)| k.clone())
        .collect();
    for key in list_keys {
        let donor_list = config
            .get(&key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let rebuilt: Vec<Value> = sources
            .iter()
            .map(|(model, layer)| {
                source_list(program, *model, section, &key)
                    .and_then(|list| list.get(*layer).cloned())
                    .or_else(|| donor_list.get(*layer).cloned())
                    .unwrap_or(Value::Null)
            })
            .collect();
        config.insert(key, Value::Array(rebuilt));
    }
}

/// Model `model`'s per-layer list `key` (in `section` when given), if it has one of its own
/// layer count.
fn source_list(
    program: &hir::Program,
    model: hir::ModelId,
    section: Option<&str>,
    key: &str,
) -> Option<Vec<Value>> {
    let info = &program.model(model).info;
    let config = info.config.as_ref()?;
    let config = match section {
        Some(s) => config.get(s)?.as_object()?,
        None => config,
    };
    let list = config.get(key)?.as_array()?;
    let layers = match section {
        Some(_) => config.get("num_hidden_layers")?.as_u64()? as usize,
        None => info.num_layers()?,
    };
    (list.len() == layers).then(|| list.clone())
}

/// A Hugging Face model card: YAML front matter, the inputs, and the script itself (the
/// program's one copy, shared by every output's card).
fn model_card(program: &hir::Program, out: &hir::Output) -> Contents {
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
    if !out.methods.is_empty() {
        card.push_str("## Method\n\n");
        for m in &out.methods {
            card.push_str(&format!("- `{}`: {}\n", m.name(), m.summary()));
        }
        card.push('\n');
    }
    if let Some(moe) = out.moe.as_deref() {
        card.push_str(&format!(
            "## Experts\n\n{} with {} experts ({} per token), routers from the `{}` gate:\n\n",
            moe.arch.class_name(),
            moe.experts.len(),
            moe.experts_per_token,
            moe.gate.name()
        ));
        for (i, e) in moe.experts.iter().chain(moe.shared.as_ref()).enumerate() {
            let role = if i == moe.experts.len() {
                "shared expert"
            } else {
                "expert"
            };
            card.push_str(&format!("- {role} {i}: `{}`", e.label));
            if !e.positive.is_empty() {
                card.push_str(&format!(", {} positive prompt(s)", e.positive.len()));
            }
            if !e.negative.is_empty() {
                card.push_str(&format!(", {} negative prompt(s)", e.negative.len()));
            }
            card.push('\n');
        }
        card.push('\n');
    }
    card.push_str("## Inputs\n\n");
    for m in &out.inputs {
        let model = program.model(*m);
        card.push_str(&format!("- `{}`: `{}`\n", model.name, model.info.reference));
    }
    let stored = out
        .dtype
        .map_or(String::new(), |d| format!(" ({})", d.script_name()));
    let compute = match out.compute.half() {
        None => format!("Computed in f32 and rounded once to the stored dtype{stored}"),
        Some(h) => format!(
            "Computed in {h} as mergekit computes (`compute: {h}`: inputs, weights and every intermediate rounded to {h}), stored{stored}",
            h = h.name()
        ),
    };
    card.push_str(&format!(
        "\nSeed of the random masks (`set seed`): {}. {compute}, with mergec {}.\n",
        program.seed,
        env!("CARGO_PKG_VERSION")
    ));
    if program.mergekit_config.is_some() {
        card.push_str("\nTranslated from the mergekit configuration in `mergekit_config.yml`.\n");
    }
    card.push_str("\n## Script\n\nThe output was produced by this script:\n\n```merge\n");
    let script: Arc<[u8]> = program.script_text.clone().into();
    Contents::from_parts([card.into_bytes().into(), script, b"\n```\n".as_slice().into()])
}
