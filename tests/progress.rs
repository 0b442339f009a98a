//! A run's progress as the built binary reports it: one JSON line per step with
//! `--progress json`, nothing but the result with `--quiet`, no bars when stderr is not a
//! terminal, and no driver message from the GPU probe.

use std::path::Path;
use std::process::{Command, Output};

fn mergec(cwd: &Path, args: &[&str]) -> Output {
    // As on a server without a desktop: with Mesa's Vulkan driver installed, its
    // device-select layer used to make libwayland print `error: XDG_RUNTIME_DIR is invalid`
    // during the GPU probe of every run.
    let out = Command::new(env!("CARGO_BIN_EXE_mergec"))
        .args(args)
        .current_dir(cwd)
        .env_remove("NODEVICE_SELECT")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mergec {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn demo_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    mergec::synth::write_demo_models(tmp.path()).unwrap();
    std::fs::write(
        tmp.path().join("two.merge"),
        "model base = \"models/base\"\nmodel chat = \"models/chat\"\n\
         save linear(base { weight: 0.5 }, chat { weight: 0.5 }) to \"out/linear\"\n\
         save chat - base to \"out/delta\"\n",
    )
    .unwrap();
    tmp
}

#[test]
fn progress_json_is_one_line_per_step_with_the_plans_totals() {
    let tmp = demo_dir();
    let check = mergec(tmp.path(), &["check", "two.merge", "--format", "json"]);
    let plan: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    let run = mergec(
        tmp.path(),
        &["run", "two.merge", "--progress", "json", "--backend", "cpu"],
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&run.stderr)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps = lines[0]["steps"].as_u64().unwrap() as usize;
    assert_eq!(lines.len(), steps, "one line per step");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], i + 1);
        assert_eq!(line["total_read_bytes"], plan["read_bytes"]);
        assert_eq!(line["total_write_bytes"], plan["write_bytes"]);
        assert!(line["tensor"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(line["elapsed_s"].as_f64().is_some());
    }
    let outputs: Vec<&str> = lines.iter().map(|l| l["dir"].as_str().unwrap()).collect();
    assert!(outputs[0].ends_with("out/linear") && outputs[steps - 1].ends_with("out/delta"));
    assert_eq!(lines[0]["output"], 0);
    assert_eq!(lines[steps - 1]["output"], 1);
    // Cumulative, and at the end the plan's totals.
    for pair in lines.windows(2) {
        assert!(pair[0]["written_bytes"].as_u64() < pair[1]["written_bytes"].as_u64());
        assert!(pair[0]["read_bytes"].as_u64() <= pair[1]["read_bytes"].as_u64());
    }
    assert_eq!(lines[steps - 1]["read_bytes"], plan["read_bytes"]);
    assert_eq!(lines[steps - 1]["written_bytes"], plan["write_bytes"]);
}

#[test]
fn quiet_leaves_stderr_empty_and_no_terminal_means_no_bars() {
    let tmp = demo_dir();
    let quiet = mergec(tmp.path(), &["run", "two.merge", "--quiet"]);
    assert_eq!(String::from_utf8_lossy(&quiet.stderr), "");
    assert!(String::from_utf8_lossy(&quiet.stdout).contains("wrote "));
    // stderr is a pipe here: the backend note and nothing else.
    let plain = mergec(tmp.path(), &["run", "two.merge", "--force", "--backend", "cpu"]);
    assert_eq!(String::from_utf8_lossy(&plain.stderr), "backend: CPU executor\n");
}
