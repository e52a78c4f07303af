//! Event adapters: decode every Lambda event shape this function accepts into a service
//! [`ApiRequest`], and encode the [`ApiResponse`](crate::service::ApiResponse) back into the shape
//! that event source expects.
//!
//! One module per source: [`http`] (API Gateway HTTP API v2, Function URLs, REST API v1 proxy) and
//! [`direct`] (`aws lambda invoke`, `sam local invoke`, the CLI) and [`sqs`] (job batches, answered
//! with a partial batch response). [`auth`] decides API keys on API Gateway events, before their
//! adapter runs.
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

pub mod auth;
pub mod direct;
pub mod http;
pub mod sqs;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::service::{CallOptions, Service, SseStream, Streaming};
use crate::worker;

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

impl Source {
    /// A short stable name, for logs and metrics records.
    pub fn name(self) -> &'static str {
        match self {
            Source::HttpApiV2 => "http-api",
            Source::FunctionUrl => "function-url",
            Source::RestApiV1 => "rest-api",
            Source::Sqs => "sqs",
            Source::Direct => "direct",
        }
    }
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

/// An event's answer: one JSON document (direct invokes, SQS batches), an HTTP answer (the HTTP
/// sources: its envelope when buffered, its prelude and body when the door streams), or (Function
/// URLs and REST API STREAM only) server-sent events for Lambda response streaming, to be sent
/// after the metadata prelude [`http::SSE_STATUS`] + [`http::SSE_HEADERS`].
pub enum EventReply {
    Buffered(Value),
    Http(http::HttpReply),
    Stream(SseStream),
}

impl EventReply {
    /// The JSON a caller that buffers gets: an HTTP answer as its envelope, a stream collected
    /// into one answer whose body is the whole event stream.
    pub async fn into_buffered(self) -> Value {
        match self {
            EventReply::Buffered(v) => v,
            EventReply::Http(r) => r.to_envelope(),
            EventReply::Stream(s) => http::HttpReply::sse(s.collect().await).to_envelope(),
        }
    }
}

/// What the entry point knows about the invocation an event arrived with.
#[derive(Debug, Clone, Copy)]
pub struct Invocation {
    /// When the Lambda invocation is cut off (its context's deadline).
    pub deadline: Instant,
    /// When the invocation arrived (before any wait for the model): `deadline - received` is
    /// what a whole invocation of this function gives, the budget SQS jobs are planned against.
    pub received: Instant,
    /// Whether this function's URL has InvokeMode RESPONSE_STREAM (FUNCTION_URL_INVOKE_MODE):
    /// only then can a Function URL request stream.
    pub url_streams: bool,
    /// Whether the REST API in front of this function invokes it with response streaming
    /// (REST_API_TRANSFER_MODE=STREAM: integration responseTransferMode STREAM): only then can a
    /// REST API request stream, and API Gateway's 29 s no longer bounds it.
    pub rest_streams: bool,
}

/// API Gateway closes an integration after 30 s (HTTP API's maximum, REST API's default for a
/// buffered integration) and answers 503/504 itself: generation for its events stops this long
/// after the request arrived, so the partial answer (finish_reason "length") reaches the client
/// instead of a gateway error. A streamed REST API integration is bounded by the invocation
/// instead (up to 15 minutes, the function's timeout).
pub const API_GATEWAY_TIMEOUT: Duration = Duration::from_secs(29);

/// The deadline of an API Gateway request: the gateway's own (request time + 29 s) or the
/// invocation's, whichever is earlier. The request time is `requestContext.timeEpoch` (HTTP API)
/// or `requestTimeEpoch` (REST API), in ms; when absent, the invocation's arrival stands in.
fn gateway_deadline(event: &Value, inv: &Invocation) -> Instant {
    let ctx = &event["requestContext"];
    let epoch_ms = ctx["timeEpoch"]
        .as_u64()
        .or_else(|| ctx["requestTimeEpoch"].as_u64());
    let arrived = epoch_ms
        .and_then(|ms| {
            let sent = UNIX_EPOCH + Duration::from_millis(ms);
            // How long ago the request reached the gateway (0 if the clocks disagree).
            let ago = SystemTime::now().duration_since(sent).unwrap_or_default();
            inv.received.checked_sub(ago.min(API_GATEWAY_TIMEOUT))
        })
        .unwrap_or(inv.received);
    (arrived + API_GATEWAY_TIMEOUT).min(inv.deadline)
}

/// Why each source cannot stream, for the 400 a `stream: true` request gets there.
const NO_STREAM_HTTP_API: &str = "an API Gateway HTTP API buffers Lambda responses; stream \
    through the REST API with response streaming (template parameter RestApiStreaming=true), \
    a Lambda Function URL with InvokeMode RESPONSE_STREAM, or `lambda-inference serve`";
const NO_STREAM_REST_BUFFERED: &str = "this REST API integration buffers Lambda responses \
    (REST_API_TRANSFER_MODE is BUFFERED); deploy with the template parameter \
    RestApiStreaming=true (integration responseTransferMode STREAM) to stream, or use a Lambda \
    Function URL with InvokeMode RESPONSE_STREAM";
const NO_STREAM_DIRECT: &str = "a direct invoke returns one JSON document; stream through a \
    Lambda Function URL with InvokeMode RESPONSE_STREAM, or `lambda-inference serve`";
const NO_STREAM_URL_BUFFERED: &str = "this function's URL has InvokeMode BUFFERED \
    (FUNCTION_URL_INVOKE_MODE); deploy it with RESPONSE_STREAM to stream";

/// Answers one Lambda event of any supported shape for a caller that buffers (the CLI's
/// `invoke`, tests): a Function URL or REST API stream comes back as one response whose body is
/// the whole event stream. Never fails: errors are responses. API Gateway events must carry one
/// of the service's API keys when it has some ([`auth`]).
pub async fn handle(service: &Service, event: Value) -> Value {
    handle_call(service, event, None)
        .await
        .into_buffered()
        .await
}

/// Answers one Lambda event within `invocation` (from the Lambda context: `None` for callers
/// without one, the CLI), so that generation stops in time and SQS jobs are planned. Function
/// URL and REST API events may answer with a stream where their door streams (always without an
/// invocation: the caller collects it).
pub async fn handle_call(
    service: &Service,
    event: Value,
    invocation: Option<Invocation>,
) -> EventReply {
    let source = detect(&event);
    tracing::debug!(?source, "event");
    let deadline = invocation.map(|i| i.deadline);
    let opts = |streaming, deadline| CallOptions {
        deadline,
        streaming,
        budget: None,
    };
    let gateway = |event: &Value| invocation.map(|i| gateway_deadline(event, &i));
    match source {
        // Without an invocation (the CLI) a stream is collected into one answer.
        Source::FunctionUrl => {
            let streaming = match invocation {
                Some(i) if !i.url_streams => Streaming::Unsupported(NO_STREAM_URL_BUFFERED),
                _ => Streaming::Supported,
            };
            // IAM-authenticated by Lambda (AuthType AWS_IAM): no key to check.
            http::handle_v2(service, &event, &opts(streaming, deadline), None).await
        }
        Source::HttpApiV2 => {
            let owner = match auth::authorize(service.api_keys(), &event) {
                Ok(owner) => owner,
                Err(refused) => return EventReply::Http(refused),
            };
            let o = opts(Streaming::Unsupported(NO_STREAM_HTTP_API), gateway(&event));
            http::handle_v2(service, &event, &o, owner.as_ref()).await
        }
        Source::RestApiV1 => {
            let owner = match auth::authorize(service.api_keys(), &event) {
                Ok(owner) => owner,
                Err(refused) => return EventReply::Http(refused),
            };
            let o = match invocation {
                Some(i) if !i.rest_streams => opts(
                    Streaming::Unsupported(NO_STREAM_REST_BUFFERED),
                    gateway(&event),
                ),
                // A streamed integration is not cut at 29 s: the invocation's deadline bounds it.
                _ => opts(Streaming::Supported, deadline),
            };
            http::handle_v1(service, &event, &o, owner.as_ref()).await
        }
        Source::Sqs => {
            let plan = invocation.map(|i| worker::Plan {
                deadline: i.deadline,
                budget: i.deadline.saturating_duration_since(i.received),
            });
            EventReply::Buffered(sqs::handle(service, &event, plan).await)
        }
        Source::Direct => EventReply::Buffered(
            direct::handle(
                service,
                event,
                &opts(Streaming::Unsupported(NO_STREAM_DIRECT), deadline),
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
