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

/// Runs `configs/NAME.yml` through `mergec import` into a temporary folder.
fn run_yaml(name: &str, truncate: bool) -> Result<tempfile::TempDir, String> {
    let tmp = tempfile::tempdir().unwrap();
    let file = format!("configs/{name}.yml");
    let text = std::fs::read_to_string(vocab_dir().join(&file)).unwrap();
    let mut opts = mergec::import::Options::new(&file, &vocab_dir(), &tmp.path().join(name));
    opts.seed = Some(7);
    opts.truncate_embeddings = truncate;
    let imp = mergec::import::translate(&file, text, &opts)
        .map_err(|f| mergec::diag::render::render_text(&f.diagnostics.0, &f.sources, false))?;
    let (_, compiled) = imp
        .compile(false, &mergec::plan::Limits::default())
        .map_err(|(s, d)| format!("{}\n{}", imp.text(), render(&s, &d)))?;
    run_compiled(&compiled, 2);
    Ok(tmp)
}

fn script_case(name: &str, exact: bool) {
    let text = std::fs::read_to_string(vocab_dir().join(format!("scripts/{name}.merge"))).unwrap();
    let (tmp, _) = run_text(&text);
    matches_mergekit(name, &tmp.path().join(name), exact);
    let tmp = run_yaml(name, false).unwrap_or_else(|e| panic!("{name}: {e}"));
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

/// Translates and compiles a YAML text given in the test (models of tests/fixtures/vocab).
fn compile_yaml(text: &str, truncate: bool, out: &Path) -> Result<mergec::driver::Compiled, String> {
    let mut opts = mergec::import::Options::new("inline.yml", &vocab_dir(), out);
    opts.truncate_embeddings = truncate;
    let imp = mergec::import::translate("inline.yml", text.to_string(), &opts)
        .map_err(|f| mergec::diag::render::render_text(&f.diagnostics.0, &f.sources, false))?;
    imp.compile(false, &mergec::plan::Limits::default())
        .map(|(_, c)| c)
        .map_err(|(s, d)| render(&s, &d))
}

const NO_POLICY: &str = "merge_method: linear
models:
  - model: models/vocab-base
    parameters: {weight: 0.5}
  - model: models/vocab-padded
    parameters: {weight: 0.5}
dtype: float32
";

#[test]
fn differing_vocabularies_without_a_policy_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let err = compile_yaml(NO_POLICY, false, &tmp.path().join("x")).unwrap_err();
    assert!(err.contains("[E0801]"), "{err}");
    assert!(err.contains("`base`: 64 rows, `padded`: 72 rows"), "{err}");
    assert!(err.contains("tokenizer: union"), "{err}");
}

#[test]
fn unsafe_truncate_embeddings_keeps_the_first_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let compiled = compile_yaml(NO_POLICY, true, &out).unwrap();
    let warnings = format!("{:?}", compiled.warnings.0);
    assert!(warnings.contains("W0011"), "{warnings}");
    run_compiled(&compiled, 2);
    let got = load_folder(&out);
    let base = load_folder(&vocab_dir().join("models/vocab-base"));
    let padded = load_folder(&vocab_dir().join("models/vocab-padded"));
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let (g, b, p) = (&got[name], &base[name], &padded[name]);
        assert_eq!(g.shape, vec![64, 32]);
        for i in 0..64 * 32 {
            let want = 0.5 * b.values[i] + 0.5 * p.values[i];
            assert!((g.values[i] - want).abs() <= 1e-6, "{name}[{i}]");
        }
    }
    assert_eq!(json(&out.join("config.json"))["vocab_size"], 64);
}

#[test]
fn check_reports_what_each_input_lacks() {
    let text = std::fs::read_to_string(vocab_dir().join("scripts/union_ta.merge")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (_, compiled) = compile_text(&text, &vocab_dir().join("scripts"), tmp.path())
        .unwrap_or_else(|(s, d)| panic!("{}", render(&s, &d)));
    let report = &compiled.program.outputs[0].vocab.as_ref().unwrap().report;
    assert_eq!(
        report,
        &[
            "vocabulary: 68 tokens from the union of the inputs' tokenizers",
            "vb: lacks 4 tokens (rows: 3 from the only input with the token, 1 means of the inputs with the token)",
            "va: lacks 1 token (rows: 1 from the only input with the token)",
            "vr: lacks 3 tokens (rows: 1 from the base, 2 from the only input with the token)",
        ]
    );
}

#[test]
fn same_vocabulary_keeps_plain_copies() {
    // `tokenizer: union` over inputs with one vocabulary changes nothing: tokenizer files
    // are copied, embeddings are loaded as stored.
    let text = "model a = \"../models/vocab-base\"\nmodel b = \"../models/vocab-base\"\nsave linear(a { weight: 0.5 }, b { weight: 0.5 }) to \"out/same\" { tokenizer: union }\n";
    let tmp = tempfile::tempdir().unwrap();
    let (_, compiled) = compile_text(text, &vocab_dir().join("scripts"), tmp.path())
        .unwrap_or_else(|(s, d)| panic!("{}", render(&s, &d)));
    assert!(compiled.program.outputs[0].vocab.is_none());
    assert!(compiled
        .plan
        .steps
        .iter()
        .all(|s| s.inputs.iter().all(|i| i.gather.is_none())));
}

#[test]
fn tokens_table_compares_with_the_first_model() {
    let models: Vec<(String, mergec::io::vocab::Described)> =
        ["vocab-base", "vocab-removed", "vocab-foreign"]
            .iter()
            .map(|n| {
                let d = mergec::io::vocab::describe(&vocab_dir().join("models").join(n)).unwrap();
                (n.to_string(), d)
            })
            .collect();
    let table = mergec::io::vocab::table(&models, 3);
    let lines: Vec<&str> = table.lines().collect();
    let cells = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(cells(lines[1]), ["vocab-base", "64", "64", "64", "0", "0"]);
    // without "q", 42 tokens move down one id; two special tokens of its own
    assert_eq!(cells(lines[2]), ["vocab-removed", "65", "65", "63", "2", "42"]);
    assert_eq!(cells(lines[3]), ["vocab-foreign", "64", "64", "4", "60", "0"]);
    assert!(
        table.contains("vocab-removed lacks 1 of vocab-base's tokens: \"q\""),
        "{table}"
    );
    assert!(table.contains("another tokenizer family"), "{table}");
    assert!(table.contains("tokenizer: union"), "{table}");
}

#[test]
fn cli_check_json_and_tokens() {
    let bin = env!("CARGO_BIN_EXE_mergec");
    let out = std::process::Command::new(bin)
        .args(["check", "union_ta.merge", "--format", "json"])
        .current_dir(vocab_dir().join("scripts"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let report = v["outputs"][0]["vocabulary"].as_array().unwrap();
    assert_eq!(report.len(), 4);
    assert_eq!(
        report[0],
        "vocabulary: 68 tokens from the union of the inputs' tokenizers"
    );
    let out = std::process::Command::new(bin)
        .args(["tokens", "vocab-base", "vocab-added"])
        .current_dir(vocab_dir().join("models"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("only in vocab-added: \"xy\" (64)"), "{text}");
    let out = std::process::Command::new(bin)
        .args(["tokens", "vocab-base", "no-such-model"])
        .current_dir(vocab_dir().join("models"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
