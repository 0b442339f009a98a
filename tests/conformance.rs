//! Every method against mergekit 0.1.5's own outputs (tests/fixtures/conformance), with the
//! tolerance rules of that folder's README (and compare.py):
//! - f32: per tensor `max|ref - cand| <= 1e-5·max(1, max|ref|)`;
//! - bf16: per element `|ref - cand| <= 2·ulp(ref) + 2·ulp(D)`, `D = max|ref - base|`;
//!   magnitude-sort methods (ties, breadcrumbs*, sce) may exceed it on max(5%, 4) elements
//!   of a tensor if its cosine stays >= 0.999 (torch's unstable sort at bf16 ties);
//! - arcee_fusion (any mode): max(1%, 4) elements, cosine >= 0.999;
//! - stats (dare_*, della*): kept fraction, L1 of `out - base`, and the mean per-tensor
//!   cosine against mergekit's second seed, both for us and between two seeds of ours.
//!
//! Each test runs `tests/conformance/NAME.merge` (the config written as a script).

mod common;

use common::*;

/// Runs the script (with `set seed = 7` replaced when `seed` is given) into a temporary folder.
fn run_script(name: &str, seed: Option<u64>) -> (tempfile::TempDir, mergec::driver::Compiled) {
    let tmp = tempfile::tempdir().unwrap();
    let mut text = std::fs::read_to_string(repo().join(format!("tests/conformance/{name}.merge"))).unwrap();
    if let Some(seed) = seed {
        text = text.replace("set seed = 7", &format!("set seed = {seed}"));
    }
    let compiled = match compile_text(&text, &conformance_dir(), tmp.path()) {
        Ok((_, c)) => c,
        Err((s, d)) => panic!("{}", render(&s, &d)),
    };
    run_compiled(&compiled, 2);
    (tmp, compiled)
}

/// Runs `NAME.merge` and compares it with `expected/NAME` as its fixture.json says.
fn conforms(name: &str) {
    let (tmp, compiled) = run_script(name, None);
    let ours_dir = tmp.path().join(name);
    compare_with_expected(name, &ours_dir, &compiled, || {
        let (tmp2, _) = run_script(name, Some(8));
        let dir = tmp2.path().join(name);
        (tmp2, dir)
    });
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                conforms(stringify!($name));
            }
        )*
    };
}

common::conformance_cases!(conformance);

#[test]
fn linear_sharded_output_layout() {
    // 12K shards: several files plus an index whose total_size is the tensor bytes.
    let (tmp, compiled) = run_script("linear_sharded_f32", None);
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
    for name in ["linear_f32", "ties_f32", "dare_ties_f32", "slerp_f32"] {
        let text = std::fs::read_to_string(repo().join(format!("tests/conformance/{name}.merge"))).unwrap();
        let mut outputs = Vec::new();
        for threads in [1, 2] {
            let tmp = tempfile::tempdir().unwrap();
            let (_, compiled) =
                compile_text(&text, &conformance_dir(), tmp.path()).unwrap_or_else(|_| panic!());
            run_compiled(&compiled, threads);
            outputs.push(std::fs::read(tmp.path().join(name).join("model.safetensors")).unwrap());
        }
        assert_eq!(outputs[0], outputs[1], "{name}");
    }
}

#[test]
fn every_fixture_has_a_script() {
    for entry in std::fs::read_dir(conformance_dir().join("configs")).unwrap() {
        let name = entry
            .unwrap()
            .path()
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        assert!(
            repo().join(format!("tests/conformance/{name}.merge")).exists(),
            "no script for {name}"
        );
    }
}
