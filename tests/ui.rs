//! Diagnostic snapshots: every `tests/ui/*.merge` is checked against the models in
//! tests/fixtures, and its rendered diagnostics are compared with `tests/snapshots/`.
//! A fixture named `eNNNN_*.merge` / `wNNNN_*.merge` must produce that code, and every code
//! has at least one fixture.

mod common;

use std::path::Path;

use mergec::diag::Code;
use mergec::driver::{self, Script};
use mergec::plan::Limits;

/// Checks one fixture; returns the rendered diagnostics (errors or warnings).
fn diagnostics_of(path: &Path) -> (String, String) {
    let name = format!("tests/ui/{}", path.file_name().unwrap().to_string_lossy());
    let text = match driver::read_source(Path::new(&name)) {
        Ok(text) => text,
        // Not UTF-8 (E0104): the file's own diagnostic, against the text as it is shown.
        Err(driver::ReadError::NotUtf8 { sources, diagnostics }) => {
            let (_, file) = sources.files().next().unwrap();
            return (
                file.text.clone(),
                mergec::diag::render::render_text(&diagnostics.0, &sources, false),
            );
        }
        Err(e) => panic!("{e}"),
    };
    // Relative base: paths in messages read the same on every machine.
    let script = Script::from_text(&name, text.clone(), "tests/ui".into());
    let diags = match driver::compile(&script, false, &Limits::default()) {
        Ok(c) => c.warnings,
        Err(d) => d,
    };
    (
        text,
        mergec::diag::render::render_text(&diags.0, &script.sources, false),
    )
}

fn set_fake_hf_cache() {
    // An empty cache, so `hf:` references resolve the same way everywhere.
    std::env::set_var("HF_HUB_CACHE", "tests/fixtures/hf-cache");
}

#[test]
fn ui_snapshots() {
    set_fake_hf_cache();
    insta::glob!("ui/*.merge", |path| {
        let (source, rendered) = diagnostics_of(path);
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        if let Some(code) = stem
            .split('_')
            .next()
            .filter(|c| c.len() == 5 && c[1..].chars().all(|d| d.is_ascii_digit()))
        {
            let tag = format!("[{}]", code.to_uppercase());
            assert!(
                rendered.contains(&tag),
                "{stem} should report {tag}, got:\n{rendered}"
            );
        }
        assert!(
            !rendered.contains("internal compiler error"),
            "{stem}:\n{rendered}"
        );
        insta::assert_snapshot!(format!(
            "--- source ---\n{source}\n--- diagnostics ---\n{rendered}"
        ));
    });
}

#[test]
fn every_code_has_a_fixture() {
    // mergekit YAML import codes (E06xx) have YAML fixtures, checked by tests/import.rs.
    let fixtures: Vec<String> = std::fs::read_dir("tests/ui")
        .unwrap()
        .chain(std::fs::read_dir("tests/fixtures/yaml/bad").unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().to_uppercase())
        .collect();
    // LoRA extraction codes come from `mergec extract-lora`, not from a script: each is
    // asserted by tests/lora_extract.rs on models it writes.
    let extraction = std::fs::read_to_string("tests/lora_extract.rs").unwrap();
    for code in Code::ALL.iter().filter(|c| **c != Code::E0001) {
        let extraction_code = (code.as_str().starts_with("E092") || code.as_str().starts_with("W003"))
            && extraction.contains(&format!("Code::{code}"));
        assert!(
            extraction_code || fixtures.iter().any(|f| f.starts_with(code.as_str())),
            "no tests/ui fixture for {code} ({})",
            code.summary()
        );
    }
}

#[test]
fn spec_lists_every_code() {
    let spec = std::fs::read_to_string("spec/diagnostics.md").unwrap();
    for code in Code::ALL {
        let heading = format!("## {code}: {}", code.summary());
        assert!(spec.contains(&heading), "spec/diagnostics.md lacks `{heading}`");
    }
    let listed = spec.lines().filter(|l| l.starts_with("## ")).count();
    assert_eq!(
        listed,
        Code::ALL.len(),
        "spec/diagnostics.md lists codes that do not exist"
    );
}

#[test]
fn json_format_has_line_and_column() {
    let path = Path::new("tests/ui/e0201_unknown_name.merge");
    let text = std::fs::read_to_string(path).unwrap();
    let script = Script::from_text("e0201.merge", text, "tests/ui".into());
    let diags = driver::compile(&script, false, &Limits::default()).unwrap_err();
    let json = mergec::diag::render::to_json(&diags.0, &script.sources);
    let first = &json[0];
    assert_eq!(first["code"], "E0201");
    assert_eq!(first["span"]["line"], 4);
    assert_eq!(first["span"]["column"], 6);
}
