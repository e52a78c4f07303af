//! Streaming through an API Gateway REST API (template parameter RestApiStreaming=true: the
//! integration's responseTransferMode STREAM, the function told by REST_API_TRANSFER_MODE=STREAM).
//!
//! - On the library with the FAKE generator (tests/common): a REST (payload 1.0) `stream: true`
//!   chat answers server-sent events when the invocation says its REST API streams, and the 400
//!   naming the option when it does not.
//! - End to end: the real `bootstrap` under the real emulator (`aws-lambda-rie`, from
//!   `scripts/fetch-tools`) serving SmolLM2 (`scripts/fetch-models`), fed
//!   events/apigw-v1-chat-stream.json: with REST_API_TRANSFER_MODE=STREAM the answer is Lambda
//!   response streaming's wire format, which API Gateway's STREAM mode reads (metadata prelude,
//!   8 NUL bytes, then the SSE chunks ending `data: [DONE]`), and other REST answers keep their
//!   status in the prelude; without it, the buffered 400 in the OpenAI error shape. Without the
//!   emulator or the model these say so and skip (under CI=true a missing piece fails).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use lambda_inference::events::{self, EventReply, Invocation};
use lambda_inference::service::Limits;
use serde_json::Value;

use common::emulator::Emulator;

const SAMPLE: &str = "events/apigw-v1-chat-stream.json";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn sample() -> Value {
    serde_json::from_slice(&std::fs::read(root().join(SAMPLE)).unwrap()).unwrap()
}

/// The sample with its request body changed by `edit`.
fn with_body(edit: impl FnOnce(&mut Value)) -> Value {
    let mut ev = sample();
    let mut body: Value = serde_json::from_str(ev["body"].as_str().unwrap()).unwrap();
    edit(&mut body);
    ev["body"] = Value::String(body.to_string());
    ev
}

fn invocation(rest_streams: bool) -> Invocation {
    let received = Instant::now();
    Invocation {
        deadline: received + Duration::from_secs(60),
        received,
        url_streams: false,
        rest_streams,
    }
}

/// The 400 a REST `stream: true` request gets where the REST API buffers: OpenAI's error shape,
/// naming the template parameter that turns streaming on.
fn assert_stream_refused(envelope: &Value) {
    assert_eq!(envelope["statusCode"], 400, "{envelope}");
    assert_eq!(envelope["headers"]["content-type"], "application/json");
    let body: Value = serde_json::from_str(envelope["body"].as_str().unwrap()).unwrap();
    let error = &body["error"];
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert_eq!(error["code"], "stream_unsupported", "{body}");
    assert_eq!(error["param"], "stream", "{body}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("RestApiStreaming=true"), "{message}");
}

#[tokio::test]
async fn a_rest_event_streams_only_where_its_rest_api_streams() {
    let service = common::fake_generator_service(Limits::default(), Duration::ZERO);
    let reply = events::handle_call(&service, sample(), Some(invocation(true))).await;
    let EventReply::Stream(s) = reply else {
        panic!("REST_API_TRANSFER_MODE=STREAM: a stream: true chat must stream");
    };
    let text = s.collect().await;
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // A request that does not ask to stream is one JSON answer, sent streamed by the entry point.
    let plain = with_body(|b| b["stream"] = Value::Bool(false));
    match events::handle_call(&service, plain, Some(invocation(true))).await {
        EventReply::Http(r) => {
            assert_eq!(r.status, 200);
            let body: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(body["object"], "chat.completion", "{body}");
        }
        _ => panic!("stream: false must answer one HTTP response"),
    }

    let refused = events::handle_call(&service, sample(), Some(invocation(false)))
        .await
        .into_buffered()
        .await;
    assert_stream_refused(&refused);
}

/// The body of a Lambda response stream: the prelude (JSON) and what follows the 8 NUL bytes.
fn split_stream(raw: &str) -> (Value, String) {
    let (prelude, body) = raw
        .split_once("\0\0\0\0\0\0\0\0")
        .unwrap_or_else(|| panic!("metadata prelude + 8 NULs expected: {raw:?}"));
    (serde_json::from_str(prelude).unwrap(), body.to_owned())
}

fn smollm2_emulator(env: &[(&str, String)]) -> Option<Emulator> {
    let rie = common::needed_file(".cache/bin/aws-lambda-rie", "scripts/fetch-tools")?;
    let model = common::needed_file(
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "scripts/fetch-models",
    )?;
    let mut all = vec![("MODEL_URI", model.display().to_string())];
    all.extend(env.iter().map(|(k, v)| (*k, v.clone())));
    Some(Emulator::start(&rie, &all))
}

#[test]
fn rest_stream_through_the_real_runtime_api() {
    let env = [("REST_API_TRANSFER_MODE", "STREAM".to_string())];
    let Some(emu) = smollm2_emulator(&env) else {
        return;
    };
    let event = std::fs::read(root().join(SAMPLE)).unwrap();
    let (prelude, events) = split_stream(&emu.invoke_raw(&event));
    assert_eq!(prelude["statusCode"], 200, "{prelude}");
    assert_eq!(prelude["headers"]["content-type"], "text/event-stream");
    assert_eq!(prelude["headers"]["cache-control"], "no-cache");
    assert!(events.ends_with("data: [DONE]\n\n"), "{events}");
    let chunks: Vec<Value> = events
        .split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() > 2, "{events}");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "The capital of Germany is Berlin.");
    // stream_options.include_usage: the last chunk before [DONE] carries the usage.
    assert!(chunks.last().unwrap()["usage"]["completion_tokens"].as_u64() > Some(0));

    // Through a streaming integration every answer is streamed: an error keeps its status and
    // OpenAI body (API Gateway would fail on a buffered envelope here).
    let bad = with_body(|b| b["messages"] = Value::Array(vec![]));
    let (prelude, body) = split_stream(&emu.invoke_raw(bad.to_string().as_bytes()));
    assert_eq!(prelude["statusCode"], 400, "{prelude}");
    assert_eq!(prelude["headers"]["content-type"], "application/json");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
}

#[test]
fn rest_stream_refused_without_the_option() {
    let Some(emu) = smollm2_emulator(&[]) else {
        return;
    };
    let event = std::fs::read(root().join(SAMPLE)).unwrap();
    assert_stream_refused(&emu.invoke(&event));
}
