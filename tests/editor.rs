//! Editors complete machine files from the committed schema. This drives a real TOML language
//! server (Tombi, `pip install tombi`) over LSP the way an editor does: open a machine file under
//! machines/ (its `#:schema` line points at schema/machine.schema.json) and ask for completions.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

struct Lsp {
    child: Child,
    stdin: ChildStdin,
    rx: Receiver<Value>,
    next_id: u64,
}

impl Lsp {
    fn start() -> Option<Lsp> {
        let mut child = Command::new("tombi")
            .args(["lsp", "--offline"])
            .env("TOMBI_OFFLINE", "true")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdin = child.stdin.take()?;
        let mut out = BufReader::new(child.stdout.take()?);
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            loop {
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if out.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim();
                    if line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                if out.read_exact(&mut body).is_err() {
                    return;
                }
                if let Ok(v) = serde_json::from_slice(&body)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        Some(Lsp {
            child,
            stdin,
            rx,
            next_id: 1,
        })
    }

    fn send(&mut self, msg: Value) {
        let body = msg.to_string();
        write!(self.stdin, "Content-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        self.stdin.flush().unwrap();
    }

    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            let m = self
                .rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the language server answers within 60 s");
            if m["id"] == id && m.get("method").is_none() {
                return m["result"].clone();
            }
        }
    }

    fn notify(&mut self, method: &str, params: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    fn labels(&mut self, uri: &str, line: u32, character: u32) -> Vec<String> {
        let r = self.request(
            "textDocument/completion",
            json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": character}}),
        );
        let items = if r.is_array() { r } else { r["items"].clone() };
        items
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["label"].as_str().map(String::from))
            .collect()
    }
}

impl Drop for Lsp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn language_server_completes_machine_files_from_the_schema() {
    let Some(mut lsp) = Lsp::start() else {
        skip(
            "language_server_completes_machine_files_from_the_schema",
            "`tombi` is not installed (pip install tombi)",
        );
        return;
    };
    let root_uri = format!("file://{}", root().display());
    lsp.request(
        "initialize",
        json!({"processId": null, "rootUri": root_uri, "capabilities": {}}),
    );
    lsp.notify("initialized", json!({}));

    // Line numbers (0-based) of the places asked about are noted on the right.
    let text = "#:schema ../schema/machine.schema.json
name = \"editor\"

[[serial]]
name = \"com1\"
port = 

[[net]]
t

[pci]

";
    // The document is opened in machines/, where the relative #:schema path resolves.
    let uri = format!("{root_uri}/machines/editor-completion-test.toml");
    lsp.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": uri, "languageId": "toml", "version": 1, "text": text}}),
    );

    // The server loads the schema in the background: the first answers may come before it.
    let mut top = Vec::new();
    for _ in 0..100 {
        top = lsp.labels(&uri, 2, 0); // empty line under `name`
        if !top.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for key in [
        "memory", "vcpus", "kernel", "initrd", "cmdline", "block", "rng", "console",
    ] {
        assert!(
            top.contains(&key.to_string()),
            "top-level completion lacks `{key}`: {top:?}"
        );
    }
    for set in ["name", "pci"] {
        assert!(
            !top.contains(&set.to_string()),
            "`{set}` is already set: {top:?}"
        );
    }

    let port = lsp.labels(&uri, 5, 7); // after `port = `
    assert_eq!(
        port,
        ["\"com1\"", "\"com2\"", "\"com3\"", "\"com4\""],
        "enum values of `port`"
    );

    let net = lsp.labels(&uri, 8, 1); // `t` in [[net]]
    assert!(
        net.contains(&"tap".to_string()),
        "[[net]] completion lacks `tap`: {net:?}"
    );

    let pci = lsp.labels(&uri, 11, 0); // empty line in [pci]
    assert_eq!(pci, ["hotplug_slots"], "[pci] completion");
}
