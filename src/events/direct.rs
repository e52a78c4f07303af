//! Direct invokes (`aws lambda invoke`, `sam local invoke -e`, the CLI's `invoke`): the payload is
//! the OpenAI request body itself, routed by its fields (`input` -> embeddings, `messages` -> chat
//! completions, `prompt` -> completions, `query` -> rerank), or an explicit
//! `{"path", "method"?, "body"?}`.
//!
//! Owns: telling the route from the payload and answering with the OpenAI response body itself
//! (an error as `{"error": {...}}`): there is no HTTP envelope, so the status is not returned.
//! Must not validate the body beyond picking the route, and must not run inference.

use serde_json::{json, Value};

use crate::api::routes;
use crate::error::{ApiError, ErrorKind};
use crate::service::{ApiRequest, CallOptions, Method, Reply, Service};

/// What the 400 for an unrecognised payload lists, so a caller can fix it without the docs.
fn accepted() -> String {
    let (e, c, p, r) = (
        routes::EMBEDDINGS,
        routes::CHAT_COMPLETIONS,
        routes::COMPLETIONS,
        routes::RERANK,
    );
    format!(
        "a direct invoke takes an OpenAI request body as a JSON object ({{\"input\": ...}} for \
         {e}, {{\"messages\": ...}} for {c}, {{\"prompt\": ...}} for {p}, {{\"query\": ...}} \
         for {r}) or {{\"path\": \"/v1/...\", \"method\"?: \"GET\"|\"POST\", \"body\"?: \
         {{...}}}}"
    )
}

/// Answers a direct invoke with the response body itself. `opts` never allows streaming here
/// (the answer is one JSON document).
pub async fn handle(service: &Service, payload: Value, opts: &CallOptions) -> Value {
    match decode(payload) {
        Ok(req) => match service.handle_call(req, opts).await {
            Reply::Full(r) => r.body,
            Reply::Stream(s) => {
                // Unreachable with the options events::handle_call passes; kept total anyway.
                json!({"stream": s.collect().await})
            }
        },
        Err(e) => e.to_body(),
    }
}

/// The payload into a request.
pub fn decode(payload: Value) -> Result<ApiRequest, ApiError> {
    let Value::Object(mut obj) = payload else {
        let what = json_type(&payload);
        return Err(refuse(format!("the payload is {what}; {}", accepted())));
    };
    if let Some(path) = obj.remove("path") {
        let Value::String(path) = path else {
            return Err(
                refuse(format!("\"path\" must be a string; {}", accepted())).with_param("path")
            );
        };
        let body = match obj.remove("body") {
            None | Some(Value::Null) => None,
            // A string body is the raw request text, as API Gateway would pass it.
            Some(Value::String(s)) => Some(s.into_bytes()),
            Some(other) => Some(other.to_string().into_bytes()),
        };
        let method = match obj.remove("method") {
            None | Some(Value::Null) if body.is_some() => Method::Post,
            None | Some(Value::Null) => Method::Get,
            Some(Value::String(m)) => Method::parse(&m),
            Some(_) => {
                return Err(
                    refuse(format!("\"method\" must be a string; {}", accepted()))
                        .with_param("method"),
                )
            }
        };
        return Ok(ApiRequest {
            method,
            path,
            body: body.unwrap_or_default(),
        });
    }
    let path = if obj.contains_key("input") {
        routes::EMBEDDINGS
    } else if obj.contains_key("messages") {
        routes::CHAT_COMPLETIONS
    } else if obj.contains_key("prompt") {
        routes::COMPLETIONS
    } else if obj.contains_key("query") {
        routes::RERANK
    } else {
        return Err(refuse(format!(
            "the payload has none of the fields input, messages, prompt, query or path; {}",
            accepted()
        )));
    };
    Ok(ApiRequest {
        method: Method::Post,
        path: path.to_owned(),
        body: Value::Object(obj).to_string().into_bytes(),
    })
}

fn refuse(message: String) -> ApiError {
    ApiError::new(ErrorKind::InvalidValue, message).with_code("invalid_direct_invoke")
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routes_by_field() {
        let r = decode(json!({"input": "hi"})).unwrap();
        assert_eq!(
            (r.method, r.path.as_str()),
            (Method::Post, "/v1/embeddings")
        );
        assert_eq!(r.body, br#"{"input":"hi"}"#);
        assert_eq!(
            decode(json!({"messages": []})).unwrap().path,
            "/v1/chat/completions"
        );
        assert_eq!(
            decode(json!({"query": "q", "documents": ["d"]}))
                .unwrap()
                .path,
            routes::RERANK
        );
        assert_eq!(
            decode(json!({"prompt": "x"})).unwrap().path,
            "/v1/completions"
        );
    }

    #[test]
    fn explicit_path_defaults_the_method_from_the_body() {
        let r = decode(json!({"path": "/health"})).unwrap();
        assert_eq!((r.method, r.path.as_str()), (Method::Get, "/health"));
        let r = decode(json!({"path": "/v1/embeddings", "body": {"input": "x"}})).unwrap();
        assert_eq!(r.method, Method::Post);
        assert_eq!(r.body, br#"{"input":"x"}"#);
        let r = decode(json!({"path": "/v1/models", "method": "post"})).unwrap();
        assert_eq!(r.method, Method::Post);
    }

    #[test]
    fn refuses_unknown_shapes() {
        for p in [
            json!("x"),
            json!(3),
            json!(null),
            json!([1]),
            json!({"foo": 1}),
            json!({"path": 5}),
        ] {
            let e = decode(p.clone()).unwrap_err();
            assert_eq!(e.status(), 400, "{p}");
            assert!(
                e.message.contains("direct invoke takes"),
                "{p}: {}",
                e.message
            );
        }
    }
}
