//! The example machines: each passes `vmm check`, and its graph equals the golden file in
//! tests/golden/ (UPDATE_SNAPSHOTS=1 rewrites them). The graph must also be the same bytes when
//! lowered again and when the file's devices are listed in another order.

mod common;

use common::*;

fn examples() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(root().join("machines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("toml" | "json")
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn examples_check_and_match_golden_graphs() {
    guest_artifacts();
    let machines = examples();
    assert!(
        machines.iter().any(|p| p.ends_with("dev.toml")),
        "machines/dev.toml is missing"
    );
    let mut failures = Vec::new();
    for m in &machines {
        let rel = m.strip_prefix(root()).unwrap().display().to_string();
        let check = run(&["check", &rel]);
        if !check.status.success() {
            failures.push(format!("{rel}: vmm check failed:\n{}", text(&check.stderr)));
            continue;
        }
        let g1 = run(&["graph", &rel]);
        let g2 = run(&["graph", &rel]);
        assert!(g1.status.success(), "{rel}: {}", text(&g1.stderr));
        assert_eq!(
            g1.stdout, g2.stdout,
            "{rel}: graph output differs between runs"
        );
        let stem = m.file_stem().unwrap().to_str().unwrap();
        let golden = root().join(format!("tests/golden/{stem}.graph"));
        if let Err(e) = snapshot(&golden, &text(&g1.stdout)) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn examples_start_with_the_schema_directive() {
    for m in examples()
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
    {
        let t = std::fs::read_to_string(m).unwrap();
        assert!(
            t.starts_with("#:schema ../schema/machine.schema.json\n"),
            "{} must start with `#:schema ../schema/machine.schema.json` so editors find the schema",
            m.display()
        );
    }
}

#[test]
fn graph_ignores_device_order_in_the_file() {
    guest_artifacts();
    // full.toml with its [[...]] tables in reverse order.
    let src = std::fs::read_to_string(root().join("machines/full.toml")).unwrap();
    let mut head = String::new();
    let mut tables: Vec<String> = Vec::new();
    for line in src.lines() {
        if line.starts_with("[[") || line.starts_with('[') {
            tables.push(String::new());
        }
        match tables.last_mut() {
            Some(t) => t.push_str(&format!("{line}\n")),
            None => head.push_str(&format!("{line}\n")),
        }
    }
    tables.reverse();
    let reordered = root().join("machines/.reordered-full.toml");
    std::fs::write(&reordered, format!("{head}\n{}", tables.join("\n"))).unwrap();
    let a = run(&["graph", "machines/full.toml"]);
    let b = run(&["graph", "machines/.reordered-full.toml"]);
    let _ = std::fs::remove_file(&reordered);
    assert!(b.status.success(), "{}", text(&b.stderr));
    assert_eq!(text(&a.stdout), text(&b.stdout));
}

/// Every device kind in the registry is shown in machines/full.toml, documented (each of its
/// keys) in docs/machine-format.md and has a case in the bad-config corpus: a kind added
/// without them fails here.
#[test]
fn every_device_kind_is_in_full_toml_the_docs_and_the_bad_corpus() {
    let full = std::fs::read_to_string(root().join("machines/full.toml")).unwrap();
    let docs = std::fs::read_to_string(root().join("docs/machine-format.md")).unwrap();
    let bad: Vec<String> = std::fs::read_dir(root().join("tests/bad"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml" || x == "json"))
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned())
        .collect();
    let mut missing = Vec::new();
    for kind in vmm::devices::DeviceKind::ALL {
        let key = kind.key();
        let table = format!("[[{key}]]");
        if !full.contains(&table) {
            missing.push(format!("machines/full.toml has no {table}"));
        }
        let heading = format!("### `{table}`");
        let Some(at) = docs.find(&heading) else {
            missing.push(format!("docs/machine-format.md has no `{heading}` section"));
            continue;
        };
        let section = &docs[at + heading.len()..];
        let section = &section[..section.find("\n#").unwrap_or(section.len())];
        let schema = kind.schema();
        for prop in schema["properties"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            if !section.contains(&format!("`{prop}`")) {
                missing.push(format!(
                    "docs/machine-format.md {heading} does not describe `{prop}`"
                ));
            }
        }
        if !bad
            .iter()
            .any(|b| b.contains(&table) || b.contains(&format!("\"{key}\"")))
        {
            missing.push(format!("no case in tests/bad/ declares a {table}"));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
