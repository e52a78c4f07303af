//! End to end: the real `bootstrap` binary under the real AWS Lambda Runtime Interface Emulator
//! (the `aws-lambda-rie` that ships in the aws-sam-cli wheel; `scripts/fetch-tools` puts it in
//! .cache/bin), speaking the real Lambda Runtime API, serving the real q8_0 model, fed every
//! sample in events/.
//!
//! Needs the emulator and models/default.gguf (`scripts/fetch-models`). Without them the test says
//! so and skips, except under CI=true, where a missing piece fails.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

mod common;
use common::emulator::Emulator;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The emulator with `bootstrap` serving `model` with `memory_mb` (the compute pool follows it).
fn start(rie: &Path, model: &Path, memory_mb: &str, env: &[(&str, String)]) -> Emulator {
    let mut all = vec![
        ("MODEL_URI", model.display().to_string()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory_mb.to_string()),
    ];
    all.extend(env.iter().map(|(k, v)| (*k, v.clone())));
    Emulator::start(rie, &all)
}

#[test]
fn every_sample_event_through_the_real_runtime_api() {
    let Some(rie) = common::needed_file(".cache/bin/aws-lambda-rie", "scripts/fetch-tools") else {
        return;
    };
    let Some(model) = common::needed_file("models/default.gguf", "scripts/fetch-models") else {
        return;
    };
    // Job results go to a moto server on loopback (the SQS samples write there).
    let Some(moto) = common::s3::Moto::start() else {
        return;
    };
    // A client per runtime: a pooled connection must not outlive the runtime that opened it.
    let s3 = || common::s3::client(&moto.endpoint());
    common::s3::block_on(s3().create_bucket().bucket("e2e-results").send()).unwrap();
    let mut env = common::s3::s3_env(&moto.endpoint());
    env.push(("RESULTS_URI", "s3://e2e-results/jobs/".into()));
    let emu = start(&rie, &model, "2048", &env);

    // The first invoke includes the init phase: model mapped, verified, engine built.
    let t = Instant::now();
    let health = emu.invoke(br#"{"path": "/health"}"#);
    eprintln!("first invoke (init + answer): {:?}", t.elapsed());
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["quantization"], "q8_0");
    assert_eq!(health["sha256"].as_str().unwrap().len(), 64);

    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "events/ should hold the samples");
    for f in &files {
        let event: Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        let out = emu.invoke(event.to_string().as_bytes());
        let name = f.file_name().unwrap().to_string_lossy();
        // The default model is an embedder: generation samples get the wrong-kind 400.
        if name.contains("-chat") || name.contains("-completions") {
            let body = if event.get("requestContext").is_some() {
                assert_eq!(out["statusCode"], 400, "{name}: {out}");
                serde_json::from_str(out["body"].as_str().unwrap()).unwrap()
            } else {
                out.clone()
            };
            assert_eq!(
                body["error"]["code"], "unsupported_for_model",
                "{name}: {body}"
            );
            continue;
        }
        if name.starts_with("sqs-") {
            // Every message handled (malformed ones get a failed result and are acknowledged),
            // each with its result object in moto.
            assert_eq!(
                out["batchItemFailures"],
                serde_json::json!([]),
                "{name}: {out}"
            );
            for r in event["Records"].as_array().unwrap() {
                let job: Option<Value> = serde_json::from_str(r["body"].as_str().unwrap()).ok();
                let id = job
                    .as_ref()
                    .and_then(|j| j["id"].as_str())
                    .or(r["messageId"].as_str())
                    .unwrap();
                let bytes = common::s3::block_on(async {
                    let obj = s3()
                        .get_object()
                        .bucket("e2e-results")
                        .key(format!("jobs/{id}.json"))
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("{name}: no result for {id}: {e}"));
                    obj.body.collect().await.unwrap().into_bytes()
                });
                let result: Value = serde_json::from_slice(&bytes).unwrap();
                let want = if job.is_some() { "succeeded" } else { "failed" };
                assert_eq!(result["status"], want, "{name}/{id}: {result}");
                if job.is_some() {
                    assert_eq!(result["model"], "all-MiniLM-L6-v2");
                    assert!(!result["result"]["data"].as_array().unwrap().is_empty());
                }
            }
        } else if event.get("requestContext").is_some() {
            assert_eq!(out["statusCode"], 200, "{name}: {out}");
            let body: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
            assert!(body.get("error").is_none(), "{name}: {body}");
            if let Some(data) = body["data"].as_array() {
                assert!(!data.is_empty(), "{name}");
            }
        } else {
            assert!(out.get("error").is_none(), "{name}: {out}");
        }
    }

    // Bad input answers a clear error through the same path; the function keeps serving.
    let bad = emu.invoke(br#"{"input": []}"#);
    assert_eq!(bad["error"]["code"], "invalid_value", "{bad}");
    // JSON that Lambda delivers but serde_json cannot hold as a value (a lone surrogate escape,
    // nesting deeper than 128): a 400 body, never a Lambda error named after a Rust type.
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    for payload in [r#"{"input": "x\ud800y"}"#.to_owned(), deep] {
        let (head, body) = emu.invoke_http(payload.as_bytes());
        assert!(
            !head.contains("X-Amz-Function-Error"),
            "a function error: {head}\n{body}"
        );
        let out: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(out["error"]["code"], "invalid_json", "{out}");
        assert!(!body.contains("lambda_runtime"), "{body}");
    }
    let again = emu.invoke(br#"{"input": "still serving"}"#);
    assert_eq!(again["data"][0]["embedding"].as_array().unwrap().len(), 384);
    let health = emu.invoke(br#"{"path": "/health"}"#);
    assert_eq!(health["state"], "warm");

    // The per-invoke EMF records as the real bootstrap prints them under the real Runtime API:
    // one for an HTTP embeddings request and one for an SQS batch, each with the Lambda request
    // id, a metric directive and the route as a dimension (tests/emf_records.rs checks the
    // format against the EMF specification at handler level).
    let http = emu.record("request", |r| {
        r["Route"] == "/v1/embeddings" && r["Status"] == 200 && r["StatusClass"] == "2xx"
    });
    let sqs = emu.record("request", |r| r["Route"] == "sqs");
    for r in [&http, &sqs] {
        let id = r["requestId"].as_str().unwrap_or_default();
        assert!(!id.is_empty() && id != "bench", "{r}");
        let directive = &r["_aws"]["CloudWatchMetrics"][0];
        assert!(
            directive["Namespace"]
                .as_str()
                .is_some_and(|n| !n.is_empty()),
            "{r}"
        );
        assert!(directive["Dimensions"].to_string().contains("Route"), "{r}");
        assert_eq!(r["Requests"], 1, "{r}");
    }
    assert!(http["InputTokens"].as_u64().unwrap() > 0, "{http}");
    assert!(sqs["Jobs"].as_u64().unwrap() > 0, "{sqs}");
}

/// SmolLM2 under the real bootstrap and emulator: a direct chat invoke answers a chat.completion,
/// and a Function URL `stream: true` event goes out as Lambda response streaming: the HTTP
/// metadata prelude, eight NUL bytes, then server-sent events ending with `data: [DONE]`.
#[test]
fn chat_and_response_streaming_through_the_real_runtime_api() {
    let Some(rie) = common::needed_file(".cache/bin/aws-lambda-rie", "scripts/fetch-tools") else {
        return;
    };
    let Some(model) = common::needed_file(
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "scripts/fetch-models",
    ) else {
        return;
    };
    // 3538 MB = two vCPUs' share: two compute threads. A Function URL of InvokeMode BUFFERED
    // (FUNCTION_URL_INVOKE_MODE's default) cannot stream: stream=true is a 400 there.
    let emu = start(&rie, &model, "3538", &[]);
    let stream = std::fs::read(root().join("events/function-url-chat-stream.json")).unwrap();
    let out = emu.invoke(&stream);
    assert_eq!(out["statusCode"], 400, "{out}");
    assert!(
        out["body"].as_str().unwrap().contains("stream_unsupported"),
        "{out}"
    );
    drop(emu);
    let env = [("FUNCTION_URL_INVOKE_MODE", "RESPONSE_STREAM".to_string())];
    let emu = start(&rie, &model, "3538", &env);
    let chat = std::fs::read(root().join("events/direct-chat.json")).unwrap();
    let out = emu.invoke(&chat);
    assert_eq!(out["object"], "chat.completion", "{out}");
    assert_eq!(
        out["choices"][0]["message"]["content"],
        "The capital of Germany is Berlin."
    );
    assert_eq!(out["choices"][0]["finish_reason"], "stop");

    let raw = emu.invoke_raw(&stream);
    let (prelude, events) = raw
        .split_once("\0\0\0\0\0\0\0\0")
        .expect("prelude + 8 NULs");
    let prelude: Value = serde_json::from_str(prelude).unwrap();
    assert_eq!(prelude["statusCode"], 200, "{prelude}");
    assert_eq!(prelude["headers"]["content-type"], "text/event-stream");
    assert!(events.ends_with("data: [DONE]\n\n"), "{events}");
    let text: String = events
        .split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "The capital of Germany is Berlin.");

    // API Gateway cannot stream: a clear 400 in the HTTP shape.
    let mut ev: Value =
        serde_json::from_slice(&std::fs::read(root().join("events/apigw-v2-chat.json")).unwrap())
            .unwrap();
    let mut body: Value = serde_json::from_str(ev["body"].as_str().unwrap()).unwrap();
    body["stream"] = Value::Bool(true);
    ev["body"] = Value::String(body.to_string());
    let out = emu.invoke(ev.to_string().as_bytes());
    assert_eq!(out["statusCode"], 400, "{out}");
    assert!(out["body"].as_str().unwrap().contains("stream_unsupported"));
}

/// FUNCTION_URL_INVOKE_MODE=RESPONSE_STREAM (what the template sets for its streaming URL): every
/// Function URL answer, not only `stream: true` ones, goes out through response streaming, with
/// the HTTP status and headers in the metadata prelude, so the client sees the real status and
/// body rather than the buffered envelope as text.
#[test]
fn function_url_answers_stream_when_its_url_streams() {
    let Some(rie) = common::needed_file(".cache/bin/aws-lambda-rie", "scripts/fetch-tools") else {
        return;
    };
    let Some(model) = common::needed_file("models/default.gguf", "scripts/fetch-models") else {
        return;
    };
    let env = [("FUNCTION_URL_INVOKE_MODE", "RESPONSE_STREAM".to_string())];
    let emu = start(&rie, &model, "2048", &env);
    let split = |raw: &str| -> (Value, String) {
        let (prelude, body) = raw
            .split_once("\0\0\0\0\0\0\0\0")
            .unwrap_or_else(|| panic!("prelude + 8 NULs expected: {raw:?}"));
        (serde_json::from_str(prelude).unwrap(), body.to_owned())
    };

    let event = std::fs::read(root().join("events/function-url-embeddings.json")).unwrap();
    let (prelude, body) = split(&emu.invoke_raw(&event));
    assert_eq!(prelude["statusCode"], 200, "{prelude}");
    assert_eq!(prelude["headers"]["content-type"], "application/json");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 384);

    // An error keeps its status through the prelude.
    let mut bad: Value = serde_json::from_slice(&event).unwrap();
    bad["body"] = Value::String("{\"input\": []}".into());
    bad["isBase64Encoded"] = Value::Bool(false);
    let (prelude, body) = split(&emu.invoke_raw(bad.to_string().as_bytes()));
    assert_eq!(prelude["statusCode"], 400, "{prelude}");
    assert!(body.contains("invalid_value"), "{body}");

    // Other sources are unaffected: API Gateway still gets the buffered envelope.
    let apigw = std::fs::read(root().join("events/apigw-v2-embeddings.json")).unwrap();
    assert_eq!(emu.invoke(&apigw)["statusCode"], 200);
}
