//! Event adapters: decode every Lambda event shape this function accepts into a service
//! [`ApiRequest`], and encode the [`ApiResponse`](crate::service::ApiResponse) back into the shape
//! that event source expects.
//!
//! One module per source: [`http`] (API Gateway HTTP API v2, Function URLs, REST API v1 proxy) and
//! [`direct`] (`aws lambda invoke`, `sam local invoke`, the CLI) and [`sqs`] (job batches, answered
//! with a partial batch response).
//!
//! Adapters only convert. They must not import candle, run inference or call AWS, and every
//! failure becomes a response in the event's own shape: never a panic and never a Rust `Err`,
//! because a Lambda-level error reaches an API Gateway client as an opaque 502.
//!
//! Events are read as `serde_json::Value` rather than `aws_lambda_events` types: the three HTTP
//! shapes share the few fields we need (method, path, body, isBase64Encoded), hand-written test and
//! `sam local` events often omit fields the typed structs require, and a missing field must become a
//! 400 in the right shape rather than a deserialization failure before any adapter could answer.
//!
//! [`ApiRequest`]: crate::service::ApiRequest

pub mod direct;
pub mod http;
pub mod sqs;

use serde_json::Value;

use crate::service::Service;

/// The event sources [`handle`] tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// API Gateway HTTP API, payload format 2.0.
    HttpApiV2,
    /// Lambda Function URL (payload format 2.0, `requestContext.domainName` has `.lambda-url.`).
    FunctionUrl,
    /// API Gateway REST API proxy integration (payload format 1.0); ALB events share the shape.
    RestApiV1,
    /// An SQS batch (`Records[*].eventSource == "aws:sqs"`).
    Sqs,
    /// Anything else: a direct invoke whose payload is the request body (or `{path, body}`).
    Direct,
}

/// Tells the event source from the event's fields. Anything not recognised as an AWS event is a
/// direct invoke; that adapter answers shapes it does not understand with a 400.
pub fn detect(event: &Value) -> Source {
    let Some(obj) = event.as_object() else {
        return Source::Direct;
    };
    if let Some(records) = obj.get("Records").and_then(Value::as_array) {
        if records
            .iter()
            .any(|r| r.get("eventSource").and_then(Value::as_str) == Some("aws:sqs"))
        {
            return Source::Sqs;
        }
    }
    let ctx = obj.get("requestContext");
    let is_v2 = obj.get("version").and_then(Value::as_str) == Some("2.0")
        || ctx
            .and_then(|c| c.get("http"))
            .is_some_and(Value::is_object);
    if is_v2 {
        let domain = ctx
            .and_then(|c| c.get("domainName"))
            .and_then(Value::as_str)
            .unwrap_or("");
        return if domain.contains(".lambda-url.") {
            Source::FunctionUrl
        } else {
            Source::HttpApiV2
        };
    }
    if obj.contains_key("httpMethod") && (ctx.is_some() || obj.contains_key("resource")) {
        return Source::RestApiV1;
    }
    Source::Direct
}

/// Answers one Lambda event of any supported shape. Never fails: errors are responses.
pub async fn handle(service: &Service, event: Value) -> Value {
    let source = detect(&event);
    tracing::debug!(?source, "event");
    match source {
        Source::HttpApiV2 | Source::FunctionUrl => http::handle_v2(service, &event).await,
        Source::RestApiV1 => http::handle_v1(service, &event).await,
        Source::Sqs => sqs::handle(service, &event).await,
        Source::Direct => direct::handle(service, event).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn detects_each_source() {
        let v2 = json!({"version": "2.0", "rawPath": "/health",
            "requestContext": {"http": {"method": "GET"}, "domainName": "abc.execute-api.us-east-1.amazonaws.com"}});
        assert_eq!(detect(&v2), Source::HttpApiV2);
        let url = json!({"version": "2.0", "rawPath": "/health",
            "requestContext": {"http": {"method": "GET"}, "domainName": "abc.lambda-url.us-east-1.on.aws"}});
        assert_eq!(detect(&url), Source::FunctionUrl);
        let v1 =
            json!({"httpMethod": "GET", "path": "/health", "requestContext": {"stage": "prod"}});
        assert_eq!(detect(&v1), Source::RestApiV1);
        let sqs = json!({"Records": [{"messageId": "m1", "eventSource": "aws:sqs", "body": "{}"}]});
        assert_eq!(detect(&sqs), Source::Sqs);
        assert_eq!(detect(&json!({"input": "hi"})), Source::Direct);
        assert_eq!(detect(&json!({"path": "/health"})), Source::Direct);
        assert_eq!(detect(&json!("hi")), Source::Direct);
        assert_eq!(detect(&json!({"Records": []})), Source::Direct);
    }
}
