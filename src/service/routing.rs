//! Routing, and what no API owns: a request's path and method to the API that answers it, the
//! request-size limit before any body is decoded, the per-call metrics' route and status,
//! `/v1/models`, `/health`, `/openapi.json`, and `/v1/jobs` handed to `jobs`.
//!
//! This module must not decode an API's body or call the engine: each API's file does that, in
//! its own steps. [`ROUTES`] is the one list of routes: the OpenAPI document and `serve` are
//! checked against it, and metrics name a call by its template.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::generation::Route;
use super::rerank::Shape;
use super::{limits, meter, CallOptions, Reply, Service};
use crate::api::{routes, ApiResponse, Owner};
use crate::error::{ApiError, ErrorKind};
use crate::jobs;

/// Every route the service answers, as (method, path template): the one list that routing, the
/// OpenAPI document (`docs/openapi.json`, checked against it by a test) and `serve` agree on.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", routes::EMBEDDINGS),
    ("POST", routes::RERANK),
    ("POST", routes::TEI_RERANK),
    ("POST", routes::CHAT_COMPLETIONS),
    ("POST", routes::COMPLETIONS),
    ("GET", routes::MODELS),
    ("GET", "/v1/models/{model}"),
    ("GET", routes::HEALTH),
    ("GET", routes::OPENAPI),
    ("POST", routes::JOBS),
    ("GET", "/v1/jobs/{id}"),
];

/// The OpenAPI 3.1 document of this API, served at `GET /openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// HTTP method, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Other,
}

impl Method {
    pub fn parse(s: &str) -> Method {
        if s.eq_ignore_ascii_case("GET") || s.eq_ignore_ascii_case("HEAD") {
            Method::Get
        } else if s.eq_ignore_ascii_case("POST") {
            Method::Post
        } else {
            Method::Other
        }
    }
}

/// A protocol-neutral request: what every event adapter produces.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: Method,
    /// Path without stage prefix or query string, e.g. `/v1/embeddings`.
    pub path: String,
    /// Raw body bytes (already base64-decoded by the adapter).
    pub body: Vec<u8>,
}

impl Service {
    /// Routes and answers one request on a route that cannot stream, with no deadline. Never
    /// panics on bad input; every failure is an [`ApiResponse`] with the status from
    /// [`crate::error`]'s table.
    pub async fn handle(&self, req: ApiRequest) -> ApiResponse {
        match self.handle_call(req, &CallOptions::default()).await {
            Reply::Full(r) => r,
            // CallOptions::default() cannot stream, so the service never answers with one.
            Reply::Stream(_) => ApiError::new(ErrorKind::Internal, "unexpected stream").into(),
        }
    }

    /// Routes and answers one request with what the entry point allows (deadline, streaming).
    pub async fn handle_call(&self, req: ApiRequest, opts: &CallOptions) -> Reply {
        self.handle_for(req, opts, None).await
    }

    /// As [`Service::handle_call`], for a caller the events layer authenticated with an API key:
    /// `owner` scopes its jobs (`/v1/jobs` stores and reads results under it).
    pub async fn handle_for(
        &self,
        req: ApiRequest,
        opts: &CallOptions,
        owner: Option<&Owner>,
    ) -> Reply {
        let template = route_template(&req.path);
        let res = self.route(req, opts, owner).await;
        self.served.store(true, Ordering::Relaxed);
        let reply = match res {
            Ok(r) => r,
            Err(e) => Reply::Full(e.into()),
        };
        let status = match &reply {
            Reply::Full(r) => r.status,
            Reply::Stream(_) => 200,
        };
        // The first call of an invoke names it (an SQS batch runs several).
        meter::record(|s| {
            s.route = s.route.or(template);
            s.status = s.status.or(Some(status));
        });
        reply
    }

    async fn route(
        &self,
        req: ApiRequest,
        opts: &CallOptions,
        owner: Option<&Owner>,
    ) -> Result<Reply, ApiError> {
        let path = req.path.trim_end_matches('/');
        let path = if path.is_empty() { "/" } else { path };
        let allowed = match path {
            routes::EMBEDDINGS
            | routes::RERANK
            | routes::TEI_RERANK
            | routes::CHAT_COMPLETIONS
            | routes::COMPLETIONS
            | routes::JOBS => Method::Post,
            routes::MODELS | routes::HEALTH | routes::OPENAPI => Method::Get,
            p if p.starts_with("/v1/models/") || p.starts_with("/v1/jobs/") => Method::Get,
            _ => {
                return Err(ApiError::new(
                    ErrorKind::NotFound,
                    format!("no route for {path}"),
                ))
            }
        };
        if req.method != allowed {
            let m = if allowed == Method::Get {
                "GET"
            } else {
                "POST"
            };
            return Err(ApiError::new(
                ErrorKind::MethodNotAllowed,
                format!("{path} accepts {m} only"),
            ));
        }
        limits::request_bytes(&self.limits, req.body.len())?;
        let full = |r: ApiResponse| Reply::Full(r);
        match path {
            routes::EMBEDDINGS => self
                .embeddings(&req.body, opts.deadline)
                .await
                .map(|b| full(ApiResponse::ok(b))),
            routes::RERANK => self
                .rerank(Shape::Cohere, &req.body, opts)
                .await
                .map(|b| full(ApiResponse::ok(b))),
            routes::TEI_RERANK => self
                .rerank(Shape::Tei, &req.body, opts)
                .await
                .map(|b| full(ApiResponse::ok(b))),
            routes::CHAT_COMPLETIONS => self.generate(Route::Chat, &req.body, opts).await,
            routes::COMPLETIONS => self.generate(Route::Completions, &req.body, opts).await,
            routes::MODELS => Ok(full(ApiResponse::ok(self.models()))),
            routes::HEALTH => Ok(full(ApiResponse::ok(self.health()))),
            routes::OPENAPI => Ok(full(ApiResponse::ok(openapi()))),
            routes::JOBS => jobs::submit(&self.jobs, &self.limits, &req.body, owner)
                .await
                .map(full),
            p if p.starts_with("/v1/models/") => {
                // API Gateway and HTTP clients pass the segment percent-encoded ("a%20b").
                let id = percent_decode(&p["/v1/models/".len()..]);
                let id = id.as_str();
                if id == self.meta.id {
                    Ok(full(ApiResponse::ok(self.model_object())))
                } else {
                    Err(ApiError::new(
                        ErrorKind::NotFound,
                        format!(
                            "model {id:?} is not served here; this function serves {:?}",
                            self.meta.id
                        ),
                    )
                    .with_param("model"))
                }
            }
            p => jobs::status(&self.jobs, &p["/v1/jobs/".len()..], owner)
                .await
                .map(full),
        }
    }

    /// The refusal of a route the loaded model's kind cannot answer (chat on an embedder).
    pub(super) fn wrong_kind(&self, path: &str) -> ApiError {
        let info = self.engine.info();
        let needs = match path {
            routes::EMBEDDINGS => "an embedding model",
            routes::RERANK | routes::TEI_RERANK => "a reranker (a cross-encoder)",
            _ => "a chat/generation model",
        };
        ApiError::new(
            ErrorKind::WrongModelKind,
            format!(
                "{path} needs {needs}, but this function serves {:?}, a {:?} ({})",
                self.meta.id, info.kind, info.architecture
            ),
        )
        .with_param("model")
    }

    /// The one model this function serves, as OpenAI's model object.
    fn model_object(&self) -> Value {
        let info = self.engine.info();
        json!({
            "id": self.meta.id,
            "object": "model",
            "created": 0,
            "owned_by": "lambda-inference",
            "kind": info.kind,
            "architecture": info.architecture,
            "quantization": info.quantization,
            "quantization_mix": info.details.quantization_mix,
            "context_length": info.details.context_length,
            "max_seq_len": info.max_seq_len,
            "pooling": info.details.pooling,
        })
    }

    /// `GET /v1/models`.
    pub fn models(&self) -> Value {
        json!({"object": "list", "data": [self.model_object()]})
    }

    /// `GET /health`.
    pub fn health(&self) -> Value {
        let info = self.engine.info();
        json!({
            "status": "ok",
            "model": self.meta.id,
            "sha256": self.meta.sha256,
            "source": self.meta.source,
            "architecture": info.architecture,
            "kind": info.kind,
            "quantization": info.quantization,
            "quantization_mix": info.details.quantization_mix,
            "context_length": info.details.context_length,
            "pooling": info.details.pooling,
            "dimensions": info.dimensions,
            "max_seq_len": info.max_seq_len,
            "threads": self.meta.threads,
            "state": if self.served.load(Ordering::Relaxed) { "warm" } else { "cold" },
            "init_ms": self.meta.init_ms,
        })
    }
}

/// The OpenAPI document as JSON (it is checked to parse by the tests).
fn openapi() -> Value {
    serde_json::from_str(OPENAPI_JSON).unwrap_or_else(|e| {
        ApiError::new(ErrorKind::Internal, format!("docs/openapi.json: {e}")).to_body()
    })
}

/// The [`ROUTES`] template a path answers to (`/v1/models/abc` -> `/v1/models/{model}`): a
/// bounded set of names for metrics, whatever paths clients send. `None`: no route.
pub fn route_template(path: &str) -> Option<&'static str> {
    let path = path.trim_end_matches('/');
    ROUTES
        .iter()
        .map(|(_, t)| *t)
        .find(|t| match t.split_once('{') {
            Some((prefix, _)) => path.len() > prefix.len() && path.starts_with(prefix),
            None => *t == path,
        })
}

/// `%XX` escapes decoded (invalid ones and non-UTF-8 results kept as they are).
fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_templates_are_a_bounded_set() {
        assert_eq!(route_template("/v1/embeddings"), Some("/v1/embeddings"));
        assert_eq!(route_template("/v1/embeddings/"), Some("/v1/embeddings"));
        assert_eq!(
            route_template("/v1/models/a%20b"),
            Some("/v1/models/{model}")
        );
        assert_eq!(route_template("/v1/jobs/x"), Some("/v1/jobs/{id}"));
        assert_eq!(route_template("/v1/models"), Some("/v1/models"));
        assert_eq!(route_template("/v1/models/"), Some("/v1/models"));
        assert_eq!(route_template("/nope"), None);
        assert_eq!(route_template("/v1/embeddingsX"), None);
    }

    #[test]
    fn model_ids_in_paths_are_percent_decoded() {
        assert_eq!(percent_decode("Smollm2%20135M"), "Smollm2 135M");
        assert_eq!(percent_decode("caf%C3%A9"), "café");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%ff"), "%zz%ff");
        assert_eq!(percent_decode("plain"), "plain");
    }
}
