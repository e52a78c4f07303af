//! SQS batches: each record's body is a job; the answer is the partial batch response
//! `{"batchItemFailures": [{"itemIdentifier": messageId}, ...]}` listing only the messages SQS must
//! redeliver (the event source mapping has ReportBatchItemFailures on).
//!
//! Only converts: the job logic (what is transient, idempotent writes, shared forward passes) is in
//! [`crate::jobs::worker`]. Must not call AWS itself or touch candle.

use serde_json::{json, Value};

use crate::service::Service;
use crate::worker::{self, Message, Plan};

/// Reads the records of an SQS event. A record without a messageId cannot be reported back; it is
/// still run (its result goes under a digest id) and logged.
pub fn decode(event: &Value) -> Vec<Message> {
    event["Records"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let message_id = r
                .get("messageId")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    tracing::warn!(record = i, "SQS record without messageId");
                    format!("record-{i}")
                });
            let body = match r.get("body") {
                Some(Value::String(s)) => s.clone(),
                // Hand-written events sometimes embed the body as JSON instead of a string.
                Some(v) => v.to_string(),
                None => String::new(),
            };
            let sent_timestamp_ms = r["attributes"]["SentTimestamp"]
                .as_str()
                .and_then(|s| s.parse().ok());
            Message {
                message_id,
                body,
                sent_timestamp_ms,
            }
        })
        .collect()
}

/// Runs the batch within `plan` (the invocation's deadline; `None`: no deadline, the CLI) and
/// answers with the partial batch response.
pub async fn handle(service: &Service, event: &Value, plan: Option<Plan>) -> Value {
    let messages = decode(event);
    let report = worker::run_batch(service, service.jobs(), messages, plan).await;
    let failures: Vec<Value> = report
        .failures
        .iter()
        .map(|id| json!({"itemIdentifier": id}))
        .collect();
    json!({ "batchItemFailures": failures })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_bodies_ids_and_timestamps() {
        let e = json!({"Records": [
            {"messageId": "m1", "eventSource": "aws:sqs", "body": "{\"a\":1}",
             "attributes": {"SentTimestamp": "1700000000000"}},
            {"eventSource": "aws:sqs", "body": {"endpoint": "/v1/embeddings"}},
        ]});
        let m = decode(&e);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].message_id, "m1");
        assert_eq!(m[0].body, "{\"a\":1}");
        assert_eq!(m[0].sent_timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(m[1].message_id, "record-1");
        assert!(m[1].body.contains("/v1/embeddings"));
    }
}
