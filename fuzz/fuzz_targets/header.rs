//! Any bytes as a safetensors header: rejected with a reason, never a panic or a huge
//! allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = mergec::io::header::parse_header(bytes, bytes.len() as u64);
});
