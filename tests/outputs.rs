//! Output folders: what `--force` may replace (never the current folder, a folder above
//! it, the script's folder, the home folder, `/`, an input model or a folder mergec did not
//! write), `import -o` never overwriting an input's file, the old output kept until the new
//! one is in place, no temporary folder left by Ctrl-C / TERM / HUP, a killed run's leftover
//! removed by the next run, and long output names.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::conformance_dir;

fn mergec(cwd: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mergec"));
    c.args(args).current_dir(cwd).env("NO_COLOR", "1");
    c
}

fn run(cwd: &Path, args: &[&str]) -> (i32, String) {
    run_with(mergec(cwd, args))
}

fn run_with(mut c: Command) -> (i32, String) {
    let out: Output = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A workspace: `models/` with two tiny conformance models, copied in.
fn workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    for name in ["micro-llama-ft1-f32", "micro-llama-ft2-f32"] {
        let from = conformance_dir().join("models").join(name);
        let to = ws.path().join("models").join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(&from).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
    ws
}

/// A script that reads `models/` from `dir` (relative to the script) and saves to `out`.
fn script(models: &str, out: &str) -> String {
    format!(
        "model a = \"{models}/micro-llama-ft1-f32\"\nmodel b = \"{models}/micro-llama-ft2-f32\"\nsave linear(a {{ weight: 0.5 }}, b {{ weight: 0.5 }}) to \"{out}\"\n"
    )
}

/// Every path under `dir` with its bytes (folders as empty entries), to prove nothing
/// changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.push((p.clone(), Vec::new()));
                todo.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The hidden scratch folders mergec writes beside an output.
fn temporary_folders(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".mergec-tmp-") || n.contains(".mergec-old-") || n.starts_with(".mergec-"))
        .collect()
}

#[test]
fn force_never_replaces_the_current_folder() {
    let ws = workspace();
    std::fs::write(ws.path().join("script.merge"), script("models", ".")).unwrap();
    let before = snapshot(ws.path());
    for args in [
        &["run", "script.merge", "--force"][..],
        &["check", "script.merge", "--force"],
    ] {
        let (code, stderr) = run(ws.path(), args);
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("[E0413]"), "{stderr}");
        assert!(stderr.contains("is the current folder"), "{stderr}");
    }
    assert_eq!(snapshot(ws.path()), before, "the workspace changed");
}

#[test]
fn force_never_replaces_a_parent_of_the_current_folder() {
    let ws = workspace();
    // mergec run cfg.yml .. --force, from a folder holding the config.
    let work = ws.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let config = "models:\n  - model: ../models/micro-llama-ft1-f32\n    parameters:\n      weight: 0.5\n  - model: ../models/micro-llama-ft2-f32\n    parameters:\n      weight: 0.5\nmerge_method: linear\ndtype: float32\n";
    std::fs::write(work.join("cfg.yml"), config).unwrap();
    let before = snapshot(ws.path());
    let (code, stderr) = run(&work, &["run", "cfg.yml", "..", "--force"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("[E0413]") && stderr.contains("contains the current folder"),
        "{stderr}"
    );
    // The same from a script, and through a path that only resolves to the parent.
    std::fs::write(work.join("s.merge"), script("../models", "../work/..")).unwrap();
    let (code, stderr) = run(&work, &["run", "s.merge", "--force"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("[E0413]"), "{stderr}");
    std::fs::remove_file(work.join("s.merge")).unwrap();
    assert_eq!(snapshot(ws.path()), before, "the workspace changed");
    // A new folder inside works.
    let (code, stderr) = run(&work, &["run", "cfg.yml", "merged", "--force"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(work.join("merged/model.safetensors").is_file());
}

#[test]
fn force_never_replaces_the_folder_holding_the_script() {
    let ws = workspace();
    let sub = ws.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("s.merge"), script("../models", ".")).unwrap();
    std::fs::write(sub.join("notes.txt"), "beside the script").unwrap();
    let before = snapshot(ws.path());
    let (code, stderr) = run(ws.path(), &["run", "sub/s.merge", "--force"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("[E0414]") && stderr.contains("is the script's folder"),
        "{stderr}"
    );

    // A mergekit config: its folder, and a folder above it.
    let config = "models:\n  - model: models/micro-llama-ft1-f32\n  - model: models/micro-llama-ft2-f32\nmerge_method: linear\nparameters:\n  weight: 0.5\ndtype: float32\n";
    let deep = ws.path().join("configs/deep");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("cfg.yml"), config).unwrap();
    let before_yaml = snapshot(ws.path());
    for out in ["configs/deep", "configs"] {
        let (code, stderr) = run(ws.path(), &["run", "configs/deep/cfg.yml", out, "--force"]);
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains("[E0414]") && stderr.contains("the mergekit config `configs/deep/cfg.yml`"),
            "{stderr}"
        );
    }
    assert_eq!(snapshot(ws.path()), before_yaml, "the workspace changed");
    std::fs::remove_dir_all(ws.path().join("configs")).unwrap();
    assert_eq!(snapshot(ws.path()), before);
}

#[test]
fn force_never_replaces_a_folder_mergec_did_not_write() {
    let ws = workspace();
    let out = ws.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("thesis.tex"), "years of work").unwrap();
    // Not even one that looks like a model: a model card naming mergec is no proof.
    std::fs::write(out.join("README.md"), "---\ntags:\n- merge\n- mergec\n---\n").unwrap();
    std::fs::write(ws.path().join("s.merge"), script("models", "out")).unwrap();
    let before = snapshot(ws.path());
    for force in [true, false] {
        let args: &[&str] = if force {
            &["run", "s.merge", "--force"]
        } else {
            &["run", "s.merge"]
        };
        let (code, stderr) = run(ws.path(), args);
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains("[E0416]") && stderr.contains("was not written by mergec"),
            "{stderr}"
        );
    }
    assert_eq!(snapshot(ws.path()), before);

    // An output mergec wrote is replaced with --force, its marker is the proof.
    std::fs::remove_dir_all(&out).unwrap();
    let (code, stderr) = run(ws.path(), &["run", "s.merge"]);
    assert_eq!(code, 0, "{stderr}");
    let marker = std::fs::read_to_string(out.join(".mergec")).unwrap();
    assert!(marker.starts_with("mergec "), "{marker}");
    std::fs::write(out.join("stale.txt"), "old").unwrap();
    let (code, stderr) = run(ws.path(), &["run", "s.merge", "--force"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!out.join("stale.txt").exists());
    assert!(out.join("model.safetensors").is_file());
    assert!(temporary_folders(ws.path()).is_empty());
}

#[test]
fn force_never_replaces_the_home_folder() {
    let ws = workspace();
    let home = ws.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join(".bashrc"), "export PS1").unwrap();
    let work = tempfile::tempdir().unwrap();
    for (out, what) in [
        (home.clone(), "is the home folder"),
        (ws.path().to_path_buf(), "contains the home folder"),
    ] {
        let text = script(
            &ws.path().join("models").display().to_string(),
            &out.display().to_string(),
        );
        std::fs::write(work.path().join("s.merge"), text).unwrap();
        let before = snapshot(ws.path());
        let mut c = mergec(work.path(), &["run", "s.merge", "--force"]);
        c.env("HOME", &home);
        let (code, stderr) = run_with(c);
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("[E0415]") && stderr.contains(what), "{stderr}");
        assert_eq!(snapshot(ws.path()), before);
    }
    // Inside the home folder is fine.
    let text = script(
        &ws.path().join("models").display().to_string(),
        &home.join("merged").display().to_string(),
    );
    std::fs::write(work.path().join("s.merge"), text).unwrap();
    let mut c = mergec(work.path(), &["run", "s.merge"]);
    c.env("HOME", &home);
    let (code, stderr) = run_with(c);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn root_is_never_an_output() {
    let ws = workspace();
    std::fs::write(ws.path().join("s.merge"), script("models", "/")).unwrap();
    let (code, stderr) = run(ws.path(), &["check", "s.merge", "--force"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("[E0415]") && stderr.contains("is the root folder"),
        "{stderr}"
    );
}

const CONFIG: &str = "models:\n  - model: models/micro-llama-ft1-f32\n  - model: models/micro-llama-ft2-f32\nmerge_method: linear\nparameters:\n  weight: 0.5\ndtype: float32\n";

#[test]
fn import_never_overwrites_an_input_model_file() {
    let ws = workspace();
    std::fs::write(ws.path().join("c.yml"), CONFIG).unwrap();
    let weights = "models/micro-llama-ft1-f32/model.safetensors";
    let before = snapshot(ws.path());
    for target in [weights, "models/micro-llama-ft2-f32/new.merge", "c.yml"] {
        let (code, stderr) = run(ws.path(), &["import", "c.yml", "-o", target, "--force"]);
        assert_eq!(code, 1, "{target}: {stderr}");
        assert!(stderr.contains("[E0405]"), "{target}: {stderr}");
    }
    assert_eq!(snapshot(ws.path()), before, "an input changed");
    let (_, stderr) = run(ws.path(), &["import", "c.yml", "-o", weights, "--force"]);
    assert!(
        stderr.contains("is inside the input model") && stderr.contains("--force never overwrites an input"),
        "{stderr}"
    );
}

#[test]
fn import_replaces_only_with_force() {
    let ws = workspace();
    std::fs::write(ws.path().join("c.yml"), CONFIG).unwrap();
    // A file mergec did not write: only with --force.
    std::fs::write(ws.path().join("notes.merge"), "my notes").unwrap();
    let (code, stderr) = run(ws.path(), &["import", "c.yml", "-o", "notes.merge"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("[E0416]"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(ws.path().join("notes.merge")).unwrap(),
        "my notes"
    );
    let (code, stderr) = run(ws.path(), &["import", "c.yml", "-o", "notes.merge", "--force"]);
    assert_eq!(code, 0, "{stderr}");
    // A script mergec wrote: recognised by its header, still only with --force.
    let (code, stderr) = run(ws.path(), &["import", "c.yml", "-o", "notes.merge"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("[E0405]") && stderr.contains("it is a script `mergec import` wrote"),
        "{stderr}"
    );
    let (code, stderr) = run(ws.path(), &["import", "c.yml", "-o", "notes.merge", "--force"]);
    assert_eq!(code, 0, "{stderr}");
    let text = std::fs::read_to_string(ws.path().join("notes.merge")).unwrap();
    assert!(
        text.starts_with("# Translated from c.yml by `mergec import`."),
        "{text}"
    );
}

/// `check config.yml` without an output folder does not report `out/NAME` when it is
/// someone else's folder: the user never named it.
#[test]
fn checking_a_config_without_an_output_folder_skips_a_foreign_out_name() {
    let ws = workspace();
    std::fs::write(ws.path().join("c.yml"), CONFIG).unwrap();
    std::fs::create_dir_all(ws.path().join("out/c")).unwrap();
    std::fs::write(ws.path().join("out/c/model.safetensors"), "from mergekit").unwrap();
    let out = mergec(ws.path(), &["check", "c.yml"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("out/c-2: "), "{stdout}");
}

/// A run that fails after its checks leaves the old output as it was.
#[test]
fn a_failed_replacement_keeps_the_old_output() {
    let ws = workspace();
    let text = script("models", "out/m");
    std::fs::write(ws.path().join("s.merge"), &text).unwrap();
    let (code, stderr) = run(ws.path(), &["run", "s.merge"]);
    assert_eq!(code, 0, "{stderr}");
    let out = ws.path().join("out/m");
    let old = snapshot(&out);

    let s = mergec::driver::Script::from_text("s.merge", text, ws.path().to_path_buf());
    let compiled = mergec::driver::compile(&s, true, &mergec::plan::Limits::default()).unwrap();
    // The input changes between the check and the run: the run fails.
    let weights = ws.path().join("models/micro-llama-ft2-f32/model.safetensors");
    let file = std::fs::OpenOptions::new().write(true).open(&weights).unwrap();
    file.set_len(9000).unwrap();
    let executor = mergec::exec::CpuExecutor::new(1, 1024).unwrap();
    let reader = mergec::io::TensorReader::new();
    let err = mergec::exec::run(&compiled.plan, &executor, &reader, |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("changed since its header was read"),
        "{err}"
    );
    assert_eq!(snapshot(&out), old, "the old output changed");
    assert!(temporary_folders(&ws.path().join("out")).is_empty());
}

/// Two models of one f32 tensor each, `elems` elements, as sparse files (no disk used),
/// and a script merging them into `out/m`: slow enough in a debug build to catch mid-run.
#[cfg(unix)]
fn slow_workspace(elems: u64) -> tempfile::TempDir {
    use std::io::Write;
    let ws = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        let dir = ws.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let mut header = format!(
            "{{\"w\":{{\"dtype\":\"F32\",\"shape\":[{elems}],\"data_offsets\":[0,{}]}}}}",
            elems * 4
        );
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut f = std::fs::File::create(dir.join("model.safetensors")).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.set_len(8 + header.len() as u64 + elems * 4).unwrap();
    }
    std::fs::write(
        ws.path().join("s.merge"),
        "model a = \"a\"\nmodel b = \"b\"\nsave linear(a { weight: 0.5 }, b { weight: 0.5 }) to \"out/m\"\n",
    )
    .unwrap();
    ws
}

/// Starts `mergec run s.merge` in `ws` and waits until its temporary output folder exists.
#[cfg(unix)]
fn start_slow_run(ws: &Path, extra: &[&str]) -> std::process::Child {
    let mut args = vec!["run", "s.merge", "--backend", "cpu", "--threads", "1"];
    args.extend_from_slice(extra);
    let mut child = mergec(ws, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let tmp = ws.join(format!("out/.m.mergec-tmp-{}", child.id()));
    while !tmp.join(".mergec").is_file() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended before it could be interrupted: {status}");
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no temporary folder");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[cfg(unix)]
fn signal(child: &std::process::Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

#[cfg(unix)]
#[test]
fn interrupting_a_run_leaves_no_temporary_folder() {
    let ws = slow_workspace(24 << 20);
    for (sig, code, name) in [
        (libc::SIGTERM, 143, "SIGTERM"),
        (libc::SIGINT, 130, "SIGINT"),
        (libc::SIGHUP, 129, "SIGHUP"),
    ] {
        let child = start_slow_run(ws.path(), &[]);
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("interrupted by {name}: removed the temporary folder")),
            "{name}: {stderr}"
        );
        assert_eq!(
            std::fs::read_dir(ws.path().join("out")).unwrap().count(),
            0,
            "{name}: something was left in out/"
        );
    }
}

#[cfg(unix)]
#[test]
fn interrupting_a_replacement_keeps_the_old_output() {
    let ws = slow_workspace(24 << 20);
    let out = ws.path().join("out/m");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join(".mergec"), "mergec 0.1.0\n").unwrap();
    std::fs::write(out.join("model.safetensors"), "the old weights").unwrap();
    let old = snapshot(&out);
    let child = start_slow_run(ws.path(), &["--force"]);
    signal(&child, libc::SIGTERM);
    let status = child.wait_with_output().unwrap().status;
    assert_eq!(status.code(), Some(143));
    assert_eq!(snapshot(&out), old);
    assert!(temporary_folders(&ws.path().join("out")).is_empty());
}

#[cfg(unix)]
#[test]
fn the_next_run_removes_what_a_killed_run_left() {
    let ws = slow_workspace(24 << 20);
    let child = start_slow_run(ws.path(), &[]);
    let pid = child.id();
    signal(&child, libc::SIGKILL);
    let status = child.wait_with_output().unwrap().status;
    assert_eq!(status.code(), None, "SIGKILL cannot be handled");
    let left = format!(".m.mergec-tmp-{pid}");
    assert_eq!(
        temporary_folders(&ws.path().join("out")),
        std::slice::from_ref(&left)
    );

    // A live run's folder, and a folder that only looks like a leftover, are kept.
    let live = ws
        .path()
        .join(format!("out/.m.mergec-tmp-{}", std::process::id()));
    std::fs::create_dir(&live).unwrap();
    std::fs::write(live.join(".mergec"), "mergec 0.1.0\n").unwrap();
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id()
    };
    let unmarked = ws.path().join(format!("out/.m.mergec-tmp-{dead}"));
    std::fs::create_dir(&unmarked).unwrap();
    std::fs::write(unmarked.join("data"), "not mergec's").unwrap();

    // The next run to the same folder (from small models, to be quick).
    let models = workspace();
    std::fs::rename(models.path().join("models"), ws.path().join("models")).unwrap();
    std::fs::write(ws.path().join("s.merge"), script("models", "out/m")).unwrap();
    let (code, stderr) = run(ws.path(), &["run", "s.merge"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("removed a leftover temporary folder")
            && stderr.contains(&left)
            && stderr.contains("of an interrupted run"),
        "{stderr}"
    );
    assert!(ws.path().join("out/m/model.safetensors").is_file());
    let mut kept = temporary_folders(&ws.path().join("out"));
    kept.sort();
    let mut expected = vec![
        live.file_name().unwrap().to_string_lossy().into_owned(),
        unmarked.file_name().unwrap().to_string_lossy().into_owned(),
    ];
    expected.sort();
    assert_eq!(kept, expected);
}

#[test]
fn long_output_names() {
    let ws = workspace();
    let name = "n".repeat(250);
    std::fs::write(
        ws.path().join("s.merge"),
        script("models", &format!("out/{name}")),
    )
    .unwrap();
    let (code, stderr) = run(ws.path(), &["run", "s.merge"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(ws
        .path()
        .join("out")
        .join(&name)
        .join("model.safetensors")
        .is_file());
    // Replacing it goes through a temporary folder too.
    let (code, stderr) = run(ws.path(), &["run", "s.merge", "--force"]);
    assert_eq!(code, 0, "{stderr}");
    let names: Vec<String> = std::fs::read_dir(ws.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [name]);

    // One byte over the file-system limit is a check-time error.
    let too_long = "n".repeat(256);
    std::fs::write(
        ws.path().join("s.merge"),
        script("models", &format!("out/{too_long}")),
    )
    .unwrap();
    let (code, stderr) = run(ws.path(), &["check", "s.merge"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("[E0417]") && stderr.contains("256 bytes"),
        "{stderr}"
    );
}

/// Found by the writer fuzz target: `mine/o/..` does not exist for the file system (`o`
/// is missing), so the folder looked new to the checks, but the writer read the path
/// lexically as `mine` and replaced the user's folder. A `..` below a missing folder is
/// refused now; through a link, `..` is followed as the file system follows it.
#[test]
fn dot_dot_below_a_missing_folder_never_reaches_the_folder_above() {
    let ws = workspace();
    let mine = ws.path().join("mine");
    std::fs::create_dir_all(mine.join("sub")).unwrap();
    std::fs::write(mine.join("data.txt"), "a folder of the user's").unwrap();
    for (out, force) in [
        ("mine/o/..", false),
        ("mine/o/../", true),
        ("mine/o/../x", false),
        ("new/a/../b", false),
    ] {
        std::fs::write(ws.path().join("s.merge"), script("models", out)).unwrap();
        let before = snapshot(ws.path());
        let args: &[&str] = if force {
            &["run", "s.merge", "--force"]
        } else {
            &["run", "s.merge"]
        };
        let (code, stderr) = run(ws.path(), args);
        assert_eq!(code, 1, "{out}: {stderr}");
        assert!(
            stderr.contains("[E0405]") && stderr.contains("does not name a folder"),
            "{out}: {stderr}"
        );
        assert_eq!(snapshot(ws.path()), before, "{out}");
    }
    // Where every folder exists, `..` is the file system's: `mine/sub/../out` is mine/out.
    std::fs::write(ws.path().join("s.merge"), script("models", "mine/sub/../out")).unwrap();
    let (code, stderr) = run(ws.path(), &["run", "s.merge"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(mine.join("out/model.safetensors").is_file());
    assert_eq!(
        std::fs::read_to_string(mine.join("data.txt")).unwrap(),
        "a folder of the user's"
    );
    // Through a link, `..` is the parent of the link's target, not of the link.
    let elsewhere = ws.path().join("deep/inner");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, mine.join("link")).unwrap();
    std::fs::write(
        ws.path().join("s.merge"),
        script("models", "mine/link/../viaLink"),
    )
    .unwrap();
    let (code, stderr) = run(ws.path(), &["run", "s.merge"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(ws.path().join("deep/viaLink/model.safetensors").is_file());
    assert!(!mine.join("viaLink").exists());
}
