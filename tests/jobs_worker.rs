//! The SQS job worker through the real event handler, on the fake embedder and a FAKE in-memory
//! result store (the S3 store itself is tested against a moto server in tests/jobs_s3.rs).
//!
//! The mixed batch: 2 malformed jobs, 1 that panics inside the engine, 1 whose result write fails
//! once, 6 ordinary. Only the transient one may be redelivered; after the redelivery every job has
//! exactly one result, none lost, none written twice.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lambda_inference::engine::Engine;
use lambda_inference::events;
use lambda_inference::jobs::JobPorts;
use lambda_inference::service::{Limits, Service};
use serde_json::{json, Value};

mod common;
use common::{failures, CountingEmbedder, FailFirstWrite, FakeQueue, FakeResultStore};

fn stored(store: &FakeResultStore, id: &str) -> Value {
    let objects = store.objects.lock().unwrap();
    let bytes = objects
        .get(id)
        .unwrap_or_else(|| panic!("no result for {id}"));
    serde_json::from_slice(bytes).unwrap()
}

#[tokio::test]
async fn mixed_batch_reports_only_the_transient_failure_and_redelivery_completes_it() {
    let store = Arc::new(FailFirstWrite {
        inner: FakeResultStore::default(),
        id: "job-flaky".into(),
        failed: AtomicBool::new(false),
    });
    let service = common::fake_service().with_jobs(JobPorts {
        results: Some(store.clone()),
        queue: None,
    });
    let (event, ids) = common::mixed_sqs_batch();

    let out = events::handle(&service, event.clone()).await;
    assert_eq!(failures(&out), vec!["m-6".to_string()], "{out}");
    assert_eq!(store.inner.writes.lock().unwrap().len(), 9);

    // SQS redelivers the failed message only; then, for good measure, the whole batch again (a
    // visibility timeout that expired): neither recomputes nor rewrites anything finished.
    let records = event["Records"].as_array().unwrap();
    let redelivery = json!({"Records": [records[6].clone()]});
    let out = events::handle(&service, redelivery).await;
    assert_eq!(failures(&out), Vec::<String>::new(), "{out}");
    let before: Vec<Value> = ids.iter().map(|id| stored(&store.inner, id)).collect();
    let out = events::handle(&service, event).await;
    assert_eq!(failures(&out), Vec::<String>::new(), "{out}");

    let writes = store.inner.writes.lock().unwrap().clone();
    assert_eq!(writes.len(), 10, "one write per job: {writes:?}");
    let mut unique = writes.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 10, "no job written twice: {writes:?}");

    let mut succeeded = 0;
    for (id, first) in ids.iter().zip(before) {
        let r = stored(&store.inner, id);
        assert_eq!(r, first, "{id}: result changed on redelivery");
        assert_eq!(r["id"], id.as_str());
        assert_eq!(r["model"], "fake-embedder");
        assert_eq!(r["digest"].as_str().unwrap().len(), 64);
        match r["status"].as_str().unwrap() {
            "succeeded" => {
                succeeded += 1;
                let data = r["result"]["data"].as_array().unwrap();
                assert!(!data.is_empty());
                assert_eq!(data[0]["embedding"].as_array().unwrap().len(), common::DIMS);
            }
            "failed" => {
                let msg = r["error"]["message"].as_str().unwrap();
                assert!(!msg.is_empty(), "{id}: failed without a message");
                assert!(r.get("result").is_none());
            }
            other => panic!("{id}: status {other}"),
        }
    }
    assert_eq!(succeeded, 7);
    assert_eq!(
        stored(&store.inner, "job-panic")["error"]["type"],
        "server_error"
    );
    assert_eq!(
        stored(&store.inner, "msg-bad-json")["error"]["code"],
        "invalid_json"
    );
    assert_eq!(
        stored(&store.inner, "job-no-request")["error"]["param"],
        "request"
    );

    // The shared forward pass gives each job exactly what a synchronous call gives.
    let sync = service
        .embeddings(br#"{"input": ["sentence number 3", "shared batch"]}"#, None)
        .await
        .unwrap();
    assert_eq!(stored(&store.inner, "job-ok-3")["result"], sync);
}

#[tokio::test]
async fn embedding_jobs_of_one_batch_share_one_engine_call() {
    let engine = Arc::new(CountingEmbedder::new());
    let store = Arc::new(FakeResultStore::default());
    let service = Service::new(
        Engine::Embedder(engine.clone()),
        Limits::default(),
        Default::default(),
    )
    .with_jobs(JobPorts {
        results: Some(store.clone()),
        queue: None,
    });
    let records: Vec<Value> = (0..8)
        .map(|i| {
            json!({"messageId": format!("m{i}"), "eventSource": "aws:sqs",
                   "body": json!({"endpoint": "/v1/embeddings",
                                  "request": {"input": format!("text {i}")}}).to_string()})
        })
        .collect();
    let out = events::handle(&service, json!({ "Records": records })).await;
    assert_eq!(failures(&out), Vec::<String>::new());
    assert_eq!(engine.calls(), 1);
    assert_eq!(store.objects.lock().unwrap().len(), 8);
    // Ids default to the messageId.
    assert!(store.objects.lock().unwrap().contains_key("m5"));
}

#[tokio::test]
async fn without_results_uri_nothing_is_acknowledged() {
    let service = common::fake_service();
    let (event, _) = common::mixed_sqs_batch();
    let out = events::handle(&service, event).await;
    assert_eq!(failures(&out).len(), 10);
}

#[tokio::test]
async fn submit_then_worker_then_status_through_the_http_handler() {
    use lambda_inference::service::{ApiRequest, Method};
    let queue = Arc::new(FakeQueue::default());
    let store = Arc::new(FakeResultStore::default());
    let service = common::fake_service().with_jobs(JobPorts {
        results: Some(store.clone()),
        queue: Some(queue.clone()),
    });
    let call = |method: Method, path: &str, body: Value| ApiRequest {
        method,
        path: path.into(),
        body: if body.is_null() {
            vec![]
        } else {
            body.to_string().into_bytes()
        },
    };

    let r = service
        .handle(call(
            Method::Post,
            "/v1/jobs",
            json!({"endpoint": "/v1/embeddings", "request": {"input": "queued text"}}),
        ))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = service
        .handle(call(Method::Get, &format!("/v1/jobs/{id}"), Value::Null))
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("pending"))
    );

    // The worker consumes what was sent, as SQS would deliver it.
    let sent = queue.0.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    let event =
        json!({"Records": [{"messageId": "x1", "eventSource": "aws:sqs", "body": sent[0]}]});
    let out = events::handle(&service, event).await;
    assert_eq!(failures(&out), Vec::<String>::new());
    let r = service
        .handle(call(Method::Get, &format!("/v1/jobs/{id}"), Value::Null))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "succeeded", "{}", r.body);
    assert_eq!(
        r.body["result"]["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .len(),
        common::DIMS
    );

    // The same id again: it already has a result, so it would never run: 409.
    let r = service
        .handle(call(
            Method::Post,
            "/v1/jobs",
            json!({"id": id, "endpoint": "/v1/embeddings", "request": {"input": "again"}}),
        ))
        .await;
    assert_eq!(r.status, 409, "{}", r.body);

    // Refusals: path tricks, unknown endpoint, over SQS's 1 MiB message limit.
    let r = service
        .handle(call(Method::Get, "/v1/jobs/..%2F..%2Fsecret", Value::Null))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = service
        .handle(call(
            Method::Post,
            "/v1/jobs",
            json!({"endpoint": "/v1/models", "request": {}}),
        ))
        .await;
    assert_eq!(
        (r.status, r.body["error"]["param"].as_str()),
        (400, Some("endpoint"))
    );
    let big = "word ".repeat(220_000);
    let r = service
        .handle(call(
            Method::Post,
            "/v1/jobs",
            json!({"endpoint": "/v1/embeddings", "request": {"input": big}}),
        ))
        .await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(queue.0.lock().unwrap().len(), 1, "nothing refused was sent");
}

#[tokio::test]
async fn jobs_routes_say_when_jobs_are_disabled() {
    use lambda_inference::service::{ApiRequest, Method};
    let service = common::fake_service();
    let r = service
        .handle(ApiRequest {
            method: Method::Post,
            path: "/v1/jobs".into(),
            body: br#"{"endpoint": "/v1/embeddings", "request": {"input": "x"}}"#.to_vec(),
        })
        .await;
    assert_eq!(r.status, 404);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("JOBS_QUEUE_URL"));
}

/// Found by tests/fuzz_events.rs: an embedding job sent to a function serving a chat model used
/// to bisect an empty group forever (a stack overflow that killed the environment). It is a
/// failed result naming the model kind, and the batch goes on.
#[tokio::test]
async fn an_embedding_job_on_a_chat_model_fails_alone() {
    let store = Arc::new(FakeResultStore::default());
    let service = common::fake_generator_service(Limits::default(), std::time::Duration::ZERO)
        .with_jobs(JobPorts {
            results: Some(store.clone()),
            queue: None,
        });
    let records: Vec<Value> = ["a", "b"]
        .iter()
        .map(|m| {
            json!({"messageId": m, "eventSource": "aws:sqs",
                   "body": json!({"endpoint": "/v1/embeddings", "request": {"input": "hi"}}).to_string()})
        })
        .collect();
    let out = events::handle(&service, json!({ "Records": records })).await;
    assert_eq!(failures(&out), Vec::<String>::new(), "{out}");
    for id in ["a", "b"] {
        let r = stored(&store, id);
        assert_eq!(r["status"], "failed", "{r}");
        assert_eq!(r["error"]["code"], "unsupported_for_model", "{r}");
    }
}
