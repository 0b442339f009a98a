//! Hostile model folders and input files: each case copies a tiny conformance model into
//! a temporary folder, damages it, and checks that mergec reports it with a diagnostic
//! code instead of blocking, reading without bound, crashing or writing a quietly wrong
//! model.

#![cfg(unix)]

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mergec::io::model::load_model;
use mergec::io::reader::ReadError;
use mergec::io::TensorReader;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conformance/models")
}

/// A temporary folder with copies of two conformance models, `a` and `b`, and
/// `script.merge` merging them.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, model) in [("a", "micro-llama-ft1-f32"), ("b", "micro-llama-ft2-f32")] {
        let to = dir.path().join(name);
        std::fs::create_dir(&to).unwrap();
        for entry in std::fs::read_dir(models().join(model)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    write_script(
        dir.path(),
        "model a = \"a\"\nmodel b = \"b\"\nsave linear(a { weight: 0.5 }, b { weight: 0.5 }) to \"out/merged\"\n",
    );
    dir
}

fn write_script(dir: &Path, text: &str) {
    std::fs::write(dir.join("script.merge"), text).unwrap();
}

/// Runs `mergec ARGS` in `cwd`, killing it after 60 s (a blocked open must fail the test,
/// not hang it). Returns the exit code and stdout + stderr.
fn mergec(args: &[&str], cwd: &Path) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mergec"))
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained while the child runs: a long diagnostic must not fill the pipe and block it.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).unwrap();
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("`mergec {}` did not finish within 60 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = stdout.join().unwrap() + &stderr.join().unwrap();
    let code = status
        .code()
        .unwrap_or_else(|| panic!("killed by signal {:?}:\n{out}", status.signal()));
    (code, out)
}

/// `mergec check` fails with `code`, and its output contains every one of `needles`.
fn check_fails(dir: &Path, code: &str, needles: &[&str]) {
    let (status, out) = mergec(&["check", "script.merge"], dir);
    assert_eq!(status, 1, "{out}");
    assert!(out.contains(&format!("[{code}]")), "expected {code}:\n{out}");
    for n in needles {
        assert!(out.contains(n), "expected {n:?} in:\n{out}");
    }
}

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

fn replace_with_link(path: &Path, target: &str) {
    let _ = std::fs::remove_file(path);
    std::os::unix::fs::symlink(target, path).unwrap();
}

fn replace_with_dir(path: &Path) {
    let _ = std::fs::remove_file(path);
    std::fs::create_dir(path).unwrap();
}

/// A safetensors file of F32 tensors.
fn write_safetensors(path: &Path, tensors: &[(&str, &[f32])]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, v), b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![v.len()], b);
            (*name, view.unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A safetensors file written byte by byte, for headers the safetensors crate refuses.
fn write_raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

// 1. Only regular files are opened.

#[test]
fn fifo_config_is_refused_not_waited_on() {
    let ws = workspace();
    mkfifo(&ws.path().join("a/config.json"));
    check_fails(ws.path(), "E0406", &["a/config.json` is a FIFO, not a file"]);
}

#[test]
fn fifo_weights_are_refused_not_waited_on() {
    let ws = workspace();
    mkfifo(&ws.path().join("b/model.safetensors"));
    check_fails(
        ws.path(),
        "E0406",
        &["b/model.safetensors` is a FIFO, not a file"],
    );

    // Named directly as the model file too.
    mkfifo(&ws.path().join("w.safetensors"));
    write_script(ws.path(), "model a = \"w.safetensors\"\nsave a to \"out/x\"\n");
    check_fails(ws.path(), "E0406", &["w.safetensors` is a FIFO, not a file"]);
}

#[test]
fn config_linked_to_dev_zero_is_not_read() {
    let ws = workspace();
    replace_with_link(&ws.path().join("a/config.json"), "/dev/zero");
    check_fails(
        ws.path(),
        "E0406",
        &["a/config.json` is a character device, not a file"],
    );
}

#[test]
fn socket_as_weights_is_refused() {
    let ws = workspace();
    let path = ws.path().join("a/model.safetensors");
    std::fs::remove_file(&path).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    check_fails(
        ws.path(),
        "E0406",
        &["a/model.safetensors` is a socket, not a file"],
    );
}

#[test]
fn directory_named_like_a_file_is_named_as_such() {
    let ws = workspace();
    replace_with_dir(&ws.path().join("b/model.safetensors"));
    check_fails(
        ws.path(),
        "E0406",
        &["b/model.safetensors` is a directory, not a file"],
    );
    // Not "the folder has no model.safetensors".
    let (_, out) = mergec(&["check", "script.merge"], ws.path());
    assert!(!out.contains("has no `model.safetensors`"), "{out}");
}

#[test]
fn tokenizer_json_directory_is_a_diagnostic_not_dropped() {
    let ws = workspace();
    replace_with_dir(&ws.path().join("a/tokenizer.json"));
    check_fails(
        ws.path(),
        "E0406",
        &["a/tokenizer.json` is a directory, not a file"],
    );
}

#[test]
fn symlink_loop_is_named() {
    let ws = workspace();
    replace_with_link(&ws.path().join("b/model.safetensors"), "model.safetensors");
    check_fails(
        ws.path(),
        "E0406",
        &["b/model.safetensors` is a symbolic link that loops"],
    );
    replace_with_link(&ws.path().join("b/model.safetensors"), "../b/other");
    replace_with_link(&ws.path().join("b/other"), "model.safetensors");
    check_fails(
        ws.path(),
        "E0406",
        &["b/model.safetensors` is a symbolic link that loops"],
    );
}

#[test]
fn dangling_link_is_named() {
    let ws = workspace();
    replace_with_link(&ws.path().join("b/model.safetensors"), "../blobs/abc123");
    check_fails(
        ws.path(),
        "E0406",
        &["b/model.safetensors` is a dangling symbolic link: its target `../blobs/abc123` does not exist"],
    );
    // A dangling tokenizer file is not silently skipped either.
    std::fs::copy(
        models().join("micro-llama-ft2-f32/model.safetensors"),
        ws.path().join("b/model.safetensors.real"),
    )
    .unwrap();
    replace_with_link(&ws.path().join("b/model.safetensors"), "model.safetensors.real");
    replace_with_link(&ws.path().join("a/tokenizer_config.json"), "gone.json");
    check_fails(
        ws.path(),
        "E0406",
        &["a/tokenizer_config.json` is a dangling symbolic link"],
    );
}

#[test]
fn links_to_regular_files_still_work() {
    let ws = workspace();
    std::fs::rename(ws.path().join("a/config.json"), ws.path().join("config.blob")).unwrap();
    replace_with_link(&ws.path().join("a/config.json"), "../config.blob");
    let (code, out) = mergec(&["check", "script.merge"], ws.path());
    assert_eq!(code, 0, "{out}");
}

#[test]
fn oversized_small_files_are_refused_with_their_cap() {
    let ws = workspace();
    // Sparse: 65 MiB on paper, nothing on disk.
    let config = std::fs::File::create(ws.path().join("a/config.json")).unwrap();
    config.set_len(65 << 20).unwrap();
    check_fails(
        ws.path(),
        "E0402",
        &["a/config.json` is larger than the 64 MiB limit for this file"],
    );

    let ws = workspace();
    let tokenizer = std::fs::File::create(ws.path().join("b/tokenizer.json")).unwrap();
    tokenizer.set_len(257 << 20).unwrap();
    check_fails(
        ws.path(),
        "E0402",
        &["b/tokenizer.json` is larger than the 256 MiB limit for this file"],
    );

    let ws = workspace();
    let dir = ws.path().join("s");
    std::fs::create_dir(&dir).unwrap();
    let index = std::fs::File::create(dir.join("model.safetensors.index.json")).unwrap();
    index.set_len(65 << 20).unwrap();
    write_script(ws.path(), "model a = \"s\"\nsave a to \"out/x\"\n");
    check_fails(
        ws.path(),
        "E0402",
        &["model.safetensors.index.json` is larger than the 64 MiB limit for this file"],
    );
}

// 3. Quietly wrong models.

#[test]
fn empty_weight_map_is_not_an_empty_model() {
    let ws = workspace();
    let dir = ws.path().join("s");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 0}, "weight_map": {}}"#,
    )
    .unwrap();
    write_script(ws.path(), "model a = \"s\"\nsave a to \"out/x\"\n");
    check_fails(
        ws.path(),
        "E0407",
        &["has no tensors: the `weight_map` of `model.safetensors.index.json` is empty"],
    );
    let (code, out) = mergec(&["run", "script.merge"], ws.path());
    assert_eq!(code, 1, "{out}");
    assert!(!ws.path().join("out/x").exists());

    // A safetensors file with no tensors in it.
    std::fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    write_raw_safetensors(&dir.join("model.safetensors"), "{}      ", &[]);
    check_fails(ws.path(), "E0407", &["has no tensors"]);
}

#[test]
fn empty_tensor_name_fails_check_not_the_run() {
    let ws = workspace();
    let header = r#"{"":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
    write_raw_safetensors(&ws.path().join("e.safetensors"), header, &[0u8; 16]);
    write_script(ws.path(), "model a = \"e.safetensors\"\nsave a to \"out/x\"\n");
    check_fails(
        ws.path(),
        "E0408",
        &["e.safetensors` has a tensor with an empty name"],
    );
    let (code, out) = mergec(&["run", "script.merge"], ws.path());
    assert_eq!(code, 1, "{out}");
    assert!(!out.contains("a bug in mergec"), "{out}");
    assert!(out.contains("[E0408]"), "{out}");

    // Listed in an index too.
    let dir = ws.path().join("s");
    std::fs::create_dir(&dir).unwrap();
    write_safetensors(&dir.join("s1.safetensors"), &[("x", &[1.0])]);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"": "s1.safetensors", "x": "s1.safetensors"}}"#,
    )
    .unwrap();
    write_script(ws.path(), "model a = \"s\"\nsave a to \"out/x\"\n");
    check_fails(ws.path(), "E0408", &["has a tensor with an empty name"]);
}

#[test]
fn tensor_listed_twice_in_the_index_is_refused() {
    // JSON parsers keep one of two equal keys: the index must not silently drop a shard.
    let ws = workspace();
    let dir = ws.path().join("s");
    std::fs::create_dir(&dir).unwrap();
    write_safetensors(&dir.join("s1.safetensors"), &[("a", &[1.0, 2.0])]);
    write_safetensors(&dir.join("s2.safetensors"), &[("a", &[3.0, 4.0]), ("b", &[5.0])]);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "a": "s2.safetensors"}}"#,
    )
    .unwrap();
    write_script(ws.path(), "model a = \"s\"\nsave a to \"out/x\"\n");
    check_fails(
        ws.path(),
        "E0409",
        &[
            "tensor `a` appears twice",
            "lists it twice (under `s1.safetensors` and `s2.safetensors`)",
        ],
    );

    // Listed once, but held by two of the shards.
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#,
    )
    .unwrap();
    check_fails(
        ws.path(),
        "E0409",
        &["it is in more than one shard: `s1.safetensors`, `s2.safetensors`"],
    );

    // No index: two loose files with the same tensor.
    std::fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    check_fails(
        ws.path(),
        "E0409",
        &["it is in both `s1.safetensors` and `s2.safetensors`"],
    );
}

// 2. A file that changes under a running merge.

/// A model folder with one 1 MiB tensor `big` (so it spans many pages).
fn big_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..262_144).map(|i| i as f32).collect();
    write_safetensors(&dir.path().join("model.safetensors"), &[("big", &values)]);
    dir
}

fn shrink(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn reader_notices_a_file_that_shrank_since_it_was_mapped() {
    let dir = big_model();
    let model = load_model("model.safetensors", dir.path()).unwrap();
    let reader = TensorReader::new();
    let bytes = reader.read(&model, "big").unwrap();
    assert_eq!(bytes.len(), 1 << 20);
    drop(bytes);
    let path = dir.path().join("model.safetensors");
    shrink(&path, 4096);
    let e = reader.read(&model, "big").unwrap_err();
    assert!(matches!(e, ReadError::ChangedWhileReading { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.starts_with(&format!(
            "`{}` changed while mergec was reading it",
            path.display()
        )),
        "{text}"
    );
    assert!(text.contains("and is now 4096"), "{text}");
}

const CHILD_ENV: &str = "MERGEC_HOSTILE_SIGBUS_DIR";

/// Not a test by itself: run by [`truncation_under_a_map_is_an_error_not_a_sigbus`] in a
/// child process, where it maps a model file, truncates it and reads the lost pages.
#[test]
fn sigbus_child_process() {
    let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
        return;
    };
    let model = load_model("model.safetensors", &dir).unwrap();
    let reader = TensorReader::new();
    let bytes = reader.read(&model, "big").unwrap();
    let _cleanup = mergec::io::sigbus::remove_on_fault(&dir.join("out.tmp"));
    shrink(&dir.join("model.safetensors"), 4096);
    // Past the new end: the kernel raises SIGBUS on the first lost page.
    let sum: u64 = bytes.iter().map(|&b| u64::from(b)).sum();
    println!("read {sum} without a fault");
    std::process::exit(3);
}

/// Not a test by itself: as [`sigbus_child_process`] with a map mergec did not make, whose
/// SIGBUS must stay a SIGBUS.
#[test]
fn foreign_sigbus_child_process() {
    let Some(dir) = std::env::var_os(format!("{CHILD_ENV}_FOREIGN")).map(PathBuf::from) else {
        return;
    };
    // Installs the handler.
    let model = load_model(".", &dir).unwrap();
    let reader = TensorReader::new();
    let _ours = reader.read(&model, "big").unwrap();
    let other = dir.join("other.bin");
    std::fs::write(&other, vec![1u8; 1 << 20]).unwrap();
    let file = std::fs::File::open(&other).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: the test truncates the file on purpose to fault.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    shrink(&other, 4096);
    let sum: u64 = map.iter().map(|&b| u64::from(b)).sum();
    println!("read {sum} without a fault");
    std::process::exit(3);
}

fn run_child(test: &str, env: &str, dir: &Path) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn truncation_under_a_map_is_an_error_not_a_sigbus() {
    let dir = big_model();
    let tmp = dir.path().join("out.tmp");
    std::fs::create_dir_all(tmp.join("sub")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"partial").unwrap();
    std::fs::write(tmp.join("sub/file"), b"x").unwrap();
    let out = run_child("sigbus_child_process", CHILD_ENV, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "status {:?} (signal {:?})\nstdout: {stdout}\nstderr: {stderr}",
        out.status,
        out.status.signal()
    );
    let path = dir.path().join("model.safetensors");
    assert!(
        stderr.contains(&format!(
            "error: `{}` changed while mergec was reading it",
            path.display()
        )),
        "{stderr}"
    );
    assert!(!tmp.exists(), "the registered temporary folder was left behind");
}

#[cfg(target_os = "linux")]
#[test]
fn a_sigbus_elsewhere_is_still_a_sigbus() {
    let dir = big_model();
    let out = run_child(
        "foreign_sigbus_child_process",
        &format!("{CHILD_ENV}_FOREIGN"),
        dir.path(),
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGBUS),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// 4. MoE routing prompts.

fn moe_script(prompt: &str) -> String {
    let m = models();
    format!(
        "model base = \"{}\"\nmodel ft1 = \"{}\"\nmodel ft2 = \"{}\"\n\
         save moe(base, ft1 {{ positive: [\"the cat sat on the mat\", \"a dog ran\"] }}, \
         ft2 {{ positive: [\"{prompt}\"], negative: [\"the cat\"] }}, gate: \"hidden\") to \"out/moe\"\n",
        m.join("micro-llama-base-f32").display(),
        m.join("micro-llama-ft1-f32").display(),
        m.join("micro-llama-ft2-f32").display(),
    )
}

#[test]
fn check_prints_the_forward_pass_cost() {
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), &moe_script("one two three four"));
    let (code, out) = mergec(&["check", "script.merge"], dir.path());
    assert_eq!(code, 0, "{out}");
    // 4 prompts of 22, 9, 18 and 7 bytes, each bounded by 3 BOS bytes + its bytes + 1.
    assert!(
        out.contains(
            "gate \"hidden\": a forward pass over 4 prompts, at most 72 tokens × 4 layers = 288 token-layers"
        ),
        "{out}"
    );
}

#[test]
fn long_routing_prompt_is_refused_at_check_time() {
    let dir = tempfile::tempdir().unwrap();
    let essay = "word ".repeat(4000);
    write_script(dir.path(), &moe_script(essay.trim()));
    let start = Instant::now();
    let (code, out) = mergec(&["check", "script.merge"], dir.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[E0410]"), "{out}");
    assert!(
        out.contains("this routing prompt has 20000 tokens; at most 2048 are allowed"),
        "{out}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "check took {:?}",
        start.elapsed()
    );

    // Over the limit in bytes (2 per `é`) but not in tokens: counted exactly, accepted.
    let dir = tempfile::tempdir().unwrap();
    write_script(dir.path(), &moe_script(&"é".repeat(1500)));
    let (code, out) = mergec(&["check", "script.merge"], dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("at most 2098 tokens"), "{out}");
}
