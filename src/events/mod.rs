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

use std::time::Instant;

use serde_json::Value;

use crate::service::{CallOptions, Service, SseStream, Streaming};

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

/// An event's answer: one JSON document, or (Function URLs only) server-sent events for Lambda
/// response streaming, to be sent after an HTTP metadata prelude (status 200,
/// `content-type: text/event-stream`).
pub enum EventReply {
    Buffered(Value),
    Stream(SseStream),
}

/// Why each source cannot stream, for the 400 a `stream: true` request gets there.
const NO_STREAM_APIGW: &str = "API Gateway buffers Lambda responses; stream through a Lambda \
    Function URL with InvokeMode RESPONSE_STREAM, or `lambda-inference serve`";
const NO_STREAM_DIRECT: &str = "a direct invoke returns one JSON document; stream through a \
    Lambda Function URL with InvokeMode RESPONSE_STREAM, or `lambda-inference serve`";

/// Answers one Lambda event of any supported shape for a caller that buffers (the CLI's
/// `invoke`, tests): a Function URL stream comes back as one response whose body is the whole
/// event stream. Never fails: errors are responses.
pub async fn handle(service: &Service, event: Value) -> Value {
    match handle_call(service, event, None).await {
        EventReply::Buffered(v) => v,
        EventReply::Stream(s) => http::encode_sse(s.collect().await),
    }
}

/// Answers one Lambda event; `deadline` is the invocation's (from the Lambda context), so that
/// generation stops in time. Function URL events may answer with a stream.
pub async fn handle_call(service: &Service, event: Value, deadline: Option<Instant>) -> EventReply {
    let source = detect(&event);
    tracing::debug!(?source, "event");
    let opts = |streaming| CallOptions {
        deadline,
        streaming,
    };
    match source {
        // A Function URL may be configured BUFFERED or RESPONSE_STREAM, which the event does not
        // say: a client asking for stream=true is taken to have deployed the latter.
        Source::FunctionUrl => http::handle_v2(service, &event, &opts(Streaming::Supported)).await,
        Source::HttpApiV2 => {
            http::handle_v2(
                service,
                &event,
                &opts(Streaming::Unsupported(NO_STREAM_APIGW)),
            )
            .await
        }
        Source::RestApiV1 => {
            http::handle_v1(
                service,
                &event,
                &opts(Streaming::Unsupported(NO_STREAM_APIGW)),
            )
            .await
        }
        Source::Sqs => EventReply::Buffered(sqs::handle(service, &event).await),
        Source::Direct => EventReply::Buffered(
            direct::handle(
                service,
                event,
                &opts(Streaming::Unsupported(NO_STREAM_DIRECT)),
            )
            .await,
        ),
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
