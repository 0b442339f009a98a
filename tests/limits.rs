//! Bounded work on any input: scripts and configs at and past the documented limits are
//! compiled (or refused with a code) on a thread with the default 2 MiB test stack, and
//! the stages that could grow faster than their input are timed at n and 4n.

mod common;

use std::path::PathBuf;

use common::*;
use mergec::diag::Code;
use mergec::driver::{self, Script, Stage};
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

/// Compiles `text` and prints every stage, or returns the codes of its errors.
fn compile_all(text: String) -> Result<usize, Vec<Code>> {
    let script = Script::from_text("limits.merge", text, PathBuf::from("/nonexistent-out"));
    match driver::compile(&script, true, &Limits::default()) {
        Ok(c) => Ok(Stage::ALL.iter().map(|s| driver::dump(&c, *s).len()).sum()),
        Err(d) => Err(d.iter().filter(|d| d.is_error()).map(|d| d.code).collect()),
    }
}

fn header(m: &str) -> String {
    format!("model a = \"{}\"\nmodel b = \"{}\"\n", model(m), model(m))
}

/// A script `levels` deep in the way `case` names.
fn deep_script(case: &str, m: &str, levels: usize) -> String {
    let h = header(m);
    let chain = |first: &str, step: &dyn Fn(usize) -> String| {
        let mut t = format!("{h}let m1 = {first}\n");
        for i in 2..=levels {
            t.push_str(&format!("let m{i} = {}\n", step(i - 1)));
        }
        t + &format!("save m{levels} to \"o\"\n")
    };
    match case {
        "neg" => format!("{h}save {}a to \"o\"\n", "- ".repeat(levels)),
        "sum" => format!("{h}save a{} to \"o\"\n", " + a".repeat(levels)),
        "layers" => format!("{h}save a{} to \"o\"\n", ".layers[0..2]".repeat(levels)),
        "params" => format!(
            "{h}save linear(a{}, b) to \"o\"\n",
            " { weight: 1 }".repeat(levels)
        ),
        "parens" => format!(
            "{h}save {}a{} to \"o\"\n",
            "(a - ".repeat(levels),
            ")".repeat(levels)
        ),
        "calls" => format!(
            "{h}save {}a{} to \"o\"\n",
            "linear(b, ".repeat(levels),
            ", weight: 1)".repeat(levels)
        ),
        "lists" => format!(
            "{h}save linear(a, b, t: {}1{}) to \"o\"\n",
            "[".repeat(levels),
            "]".repeat(levels)
        ),
        "stacks" => format!(
            "{h}save {}a{} to \"o\"\n",
            "stack(".repeat(levels),
            ")".repeat(levels)
        ),
        "parse" => format!("{h}set seed = {}1{}\n", "[".repeat(levels), "]".repeat(levels)),
        "parse parens" => format!("{h}set seed = {}1{}\n", "(".repeat(levels), ")".repeat(levels)),
        "moes" => format!(
            "{h}save {}a{} to \"o\"\n",
            "moe(base: a, experts: [".repeat(levels),
            "])".repeat(levels)
        ),
        "left chain" => chain("a + b", &|p| format!("m{p} + a")),
        "right chain" => chain("a - b", &|p| format!("a - m{p}")),
        "linear chain" => chain("linear(a { weight: 0.5 }, b { weight: 0.5 })", &|p| {
            format!("linear(m{p} {{ weight: 0.5 }}, b {{ weight: 0.5 }})")
        }),
        "ties chain" => chain(
            "ties(a, b { weight: 1, density: 0.5 }, b { weight: 1, density: 0.5 })",
            &|p| format!("ties(a, m{p} {{ weight: 1, density: 0.5 }}, b {{ weight: 1, density: 0.5 }})"),
        ),
        "ta chain" => chain("task_arithmetic(a, b { weight: 0.5 })", &|p| {
            format!("task_arithmetic(a, m{p} {{ weight: 1 }}, b {{ weight: 0.5 }})")
        }),
        "ta16 chain" => {
            "set compute = bf16\n".to_string()
                + &chain("task_arithmetic(a, b { weight: 0.5 })", &|p| {
                    format!("task_arithmetic(a, m{p} {{ weight: 1 }}, b {{ weight: 0.5 }})")
                })
        }
        "sum16 chain" => "set compute = bf16\n".to_string() + &chain("a + b", &|p| format!("a - m{p}")),
        "layers chain" => chain("a.layers[0..2]", &|p| format!("m{p}.layers[0..2]")),
        other => panic!("no case {other}"),
    }
}

/// `LIMITS_CASE=neg LIMITS_MODEL=micro-llama-ft1-f32 LIMITS_LEVELS=255 LIMITS_STACK=2097152
/// cargo test --test limits probe -- --ignored`: one case on a stack of the given size
/// (to measure how much stack each level takes).
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
