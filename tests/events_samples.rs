//! Every sample in `events/` (the files `sam local invoke -e` and the CLI use) goes through
//! `events::handle` on the fake embedder and must answer 200 in its source's shape, with bodies
//! that match what the request asked for (count, dimensions, encoding, normalization); the chat
//! and completions samples answer the embedder with a clear 400 (wrong kind of model), and 200
//! on the fake generator, a Function URL `stream: true` sample as a whole event stream.

mod common;

use base64::Engine as _;
use lambda_inference::events;
use serde_json::Value;

use common::{events_dir, fake_generator_service, fake_service, FakeEmbedder, DIMS};
use lambda_inference::service::Limits;

/// How a sample's answer is read, told by its file name (`<source>-<case>.json`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Http,
    Direct,
    /// An SQS batch: answered with `batchItemFailures`, results in the (fake) store.
    Sqs,
}

fn shape_of(name: &str) -> Shape {
    if name.starts_with("apigw-v1-")
        || name.starts_with("apigw-v2-")
        || name.starts_with("function-url-")
    {
        Shape::Http
    } else if name.starts_with("direct-") {
        Shape::Direct
    } else if name.starts_with("sqs-") {
        Shape::Sqs
    } else {
        panic!(
            "{name}: no expectation for this event source yet; add one to tests/events_samples.rs"
        )
    }
}

/// The OpenAI request body a sample carries, decoded as the adapters would.
fn request_body(shape: Shape, event: &Value) -> Value {
    match shape {
        Shape::Direct if event.get("path").is_some() => {
            event.get("body").cloned().unwrap_or(Value::Null)
        }
        Shape::Direct => event.clone(),
        Shape::Sqs => Value::Null,
        Shape::Http => match event["body"].as_str() {
            None => Value::Null,
            Some(b) if event["isBase64Encoded"] == true => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .expect("sample body is base64");
                serde_json::from_slice(&bytes).expect("sample body is JSON")
            }
            Some(b) => serde_json::from_str(b).expect("sample body is JSON"),
        },
    }
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// The embedding as floats, whichever `encoding_format` was asked for.
fn floats(name: &str, embedding: &Value) -> Vec<f32> {
    match embedding {
        Value::String(s) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s)
                .unwrap_or_else(|e| panic!("{name}: embedding is not base64: {e}"));
            assert_eq!(
                bytes.len() % 4,
                0,
                "{name}: base64 embedding is not whole f32s"
            );
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_f64().expect("a float") as f32)
            .collect(),
        other => panic!("{name}: embedding is neither floats nor base64: {other}"),
    }
}

fn check_embeddings(name: &str, request: &Value, body: &Value) {
    let inputs: Vec<&str> = match &request["input"] {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a
            .iter()
            .map(|s| s.as_str().expect("string input"))
            .collect(),
        other => panic!("{name}: sample input {other}"),
    };
    let dims = request["dimensions"].as_u64().map_or(DIMS, |d| d as usize);
    let base64 = request["encoding_format"] == "base64";
    assert_eq!(body["object"], "list", "{name}");
    assert_eq!(body["model"], "fake-embedder", "{name}");
    let data = body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: no data: {body}"));
    assert_eq!(data.len(), inputs.len(), "{name}: one embedding per input");
    let tokens: usize = inputs.iter().map(|t| FakeEmbedder::tokens(t)).sum();
    assert_eq!(body["usage"]["prompt_tokens"], tokens, "{name}");
    assert_eq!(body["usage"]["total_tokens"], tokens, "{name}");
    for (i, (item, text)) in data.iter().zip(&inputs).enumerate() {
        assert_eq!(item["object"], "embedding", "{name}");
        assert_eq!(item["index"], i, "{name}");
        assert_eq!(
            item["embedding"].is_string(),
            base64,
            "{name}: encoding_format honoured"
        );
        let v = floats(name, &item["embedding"]);
        assert_eq!(
            v.len(),
            dims,
            "{name}: input {i} has {} dimensions, asked {dims}",
            v.len()
        );
        assert!(
            (norm(&v) - 1.0).abs() < 1e-5,
            "{name}: input {i} norm {}",
            norm(&v)
        );
        // Truncation keeps the leading components and re-normalizes them.
        let full = FakeEmbedder::vector(text);
        let head = &full[..dims];
        let scale = norm(head);
        for (got, want) in v.iter().zip(head) {
            assert!(
                (got - want / scale).abs() < 1e-5,
                "{name}: input {i}: {v:?} vs {head:?}"
            );
        }
    }
}

/// Samples for a generator's routes (`*-chat*`, `*-completions*`).
fn is_generation(name: &str) -> bool {
    name.contains("-chat") || name.contains("-completions")
}

fn check_body(name: &str, request: &Value, body: &Value) {
    if is_generation(name) {
        // On an embedder: the OpenAI error, saying what kind of model the route needs.
        assert_eq!(
            body["error"]["code"], "unsupported_for_model",
            "{name}: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("chat/generation model"),
            "{name}: {body}"
        );
        return;
    }
    assert!(body.get("error").is_none(), "{name}: {body}");
    if name.contains("-embeddings") {
        check_embeddings(name, request, body);
    } else if name.contains("-health") {
        assert_eq!(body["status"], "ok", "{name}");
        assert_eq!(body["model"], "fake-embedder", "{name}");
        assert_eq!(body["dimensions"], DIMS, "{name}");
    } else if name.contains("-models") {
        assert_eq!(body["object"], "list", "{name}");
        assert_eq!(body["data"][0]["id"], "fake-embedder", "{name}");
    } else {
        panic!("{name}: no expectation for this route yet; add one to tests/events_samples.rs");
    }
}

#[tokio::test]
async fn every_sample_event_answers_200_in_its_shape() {
    let service = fake_service();
    let mut files: Vec<_> = std::fs::read_dir(events_dir())
        .expect("events/ exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 7,
        "expected the sample events, found {files:?}"
    );
    for path in files {
        if shape_of(&path.file_name().unwrap().to_string_lossy()) == Shape::Sqs {
            continue; // every_sqs_sample_writes_one_result_per_message
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let event: Value = serde_json::from_slice(&std::fs::read(&path).expect("readable sample"))
            .unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
        let shape = shape_of(&name);
        let request = request_body(shape, &event);
        let out = events::handle(&service, event).await;
        let body = match shape {
            Shape::Http => {
                let status = if is_generation(&name) { 400 } else { 200 };
                assert_eq!(out["statusCode"], status, "{name}: {out}");
                assert_eq!(out["headers"]["content-type"], "application/json", "{name}");
                assert_eq!(out["isBase64Encoded"], false, "{name}");
                let text = out["body"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: body not a string"));
                serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: body not JSON: {e}"))
            }
            Shape::Sqs => unreachable!(),
            Shape::Direct => {
                assert!(
                    out.get("statusCode").is_none(),
                    "{name}: direct answers have no envelope"
                );
                out
            }
        };
        check_body(&name, &request, &body);
    }
}

#[tokio::test]
async fn the_same_request_gets_the_same_answer_through_every_source() {
    let service = fake_service();
    let mut bodies = Vec::new();
    for name in [
        "apigw-v2-embeddings.json",
        "apigw-v1-embeddings.json",
        "function-url-embeddings.json",
    ] {
        let event: Value =
            serde_json::from_slice(&std::fs::read(events_dir().join(name)).unwrap()).unwrap();
        let out = events::handle(&service, event).await;
        bodies.push(serde_json::from_str::<Value>(out["body"].as_str().unwrap()).unwrap());
    }
    let event: Value = serde_json::from_slice(
        &std::fs::read(events_dir().join("direct-embeddings.json")).unwrap(),
    )
    .unwrap();
    bodies.push(events::handle(&service, event).await);
    // Compared as f32s: the HTTP bodies went through JSON text, and serde_json's default float
    // parser may be one f64 ulp off (it has no float_roundtrip here); the f32s are exact.
    let as_f32 = |b: &Value| -> (Value, Vec<Vec<f32>>) {
        let data = b["data"].as_array().expect("data");
        let vs = data
            .iter()
            .map(|d| floats("roundtrip", &d["embedding"]))
            .collect();
        (b["usage"].clone(), vs)
    };
    let first = as_f32(&bodies[0]);
    for b in &bodies[1..] {
        assert_eq!(as_f32(b), first);
    }
}

/// SQS samples run on the fake embedder with a FAKE in-memory result store: no message is left
/// for redelivery, and each one has a result: the request's embeddings, or (for a body that is not
/// a job) a failed result with a clear error.
#[tokio::test]
async fn every_sqs_sample_writes_one_result_per_message() {
    use lambda_inference::jobs::JobPorts;
    use std::sync::Arc;
    let mut seen = 0;
    for entry in std::fs::read_dir(events_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("sqs-") {
            continue;
        }
        seen += 1;
        let store = Arc::new(common::FakeResultStore::default());
        let service = fake_service().with_jobs(JobPorts {
            results: Some(store.clone()),
            queue: None,
        });
        let event: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let out = events::handle(&service, event.clone()).await;
        assert_eq!(
            out["batchItemFailures"],
            serde_json::json!([]),
            "{name}: {out}"
        );
        let records = event["Records"].as_array().unwrap();
        let objects = store.objects.lock().unwrap();
        assert_eq!(
            objects.len(),
            records.len(),
            "{name}: one result per message"
        );
        for r in records {
            let body = r["body"].as_str().unwrap();
            match serde_json::from_str::<Value>(body) {
                Ok(job) => {
                    let id = job["id"].as_str().or(r["messageId"].as_str()).unwrap();
                    let result: Value = serde_json::from_slice(&objects[id]).unwrap();
                    assert_eq!(result["status"], "succeeded", "{name}/{id}: {result}");
                    check_embeddings(&name, &job["request"], &result["result"]);
                }
                Err(_) => {
                    let id = r["messageId"].as_str().unwrap();
                    let result: Value = serde_json::from_slice(&objects[id]).unwrap();
                    assert_eq!(result["status"], "failed", "{name}/{id}");
                    assert_eq!(result["error"]["code"], "invalid_json", "{name}/{id}");
                }
            }
        }
    }
    assert!(seen >= 2, "the SQS samples are in events/");
}

#[tokio::test]
async fn chat_and_completion_samples_answer_on_a_generator() {
    let service = fake_generator_service(Limits::default(), std::time::Duration::ZERO);
    let mut seen = 0;
    for entry in std::fs::read_dir(events_dir()).expect("events/ exists") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !is_generation(&name) {
            continue;
        }
        seen += 1;
        let event: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let shape = shape_of(&name);
        let request = request_body(shape, &event);
        let out = events::handle(&service, event).await;
        let chat = request.get("messages").is_some();
        if request["stream"] == true {
            // Buffered caller: the whole event stream as one HTTP response.
            assert_eq!(out["statusCode"], 200, "{name}: {out}");
            assert_eq!(
                out["headers"]["content-type"], "text/event-stream",
                "{name}"
            );
            let text = out["body"].as_str().unwrap();
            assert!(text.ends_with("data: [DONE]\n\n"), "{name}: {text}");
            let first: Value = serde_json::from_str(
                text.split("\n\n")
                    .next()
                    .unwrap()
                    .strip_prefix("data: ")
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(first["object"], "chat.completion.chunk", "{name}");
            continue;
        }
        let body: Value = match shape {
            Shape::Http => {
                assert_eq!(out["statusCode"], 200, "{name}: {out}");
                serde_json::from_str(out["body"].as_str().unwrap()).unwrap()
            }
            Shape::Sqs => unreachable!("generation samples are HTTP or direct"),
            Shape::Direct => out,
        };
        assert!(body.get("error").is_none(), "{name}: {body}");
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        assert_eq!(body["object"], object, "{name}");
        assert!(
            body["usage"]["completion_tokens"].as_u64().unwrap() > 0,
            "{name}"
        );
        if let Some(max) = request["max_tokens"].as_u64() {
            assert!(
                body["usage"]["completion_tokens"].as_u64().unwrap() <= max,
                "{name}"
            );
        }
    }
    assert!(seen >= 4, "the chat/completions samples");
}
