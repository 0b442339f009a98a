//! Mixture-of-experts outputs: the router (gate) vectors and the other tensors a
//! `moe(...)` model needs that no input holds.
//!
//! Router vectors follow mergekit-moe (`moe/router.py`): per expert, `f(positive prompts)`
//! minus `f(negative prompts)` when there are negatives, each layer's vector L2-normalised
//! (clamped at 1e-8). `f` is the base model's hidden state at each layer's input (last
//! token, or averaged over tokens) averaged over prompts (`hidden`, `hidden_avg`), or the
//! normalised sum of the prompts' token embeddings, the same for every layer
//! (`cheap_embed`). The random modes draw from the counter-based generator, keyed by the
//! seed, the expert and the tensor name. Prompts are `bos_token + prompt`, tokenised
//! without added special tokens, one at a time (no padding).

pub mod forward;

use crate::exec::cpu::encode;
use crate::exec::methods::rng;
use crate::io::{ModelInfo, TensorReader};
use crate::moe_spec::{GateMode, Generate, MoeExpert, MoeOutput};
use crate::ops::rng_key;

use crate::io::decoder_config::DecoderConfig;
use crate::io::tokenizer::{self, TokenizerError, MAX_PROMPT_TOKENS};
use forward::{ForwardError, ModelWeights};

#[derive(Debug, thiserror::Error)]
pub enum MoeError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("cannot tokenise prompt {prompt:?}: {message}")]
    Encode { prompt: String, message: String },
    #[error("prompt {prompt:?} has no tokens")]
    EmptyPrompt { prompt: String },
    #[error("prompt {prompt:?} has {tokens} tokens, more than the {max} a routing prompt may have")]
    PromptTooLong {
        prompt: String,
        tokens: usize,
        max: usize,
    },
    #[error("the gate's forward pass failed: {0}")]
    Forward(#[from] ForwardError),
}

/// The generated tensors of a MoE output, in `spec.generated` order, and warnings about
/// them (degenerate routers).
pub struct GeneratedTensors {
    pub tensors: Vec<(String, Vec<u8>)>,
    pub warnings: Vec<String>,
}

/// Router vectors `[layers][experts][hidden]` for `experts` (routed, then the shared one).
type Gates = Vec<Vec<Vec<f32>>>;

/// Computes every generated tensor of `spec` (routers from the base model `base`).
pub fn generate(
    spec: &MoeOutput,
    base: &ModelInfo,
    reader: &TensorReader,
) -> Result<GeneratedTensors, MoeError> {
    let experts: Vec<&MoeExpert> = spec.experts.iter().chain(spec.shared.as_ref()).collect();
    let gates = gate_vectors(spec, &experts, base, reader)?;
    let mut tensors = Vec::with_capacity(spec.generated.len());
    for g in &spec.generated {
        let numel: usize = g.shape.iter().product();
        let values: Vec<f32> = match g.what {
            Generate::Zeros => vec![0.0; numel],
            Generate::Router { layer } => gates
                .get(layer)
                .map(|l| l[..spec.experts.len()].concat())
                .unwrap_or_default(),
            Generate::SharedRouter { layer } => gates
                .get(layer)
                .and_then(|l| l.get(spec.experts.len()))
                .cloned()
                .unwrap_or_default(),
        };
        let mut bytes = vec![0u8; numel * g.dtype.size_bytes()];
        if values.len() == numel {
            encode(&values, g.dtype, &mut bytes);
        }
        tensors.push((g.name.clone(), bytes));
    }
    let warnings = degenerate_layers(&gates)
        .map(|layers| {
            vec![format!(
                "the routers of {layers} are nearly degenerate (condition number over 5): the experts' prompts may be too similar, and some experts will get little traffic"
            )]
        })
        .unwrap_or_default();
    Ok(GeneratedTensors { tensors, warnings })
}

fn gate_vectors(
    spec: &MoeOutput,
    experts: &[&MoeExpert],
    base: &ModelInfo,
    reader: &TensorReader,
) -> Result<Gates, MoeError> {
    let (layers, h) = (spec.num_layers, spec.hidden_size);
    let random = |draw: &dyn Fn(u64, u64) -> f32| -> Gates {
        (0..layers)
            .map(|l| {
                (0..experts.len())
                    .map(|e| {
                        let key = rng_key(spec.seed, e as u32, &format!("moe.router.{l}"));
                        (0..h as u64).map(|i| draw(key, i)).collect()
                    })
                    .collect()
            })
            .collect()
    };
    match spec.gate {
        GateMode::Random => return Ok(random(&rng::normal)),
        GateMode::UniformRandom => {
            let bound = (1.0 / h as f64).sqrt() as f32;
            return Ok(random(&|key, i| (rng::uniform(key, i) * 2.0 - 1.0) * bound));
        }
        _ => {}
    }
    let tokenizer = Prompts::load(base)?;
    // Per expert: [layers][hidden] vectors in f64.
    let mut per_expert: Vec<Vec<Vec<f64>>> = Vec::with_capacity(experts.len());
    match spec.gate {
        GateMode::CheapEmbed => {
            let weights = ModelWeights::new(base, reader);
            for e in experts {
                let embed = |prompts: &[String]| -> Result<Vec<f64>, MoeError> {
                    let ids = tokenizer.encode_all(prompts)?;
                    let flat: Vec<usize> = ids.iter().flatten().map(|&t| t as usize).collect();
                    let (_, rows) = forward::Weights::rows(&weights, "model.embed_tokens.weight", &flat)?;
                    let mut sum = vec![0f64; h];
                    for row in rows.chunks_exact(h) {
                        sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
                    }
                    normalize(&mut sum);
                    Ok(sum)
                };
                let mut v = embed(&e.positive)?;
                if !e.negative.is_empty() {
                    let n = embed(&e.negative)?;
                    v.iter_mut().zip(&n).for_each(|(a, b)| *a -= b);
                }
                per_expert.push(vec![v; layers]);
            }
        }
        _ => {
            let config = serde_json::Value::Object(base.config.clone().unwrap_or_default());
            let cfg = DecoderConfig::from_config_json(&config).map_err(ForwardError::from)?;
            let weights = ModelWeights::new(base, reader);
            // Every prompt of every expert in one forward pass (each layer decoded once).
            let mut all: Vec<Vec<u32>> = Vec::new();
            let mut ranges = Vec::new();
            for e in experts {
                let pos = tokenizer.encode_all(&e.positive)?;
                let neg = tokenizer.encode_all(&e.negative)?;
                let start = all.len();
                all.extend(pos);
                let mid = all.len();
                all.extend(neg);
                ranges.push((start..mid, mid..all.len()));
            }
            let states = forward::hidden_states(&cfg, &weights, &all)?;
            let average = spec.gate == GateMode::HiddenAvg;
            let mean_over = |range: std::ops::Range<usize>| -> Vec<Vec<f64>> {
                let mut acc = vec![vec![0f64; h]; layers];
                let count = range.len().max(1) as f64;
                for s in &states[range] {
                    let per_layer = if average { &s.mean } else { &s.last };
                    for (a, v) in acc.iter_mut().zip(per_layer) {
                        a.iter_mut().zip(v).for_each(|(x, &y)| *x += y as f64);
                    }
                }
                acc.iter_mut()
                    .for_each(|a| a.iter_mut().for_each(|x| *x /= count));
                acc
            };
            for (pos, neg) in ranges {
                let mut v = mean_over(pos);
                if !neg.is_empty() {
                    let n = mean_over(neg);
                    for (a, b) in v.iter_mut().zip(&n) {
                        a.iter_mut().zip(b).for_each(|(x, y)| *x -= y);
                    }
                }
                per_expert.push(v);
            }
        }
    }
    Ok((0..layers)
        .map(|l| {
            per_expert
                .iter_mut()
                .map(|e| {
                    let v = &mut e[l];
                    normalize(v);
                    v.iter().map(|&x| x as f32).collect()
                })
                .collect()
        })
        .collect())
}

/// Divides by the L2 norm, clamped at 1e-8 (mergekit's rule).
fn normalize(v: &mut [f64]) {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-8);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// The base model's tokenizer and BOS text.
struct Prompts {
    tokenizer: tokenizers::Tokenizer,
    bos: String,
}

impl Prompts {
    fn load(base: &ModelInfo) -> Result<Prompts, MoeError> {
        Ok(Prompts {
            tokenizer: tokenizer::load(&base.root)?,
            bos: tokenizer::bos_token(&base.root).unwrap_or_default(),
        })
    }

    fn encode_all(&self, prompts: &[String]) -> Result<Vec<Vec<u32>>, MoeError> {
        prompts
            .iter()
            .map(|p| {
                let text = format!("{}{p}", self.bos);
                let ids = self
                    .tokenizer
                    .encode(text, false)
                    .map_err(|e| MoeError::Encode {
                        prompt: p.clone(),
                        message: e.to_string(),
                    })?
                    .get_ids()
                    .to_vec();
                if ids.is_empty() {
                    return Err(MoeError::EmptyPrompt { prompt: p.clone() });
                }
                // Checked from the prompt's length when the script was checked; counted
                // here again, as the tokenizer sees it.
                if ids.len() > MAX_PROMPT_TOKENS {
                    return Err(MoeError::PromptTooLong {
                        prompt: shorten(p),
                        tokens: ids.len(),
                        max: MAX_PROMPT_TOKENS,
                    });
                }
                Ok(ids)
            })
            .collect()
    }
}

/// The start of a long prompt, for a message.
fn shorten(prompt: &str) -> String {
    match prompt.char_indices().nth(60) {
        Some((at, _)) => format!("{}…", &prompt[..at]),
        None => prompt.to_owned(),
    }
}

/// The layers whose router matrix has a condition number over 5 (mergekit's
/// `warn_degenerate_gates`), described for a warning; `None` when there are none.
fn degenerate_layers(gates: &Gates) -> Option<String> {
    let bad: Vec<usize> = gates
        .iter()
        .enumerate()
        .filter(|(_, rows)| condition_number(rows) > 5.0)
        .map(|(l, _)| l)
        .collect();
    match bad.as_slice() {
        [] => None,
        _ if bad.len() == gates.len() => Some("every layer".to_string()),
        [one] => Some(format!("layer {one}")),
        _ => Some(format!(
            "layers {}",
            bad.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// The 2-norm condition number of the matrix whose rows are `rows`: the square root of
/// the extreme eigenvalues' ratio of its Gram matrix (Jacobi rotations; the matrix is
/// experts x experts, small).
pub(crate) fn condition_number(rows: &[Vec<f32>]) -> f64 {
    let n = rows.len();
    if n < 2 {
        return 1.0;
    }
    let mut g = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in 0..n {
            g[i][j] = rows[i]
                .iter()
                .zip(&rows[j])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
        }
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| g[i][j] * g[i][j])
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if g[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (g[q][q] - g[p][p]) / (2.0 * g[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                for row in g.iter_mut() {
                    let (gkp, gkq) = (row[p], row[q]);
                    row[p] = c * gkp - s * gkq;
                    row[q] = s * gkp + c * gkq;
                }
                let (row_p, row_q) = (g[p].clone(), g[q].clone());
                for (k, (gpk, gqk)) in row_p.iter().zip(&row_q).enumerate() {
                    g[p][k] = c * gpk - s * gqk;
                    g[q][k] = s * gpk + c * gqk;
                }
            }
        }
    }
    let eig: Vec<f64> = (0..n).map(|i| g[i][i].max(0.0)).collect();
    let max = eig.iter().cloned().fold(0.0, f64::max);
    let min = eig.iter().cloned().fold(f64::INFINITY, f64::min);
    if min <= 0.0 {
        f64::INFINITY
    } else {
        (max / min).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_counts_prompt_tokens_too() {
        // The check bounds a prompt's tokens by its bytes; the run counts them again, so a
        // tokenizer that makes more tokens than bytes cannot slip a long prompt through.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/conformance/models/micro-llama-base-f32");
        let prompts = Prompts {
            tokenizer: tokenizer::load(&root).unwrap(),
            bos: "<s>".to_owned(),
        };
        let ok = "a".repeat(MAX_PROMPT_TOKENS - 1);
        assert_eq!(
            prompts.encode_all(std::slice::from_ref(&ok)).unwrap()[0].len(),
            MAX_PROMPT_TOKENS
        );
        let long = "a".repeat(MAX_PROMPT_TOKENS);
        let e = prompts.encode_all(&[long]).unwrap_err();
        assert!(
            matches!(
                e,
                MoeError::PromptTooLong {
                    tokens: 2049,
                    max: 2048,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("aaaa…\" has 2049 tokens"), "{e}");
    }

    #[test]
    fn condition_number_of_orthonormal_rows_is_one_and_of_parallel_rows_is_large() {
        let eye = vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]];
        assert!((condition_number(&eye) - 1.0).abs() < 1e-9);
        let scaled = vec![vec![2.0, 0.0], vec![0.0, 1.0]];
        assert!((condition_number(&scaled) - 2.0).abs() < 1e-9);
        let near = vec![vec![1.0, 0.0], vec![0.999, 0.0447]];
        assert!(condition_number(&near) > 5.0);
        let same = vec![vec![1.0, 2.0], vec![1.0, 2.0]];
        assert!(condition_number(&same) > 1e6);
    }

    #[test]
    fn rotated_gram_matrix_gives_the_singular_value_ratio() {
        // Rows (3, 0) and (0, 0.5) rotated by 30°: singular values 3 and 0.5.
        let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
        let rows = vec![
            vec![(3.0 * c) as f32, (3.0 * s) as f32],
            vec![(-0.5 * s) as f32, (0.5 * c) as f32],
        ];
        assert!((condition_number(&rows) - 6.0).abs() < 1e-5);
    }
}
