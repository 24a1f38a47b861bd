//! `plan` on pairs of files. Oracle: reordering a valid file's device lists (and rewriting
//! it, which also reorders keys and drops comments) never changes the plan; a file planned
//! against itself has no changes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fn path() -> PathBuf {
    // Relative paths in the seeds (kernel, disks) resolve against machines/.
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../machines/fuzz.toml"
    ))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(a) = vmm::check_bytes(&path(), data.to_vec()) else {
        return;
    };
    let (same, _) = vmm::graph::diff::plan(&a.valid, &a.graph, &a.valid).expect("plans");
    assert!(same.is_empty(), "a file against itself: {:?}", same.changes);
    let Ok(mut table) = text.parse::<toml::Table>() else {
        return;
    };
    for (_, v) in table.iter_mut() {
        if let toml::Value::Array(list) = v {
            list.reverse();
        }
    }
    let reordered = toml::to_string(&table).expect("a parsed table serializes");
    let b = match vmm::check_bytes(&path(), reordered.clone().into_bytes()) {
        Ok(b) => b,
        Err(r) => panic!(
            "reordering a valid file made it invalid:\n{}\n{reordered}",
            r.render(false, 100)
        ),
    };
    let (plan, _) = vmm::graph::diff::plan(&a.valid, &a.graph, &b.valid).expect("plans");
    assert!(
        plan.is_empty(),
        "reordering changed the plan: {:?}",
        plan.changes
    );
});
