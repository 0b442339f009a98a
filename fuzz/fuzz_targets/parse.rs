//! Any text through the whole checker: it may reject, it must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let script = mergec::driver::Script::from_text("fuzz.merge", text.to_string(), ".".into());
    let _ = mergec::driver::compile(&script, false, &mergec::plan::Limits::default());
});
