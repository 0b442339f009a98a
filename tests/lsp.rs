//! `mergec lsp` spoken to as an editor does: the built binary over stdio, JSON-RPC with
//! Content-Length framing; initialize, didOpen, publishDiagnostics, hover, completion,
//! definition, didChange, shutdown.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{json, Value};

struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_id: u64,
}

impl Client {
    fn start() -> Client {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mergec"))
            .arg("lsp")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Client {
            child,
            stdin,
            stdout,
            next_id: 1,
        }
    }

    fn send(&mut self, message: Value) {
        let body = message.to_string();
        write!(self.stdin, "Content-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        self.stdin.flush().unwrap();
    }

    fn receive(&mut self) -> Value {
        let mut length = None;
        loop {
            let mut line = String::new();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "the server closed stdout"
            );
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.strip_prefix("Content-Length: ") {
                length = Some(v.parse::<usize>().unwrap());
            }
        }
        let mut body = vec![0; length.unwrap()];
        self.stdout.read_exact(&mut body).unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    fn notify(&mut self, method: &str, params: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    /// Sends a request and returns its result, skipping notifications that come first.
    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            let m = self.receive();
            if m["id"] == id {
                assert!(m.get("error").is_none(), "{m}");
                return m["result"].clone();
            }
        }
    }

    /// The next publishDiagnostics notification.
    fn diagnostics(&mut self) -> Value {
        loop {
            let m = self.receive();
            if m["method"] == "textDocument/publishDiagnostics" {
                return m["params"].clone();
            }
        }
    }
}

fn at(uri: &str, line: u32, character: u32) -> Value {
    json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": character}})
}

const SCRIPT: &str = r#"model base = "models/base"
model chat = "models/chat"
let t = match tensor { "" => 0.3, _ => 0.5 }
save ties(base, chat { weight: 0.5, density: 0.5 }) to "out/a"
save linear(chat { weight: 1 }, mistral { weight: 1 }) to "out/b"
"#;

#[test]
fn an_editor_session() {
    let tmp = tempfile::tempdir().unwrap();
    mergec::synth::write_demo_models(tmp.path()).unwrap();
    let path = tmp.path().join("recipe.merge");
    let uri = format!("file://{}", path.display());
    let mut c = Client::start();
    let init = c.request(
        "initialize",
        json!({"processId": null, "rootUri": null, "capabilities": {}}),
    );
    let caps = &init["capabilities"];
    assert_eq!(caps["hoverProvider"], true);
    assert_eq!(caps["definitionProvider"], true);
    assert!(caps["completionProvider"].is_object());
    c.notify("initialized", json!({}));

    // Open: an unknown name (E0201) on line 4, columns 32..39, and an unused binding.
    c.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": uri, "languageId": "merge", "version": 1, "text": SCRIPT}}),
    );
    let published = c.diagnostics();
    assert_eq!(published["uri"], uri.as_str());
    let diags = published["diagnostics"].as_array().unwrap();
    let unknown = diags
        .iter()
        .find(|d| d["code"] == "E0201")
        .unwrap_or_else(|| panic!("{diags:?}"));
    assert_eq!(
        unknown["range"],
        json!({"start": {"line": 4, "character": 32}, "end": {"line": 4, "character": 39}})
    );
    assert_eq!(unknown["severity"], 1);
    assert!(unknown["message"].as_str().unwrap().contains("mistral"));
    assert!(
        diags.iter().any(|d| d["code"] == "W0001" && d["severity"] == 2),
        "{diags:?}"
    );

    // Hover: the method and one of its parameters, from the registry.
    let hover = c.request("textDocument/hover", at(&uri, 3, 6));
    let text = hover["contents"]["value"].as_str().unwrap();
    assert!(text.contains("**ties**") && text.contains("density"), "{text}");
    let hover = c.request("textDocument/hover", at(&uri, 3, 38));
    let text = hover["contents"]["value"].as_str().unwrap();
    assert!(text.contains("`density`") && text.contains("(0, 1]"), "{text}");

    // Completion: inside the call, its parameters, the bindings and the methods.
    let items = c.request("textDocument/completion", at(&uri, 3, 15));
    let labels: Vec<&str> = items
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["label"].as_str().unwrap())
        .collect();
    for want in ["density", "weight", "base", "chat", "slerp", "stack"] {
        assert!(labels.contains(&want), "{want} not in {labels:?}");
    }
    // ... and inside a match pattern, tensor-name patterns from the models' headers.
    let items = c.request("textDocument/completion", at(&uri, 2, 24));
    let labels: Vec<&str> = items
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["label"].as_str().unwrap())
        .collect();
    for want in [
        "self_attn",
        "mlp.down_proj",
        "model.layers.*.self_attn.q_proj.weight",
    ] {
        assert!(labels.contains(&want), "{want} not in {labels:?}");
    }

    // Definition: `chat` in the save goes to its `model` line.
    let def = c.request("textDocument/definition", at(&uri, 3, 17));
    assert_eq!(def["uri"], uri.as_str());
    assert_eq!(
        def["range"],
        json!({"start": {"line": 1, "character": 6}, "end": {"line": 1, "character": 10}})
    );

    // Change: the fix clears the error.
    let fixed = SCRIPT.replace("mistral", "base");
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri, "version": 2}, "contentChanges": [{"text": fixed}]}),
    );
    let diags = c.diagnostics()["diagnostics"].as_array().unwrap().clone();
    assert!(diags.iter().all(|d| d["severity"] != 1), "{diags:?}");

    // A mergekit config: its own diagnostics, placed on the YAML.
    let yaml_uri = format!("file://{}", tmp.path().join("config.yml").display());
    let yaml = "merge_method: tie\nmodels:\n  - model: models/chat\n";
    c.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": yaml_uri, "languageId": "yaml", "version": 1, "text": yaml}}),
    );
    let diags = c.diagnostics()["diagnostics"].as_array().unwrap().clone();
    let bad = diags
        .iter()
        .find(|d| d["code"] == "E0604")
        .unwrap_or_else(|| panic!("{diags:?}"));
    assert_eq!(bad["range"]["start"], json!({"line": 0, "character": 14}));

    assert_eq!(c.request("shutdown", Value::Null), Value::Null);
    c.notify("exit", Value::Null);
    assert!(c.child.wait().unwrap().success());
}
