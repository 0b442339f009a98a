//! Deterministic synthetic Llama-shaped models, for tests and benchmarks.
//!
//! Every value is a pure function of (seed, tensor name, element index, variant), so the
//! same [`SynthSpec`] always gives byte-identical files whatever the thread count or chunking,
//! and tests can recompute any tensor ([`tensor_bytes`]) without reading files back.
//!
//! Variant 0 is the "base". Variant `k > 0` is `base + 0.1·k·σ·(0.7·shared + own_k)`, where σ is
//! the tensor's base spread (0.02 for matrices, 0.05 for norm gains), `shared` is one noise
//! field common to all variants and `own_k` is private to variant k: the variants behave like
//! fine-tunes of one base, so merging them is meaningful (task vectors partly agree).

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::io::{DType, ModelWriter, OutputSpec, WriteError, WrittenModel};

/// Elements generated per parallel work item: big enough to amortise rayon's overhead,
/// small enough that a 1M-element attention matrix still splits across the cores.
const CHUNK_ELEMS: usize = 1 << 18;

/// Chunks per batch: 8M elements, so the two batches in flight (one being generated, one
/// being written) hold 32 MB in bf16 and a 350M model is never in memory as a whole.
const BATCH_CHUNKS: usize = 32;

/// Shard limit of the written folder: transformers' default "5GB", so a 350M model is one
/// file like a real checkpoint of that size.
const SHARD_BYTES: u64 = 5_000_000_000;

/// Base spread of weight matrices (the usual Llama `initializer_range`).
const MATRIX_STD: f32 = 0.02;
/// Spread of RMSNorm gains around 1.
const NORM_STD: f32 = 0.05;
/// Relative size of one variant step (variant k moves by `k * VARIANT_STEP * σ`).
const VARIANT_STEP: f32 = 0.1;
/// Weight of the noise shared by all variants.
const SHARED_WEIGHT: f32 = 0.7;

/// Shape and identity of a synthetic model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthSpec {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dtype: DType,
    pub seed: u64,
    /// 0 = base; k > 0 = the k-th fine-tune of that base.
    pub variant: u32,
    pub tie_embeddings: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synthetic model spec: {0}")]
    InvalidSpec(String),
    #[error("synthetic models can only be f32, f16 or bf16, not {0}")]
    UnsupportedDtype(DType),
    #[error("no tensor named `{0}` in this synthetic model")]
    UnknownTensor(String),
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// Seed the presets use unless told otherwise.
pub const DEFAULT_SEED: u64 = 42;

impl SynthSpec {
    /// A model small enough for unit tests (~41k parameters, f32).
    pub fn tiny(variant: u32) -> SynthSpec {
        SynthSpec {
            vocab: 64,
            hidden: 32,
            intermediate: 64,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            dtype: DType::F32,
            seed: DEFAULT_SEED,
            variant,
            tie_embeddings: false,
        }
    }

    /// The benchmark model: a small Llama with grouped-query attention, bf16.
    pub fn bench_350m(variant: u32) -> SynthSpec {
        SynthSpec {
            vocab: 32000,
            hidden: 1024,
            intermediate: 2560,
            layers: 24,
            heads: 16,
            kv_heads: 16,
            dtype: DType::BF16,
            seed: DEFAULT_SEED,
            variant,
            tie_embeddings: false,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }

    pub fn param_count(&self) -> u64 {
        tensor_list(self)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// Checks what would otherwise give a malformed config or empty tensors.
    pub fn validate(&self) -> Result<(), SynthError> {
        let dims = [
            ("vocab", self.vocab),
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(SynthError::InvalidSpec(format!("{name} must be positive")));
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(SynthError::InvalidSpec(format!(
                "hidden ({}) is not a multiple of heads ({})",
                self.hidden, self.heads
            )));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(SynthError::InvalidSpec(format!(
                "heads ({}) is not a multiple of kv_heads ({})",
                self.heads, self.kv_heads
            )));
        }
        if !matches!(self.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(SynthError::UnsupportedDtype(self.dtype));
        }
        Ok(())
    }
}

/// Tensor names and shapes in the order transformers writes a Llama checkpoint.
pub fn tensor_list(spec: &SynthSpec) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (spec.hidden, spec.intermediate, spec.vocab);
    let kv = spec.kv_heads * spec.head_dim();
    let mut out = Vec::with_capacity(spec.layers * 9 + 3);
    out.push(("model.embed_tokens.weight".to_string(), vec![v, h]));
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !spec.tie_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// A `config.json` as transformers writes it for `LlamaForCausalLM`.
pub fn config_json(spec: &SynthSpec) -> Map<String, Value> {
    let value = json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": spec.head_dim(),
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": MATRIX_STD,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": 2048,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tie_embeddings,
        "torch_dtype": spec.dtype.torch_name(),
        "use_cache": true,
        "vocab_size": spec.vocab,
    });
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// Characters the synthetic tokenizer knows, one token each after `<unk>`, `<s>`, `</s>`.
const TOKEN_CHARS: &str =
    " abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"-()[]/+=*&%$#@\nABCDEFGHIJKLMNOPQRSTUVWXYZ_<>{}|~^`\\";

/// A character-level tokenizer.json (BPE without merges) over the first `vocab` ids, so
/// prompts of the synthetic models tokenise offline like a real model's.
pub fn tokenizer_json(vocab: usize) -> String {
    let mut ids = Map::new();
    let specials = ["<unk>", "<s>", "</s>"];
    for (i, t) in specials.iter().enumerate() {
        ids.insert(t.to_string(), Value::from(i as u64));
    }
    for c in TOKEN_CHARS.chars().take(vocab.saturating_sub(specials.len())) {
        let id = ids.len() as u64;
        ids.insert(c.to_string(), Value::from(id));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": "<unk>",
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": ids,
            "merges": []
        }
    });
    format!("{tokenizer:#}\n")
}

/// The demo's three tiny bf16 models, a base and two fine-tunes of it, as `mergec demo`
/// writes them under `dir/models/{base,chat,math}` (the scripts in `examples/` read them
/// there). A model already written is kept.
pub fn write_demo_models(dir: &Path) -> Result<(), (PathBuf, SynthError)> {
    for (name, variant) in [("base", 0), ("chat", 1), ("math", 2)] {
        let target = dir.join("models").join(name);
        if target.join("model.safetensors").exists() {
            continue;
        }
        let mut spec = SynthSpec::tiny(variant);
        spec.dtype = DType::BF16;
        write_model(&spec, &target, true).map_err(|e| (target, e))?;
    }
    Ok(())
}

/// Writes the model as a Hugging Face folder (safetensors, config.json,
/// generation_config.json, a character-level tokenizer), streaming tensors so memory stays at a few tens of MB.
pub fn write_model(spec: &SynthSpec, dir: &Path, force: bool) -> Result<WrittenModel, SynthError> {
    spec.validate()?;
    let tensors = tensor_list(spec);
    let generation_config = format!("{:#}\n", json!({"bos_token_id": 1, "eos_token_id": 2}));
    let out = OutputSpec {
        dir: dir.to_path_buf(),
        max_shard_bytes: SHARD_BYTES,
        tensors: tensors
            .iter()
            .map(|(name, shape)| (name.clone(), spec.dtype, shape.clone()))
            .collect(),
        config: Some(config_json(spec)),
        copied_files: Vec::new(),
        generated_files: vec![
            (
                "generation_config.json".to_string(),
                generation_config.into(),
            ),
            ("tokenizer.json".to_string(), tokenizer_json(spec.vocab).into()),
            (
                "tokenizer_config.json".to_string(),
                format!(
                    "{:#}\n",
                    json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"})
                )
                .into(),
            ),
        ],
        force,
        protected: Vec::new(),
    };
    let mut writer = ModelWriter::create(out)?;
    let gens: Vec<TensorGen> = tensors
        .iter()
        .map(|(name, _)| TensorGen::new(spec, name))
        .collect();
    let mut batches = Vec::new();
    for (t, (_, shape)) in tensors.iter().enumerate() {
        let elems: usize = shape.iter().product();
        for start in (0..elems).step_by(CHUNK_ELEMS * BATCH_CHUNKS) {
            let end = elems.min(start + CHUNK_ELEMS * BATCH_CHUNKS);
            batches.push(Batch {
                tensor: t,
                start,
                end,
                last: end == elems,
            });
        }
    }
    // Two-stage pipeline: batch n is written (one thread, mostly kernel copy time) while
    // batch n+1 is generated on the rest of the pool.
    let (mut ready, mut spare): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
    let mut ready_batch: Option<&Batch> = None;
    for next in batches.iter().map(Some).chain([None]) {
        let (written, ()) = rayon::join(
            || match ready_batch {
                Some(b) => write_batch(&mut writer, &tensors[b.tensor].0, b, &ready),
                None => Ok(()),
            },
            || {
                if let Some(b) = next {
                    generate_batch(&gens[b.tensor], spec.dtype, b, &mut spare);
                }
            },
        );
        written?;
        std::mem::swap(&mut ready, &mut spare);
        ready_batch = next;
    }
    Ok(writer.finish()?)
}

/// A run of up to `CHUNK_ELEMS * BATCH_CHUNKS` elements of one tensor.
struct Batch {
    tensor: usize,
    start: usize,
    end: usize,
    /// Whether this batch ends its tensor.
    last: bool,
}

fn generate_batch(gen: &TensorGen, dtype: DType, batch: &Batch, bufs: &mut Vec<Vec<u8>>) {
    let chunks = (batch.end - batch.start).div_ceil(CHUNK_ELEMS);
    bufs.resize_with(chunks, Vec::new);
    bufs.par_iter_mut().enumerate().for_each(|(c, buf)| {
        let s = batch.start + c * CHUNK_ELEMS;
        let e = batch.end.min(s + CHUNK_ELEMS);
        buf.resize((e - s) * dtype.size_bytes(), 0);
        gen.fill(dtype, s, buf);
    });
}

fn write_batch(
    writer: &mut ModelWriter,
    name: &str,
    batch: &Batch,
    bufs: &[Vec<u8>],
) -> Result<(), WriteError> {
    if batch.start == 0 {
        writer.begin_tensor(name)?;
    }
    for buf in bufs {
        writer.write_bytes(buf)?;
    }
    if batch.last {
        writer.end_tensor()?;
    }
    Ok(())
}

/// The exact bytes [`write_model`] stores for one tensor (little-endian, in `spec.dtype`).
pub fn tensor_bytes(spec: &SynthSpec, name: &str) -> Result<Vec<u8>, SynthError> {
    spec.validate()?;
    let (_, shape) = tensor_list(spec)
        .into_iter()
        .find(|(n, _)| n == name)
        .ok_or_else(|| SynthError::UnknownTensor(name.to_string()))?;
    let elems: usize = shape.iter().product();
    let gen = TensorGen::new(spec, name);
    let mut buf = vec![0u8; elems * spec.dtype.size_bytes()];
    buf.par_chunks_mut(CHUNK_ELEMS * spec.dtype.size_bytes())
        .enumerate()
        .for_each(|(i, chunk)| gen.fill(spec.dtype, i * CHUNK_ELEMS, chunk));
    Ok(buf)
}

/// Everything needed to compute any element of one tensor independently.
struct TensorGen {
    base_key: u64,
    shared_key: u64,
    own_key: u64,
    center: f32,
    std: f32,
    /// `VARIANT_STEP * k * std`; zero for the base.
    delta: f32,
}

impl TensorGen {
    fn new(spec: &SynthSpec, name: &str) -> TensorGen {
        // Keyed by name, not position, so a tensor's values do not depend on layer count
        // or on whether lm_head is tied.
        let tensor_key = mix64(spec.seed ^ fnv1a(name.as_bytes()));
        let is_norm = name.ends_with("norm.weight");
        let (center, std) = if is_norm {
            (1.0, NORM_STD)
        } else {
            (0.0, MATRIX_STD)
        };
        TensorGen {
            base_key: mix64(tensor_key ^ 0x0001),
            shared_key: mix64(tensor_key ^ 0x0002),
            own_key: mix64(tensor_key ^ (0x1_0000 + u64::from(spec.variant))),
            center,
            std,
            delta: VARIANT_STEP * spec.variant as f32 * std,
        }
    }

    /// Fills `out` with elements `start..` encoded as `dtype` (round to nearest even).
    fn fill(&self, dtype: DType, start: usize, out: &mut [u8]) {
        match dtype {
            DType::F32 => self.fill_with(start, out, f32::to_le_bytes),
            DType::F16 => self.fill_with(start, out, |v| f16::from_f32(v).to_le_bytes()),
            // validate() rejects every other dtype before any fill.
            _ => self.fill_with(start, out, |v| bf16::from_f32(v).to_le_bytes()),
        }
    }

    /// One loop per (dtype, base or variant), so the hot loop has no branch in it.
    #[inline(always)]
    fn fill_with<const N: usize>(&self, start: usize, out: &mut [u8], encode: impl Fn(f32) -> [u8; N]) {
        let elems = out.chunks_exact_mut(N).zip(start as u64..);
        if self.delta == 0.0 {
            for (b, i) in elems {
                b.copy_from_slice(&encode(self.center + self.std * normal(self.base_key, i)));
            }
        } else {
            for (b, i) in elems {
                let base = self.center + self.std * normal(self.base_key, i);
                let noise = SHARED_WEIGHT * normal(self.shared_key, i) + normal(self.own_key, i);
                b.copy_from_slice(&encode(base + self.delta * noise));
            }
        }
    }
}

/// The splitmix64 finaliser: a cheap, well-mixed 64-bit hash.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An approximately standard normal value for element `i` of stream `key`: the sum of four
/// 16-bit uniforms from one hash (Irwin–Hall, rescaled to unit variance). One hash per
/// value instead of Box–Muller's logs and cosines keeps generation I/O-bound.
#[inline]
fn normal(key: u64, i: u64) -> f32 {
    let h = mix64(key.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let sum = (h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48);
    // Each 16-bit uniform has mean 32767.5 and variance ~65536²/12, so the sum has variance
    // ~65536²/3: subtract the mean and scale by √3/65536.
    (sum as f32 - 131_070.0) * (1.732_050_8 / 65_536.0)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Reads every safetensors file in `dir` into name → (dtype, shape, f32 values).
    fn read_folder(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<f32>)> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                let values = match view.dtype() {
                    safetensors::Dtype::F32 => view
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                    safetensors::Dtype::BF16 => view
                        .data()
                        .chunks_exact(2)
                        .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                    other => panic!("unexpected dtype {other:?}"),
                };
                let dtype = format!("{:?}", view.dtype());
                out.insert(name, (dtype, view.shape().to_vec(), values));
            }
        }
        out
    }

    fn folder_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect()
    }

    #[test]
    fn synthetic_tokenizer_loads_and_splits_characters() {
        let t = tokenizers::Tokenizer::from_bytes(tokenizer_json(64).as_bytes()).unwrap();
        let ids = t.encode("<s>ab c", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![1, 4, 5, 3, 6]);
        assert!(ids.iter().all(|&i| i < 64));
        let big = tokenizers::Tokenizer::from_bytes(tokenizer_json(32000).as_bytes()).unwrap();
        assert_eq!(big.get_vocab_size(true), 3 + TOKEN_CHARS.chars().count());
    }

    #[test]
    fn tiny_has_llama_tensor_list() {
        let list = tensor_list(&SynthSpec::tiny(0));
        assert_eq!(list.len(), 39);
        assert_eq!(list[0], ("model.embed_tokens.weight".to_string(), vec![64, 32]));
        assert_eq!(list[6].0, "model.layers.0.self_attn.k_proj.weight");
        assert_eq!(list[6].1, vec![16, 32]);
        assert_eq!(list[38].0, "lm_head.weight");
        let tied = SynthSpec {
            tie_embeddings: true,
            ..SynthSpec::tiny(0)
        };
        assert_eq!(tensor_list(&tied).len(), 38);
    }

    #[test]
    fn bench_param_count() {
        let spec = SynthSpec::bench_350m(0);
        // 2 × 32000·1024 embeddings + 24 × (3·1024·2560 + 2·1024² + 2·512·1024 + 2·1024) + 1024
        assert_eq!(spec.param_count(), 354_993_152);
        assert_eq!(spec.head_dim(), 64);
    }

    #[test]
    fn config_is_llama() {
        let c = config_json(&SynthSpec::bench_350m(1));
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["architectures"][0], "LlamaForCausalLM");
        assert_eq!(c["num_key_value_heads"], 16);
        assert_eq!(c["head_dim"], 64);
        assert_eq!(c["torch_dtype"], "bfloat16");
        assert_eq!(c["tie_word_embeddings"], false);
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let bad = SynthSpec {
            kv_heads: 3,
            ..SynthSpec::tiny(0)
        };
        assert!(matches!(bad.validate(), Err(SynthError::InvalidSpec(_))));
        let bad = SynthSpec {
            dtype: DType::I8,
            ..SynthSpec::tiny(0)
        };
        assert!(matches!(bad.validate(), Err(SynthError::UnsupportedDtype(_))));
    }

    #[test]
    fn writes_are_byte_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        write_model(&SynthSpec::tiny(2), &a, false).unwrap();
        write_model(&SynthSpec::tiny(2), &b, false).unwrap();
        let (fa, fb) = (folder_files(&a), folder_files(&b));
        assert!(fa.contains_key("config.json"));
        assert!(fa.contains_key("generation_config.json"));
        assert_eq!(fa, fb);
    }

    #[test]
    fn values_do_not_depend_on_threads_or_chunking() {
        let spec = SynthSpec {
            dtype: DType::BF16,
            ..SynthSpec::tiny(1)
        };
        let name = "model.embed_tokens.weight";
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let one_thread = pool.install(|| tensor_bytes(&spec, name).unwrap());
        let gen = TensorGen::new(&spec, name);
        let mut pieces = vec![0u8; one_thread.len()];
        let (head, tail) = pieces.split_at_mut(2 * 37);
        gen.fill(spec.dtype, 0, head);
        gen.fill(spec.dtype, 37, tail);
        assert_eq!(one_thread, pieces);
        assert_eq!(one_thread, tensor_bytes(&spec, name).unwrap());
    }

    #[test]
    fn folder_parses_with_right_shapes_and_values() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SynthSpec::tiny(0);
        write_model(&spec, tmp.path(), true).unwrap();
        let read = read_folder(tmp.path());
        let list = tensor_list(&spec);
        assert_eq!(read.len(), list.len());
        for (name, shape) in &list {
            let (dtype, got_shape, values) = &read[name];
            assert_eq!(dtype, "F32");
            assert_eq!(got_shape, shape, "{name}");
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(bytes, tensor_bytes(&spec, name).unwrap(), "{name}");
        }
        let norm = &read["model.layers.1.input_layernorm.weight"].2;
        let mean = norm.iter().sum::<f32>() / norm.len() as f32;
        assert!((mean - 1.0).abs() < 0.05, "norm mean {mean}");
    }

    #[test]
    fn matrix_values_look_normal() {
        let spec = SynthSpec::bench_350m(0);
        let bytes = tensor_bytes(&spec, "model.layers.3.mlp.up_proj.weight").unwrap();
        let v: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let std = (v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 1e-4, "mean {mean}");
        assert!((std - 0.02).abs() < 2e-4, "std {std}");
    }

    #[test]
    fn variants_are_close_fine_tunes_of_the_base() {
        let tmp = tempfile::tempdir().unwrap();
        let mut models = Vec::new();
        for k in 0..3 {
            let dir = tmp.path().join(format!("v{k}"));
            write_model(&SynthSpec::tiny(k), &dir, false).unwrap();
            models.push(read_folder(&dir));
        }
        let name = "model.layers.2.mlp.gate_proj.weight";
        let base = &models[0][name].2;
        let delta =
            |k: usize| -> Vec<f32> { models[k][name].2.iter().zip(base).map(|(a, b)| a - b).collect() };
        let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        let (d1, d2) = (delta(1), delta(2));
        // Expected relative delta: 0.1·k·√(0.7² + 1) ≈ 0.122·k.
        let r1 = rms(&d1) / rms(base);
        let r2 = rms(&d2) / rms(base);
        assert!((0.09..0.16).contains(&r1), "variant 1 relative delta {r1}");
        assert!((0.20..0.29).contains(&r2), "variant 2 relative delta {r2}");
        // Task vectors share the 0.7 component: correlation ≈ 0.49 / 1.49 ≈ 0.33.
        let dot: f32 = d1.iter().zip(&d2).map(|(a, b)| a * b).sum();
        let corr = dot / (rms(&d1) * rms(&d2) * d1.len() as f32);
        assert!((0.2..0.46).contains(&corr), "task vector correlation {corr}");
    }
}
