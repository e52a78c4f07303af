//! The service: routes a protocol-neutral request, validates it against the limits, runs the engine
//! off the async executor and shapes the OpenAI response.
//!
//! Every event adapter (API Gateway v1/v2, Function URL, direct invoke, and SQS jobs) reduces its
//! event to an [`ApiRequest`] and turns the [`ApiResponse`] back into its own shape, so routing,
//! limits and error bodies are identical whatever the entry point. This module must not see
//! Lambda/AWS event types and must not call candle directly (only the engine traits).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::{Embedder, Engine, EngineError};
use crate::error::{ApiError, ErrorKind};

/// Request limits, checked before any work proportional to the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Inputs per embeddings request (OpenAI allows 2048).
    pub max_inputs: usize,
    /// Tokens per input before truncation; longer inputs are refused with 413.
    pub max_input_tokens: usize,
    /// Generated tokens per request (chat/completions).
    pub max_new_tokens: usize,
    /// Request body size in bytes.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_inputs: 2048,
            max_input_tokens: 8192,
            max_new_tokens: 512,
            // Lambda's synchronous invoke payload limit is 6 MB; a bigger body cannot arrive
            // through API Gateway anyway, this catches local and direct invokes.
            max_request_bytes: 6 * 1024 * 1024,
        }
    }
}

/// Lambda's limit on a synchronous invocation's response payload (6 MB).
pub const MAX_RESPONSE_BYTES: usize = 6_000_000;

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

/// A protocol-neutral response: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Value,
}

impl ApiResponse {
    pub fn ok(body: Value) -> Self {
        Self { status: 200, body }
    }
}

impl From<ApiError> for ApiResponse {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status(),
            body: e.to_body(),
        }
    }
}

/// Facts about the loaded artifact, reported on `/health` and in responses.
#[derive(Debug, Clone, Default)]
pub struct ModelMeta {
    /// The `model` name reported in responses (MODEL_ID, else GGUF `general.name`).
    pub id: String,
    /// SHA-256 of the GGUF bytes, hex.
    pub sha256: String,
    /// Where the model came from (`s3://...`, a path).
    pub source: String,
    /// Milliseconds from process start to the engine being ready.
    pub init_ms: f64,
    /// Compute threads.
    pub threads: usize,
}

/// The service: one per execution environment, built once at init, shared by reference.
pub struct Service {
    engine: Engine,
    limits: Limits,
    meta: ModelMeta,
    /// Whether a request has been served yet: `/health` says cold until then.
    served: AtomicBool,
}

/// `input` of an embeddings request: one string or an array of strings.
#[derive(Debug)]
struct Inputs(Vec<String>);

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Inputs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Inputs, E> {
                Ok(Inputs(vec![v.to_owned()]))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Inputs, E> {
                Ok(Inputs(vec![v]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Inputs, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(s) = seq.next_element::<StrItem>()? {
                    out.push(s.0);
                }
                Ok(Inputs(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// One element of the `input` array; token-id arrays are refused with a clear message.
struct StrItem(String);

impl<'de> Deserialize<'de> for StrItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrItem;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string (token-id arrays are not supported)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StrItem, E> {
                Ok(StrItem(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<StrItem, E> {
                Ok(StrItem(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

/// `POST /v1/embeddings` body (OpenAI).
#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    input: Inputs,
    #[serde(default)]
    #[allow(dead_code)]
    // accepted for OpenAI compatibility; the loaded model answers regardless
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    dimensions: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)] // accepted for OpenAI compatibility
    user: Option<String>,
}

/// Parses a JSON body into `T`: a syntax error is 400, a shape/type error 422.
///
/// Every request body is a JSON object. serde's derived struct deserializers also accept a JSON
/// array, filling fields by position (`["hi"]` would read as `{"input": "hi"}`), so anything that
/// is not an object is refused here, before or after parsing.
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::new(
            ErrorKind::InvalidJson,
            "request body is empty",
        ));
    }
    let is_object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let not_object = || ApiError::new(ErrorKind::InvalidType, "request body must be a JSON object");
    let parsed = serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data if !is_object => not_object(),
            Category::Data => {
                ApiError::new(ErrorKind::InvalidType, format!("invalid request body: {e}"))
            }
            // serde_json reports a wrongly typed enum value (`"encoding_format": 3`) as a syntax
            // error; valid JSON of the wrong shape is a 422 whatever the category says.
            Category::Syntax | Category::Eof | Category::Io
                if serde_json::from_slice::<de::IgnoredAny>(body).is_ok() =>
            {
                ApiError::new(
                    ErrorKind::InvalidType,
                    format!("invalid request body: a field has the wrong type ({e})"),
                )
            }
            Category::Syntax | Category::Eof | Category::Io => ApiError::new(
                ErrorKind::InvalidJson,
                format!("request body is not valid JSON: {e}"),
            ),
        }
    })?;
    if is_object {
        Ok(parsed)
    } else {
        Err(not_object())
    }
}

impl Service {
    pub fn new(engine: Engine, limits: Limits, meta: ModelMeta) -> Self {
        Self {
            engine,
            limits,
            meta,
            served: AtomicBool::new(false),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Routes and answers one request. Never panics on bad input; every failure is an
    /// [`ApiResponse`] with the status from [`crate::error`]'s table.
    pub async fn handle(&self, req: ApiRequest) -> ApiResponse {
        let res = self.route(req).await;
        self.served.store(true, Ordering::Relaxed);
        match res {
            Ok(r) => r,
            Err(e) => e.into(),
        }
    }

    async fn route(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        let path = req.path.trim_end_matches('/');
        let path = if path.is_empty() { "/" } else { path };
        let allowed = match path {
            "/v1/embeddings" | "/v1/chat/completions" | "/v1/completions" | "/v1/jobs" => {
                Method::Post
            }
            "/v1/models" | "/health" => Method::Get,
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
        if req.body.len() > self.limits.max_request_bytes {
            return Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "request body is {} bytes, more than the limit of {} (MAX_REQUEST_BYTES)",
                    req.body.len(),
                    self.limits.max_request_bytes
                ),
            ));
        }
        match path {
            "/v1/embeddings" => self.embeddings(&req.body).await.map(ApiResponse::ok),
            "/v1/chat/completions" | "/v1/completions" => Err(self.wrong_kind(path)),
            "/v1/models" => Ok(ApiResponse::ok(self.models())),
            "/health" => Ok(ApiResponse::ok(self.health())),
            "/v1/jobs" => Err(ApiError::new(
                ErrorKind::NotFound,
                "asynchronous jobs are not enabled on this function (JOBS_QUEUE_URL is unset)",
            )),
            p if p.starts_with("/v1/models/") => {
                let id = &p["/v1/models/".len()..];
                if id == self.meta.id {
                    Ok(ApiResponse::ok(self.model_object()))
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
            _ => Err(ApiError::new(
                ErrorKind::NotFound,
                "asynchronous jobs are not enabled on this function (JOBS_QUEUE_URL is unset)",
            )),
        }
    }

    fn wrong_kind(&self, path: &str) -> ApiError {
        let info = self.engine.info();
        ApiError::new(
            ErrorKind::WrongModelKind,
            format!(
                "{path} needs a chat/generation model, but this function serves {:?}, a {:?} ({})",
                self.meta.id, info.kind, info.architecture
            ),
        )
        .with_param("model")
    }

    fn embedder(&self) -> Result<&Arc<dyn Embedder>, ApiError> {
        match &self.engine {
            Engine::Embedder(e) => Ok(e),
            Engine::Generator(_) => Err(self.wrong_kind("/v1/embeddings")),
        }
    }

    /// `POST /v1/embeddings`.
    pub async fn embeddings(&self, body: &[u8]) -> Result<Value, ApiError> {
        let embedder = self.embedder()?.clone();
        let req: EmbeddingsRequest = parse_body(body)?;
        let inputs = req.input.0;
        if inputs.is_empty() {
            return Err(
                ApiError::new(ErrorKind::InvalidValue, "input must not be empty")
                    .with_param("input"),
            );
        }
        if inputs.len() > self.limits.max_inputs {
            return Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "{} inputs, more than the limit of {} (MAX_INPUTS)",
                    inputs.len(),
                    self.limits.max_inputs
                ),
            )
            .with_param("input"));
        }
        if let Some(i) = inputs.iter().position(|s| s.trim().is_empty()) {
            return Err(ApiError::new(
                ErrorKind::InvalidValue,
                format!("input[{i}] is empty; every input must contain text"),
            )
            .with_param("input"));
        }
        let full_dims = embedder.info().dimensions;
        let dims = match req.dimensions {
            None => full_dims,
            Some(d) if d == 0 || d as usize > full_dims => {
                return Err(ApiError::new(
                    ErrorKind::InvalidValue,
                    format!("dimensions must be between 1 and {full_dims} for this model, got {d}"),
                )
                .with_param("dimensions"))
            }
            Some(d) => d as usize,
        };
        let format = req.encoding_format.unwrap_or_default();
        // Lambda refuses a synchronous response over 6 MB (the client then sees an opaque 502),
        // so refuse up front what could not be delivered, before spending the compute. Worst-case
        // bytes per number: a float prints as up to ~14 JSON chars ("-0.0123456789,"), base64
        // carries 4 bytes as 5.33 chars.
        let per_value = match format {
            EncodingFormat::Float => 14.0,
            EncodingFormat::Base64 => 16.0 / 3.0,
        };
        let estimate = inputs.len() as f64 * (dims as f64 * per_value + 64.0) + 256.0;
        if estimate > MAX_RESPONSE_BYTES as f64 {
            return Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "{} embeddings of {dims} dimensions would make a response of ~{:.1} MB, over \
                     Lambda's {} MB response limit: send fewer inputs per request, or use \
                     encoding_format=base64 (about 2.6x smaller) or dimensions",
                    inputs.len(),
                    estimate / 1e6,
                    MAX_RESPONSE_BYTES / 1_000_000
                ),
            )
            .with_param("input"));
        }
        let max_tokens = self.limits.max_input_tokens;
        // Forward passes are CPU-bound for milliseconds to seconds: run them on the blocking pool
        // so the runtime's executor (and the Lambda Runtime API client on it) stays responsive. A
        // panic in the engine comes back as a JoinError and becomes a 500, not a dead function.
        let out = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            embedder.embed(&refs, max_tokens)
        })
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("embedding task failed: {e}")))?
        .map_err(engine_error)?;

        let total: usize = out.token_counts.iter().sum();
        let data: Vec<Value> = out
            .embeddings
            .into_iter()
            .enumerate()
            .map(|(index, mut v)| {
                if dims < v.len() {
                    v.truncate(dims);
                    l2_normalize(&mut v);
                }
                let embedding = match format {
                    EncodingFormat::Float => Value::Array(v.iter().map(|&x| f32_json(x)).collect()),
                    EncodingFormat::Base64 => {
                        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        Ok(json!({
            "object": "list",
            "data": data,
            "model": self.meta.id,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }))
    }

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
            "dimensions": info.dimensions,
            "max_seq_len": info.max_seq_len,
            "threads": self.meta.threads,
            "state": if self.served.load(Ordering::Relaxed) { "warm" } else { "cold" },
            "init_ms": self.meta.init_ms,
        })
    }
}

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::InputTooLong {
            index,
            tokens,
            limit,
        } => ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!("input[{index}] has {tokens} tokens, more than the limit of {limit} (MAX_INPUT_TOKENS)"),
        )
        .with_param("input"),
        other => ApiError::new(ErrorKind::Internal, format!("inference failed: {other}")),
    }
}

/// An f32 as a JSON number with the f32's shortest decimal form. Widening to f64 first would
/// print ~17 significant digits of which 9 are noise ("0.020110268145799637" for 0.020110268):
/// 40% more bytes on every response, and closer to Lambda's 6 MB limit.
fn f32_json(x: f32) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    let mut buf = ryu::Buffer::new();
    let shortest = buf.format_finite(x);
    shortest
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EmbedOutput, ModelInfo, ModelKind};

    /// A fake embedder (unit test of the service layer): zero-cost vectors of a real model's width.
    struct Wide(ModelInfo);

    impl Embedder for Wide {
        fn info(&self) -> &ModelInfo {
            &self.0
        }
        fn embed(&self, inputs: &[&str], _: usize) -> Result<EmbedOutput, EngineError> {
            Ok(EmbedOutput {
                embeddings: vec![vec![0.051; self.0.dimensions]; inputs.len()],
                token_counts: vec![3; inputs.len()],
            })
        }
    }

    fn service() -> Service {
        let info = ModelInfo {
            name: "wide".into(),
            architecture: "bert".into(),
            kind: ModelKind::Embedder,
            quantization: "q8_0".into(),
            dimensions: 384,
            max_seq_len: 256,
        };
        Service::new(
            Engine::Embedder(Arc::new(Wide(info))),
            Limits::default(),
            ModelMeta::default(),
        )
    }

    async fn post(s: &Service, body: Value) -> ApiResponse {
        s.handle(ApiRequest {
            method: Method::Post,
            path: "/v1/embeddings".into(),
            body: body.to_string().into_bytes(),
        })
        .await
    }

    #[tokio::test]
    async fn responses_lambda_cannot_deliver_are_refused_up_front() {
        let s = service();
        let inputs = vec!["x"; 2048];
        let r = post(&s, json!({ "input": inputs })).await;
        assert_eq!(r.status, 413, "{}", r.body);
        assert!(r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("base64"));

        // The same request in base64 fits, and really is under the limit.
        let r = post(&s, json!({ "input": inputs, "encoding_format": "base64" })).await;
        assert_eq!(r.status, 200);
        assert!(r.body.to_string().len() < MAX_RESPONSE_BYTES);

        // The largest float request the estimate lets through also fits.
        let ok = (1..=2048)
            .rev()
            .find(|&n| {
                let e = n as f64 * (384.0 * 14.0 + 64.0) + 256.0;
                e <= MAX_RESPONSE_BYTES as f64
            })
            .unwrap();
        let r = post(&s, json!({ "input": vec!["x"; ok] })).await;
        assert_eq!(r.status, 200);
        assert!(r.body.to_string().len() < MAX_RESPONSE_BYTES);
    }

    #[test]
    fn floats_print_at_f32_precision_and_round_trip() {
        for x in [0.020110268f32, -0.1688717, 1.0, 3.5e-8, -0.0] {
            let s = f32_json(x).to_string();
            assert!(s.len() <= 13, "{s}");
            assert_eq!(s.parse::<f32>().unwrap(), x);
        }
        assert_eq!(f32_json(f32::NAN), Value::Null);
    }
}
