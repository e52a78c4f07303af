//! HTTP events: API Gateway HTTP API (payload format 2.0), Lambda Function URLs (the same 2.0
//! shape) and API Gateway REST API proxy integrations (payload format 1.0).
//!
//! Owns: finding method, path and body in each shape (base64 bodies, stage prefixes, query
//! strings) and writing `{statusCode, headers, body, isBase64Encoded}` back. Must not validate
//! request bodies, route, or run inference: that is the service's job, so the same request gets
//! the same answer whatever door it came through.

use base64::Engine as _;
use serde_json::{json, Value};

use super::EventReply;
use crate::api::{ApiResponse, Owner};
use crate::error::{ApiError, ErrorKind};
use crate::service::{ApiRequest, CallOptions, Method, Reply, Service};

/// An HTTP answer before it is written in an event's shape: what [`encode`] turns into the
/// `{statusCode, headers, body}` envelope of a buffered reply, and what the entry point sends as
/// the metadata prelude + body of a streamed one (Function URLs, REST API STREAM), without reading
/// an envelope back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    /// Lowercase names, as every HTTP door writes them.
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: String,
}

impl HttpReply {
    /// A JSON answer (every non-streamed response, errors included).
    pub fn json(res: &ApiResponse) -> HttpReply {
        HttpReply {
            status: res.status,
            headers: vec![("content-type", "application/json")],
            body: res.body.to_string(),
        }
    }

    /// A whole event stream as one answer (for callers that cannot stream: the CLI's `invoke`,
    /// tests); the body is exactly what a streaming client would have received.
    pub fn sse(body: String) -> HttpReply {
        HttpReply {
            status: SSE_STATUS,
            headers: SSE_HEADERS.to_vec(),
            body,
        }
    }

    /// The response shape every API Gateway flavour and Function URLs accept. The body is always
    /// text, never base64: API Gateway would otherwise need binary media types configured.
    pub fn to_envelope(&self) -> Value {
        let headers: serde_json::Map<String, Value> = self
            .headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect();
        json!({
            "statusCode": self.status,
            "headers": headers,
            "body": self.body,
            "isBase64Encoded": false,
        })
    }
}

/// The head of a streamed generation, the one definition for every door that streams: Lambda
/// response streaming's metadata prelude (Function URLs, REST API STREAM), the CLI's whole-stream
/// answer ([`HttpReply::sse`]) and `serve`. `no-cache`: a proxy must pass events on as they come.
pub const SSE_STATUS: u16 = 200;
/// See [`SSE_STATUS`].
pub const SSE_HEADERS: [(&str, &str); 2] = [
    ("content-type", SSE_CONTENT_TYPE),
    ("cache-control", "no-cache"),
];
/// The content type of a streamed generation.
pub const SSE_CONTENT_TYPE: &str = "text/event-stream";

/// Answers an HTTP API v2 or Function URL event, for `owner` (the caller's API key, when
/// [`super::auth`] checked one).
pub async fn handle_v2(
    service: &Service,
    event: &Value,
    opts: &CallOptions,
    owner: Option<&Owner>,
) -> EventReply {
    match decode_v2(event) {
        Ok(req) => reply(service.handle_for(req, opts, owner).await),
        Err(e) => EventReply::Http(HttpReply::json(&e.into())),
    }
}

/// Answers a REST API v1 proxy event, for `owner` (as [`handle_v2`]).
pub async fn handle_v1(
    service: &Service,
    event: &Value,
    opts: &CallOptions,
    owner: Option<&Owner>,
) -> EventReply {
    match decode_v1(event) {
        Ok(req) => reply(service.handle_for(req, opts, owner).await),
        Err(e) => EventReply::Http(HttpReply::json(&e.into())),
    }
}

fn reply(r: Reply) -> EventReply {
    match r {
        Reply::Full(r) => EventReply::Http(HttpReply::json(&r)),
        Reply::Stream(s) => EventReply::Stream(s),
    }
}

/// Payload format 2.0 into a request.
pub fn decode_v2(event: &Value) -> Result<ApiRequest, ApiError> {
    let ctx = &event["requestContext"];
    let method = ctx["http"]["method"]
        .as_str()
        .ok_or_else(|| malformed("requestContext.http.method"))?;
    // `rawPath` is what the client sent; `requestContext.http.path` is the same (both carry the
    // stage), kept as a fallback for trimmed-down test events.
    let raw_path = event["rawPath"]
        .as_str()
        .or_else(|| ctx["http"]["path"].as_str())
        .ok_or_else(|| malformed("rawPath"))?;
    let path = strip_stage(without_query(raw_path), ctx["stage"].as_str());
    Ok(ApiRequest {
        method: Method::parse(method),
        path: path.to_owned(),
        body: body_bytes(event)?,
    })
}

/// Payload format 1.0 (REST API proxy) into a request.
pub fn decode_v1(event: &Value) -> Result<ApiRequest, ApiError> {
    let method = event["httpMethod"]
        .as_str()
        .ok_or_else(|| malformed("httpMethod"))?;
    // Unlike 2.0's rawPath, v1's top-level `path` never carries the stage (only
    // `requestContext.path` does), so nothing is stripped here.
    let path = event["path"].as_str().ok_or_else(|| malformed("path"))?;
    Ok(ApiRequest {
        method: Method::parse(method),
        path: without_query(path).to_owned(),
        body: body_bytes(event)?,
    })
}

/// A JSON answer as the buffered envelope ([`HttpReply::to_envelope`]).
pub fn encode(res: &ApiResponse) -> Value {
    HttpReply::json(res).to_envelope()
}

/// API Gateway never puts the query string in the path, but test events and proxies sometimes
/// do; routing must not see it either way.
fn without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// An HTTP API invoked through a named stage (not `$default`) reports `rawPath` with the stage in
/// front: `/prod/v1/embeddings`. Through a custom domain mapping the prefix is absent, so it is
/// stripped only when present.
fn strip_stage<'a>(path: &'a str, stage: Option<&str>) -> &'a str {
    let Some(stage) = stage.filter(|s| !s.is_empty() && *s != "$default") else {
        return path;
    };
    match path.strip_prefix('/').and_then(|p| p.strip_prefix(stage)) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

/// The body bytes, base64-decoded when API Gateway says so. `body` is a string in real events;
/// an object in a hand-written test event is taken as the JSON it spells.
fn body_bytes(event: &Value) -> Result<Vec<u8>, ApiError> {
    let b64 = event["isBase64Encoded"].as_bool().unwrap_or(false);
    match &event["body"] {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if b64 => base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| {
                ApiError::new(
                    ErrorKind::InvalidJson,
                    format!(
                        "the event says isBase64Encoded, but its body is not valid base64: {e}"
                    ),
                )
            }),
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        other => Ok(other.to_string().into_bytes()),
    }
}

fn malformed(field: &str) -> ApiError {
    ApiError::new(
        ErrorKind::InvalidValue,
        format!("malformed HTTP event: {field} is missing or not a string"),
    )
    .with_code("invalid_event")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_a_named_stage_only_when_present() {
        assert_eq!(
            strip_stage("/prod/v1/embeddings", Some("prod")),
            "/v1/embeddings"
        );
        assert_eq!(strip_stage("/prod", Some("prod")), "/");
        assert_eq!(
            strip_stage("/v1/embeddings", Some("prod")),
            "/v1/embeddings"
        );
        assert_eq!(strip_stage("/production/x", Some("prod")), "/production/x");
        assert_eq!(strip_stage("/v1/models", Some("$default")), "/v1/models");
        assert_eq!(strip_stage("/v1/models", None), "/v1/models");
    }

    #[test]
    fn decodes_v2_with_stage_query_and_base64() {
        let ev = json!({
            "version": "2.0",
            "rawPath": "/prod/v1/embeddings",
            "rawQueryString": "a=1",
            "requestContext": {"http": {"method": "POST"}, "stage": "prod"},
            "body": base64::engine::general_purpose::STANDARD.encode(br#"{"input":"x"}"#),
            "isBase64Encoded": true
        });
        let req = decode_v2(&ev).unwrap();
        assert_eq!(req.method, Method::Post);
        assert_eq!(req.path, "/v1/embeddings");
        assert_eq!(req.body, br#"{"input":"x"}"#);
    }

    #[test]
    fn decodes_v1_and_refuses_bad_base64() {
        let ev = json!({"httpMethod": "GET", "path": "/health?x=1", "requestContext": {"stage": "prod"}});
        let req = decode_v1(&ev).unwrap();
        assert_eq!((req.method, req.path.as_str()), (Method::Get, "/health"));
        assert!(req.body.is_empty());
        let bad = json!({"httpMethod": "POST", "path": "/v1/embeddings", "body": "%%%", "isBase64Encoded": true});
        let e = decode_v1(&bad).unwrap_err();
        assert_eq!(e.status(), 400);
        let missing = json!({"version": "2.0", "requestContext": {"http": {}}});
        assert_eq!(decode_v2(&missing).unwrap_err().status(), 400);
    }

    #[test]
    fn encodes_the_http_response_shape() {
        let out = encode(&ApiResponse::ok(json!({"a": 1})));
        assert_eq!(out["statusCode"], 200);
        assert_eq!(out["headers"]["content-type"], "application/json");
        assert_eq!(out["body"], r#"{"a":1}"#);
        assert_eq!(out["isBase64Encoded"], false);
    }
}
