//! Jobs against real AWS-compatible servers: a moto server on loopback for S3 (results) and SQS
//! (the jobs queue), through the function's own S3/SQS ports (`jobs::aws`). The engine is the
//! fake embedder (the worker's logic, not the model, is under test here).
//!
//! 1. The mixed batch (2 malformed, 1 engine panic, 1 result write failing once, 6 ordinary):
//!    only the transient one is redelivered; afterwards all 10 have exactly one result object in S3.
//! 2. POST /v1/jobs through an API Gateway event -> a message in the moto queue -> the worker
//!    consumes it (the SQS event built from the received messages) -> GET /v1/jobs/{id} answers
//!    the result.
//! 3. Create-only writes: a second write of a finished job is refused by S3 (412), not applied.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lambda_inference::config::S3Location;
use lambda_inference::events;
use lambda_inference::jobs::aws::{S3ResultStore, SqsJobQueue};
use lambda_inference::jobs::{JobId, JobPorts, PutOutcome, ResultStore};
use serde_json::{json, Value};

mod common;
use common::s3::{self, Moto};
use common::{failures, FailFirstWrite};

const BUCKET: &str = "job-results";

async fn results_store(moto: &Moto) -> (aws_sdk_s3::Client, S3ResultStore) {
    let client = s3::client(&moto.endpoint());
    client.create_bucket().bucket(BUCKET).send().await.unwrap();
    let store = S3ResultStore::new(
        client.clone(),
        S3Location {
            bucket: BUCKET.into(),
            prefix: "results/".into(),
        },
    );
    (client, store)
}

async fn objects(client: &aws_sdk_s3::Client) -> Vec<String> {
    let out = client
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix("results/")
        .send()
        .await
        .unwrap();
    out.contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect()
}

async fn object(client: &aws_sdk_s3::Client, id: &str) -> Value {
    let o = client
        .get_object()
        .bucket(BUCKET)
        .key(format!("results/{id}.json"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("no result object for {id}: {e}"));
    serde_json::from_slice(&o.body.collect().await.unwrap().into_bytes()).unwrap()
}

#[tokio::test]
async fn mixed_batch_on_moto_s3_one_result_per_job() {
    let Some(moto) = Moto::start() else { return };
    let (client, store) = results_store(&moto).await;
    let store = Arc::new(FailFirstWrite {
        inner: store,
        id: "job-flaky".into(),
        failed: AtomicBool::new(false),
    });
    let service = common::fake_service().with_jobs(JobPorts {
        results: Some(store),
        queue: None,
    });
    let (event, ids) = common::mixed_sqs_batch();

    let out = events::handle(&service, event.clone()).await;
    assert_eq!(failures(&out), vec!["m-6".to_string()], "{out}");
    assert_eq!(objects(&client).await.len(), 9);
    let first: Vec<(String, Value)> = {
        let mut v = Vec::new();
        for id in ids.iter().filter(|id| *id != "job-flaky") {
            v.push((id.clone(), object(&client, id).await));
        }
        v
    };

    // Redelivery of the failed message, then of the whole batch (an expired visibility timeout).
    let records = event["Records"].as_array().unwrap();
    let out = events::handle(&service, json!({"Records": [records[6].clone()]})).await;
    assert_eq!(failures(&out), Vec::<String>::new(), "{out}");
    let out = events::handle(&service, event).await;
    assert_eq!(failures(&out), Vec::<String>::new(), "{out}");

    let mut keys = objects(&client).await;
    keys.sort();
    let mut want: Vec<String> = ids.iter().map(|id| format!("results/{id}.json")).collect();
    want.sort();
    assert_eq!(keys, want, "exactly one object per job");
    for (id, before) in first {
        assert_eq!(object(&client, &id).await, before, "{id} rewritten");
    }
    let mut statuses = Vec::new();
    for id in &ids {
        let r = object(&client, id).await;
        assert_eq!(r["id"], id.as_str());
        statuses.push(r["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(statuses.iter().filter(|s| *s == "succeeded").count(), 7);
    assert_eq!(statuses.iter().filter(|s| *s == "failed").count(), 3);
    assert_eq!(
        object(&client, "job-panic").await["error"]["type"],
        "server_error"
    );
}

#[tokio::test]
async fn s3_refuses_a_second_write_of_a_finished_job() {
    let Some(moto) = Moto::start() else { return };
    let (_, store) = results_store(&moto).await;
    let id = JobId::parse("once").unwrap();
    assert_eq!(store.get(&id).await.unwrap(), None);
    let a = store.put_new(&id, b"{\"v\":1}".to_vec()).await.unwrap();
    let b = store.put_new(&id, b"{\"v\":2}".to_vec()).await.unwrap();
    assert_eq!((a, b), (PutOutcome::Written, PutOutcome::AlreadyExists));
    assert_eq!(store.get(&id).await.unwrap().unwrap(), b"{\"v\":1}");
    assert_eq!(
        store.location(&id),
        format!("s3://{BUCKET}/results/once.json")
    );
}

fn apigw(method: &str, path: &str, body: Option<Value>) -> Value {
    json!({
        "version": "2.0", "routeKey": format!("{method} {path}"), "rawPath": path,
        "rawQueryString": "", "headers": {"content-type": "application/json"},
        "requestContext": {"http": {"method": method, "path": path}, "stage": "$default",
                           "domainName": "abc.execute-api.us-east-1.amazonaws.com"},
        "body": body.map(|b| b.to_string()), "isBase64Encoded": false
    })
}

#[tokio::test]
async fn submit_through_api_consume_from_moto_sqs_then_get_the_result() {
    let Some(moto) = Moto::start() else { return };
    let (_, store) = results_store(&moto).await;
    let sqs = s3::sqs_client(&moto.endpoint());
    let url = sqs
        .create_queue()
        .queue_name("jobs")
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    let service = common::fake_service().with_jobs(JobPorts {
        results: Some(Arc::new(store)),
        queue: Some(Arc::new(SqsJobQueue::new(sqs.clone(), url.clone()))),
    });

    let body = json!({"endpoint": "/v1/embeddings",
                      "request": {"input": ["async one", "async two"], "dimensions": 4}});
    let out = events::handle(&service, apigw("POST", "/v1/jobs", Some(body))).await;
    assert_eq!(out["statusCode"], 202, "{out}");
    let accepted: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    let id = accepted["id"].as_str().unwrap().to_owned();

    let get = apigw("GET", &format!("/v1/jobs/{id}"), None);
    let out = events::handle(&service, get.clone()).await;
    let pending: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(pending["status"], "pending");

    // What SQS delivers to the worker: the received messages as an SQS event.
    let received = sqs
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    let records: Vec<Value> = received
        .messages()
        .iter()
        .map(|m| {
            json!({"messageId": m.message_id().unwrap(), "receiptHandle": m.receipt_handle(),
                   "body": m.body().unwrap(), "attributes": {"ApproximateReceiveCount": "1"},
                   "eventSource": "aws:sqs", "awsRegion": "us-east-1",
                   "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:jobs"})
        })
        .collect();
    assert_eq!(records.len(), 1, "one message in the queue");
    let out = events::handle(&service, json!({ "Records": records })).await;
    assert_eq!(failures(&out), Vec::<String>::new(), "{out}");

    let out = events::handle(&service, get).await;
    assert_eq!(out["statusCode"], 200, "{out}");
    let done: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["id"], id.as_str());
    let data = done["result"]["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 4);
}
