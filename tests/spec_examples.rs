//! The spec cannot drift from the compiler: every fenced block in `spec/*.md` tagged
//! ```` ```merge ```` must compile (warnings allowed), every block tagged
//! ```` ```merge,fail ```` must fail with at least one error, and every `examples/*.merge`
//! must compile against the models `mergec demo` generates. Blocks tagged
//! ```` ```merge,fail-io ```` need broken files and are not compiled here.
//!
//! Spec blocks use the models of `tests/fixtures/conformance` (paths relative to it).
//! Nothing is written: compiling checks the scripts against the models' headers only.

use std::path::{Path, PathBuf};

use mergec::diag::{Code, Diagnostics};
use mergec::driver::{self, Script};
use mergec::plan::Limits;
mod common;

use common::demo_checkout;

/// One fenced block of a Markdown file.
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    info: String,
    text: String,
}

/// Every fenced code block of `markdown` (backtick or tilde fences, at least three).
fn fenced_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<(char, usize, Block)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let fence_char = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let fence_len = fence_char.map_or(0, |c| trimmed.chars().take_while(|x| *x == c).count());
        match open.take() {
            None => match fence_char {
                Some(c) if fence_len >= 3 => {
                    let info = trimmed[fence_len..].trim().to_string();
                    let block = Block {
                        line: i + 1,
                        info,
                        text: String::new(),
                    };
                    open = Some((c, fence_len, block));
                }
                _ => {}
            },
            Some((c, len, mut block)) => {
                let closes =
                    fence_char == Some(c) && fence_len >= len && trimmed[fence_len..].trim().is_empty();
                if closes {
                    blocks.push(block);
                } else {
                    block.text.push_str(line);
                    block.text.push('\n');
                    open = Some((c, len, block));
                }
            }
        }
    }
    if let Some((_, _, block)) = open {
        panic!("unclosed code fence opened at line {}", block.line);
    }
    blocks
}

fn render(script: &Script, diags: &Diagnostics) -> String {
    mergec::diag::render::render_text(&diags.0, &script.sources, false)
}

/// Compiles `text` as source `source_name`; returns a failure message, headed `name`, when
/// the outcome is not the expected one.
fn check_block(
    name: &str,
    source_name: &str,
    text: &str,
    base_dir: &Path,
    expect_fail: bool,
) -> Option<String> {
    let script = Script::from_text(source_name, text.to_string(), base_dir.to_path_buf());
    match (driver::compile(&script, false, &Limits::default()), expect_fail) {
        (Ok(_), false) => None,
        (Ok(_), true) => Some(format!(
            "{name}: expected errors, but the script compiled:\n{}",
            text.trim_start_matches('\n')
        )),
        (Err(diags), false) => Some(format!(
            "{name}: expected to compile, but:\n{}",
            render(&script, &diags)
        )),
        (Err(diags), true) => {
            if !diags.has_errors() {
                Some(format!(
                    "{name}: expected errors, got only:\n{}",
                    render(&script, &diags)
                ))
            } else if diags.iter().any(|d| d.code == Code::E0001) {
                Some(format!(
                    "{name}: fails with an internal compiler error:\n{}",
                    render(&script, &diags)
                ))
            } else {
                None
            }
        }
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sorted_files(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == extension))
        .collect();
    files.sort();
    files
}

#[test]
fn spec_and_example_scripts_compile() {
    let repo = repo();
    let conformance = repo.join("tests/fixtures/conformance");
    let mut failures = Vec::new();
    let mut checked = 0usize;

    for md in sorted_files(&repo.join("spec"), "md") {
        let text = std::fs::read_to_string(&md).unwrap();
        let file = md.strip_prefix(&repo).unwrap_or(&md).display().to_string();
        for block in fenced_blocks(&text) {
            let expect_fail = match block.info.as_str() {
                "merge" => false,
                "merge,fail" => true,
                _ => continue,
            };
            checked += 1;
            let name = format!("{file}:{}", block.line);
            // Blank lines up to the fence, so diagnostics give the line in the Markdown file.
            let text = format!("{}{}", "\n".repeat(block.line), block.text);
            if let Some(f) = check_block(&name, &file, &text, &conformance, expect_fail) {
                failures.push(f);
            }
        }
    }

    let examples = sorted_files(&repo.join("examples"), "merge");
    if !examples.is_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = demo_checkout(tmp.path());
        for path in examples {
            let text = std::fs::read_to_string(&path).unwrap();
            let file_name = path.file_name().unwrap();
            std::fs::write(dir.join(file_name), &text).unwrap();
            checked += 1;
            let name = format!("examples/{}", file_name.to_string_lossy());
            if let Some(f) = check_block(&name, &name, &text, &dir, false) {
                failures.push(f);
            }
        }
    }

    assert!(
        failures.is_empty(),
        "{} of {checked} spec blocks and examples failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(
        checked >= 10,
        "only {checked} blocks and examples found: is spec/ missing?"
    );
}

#[test]
fn fences_are_found() {
    let md = "text\n```merge\nmodel a = \"x\"\n```\n\n````merge,fail\n```\ninner\n````\n```text\nt\n```\n";
    let blocks = fenced_blocks(md);
    let infos: Vec<(&str, usize)> = blocks.iter().map(|b| (b.info.as_str(), b.line)).collect();
    assert_eq!(infos, [("merge", 2), ("merge,fail", 6), ("text", 10)]);
    assert_eq!(blocks[0].text, "model a = \"x\"\n");
    assert_eq!(blocks[1].text, "```\ninner\n");
}
