//! The examples run as shipped, the way a new user runs them: from a checkout's root,
//! `mergec demo` once, then `mergec check` and `mergec run` on every `examples/*.merge`,
//! through the built binary.

use std::path::Path;
use std::process::{Command, Output};

fn mergec(cwd: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_mergec"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mergec {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.to_lowercase().contains("error"),
        "mergec {} succeeded but printed an error:\n{stderr}",
        args.join(" ")
    );
    out
}

#[test]
fn every_example_checks_and_runs_after_mergec_demo() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    std::fs::create_dir(root.join("examples")).unwrap();
    let mut examples: Vec<String> = std::fs::read_dir(repo.join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".merge"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 8, "{examples:?}");
    for name in &examples {
        std::fs::copy(repo.join("examples").join(name), root.join("examples").join(name)).unwrap();
    }

    let demo = mergec(root, &["demo"]);
    assert!(String::from_utf8_lossy(&demo.stdout).contains("wrote demo/out/linear"));

    for name in &examples {
        let script = format!("examples/{name}");
        let check = String::from_utf8_lossy(&mergec(root, &["check", &script]).stdout).to_string();
        assert!(check.starts_with("ok: "), "{script}: {check}");
        let run = mergec(root, &["run", &script]);
        let stdout = String::from_utf8_lossy(&run.stdout);
        let dirs: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("wrote "))
            .map(|l| l.split(" (").next().unwrap())
            .collect();
        assert!(!dirs.is_empty(), "{script}: {stdout}");
        for dir in dirs {
            assert!(
                dir.starts_with("examples/out/"),
                "{script} wrote {dir}, outside examples/out"
            );
            assert!(root.join(dir).join("config.json").is_file(), "{script}: {dir}");
        }
    }
}
