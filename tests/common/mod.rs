//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mergec::driver::{self, Compiled, Script};
use mergec::exec::{CpuExecutor, RunReport};
use mergec::io::TensorReader;
use mergec::plan::Limits;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn conformance_dir() -> PathBuf {
    repo().join("tests/fixtures/conformance")
}

/// A decoded tensor: dtype name, shape, values as f32.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Every tensor of a model folder (single file or sharded with an index).
pub fn load_folder(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut files = Vec::new();
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        let mut shards: Vec<String> = json["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        shards.sort();
        shards.dedup();
        files.extend(shards.into_iter().map(|s| dir.join(s)));
    } else {
        files.push(dir.join("model.safetensors"));
    }
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let dtype = format!("{:?}", view.dtype());
            let data = view.data();
            let values = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                    .collect(),
                safetensors::Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                    .collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            out.insert(
                name.to_string(),
                Tensor {
                    dtype,
                    shape: view.shape().to_vec(),
                    values,
                },
            );
        }
    }
    out
}

/// Compiles `text` as if it were a script in `base_dir`, with outputs redirected from
/// `"out/` to `out_dir`.
pub fn compile_text(
    text: &str,
    base_dir: &Path,
    out_dir: &Path,
) -> Result<(Script, Compiled), (Script, mergec::diag::Diagnostics)> {
    let text = text.replace("to \"out/", &format!("to \"{}/", out_dir.display()));
    let script = Script::from_text("test.merge", text, base_dir.to_path_buf());
    match driver::compile(&script, false, &Limits::default()) {
        Ok(c) => Ok((script, c)),
        Err(d) => Err((script, d)),
    }
}

pub fn run_compiled(c: &Compiled, threads: usize) -> RunReport {
    let executor = CpuExecutor::new(threads, 1000).unwrap();
    let reader = TensorReader::new();
    mergec::exec::run(&c.program, &c.plan, &executor, &reader, false, |_| {}).unwrap()
}

pub fn render(script: &Script, diags: &mergec::diag::Diagnostics) -> String {
    mergec::diag::render::render_text(&diags.0, &script.sources, false)
}
