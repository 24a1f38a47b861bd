//! Machine text through the whole check (load, schema, validation, lowering) as TOML and as
//! JSON: never a panic, and every problem is reported as a diagnostic that renders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fuzz_target!(|data: &[u8]| {
    // Relative paths in the seeds (kernel, disks) resolve against machines/.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../machines/");
    for name in ["fuzz.toml", "fuzz.json"] {
        match vmm::check_bytes(&PathBuf::from(dir).join(name), data.to_vec()) {
            Ok(c) => {
                // A file that checks lowers to a graph that prints.
                let _ = c.graph.render();
            }
            Err(report) => {
                let _ = report.render(false, 100);
            }
        }
    }
});
