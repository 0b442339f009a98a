//! Bounded work on any script or config (spec/language.md, "Limits"):
//!
//! - inputs past the depth limits are refused with a code, and inputs at the limits compile
//!   through every stage, on a thread with the default 2 MiB test stack (a recursion that
//!   lost its bound overflows it);
//! - files that are not regular, too large or not UTF-8 are refused before or while they
//!   are read, without blocking;
//! - the text output of thousands of errors stays small, the JSON lists them all;
//! - the stages that once grew faster than their input are timed at n and 4n: linear
//!   work gives a ratio near 4, quadratic near 16, and the tests allow up to 8.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use mergec::diag::{render, Code};
use mergec::driver::{self, ReadError, Script, Stage};
use mergec::import::{self, Options};
use mergec::plan::Limits;

/// The stack a test thread gets by default; a regression to unbounded recursion overflows it.
const TEST_STACK: usize = 2 << 20;

/// Runs `f` on a thread with [`TEST_STACK`] bytes of stack.
fn on_test_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(TEST_STACK)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

fn model(name: &str) -> String {
    conformance_dir().join("models").join(name).display().to_string()
}

fn header(m: &str) -> String {
    format!("model a = \"{}\"\nmodel b = \"{}\"\n", model(m), model(m))
}

/// Compiles `text` and renders every stage and its diagnostics; the codes of its errors
/// when it fails.
fn compile_all(text: String) -> Result<usize, Vec<Code>> {
    let script = Script::from_text("limits.merge", text, PathBuf::from("/nonexistent-out"));
    match driver::compile(&script, true, &Limits::default()) {
        Ok(c) => Ok(Stage::ALL.iter().map(|s| driver::dump(&c, *s).len()).sum()),
        Err(d) => {
            let shown = render::render_text(&d.0, &script.sources, false);
            assert!(!shown.contains("internal compiler error"), "{shown}");
            Err(d.iter().filter(|d| d.is_error()).map(|d| d.code).collect())
        }
    }
}

/// The codes `text` fails with, compiled on the test stack.
fn codes_of(text: String) -> Vec<Code> {
    on_test_stack(move || compile_all(text)).expect_err("expected errors")
}

/// A script `levels` deep in the way `case` names (a chain of `let`s for the `chain`s).
fn deep_script(case: &str, m: &str, levels: usize) -> String {
    let h = header(m);
    let chain = |first: &str, step: &dyn Fn(usize) -> String| {
        let mut t = format!("{h}let m1 = {first}\n");
        for i in 2..=levels {
            t.push_str(&format!("let m{i} = {}\n", step(i - 1)));
        }
        t + &format!("save m{levels} to \"o\"\n")
    };
    let r = |s: &str| s.repeat(levels);
    match case {
        "neg" => format!("{h}save {}a to \"o\"\n", r("- ")),
        "sum" => format!("{h}save a{} to \"o\"\n", r(" + a")),
        "layers" => format!("{h}save a{} to \"o\"\n", r(".layers[0..2]")),
        "params" => format!("{h}save linear(a{}, b) to \"o\"\n", r(" { weight: 1 }")),
        "parens" => format!("{h}save {}a{} to \"o\"\n", r("(a - "), r(")")),
        "calls" => format!("{h}save {}a{} to \"o\"\n", r("linear(b, "), r(", weight: 1)")),
        "lists" => format!("{h}save linear(a, b, weight: {}1{}) to \"o\"\n", r("["), r("]")),
        "stacks" => format!("{h}save {}a{} to \"o\"\n", r("stack("), r(")")),
        "moes" => format!("{h}save {}a{} to \"o\"\n", r("moe(base: a, experts: ["), r("])")),
        "left chain" => chain("a + b", &|p| format!("m{p} + a")),
        "right chain" => chain("a - b", &|p| format!("a - m{p}")),
        "layers chain" => chain("a.layers[0..2]", &|p| format!("m{p}.layers[0..2]")),
        "linear chain" => chain("linear(a { weight: 0.5 }, b { weight: 0.5 })", &|p| {
            format!("linear(m{p} {{ weight: 0.5 }}, b {{ weight: 0.5 }})")
        }),
        "ties chain" => chain("ties(a, b { weight: 1, density: 0.5 })", &|p| {
            format!("ties(a, m{p} {{ weight: 1, density: 0.5 }}, b {{ weight: 1, density: 0.5 }})")
        }),
        "ta16 chain" => {
            "set compute = bf16\n".to_string()
                + &chain("task_arithmetic(a, b { weight: 0.5 })", &|p| {
                    format!("task_arithmetic(a, m{p} {{ weight: 1 }}, b {{ weight: 0.5 }})")
                })
        }
        "sub16 chain" => "set compute = bf16\n".to_string() + &chain("a - b", &|p| format!("a - m{p}")),
        other => panic!("no case {other}"),
    }
}

#[test]
fn deep_expressions_are_refused_on_a_test_stack() {
    let h = header("micro-llama-ft1-f32");
    let cases = [
        format!("{h}let x = {}\n", vec!["1"; 3300].join(" + ")),
        format!("{h}save {}a to \"out/x\"\n", "- ".repeat(5000)),
        format!("{h}save a{} to \"out/x\"\n", ".layers[0..1]".repeat(5000)),
        format!(
            "{h}save linear(a{}, b) to \"out/x\"\n",
            " { weight: 1 }".repeat(5000)
        ),
        format!(
            "{h}save a * {}1{} to \"out/x\"\n",
            "(".repeat(100_000),
            ")".repeat(100_000)
        ),
        format!(
            "{h}save linear(a, b, weight: {}1{}) to \"out/x\"\n",
            "[".repeat(5000),
            "]".repeat(5000)
        ),
        deep_script("sum", "micro-llama-ft1-f32", 257),
        deep_script("neg", "micro-llama-ft1-f32", 257),
        deep_script("calls", "micro-llama-ft1-f32", 201),
    ];
    for text in cases {
        let start: String = text.lines().nth(2).unwrap_or("").chars().take(40).collect();
        assert_eq!(codes_of(text), [Code::E0103], "{start}");
    }
}

#[test]
fn long_chains_of_bindings_are_refused_on_a_test_stack() {
    let m = "micro-llama-ft1-f32";
    // 5,000 bindings, each using the one before.
    assert_eq!(codes_of(deep_script("left chain", m, 5000)), [Code::E0210]);
    assert_eq!(codes_of(deep_script("right chain", m, 257)), [Code::E0210]);
    assert_eq!(codes_of(deep_script("layers chain", m, 257)), [Code::E0210]);
    // Within the 256 steps of a model, but its tensors computed 512 operations deep.
    assert_eq!(codes_of(deep_script("ta16 chain", m, 200)), [Code::E0210]);
    assert_eq!(codes_of(deep_script("sub16 chain", m, 257)), [Code::E0210]);
}

#[test]
fn expressions_at_the_limits_compile_on_a_test_stack() {
    for m in ["micro-llama-ft1-f32", "micro-llama-ft1-bf16"] {
        let cases = [
            ("neg", 255),
            ("sum", 255),
            ("layers", 255),
            ("parens", 199),
            ("calls", 199),
            ("stacks", 199),
            ("left chain", 255),
            ("right chain", 255),
            ("layers chain", 255),
            ("linear chain", 255),
            ("ties chain", 255),
            ("sub16 chain", 255),
            ("ta16 chain", 50),
        ];
        for (case, levels) in cases {
            let text = deep_script(case, m, levels);
            let r = on_test_stack(move || compile_all(text));
            assert!(r.is_ok(), "{m} {case} {levels}: {r:?}");
        }
        // Refused for what they are, not for their depth.
        for (case, levels) in [("lists", 199), ("params", 254), ("moes", 99)] {
            let text = deep_script(case, m, levels);
            let codes = on_test_stack(move || compile_all(text)).unwrap_err();
            assert!(
                !codes.contains(&Code::E0103) && !codes.contains(&Code::E0210),
                "{m} {case}: {codes:?}"
            );
        }
    }
}

#[test]
fn bindings_that_double_the_work_are_refused() {
    let mut text = header("micro-llama-ft1-f32") + "let m1 = a + a\n";
    for i in 2..=40 {
        text.push_str(&format!("let m{i} = m{} + m{}\n", i - 1, i - 1));
    }
    text.push_str("save m40 to \"out/x\"\n");
    let start = Instant::now();
    assert_eq!(codes_of(text), [Code::E0211]);
    assert!(start.elapsed() < Duration::from_secs(60), "{:?}", start.elapsed());
    // A chain of merges takes linear time: each model is instantiated once per tensor.
    let codes = on_test_stack(|| compile_all(deep_script("linear chain", "micro-llama-ft1-f32", 60)));
    assert!(codes.is_ok(), "{codes:?}");
}

fn yaml_options(out: &Path) -> Options {
    Options::new("limits.yml", &conformance_dir(), out)
}

/// The codes a YAML text fails to translate or compile with, on the test stack.
fn yaml_codes(text: String) -> Vec<Code> {
    on_test_stack(move || {
        let tmp = std::env::temp_dir().join("mergec-limits-yaml-out");
        match import::translate("limits.yml", text, &yaml_options(&tmp)) {
            Err(f) => f
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(|d| d.code)
                .collect(),
            Ok(imp) => match imp.compile(true, &Limits::default()) {
                Ok(_) => Vec::new(),
                Err((_, d)) => d.iter().filter(|d| d.is_error()).map(|d| d.code).collect(),
            },
        }
    })
}

fn linear_doc(name: Option<&str>, first: &str) -> String {
    let name = name.map_or(String::new(), |n| format!("name: {n}\n"));
    format!(
        "{name}merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.5}}\n  - model: models/micro-llama-ft2-f32\n    parameters: {{weight: 0.5}}\n"
    )
}

/// mergekit-multi: `n` documents, each merging the one before.
fn yaml_chain(n: usize) -> String {
    let mut docs = vec![linear_doc(Some("step1"), "models/micro-llama-ft1-f32")];
    for i in 2..n {
        docs.push(linear_doc(Some(&format!("step{i}")), &format!("step{}", i - 1)));
    }
    docs.push(linear_doc(None, &format!("step{}", n - 1)));
    docs.join("---\n")
}

#[test]
fn yaml_past_its_limits_is_refused_on_a_test_stack() {
    assert_eq!(yaml_codes(yaml_chain(3000)), [Code::E0607]);
    assert_eq!(yaml_codes(yaml_chain(65)), [Code::E0607]);
    assert_eq!(yaml_codes(yaml_chain(64)), Vec::<Code>::new());
    let nested = |n: usize| {
        format!(
            "merge_method: linear\nmodels:\n  - model: models/micro-llama-ft1-f32\n    parameters: {{weight: {}1{}}}\n",
            "[".repeat(n),
            "]".repeat(n)
        )
    };
    // The YAML reader has a limit of its own, well past ours (a syntax error).
    assert_eq!(yaml_codes(nested(100_000)), [Code::E0601]);
    assert_eq!(yaml_codes(nested(100)), [Code::E0608]);
    assert_eq!(yaml_codes(nested(61)), [Code::E0608]);
    // Aliases count their depth where they are used.
    let mut aliased = String::from("a0: &a0 1\n");
    for i in 1..60 {
        aliased.push_str(&format!("a{i}: &a{i} [[*a{}]]\n", i - 1));
    }
    assert_eq!(yaml_codes(aliased), [Code::E0608]);
}

#[test]
fn alias_bombs_are_refused_quickly() {
    // 9 levels of 9 aliases each: 9^9 values, were they expanded.
    let mut text = format!("a0: &a0 [{}]\n", ["1"; 9].join(", "));
    for i in 1..9 {
        let previous = format!("*a{}", i - 1);
        text.push_str(&format!("a{i}: &a{i} [{}]\n", [previous.as_str(); 9].join(", ")));
    }
    text.push_str("merge_method: linear\nmodels:\n  - model: *a8\n");
    let start = Instant::now();
    assert_eq!(yaml_codes(text), [Code::E0601]);
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
}

fn expect_unreadable(path: &Path, why: &str) {
    match driver::read_source(path) {
        Err(ReadError::Unreadable(m)) => assert!(m.contains(why), "{m}"),
        other => panic!("{}: {other:?}", path.display()),
    }
    // A config is refused the same way (E0401, the same words).
    let yaml = path.with_extension("yml");
    if yaml == path {
        let f = import::translate_file(path, &yaml_options(Path::new("out"))).unwrap_err();
        assert_eq!(f.diagnostics.iter().next().map(|d| d.code), Some(Code::E0401));
        assert!(f.diagnostics.iter().any(|d| d.message.contains(why)));
    }
}

#[test]
fn files_that_are_not_scripts_are_refused_before_they_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    #[cfg(unix)]
    {
        expect_unreadable(Path::new("/dev/zero"), "a character device, not a regular file");
        let fifo = tmp.path().join("fifo.yml");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        expect_unreadable(&fifo, "a named pipe (FIFO), not a regular file");
        let zero = tmp.path().join("zero.yml");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        expect_unreadable(&zero, "a character device");
    }
    expect_unreadable(tmp.path(), "a folder, not a regular file");
    expect_unreadable(&tmp.path().join("missing.merge"), "cannot read");
    // 16 MiB and one byte (sparse: nothing is written).
    let big = tmp.path().join("big.yml");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(driver::MAX_SOURCE_BYTES + 1)
        .unwrap();
    expect_unreadable(&big, "at most 16 MiB");
    let limit = tmp.path().join("limit.merge");
    std::fs::File::create(&limit)
        .unwrap()
        .set_len(driver::MAX_SOURCE_BYTES)
        .unwrap();
    assert_eq!(
        driver::read_source(&limit).unwrap().len() as u64,
        driver::MAX_SOURCE_BYTES
    );
}

#[test]
fn text_that_is_not_utf8_gets_a_code_and_the_byte_offset() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["latin1.merge", "latin1.yml"] {
        let path = tmp.path().join(name);
        std::fs::write(&path, b"model a = \"x\"\n# caf\xe9\n").unwrap();
        let (sources, diagnostics) = match driver::read_source(&path) {
            Err(ReadError::NotUtf8 { sources, diagnostics }) => (sources, diagnostics),
            other => panic!("{other:?}"),
        };
        let d = diagnostics.iter().next().unwrap();
        assert_eq!(d.code, Code::E0104);
        assert!(d.message.contains("offset 19 (0xE9)"), "{}", d.message);
        let json = render::to_json(&diagnostics.0, &sources);
        assert_eq!(json[0]["span"]["start"], 19);
        assert_eq!(
            (
                json[0]["span"]["line"].as_u64(),
                json[0]["span"]["column"].as_u64()
            ),
            (Some(2), Some(6))
        );
    }
    let yaml = tmp.path().join("latin1.yml");
    let f = import::translate_file(&yaml, &yaml_options(Path::new("out"))).unwrap_err();
    assert_eq!(f.diagnostics.iter().next().map(|d| d.code), Some(Code::E0104));
}

/// Runs the mergec binary, killing it if it runs past `limit`.
fn mergec(args: &[&str], limit: Duration) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mergec"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text =
                String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            return (status.code().unwrap_or(-1), text);
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            panic!("mergec {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_cli_refuses_devices_and_pipes_at_once() {
    let (code, text) = mergec(&["check", "/dev/zero"], Duration::from_secs(60));
    assert_eq!(code, 1);
    assert!(
        text.contains("cannot read `/dev/zero`: it is a character device"),
        "{text}"
    );
    #[cfg(unix)]
    {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo.merge");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let (code, text) = mergec(&["check", fifo.to_str().unwrap()], Duration::from_secs(60));
        assert_eq!(code, 1);
        assert!(text.contains("named pipe"), "{text}");
        let latin1 = tmp.path().join("latin1.merge");
        std::fs::write(&latin1, b"# caf\xe9\n").unwrap();
        let (code, text) = mergec(&["check", latin1.to_str().unwrap()], Duration::from_secs(60));
        assert_eq!(code, 1);
        assert!(
            text.contains("[E0104]") && text.contains("offset 5 (0xE9)"),
            "{text}"
        );
        let (_, json) = mergec(
            &["check", "--format", "json", latin1.to_str().unwrap()],
            Duration::from_secs(60),
        );
        assert!(json.contains("\"E0104\""), "{json}");
    }
}

#[test]
fn thousands_of_errors_on_one_long_line_print_a_bounded_excerpt() {
    // 3,000 unknown names on one line of more than 20 KB.
    let line: String = (0..3000).map(|i| format!("save x{i} to \"o{i}\" ")).collect();
    assert!(line.len() > 20_000);
    let script = Script::from_text("errors.merge", format!("# errors\n{line}\n"), PathBuf::from("."));
    let diags = driver::compile(&script, false, &Limits::default()).unwrap_err();
    assert_eq!(diags.len(), 3000);
    let text = render::render_text(&diags.0, &script.sources, false);
    assert!(text.len() < 150_000, "{} bytes", text.len());
    assert_eq!(text.matches("[E0201]").count(), render::MAX_SHOWN);
    assert!(
        text.lines().all(|l| l.chars().count() < 400),
        "a line is too long"
    );
    assert!(text.ends_with(&format!(
        "and {} more errors (only the first {} diagnostics are shown; `--format json` lists them all)\n",
        3000 - render::MAX_SHOWN,
        render::MAX_SHOWN
    )));
    // The last one shown points at its own place on the line, with the file's column.
    let at = line.find("x99 ").unwrap() + 1;
    assert!(
        text.contains(&format!("errors.merge:2:{at} ]")),
        "{}",
        &text[text.len() - 2000..]
    );
    let json = render::to_json(&diags.0, &script.sources);
    let all = json.as_array().unwrap();
    assert_eq!(all.len(), 3000);
    let last = line.find("x2999 ").unwrap() + 1;
    assert_eq!(all[2999]["span"]["column"], last as u64);
}

/// The least of a few timings of `f` (the machine is shared: the least is the least noisy).
fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed()
        })
        .min()
        .unwrap()
}

/// Asserts that `work(4n)` takes less than 8 times `work(n)`. The timing tests run one at
/// a time; a ratio past 8 is measured once more before it fails (the machine is shared).
fn linear<T>(what: &str, n: usize, mut work: impl FnMut(usize) -> T) {
    let _alone = TIMING.lock().unwrap_or_else(|e| e.into_inner());
    work(n / 4); // warm the caches and the models' headers
    let mut ratio = f64::INFINITY;
    for _ in 0..2 {
        let small = time(2, || work(n));
        let large = time(1, || work(4 * n));
        ratio = large.as_secs_f64() / small.as_secs_f64();
        eprintln!("{what}: n = {n}: {small:?}, 4n: {large:?}, ratio {ratio:.2}");
        if ratio < 8.0 {
            return;
        }
    }
    panic!("{what}: 4n takes {ratio:.1} times as long as n = {n}");
}

/// Held by each timing test, so that they do not share the machine with each other.
static TIMING: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn thousands_of_saves_check_in_linear_time() {
    let m = model("micro-llama-ft1-f32");
    linear("saves", 2500, |n| {
        let mut text = format!("model a = \"{m}\"\n");
        for i in 0..n {
            text.push_str(&format!("save a to \"out/s{i}\"\n"));
        }
        let script = Script::from_text("saves.merge", text, PathBuf::from("/nonexistent-out"));
        driver::compile(&script, true, &Limits::default())
            .unwrap()
            .plan
            .steps
            .len()
    });
}

#[test]
fn thousands_of_yaml_models_translate_in_linear_time() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    linear("yaml models", 5000, |n| {
        let mut text = String::from("merge_method: linear\nmodels:\n");
        for i in 0..n {
            // The same model again and again (a warning each), and models that do not exist.
            let m = if i % 2 == 0 {
                "models/micro-llama-ft1-f32".to_string()
            } else {
                format!("models/missing-{i}")
            };
            text.push_str(&format!("  - model: {m}\n    parameters: {{weight: 1.0}}\n"));
        }
        let imp = import::translate("models.yml", text, &yaml_options(&out)).unwrap();
        let Err((script, d)) = imp.compile(true, &Limits::default()) else {
            panic!("the missing models compiled")
        };
        render::render_text(&d.0, &script.sources, false).len()
            + render::to_json(&d.0, &script.sources).to_string().len()
    });
}

#[test]
fn many_errors_render_in_linear_time() {
    linear("errors", 2500, |n| {
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!("let v{i} = w{i} + 1\n"));
        }
        let script = Script::from_text("errors.merge", text, PathBuf::from("."));
        let d = driver::compile(&script, false, &Limits::default()).unwrap_err();
        render::render_text(&d.0, &script.sources, false).len()
            + render::to_json(&d.0, &script.sources).to_string().len()
    });
}

#[test]
fn the_ast_dump_takes_linear_time_and_is_the_pretty_debug_form() {
    let statement = |i: usize| {
        format!(
            "let x{i} = {}(a + b * 2).layers[0..1] {{ w: [1, 2] }}\n",
            "- ".repeat(40)
        )
    };
    linear("debug ast", 250, |n| {
        let text: String = (0..n).map(statement).collect();
        let mut sources = mergec::source::SourceMap::new();
        let id = sources.add("ast.merge", None, text);
        mergec::syntax::ast::dump(&mergec::syntax::parse(&sources, id).unwrap()).len()
    });
    // The same text as the derived pretty form, for every example and fixture that parses.
    let mut files: Vec<PathBuf> = ["examples", "tests/ui", "tests/conformance"]
        .iter()
        .flat_map(|d| std::fs::read_dir(repo().join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "merge"))
        .collect();
    files.sort();
    let mut checked = 0;
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut sources = mergec::source::SourceMap::new();
        let id = sources.add("x.merge", None, text);
        if let Ok(ast) = mergec::syntax::parse(&sources, id) {
            assert_eq!(
                mergec::syntax::ast::dump(&ast),
                format!("{ast:#?}\n"),
                "{}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 50, "{checked}");
}

/// `LIMITS_CASE=neg LIMITS_MODEL=micro-llama-ft1-f32 LIMITS_LEVELS=255 LIMITS_STACK=2097152
/// cargo test --test limits probe -- --ignored --nocapture`: one case of [`deep_script`] on
/// a stack of the given size, to measure the stack each level takes (run it at two depths
/// and sizes until it overflows).
#[test]
#[ignore]
fn probe() {
    let var = |k: &str| std::env::var(k).unwrap();
    let text = deep_script(
        &var("LIMITS_CASE"),
        &var("LIMITS_MODEL"),
        var("LIMITS_LEVELS").parse().unwrap(),
    );
    let stack: usize = var("LIMITS_STACK").parse().unwrap();
    let r = std::thread::Builder::new()
        .stack_size(stack)
        .spawn(move || compile_all(text))
        .unwrap()
        .join()
        .unwrap();
    eprintln!("PROBE {:?}", r.map_err(|c| c.first().copied()));
}
