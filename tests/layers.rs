//! Imports point one way. Reads every file under src/ and collects which top-level modules
//! each one names (`crate::x`, or `vmm::x` from the binary); fails on a cycle between modules
//! and on an import against the layer order documented in docs/architecture.md.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom to top; a module may import only modules listed before it (utilities at the bottom).
const LAYERS: &[&[&str]] = &[
    &[
        "sync",
        "diag",
        "hostfile",
        "logging",
        "alloc_track",
        "sandbox",
        "image_lock",
    ],
    &["contract"],
    &["hw"],
    &["testing"],
    &["devices"],
    &["spec"],
    &["validate"],
    &["graph"],
    &["backend"],
    &["reconcile", "vhost_user"],
];

fn layer_of(m: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&m))
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules named in `text` as `crate::x` (comments included: a doc link to a
/// stage is a dependency of the reader too).
fn named(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices(prefix) {
        if i > 0 {
            let before = text.as_bytes()[i - 1];
            if before.is_ascii_alphanumeric() || before == b'_' {
                continue;
            }
        }
        let rest = &text[i + prefix.len()..];
        let m: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !m.is_empty() {
            out.insert(m);
        }
    }
    out
}

/// Module → the modules it imports, from the source tree.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = common::root().join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in all {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests (at the end of a file or in a `tests.rs`) may use any layer: the
        // transport's tests drive a real block device.
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let deps = g.entry(module.clone()).or_default();
        for m in named(text, "crate::") {
            if m != module && layer_of(&m).is_some() {
                deps.insert(m);
            }
        }
    }
    g
}

#[test]
fn every_module_has_a_layer() {
    for m in graph().keys() {
        assert!(
            layer_of(m).is_some(),
            "src/{m} is in no layer: add it to LAYERS here and to docs/architecture.md"
        );
    }
}

#[test]
fn imports_follow_the_layers() {
    let mut wrong = Vec::new();
    for (m, deps) in graph() {
        let Some(lm) = layer_of(&m) else { continue };
        for d in deps {
            if layer_of(&d).is_some_and(|ld| ld >= lm) && LAYERS[lm] != LAYERS[0] {
                wrong.push(format!("{m} imports {d}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layer order:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn there_is_no_cycle_between_modules() {
    let g = graph();
    // Depth-first search with colours; report the first cycle found as a path.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(m) {
            Some(2) => return None,
            Some(1) => {
                let at = path.iter().position(|p| p == m).unwrap();
                let mut c = path[at..].to_vec();
                c.push(m.to_string());
                return Some(c);
            }
            _ => {}
        }
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in g.keys() {
        if let Some(c) = visit(m, &g, &mut state, &mut Vec::new()) {
            panic!("modules import each other in a circle: {}", c.join(" → "));
        }
    }
}

#[test]
fn the_checker_sees_a_cycle_and_a_wrong_import() {
    // The parser finds module names after `crate::` only at a word boundary.
    let n = named(
        "use crate::graph::X; a_crate::spec; crate::devices::y",
        "crate::",
    );
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        ["devices", "graph"],
        "word boundary"
    );
    assert!(layer_of("devices") < layer_of("graph"));
}

/// Files stay readable: none under src/ passes 800 lines (a device that outgrows one becomes a
/// folder; unit tests go to a `tests.rs` next to it).
#[test]
fn no_source_file_is_over_800_lines() {
    let mut all = Vec::new();
    files(&common::root().join("src"), &mut all);
    let long: Vec<String> = all
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 800).then(|| format!("{} has {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "{}", long.join("\n"));
}

/// The functions of `text` longer than `max` lines, as (name, first line, lines). A line
/// scanner, not a parser: it counts braces from each `fn` line, skipping `//` comments, string
/// and char literals; good enough for rustfmt-formatted code.
fn long_functions(text: &str, max: usize) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let t = t
            .strip_prefix("pub ")
            .or_else(|| t.strip_prefix("pub(super) "))
            .unwrap_or(t);
        let t = t.strip_prefix("pub(crate) ").unwrap_or(t);
        let t = t.strip_prefix("const ").unwrap_or(t);
        let t = t.strip_prefix("unsafe ").unwrap_or(t);
        let Some(rest) = t.strip_prefix("fn ") else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut opened) = (0i32, false);
        for (j, body) in lines.iter().enumerate().skip(i) {
            let code = strip_literals(body);
            if !opened && code.trim_end().ends_with(';') {
                break; // a declaration without a body
            }
            for c in code.chars() {
                match c {
                    '{' => (depth, opened) = (depth + 1, true),
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth == 0 {
                if j - i + 1 > max {
                    out.push((name.clone(), i + 1, j - i + 1));
                }
                break;
            }
        }
    }
    out
}

/// `line` without its `//` comment and with string and char literals emptied.
fn strip_literals(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => break,
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            // '{' and '}' as chars; lifetimes ('a) have no closing quote and stay as they are.
            '\'' => {
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with('\\') {
                    for c in chars.by_ref() {
                        if c == '\'' {
                            break;
                        }
                    }
                } else if rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Functions stay readable: none under src/ passes 90 lines (the rule is ~80; unit tests in
/// `tests.rs` files and test tails are exempt).
#[test]
fn no_function_is_over_90_lines() {
    let mut all = Vec::new();
    files(&common::root().join("src"), &mut all);
    let mut long = Vec::new();
    for f in all {
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        for (name, line, n) in long_functions(text, 90) {
            long.push(format!("{}:{line}: fn {name} has {n} lines", f.display()));
        }
    }
    assert!(long.is_empty(), "split these:\n{}", long.join("\n"));
}

#[test]
fn the_function_scanner_counts_bodies_not_strings() {
    let body = "fn f() {\n    let s = \"}}}\";\n    let c = '{';\n    // }\n    g(|x: &'static str| x);\n}\nfn g();\n";
    assert_eq!(long_functions(body, 5), [("f".to_string(), 1, 6)]);
    assert!(long_functions(body, 6).is_empty());
}
