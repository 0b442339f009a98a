//! mergekit YAML configs: every conformance config runs from its YAML and matches
//! mergekit's output; `mergec import`'s script gives bit-identical output and is
//! snapshotted; bad YAML gets diagnostics on the YAML's own lines.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use mergec::diag::Diagnostics;
use mergec::driver::{self, Compiled, Script};
use mergec::import::{self, Import, Options};
use mergec::plan::Limits;

fn config_text(name: &str) -> String {
    std::fs::read_to_string(conformance_dir().join(format!("configs/{name}.yml"))).unwrap()
}

/// mergekit's `--out-shard-size` from a config's `# mergekit-args:` line.
fn shard_arg(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("# mergekit-args:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "--out-shard-size" {
            return words.next().map(|s| import::parse_shard_size(s).unwrap());
        }
    }
    None
}

/// Options as `make_expected.py` ran mergekit: from the conformance folder, seed 7.
fn options(name: &str, base_dir: &Path, out: &Path, seed: u64) -> Options {
    let mut o = Options::new(&format!("configs/{name}.yml"), base_dir, out);
    o.seed = Some(seed);
    o.shard_bytes = shard_arg(&config_text(name));
    o
}

fn translate(name: &str, opts: &Options) -> Import {
    match import::translate(&format!("configs/{name}.yml"), config_text(name), opts) {
        Ok(i) => i,
        Err(f) => panic!(
            "{name}:\n{}",
            mergec::diag::render::render_text(&f.diagnostics.0, &f.sources, false)
        ),
    }
}

fn render_diags(script: &Script, d: &Diagnostics) -> String {
    mergec::diag::render::render_text(&d.0, &script.sources, false)
}

/// Translates `name` with output under `root`, compiles and runs it.
fn run_yaml(name: &str, root: &Path, seed: u64) -> Compiled {
    let imp = translate(name, &options(name, &conformance_dir(), &root.join(name), seed));
    let (_, compiled) = imp
        .compile(false, &Limits::default())
        .unwrap_or_else(|(s, d)| panic!("{name}:\n{}\n{}", imp.text(), render_diags(&s, &d)));
    run_compiled(&compiled, 2);
    compiled
}

/// Every file of two output folders is byte-identical, except the model card (it holds the
/// script, whose paths differ) and the mergekit_config.yml a run from YAML records.
fn assert_same_files(a: &Path, b: &Path, what: &str) {
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n != "README.md" && n != "mergekit_config.yml")
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(a), names(b), "{what}: files");
    for n in names(a) {
        assert!(
            std::fs::read(a.join(&n)).unwrap() == std::fs::read(b.join(&n)).unwrap(),
            "{what}: {n} differs"
        );
    }
}

/// The YAML runs and matches mergekit; the imported script, written to another folder
/// (so its paths are rewritten), gives the same bytes; the script is snapshotted.
fn yaml_conforms(name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let compiled = run_yaml(name, tmp.path(), 7);
    let ours = tmp.path().join(name);
    compare_with_expected(name, &ours, &compiled, || {
        let tmp2 = tempfile::tempdir().unwrap();
        run_yaml(name, tmp2.path(), 8);
        let dir = tmp2.path().join(name);
        (tmp2, dir)
    });

    let scripts = tempfile::tempdir().unwrap();
    let out2 = tempfile::tempdir().unwrap();
    let mut opts = options(name, &conformance_dir(), &out2.path().join(name), 7);
    opts.script_dir = scripts.path().join("sub");
    std::fs::create_dir_all(&opts.script_dir).unwrap();
    let imp = translate(name, &opts);
    let file = opts.script_dir.join(format!("{name}.merge"));
    std::fs::write(&file, imp.text()).unwrap();
    let script = Script::from_file(&file).unwrap();
    let c = driver::compile(&script, false, &Limits::default())
        .unwrap_or_else(|d| panic!("{name}:\n{}\n{}", script.text(), render_diags(&script, &d)));
    run_compiled(&c, 2);
    assert_same_files(&ours, &out2.path().join(name), name);

    // As `mergec import configs/NAME.yml --seed 7` prints it from the conformance folder.
    let shown = translate(
        name,
        &options(
            name,
            Path::new("tests/fixtures/conformance"),
            Path::new(&format!("out/{name}")),
            7,
        ),
    );
    insta::assert_snapshot!(format!("import_{name}"), shown.text());
}

macro_rules! yaml_conformance {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                yaml_conforms(stringify!($name));
            }
        )*

        #[test]
        fn every_config_is_tested() {
            let tested = [$(stringify!($name)),*];
            for entry in std::fs::read_dir(conformance_dir().join("configs")).unwrap() {
                let path = entry.unwrap().path();
                let stem = path.file_stem().unwrap().to_string_lossy().to_string();
                assert!(tested.contains(&stem.as_str()), "no YAML test for {stem}");
            }
        }
    };
}

common::conformance_cases!(yaml_conformance);

fn set_fake_hf_cache() {
    // An empty cache, so hub ids resolve the same way everywhere.
    std::env::set_var("HF_HUB_CACHE", "tests/fixtures/hf-cache");
}

/// The diagnostics of a YAML file (errors, or the warnings of a config that compiles).
fn yaml_diagnostics(path: &Path) -> String {
    let name = format!(
        "tests/fixtures/yaml/bad/{}",
        path.file_name().unwrap().to_string_lossy()
    );
    let text = std::fs::read_to_string(path).unwrap();
    let mut opts = Options::new(&name, Path::new("tests/fixtures/conformance"), Path::new("out/x"));
    // Errors as `--strict` reports them; warnings (w*) as a plain run does.
    opts.strict = name.contains("/e0");
    match import::translate(&name, text, &opts) {
        Err(f) => mergec::diag::render::render_text(&f.diagnostics.0, &f.sources, false),
        Ok(imp) => match imp.compile(false, &Limits::default()) {
            Ok((s, c)) => render_diags(&s, &c.warnings),
            Err((s, d)) => render_diags(&s, &d),
        },
    }
}

#[test]
fn bad_yaml_snapshots() {
    set_fake_hf_cache();
    insta::glob!("fixtures/yaml/bad/*.yml", |path| {
        let source = std::fs::read_to_string(path).unwrap();
        let rendered = yaml_diagnostics(path);
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let code = stem.split('_').next().unwrap().to_uppercase();
        assert!(
            rendered.contains(&format!("[{code}]")),
            "{stem} should report {code}, got:\n{rendered}"
        );
        // Every error points into the YAML itself, with its line and column.
        let yaml_name = format!("tests/fixtures/yaml/bad/{stem}.yml:");
        assert!(
            rendered.contains(&yaml_name),
            "{stem}: not on the YAML:\n{rendered}"
        );
        assert!(
            !rendered.contains("internal compiler error"),
            "{stem}:\n{rendered}"
        );
        insta::assert_snapshot!(format!(
            "--- source ---\n{source}\n--- diagnostics ---\n{rendered}"
        ));
    });
}

const MULTI: &str = "tests/fixtures/yaml/multi.yml";

/// mergekit-multi: one graph, the intermediate never written; the same bits as the
/// script written by hand.
#[test]
fn multi_document_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(MULTI).unwrap();
    let out = tmp.path().join("final");
    let opts = Options::new("multi.yml", &conformance_dir(), &out);
    let imp = import::translate("multi.yml", text.clone(), &opts).unwrap();
    let (_, c) = imp
        .compile(false, &Limits::default())
        .unwrap_or_else(|(s, d)| panic!("{}", render_diags(&s, &d)));
    assert_eq!(c.program.outputs.len(), 1, "{}", imp.text());
    run_compiled(&c, 2);
    assert!(!tmp.path().join("smooth").exists());

    let by_hand = r#"
model base = "models/micro-llama-base-f32"
model ft1 = "models/micro-llama-ft1-f32"
model ft2 = "models/micro-llama-ft2-f32"
model ft3 = "models/micro-llama-ft3-f32"
let smooth = slerp(ft1, ft2, t: 0.5)
save ties(base, smooth { weight: 1, density: 0.6 }, ft3 { weight: 0.5, density: 0.4 }) to "out/final" { dtype: f32 }
"#;
    let tmp2 = tempfile::tempdir().unwrap();
    let (_, c2) = compile_text(by_hand, &conformance_dir(), tmp2.path())
        .unwrap_or_else(|(s, d)| panic!("{}", render(&s, &d)));
    run_compiled(&c2, 2);
    assert_same_files(&out, &tmp2.path().join("final"), "multi");

    // --save-intermediates also writes `smooth`, beside the final merge.
    let tmp3 = tempfile::tempdir().unwrap();
    let mut opts = Options::new("multi.yml", &conformance_dir(), &tmp3.path().join("final"));
    opts.save_intermediates = true;
    let imp = import::translate("multi.yml", text, &opts).unwrap();
    let (_, c) = imp
        .compile(false, &Limits::default())
        .unwrap_or_else(|(s, d)| panic!("{}", render_diags(&s, &d)));
    assert_eq!(c.program.outputs.len(), 2);
    run_compiled(&c, 2);
    assert!(tmp3.path().join("smooth/model.safetensors").exists());
    assert_same_files(&out, &tmp3.path().join("final"), "multi, intermediates saved");

    let shown = import::translate(
        "tests/fixtures/yaml/multi.yml",
        std::fs::read_to_string(MULTI).unwrap(),
        &Options::new(
            "tests/fixtures/yaml/multi.yml",
            Path::new("tests/fixtures/conformance"),
            Path::new("out/final"),
        ),
    )
    .unwrap();
    insta::assert_snapshot!("import_multi", shown.text());
}

/// Diagnostics of the generated script that have no YAML place are shown against the
/// script, named after the YAML.
#[test]
fn unmapped_errors_show_the_generated_script() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep"), "not empty").unwrap();
    let opts = Options::new("configs/ties_f32.yml", &conformance_dir(), &out);
    let imp = import::translate("configs/ties_f32.yml", config_text("ties_f32"), &opts).unwrap();
    let Err((script, d)) = imp.compile(false, &Limits::default()) else {
        panic!("an existing output folder should be refused");
    };
    let text = render_diags(&script, &d);
    assert!(text.contains("[E0416]"), "{text}");
    assert!(text.contains("configs/ties_f32.yml (as .merge)"), "{text}");
}

// ---- the command line ----

fn mergec() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mergec"))
}

fn in_conformance(args: &[&str]) -> std::process::Output {
    let out = mergec()
        .args(args)
        .current_dir(conformance_dir())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

#[test]
fn cli_run_import_and_check() {
    let tmp = tempfile::tempdir().unwrap();
    let direct = tmp.path().join("direct");
    let run = in_conformance(&[
        "run",
        "configs/ties_f32.yml",
        direct.to_str().unwrap(),
        "--seed",
        "7",
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    // The recipe travels with the model, as mergekit writes it, and the card says so.
    let recipe = std::fs::read_to_string(direct.join("mergekit_config.yml")).unwrap();
    assert_eq!(
        recipe,
        std::fs::read_to_string(conformance_dir().join("configs/ties_f32.yml")).unwrap()
    );
    let card = std::fs::read_to_string(direct.join("README.md")).unwrap();
    assert!(card.contains("`mergekit_config.yml`"), "{card}");
    assert!(
        card.contains(&format!("mergec {}", env!("CARGO_PKG_VERSION"))),
        "{card}"
    );

    // import -o: paths made relative to the script's folder; running it gives the same bytes.
    let script = tmp.path().join("scripts/ties.merge");
    std::fs::create_dir_all(script.parent().unwrap()).unwrap();
    let via = tmp.path().join("via-script");
    let imp = in_conformance(&[
        "import",
        "configs/ties_f32.yml",
        via.to_str().unwrap(),
        "-o",
        script.to_str().unwrap(),
        "--seed",
        "7",
    ]);
    assert!(imp.status.success(), "{}", text(&imp.stderr));
    let written = std::fs::read_to_string(&script).unwrap();
    assert!(written.contains("save ties(\n    base,"), "{written}");
    let run2 = mergec().args(["run", script.to_str().unwrap()]).output().unwrap();
    assert!(run2.status.success(), "{}", text(&run2.stderr));
    assert_same_files(&direct, &via, "cli");

    // Without -o the script goes to standard output; an existing -o file needs --force.
    let printed = in_conformance(&["import", "configs/ties_f32.yml"]);
    assert!(text(&printed.stdout).contains("to \"out/ties_f32\""));
    let again = in_conformance(&["import", "configs/ties_f32.yml", "-o", script.to_str().unwrap()]);
    assert!(!again.status.success());

    let check = in_conformance(&["check", "configs/ties_f32.yml"]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(
        text(&check.stdout).starts_with("ok: 1 output"),
        "{}",
        text(&check.stdout)
    );
    let json = in_conformance(&["check", "configs/ties_f32.yml", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
}

#[test]
fn cli_shard_size_and_options() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sharded");
    let run = in_conformance(&[
        "run",
        "configs/linear_sharded_f32.yml",
        out.to_str().unwrap(),
        "--out-shard-size",
        "12K",
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(out.join("model.safetensors.index.json").exists());

    // A config needs an output folder to run; a script takes no mergekit options.
    let no_out = in_conformance(&["run", "configs/linear_f32.yml"]);
    assert_eq!(no_out.status.code(), Some(2));
    assert!(text(&no_out.stderr).contains("OUT_DIR"));
    let script = mergec()
        .args(["check", "tests/conformance/linear_f32.merge", "--seed", "3"])
        .output()
        .unwrap();
    assert_eq!(script.status.code(), Some(2));
}

#[test]
fn cli_errors_point_at_the_yaml() {
    let bad =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/yaml/bad/e0604_unknown_method.yml");
    let out = in_conformance(&["check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("[E0604]"), "{err}");
    assert!(err.contains("e0604_unknown_method.yml:6:15"), "{err}");
    assert!(err.contains("did you mean `ties`?"), "{err}");
    assert!(
        err.contains("1 error found; nothing was read or written"),
        "{err}"
    );
}

#[test]
fn cli_plan_debug_and_json() {
    let plan = in_conformance(&["plan", "configs/ties_f32.yml"]);
    assert!(plan.status.success(), "{}", text(&plan.stderr));
    assert!(text(&plan.stdout).contains("model.embed_tokens.weight"));
    let hir = in_conformance(&["debug", "hir", "configs/slices_blend_f32.yml"]);
    assert!(hir.status.success(), "{}", text(&hir.stderr));
    let bad = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/yaml/bad/e0602_unknown_key.yml");
    let json = in_conformance(&["check", bad.to_str().unwrap(), "--format", "json", "--strict"]);
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let d = &v["diagnostics"][0];
    assert_eq!(d["code"], "E0602");
    assert_eq!(
        (d["span"]["line"].as_u64(), d["span"]["column"].as_u64()),
        (Some(4), Some(5))
    );
}

/// Hub ids resolve in the Hugging Face cache, with `@revision`.
#[test]
fn cli_hub_ids_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    for (repo, model, refname) in [
        ("models--acme--tiny-ft1", "micro-llama-ft1-f32", "main"),
        ("models--acme--tiny-ft2", "micro-llama-ft2-f32", "v1"),
    ] {
        let snap = cache.join(repo).join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(cache.join(repo).join("refs")).unwrap();
        std::fs::write(cache.join(repo).join("refs").join(refname), "abc123\n").unwrap();
        for f in std::fs::read_dir(conformance_dir().join("models").join(model)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
        }
    }
    let hub = "models:\n  - model: acme/tiny-ft1\n    parameters: {weight: 0.3}\n  - model: acme/tiny-ft2@v1\n    parameters: {weight: 0.7}\nmerge_method: linear\n";
    let local = hub
        .replace(
            "acme/tiny-ft1",
            &conformance_dir()
                .join("models/micro-llama-ft1-f32")
                .display()
                .to_string(),
        )
        .replace(
            "acme/tiny-ft2@v1",
            &conformance_dir()
                .join("models/micro-llama-ft2-f32")
                .display()
                .to_string(),
        );
    std::fs::write(tmp.path().join("hub.yml"), hub).unwrap();
    std::fs::write(tmp.path().join("local.yml"), local).unwrap();
    for (cfg, out) in [("hub.yml", "out-hub"), ("local.yml", "out-local")] {
        let r = mergec()
            .args(["run", cfg, out])
            .current_dir(tmp.path())
            .env("HF_HUB_CACHE", &cache)
            .output()
            .unwrap();
        assert!(r.status.success(), "{cfg}: {}", text(&r.stderr));
    }
    assert_same_files(
        &tmp.path().join("out-hub"),
        &tmp.path().join("out-local"),
        "hub ids",
    );
    let imported = mergec()
        .args(["import", "hub.yml"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let script = text(&imported.stdout);
    assert!(script.contains("model ft1 = \"hf:acme/tiny-ft1\""), "{script}");
    assert!(script.contains("model ft2 = \"hf:acme/tiny-ft2@v1\""), "{script}");
}

/// The script a YAML translates to (from the conformance folder, saving to `out/x`).
fn script_of(yaml: &str) -> Result<String, String> {
    let opts = Options::new(
        "test.yml",
        Path::new("tests/fixtures/conformance"),
        Path::new("out/x"),
    );
    import::translate("test.yml", yaml.to_string(), &opts)
        .map(|i| i.text().to_string())
        .map_err(|f| mergec::diag::render::render_text(&f.diagnostics.0, &f.sources, false))
}

const FT1: &str = "models/micro-llama-ft1-f32";

#[test]
fn translation_rules() {
    // linear with a base model: mergekit feeds the base in as one more input, and takes
    // the config and tokenizer from it.
    let s = script_of(&format!(
        "models:\n  - model: {FT1}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\nbase_model: models/micro-llama-base-f32\nparameters: {{weight: 0.25}}\n"
    ))
    .unwrap();
    assert!(
        s.contains("linear(ft1 { weight: 0.5 }, base, weight: 0.25)"),
        "{s}"
    );
    assert!(s.contains("config: base, tokenizer: base"), "{s}");

    // A filtered per-model parameter of the whole config in a slice that does not start
    // at layer 0 goes into each model's block, after its own value.
    let s = script_of(&format!(
        "slices:\n  - sources:\n      - model: {FT1}\n        layer_range: [1, 3]\n        parameters:\n          weight:\n            - filter: mlp\n              value: 2\n      - model: models/micro-llama-ft2-f32\n        layer_range: [0, 2]\nmerge_method: linear\nparameters:\n  weight:\n    - filter: layers.1.\n      value: 0.5\n    - value: 1\n"
    ))
    .unwrap();
    assert!(
        s.contains("let ft1_weight = match tensor { \"mlp\" => 2, \"layers.1.\" => 0.5, _ => 1 }"),
        "{s}"
    );
    assert!(
        s.contains("let ft2_weight = match tensor { \"layers.1.\" => 0.5, _ => 1 }"),
        "{s}"
    );

    // The base of a slice must be one of its sources.
    let e = script_of(&format!(
        "slices:\n  - sources:\n      - model: {FT1}\n        layer_range: [0, 2]\nmerge_method: ties\nbase_model: models/micro-llama-base-f32\n"
    ))
    .unwrap_err();
    assert!(e.contains("is not among this slice's sources"), "{e}");

    // mergekit-multi documents that use each other in a cycle.
    let e = script_of(&format!(
        "name: a\nmodels:\n  - model: b\n  - model: {FT1}\nmerge_method: karcher\n---\nname: b\nmodels:\n  - model: a\n  - model: {FT1}\nmerge_method: karcher\n"
    ))
    .unwrap_err();
    assert!(e.contains("cycle"), "{e}");

    // A filter with `*`, and a duplicate model.
    // A filter with `*` never matches in mergekit: its entry is left out, with a warning.
    let imp = import::translate(
        "test.yml",
        format!(
            "models:\n  - model: {FT1}\n    parameters:\n      weight:\n        - filter: layers.*.mlp\n          value: 1\n        - value: 0.5\nmerge_method: linear\n"
        ),
        &Options::new("test.yml", Path::new("tests/fixtures/conformance"), Path::new("out/x")),
    )
    .unwrap();
    assert!(
        imp.text().contains("linear(micro_llama_ft1_f32 { weight: 0.5 })"),
        "{}",
        imp.text()
    );
    assert!(imp
        .warnings
        .0
        .iter()
        .any(|d| d.message.contains("never matches in mergekit")));
    // A model listed twice is one input, as in mergekit, with a warning (an error under
    // `--strict`).
    let twice = format!(
        "models:\n  - model: {FT1}\n    parameters: {{weight: 0.3}}\n  - model: models/micro-llama-ft2-f32\n  - model: {FT1}\n    parameters: {{weight: 0.9}}\nmerge_method: linear\n"
    );
    let imp = import::translate(
        "test.yml",
        twice.clone(),
        &Options::new(
            "test.yml",
            Path::new("tests/fixtures/conformance"),
            Path::new("out/x"),
        ),
    )
    .unwrap();
    assert!(
        imp.text().contains("linear(ft1 { weight: 0.3 }, ft2)"),
        "{}",
        imp.text()
    );
    assert!(imp
        .warnings
        .0
        .iter()
        .any(|d| d.code == mergec::diag::Code::W0005 && d.message.contains("listed twice")));
    // Each parameter comes from the first entry that sets it.
    let s = script_of(&format!(
        "models:\n  - model: {FT1}\n  - model: models/micro-llama-ft2-f32\n  - model: {FT1}\n    parameters: {{weight: 0.9}}\nmerge_method: linear\nparameters: {{weight: 1}}\n"
    ))
    .unwrap();
    assert!(s.contains("linear(ft1 { weight: 0.9 }, ft2, weight: 1)"), "{s}");
    let mut strict = Options::new(
        "test.yml",
        Path::new("tests/fixtures/conformance"),
        Path::new("out/x"),
    );
    strict.strict = true;
    let e = import::translate("test.yml", twice, &strict).unwrap_err();
    assert!(e
        .diagnostics
        .0
        .iter()
        .any(|d| d.code == mergec::diag::Code::E0603 && d.message.contains("listed twice")));

    // Model names: unique and valid, from any path.
    let s = script_of(
        "models:\n  - model: models/micro-llama-ft1-f32\n  - model: ./models/micro-llama-ft1-f32/model.safetensors\nmerge_method: karcher\n",
    )
    .unwrap();
    assert!(s.contains("model micro_llama_ft1_f32 = "), "{s}");
    assert!(s.contains("model micro_llama_ft1_f32_2 = "), "{s}");
}

/// No YAML makes the translation panic: every config and fixture cut short, and with
/// lines dropped (`fuzz/fuzz_targets/yaml.rs` goes further).
#[test]
fn broken_yaml_never_panics() {
    let dirs = [
        "tests/fixtures/conformance/configs",
        "tests/fixtures/yaml/published",
        "tests/fixtures/yaml/moe",
        "tests/fixtures/yaml/bad",
    ];
    let files = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
        .chain([
            PathBuf::from(MULTI),
            PathBuf::from("tests/fixtures/yaml/modules.yml"),
        ])
        .filter(|p| import::is_yaml(p));
    for (i, path) in files.enumerate() {
        let text = std::fs::read_to_string(path).unwrap();
        let mut opts = Options::new("x.yml", &conformance_dir(), Path::new("out/x"));
        opts.strict = i % 2 == 1;
        for cut in (0..text.len()).step_by(5).filter(|i| text.is_char_boundary(*i)) {
            let _ = import::translate("x.yml", text[..cut].to_string(), &opts);
        }
        let lines: Vec<&str> = text.lines().collect();
        for skip in 0..lines.len() {
            let mut l = lines.clone();
            l.remove(skip);
            let _ = import::translate("x.yml", l.join("\n"), &opts);
        }
    }
}

/// The translation of a fixture under `tests/fixtures/yaml/`, from the conformance folder.
fn fixture_import(rel: &str, out: &Path, opts: impl FnOnce(&mut Options)) -> Import {
    let path = format!("tests/fixtures/yaml/{rel}");
    let mut o = Options::new(&path, &conformance_dir(), out);
    opts(&mut o);
    import::translate(&path, std::fs::read_to_string(&path).unwrap(), &o).unwrap_or_else(|f| {
        panic!(
            "{rel}:\n{}",
            mergec::diag::render::render_text(&f.diagnostics.0, &f.sources, false)
        )
    })
}

/// mergekit-moe configs: each translates (snapshot) and checks clean against the models.
#[test]
fn moe_configs_translate_and_check() {
    insta::glob!("fixtures/yaml/moe/*.yml", |path| {
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let tmp = tempfile::tempdir().unwrap();
        let imp = fixture_import(&format!("moe/{stem}.yml"), &tmp.path().join("x"), |_| {});
        if let Err((s, d)) = imp.compile(false, &Limits::default()) {
            panic!("{stem}:\n{}\n{}", imp.text(), render_diags(&s, &d));
        }
        let shown = fixture_import(&format!("moe/{stem}.yml"), Path::new("out/x"), |_| {});
        insta::assert_snapshot!(format!("import_moe_{stem}"), shown.text());
    });
}

/// A mergekit-moe YAML runs end to end and gives the same bytes as the `.merge` script
/// written by hand.
#[test]
fn moe_yaml_matches_the_script_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("moe");
    let imp = fixture_import("moe/mixtral.yml", &out, |o| o.seed = Some(3));
    let (_, c) = imp
        .compile(false, &Limits::default())
        .unwrap_or_else(|(s, d)| panic!("{}", render_diags(&s, &d)));
    run_compiled(&c, 2);

    let by_hand = r#"
model base = "models/micro-llama-base-f32"
model ft1 = "models/micro-llama-ft1-f32"
model ft2 = "models/micro-llama-ft2-f32"
model ft3 = "models/micro-llama-ft3-f32"
set seed = 3
save moe(base,
    ft1 { positive: ["the cat sat on the mat", "a dog ran"] },
    ft2 { positive: ["one two three four"], negative: ["the cat sat on the mat", "a dog ran"], residual_scale: 0.5 },
    ft3 { positive: ["hello there"], noise_scale: 0.01 },
    gate: "cheap_embed") to "out/moe" { dtype: bf16 }
"#;
    let tmp2 = tempfile::tempdir().unwrap();
    let (_, c2) = compile_text(by_hand, &conformance_dir(), tmp2.path())
        .unwrap_or_else(|(s, d)| panic!("{}", render(&s, &d)));
    run_compiled(&c2, 2);
    assert_same_files(&out, &tmp2.path().join("moe"), "mergekit-moe");
}

/// mergekit-moe's `--i-understand-this-is-not-useful-without-training` lets every expert
/// be the same model.
#[test]
fn moe_same_experts_with_mergekit_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let imp = fixture_import("bad/e0703_moe_same_experts.yml", &tmp.path().join("x"), |o| {
        o.allow_same_experts = true
    });
    assert!(imp.text().contains("allow_same_experts: true"), "{}", imp.text());
    if let Err((s, d)) = imp.compile(false, &Limits::default()) {
        panic!("{}", render_diags(&s, &d));
    }
    let out = mergec()
        .args([
            "check",
            "../yaml/bad/e0703_moe_same_experts.yml",
            "--i-understand-this-is-not-useful-without-training",
        ])
        .current_dir(conformance_dir())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// What mergekit tolerates runs with warnings; `--strict` makes them errors.
#[test]
fn cli_strict_turns_tolerated_into_errors() {
    let cfg =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/yaml/bad/w0005_mergekit_ignores.yml");
    let lax = in_conformance(&["check", cfg.to_str().unwrap()]);
    assert!(lax.status.success(), "{}", text(&lax.stderr));
    assert!(text(&lax.stderr).contains("[W0005]"), "{}", text(&lax.stderr));
    let strict = in_conformance(&["check", cfg.to_str().unwrap(), "--strict"]);
    assert_eq!(strict.status.code(), Some(1));
    let err = text(&strict.stderr);
    assert!(err.contains("[E0602]") && err.contains("[E0603]"), "{err}");
    let imported = in_conformance(&["import", cfg.to_str().unwrap()]);
    assert!(imported.status.success());
    assert!(
        text(&imported.stderr).contains("[W0005]"),
        "{}",
        text(&imported.stderr)
    );
}

/// `modules:`: each module merged on its own tensors and grafted over the base; what no
/// module names comes from the base.
#[test]
fn modules_merge_each_module_over_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vlm");
    let imp = fixture_import("modules.yml", &out, |_| {});
    let (_, c) = imp
        .compile(false, &Limits::default())
        .unwrap_or_else(|(s, d)| panic!("{}\n{}", imp.text(), render_diags(&s, &d)));
    run_compiled(&c, 2);
    let got = load_folder(&out);
    let base = load_folder(&conformance_dir().join("models/micro-llava-base-f32"));
    let ft = load_folder(&conformance_dir().join("models/micro-llava-ft1-f32"));
    assert_eq!(got.len(), base.len());
    for (name, b) in &base {
        let g = &got[name].values;
        if name.contains("language_model.") {
            let want: Vec<f32> = b
                .values
                .iter()
                .zip(&ft[name].values)
                .map(|(x, y)| 0.5 * x + 0.5 * y)
                .collect();
            assert_eq!(g, &want, "{name}");
        } else {
            assert_eq!(g, &b.values, "{name}");
        }
    }
    let shown = fixture_import("modules.yml", Path::new("out/x"), |_| {});
    insta::assert_snapshot!("import_modules", shown.text());
}

/// `chat_template: auto` takes the template most of the merge's models have.
#[test]
fn chat_template_auto_takes_the_most_common_one() {
    let tmp = tempfile::tempdir().unwrap();
    let models = conformance_dir().join("models");
    for (name, template) in [
        ("a", Some("{{ one }}")),
        ("b", Some("{{ two }}")),
        ("c", Some("{{ two }}")),
        ("d", None),
    ] {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(models.join("micro-llama-ft1-f32").join(f), dir.join(f)).unwrap();
        }
        if let Some(t) = template {
            let config = serde_json::json!({ "chat_template": t });
            std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        }
    }
    let yaml = "models:\n  - model: a\n  - model: b\n  - model: c\n  - model: d\nmerge_method: karcher\nchat_template: auto\n";
    let opts = Options::new("auto.yml", tmp.path(), &tmp.path().join("out"));
    let imp = import::translate("auto.yml", yaml.to_string(), &opts).unwrap();
    assert!(
        imp.text().contains("chat_template: \"{{ two }}\""),
        "{}",
        imp.text()
    );
    // No model has one: the donor's tokenizer files are kept as they are.
    let yaml = "models:\n  - model: d\n  - model: a/missing\nmerge_method: karcher\nchat_template: auto\n";
    let imp = import::translate("auto.yml", yaml.to_string(), &opts).unwrap();
    assert!(!imp.text().contains("chat_template"), "{}", imp.text());
}

/// The published configs that do not translate, with the code each gets: what mergekit
/// refuses, and what needs a feature mergec does not have.
const PUBLISHED_REFUSED: &[(&str, &str)] = &[
    // No `merge_method` (`metric_method` instead): mergekit refuses it.
    ("mergekit-examples__linear_small", "E0603"),
    // Two unnamed documents (the retired mergekit-mega format): mergekit refuses it.
    ("mergekit-examples__mega", "E0603"),
    // Methods of open pull requests: no mergekit release has them.
    ("mergekit-pr568__cabs-toplevel-method-keys", "E0604"),
    ("mergekit-pr646__core_space-same-model-twice", "E0604"),
    // A method newer than mergekit 0.1.5, which mergec does not have.
    ("mergekit-examples__whisper-encoder-decoder-weighted", "E0604"),
];

/// Published configs that translate but that mergekit refuses too, with the code `check`
/// gives them.
const PUBLISHED_REFUSED_AT_CHECK: &[(&str, &str)] = &[
    // nuslerp without `weight` (its example sets `lambda`, which nuslerp does not take);
    // its `tokenizer: {source: union}` translates.
    ("mergekit-examples__chipalign", "E0205"),
];

/// The model references of a generated script (`model NAME = "REF"`), as paths.
fn script_models(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|l| {
            l.strip_prefix("model ")?
                .split_once(" = \"")
                .map(|(_, r)| r.trim_end_matches('"'))
        })
        .map(|r| {
            let r = r.strip_prefix("hf:").unwrap_or(r);
            r.split('@').next().unwrap_or(r).to_string()
        })
        .collect()
}

/// Every published config translates, or gets the code it is listed with; each one that
/// translates checks clean against tiny synthetic models at its model references.
#[test]
fn published_configs() {
    let dir = Path::new("tests/fixtures/yaml/published");
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| import::is_yaml(p))
        .collect();
    names.sort();
    assert!(names.len() >= 30, "{} published configs", names.len());
    let layer_ends = regex::Regex::new(r"\.layers\[\d+\.\.(\d+)\]").unwrap();
    for path in &names {
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let opts = Options::new(&name, tmp.path(), &tmp.path().join("out"));
        let refused = PUBLISHED_REFUSED
            .iter()
            .find(|(s, _)| *s == stem)
            .map(|(_, c)| *c);
        let imp = match (import::translate(&name, text.clone(), &opts), refused) {
            (Err(f), Some(code)) => {
                let shown = mergec::diag::render::render_text(&f.diagnostics.0, &f.sources, false);
                assert!(
                    shown.contains(&format!("[{code}]")),
                    "{stem}: expected {code}:\n{shown}"
                );
                continue;
            }
            (Err(f), None) => panic!(
                "{stem}:\n{}",
                mergec::diag::render::render_text(&f.diagnostics.0, &f.sources, false)
            ),
            (Ok(imp), Some(code)) => panic!("{stem} should get {code}:\n{}", imp.text()),
            (Ok(imp), None) => imp,
        };
        let layers = layer_ends
            .captures_iter(imp.text())
            .filter_map(|c| c[1].parse::<usize>().ok())
            .max()
            .unwrap_or(4);
        for (k, model) in script_models(imp.text()).iter().enumerate() {
            let spec = mergec::synth::SynthSpec {
                layers,
                ..mergec::synth::SynthSpec::tiny(k as u32)
            };
            mergec::synth::write_model(&spec, &tmp.path().join(model), false).unwrap();
        }
        // Translated again, the references now find the synthetic models.
        let imp = import::translate(&name, text, &opts).unwrap();
        let at_check = PUBLISHED_REFUSED_AT_CHECK.iter().find(|(s, _)| *s == stem);
        match (imp.compile(false, &Limits::default()), at_check) {
            (Err((s, d)), Some((_, code))) => {
                let shown = render_diags(&s, &d);
                assert!(
                    shown.contains(&format!("[{code}]")),
                    "{stem}: expected {code}:\n{shown}"
                );
            }
            (Err((s, d)), None) => panic!("{stem}:\n{}\n{}", imp.text(), render_diags(&s, &d)),
            (Ok(_), Some((_, code))) => panic!("{stem} should get {code}:\n{}", imp.text()),
            (Ok(_), None) => {}
        }
    }
}

/// `mergec run` and `mergec import` take a mergekit-moe config as mergekit-moe does.
#[test]
fn cli_runs_a_mergekit_moe_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("moe");
    let cfg = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/yaml/moe/mixtral.yml");
    let run = in_conformance(&["run", cfg.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "MixtralForCausalLM");
    assert_eq!(config["num_local_experts"], 3);
    let imported = in_conformance(&["import", cfg.to_str().unwrap()]);
    assert!(imported.status.success(), "{}", text(&imported.stderr));
    assert!(
        text(&imported.stdout).contains("save moe("),
        "{}",
        text(&imported.stdout)
    );
}

/// `dtype: bfloat16` computes as mergekit does; `--compute f32` overrides it, and the check
/// summary and the model card say which arithmetic made the output.
#[test]
fn cli_compute_dtype_from_yaml_and_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let check = in_conformance(&["check", "configs/task_arithmetic_bf16.yml"]);
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(
        text(&check.stdout).contains("computed in bf16"),
        "{}",
        text(&check.stdout)
    );
    let check = in_conformance(&["check", "configs/task_arithmetic_bf16.yml", "--compute", "f32"]);
    assert!(
        text(&check.stdout).contains("computed in f32"),
        "{}",
        text(&check.stdout)
    );

    let mut weights = Vec::new();
    for compute in [None, Some("f32"), Some("bf16")] {
        let out = tmp.path().join(compute.unwrap_or("default"));
        let mut args = vec![
            "run",
            "configs/task_arithmetic_bf16.yml",
            out.to_str().unwrap(),
            "--quiet",
        ];
        if let Some(c) = compute {
            args.extend(["--compute", c]);
        }
        let run = in_conformance(&args);
        assert!(run.status.success(), "{}", text(&run.stderr));
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        let expected = if compute == Some("f32") {
            "Computed in f32"
        } else {
            "Computed in bf16"
        };
        assert!(card.contains(expected), "{card}");
        weights.push(std::fs::read(out.join("model.safetensors")).unwrap());
    }
    // The YAML's dtype is bf16 compute: the same bytes as `--compute bf16`, and mergekit's
    // exact values on this fixture; f32 compute rounds once and differs.
    assert_eq!(weights[0], weights[2]);
    assert_ne!(weights[0], weights[1]);
    let ours = load_folder(&tmp.path().join("default"));
    let theirs = load_folder(&conformance_dir().join("expected/task_arithmetic_bf16"));
    for (name, t) in &theirs {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours[name].values), bits(&t.values), "{name}");
    }
}
