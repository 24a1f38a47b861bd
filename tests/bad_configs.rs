//! The bad-config corpus: every file in tests/bad/ must fail `vmm check` with exit code 2, its
//! first diagnostic must point at the line:col written in its `.expected` file, and the rendered
//! diagnostics must equal the rest of that file (UPDATE_SNAPSHOTS=1 rewrites the rendering,
//! never the expected position).

mod common;

use common::*;

#[test]
fn bad_configs_fail_with_spans() {
    let dir = root().join("tests/bad");
    // A sparse file larger than the 4 MiB machine in initrd-too-big.toml.
    let fixtures = root().join("target/bad-fixtures");
    std::fs::create_dir_all(&fixtures).unwrap();
    let huge = std::fs::File::create(fixtures.join("huge.initrd")).unwrap();
    huge.set_len(8 << 20).unwrap();
    // A FIFO as the kernel: a blocking open would hang `vmm check` (git cannot hold one).
    let fifo = fixtures.join("fifo");
    if !fifo.exists() {
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    }

    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("toml" | "json")
            )
        })
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 40,
        "the corpus has only {} cases",
        cases.len()
    );

    let mut failures = Vec::new();
    for case in &cases {
        let rel = case.strip_prefix(root()).unwrap().display().to_string();
        let expected_path = case.with_extension("expected");
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        let header = expected.lines().next().unwrap_or("").to_string();
        let Some(at) = header.strip_prefix("exit 2 at ") else {
            failures.push(format!(
                "{rel}: {} lacks an `exit 2 at L:C` header",
                expected_path.display()
            ));
            continue;
        };

        let json = run(&["check", "--message-format", "json", &rel]);
        // Wide enough that no line wraps: the rendering must not depend on how long the
        // checkout's path is (the messages name resolved paths; $ROOT replaces them afterwards).
        let human = vmm()
            .args(["check", &rel])
            .env("COLUMNS", "1000")
            .output()
            .expect("vmm runs");
        if json.status.code() != Some(2) || human.status.code() != Some(2) {
            failures.push(format!(
                "{rel}: exit {:?}, expected 2\n{}",
                human.status.code(),
                text(&human.stderr)
            ));
            continue;
        }
        let first: serde_json::Value =
            match text(&json.stdout).lines().next().map(serde_json::from_str) {
                Some(Ok(v)) => v,
                _ => {
                    failures.push(format!("{rel}: no JSON diagnostic: {}", text(&json.stdout)));
                    continue;
                }
            };
        let got = format!("{}:{}", first["line"], first["column"]);
        if got != at {
            failures.push(format!(
                "{rel}: first diagnostic at {got}, expected {at}: {}",
                first["message"]
            ));
        }
        let rendered = format!("{header}\n{}", scrub(&text(&human.stderr)));
        if let Err(e) = snapshot(&expected_path, &rendered) {
            failures.push(format!("{rel}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    eprintln!("{} bad configs checked", cases.len());
}

#[test]
fn check_has_no_side_effects() {
    // A machine with TAPs, sockets and log files: checking it creates none of them.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"k").unwrap();
    let m = dir.path().join("m.toml");
    std::fs::write(
        &m,
        r#"name = "m"
memory = "64M"
vcpus = 1
kernel = "vmlinux"
[[serial]]
name = "s"
io = { file = "com1.log" }
[[console]]
name = "c"
io = { socket = "c.sock" }
[[net]]
name = "n"
tap = "vmmcheck0"
"#,
    )
    .unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let out = vmm().args(["check", m.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before.len(), after.len(), "check created files: {after:?}");
    assert!(
        !std::path::Path::new("/sys/class/net/vmmcheck0").exists(),
        "check created a TAP"
    );
}

#[test]
fn warnings_do_not_fail_a_check() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"k").unwrap();
    std::fs::write(dir.path().join("odd.img"), vec![0u8; 1000]).unwrap();
    let m = dir.path().join("m.toml");
    std::fs::write(&m, "name = \"m\"\nmemory = \"64M\"\nvcpus = 1\nkernel = \"vmlinux\"\n[[block]]\nname = \"d\"\npath = \"odd.img\"\n").unwrap();
    let out = vmm().args(["check", m.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("not a multiple of 512"), "{err}");
    assert!(err.contains("1 warning"), "{err}");
}

#[test]
fn a_missing_machine_file_is_exit_2() {
    let out = run(&["check", "no/such/machine.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("Cannot read machine file"),
        "{}",
        text(&out.stderr)
    );
}

/// One size limit for every way a machine file comes in, and at most 100 diagnostics shown:
/// no input makes vmm read or print without bound (docs/performance.md has the worst inputs'
/// time and peak RSS, from benches/check.rs).
#[test]
fn oversized_files_and_endless_problems_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k"), b"x").unwrap();
    let huge = dir.path().join("huge.toml");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let small = dir.path().join("ok.toml");
    std::fs::write(
        &small,
        "name = \"m\"\nmemory = \"64M\"\nvcpus = 1\nkernel = \"k\"\n",
    )
    .unwrap();
    for args in [
        vec!["check", huge.to_str().unwrap()],
        vec!["plan", small.to_str().unwrap(), huge.to_str().unwrap()],
        vec!["graph", huge.to_str().unwrap()],
    ] {
        let out = run(&args);
        let err = text(&out.stderr) + &text(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("larger than 256 KiB, the most vmm reads"),
            "{args:?}: {err}"
        );
        assert!(err.len() < 4096, "{args:?}: {} bytes of output", err.len());
    }
    // 10,000 misspelt keys: the first 100 problems and a count of the rest.
    let mut many = String::from("name = \"m\"\nmemory = \"64M\"\nvcpus = 1\nkernel = \"k\"\n");
    for _ in 0..10_000 {
        many.push_str("[[net]]\nnmae = \"x\"\n");
    }
    let many_path = dir.path().join("many.toml");
    std::fs::write(&many_path, many).unwrap();
    let out = run(&["check", many_path.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(err.matches("  × ").count(), 100, "{err}");
    assert!(
        err.contains("more problems not shown (the first 100 are)"),
        "{err}"
    );
    let out = run(&[
        "check",
        "--message-format",
        "json",
        many_path.to_str().unwrap(),
    ]);
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 101);
    let last: serde_json::Value = serde_json::from_str(lines[100]).unwrap();
    assert!(last["omitted"]["errors"].as_u64().unwrap() > 1000, "{last}");
}
