//! Every stage of every example script, as `mergec debug STAGE` prints it, recorded as a
//! snapshot: a change to any stage shows up as a reviewed diff.

mod common;

use common::*;
use mergec::driver::{self, Script, Stage};
use mergec::plan::Limits;

#[test]
fn every_stage_of_every_example() {
    let tmp = tempfile::tempdir().unwrap();
    let examples = demo_checkout(tmp.path());
    let mut names: Vec<String> = std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".merge"))
        .collect();
    names.sort();
    assert!(names.len() >= 9, "only {} examples", names.len());
    let tmp_text = tmp.path().display().to_string();
    for name in names {
        let text = std::fs::read_to_string(repo().join("examples").join(&name)).unwrap();
        let script = Script::from_text(&name, text, examples.clone());
        // A fixed thread count: the plan's peak counts each worker's buffers.
        let limits = Limits {
            threads: 2,
            ..Limits::default()
        };
        let compiled = driver::compile(&script, false, &limits)
            .unwrap_or_else(|d| panic!("{name}: {}", render(&script, &d)));
        for stage in Stage::ALL {
            let dump = driver::dump(&compiled, stage).replace(&tmp_text, "$TMP");
            assert!(
                !dump.is_empty() || stage == Stage::Wgsl,
                "{name}: empty {}",
                stage.name()
            );
            insta::assert_snapshot!(format!("{}@{}", stage.name(), name), dump);
        }
    }
}
