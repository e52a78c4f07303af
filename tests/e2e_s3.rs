//! End to end with the model in S3: the real `bootstrap` under the real Lambda Runtime Interface
//! Emulator, MODEL_URI=s3://... on a moto server on loopback (reached through the standard
//! AWS_ENDPOINT_URL_S3, dummy credentials, path-style addressing), sometimes through a proxy that
//! slows the server down to make the load outlive the init budget.
//!
//! Proves: the model is fetched, verified and served; a load longer than the init budget finishes
//! during the first invoke (and under provisioned concurrency, during init); a failed load is
//! reported with its stable error type, at init and after it.
//!
//! Needs the emulator (scripts/fetch-tools), models/default.gguf (scripts/fetch-models) and
//! moto_server; skips without them, fails under CI=true.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

mod common;
use common::emulator::Emulator;
use common::s3::{block_on, client, s3_env, upload, Fault, FaultProxy, Moto};

/// Emulator, model and moto with the model uploaded as s3://models/minilm.gguf; `None`: skip.
fn setup() -> Option<(PathBuf, Moto, String)> {
    let rie = common::needed_file(".cache/bin/aws-lambda-rie", "scripts/fetch-tools")?;
    let model = common::needed_file("models/default.gguf", "scripts/fetch-models")?;
    let moto = Moto::start()?;
    let bytes = std::fs::read(model).unwrap();
    block_on(upload(
        &client(&moto.endpoint()),
        "models",
        "minilm.gguf",
        &bytes,
    ));
    Some((rie, moto, lambda_inference::artifacts::sha256_hex(&bytes)))
}

fn env_for(endpoint: &str, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = s3_env(endpoint);
    env.push(("MODEL_URI", "s3://models/minilm.gguf".into()));
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    env
}

const EMBED: &[u8] = br#"{"input": "a model from S3"}"#;

#[test]
fn model_from_s3_is_verified_and_served() {
    let Some((rie, moto, sha)) = setup() else {
        return;
    };
    let emu = Emulator::start(
        &rie,
        &env_for(&moto.endpoint(), &[("MODEL_SHA256", sha.as_str())]),
    );
    let out = emu.invoke(EMBED);
    assert_eq!(
        out["data"][0]["embedding"].as_array().map(Vec::len),
        Some(384),
        "{out}"
    );
    let health = emu.invoke(br#"{"path": "/health"}"#);
    assert_eq!(health["sha256"], sha.as_str(), "{health}");
    assert_eq!(health["source"], "s3://models/minilm.gguf");

    // The cold-start breakdown, as CloudWatch Embedded Metric Format on stdout.
    let rec = emu.cold_start_record();
    let metrics = &rec["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(metrics["Namespace"], "lambda-inference", "{rec}");
    for m in metrics["Metrics"].as_array().unwrap() {
        let name = m["Name"].as_str().unwrap();
        assert!(rec[name].is_number(), "metric {name} has a value: {rec}");
    }
    assert_eq!(rec["sha256"], sha.as_str());
    assert_eq!(rec["continued_into_invoke"], false, "{rec}");
    assert!(rec["fetch_bytes"].as_u64().unwrap() > 1_000_000, "{rec}");
}

/// A server slow enough that the load outlives a 300 ms init budget: init ends, the first invoke
/// awaits the same load and answers; under provisioned concurrency init waits for all of it.
#[test]
fn load_longer_than_the_init_budget_continues_into_the_first_invoke() {
    let Some((rie, moto, sha)) = setup() else {
        return;
    };
    // The one GET waits 1.2 s before it is relayed: the load takes > 1.2 s.
    let slow = FaultProxy::start(moto.port, Fault::Delay(Duration::from_millis(1200)));
    for (init_type, continued) in [("on-demand", true), ("provisioned-concurrency", false)] {
        let emu = Emulator::start(
            &rie,
            &env_for(
                &slow.endpoint(),
                &[
                    ("INIT_BUDGET_MS", "300"),
                    ("AWS_LAMBDA_INITIALIZATION_TYPE", init_type),
                ],
            ),
        );
        let out = emu.invoke(EMBED);
        assert_eq!(
            out["data"][0]["embedding"].as_array().map(Vec::len),
            Some(384),
            "{init_type}: {out}"
        );
        let rec = emu.cold_start_record();
        assert_eq!(
            rec["continued_into_invoke"], continued,
            "{init_type}: {rec}"
        );
        assert_eq!(rec["sha256"], sha.as_str());
        let (waited, load) = (
            rec["init_wait_ms"].as_f64().unwrap(),
            rec["load_ms"].as_f64().unwrap(),
        );
        assert!(
            load > 1200.0,
            "{init_type}: the proxy slowed the load: {rec}"
        );
        if continued {
            assert!(waited < load, "{init_type}: init stopped waiting: {rec}");
        } else {
            assert!(
                waited >= load,
                "{init_type}: init waited for the load: {rec}"
            );
        }
    }
}

/// A load that fails at init is reported with its stable error type (through the Runtime API's
/// init error path); one that fails after the budget answers the invoke with the same type: a
/// Lambda error for direct invokes, a 503 in the event's shape for HTTP events.
#[test]
fn failed_loads_report_their_stable_error_type() {
    let Some((rie, moto, _sha)) = setup() else {
        return;
    };

    let emu = Emulator::start(
        &rie,
        &[
            s3_env(&moto.endpoint()),
            vec![("MODEL_URI", "s3://models/absent.gguf".into())],
        ]
        .concat(),
    );
    let out = emu.invoke(EMBED);
    assert_eq!(out["errorType"], "ModelNotFound", "{out}");
    drop(emu);

    let slow = FaultProxy::start(moto.port, Fault::Delay(Duration::from_millis(300)));
    let wrong = "0".repeat(64);
    let emu = Emulator::start(
        &rie,
        &env_for(
            &slow.endpoint(),
            &[("MODEL_SHA256", wrong.as_str()), ("INIT_BUDGET_MS", "50")],
        ),
    );
    let out = emu.invoke(EMBED);
    assert_eq!(out["errorType"], "DigestMismatch", "{out}");
    assert!(
        out["errorMessage"].as_str().unwrap().contains(&wrong),
        "{out}"
    );
    // A wrong digest cannot heal in this environment: the failure is kept, so the next invokes
    // answer it at once without fetching the model again, and an HTTP event gets it as a 503 in
    // its own shape, not an opaque 502.
    let gets = slow.gets.load(std::sync::atomic::Ordering::SeqCst);
    let event = std::fs::read(common::events_dir().join("apigw-v2-embeddings.json")).unwrap();
    let out = emu.invoke(&event);
    assert_eq!(out["statusCode"], 503, "{out}");
    let body: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "DigestMismatch", "{body}");
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("DigestMismatch: "),
        "the type is said once: {body}"
    );
    let out = emu.invoke(EMBED);
    assert_eq!(out["errorType"], "DigestMismatch", "{out}");
    assert_eq!(
        slow.gets.load(std::sync::atomic::Ordering::SeqCst),
        gets,
        "a permanent failure fetched the model again"
    );
    drop(emu);

    // Through a streaming Function URL the failure keeps its status: 503 in the metadata
    // prelude, the error as the body, not the buffered envelope inside a 200.
    let emu = Emulator::start(
        &rie,
        &[
            s3_env(&moto.endpoint()),
            vec![
                ("MODEL_URI", "s3://models/absent.gguf".into()),
                ("INIT_BUDGET_MS", "0".into()),
                ("FUNCTION_URL_INVOKE_MODE", "RESPONSE_STREAM".into()),
            ],
        ]
        .concat(),
    );
    let url = std::fs::read(common::events_dir().join("function-url-embeddings.json")).unwrap();
    let raw = emu.invoke_raw(&url);
    let (prelude, body) = raw
        .split_once("\0\0\0\0\0\0\0\0")
        .unwrap_or_else(|| panic!("prelude + 8 NULs expected: {raw:?}"));
    let prelude: Value = serde_json::from_str(prelude).unwrap();
    assert_eq!(prelude["statusCode"], 503, "{prelude}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"]["code"], "ModelNotFound", "{body}");
}
