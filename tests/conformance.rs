//! Linear merges against mergekit 0.1.5's own outputs (tests/fixtures/conformance), with
//! the tolerance rules of its README: f32 `max|ref - cand| <= 1e-5·max(1, max|ref|)` per
//! tensor; bf16 `|ref - cand| <= 2·ulp(ref) + 2·ulp(D)` per element (D = 0 without a base).

mod common;

use std::path::Path;

use common::*;

fn ulp_bf16(x: f32) -> f64 {
    if x == 0.0 {
        2f64.powi(-133)
    } else {
        2f64.powf((x.abs() as f64).log2().floor() - 7.0)
    }
}

fn config_without_version(dir: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("transformers_version");
    v
}

/// Runs `tests/conformance/NAME.merge` and compares it with `expected/NAME`.
fn conforms(name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join(format!("tests/conformance/{name}.merge"))).unwrap();
    let (script, compiled) = match compile_text(&text, &conformance_dir(), tmp.path()) {
        Ok(x) => x,
        Err((s, d)) => panic!("{}", render(&s, &d)),
    };
    let _ = script;
    run_compiled(&compiled, 2);
    let ours_dir = tmp.path().join(name);
    let reference_dir = conformance_dir().join("expected").join(name);
    let ours = load_folder(&ours_dir);
    let reference = load_folder(&reference_dir);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>(),
        "tensor names differ"
    );
    let bf16 = reference.values().any(|t| t.dtype == "BF16");
    let mut failures = Vec::new();
    for (tensor, r) in &reference {
        let c = &ours[tensor];
        assert_eq!(c.dtype, r.dtype, "{tensor}: dtype");
        assert_eq!(c.shape, r.shape, "{tensor}: shape");
        if bf16 {
            let bad = r
                .values
                .iter()
                .zip(&c.values)
                .filter(|(a, b)| ((**a - **b).abs() as f64) > 2.0 * ulp_bf16(**a) + 2.0 * ulp_bf16(0.0))
                .count();
            if bad > 0 {
                failures.push(format!("{tensor}: {bad} elements outside 2 ulp"));
            }
        } else {
            let max_ref = r.values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let max_err = r
                .values
                .iter()
                .zip(&c.values)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            if max_err > 1e-5 * max_ref.max(1.0) {
                failures.push(format!("{tensor}: max abs error {max_err:e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
    assert_eq!(
        config_without_version(&ours_dir),
        config_without_version(&reference_dir),
        "config.json"
    );
    // Tokenizer and generation files are byte copies of the first input's.
    let donor = compiled.program.models[0].info.root.clone();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(ours_dir.join(f)).unwrap(),
            std::fs::read(donor.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn linear_f32() {
    conforms("linear_f32");
}

#[test]
fn linear_nonorm_f32() {
    conforms("linear_nonorm_f32");
}

#[test]
fn linear_bf16() {
    conforms("linear_bf16");
}

#[test]
fn linear_sharded_f32() {
    conforms("linear_sharded_f32");
    // 12K shards: several files plus an index whose total_size is the tensor bytes.
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("tests/conformance/linear_sharded_f32.merge")).unwrap();
    let (_, compiled) = compile_text(&text, &conformance_dir(), tmp.path()).unwrap_or_else(|_| panic!());
    run_compiled(&compiled, 1);
    let dir = tmp.path().join("linear_sharded_f32");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 10, "{} shards", shards.len());
    for s in &shards {
        assert!(
            s.starts_with("model-000") && s.contains(&format!("-of-{:05}", shards.len())),
            "{s}"
        );
        let size = std::fs::metadata(dir.join(s)).unwrap().len();
        assert!(size < 12_000 + 4096, "{s} is {size} bytes");
    }
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap(),
        compiled.plan.write_bytes
    );
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let text = std::fs::read_to_string(repo().join("tests/conformance/linear_f32.merge")).unwrap();
    let mut outputs = Vec::new();
    for threads in [1, 2] {
        let tmp = tempfile::tempdir().unwrap();
        let (_, compiled) = compile_text(&text, &conformance_dir(), tmp.path()).unwrap_or_else(|_| panic!());
        run_compiled(&compiled, threads);
        outputs.push(std::fs::read(tmp.path().join("linear_f32/model.safetensors")).unwrap());
    }
    assert_eq!(outputs[0], outputs[1]);
}
