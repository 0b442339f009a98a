//! The decoder shape a model's `config.json` describes (Llama, Mistral, Qwen2, Qwen3): what
//! the MoE `hidden` gate's forward pass needs, read and checked once so that sema can refuse
//! an unsupported base at compile time and exec can run it.

use serde_json::Value;

use crate::io::ModelInfo;

/// Why `config.json` does not describe a decoder the forward pass can run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json has no `{0}`, which the forward pass needs")]
    MissingKey(String),
    #[error("config key `{key}` is {found}, expected {expected}")]
    BadKey {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("unsupported {what} (the forward pass supports {supported})")]
    Unsupported { what: String, supported: &'static str },
    #[error("invalid decoder config: {0}")]
    InvalidConfig(String),
}

/// The decoder families the forward pass knows; they differ only in biases and norms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

/// How the rotary frequencies are scaled.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq[i] = theta^(-2i/head_dim)`.
    Default,
    /// Llama 3.1's piecewise rescaling of long wavelengths.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary position embedding parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// What the forward pass needs from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rms_norm_eps: f64,
    pub rope: Rope,
    pub vocab_size: usize,
    /// Biases on the q, k and v projections (Qwen2 always; Llama and Qwen3 with
    /// `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama and Qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// RMSNorm of each query and key head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Per layer, the sliding attention window when the layer has one (a token attends to
    /// itself and the `window − 1` tokens before it), as transformers decides it.
    pub layer_windows: Vec<Option<usize>>,
}

const SUPPORTED_ARCHS: &str = "llama, mistral, qwen2 and qwen3";
const SUPPORTED_ROPE: &str = "rope types default and llama3";

fn key<'a>(config: &'a Value, name: &str) -> Option<&'a Value> {
    config.get(name).filter(|v| !v.is_null())
}

fn found(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text
    }
}

fn usize_key(config: &Value, name: &str) -> Result<Option<usize>, ConfigError> {
    match key(config, name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| ConfigError::BadKey {
                key: name.to_owned(),
                expected: "a non-negative integer",
                found: found(v),
            }),
    }
}

fn required_usize(config: &Value, name: &str) -> Result<usize, ConfigError> {
    usize_key(config, name)?.ok_or_else(|| ConfigError::MissingKey(name.to_owned()))
}

fn f64_key(config: &Value, name: &str) -> Result<Option<f64>, ConfigError> {
    match key(config, name) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| ConfigError::BadKey {
            key: name.to_owned(),
            expected: "a number",
            found: found(v),
        }),
    }
}

fn bool_key(config: &Value, name: &str) -> Result<Option<bool>, ConfigError> {
    match key(config, name) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| ConfigError::BadKey {
            key: name.to_owned(),
            expected: "true or false",
            found: found(v),
        }),
    }
}

/// Which layers attend through a sliding window, as transformers reads the config:
/// `layer_types` when given (`"sliding_attention"`); otherwise Mistral slides in every
/// layer when `sliding_window` is set, and Qwen2 / Qwen3 with `use_sliding_window` from
/// layer `max_window_layers` on (transformers' default 28). Llama never slides.
fn layer_windows(
    config: &Value,
    architecture: Architecture,
    layers: usize,
) -> Result<Vec<Option<usize>>, ConfigError> {
    let window = usize_key(config, "sliding_window")?.filter(|&w| w > 0);
    if let Some(types) = key(config, "layer_types").and_then(Value::as_array) {
        if types.len() == layers {
            return Ok(types
                .iter()
                .map(|t| window.filter(|_| t.as_str() == Some("sliding_attention")))
                .collect());
        }
    }
    let from = match architecture {
        Architecture::Llama => return Ok(vec![None; layers]),
        Architecture::Mistral => 0,
        Architecture::Qwen2 | Architecture::Qwen3 => {
            if !bool_key(config, "use_sliding_window")?.unwrap_or(false) {
                return Ok(vec![None; layers]);
            }
            usize_key(config, "max_window_layers")?.unwrap_or(28)
        }
    };
    Ok((0..layers).map(|l| window.filter(|_| l >= from)).collect())
}

fn architecture(config: &Value) -> Result<Architecture, ConfigError> {
    let unsupported = |what: String| ConfigError::Unsupported {
        what,
        supported: SUPPORTED_ARCHS,
    };
    if let Some(v) = key(config, "model_type") {
        let name = v.as_str().ok_or_else(|| ConfigError::BadKey {
            key: "model_type".into(),
            expected: "a string",
            found: found(v),
        })?;
        return match name {
            "llama" => Ok(Architecture::Llama),
            "mistral" => Ok(Architecture::Mistral),
            "qwen2" => Ok(Architecture::Qwen2),
            "qwen3" => Ok(Architecture::Qwen3),
            other => Err(unsupported(format!("model type `{other}`"))),
        };
    }
    // Older or hand-written configs may name only the class.
    let class = key(config, "architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .ok_or_else(|| ConfigError::MissingKey("model_type".into()))?;
    match class {
        "LlamaForCausalLM" => Ok(Architecture::Llama),
        "MistralForCausalLM" => Ok(Architecture::Mistral),
        "Qwen2ForCausalLM" => Ok(Architecture::Qwen2),
        "Qwen3ForCausalLM" => Ok(Architecture::Qwen3),
        other => Err(unsupported(format!("architecture `{other}`"))),
    }
}

/// Theta and scaling from `rope_theta`/`rope_scaling` (transformers 4) or
/// `rope_parameters` (transformers 5).
fn rope_from_config(config: &Value) -> Result<Rope, ConfigError> {
    let params = key(config, "rope_parameters");
    let theta = match params {
        Some(p) => f64_key(p, "rope_theta")?,
        None => None,
    };
    // Transformers' default base when the config names none.
    let theta = match theta {
        Some(t) => t,
        None => f64_key(config, "rope_theta")?.unwrap_or(10000.0),
    };
    if !(theta.is_finite() && theta > 0.0) {
        return Err(ConfigError::InvalidConfig(format!(
            "rope_theta must be positive, got {theta}"
        )));
    }
    let (section, scaling) = match (key(config, "rope_scaling"), params) {
        (Some(s), _) => ("rope_scaling", Some(s)),
        (None, p) => ("rope_parameters", p),
    };
    let Some(scaling) = scaling else {
        return Ok(Rope {
            theta,
            scaling: RopeScaling::Default,
        });
    };
    let kind = match key(scaling, "rope_type").or_else(|| key(scaling, "type")) {
        None => "default",
        Some(v) => v.as_str().ok_or_else(|| ConfigError::BadKey {
            key: "rope_type".into(),
            expected: "a string",
            found: found(v),
        })?,
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "llama3" => {
            let get = |name: &str| {
                f64_key(scaling, name)?.ok_or_else(|| ConfigError::MissingKey(format!("{section}.{name}")))
            };
            let (factor, low, high, old) = (
                get("factor")?,
                get("low_freq_factor")?,
                get("high_freq_factor")?,
                get("original_max_position_embeddings")?,
            );
            if !(factor > 0.0 && low > 0.0 && high > low && old > 0.0) {
                return Err(ConfigError::InvalidConfig(format!(
                    "llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and \
                     original_max_position_embeddings > 0; got {factor}, {low}, {high}, {old}"
                )));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: old,
            }
        }
        other => {
            return Err(ConfigError::Unsupported {
                what: format!("rope type `{other}`"),
                supported: SUPPORTED_ROPE,
            })
        }
    };
    Ok(Rope { theta, scaling })
}

impl DecoderConfig {
    /// Reads a Hugging Face `config.json` of a Llama, Mistral, Qwen2 or Qwen3 model.
    pub fn from_config_json(config: &Value) -> Result<DecoderConfig, ConfigError> {
        let architecture = architecture(config)?;
        if let Some(v) = key(config, "hidden_act") {
            if v.as_str() != Some("silu") {
                return Err(ConfigError::Unsupported {
                    what: format!("activation {}", found(v)),
                    supported: "silu",
                });
            }
        }
        if bool_key(config, "mlp_bias")? == Some(true) {
            return Err(ConfigError::Unsupported {
                what: "MLP biases (`mlp_bias: true`)".into(),
                supported: "MLPs without biases",
            });
        }
        let hidden_size = required_usize(config, "hidden_size")?;
        let num_heads = required_usize(config, "num_attention_heads")?;
        let num_kv_heads = usize_key(config, "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match usize_key(config, "head_dim")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let attention_bias = bool_key(config, "attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Llama | Architecture::Qwen3 => (attention_bias, attention_bias),
            Architecture::Mistral => (false, false),
            Architecture::Qwen2 => (true, false),
        };
        let num_layers = required_usize(config, "num_hidden_layers")?;
        let layer_windows = layer_windows(config, architecture, num_layers)?;
        let cfg = DecoderConfig {
            architecture,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: required_usize(config, "intermediate_size")?,
            // Transformers' default for all four families.
            rms_norm_eps: f64_key(config, "rms_norm_eps")?.unwrap_or(1e-6),
            rope: rope_from_config(config)?,
            vocab_size: required_usize(config, "vocab_size")?,
            qkv_bias,
            o_bias,
            qk_norm: architecture == Architecture::Qwen3,
            layer_windows,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the config of a loaded model.
    pub fn from_model(model: &ModelInfo) -> Result<DecoderConfig, ConfigError> {
        let config = model
            .config
            .as_ref()
            .ok_or_else(|| ConfigError::MissingKey("config.json".into()))?;
        DecoderConfig::from_config_json(&Value::Object(config.clone()))
    }

    /// Checks the sizes the forward pass relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::InvalidConfig(format!("{name} must be positive")));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ConfigError::InvalidConfig(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ConfigError::InvalidConfig(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            )));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(ConfigError::InvalidConfig(format!(
                "rms_norm_eps must be a non-negative number, got {}",
                self.rms_norm_eps
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> Value {
        json!({
            "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
            "vocab_size": 16, "rms_norm_eps": 1e-5, "rope_theta": 500000.0
        })
    }

    #[test]
    fn config_defaults_and_families() {
        let cfg = DecoderConfig::from_config_json(&config()).unwrap();
        assert_eq!(cfg.head_dim, 8);
        assert_eq!(
            cfg.rope,
            Rope {
                theta: 500000.0,
                scaling: RopeScaling::Default
            }
        );
        assert!(!cfg.qkv_bias && !cfg.qk_norm);

        let mut c = config();
        c["model_type"] = json!("qwen2");
        let cfg = DecoderConfig::from_config_json(&c).unwrap();
        assert!(cfg.qkv_bias && !cfg.o_bias);
        c["model_type"] = json!("qwen3");
        c["head_dim"] = json!(16);
        let cfg = DecoderConfig::from_config_json(&c).unwrap();
        assert!(cfg.qk_norm && !cfg.qkv_bias);
        assert_eq!(cfg.head_dim, 16);
    }

    #[test]
    fn rope_parameters_of_transformers_5() {
        let mut c = config();
        c.as_object_mut().unwrap().remove("rope_theta");
        c["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let cfg = DecoderConfig::from_config_json(&c).unwrap();
        assert_eq!(cfg.rope.theta, 1e6);
        assert!(matches!(cfg.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn config_errors_name_the_problem() {
        let mut c = config();
        c.as_object_mut().unwrap().remove("hidden_size");
        let e = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
        assert!(e.contains("`hidden_size`"), "{e}");

        let mut c = config();
        c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = DecoderConfig::from_config_json(&c).unwrap_err();
        assert!(matches!(e, ConfigError::Unsupported { .. }));
        assert!(e.to_string().contains("rope type `yarn`"), "{e}");

        let mut c = config();
        c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        let e = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
        assert!(e.contains("`rope_scaling.low_freq_factor`"), "{e}");

        let mut c = config();
        c["model_type"] = json!("gemma");
        let e = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
        assert!(e.contains("model type `gemma`"), "{e}");

        let mut c = config();
        c["num_key_value_heads"] = json!(3);
        let e = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
        assert!(e.contains("not a multiple"), "{e}");

        let mut c = config();
        c["hidden_size"] = json!("big");
        let e = DecoderConfig::from_config_json(&c).unwrap_err().to_string();
        assert!(e.contains("`hidden_size` is \"big\""), "{e}");
    }
}
