//! Any text as a mergekit (or mergekit-moe, mergekit-multi) config: translated or
//! rejected with diagnostics, never a panic; a translation is a script the checker reads.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mergec::import::{self, Options};

fuzz_target!(|text: &str| {
    // A folder that does not exist: references stay paths or hub ids, nothing is read.
    let base = Path::new("/nonexistent/mergec-fuzz");
    let mut opts = Options::new("fuzz.yml", base, &base.join("out"));
    opts.strict = text.len() % 2 == 0;
    if let Ok(imported) = import::translate("fuzz.yml", text.to_string(), &opts) {
        let _ = imported.compile(false, &mergec::plan::Limits::default());
    }
});
