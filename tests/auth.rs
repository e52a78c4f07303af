//! API keys (ApiAuth=KEY) through the real event handler, on a FAKE embedder that counts engine
//! calls and a FAKE in-memory result store and queue: API Gateway events without an accepted key
//! get OpenAI's 401 before any work, Function URL and direct invokes are not asked for one, and a
//! job's result can be read with the key that submitted it only.

use std::sync::Arc;

use lambda_inference::engine::Engine;
use lambda_inference::events;
use lambda_inference::jobs::JobPorts;
use lambda_inference::service::{ApiKeys, Limits, Service};
use serde_json::{json, Value};

mod common;
use common::{failures, CountingEmbedder, FakeQueue, FakeResultStore};

const KEY_A: &str = "AaAaAaAaAaAaAaAaAaAaAaAaAaAaAaAaAaAaAaAaAaAaAaAa";
const KEY_B: &str = "BbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBbBb";
/// A well-formed key that belongs to another deployment.
const FOREIGN: &str = "ZzZzZzZzZzZzZzZzZzZzZzZzZzZzZzZzZzZzZzZzZzZzZzZz";

struct Setup {
    service: Service,
    engine: Arc<CountingEmbedder>,
    store: Arc<FakeResultStore>,
    queue: Arc<FakeQueue>,
}

fn setup(keys: Option<ApiKeys>) -> Setup {
    let engine = Arc::new(CountingEmbedder::new());
    let store = Arc::new(FakeResultStore::default());
    let queue = Arc::new(FakeQueue::default());
    let service = Service::new(
        Engine::Embedder(engine.clone()),
        Limits::default(),
        Default::default(),
    )
    .with_jobs(JobPorts {
        results: Some(store.clone()),
        queue: Some(queue.clone()),
    });
    let service = match keys {
        Some(k) => service.with_api_keys(k),
        None => service,
    };
    Setup {
        service,
        engine,
        store,
        queue,
    }
}

fn keyed() -> Setup {
    setup(Some(ApiKeys::new([KEY_A, KEY_B])))
}

/// An HTTP API (payload 2.0) event, as API Gateway sends it (header names lowercased).
fn v2(method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> Value {
    let mut headers = json!({"content-type": "application/json"});
    if let Some(k) = key {
        headers["authorization"] = json!(format!("Bearer {k}"));
    }
    json!({
        "version": "2.0", "rawPath": path, "headers": headers,
        "requestContext": {"http": {"method": method, "path": path},
                           "domainName": "r3pmxmplak.execute-api.us-east-1.amazonaws.com",
                           "stage": "$default"},
        "body": body.map(|b| b.to_string()), "isBase64Encoded": false
    })
}

/// A REST API (payload 1.0) event, header names as the client wrote them.
fn v1(method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> Value {
    let mut headers = json!({"Content-Type": "application/json"});
    let mut multi = json!({"Content-Type": ["application/json"]});
    if let Some(k) = key {
        headers["Authorization"] = json!(format!("Bearer {k}"));
        multi["Authorization"] = json!([format!("Bearer {k}")]);
    }
    json!({
        "resource": "/{proxy+}", "path": path, "httpMethod": method,
        "headers": headers, "multiValueHeaders": multi,
        "requestContext": {"stage": "prod"},
        "body": body.map(|b| b.to_string()), "isBase64Encoded": false
    })
}

fn body(out: &Value) -> Value {
    serde_json::from_str(out["body"].as_str().expect("an HTTP response")).unwrap()
}

fn embed_body() -> Value {
    json!({"input": ["one", "two"]})
}

#[tokio::test]
async fn api_gateway_requests_without_an_accepted_key_get_401_before_any_work() {
    let s = keyed();
    let mut broken = v2("POST", "/v1/embeddings", None, None);
    broken["body"] = json!("{not json");
    // The first: not even the body is looked at (a broken one gets 401, not 400).
    let events = [
        broken,
        v2("POST", "/v1/embeddings", None, Some(embed_body())),
        v2("POST", "/v1/embeddings", Some(FOREIGN), Some(embed_body())),
        v2("POST", "/v1/embeddings", Some(""), Some(embed_body())),
        v2("GET", "/health", None, None),
        v2("GET", "/v1/models", Some(FOREIGN), None),
        v1("POST", "/v1/embeddings", None, Some(embed_body())),
        v1("POST", "/v1/embeddings", Some(FOREIGN), Some(embed_body())),
        v1(
            "POST",
            "/v1/jobs",
            None,
            Some(json!({"endpoint": "/v1/embeddings",
                                                  "request": {"input": "x"}})),
        ),
    ];
    for event in events {
        let out = events::handle(&s.service, event.clone()).await;
        assert_eq!(out["statusCode"], 401, "{event}\n{out}");
        assert_eq!(out["headers"]["www-authenticate"], "Bearer");
        let b = body(&out);
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["code"], "invalid_api_key");
        assert_eq!(b["error"]["param"], Value::Null);
        assert!(b["error"]["message"].as_str().unwrap().contains("API key"));
    }
    assert_eq!(s.engine.calls(), 0, "no engine call");
    assert!(s.queue.0.lock().unwrap().is_empty(), "nothing queued");

    // With an accepted key, the same requests are served (both keys, both payload formats).
    for event in [
        v2("POST", "/v1/embeddings", Some(KEY_A), Some(embed_body())),
        v1("POST", "/v1/embeddings", Some(KEY_B), Some(embed_body())),
        v2("GET", "/health", Some(KEY_B), None),
    ] {
        let out = events::handle(&s.service, event.clone()).await;
        assert_eq!(out["statusCode"], 200, "{event}\n{out}");
    }
    assert_eq!(s.engine.calls(), 2);
}

#[tokio::test]
async fn function_url_and_direct_invokes_are_not_asked_for_a_key() {
    let s = keyed();
    // A Function URL event: Lambda checked its SigV4 signature, which is what its Authorization
    // header holds.
    let mut url = v2("POST", "/v1/embeddings", None, Some(embed_body()));
    url["requestContext"]["domainName"] = json!("abc.lambda-url.us-east-1.on.aws");
    url["headers"]["authorization"] =
        json!("AWS4-HMAC-SHA256 Credential=AKIA.../lambda/aws4_request, Signature=abc");
    let out = events::handle(&s.service, url).await;
    assert_eq!(out["statusCode"], 200, "{out}");
    let out = events::handle(&s.service, json!({"input": "direct"})).await;
    assert_eq!(out["object"], "list", "{out}");
    assert_eq!(s.engine.calls(), 2);
}

#[tokio::test]
async fn without_keys_nothing_is_checked() {
    let s = setup(None);
    let out = events::handle(&s.service, v2("GET", "/health", None, None)).await;
    assert_eq!(out["statusCode"], 200, "{out}");
    let out = events::handle(&s.service, v1("GET", "/health", Some(FOREIGN), None)).await;
    assert_eq!(out["statusCode"], 200, "{out}");
}

/// The worker runs what was queued, as SQS would deliver it.
async fn run_queued(s: &Setup) {
    let sent: Vec<String> = s.queue.0.lock().unwrap().drain(..).collect();
    let records: Vec<Value> = sent
        .iter()
        .enumerate()
        .map(|(i, b)| json!({"messageId": format!("m{i}"), "eventSource": "aws:sqs", "body": b}))
        .collect();
    let out = events::handle(&s.service, json!({ "Records": records })).await;
    assert_eq!(failures(&out), Vec::<String>::new(), "{out}");
}

#[tokio::test]
async fn a_job_result_is_readable_with_the_key_that_submitted_it_only() {
    let s = keyed();
    let job = json!({"endpoint": "/v1/embeddings", "request": {"input": "private text"}});
    let out = events::handle(&s.service, v2("POST", "/v1/jobs", Some(KEY_A), Some(job))).await;
    assert_eq!(out["statusCode"], 202, "{out}");
    let id = body(&out)["id"].as_str().unwrap().to_owned();
    // An id nobody can guess: job- and 128 random bits.
    assert_eq!(id.len(), 4 + 32, "{id}");

    // The queued message names the owner (a digest), never the key.
    let sent = s.queue.0.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert!(!sent[0].contains(KEY_A), "{}", sent[0]);
    let owner = serde_json::from_str::<Value>(&sent[0]).unwrap()["owner"]
        .as_str()
        .expect("an owner in the message")
        .to_owned();
    assert_eq!(owner.len(), 32);
    run_queued(&s).await;

    // Stored under RESULTS_URI/<owner>/<id>.json, nowhere else.
    let keys: Vec<String> = s.store.objects.lock().unwrap().keys().cloned().collect();
    assert_eq!(keys, vec![format!("{owner}/{id}")]);

    let get = |key: Option<&'static str>| v2("GET", &format!("/v1/jobs/{id}"), key, None);
    let a = body(&events::handle(&s.service, get(Some(KEY_A))).await);
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(a["id"], id.as_str());
    // Caller B knows the id, and reads nothing: pending, exactly as for an unknown id.
    let b = events::handle(&s.service, get(Some(KEY_B))).await;
    assert_eq!(b["statusCode"], 200);
    let b = body(&b);
    assert_eq!(b["status"], "pending", "{b}");
    assert!(b.get("result").is_none());
    // Without a key, or with another deployment's: 401.
    for key in [None, Some(FOREIGN)] {
        let out = events::handle(&s.service, get(key)).await;
        assert_eq!(out["statusCode"], 401, "{out}");
    }
    // REST API events are scoped the same way.
    let out = events::handle(
        &s.service,
        v1("GET", &format!("/v1/jobs/{id}"), Some(KEY_A), None),
    );
    assert_eq!(body(&out.await)["status"], "succeeded");

    // B may use the same id for its own job: it is B's, stored apart, and A's is untouched.
    let same_id = json!({"id": id, "endpoint": "/v1/embeddings", "request": {"input": "b's"}});
    let out = events::handle(
        &s.service,
        v2("POST", "/v1/jobs", Some(KEY_B), Some(same_id)),
    )
    .await;
    assert_eq!(out["statusCode"], 202, "{out}");
    // ...while A submitting it again is the 409 of an id that already has a result.
    let again = json!({"id": id, "endpoint": "/v1/embeddings", "request": {"input": "again"}});
    let out = events::handle(&s.service, v2("POST", "/v1/jobs", Some(KEY_A), Some(again))).await;
    assert_eq!(out["statusCode"], 409, "{out}");
    run_queued(&s).await;
    assert_eq!(s.store.objects.lock().unwrap().len(), 2);
    let b = body(&events::handle(&s.service, get(Some(KEY_B))).await);
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_ne!(b["result"], a["result"]);

    // A client cannot name an owner itself (it could write into another caller's prefix).
    let forged = json!({"owner": owner, "endpoint": "/v1/embeddings", "request": {"input": "x"}});
    let out = events::handle(
        &s.service,
        v2("POST", "/v1/jobs", Some(KEY_B), Some(forged)),
    )
    .await;
    assert_eq!(out["statusCode"], 400, "{out}");
    assert_eq!(body(&out)["error"]["param"], "owner");
}

#[tokio::test]
async fn jobs_without_keys_keep_the_plain_result_key() {
    let s = setup(None);
    let job = json!({"id": "plain-1", "endpoint": "/v1/embeddings", "request": {"input": "x"}});
    let out = events::handle(&s.service, v2("POST", "/v1/jobs", None, Some(job))).await;
    assert_eq!(out["statusCode"], 202, "{out}");
    assert!(!s.queue.0.lock().unwrap()[0].contains("owner"));
    run_queued(&s).await;
    let keys: Vec<String> = s.store.objects.lock().unwrap().keys().cloned().collect();
    assert_eq!(keys, vec!["plain-1".to_owned()]);
    let out = events::handle(&s.service, v2("GET", "/v1/jobs/plain-1", None, None)).await;
    assert_eq!(body(&out)["status"], "succeeded");
}
