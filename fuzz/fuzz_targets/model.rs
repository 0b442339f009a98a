//! Any bytes as a model folder's small files: the input is split into `config.json`,
//! `model.safetensors.index.json` and one shard's header, written into a scratch folder,
//! and the folder loaded as `check` loads a model (config, index, headers) and read as a
//! decoder config (MoE routing). Rejected with a reason, never a panic or a hang.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mergec-fuzz-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

fuzz_target!(|bytes: &[u8]| {
    // Three parts separated by 0xff bytes (never in UTF-8 JSON).
    let mut parts = bytes.splitn(3, |b| *b == 0xff);
    let config = parts.next().unwrap_or_default();
    let index = parts.next();
    let shard = parts.next().unwrap_or_default();
    let dir = scratch();
    for f in ["config.json", "model.safetensors.index.json", "model.safetensors", "model-00001-of-00001.safetensors"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    std::fs::write(dir.join("config.json"), config).unwrap();
    match index {
        Some(index) => {
            std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
            std::fs::write(dir.join("model-00001-of-00001.safetensors"), shard).unwrap();
        }
        None => std::fs::write(dir.join("model.safetensors"), shard).unwrap(),
    }
    if let Ok(model) = mergec::io::model::load_model(dir.to_str().unwrap(), dir) {
        let _ = mergec::io::decoder_config::DecoderConfig::from_model(&model);
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(config) {
        let _ = mergec::io::decoder_config::DecoderConfig::from_config_json(&value);
    }
});
