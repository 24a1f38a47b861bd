//! The committed schema is what the code generates, and it tells editors what they need.

mod common;

use common::*;

#[test]
fn committed_schema_is_up_to_date() {
    let out = run(&["schema"]);
    assert!(out.status.success());
    let committed = std::fs::read_to_string(root().join("schema/machine.schema.json")).unwrap();
    assert!(
        committed == text(&out.stdout),
        "schema/machine.schema.json is stale: regenerate it with\n    cargo run -- schema > schema/machine.schema.json"
    );
}

#[test]
fn schema_describes_every_key_and_device_kind() {
    let s: serde_json::Value = serde_json::from_slice(&run(&["schema"]).stdout).unwrap();
    let props = s["properties"].as_object().unwrap();
    for key in [
        "name", "memory", "vcpus", "kernel", "initrd", "cmdline", "pci",
    ] {
        assert!(
            props[key]["description"].is_string(),
            "`{key}` has no description"
        );
    }
    for kind in vmm::devices::DeviceKind::ALL {
        let p = &props[kind.key()];
        assert!(
            p["description"].is_string(),
            "device kind `{kind}` has no description"
        );
        assert_eq!(p["type"], "array", "`{kind}` is not an array of tables");
    }
    // Every property of every definition is documented.
    for (def, d) in s["definitions"].as_object().unwrap() {
        for (k, v) in d["properties"].as_object().into_iter().flatten() {
            assert!(v["description"].is_string(), "{def}.{k} has no description");
        }
    }
}

#[test]
fn taplo_config_associates_machine_files_with_the_schema() {
    let t = std::fs::read_to_string(root().join(".taplo.toml")).expect(".taplo.toml exists");
    assert!(
        t.contains("schema/machine.schema.json") && t.contains("machines/"),
        "{t}"
    );
}
