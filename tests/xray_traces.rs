//! X-Ray subsegments end to end: the real `bootstrap` under the Runtime API stand-in
//! (tests/common/runtime_api.rs), with AWS_XRAY_DAEMON_ADDRESS pointing at a UDP socket of this
//! test that plays the daemon (it reads datagrams as the daemon does: a header line, then one
//! document).
//!
//! - The first invoke, sampled: `fetch`, `verify`, `engine` (the init it came after, at the times
//!   they happened, before the invoke) and `inference` (annotated with route, status, tokens),
//!   all under the invoke's trace: `trace_id` = Root, `parent_id` = Parent.
//! - A second sampled invoke: `inference` only (init is reported once).
//! - An unsampled invoke (`Sampled=0`): nothing at all.
//!
//! Needs the MiniLM model (scripts/fetch-models); missing locally it skips, under CI=true it fails.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use common::runtime_api::{RuntimeApi, SAMPLED_TRACE};

const NEXT: &str = "/2018-06-01/runtime/invocation/next";
/// Init loads the model (debug build of our crate).
const INIT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(30);
const ROOT: &str = "1-5759e988-bd862e3fe1be46a994272793";
const PARENT: &str = "53995c3f42cd8ad8";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn invoke(api: &RuntimeApi, request_id: &str, event: &Value, trace: &str) -> Value {
    let next = api.expect("GET", NEXT, if request_id == "r1" { INIT } else { STEP });
    RuntimeApi::invoke_traced(next, request_id, event, trace);
    let path = format!("/2018-06-01/runtime/invocation/{request_id}/response");
    let response = api.expect("POST", &path, STEP);
    let envelope = response.json();
    response.answer(202, &[], b"");
    envelope
}

/// The documents the "daemon" receives within `wait` (each datagram: header line + document).
fn documents(daemon: &UdpSocket, wait: Duration) -> Vec<Value> {
    daemon
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let until = std::time::Instant::now() + wait;
    let mut docs = Vec::new();
    let mut buf = vec![0u8; 65536];
    while std::time::Instant::now() < until {
        let Ok(n) = daemon.recv(&mut buf) else {
            continue;
        };
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        let (header, doc) = text
            .split_once('\n')
            .expect("header line, then the document");
        let header: Value = serde_json::from_str(header).unwrap();
        assert_eq!(header, serde_json::json!({"format": "json", "version": 1}));
        docs.push(serde_json::from_str(doc).unwrap());
    }
    docs
}

fn named<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no {name} subsegment in {docs:?}"))
}

#[test]
fn sampled_invokes_send_their_subsegments_under_the_invoke_s_trace() {
    let Some(model) =
        common::needed_file("models/all-MiniLM-L6-v2.q8_0.gguf", "scripts/fetch-models")
    else {
        return;
    };
    let daemon = UdpSocket::bind("127.0.0.1:0").unwrap();
    let api = RuntimeApi::start();
    let started = SystemTime::now();
    let _f = Killed(
        Command::new(env!("CARGO_BIN_EXE_bootstrap"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_LAMBDA_RUNTIME_API", api.address())
            .env("AWS_LAMBDA_FUNCTION_NAME", "traced")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("MODEL_URI", model.display().to_string())
            .env(
                "AWS_XRAY_DAEMON_ADDRESS",
                daemon.local_addr().unwrap().to_string(),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting bootstrap"),
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("events/apigw-v2-embeddings.json");
    let event: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();

    // First invoke, sampled: the init breakdown and the inference.
    let answer = invoke(&api, "r1", &event, SAMPLED_TRACE);
    assert_eq!(answer["statusCode"], 200, "{answer}");
    let docs = documents(&daemon, Duration::from_secs(2));
    let mut names: Vec<&str> = docs.iter().map(|d| d["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        ["engine", "fetch", "inference", "verify"],
        "{docs:?}"
    );
    let t0 = started.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for d in &docs {
        assert_eq!(d["type"], "subsegment");
        assert_eq!(d["trace_id"], ROOT);
        assert_eq!(d["parent_id"], PARENT);
        let (s, e) = (
            d["start_time"].as_f64().unwrap(),
            d["end_time"].as_f64().unwrap(),
        );
        assert!(t0 - 0.01 <= s && s <= e && e <= now + 0.01, "{d}");
    }
    let mut ids: Vec<&str> = docs.iter().map(|d| d["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "each subsegment has its own id");
    let inference = named(&docs, "inference");
    // Init happened before the invoke: the engine was built before the inference began.
    assert!(named(&docs, "engine")["end_time"].as_f64() <= inference["start_time"].as_f64());
    assert!(
        named(&docs, "fetch")["start_time"].as_f64()
            <= named(&docs, "engine")["start_time"].as_f64()
    );
    let a = &inference["annotations"];
    assert_eq!(a["route"], "/v1/embeddings", "{inference}");
    assert_eq!(a["status"], 200);
    assert_eq!(a["source"], "http-api");
    assert!(a["input_tokens"].as_u64().unwrap() > 0, "{inference}");

    // Second invoke, sampled: the inference only.
    invoke(&api, "r2", &event, SAMPLED_TRACE);
    let docs = documents(&daemon, Duration::from_secs(1));
    let names: Vec<&str> = docs.iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["inference"]);

    // Not sampled: nothing is sent.
    let unsampled = SAMPLED_TRACE.replace("Sampled=1", "Sampled=0");
    invoke(&api, "r3", &event, &unsampled);
    assert_eq!(
        documents(&daemon, Duration::from_secs(1)),
        Vec::<Value>::new()
    );
}
