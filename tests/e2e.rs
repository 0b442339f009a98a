//! End to end through the `mergec` binary and the library: exit codes, output folders,
//! refusal to overwrite, atomicity when a run fails, dtype conversion.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn mergec(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mergec"))
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A temporary folder holding `script.merge` that reads the conformance models.
fn workspace(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let models = conformance_dir().join("models");
    let text = script.replace("MODELS", &models.display().to_string());
    std::fs::write(dir.path().join("script.merge"), text).unwrap();
    dir
}

const LINEAR: &str = r#"
model a = "MODELS/micro-llama-ft1-f32"
model b = "MODELS/micro-llama-ft2-f32"
save linear(a { weight: 0.5 }, b { weight: 0.5 }) to "out/merged" { dtype: bf16 }
"#;

#[test]
fn check_then_run_writes_a_complete_folder() {
    let ws = workspace(LINEAR);
    let (code, stdout, stderr) = mergec(&["check", "script.merge"], ws.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("39 tensors"), "{stdout}");
    assert!(stdout.contains("peak memory"), "{stdout}");
    assert!(!ws.path().join("out/merged").exists(), "check must not write");

    let (code, stdout, stderr) = mergec(&["run", "script.merge"], ws.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
    let out = ws.path().join("out/merged");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "bfloat16");
    let tensors = load_folder(&out);
    assert_eq!(tensors.len(), 39);
    assert!(tensors.values().all(|t| t.dtype == "BF16"));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("tags:\n- merge\n- mergec") && card.contains("linear(a { weight: 0.5 }"),
        "{card}"
    );
    // nothing but the output folder appeared beside it (no temporary folder left over)
    let entries: Vec<_> = std::fs::read_dir(ws.path().join("out")).unwrap().collect();
    assert_eq!(entries.len(), 1);
}

#[test]
fn existing_output_is_refused_without_force() {
    let ws = workspace(LINEAR);
    let out = ws.path().join("out/merged");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    // A folder mergec did not write: refused with and without --force.
    for force in [&[][..], &["--force"][..]] {
        let args = [&["run", "script.merge"][..], force].concat();
        let (code, _, stderr) = mergec(&args, ws.path());
        assert_eq!(code, 1);
        assert!(
            stderr.contains("[E0416]") && stderr.contains("--force"),
            "{stderr}"
        );
        assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "precious");
    }
    // One mergec wrote: refused without --force, replaced with it.
    std::fs::remove_file(out.join("keep.txt")).unwrap();
    let (code, _, stderr) = mergec(&["run", "script.merge"], ws.path());
    assert_eq!(code, 0, "{stderr}");
    std::fs::write(out.join("extra.txt"), "from the old output").unwrap();
    let (code, _, stderr) = mergec(&["run", "script.merge"], ws.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("[E0405]") && stderr.contains("--force"),
        "{stderr}"
    );
    let (code, _, stderr) = mergec(&["run", "script.merge", "--force"], ws.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(!out.join("extra.txt").exists());
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn errors_exit_1_and_json_is_machine_readable() {
    let ws = workspace(
        r#"
model a = "MODELS/micro-llama-ft1-f32"
save lienar(a { weight: 1 }) to "out/x"
"#,
    );
    let (code, _, stderr) = mergec(&["check", "script.merge"], ws.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("[E0203]") && stderr.contains("did you mean `linear`?"),
        "{stderr}"
    );
    let (code, stdout, _) = mergec(&["check", "script.merge", "--format", "json"], ws.path());
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(json["diagnostics"][0]["code"], "E0203");
    assert_eq!(json["diagnostics"][0]["span"]["line"], 3);
}

#[test]
fn a_missing_script_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = mergec(&["check", "nope.merge"], dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read `nope.merge`"), "{stderr}");
}

#[test]
fn a_failed_run_leaves_no_folder_behind() {
    // Check against a good copy of a model, then truncate it before the run reads it.
    let ws = tempfile::tempdir().unwrap();
    let model = ws.path().join("m");
    std::fs::create_dir_all(&model).unwrap();
    let src = conformance_dir().join("models/micro-llama-ft1-f32");
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let text = "model a = \"m\"\nsave 0.5 * a to \"out/x\"\n";
    let script = mergec::driver::Script::from_text("t.merge", text.to_string(), ws.path().to_path_buf());
    let compiled = mergec::driver::compile(&script, false, &mergec::plan::Limits::default()).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(model.join("model.safetensors"))
        .unwrap();
    file.set_len(9000).unwrap();
    let executor = mergec::exec::CpuExecutor::new(1, 1024).unwrap();
    let reader = mergec::io::TensorReader::new();
    let err = mergec::exec::run(&compiled.plan, &executor, &reader, |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("changed since its header was read"),
        "{err}"
    );
    let out = ws.path().join("out");
    let left: Vec<_> = std::fs::read_dir(&out).map(|d| d.collect()).unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_copy_with_a_dtype_change_rounds_to_nearest_even() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "model a = \"models/micro-llama-ft1-f32\"\nsave a to \"out/half\" { dtype: f16 }\nsave a to \"out/same\"\n";
    let (_, compiled) = compile_text(text, &conformance_dir(), tmp.path()).unwrap_or_else(|_| panic!());
    // the unchanged save is a raw copy, the converted one a kernel
    let copies = compiled
        .plan
        .steps
        .iter()
        .filter(|s| s.kernel == mergec::plan::Kernel::Copy)
        .count();
    assert_eq!(copies, 39);
    run_compiled(&compiled, 2);
    let input = load_folder(&conformance_dir().join("models/micro-llama-ft1-f32"));
    let half = load_folder(&tmp.path().join("half"));
    let same = load_folder(&tmp.path().join("same"));
    for (name, t) in &input {
        let h = &half[name];
        assert_eq!(h.dtype, "F16");
        for (x, y) in t.values.iter().zip(&h.values) {
            assert_eq!(half::f16::from_f32(*x).to_f32().to_bits(), y.to_bits(), "{name}");
        }
        assert_eq!(same[name].values, t.values);
    }
    let original =
        std::fs::read(conformance_dir().join("models/micro-llama-ft1-f32/model.safetensors")).unwrap();
    let copied = std::fs::read(tmp.path().join("same/model.safetensors")).unwrap();
    assert_eq!(original.len(), copied.len());
}

#[test]
fn task_arithmetic_by_hand_matches_a_direct_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let text = r#"
model ft1 = "models/micro-llama-ft1-f32"
model ft2 = "models/micro-llama-ft2-f32"
model ft3 = "models/micro-llama-ft3-f32"
save ft1 + 0.5 * (ft2 - ft1) - (ft3 - ft1) / 4 to "out/ta"
"#;
    let (_, compiled) = compile_text(text, &conformance_dir(), tmp.path()).unwrap_or_else(|_| panic!());
    run_compiled(&compiled, 2);
    let m = |n: &str| load_folder(&conformance_dir().join(format!("models/micro-llama-{n}-f32")));
    let (a, b, c) = (m("ft1"), m("ft2"), m("ft3"));
    let out = load_folder(&tmp.path().join("ta"));
    for (name, t) in &out {
        for i in 0..t.values.len() {
            let (x, y, z) = (a[name].values[i], b[name].values[i], c[name].values[i]);
            let expected = (x + 0.5 * (y - x)) - (z - x) / 4.0;
            assert_eq!(t.values[i].to_bits(), expected.to_bits(), "{name}[{i}]");
        }
    }
}

#[test]
fn demo_runs_from_an_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = mergec(&["demo", "d"], dir.path());
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for out in ["d/out/linear", "d/out/task-arithmetic"] {
        assert!(dir.path().join(out).join("model.safetensors").exists(), "{out}");
    }
    // a second demo run replaces its own outputs
    let (code, _, stderr) = mergec(&["demo", "d"], dir.path());
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_memory_budget_is_checked_before_anything_runs() {
    let ws = workspace(LINEAR);
    let (code, _, stderr) = mergec(&["run", "script.merge", "--max-memory", "64KB"], ws.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("[E0501]") && stderr.contains("a budget of at least"),
        "{stderr}"
    );
    assert!(!ws.path().join("out/merged").exists());
    let (code, stdout, stderr) = mergec(&["check", "script.merge", "--max-memory", "1GiB"], ws.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("peak memory"));
    let (code, _, stderr) = mergec(&["check", "script.merge", "--max-memory", "lots"], ws.path());
    assert_eq!(code, 2, "a bad size is a usage error: {stderr}");
}

#[test]
fn streaming_in_blocks_gives_the_same_bytes() {
    // Tiny blocks force every element-wise tensor through the block-by-block path (and
    // shards of 12K through the streaming writer); the output must equal the whole-tensor run.
    let text = r#"
model ft1 = "models/micro-llama-ft1-bf16"
model ft2 = "models/micro-llama-ft2-f32"
save linear(ft1 { weight: 0.3 }, ft2 { weight: 0.7 }) to "out/m" { dtype: bf16, shard: 12K }
save ft1 + 0.5 * (ft2 - ft1) to "out/ta" { dtype: f32 }
"#;
    let mut outputs = Vec::new();
    for block in [mergec::plan::STREAM_BLOCK_ELEMS, 333] {
        let tmp = tempfile::tempdir().unwrap();
        let text = text.replace("to \"out/", &format!("to \"{}/", tmp.path().display()));
        let script = mergec::driver::Script::from_text("s.merge", text, conformance_dir());
        let limits = mergec::plan::Limits {
            stream_block_elems: block,
            ..mergec::plan::Limits::default()
        };
        let compiled = mergec::driver::compile(&script, false, &limits).unwrap();
        let streamed = compiled
            .plan
            .steps
            .iter()
            .filter(|s| s.streamed(compiled.plan.stream_block))
            .count();
        if block == 333 {
            assert!(streamed > 40, "{streamed} streamed steps");
        } else {
            assert_eq!(streamed, 0);
        }
        run_compiled(&compiled, 2);
        let mut files = Vec::new();
        for dir in ["m", "ta"] {
            let mut names: Vec<_> = std::fs::read_dir(tmp.path().join(dir))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            // README.md records the script, which names this run's temporary folder
            for n in names.into_iter().filter(|n| n != "README.md") {
                files.push((n.clone(), std::fs::read(tmp.path().join(dir).join(n)).unwrap()));
            }
        }
        outputs.push(files);
    }
    assert_eq!(outputs[0].len(), outputs[1].len());
    for (a, b) in outputs[0].iter().zip(&outputs[1]) {
        assert_eq!(a.0, b.0);
        assert!(a.1 == b.1, "{:?} differs", a.0);
    }
}
