//! Bad input never panics: thousands of seeded mutations of real scripts go through the
//! whole checker (parse, model loading, sema, lowering, planning).

use std::path::PathBuf;

use mergec::driver::{self, Script};
use mergec::plan::Limits;

/// xorshift64*: a small deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "=>",
    "..",
    ".layers[0..2]",
    "+",
    "-",
    "*",
    "/",
    "\"",
    "\\",
    "#",
    "\n",
    "model",
    "let",
    "save",
    "to",
    "match",
    "tensor",
    "_",
    "linear",
    "weight",
    "normalize",
    "0",
    "1e309",
    "5GB",
    "0.5",
    "-1",
    "é",
    "\u{0}",
    "a",
    "b",
    "stack(",
    "select(",
    "graft(",
    "rename(",
    "ties(",
    "slerp(",
    "set seed = ",
    "embed:",
    "head:",
    "regex:",
    "chat_template:",
    "\"chatml\"",
    "base:",
    ".layers[2..1]",
    "[a, b]",
];

#[test]
fn mutated_scripts_never_panic() {
    let base_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let mut seeds: Vec<String> = std::fs::read_dir(&base_dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            // Every fixture but the one that is not UTF-8 (E0104).
            (p.extension()? == "merge").then(|| std::fs::read_to_string(p).ok())?
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() > 10);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..3000 {
        let mut text: Vec<char> = seeds[rng.below(seeds.len())].chars().collect();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(text.len() + 1);
            match rng.below(3) {
                0 if !text.is_empty() => {
                    let end = (at + 1 + rng.below(8)).min(text.len());
                    text.drain(at.min(end)..end);
                }
                1 => {
                    let piece = PIECES[rng.below(PIECES.len())];
                    for (i, c) in piece.chars().enumerate() {
                        text.insert(at + i, c);
                    }
                }
                _ => {
                    if at < text.len() {
                        text[at] = char::from(b' ' + rng.below(95) as u8);
                    }
                }
            }
        }
        let text: String = text.into_iter().collect();
        let script = Script::from_text(&format!("case{case}.merge"), text, base_dir.clone());
        // Either outcome is fine; reaching here without a panic is the point. A failure
        // must hold at least one error, none of them internal, and render.
        if let Err(diags) = driver::compile(&script, false, &Limits::default()) {
            assert!(diags.has_errors(), "case {case}: failed without an error");
            let text = mergec::diag::render::render_text(&diags.0, &script.sources, false);
            assert!(!text.contains("internal compiler error"), "case {case}:\n{text}");
        }
    }
}

#[test]
fn deep_nesting_is_refused_not_overflowed() {
    let text = format!("let x = {}1{}", "(".repeat(100_000), ")".repeat(100_000));
    let script = Script::from_text("deep.merge", text, PathBuf::from("."));
    let diags = driver::compile(&script, false, &Limits::default()).unwrap_err();
    assert!(diags.iter().any(|d| d.message.contains("nested too deeply")));
}
