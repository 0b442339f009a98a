//! PEFT LoRA adapters as inputs: an adapter folder (`adapter_config.json` +
//! `adapter_model.safetensors`) read from its config and its safetensors header alone.
//!
//! What is read here is the adapter on its own: the config's fields, and which modules
//! have a pair of factors (`lora_A`/`lora_B`, or `lora_embedding_A`/`_B` for embeddings)
//! and which tensors replace the model's whole (`modules_to_save`, saved biases or
//! embedding layers). Whether it fits a model is checked against that model's tensors in
//! `sema` (module names, shapes, vocabulary). No tensor data is read.
//!
//! PEFT's saved names: `base_model.model.` + the module's name in the model + `.lora_A.weight`
//! (PEFT removes the adapter name when saving; older files keep it: `.lora_A.default.weight`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::diag::Code;
use crate::io::input_file::{self, classify, Kind, MAX_JSON_BYTES};
use crate::io::model::{load_model, resolve_reference, ModelError};
use crate::io::ModelInfo;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const BIN_FILE: &str = "adapter_model.bin";
/// The prefix PEFT puts before every module name of the wrapped model.
const PEFT_PREFIX: &str = "base_model.model.";

/// A LoRA adapter as its config and header describe it.
#[derive(Clone, Debug)]
pub struct AdapterInfo {
    /// As written by the user.
    pub reference: String,
    pub root: PathBuf,
    /// `adapter_model.safetensors` as a model whose tensors have the adapter's own names.
    pub weights: Arc<ModelInfo>,
    pub config: LoraConfig,
    /// Modules with a pair of factors, by the module's name in the model
    /// (`model.layers.0.self_attn.q_proj`).
    pub modules: BTreeMap<String, LoraModule>,
    /// Whole tensors the adapter replaces: the model's tensor name -> the adapter's.
    pub replacements: BTreeMap<String, String>,
}

/// One adapted module: the names of its factors in the adapter file and their shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    pub a: String,
    pub b: String,
    pub a_shape: Vec<usize>,
    pub b_shape: Vec<usize>,
    /// `lora_embedding_A`/`_B`: an embedding's factors, applied transposed.
    pub embedding: bool,
}

impl LoraModule {
    /// The rank the factors have (A's rows).
    pub fn rank(&self) -> usize {
        self.a_shape.first().copied().unwrap_or(0)
    }
}

/// Which modules an adapter config targets.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Not given: every module with factors.
    Unset,
    /// A list: a module whose name is one of them or ends with `.` and one of them.
    Names(Vec<String>),
    /// A string: a regular expression the whole module name must match.
    Regex(String),
    /// `all-linear`: every module but the output layer.
    AllLinear,
}

/// The fields of `adapter_config.json` that decide the merged weights.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    /// (pattern, rank), in the file's order.
    pub rank_pattern: Vec<(String, usize)>,
    /// (pattern, alpha), in the file's order.
    pub alpha_pattern: Vec<(String, f64)>,
    pub target_modules: Targets,
    pub exclude_modules: Targets,
    pub modules_to_save: Vec<String>,
    pub layers_to_transform: Option<Vec<usize>>,
}

impl LoraConfig {
    /// The rank of `module`: the first `rank_pattern` entry matching it, else `r`.
    pub fn rank_for(&self, module: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(p, _)| pattern_matches(p, module))
            .map_or(self.r, |(_, r)| *r)
    }

    /// The alpha of `module`: the first `alpha_pattern` entry matching it, else `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(p, _)| pattern_matches(p, module))
            .map_or(self.alpha, |(_, a)| *a)
    }

    /// PEFT's scaling of `module`: alpha/r, or alpha/sqrt(r) with `use_rslora`.
    pub fn scaling(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Whether PEFT puts a LoRA layer on `module` (so the file's factors for it are loaded).
    pub fn targets(&self, module: &str) -> bool {
        let targeted = match &self.target_modules {
            Targets::Unset => true,
            Targets::Names(names) => names_match(names, module),
            Targets::Regex(re) => full_match(re, module),
            Targets::AllLinear => module != "lm_head" && !module.ends_with(".lm_head"),
        };
        let excluded = match &self.exclude_modules {
            Targets::Names(names) => names_match(names, module),
            Targets::Regex(re) => full_match(re, module),
            Targets::Unset | Targets::AllLinear => false,
        };
        let in_layers = match &self.layers_to_transform {
            Some(layers) => layer_index(module).is_some_and(|i| layers.contains(&i)),
            None => true,
        };
        targeted && !excluded && in_layers
    }
}

/// The layer index of a module name: the number after `layers`, `h`, `blocks`, `layer` or
/// `block` (PEFT's default `layers_pattern`).
fn layer_index(module: &str) -> Option<usize> {
    let parts: Vec<&str> = module.split('.').collect();
    parts.windows(2).find_map(|w| {
        matches!(w[0], "layers" | "h" | "blocks" | "layer" | "block")
            .then(|| w[1].parse().ok())
            .flatten()
    })
}

/// A `rank_pattern`/`alpha_pattern` key matches a module named by it or ending in `.` and
/// it, the key read as a regular expression (PEFT's `get_pattern_key`).
fn pattern_matches(pattern: &str, module: &str) -> bool {
    pattern == module
        || regex::Regex::new(&format!("^(?:.*\\.)?(?:{pattern})$")).is_ok_and(|r| r.is_match(module))
}

fn names_match(names: &[String], module: &str) -> bool {
    names.iter().any(|n| {
        module == n
            || module
                .strip_suffix(n.as_str())
                .is_some_and(|rest| rest.ends_with('.'))
    })
}

fn full_match(re: &str, module: &str) -> bool {
    regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(module))
}

/// Why an adapter cannot be used. Every variant names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("no adapter at `{}`", path.display())]
    NotFound { path: PathBuf },
    #[error("`{}` is not a PEFT adapter: {reason}", path.display())]
    NotAnAdapter { path: PathBuf, reason: String },
    #[error("adapter `{}` has only PyTorch weights (`{BIN_FILE}`); mergec reads safetensors", path.display())]
    BinOnly { path: PathBuf },
    /// A reference that does not resolve (an `hf:` adapter not in the cache, ...).
    #[error("adapter {0}")]
    Reference(ModelError),
    #[error("adapter weights: {0}")]
    Weights(ModelError),
    #[error("invalid adapter config `{}`: {reason}", path.display())]
    BadConfig { path: PathBuf, reason: String },
    #[error("unsupported adapter `{}`: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error("adapter `{}`: {reason}", path.display())]
    BadFactors { path: PathBuf, reason: String },
}

impl AdapterError {
    pub fn code(&self) -> Code {
        match self {
            AdapterError::NotFound { .. }
            | AdapterError::NotAnAdapter { .. }
            | AdapterError::BinOnly { .. } => Code::E0901,
            AdapterError::Weights(e) | AdapterError::Reference(e) => e.code(),
            AdapterError::BadConfig { .. } => Code::E0902,
            AdapterError::Unsupported { .. } => Code::E0903,
            AdapterError::BadFactors { .. } => Code::E0905,
        }
    }

    pub fn help(&self) -> Option<String> {
        match self {
            AdapterError::NotFound { .. } => Some(
                "relative adapter paths are resolved against the script's folder; \
                 use `hf:org/name` for an adapter in the Hugging Face cache"
                    .to_owned(),
            ),
            AdapterError::NotAnAdapter { .. } => Some(format!(
                "a PEFT adapter folder holds `{CONFIG_FILE}` and `{WEIGHTS_FILE}`, as `save_pretrained` writes them"
            )),
            AdapterError::BinOnly { .. } => Some(
                "save it again with safetensors: load it with PEFT and call \
                 `save_pretrained(folder, safe_serialization=True)`"
                    .to_owned(),
            ),
            AdapterError::Weights(e) | AdapterError::Reference(e) => e.help(),
            AdapterError::BadConfig { .. } => {
                Some("`r` and `lora_alpha` are required; see PEFT's `LoraConfig` for the other fields".to_owned())
            }
            AdapterError::Unsupported { .. } => Some(
                "mergec applies plain LoRA adapters (PEFT's `LORA` type) to linear and embedding layers".to_owned(),
            ),
            AdapterError::BadFactors { .. } => {
                Some("the adapter file may be damaged, or its config belongs to another adapter".to_owned())
            }
        }
    }
}

/// Loads an adapter's config and weights header.
pub fn load_adapter(reference: &str, base_dir: &Path) -> Result<AdapterInfo, AdapterError> {
    let path = resolve_reference(reference, base_dir).map_err(|e| match e {
        ModelError::NotFound { path } => AdapterError::NotFound { path },
        e => AdapterError::Reference(e),
    })?;
    let kind = classify(&path).map_err(|e| AdapterError::Weights(e.into()))?;
    let root = match kind {
        Kind::Missing => return Err(AdapterError::NotFound { path }),
        Kind::Dir => path,
        // `.../adapter_model.safetensors` or `.../adapter_config.json` names its folder.
        Kind::File(_) => match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
    };
    let config_path = root.join(CONFIG_FILE);
    let weights_path = root.join(WEIGHTS_FILE);
    let config_text =
        input_file::read_capped(&config_path, MAX_JSON_BYTES).map_err(|e| AdapterError::Weights(e.into()))?;
    let Some(config_text) = config_text else {
        return Err(AdapterError::NotAnAdapter {
            path: root,
            reason: format!("it has no `{CONFIG_FILE}`"),
        });
    };
    if classify(&weights_path).map_err(|e| AdapterError::Weights(e.into()))? == Kind::Missing {
        if classify(&root.join(BIN_FILE)).map_err(|e| AdapterError::Weights(e.into()))? != Kind::Missing {
            return Err(AdapterError::BinOnly { path: root });
        }
        return Err(AdapterError::NotAnAdapter {
            path: root,
            reason: format!("it has no `{WEIGHTS_FILE}`"),
        });
    }
    let config = parse_config(&config_text, &config_path)?;
    // `weights_path` is already resolved against `base_dir`.
    let weights =
        load_model(&weights_path.to_string_lossy(), Path::new("")).map_err(AdapterError::Weights)?;
    let (modules, replacements) = factor_modules(&weights, &root, &config)?;
    Ok(AdapterInfo {
        reference: reference.to_owned(),
        root,
        weights: Arc::new(weights),
        config,
        modules,
        replacements,
    })
}

/// Reads the LoRA fields of `adapter_config.json`.
pub fn parse_config(text: &[u8], path: &Path) -> Result<LoraConfig, AdapterError> {
    let bad = |reason: String| AdapterError::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    let unsupported = |reason: String| AdapterError::Unsupported {
        path: path.to_path_buf(),
        reason,
    };
    let map: Map<String, Value> = match serde_json::from_slice(text) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(bad("it is not a JSON object".into())),
        Err(e) => return Err(bad(format!("not valid JSON: {e}"))),
    };
    match map.get("peft_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("lora") => {}
        Some(Value::String(t)) => return Err(unsupported(format!("its `peft_type` is `{t}`, not `LORA`"))),
        Some(_) => return Err(bad("`peft_type` must be a string".into())),
    }
    if map.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported("it is a DoRA adapter (`use_dora: true`)".into()));
    }
    let rank = |v: &Value, what: &str| -> Result<usize, AdapterError> {
        match v.as_u64() {
            Some(n) if n > 0 => usize::try_from(n).map_err(|_| bad(format!("{what} is too large"))),
            _ => Err(bad(format!("{what} must be a whole number above 0, found {v}"))),
        }
    };
    let number = |v: &Value, what: &str| -> Result<f64, AdapterError> {
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| bad(format!("{what} must be a number, found {v}")))
    };
    let r = rank(
        map.get("r")
            .ok_or_else(|| bad("it has no `r` (the rank)".into()))?,
        "`r`",
    )?;
    let alpha = match map.get("lora_alpha") {
        Some(v) => number(v, "`lora_alpha`")?,
        None => return Err(bad("it has no `lora_alpha`".into())),
    };
    let flag = |key: &str| -> Result<bool, AdapterError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(bad(format!("`{key}` must be true or false, found {v}"))),
        }
    };
    let pattern_map = |key: &str| -> Result<Vec<(String, &Value)>, AdapterError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Object(m)) => {
                for p in m.keys() {
                    if regex::Regex::new(p).is_err() {
                        return Err(bad(format!("`{key}` key `{p}` is not a valid pattern")));
                    }
                }
                Ok(m.iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Some(v) => Err(bad(format!("`{key}` must be an object, found {v}"))),
        }
    };
    let rank_pattern = pattern_map("rank_pattern")?
        .into_iter()
        .map(|(k, v)| Ok((k.clone(), rank(v, &format!("`rank_pattern` entry `{k}`"))?)))
        .collect::<Result<Vec<_>, AdapterError>>()?;
    let alpha_pattern = pattern_map("alpha_pattern")?
        .into_iter()
        .map(|(k, v)| Ok((k.clone(), number(v, &format!("`alpha_pattern` entry `{k}`"))?)))
        .collect::<Result<Vec<_>, AdapterError>>()?;
    let targets = |key: &str| -> Result<Targets, AdapterError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(Targets::Unset),
            Some(Value::String(s)) if s == "all-linear" => Ok(Targets::AllLinear),
            Some(Value::String(s)) => match regex::Regex::new(s) {
                Ok(_) => Ok(Targets::Regex(s.clone())),
                Err(_) => Err(bad(format!("`{key}` `{s}` is not a valid regular expression"))),
            },
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad(format!("`{key}` must list strings, found {i}")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Targets::Names),
            Some(v) => Err(bad(format!(
                "`{key}` must be a string or a list of strings, found {v}"
            ))),
        }
    };
    let modules_to_save = match map.get("modules_to_save") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad(format!("`modules_to_save` must list strings, found {i}")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => {
            return Err(bad(format!(
                "`modules_to_save` must be a list of strings, found {v}"
            )))
        }
    };
    let layers_to_transform = match map.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(vec![layer_number(n.as_u64(), &bad)?]),
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|i| layer_number(i.as_u64(), &bad))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(v) => {
            return Err(bad(format!(
                "`layers_to_transform` must be a layer index or a list of them, found {v}"
            )))
        }
    };
    Ok(LoraConfig {
        r,
        alpha,
        use_rslora: flag("use_rslora")?,
        fan_in_fan_out: flag("fan_in_fan_out")?,
        rank_pattern,
        alpha_pattern,
        target_modules: targets("target_modules")?,
        exclude_modules: targets("exclude_modules")?,
        modules_to_save,
        layers_to_transform,
    })
}

/// A `layers_to_transform` entry as a layer index.
fn layer_number(n: Option<u64>, bad: &dyn Fn(String) -> AdapterError) -> Result<usize, AdapterError> {
    n.and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad("`layers_to_transform` must hold whole layer indices".into()))
}

/// Which factor of which module an adapter tensor is.
#[derive(Debug, PartialEq)]
enum Part {
    A,
    B,
    EmbeddingA,
    EmbeddingB,
}

/// Splits an adapter tensor name (PEFT prefix removed) into its module and factor, or
/// `None` for a whole tensor. `Err` names a LoRA part mergec does not apply.
fn split_name(name: &str) -> Result<Option<(&str, Part)>, String> {
    for (marker, part, with_weight) in [
        (".lora_embedding_A", Part::EmbeddingA, false),
        (".lora_embedding_B", Part::EmbeddingB, false),
        (".lora_A", Part::A, true),
        (".lora_B", Part::B, true),
    ] {
        let Some(at) = name.find(marker) else {
            continue;
        };
        let (module, rest) = (&name[..at], &name[at + marker.len()..]);
        // the rest is `.weight` (or nothing for embeddings), after an optional adapter name
        let rest = if with_weight {
            match rest.strip_suffix(".weight") {
                Some(r) => r,
                None => continue,
            }
        } else {
            rest
        };
        if rest.is_empty() || (rest.starts_with('.') && !rest[1..].contains('.') && rest.len() > 1) {
            return Ok(Some((module, part)));
        }
    }
    if name.contains("trainable_tokens") {
        return Err("it trains token embeddings (`trainable_token_indices`)".into());
    }
    if name.contains("lora_magnitude_vector") {
        return Err("it is a DoRA adapter (`lora_magnitude_vector`)".into());
    }
    if let Some(seg) = name.split('.').find(|s| s.starts_with("lora_")) {
        return Err(format!(
            "its tensor `{name}` is a `{seg}`, which plain LoRA has not"
        ));
    }
    Ok(None)
}

/// Adapted modules by name.
type Modules = BTreeMap<String, LoraModule>;

/// Pairs the factors of each module and lists the whole tensors.
fn factor_modules(
    weights: &ModelInfo,
    root: &Path,
    config: &LoraConfig,
) -> Result<(Modules, BTreeMap<String, String>), AdapterError> {
    let bad = |reason: String| AdapterError::BadFactors {
        path: root.join(WEIGHTS_FILE),
        reason,
    };
    type Halves = (Option<(String, Vec<usize>)>, Option<(String, Vec<usize>)>, bool);
    let mut halves: BTreeMap<String, Halves> = BTreeMap::new();
    let mut replacements = BTreeMap::new();
    for (name, t) in &weights.tensors {
        let local = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
        let split = split_name(local).map_err(|reason| AdapterError::Unsupported {
            path: root.join(WEIGHTS_FILE),
            reason,
        })?;
        let Some((module, part)) = split else {
            // A whole tensor (modules_to_save, a saved bias or embedding layer), saved
            // under the model's own name (PEFT drops `modules_to_save.<adapter>.`).
            let model_name = local
                .replace(".modules_to_save.default.", ".")
                .replace(".modules_to_save.", ".");
            replacements.insert(model_name, name.clone());
            continue;
        };
        if !t.dtype.is_mergeable() {
            return Err(bad(format!(
                "`{name}` is {}, not a float tensor",
                t.dtype.safetensors_name()
            )));
        }
        let entry = halves.entry(module.to_owned()).or_insert((None, None, false));
        let slot = match part {
            Part::A | Part::EmbeddingA => &mut entry.0,
            Part::B | Part::EmbeddingB => &mut entry.1,
        };
        if slot.is_some() {
            return Err(bad(format!(
                "module `{module}` has two `{part:?}` factors (several adapters in one file)"
            )));
        }
        *slot = Some((name.clone(), t.shape.clone()));
        entry.2 |= matches!(part, Part::EmbeddingA | Part::EmbeddingB);
    }
    let mut modules = BTreeMap::new();
    for (module, (a, b, embedding)) in halves {
        let (Some((a, a_shape)), Some((b, b_shape))) = (a, b) else {
            return Err(bad(format!(
                "module `{module}` has only one of its two factors (`lora_A`, `lora_B`)"
            )));
        };
        if a_shape.len() != 2 || b_shape.len() != 2 {
            return Err(AdapterError::Unsupported {
                path: root.join(WEIGHTS_FILE),
                reason: format!(
                    "the factors of `{module}` are {a_shape:?} and {b_shape:?}; only linear and embedding layers (2-D factors) are applied"
                ),
            });
        }
        if a_shape[0] != b_shape[1] {
            return Err(bad(format!(
                "the factors of `{module}` disagree on the rank: `lora_A` is {a_shape:?}, `lora_B` is {b_shape:?}"
            )));
        }
        let rank = config.rank_for(&module);
        if a_shape[0] != rank {
            return Err(bad(format!(
                "the factors of `{module}` have rank {}, but the config gives it rank {rank}",
                a_shape[0]
            )));
        }
        modules.insert(
            module,
            LoraModule {
                a,
                b,
                a_shape,
                b_shape,
                embedding,
            },
        );
    }
    Ok((modules, replacements))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<LoraConfig, AdapterError> {
        parse_config(json.as_bytes(), Path::new("adapter_config.json"))
    }

    #[test]
    fn names_split_with_and_without_adapter_name() {
        assert_eq!(
            split_name("model.layers.0.self_attn.q_proj.lora_A.weight"),
            Ok(Some(("model.layers.0.self_attn.q_proj", Part::A)))
        );
        assert_eq!(
            split_name("model.layers.0.mlp.up_proj.lora_B.default.weight"),
            Ok(Some(("model.layers.0.mlp.up_proj", Part::B)))
        );
        assert_eq!(
            split_name("model.embed_tokens.lora_embedding_A"),
            Ok(Some(("model.embed_tokens", Part::EmbeddingA)))
        );
        assert_eq!(
            split_name("model.embed_tokens.lora_embedding_B.default"),
            Ok(Some(("model.embed_tokens", Part::EmbeddingB)))
        );
        assert_eq!(split_name("lm_head.weight"), Ok(None));
        assert!(split_name("model.layers.0.q_proj.lora_magnitude_vector").is_err());
        assert!(split_name("model.embed_tokens.token_adapter.trainable_tokens_delta").is_err());
    }

    #[test]
    fn patterns_targets_and_scaling() {
        let c = config(
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": false,
                "rank_pattern": {"q_proj": 4, "layers\\.1\\.mlp\\.up_proj": 2},
                "alpha_pattern": {"v_proj": 32},
                "target_modules": ["q_proj", "v_proj", "up_proj"]}"#,
        )
        .unwrap();
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 4);
        assert_eq!(c.rank_for("model.layers.1.mlp.up_proj"), 2);
        assert_eq!(c.rank_for("model.layers.0.mlp.up_proj"), 8);
        // `xq_proj` does not end in `.q_proj`
        assert_eq!(c.rank_for("model.layers.0.self_attn.xq_proj"), 8);
        assert_eq!(c.scaling("model.layers.0.self_attn.v_proj"), 4.0);
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj"), 4.0);
        assert!(c.targets("model.layers.3.self_attn.q_proj"));
        assert!(!c.targets("model.layers.3.self_attn.k_proj"));
        let rs =
            config(r#"{"r": 16, "lora_alpha": 8, "use_rslora": true, "target_modules": ".*\\.(q|v)_proj"}"#)
                .unwrap();
        assert_eq!(rs.scaling("a.q_proj"), 2.0);
        assert!(rs.targets("model.layers.0.self_attn.v_proj"));
        assert!(!rs.targets("model.layers.0.self_attn.o_proj"));
    }

    #[test]
    fn malformed_configs() {
        assert!(matches!(config("[1]"), Err(AdapterError::BadConfig { .. })));
        assert!(matches!(
            config(r#"{"lora_alpha": 8}"#),
            Err(AdapterError::BadConfig { .. })
        ));
        assert!(matches!(
            config(r#"{"r": 0, "lora_alpha": 8}"#),
            Err(AdapterError::BadConfig { .. })
        ));
        assert!(matches!(
            config(r#"{"r": 4, "lora_alpha": 8, "peft_type": "IA3"}"#),
            Err(AdapterError::Unsupported { .. })
        ));
        assert!(matches!(
            config(r#"{"r": 4, "lora_alpha": 8, "use_dora": true}"#),
            Err(AdapterError::Unsupported { .. })
        ));
        assert!(matches!(
            config(r#"{"r": 4, "lora_alpha": 8, "target_modules": 3}"#),
            Err(AdapterError::BadConfig { .. })
        ));
    }
}
