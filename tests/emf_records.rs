//! The CloudWatch Embedded Metric Format records the function prints, checked against the EMF
//! specification (https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html)
//! and against `metrics::RECORDS`, the table template.yaml's alarms are checked against
//! (tests/template_ops.rs): one embeddings invoke (API Gateway), one chat invoke (API Gateway) and
//! one streamed chat (Function URL: the record comes after the last event), one SQS job batch,
//! the cold-start record and the init-error record.
//!
//! The requests run through `events::handle_call` inside the meter exactly as `bootstrap` runs
//! them (src/main.rs), on the fake engines and a FAKE result store (tests/common).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lambda_inference::app::{cold_start_record, ColdStart, InitReport};
use lambda_inference::events::{self, EventReply, Invocation};
use lambda_inference::jobs::JobPorts;
use lambda_inference::metrics::{self, Invoke, RECORDS};
use lambda_inference::service::{meter, Limits, Service};
use serde_json::Value;

use common::{events_dir, fake_generator_service, fake_service, FakeResultStore};

/// CloudWatch's units (PutMetricData `StandardUnit`), the only ones EMF accepts.
const UNITS: &[&str] = &[
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Kilobits",
    "Megabits",
    "Gigabits",
    "Terabits",
    "Percent",
    "Count",
    "Bytes/Second",
    "Kilobytes/Second",
    "Megabytes/Second",
    "Gigabytes/Second",
    "Terabytes/Second",
    "Bits/Second",
    "Kilobits/Second",
    "Megabits/Second",
    "Gigabits/Second",
    "Terabits/Second",
    "Count/Second",
    "None",
];

/// Checks one printed line against the EMF specification and the metrics table; returns the
/// record.
fn check_emf(line: &str) -> Value {
    assert!(!line.contains('\n'), "one record, one line: {line}");
    let r: Value = serde_json::from_str(line).expect("an EMF record is a JSON object");
    let root = r.as_object().expect("the root is an object");
    let aws = root["_aws"].as_object().expect("_aws is an object");
    let ts = aws["Timestamp"]
        .as_u64()
        .expect("_aws.Timestamp: integer ms");
    assert!(
        ts > 1_600_000_000_000,
        "Timestamp in ms since the epoch: {ts}"
    );
    let directives = aws["CloudWatchMetrics"]
        .as_array()
        .expect("_aws.CloudWatchMetrics is an array");
    assert!(!directives.is_empty(), "{line}");
    let event = root["event"].as_str().expect("event names the record");
    let table = RECORDS
        .iter()
        .find(|(e, _)| *e == event)
        .unwrap_or_else(|| panic!("record {event} is not in metrics::RECORDS"))
        .1;
    for d in directives {
        let ns = d["Namespace"].as_str().expect("Namespace is a string");
        assert!(
            !ns.is_empty() && ns.len() <= 255 && ns == metrics::NAMESPACE,
            "{ns}"
        );
        let dims = d["Dimensions"]
            .as_array()
            .expect("Dimensions: array of arrays");
        for set in dims {
            let set = set.as_array().expect("each dimension set is an array");
            assert!(set.len() <= 30, "at most 30 dimensions per set");
            for key in set {
                let key = key.as_str().expect("dimension names are strings");
                let value = root
                    .get(key)
                    .unwrap_or_else(|| panic!("dimension {key} is not a member of {line}"));
                let value = value.as_str().expect("dimension values are strings");
                assert!(!value.is_empty() && value.len() <= 1024, "{key}={value}");
            }
        }
        let dims: Vec<Vec<&str>> = dims
            .iter()
            .map(|s| {
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k.as_str().unwrap())
                    .collect()
            })
            .collect();
        let metrics = d["Metrics"].as_array().expect("Metrics is an array");
        assert!(!metrics.is_empty() && metrics.len() <= 100);
        for m in metrics {
            let name = m["Name"].as_str().expect("Metrics[].Name is a string");
            assert!(!name.is_empty() && name.len() <= 255);
            match &root.get(name) {
                Some(Value::Number(_)) => {}
                Some(Value::Array(a)) => {
                    assert!(!a.is_empty() && a.len() <= 100, "{name}: 1 to 100 values");
                    assert!(a.iter().all(Value::is_number), "{name}: numbers only");
                }
                other => panic!("metric {name} must be a number member, is {other:?}"),
            }
            let unit = m["Unit"].as_str().expect("Unit given");
            assert!(UNITS.contains(&unit), "{name}: unit {unit}");
            // The table agrees: this metric, this unit, these dimension sets.
            assert!(
                table.iter().any(|t| {
                    t.metrics.contains(&(name, unit))
                        && dims.iter().all(|s| t.dimensions.iter().any(|ts| ts == s))
                }),
                "{event}: {name} ({unit}) with {dims:?} is not in metrics::RECORDS"
            );
        }
    }
    r
}

fn load(name: &str) -> Value {
    let p = events_dir().join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// Runs `event` as bootstrap does and returns the one record the invoke printed (after draining
/// a stream, as Lambda would send it).
async fn invoke(service: &Service, mut event: Value) -> Value {
    // The samples were recorded long ago: an API Gateway request that old is past the gateway's
    // 29 s, and would stop at once (a deadline stop, see `api_gateway_deadline_stop_is_counted`).
    if event["requestContext"]["timeEpoch"].is_u64() {
        event["requestContext"]["timeEpoch"] = metrics::unix_ms().into();
    }
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let received = Instant::now();
    let source = events::detect(&event);
    let m = metrics::request_meter(
        Invoke {
            function: "stack-api".into(),
            request_id: "c6af9ac6-7b61-11e6-9a41-93e812345678".into(),
            source: source.name(),
            model: service.meta().id.clone(),
            received,
        },
        move |line| sink.lock().unwrap().push(line.to_owned()),
    );
    let inv = Invocation {
        deadline: received + Duration::from_secs(60),
        received,
        url_streams: true,
        rest_streams: false,
    };
    let reply = meter::scope(m.clone(), events::handle_call(service, event, Some(inv))).await;
    drop(m);
    if let EventReply::Stream(s) = reply {
        assert!(
            lines.lock().unwrap().is_empty(),
            "a stream's record waits for its end"
        );
        let body = s.collect().await;
        assert!(body.ends_with("data: [DONE]\n\n"));
        // The generation thread lets go of the meter right after its last send.
        for _ in 0..200 {
            if !lines.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let lines = lines.lock().unwrap();
    assert_eq!(lines.len(), 1, "one record per invoke: {lines:?}");
    check_emf(&lines[0])
}

fn names(r: &Value) -> Vec<String> {
    r["_aws"]["CloudWatchMetrics"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["Metrics"].as_array().unwrap().iter())
        .map(|m| m["Name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn embeddings_invoke_record() {
    let r = invoke(&fake_service(), load("apigw-v2-embeddings.json")).await;
    assert_eq!(r["event"], "request");
    assert_eq!(r["Route"], "/v1/embeddings");
    assert_eq!(
        (r["Status"].as_u64(), r["StatusClass"].as_str()),
        (Some(200), Some("2xx"))
    );
    assert_eq!(r["FunctionName"], "stack-api");
    assert_eq!(r["requestId"], "c6af9ac6-7b61-11e6-9a41-93e812345678");
    assert_eq!(
        (r["source"].as_str(), r["model"].as_str()),
        (Some("http-api"), Some("fake-embedder"))
    );
    assert!(r["InputTokens"].as_u64().unwrap() > 0);
    assert_eq!(r["OutputTokens"], 0);
    assert!(r["TokensPerSecond"].as_f64().unwrap() > 0.0);
    assert_eq!(
        (r["Requests"].as_u64(), r["DeadlineStops"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(r.get("Jobs").is_none() && !names(&r).contains(&"Jobs".to_owned()));
}

#[tokio::test]
async fn chat_invoke_records_buffered_and_streamed() {
    let service = fake_generator_service(Limits::default(), Duration::ZERO);
    let r = invoke(&service, load("apigw-v2-chat.json")).await;
    assert_eq!(
        (r["Route"].as_str(), r["Status"].as_u64()),
        (Some("/v1/chat/completions"), Some(200))
    );
    assert!(r["InputTokens"].as_u64().unwrap() > 0);
    assert!(r["OutputTokens"].as_u64().unwrap() > 0);
    assert!(r["TokensPerSecond"].as_f64().unwrap() > 0.0);
    assert_eq!(r["model"], "fake-generator");

    let s = invoke(&service, load("function-url-chat-stream.json")).await;
    assert_eq!(
        (s["Route"].as_str(), s["source"].as_str()),
        (Some("/v1/chat/completions"), Some("function-url"))
    );
    assert!(
        s["OutputTokens"].as_u64().unwrap() > 0,
        "counted after the stream: {s}"
    );

    // The same chat on the embedder: a 400, counted as such, no tokens.
    let e = invoke(&fake_service(), load("apigw-v2-chat.json")).await;
    assert_eq!(
        (e["Status"].as_u64(), e["StatusClass"].as_str()),
        (Some(400), Some("4xx"))
    );
    assert!(!names(&e).contains(&"InputTokens".to_owned()));
}

#[tokio::test]
async fn api_gateway_deadline_stop_is_counted() {
    let service = fake_generator_service(Limits::default(), Duration::ZERO);
    let mut event = load("apigw-v2-chat.json");
    // Sent 40 s ago: API Gateway has already given up on it.
    event["requestContext"]["timeEpoch"] = (metrics::unix_ms() - 40_000).into();
    event["requestContext"]["time"] = Value::Null;
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let received = Instant::now();
    let m = metrics::request_meter(
        Invoke {
            function: "stack-api".into(),
            request_id: "r".into(),
            source: "http-api",
            model: "fake-generator".into(),
            received,
        },
        move |line| sink.lock().unwrap().push(line.to_owned()),
    );
    let inv = Invocation {
        deadline: received + Duration::from_secs(60),
        received,
        url_streams: false,
        rest_streams: false,
    };
    meter::scope(m.clone(), events::handle_call(&service, event, Some(inv))).await;
    drop(m);
    let r = check_emf(&lines.lock().unwrap()[0]);
    // No token came before the deadline: 503 `deadline_not_started`, counted once.
    assert_eq!(
        (r["DeadlineStops"].as_u64(), r["Status"].as_u64()),
        (Some(1), Some(503))
    );
}

#[tokio::test]
async fn sqs_batch_record() {
    let store = Arc::new(FakeResultStore::default());
    let service = fake_service().with_jobs(JobPorts {
        results: Some(store.clone()),
        queue: None,
    });
    let event = load("sqs-embeddings-batch.json");
    let n = event["Records"].as_array().unwrap().len() as u64;
    let r = invoke(&service, event).await;
    assert_eq!(
        (r["Route"].as_str(), r["source"].as_str()),
        (Some("sqs"), Some("sqs"))
    );
    assert_eq!(r["StatusClass"], "2xx");
    assert_eq!(
        (r["Jobs"].as_u64(), r["JobsRetried"].as_u64()),
        (Some(n), Some(0))
    );
    assert_eq!(r["JobsFailed"], 0);
    assert!(r["InputTokens"].as_u64().unwrap() > 0);
    let waits = r["QueueToStartMs"]
        .as_array()
        .expect("one wait per message");
    assert_eq!(waits.len() as u64, n);
    // SentTimestamp in the sample is from 2025: the wait is positive and large.
    assert!(waits.iter().all(|w| w.as_f64().unwrap() > 0.0));
    assert_eq!(store.writes.lock().unwrap().len() as u64, n);
}

#[test]
fn cold_start_and_init_error_records() {
    let cold = cold_start_record(
        &InitReport::default(),
        &ColdStart::default(),
        Some("stack-api"),
        1_764_072_000_000,
    );
    check_emf(&cold.to_string());
    let e = metrics::init_error_record(
        "stack-api",
        "DigestMismatch",
        "wrong digest",
        1_764_072_000_000,
    );
    let e = check_emf(&e.to_string());
    assert_eq!(
        (e["ErrorType"].as_str(), e["InitErrors"].as_u64()),
        (Some("DigestMismatch"), Some(1))
    );
}
