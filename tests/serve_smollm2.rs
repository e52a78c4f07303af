//! `lambda-inference serve` on the real SmolLM2 weights, over real HTTP: a streamed chat
//! (`stream: true`) arrives as OpenAI server-sent events whose deltas concatenate to the
//! non-streamed answer, and the embeddings route answers the wrong-kind 400.
//!
//! Needs models/SmolLM2-135M-Instruct.Q4_1.gguf (`scripts/fetch-models`); skips without it,
//! except under CI=true.

mod common;
use common::serve::Serve;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};

/// The server under test.
struct Server(Serve);

impl Server {
    fn start(model: &std::path::Path) -> Server {
        Server(Serve::start(model, &[("THREADS", "2".to_string())], &[]))
    }

    /// One request; returns (status line, content-type, body).
    fn post(&self, path: &str, body: &Value) -> (String, String, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.0.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let body = body.to_string();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.lines().next().unwrap().to_owned();
        let ctype = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or("")
            .to_owned();
        (status, ctype, body.to_owned())
    }
}

#[test]
fn serve_streams_real_tokens_that_concatenate_to_the_full_answer() {
    let Some(model) = common::needed_file(
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "scripts/fetch-models",
    ) else {
        return;
    };
    let server = Server::start(&model);
    let req = json!({
        "messages": [{"role": "user", "content": "Write a haiku about the ocean."}],
        "temperature": 0, "max_tokens": 24
    });
    let (status, ctype, body) = server.post("/v1/chat/completions", &req);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}: {body}");
    assert_eq!(ctype, "application/json");
    let full: Value = serde_json::from_str(&body).unwrap();
    let text = full["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("In the depths of the ocean"), "{text}");

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (status, ctype, body) = server.post("/v1/chat/completions", &sreq);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(ctype, "text/event-stream");
    let frames: Vec<&str> = body.split("\n\n").filter(|f| !f.is_empty()).collect();
    assert_eq!(frames.last(), Some(&"data: [DONE]"));
    let mut streamed = String::new();
    let mut finish = Value::Null;
    for f in &frames[..frames.len() - 1] {
        let e: Value = serde_json::from_str(f.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(e["object"], "chat.completion.chunk");
        let c = &e["choices"][0];
        streamed.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        if !c["finish_reason"].is_null() {
            finish = c["finish_reason"].clone();
        }
    }
    assert!(
        frames.len() > 10,
        "one event per token or so, got {}",
        frames.len()
    );
    assert_eq!(streamed, text);
    assert_eq!(finish, full["choices"][0]["finish_reason"]);

    let (status, _, body) = server.post("/v1/embeddings", &json!({"input": "x"}));
    assert!(status.starts_with("HTTP/1.1 400"), "{status}: {body}");
    assert!(body.contains("unsupported_for_model"), "{body}");
}
