//! Output vocabularies against mergekit 0.1.5's own outputs (tests/fixtures/vocab, made as
//! its README says): the union, the base's and another model's tokenizer, `tokens:` rules
//! and padding. The tokenizer must match token for token (vocabulary and added tokens with
//! their settings), config.json's `vocab_size` exactly, the vocabulary tensors bit for bit
//! where mergekit copies rows (`exact`), every tensor within the f32 rule
//! (`max|ref - ours| <= 1e-5·max(1, max|ref|)`).
//!
//! Each case runs `scripts/NAME.merge`, and the YAML `configs/NAME.yml` translated by
//! `mergec import`.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn vocab_dir() -> PathBuf {
    repo().join("tests/fixtures/vocab")
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

/// Runs `text` (a script in tests/fixtures/vocab/scripts) into a temporary folder.
fn run_text(text: &str) -> (tempfile::TempDir, mergec::driver::Compiled) {
    let tmp = tempfile::tempdir().unwrap();
    let compiled = match compile_text(text, &vocab_dir().join("scripts"), tmp.path()) {
        Ok((_, c)) => c,
        Err((s, d)) => panic!("{}", render(&s, &d)),
    };
    run_compiled(&compiled, 2);
    (tmp, compiled)
}

/// Compares the output folder `ours` with `expected/NAME`.
fn matches_mergekit(name: &str, ours: &Path, exact: bool) {
    let expected = vocab_dir().join("expected").join(name);
    let (tr, to) = (
        json(&expected.join("tokenizer.json")),
        json(&ours.join("tokenizer.json")),
    );
    assert_eq!(
        to["model"]["vocab"], tr["model"]["vocab"],
        "{name}: tokenizer vocabulary"
    );
    assert_eq!(to["added_tokens"], tr["added_tokens"], "{name}: added tokens");
    assert_eq!(to["model"]["merges"], tr["model"]["merges"], "{name}: merges");
    assert_eq!(
        json(&ours.join("config.json"))["vocab_size"],
        json(&expected.join("config.json"))["vocab_size"],
        "{name}: vocab_size"
    );
    let reference = load_folder(&expected);
    let got = load_folder(ours);
    for (tensor, r) in &reference {
        let o = &got[tensor];
        assert_eq!(o.shape, r.shape, "{name}: {tensor}");
        let max_ref = r.values.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        let max_err = r
            .values
            .iter()
            .zip(&o.values)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .fold(0f64, f64::max);
        assert!(
            max_err <= 1e-5 * max_ref.max(1.0),
            "{name}: {tensor}: max error {max_err:e}"
        );
        let vocab = tensor.ends_with("embed_tokens.weight") || tensor == "lm_head.weight";
        if exact && vocab {
            let differ = r
                .values
                .iter()
                .zip(&o.values)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{name}: {tensor}: {differ} elements not bit-exact");
        }
    }
}

fn script_case(name: &str, exact: bool) {
    let text = std::fs::read_to_string(vocab_dir().join(format!("scripts/{name}.merge"))).unwrap();
    let (tmp, _) = run_text(&text);
    matches_mergekit(name, &tmp.path().join(name), exact);
}

#[test]
fn union_task_arithmetic() {
    script_case("union_ta", true);
}

#[test]
fn base_tokenizer_ties() {
    script_case("base_ties", true);
}

#[test]
fn model_tokenizer_slerp() {
    script_case("source_model_slerp", true);
}

#[test]
fn token_rules_and_padding() {
    // linear sums in another order than torch: within the f32 rule, not bit for bit
    script_case("tokens_linear", false);
}

#[test]
fn padding_rows_are_the_mean_of_the_token_rows() {
    // mergekit pads each input with the mean of its rows; a linear merge of those is the
    // mean of the merged token rows (up to rounding).
    let out = vocab_dir().join("expected/tokens_linear");
    let t = &load_folder(&out)["model.embed_tokens.weight"];
    let (rows, width) = (t.shape[0], t.shape[1]);
    let tokens = json(&out.join("tokenizer.json"))["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_u64().unwrap() as usize)
        .max()
        .unwrap()
        + 1;
    assert_eq!((tokens, rows), (69, 96));
    for c in 0..width {
        let mean = (0..tokens).map(|r| t.values[r * width + c] as f64).sum::<f64>() / tokens as f64;
        for r in tokens..rows {
            assert!((t.values[r * width + c] as f64 - mean).abs() < 1e-6);
        }
    }
}
