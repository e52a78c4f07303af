//! The service: routes a protocol-neutral request, validates it against the limits, runs the engine
//! off the async executor and shapes the OpenAI response.
//!
//! Every event adapter (API Gateway v1/v2, Function URL, direct invoke, and SQS jobs) reduces its
//! event to an [`ApiRequest`] and turns the [`ApiResponse`] back into its own shape, so routing,
//! limits and error bodies are identical whatever the entry point. Generation requests may
//! answer as a stream of server-sent events ([`Reply::Stream`]) where the entry point says it can
//! carry one ([`CallOptions`]), and stop before the invocation's deadline. This module must not
//! see Lambda/AWS event types (the deadline arrives as an `Instant`) and must not call candle
//! directly (only the engine traits).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::Owner;
use crate::engine::{
    ChatMessage, EmbedOutput, Embedder, Engine, EngineError, FinishReason, GenerateOutput,
    GenerateParams, Generator, SamplingParams,
};
use crate::error::{ApiError, ErrorKind};
use crate::jobs::{self, JobPorts};

mod cost;
pub mod meter;
// The shared types of the service's signature, defined in the leaf `api` module (so that `config`
// and `jobs`, below the service, can use them too); re-exported here for the service's callers.
pub use crate::api::{parse_body, ApiKeys, ApiResponse, Limits};
pub use cost::CostModel;

/// Every route the service answers, as (method, path template): the one list that routing, the
/// OpenAPI document (`docs/openapi.json`, checked against it by a test) and `serve` agree on.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/health"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
];

/// The OpenAPI 3.1 document of this API, served at `GET /openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../docs/openapi.json");

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
    /// Result store and queue for `/v1/jobs` and the SQS worker (empty: jobs disabled).
    jobs: JobPorts,
    /// What work costs here, measured on the requests served so far.
    cost: CostModel,
    /// The API keys HTTP API / REST API requests must carry (ApiAuth=KEY); checked by the events
    /// layer (`events::auth`), held here so that every caller of it has them (see api/keys.rs).
    api_keys: Option<ApiKeys>,
}

/// What an embeddings request asks for besides its inputs.
#[derive(Debug, Clone, Copy)]
struct EmbeddingShape {
    dims: usize,
    format: EncodingFormat,
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

impl Service {
    pub fn new(engine: Engine, limits: Limits, meta: ModelMeta) -> Self {
        Self {
            engine,
            limits,
            meta,
            served: AtomicBool::new(false),
            jobs: JobPorts::default(),
            cost: CostModel::default(),
            api_keys: None,
        }
    }

    /// Requires one of `keys` on API Gateway requests (see `events::auth`).
    pub fn with_api_keys(mut self, keys: ApiKeys) -> Self {
        self.api_keys = Some(keys);
        self
    }

    /// The keys API Gateway requests must carry; `None`: not checked here (IAM, JWT, none).
    pub fn api_keys(&self) -> Option<&ApiKeys> {
        self.api_keys.as_ref()
    }

    /// What work has cost here so far (for the SQS worker's planning, and `/health`).
    pub fn cost(&self) -> &CostModel {
        &self.cost
    }

    /// Enables `/v1/jobs` and the SQS worker with these ports.
    pub fn with_jobs(mut self, jobs: JobPorts) -> Self {
        self.jobs = jobs;
        self
    }

    pub fn jobs(&self) -> &JobPorts {
        &self.jobs
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
            "/v1/embeddings" | "/v1/chat/completions" | "/v1/completions" | "/v1/jobs" => {
                Method::Post
            }
            "/v1/models" | "/health" | "/openapi.json" => Method::Get,
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
        let full = |r: ApiResponse| Reply::Full(r);
        match path {
            "/v1/embeddings" => self
                .embeddings(&req.body, opts.deadline)
                .await
                .map(|b| full(ApiResponse::ok(b))),
            "/v1/chat/completions" => self.generate(Route::Chat, &req.body, opts).await,
            "/v1/completions" => self.generate(Route::Completions, &req.body, opts).await,
            "/v1/models" => Ok(full(ApiResponse::ok(self.models()))),
            "/health" => Ok(full(ApiResponse::ok(self.health()))),
            "/openapi.json" => Ok(full(ApiResponse::ok(openapi()))),
            "/v1/jobs" => jobs::submit(&self.jobs, &self.limits, &req.body, owner)
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

    fn wrong_kind(&self, path: &str) -> ApiError {
        let info = self.engine.info();
        let needs = match info.kind {
            crate::engine::ModelKind::Embedder => "a chat/generation model",
            crate::engine::ModelKind::Generator => "an embedding model",
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

    fn embedder(&self) -> Result<&Arc<dyn Embedder>, ApiError> {
        match &self.engine {
            Engine::Embedder(e) => Ok(e),
            Engine::Generator(_) => Err(self.wrong_kind("/v1/embeddings")),
        }
    }

    fn generator(&self, route: Route) -> Result<&Arc<dyn Generator>, ApiError> {
        match &self.engine {
            Engine::Generator(g) => Ok(g),
            Engine::Embedder(_) => Err(self.wrong_kind(route.path())),
        }
    }

    /// `POST /v1/chat/completions` and `POST /v1/completions`.
    async fn generate(
        &self,
        route: Route,
        body: &[u8],
        opts: &CallOptions,
    ) -> Result<Reply, ApiError> {
        let gen = self.generator(route)?.clone();
        let req: GenerationRequest = parse_body(body)?;
        let v = validate(route, req, &self.limits)?;
        if v.stream {
            if let Streaming::Unsupported(why) = opts.streaming {
                return Err(ApiError::new(
                    ErrorKind::InvalidValue,
                    format!("stream=true is not possible here: {why}; send stream=false"),
                )
                .with_param("stream")
                .with_code("stream_unsupported"));
            }
        }
        let limits = self.limits;
        // The deadline with room to encode and send the answer (and for Lambda to take it).
        let deadline = opts
            .deadline
            .map(|d| d.checked_sub(DEADLINE_MARGIN).unwrap_or(d));
        // Template rendering and tokenization are CPU work proportional to the input (a 1 MB
        // prompt takes a while): off the executor, like the forward passes.
        let g = gen.clone();
        let prompt_src = v.prompt.clone();
        let prompt = tokio::task::spawn_blocking(move || prepare(&*g, &prompt_src, &limits))
            .await
            .map_err(|e| {
                ApiError::new(ErrorKind::Internal, format!("prompt task failed: {e}"))
            })??;
        let ctx = gen.info().max_seq_len;
        let max_tokens = v.max_tokens.min(ctx.saturating_sub(prompt.len()));
        if let Some(budget) = opts.budget {
            self.admit(
                self.cost.generation(prompt.len(), max_tokens),
                budget,
                deadline,
            )?;
        }
        let params = GenerateParams {
            // Never past the context window: the prompt fits (checked), the answer is cut.
            max_tokens,
            sampling: v.sampling.clone(),
            stop: v.stop.clone(),
            deadline,
            cancel: None,
            prefill_per_token: self.cost.prefill_per_token(),
        };
        let head = ResponseHead {
            id: response_id(route),
            created: unix_now(),
            model: self.meta.id.clone(),
            route,
        };
        if v.stream {
            return Ok(Reply::Stream(stream_generation(
                gen,
                prompt,
                params,
                head,
                v.include_usage,
            )));
        }
        // Generation is CPU-bound for up to the function's timeout: the blocking pool keeps the
        // executor (and the Runtime API client on it) responsive. A panic becomes a 500.
        let out = tokio::task::spawn_blocking(move || gen.generate(&prompt, &params, &mut |_| {}))
            .await
            .map_err(|e| {
                ApiError::new(ErrorKind::Internal, format!("generation task failed: {e}"))
            })?
            .map_err(engine_error)?;
        self.cost.observe_prefill(out.prefill, out.prompt_tokens);
        self.cost
            .observe_decode(out.decode, out.token_ids.len().saturating_sub(1));
        // With a budget (a job) a deadline stop is counted by `not_started` below.
        meter::record(|s| count_generation(s, &out, opts.budget.is_none()));
        if opts.budget.is_some() && out.hit_deadline {
            // A job must finish: a partial answer is not its result. Handed back, it runs again
            // in a fresh invocation, planned with the rates this run has just measured.
            return Err(not_started(
                "the invocation's deadline stopped this generation before it finished",
            ));
        }
        Ok(Reply::Full(ApiResponse::ok(head.full_body(&out))))
    }

    /// `POST /v1/embeddings`; forward passes stop rather than run past `deadline` (a 503 beats
    /// the invocation being cut off: API Gateway would answer an opaque 504).
    pub async fn embeddings(
        &self,
        body: &[u8],
        deadline: Option<Instant>,
    ) -> Result<Value, ApiError> {
        let (inputs, shape) = self.prepare_embeddings(body)?;
        let out = self.embed(inputs, deadline).await?;
        Ok(self.embeddings_body(shape, out.embeddings, &out.token_counts))
    }

    /// Several embeddings requests (the embedding jobs of one SQS batch) answered with shared
    /// forward passes: one engine call over all their inputs, split back per request. An invalid
    /// request fails alone; if the shared call fails (one input over the token limit, an engine
    /// panic), the group is bisected until only the guilty request fails.
    ///
    /// With a budget in `opts` (jobs), requests are admitted in order while their estimated cost
    /// fits before the deadline; the rest answer [`not_started`] errors, and a request that could
    /// not finish even in a whole invocation ([`CallOptions::budget`]) fails with 413.
    pub async fn embeddings_many(
        &self,
        bodies: &[&[u8]],
        opts: &CallOptions,
    ) -> Vec<Result<Value, ApiError>> {
        let mut results: Vec<Option<Result<Value, ApiError>>> = vec![None; bodies.len()];
        let mut valid: Vec<(usize, EmbeddingShape, Vec<String>)> = Vec::new();
        let deadline = opts.deadline;
        let mut planned = Duration::ZERO;
        for (i, body) in bodies.iter().enumerate() {
            match self.prepare_embeddings(body) {
                Ok((inputs, shape)) => {
                    if let Some(budget) = opts.budget {
                        let cost = self.embed_estimate(&inputs);
                        let later = deadline.map(|d| d.checked_sub(planned).unwrap_or(d));
                        if let Err(e) = self.admit(cost, budget, later) {
                            results[i] = Some(Err(e));
                            continue;
                        }
                        planned += cost.unwrap_or_default();
                    }
                    valid.push((i, shape, inputs))
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for (i, r) in self.embed_group(valid, deadline).await {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| r.expect("every request answered"))
            .collect()
    }

    /// One engine call for the whole group; if it fails, the group is split in halves and each
    /// half tried again, so one bad request costs a few extra calls, not one call per request.
    fn embed_group(
        &self,
        group: Vec<(usize, EmbeddingShape, Vec<String>)>,
        deadline: Option<Instant>,
    ) -> futures_util::future::BoxFuture<'_, Vec<(usize, Result<Value, ApiError>)>> {
        Box::pin(async move {
            // Nothing to embed (every request was refused before): no engine call, and no
            // bisecting an empty group forever.
            if group.is_empty() {
                return Vec::new();
            }
            let all: Vec<String> = group
                .iter()
                .flat_map(|(_, _, v)| v.iter().cloned())
                .collect();
            match self.embed(all, deadline).await {
                Ok(out) => {
                    let mut embeddings = out.embeddings.into_iter();
                    let mut counts = out.token_counts.into_iter();
                    group
                        .into_iter()
                        .map(|(i, shape, inputs)| {
                            let n = inputs.len();
                            let e: Vec<Vec<f32>> = embeddings.by_ref().take(n).collect();
                            let c: Vec<usize> = counts.by_ref().take(n).collect();
                            (i, Ok(self.embeddings_body(shape, e, &c)))
                        })
                        .collect()
                }
                Err(e) if group.len() == 1 => vec![(group[0].0, Err(e))],
                // Out of time: no request is at fault, and splitting would not make time.
                Err(e) if e.code.as_deref() == Some(NOT_STARTED_CODE) => group
                    .into_iter()
                    .map(|(i, _, _)| (i, Err(e.clone())))
                    .collect(),
                Err(_) => {
                    let mut left = group;
                    let right = left.split_off(left.len() / 2);
                    let mut out = self.embed_group(left, deadline).await;
                    out.extend(self.embed_group(right, deadline).await);
                    out
                }
            }
        })
    }

    /// Parses and validates an embeddings body: everything that can be refused before compute.
    fn prepare_embeddings(&self, body: &[u8]) -> Result<(Vec<String>, EmbeddingShape), ApiError> {
        let embedder = self.embedder()?;
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
        Ok((inputs, EmbeddingShape { dims, format }))
    }

    /// Runs the embedder on the blocking pool.
    async fn embed(
        &self,
        inputs: Vec<String>,
        deadline: Option<Instant>,
    ) -> Result<EmbedOutput, ApiError> {
        let embedder = self.embedder()?.clone();
        let max_tokens = self.limits.max_input_tokens;
        let t = Instant::now();
        let text_bytes: usize = inputs.iter().map(String::len).sum();
        // Forward passes are CPU-bound for milliseconds to seconds: run them on the blocking pool
        // so the runtime's executor (and the Lambda Runtime API client on it) stays responsive. A
        // panic in the engine comes back as a JoinError and becomes a 500, not a dead function.
        let out = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            embedder.embed_until(&refs, max_tokens, deadline)
        })
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("embedding task failed: {e}")))?
        .map_err(|e| {
            if let EngineError::DeadlineReached { tokens_done } = e {
                // What was done still tells what the rest would cost.
                self.cost.observe_embed(t.elapsed(), tokens_done);
            }
            engine_error(e)
        })?;
        self.cost
            .observe_embed(t.elapsed(), out.token_counts.iter().sum());
        meter::record(|s| {
            s.input_tokens += out.token_counts.iter().sum::<usize>() as u64;
            s.engine += t.elapsed();
        });
        if text_bytes > TRIM_ABOVE_BYTES || out.embeddings.len() > 256 {
            trim_heap();
        }
        Ok(out)
    }

    /// The estimated time of embedding `inputs`, from their byte lengths (before tokenizing):
    /// at most one token per 2 bytes of text (English averages about 4), at most the model's
    /// window per input, plus the special tokens.
    fn embed_estimate(&self, inputs: &[String]) -> Option<Duration> {
        let window = self.engine.info().max_seq_len;
        let tokens = inputs
            .iter()
            .map(|s| (s.len().div_ceil(2) + 2).min(window))
            .sum();
        self.cost.embeddings(tokens)
    }

    /// Whether work of estimated `cost` may start for a caller that needs it finished before
    /// `deadline` (a job). Unknown cost (nothing measured yet) is admitted: the first request
    /// measures it.
    fn admit(
        &self,
        cost: Option<Duration>,
        budget: Duration,
        deadline: Option<Instant>,
    ) -> Result<(), ApiError> {
        let Some(cost) = cost else { return Ok(()) };
        if cost > budget {
            return Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "this request would take about {:.1} s here, more than a whole invocation \
                     allows ({:.1} s, the function's timeout): it can never finish as a job; \
                     split it, lower max_tokens, or raise the worker's timeout",
                    cost.as_secs_f64(),
                    budget.as_secs_f64()
                ),
            )
            .with_code("exceeds_invocation_time"));
        }
        if deadline.is_some_and(|d| Instant::now() + cost > d) {
            return Err(not_started(
                "not started: it would not finish before this invocation's deadline",
            ));
        }
        Ok(())
    }

    /// The OpenAI response for one request's embeddings.
    fn embeddings_body(
        &self,
        shape: EmbeddingShape,
        embeddings: Vec<Vec<f32>>,
        token_counts: &[usize],
    ) -> Value {
        let EmbeddingShape { dims, format } = shape;
        let total: usize = token_counts.iter().sum();
        let data: Vec<Value> = embeddings
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
        json!({
            "object": "list",
            "data": data,
            "model": self.meta.id,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        })
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

/// Generation stops this long before the invocation's deadline, so the answer (finish_reason
/// "length") is encoded and returned before Lambda would kill the invocation.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

/// Whether the entry point a request came through can stream a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streaming {
    Supported,
    /// Cannot; the reason completes "stream=true is not possible here: ...".
    Unsupported(&'static str),
}

/// What the entry point knows about one call beyond the request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallOptions {
    /// When the answer is due (the Lambda context's deadline, or the client's, whichever is
    /// earlier); generation stops [`DEADLINE_MARGIN`] before it.
    pub deadline: Option<Instant>,
    pub streaming: Streaming,
    /// Set for callers that need the work finished, not cut short (SQS jobs): the time a whole
    /// invocation gives. Work whose estimated cost exceeds it fails (413, it could never
    /// finish); work that would not finish before `deadline` is not started ([`not_started`]);
    /// a generation the deadline stops anyway answers [`not_started`] instead of a partial
    /// result. `None` (HTTP, direct): start, and answer what is done by the deadline.
    pub budget: Option<Duration>,
}

impl Default for CallOptions {
    fn default() -> Self {
        Self {
            deadline: None,
            streaming: Streaming::Unsupported("this entry point returns one buffered response"),
            budget: None,
        }
    }
}

/// The `error.code` of work refused or stopped for lack of time before the deadline: retrying in
/// a fresh invocation will do it (status 503).
pub const NOT_STARTED_CODE: &str = "deadline_not_started";

/// An error for work not done for lack of time in this invocation (see [`CallOptions::budget`]).
pub fn not_started(message: &str) -> ApiError {
    meter::record(|s| s.deadline_stops += 1);
    ApiError::new(ErrorKind::Unavailable, message).with_code(NOT_STARTED_CODE)
}

/// The OpenAPI document as JSON (it is checked to parse by the tests).
fn openapi() -> Value {
    serde_json::from_str(OPENAPI_JSON).unwrap_or_else(|e| {
        ApiError::new(ErrorKind::Internal, format!("docs/openapi.json: {e}")).to_body()
    })
}

/// A service answer: one response, or server-sent events as they are produced.
pub enum Reply {
    Full(ApiResponse),
    Stream(SseStream),
}

/// `text/event-stream` events, each a complete `data: ...\n\n` frame; the last is
/// `data: [DONE]\n\n`. Dropping the receiver stops the generation at its next token.
pub struct SseStream {
    pub rx: tokio::sync::mpsc::Receiver<String>,
}

impl SseStream {
    /// Waits for every event and returns them concatenated (for entry points that buffer).
    pub async fn collect(mut self) -> String {
        let mut out = String::new();
        while let Some(ev) = self.rx.recv().await {
            out.push_str(&ev);
        }
        out
    }
}

/// The two generation routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Completions,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
        }
    }
}

/// `POST /v1/chat/completions` and `/v1/completions` bodies (OpenAI), one struct: the routes
/// differ in `messages` vs `prompt`. Loosely typed where OpenAI accepts several shapes, so
/// that validation can say exactly what is wrong.
#[derive(Debug, Deserialize)]
struct GenerationRequest {
    #[serde(default)]
    messages: Option<Value>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)] // accepted for OpenAI compatibility; the loaded model answers
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<i64>,
    /// Any JSON number: `-0` and `42.0` are integers to a JavaScript client.
    #[serde(default)]
    seed: Option<serde_json::Number>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<Value>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    repetition_penalty: Option<f64>,
    #[serde(default)]
    n: Option<i64>,
    /// OpenAI fields that change what the answer means. None is implemented: a client that
    /// asked for a tool call or JSON mode must hear so, not get plain text and a 200. Read
    /// loosely (any JSON) so that the 400 names the field whatever its shape.
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    logit_bias: Option<Value>,
    #[serde(default)]
    echo: Option<Value>,
    #[serde(default)]
    best_of: Option<Value>,
    #[serde(default)]
    suffix: Option<Value>,
    #[serde(default)]
    modalities: Option<Value>,
    #[serde(default)]
    audio: Option<Value>,
}

impl GenerationRequest {
    /// The first field set to something this function cannot honour, with why. Absent, `null`
    /// and the values that mean "off" (`tools: []`, `tool_choice: "none"`, `logprobs: false`,
    /// `response_format: {"type": "text"}`, ...) pass.
    fn unsupported(&self) -> Option<(&'static str, &'static str)> {
        let off = |v: &Option<Value>, offs: &[Value]| match v {
            None | Some(Value::Null) => true,
            Some(x) => offs.contains(x),
        };
        let empty = |v: &Option<Value>| match v {
            None | Some(Value::Null) => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(Value::String(s)) => s.is_empty(),
            _ => false,
        };
        let text_format = json!({"type": "text"});
        let checks: [(&'static str, bool, &'static str); 13] = [
            (
                "tools",
                empty(&self.tools),
                "tool calling is not supported by this function",
            ),
            (
                "tool_choice",
                off(&self.tool_choice, &[json!("none"), json!("auto")]),
                "tool calling is not supported by this function",
            ),
            (
                "functions",
                empty(&self.functions),
                "function calling is not supported by this function",
            ),
            (
                "function_call",
                off(&self.function_call, &[json!("none"), json!("auto")]),
                "function calling is not supported by this function",
            ),
            (
                "response_format",
                off(&self.response_format, &[text_format]),
                "only response_format {\"type\": \"text\"} is supported (no JSON mode or schema)",
            ),
            (
                "logprobs",
                off(&self.logprobs, &[json!(false), json!(0)]),
                "logprobs are not returned by this function",
            ),
            (
                "top_logprobs",
                off(&self.top_logprobs, &[json!(0)]),
                "logprobs are not returned by this function",
            ),
            (
                "logit_bias",
                empty(&self.logit_bias),
                "logit_bias is not supported by this function",
            ),
            (
                "echo",
                off(&self.echo, &[json!(false)]),
                "echo is not supported by this function",
            ),
            (
                "best_of",
                off(&self.best_of, &[json!(1)]),
                "only best_of=1 is supported",
            ),
            (
                "suffix",
                empty(&self.suffix),
                "suffix (insertion) is not supported by this function",
            ),
            (
                "modalities",
                off(&self.modalities, &[json!(["text"])]),
                "only text output is supported",
            ),
            ("audio", empty(&self.audio), "audio output is not supported"),
        ];
        checks
            .into_iter()
            .find(|(_, ok, _)| !ok)
            .map(|(field, _, why)| (field, why))
    }
}

/// Where the prompt text comes from.
#[derive(Debug, Clone)]
enum PromptSource {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// A validated generation request.
#[derive(Debug)]
struct Validated {
    prompt: PromptSource,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn invalid(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidValue, msg).with_param(param)
}

fn validate(route: Route, r: GenerationRequest, limits: &Limits) -> Result<Validated, ApiError> {
    if let Some((field, why)) = r.unsupported() {
        return Err(ApiError::new(
            ErrorKind::InvalidValue,
            format!("{field}: {why}; remove the field (or send its default) to get a plain answer"),
        )
        .with_param(field)
        .with_code("unsupported_parameter"));
    }
    let prompt = match route {
        Route::Chat => PromptSource::Chat(messages(r.messages)?),
        Route::Completions => PromptSource::Text(prompt_text(r.prompt)?),
    };
    let max_tokens = match r.max_completion_tokens.or(r.max_tokens) {
        None => limits.max_new_tokens,
        Some(n) if n < 1 => {
            return Err(invalid(
                "max_tokens",
                format!("max_tokens must be at least 1, got {n}"),
            ))
        }
        // Capped, not refused: MAX_NEW_TOKENS is this deployment's budget, not the client's.
        Some(n) => (n as u64).min(limits.max_new_tokens as u64) as usize,
    };
    let range = |name: &str, v: Option<f64>, lo: f64, hi: f64, default: f64| {
        let x = v.unwrap_or(default);
        if !(lo..=hi).contains(&x) || !x.is_finite() {
            Err(invalid(
                name,
                format!("{name} must be between {lo} and {hi}, got {x}"),
            ))
        } else {
            Ok(x as f32)
        }
    };
    let temperature = range("temperature", r.temperature, 0.0, 2.0, 1.0)?;
    let top_p = range("top_p", r.top_p, 0.0, 1.0, 1.0)?;
    if r.top_p.is_some_and(|p| p <= 0.0) {
        return Err(invalid("top_p", "top_p must be greater than 0"));
    }
    // A positive f64 below f32's range (5e-324) still means "only the most likely token".
    let top_p = top_p.max(f32::MIN_POSITIVE);
    let frequency_penalty = range("frequency_penalty", r.frequency_penalty, -2.0, 2.0, 0.0)?;
    let presence_penalty = range("presence_penalty", r.presence_penalty, -2.0, 2.0, 0.0)?;
    let repetition_penalty = range("repetition_penalty", r.repetition_penalty, 0.01, 10.0, 1.0)?;
    let top_k = match r.top_k {
        None => 0,
        Some(k) if k < 0 => {
            return Err(invalid(
                "top_k",
                format!("top_k must be 0 (off) or more, got {k}"),
            ))
        }
        Some(k) => k as usize,
    };
    if let Some(n) = r.n.filter(|&n| n != 1) {
        return Err(invalid("n", format!("only n=1 is supported, got {n}")));
    }
    let stop = match r.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|s| match s {
                Value::String(s) => Ok(s),
                _ => Err(invalid(
                    "stop",
                    "stop must be a string or an array of strings",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(invalid(
                "stop",
                "stop must be a string or an array of strings",
            ))
        }
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(invalid("stop", "stop takes at most 4 non-empty strings"));
    }
    let include_usage = r
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // No seed: a fresh one per request (OpenAI's behaviour), so sampling varies between calls.
    let seed = match &r.seed {
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        Some(n) => seed_value(n).ok_or_else(|| {
            invalid(
                "seed",
                format!("seed must be an integer between -2^63 and 2^64-1, got {n}"),
            )
        })?,
    };
    Ok(Validated {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
        },
        stop,
        stream: r.stream.unwrap_or(false),
        include_usage,
    })
}

/// A seed as any integral JSON number (`42`, `-1`, `-0`, `7.0`): negative ones wrap, as the
/// i64 -> u64 cast always did.
fn seed_value(n: &serde_json::Number) -> Option<u64> {
    if let Some(u) = n.as_u64() {
        return Some(u);
    }
    if let Some(i) = n.as_i64() {
        return Some(i as u64);
    }
    let f = n.as_f64()?;
    (f.fract() == 0.0 && f >= -(2f64.powi(63)) && f < 2f64.powi(64)).then_some(if f < 0.0 {
        f as i64 as u64
    } else {
        f as u64
    })
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

fn messages(v: Option<Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(v) = v else {
        return Err(invalid(
            "messages",
            "messages is required: [{\"role\": \"user\", \"content\": \"...\"}]",
        ));
    };
    let Value::Array(items) = v else {
        return Err(invalid(
            "messages",
            "messages must be an array of {role, content} objects",
        ));
    };
    if items.is_empty() {
        return Err(invalid("messages", "messages must not be empty"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
            if !ROLES.contains(&role) {
                return Err(invalid(
                    &format!("messages[{i}].role"),
                    format!("messages[{i}].role must be one of system, user, assistant; got {:?}", m.get("role").cloned().unwrap_or(Value::Null)),
                ));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                // OpenAI's content parts: only text parts can reach a text model.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(invalid(
                            &format!("messages[{i}].content"),
                            format!("messages[{i}].content: only {{\"type\": \"text\", \"text\": ...}} parts are supported"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                _ => {
                    return Err(invalid(
                        &format!("messages[{i}].content"),
                        format!("messages[{i}].content must be a string"),
                    ))
                }
            };
            Ok(ChatMessage {
                role: role.to_owned(),
                content,
            })
        })
        .collect()
}

fn prompt_text(v: Option<Value>) -> Result<String, ApiError> {
    let s =
        match v {
            Some(Value::String(s)) => s,
            Some(Value::Array(mut a)) if a.len() == 1 && a[0].is_string() => match a.remove(0) {
                Value::String(s) => s,
                _ => unreachable!("checked is_string"),
            },
            Some(Value::Array(_)) => return Err(invalid(
                "prompt",
                "prompt must be one string (batches of prompts and token arrays are not supported)",
            )),
            None => return Err(invalid("prompt", "prompt is required")),
            Some(_) => return Err(invalid("prompt", "prompt must be a string")),
        };
    if s.is_empty() {
        return Err(invalid("prompt", "prompt must not be empty"));
    }
    Ok(s)
}

/// Template + tokenization + the input limits. Blocking.
fn prepare(gen: &dyn Generator, src: &PromptSource, limits: &Limits) -> Result<Vec<u32>, ApiError> {
    let (text, param) = match src {
        PromptSource::Chat(m) => (gen.render_chat(m).map_err(engine_error)?, "messages"),
        PromptSource::Text(t) => (t.clone(), "prompt"),
    };
    let ctx = gen.info().max_seq_len;
    let limit = limits.max_input_tokens.min(ctx.saturating_sub(1));
    let which = if limit == limits.max_input_tokens {
        "MAX_INPUT_TOKENS"
    } else {
        "the model's context length"
    };
    // Conclusive from the length alone: no token covers more than max_token_bytes bytes.
    let at_least = text.len() / gen.max_token_bytes().max(1);
    if at_least > limit {
        return Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "the prompt is {} bytes, at least {at_least} tokens for this model, more than \
                 the limit of {limit} ({which})",
                text.len()
            ),
        )
        .with_param(param));
    }
    let ids = gen.tokenize(&text).map_err(engine_error);
    if text.len() > TRIM_ABOVE_BYTES {
        drop(text);
        trim_heap();
    }
    let ids = ids?;
    if ids.len() > limit {
        return Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "the prompt has {} tokens, more than the limit of {limit} ({which})",
                ids.len()
            ),
        )
        .with_param(param));
    }
    if ids.is_empty() {
        return Err(invalid(param, "the prompt has no tokens"));
    }
    Ok(ids)
}

/// What every response and chunk of one generation shares.
#[derive(Debug, Clone)]
struct ResponseHead {
    id: String,
    created: u64,
    model: String,
    route: Route,
}

impl ResponseHead {
    fn usage(out: &GenerateOutput) -> Value {
        json!({
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.token_ids.len(),
            "total_tokens": out.prompt_tokens + out.token_ids.len(),
        })
    }

    fn full_body(&self, out: &GenerateOutput) -> Value {
        let choice = match self.route {
            Route::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": null,
                "finish_reason": out.finish_reason,
            }),
            Route::Completions => json!({
                "index": 0, "text": out.text, "logprobs": null, "finish_reason": out.finish_reason,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.route { Route::Chat => "chat.completion", Route::Completions => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": Self::usage(out),
        })
    }

    /// One streamed chunk: a text delta, and/or the finish reason.
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<FinishReason>) -> Value {
        let choice = match self.route {
            Route::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Route::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": match self.route { Route::Chat => "chat.completion.chunk", Route::Completions => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// Starts generation on the blocking pool, sending each text delta as an SSE event.
fn stream_generation(
    gen: Arc<dyn Generator>,
    prompt: Vec<u32>,
    mut params: GenerateParams,
    head: ResponseHead,
    include_usage: bool,
) -> SseStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    // The call returns before the generation ends: the meter goes along, and the entry point's
    // record is written when this task lets go of it, after the last event.
    let meter = meter::current();
    tokio::task::spawn_blocking(move || {
        if head.route == Route::Chat {
            let _ = tx.blocking_send(sse(&head.chunk(Some(""), true, None)));
        }
        // A client that went away closes the channel: cancel at the next token instead of
        // generating into the void.
        let cancel = Arc::new(AtomicBool::new(false));
        params.cancel = Some(cancel.clone());
        let res = gen.generate(&prompt, &params, &mut |t: &str| {
            if tx
                .blocking_send(sse(&head.chunk(Some(t), false, None)))
                .is_err()
            {
                cancel.store(true, Ordering::Relaxed);
            }
        });
        match res {
            Ok(out) => {
                if let Some(m) = &meter {
                    m.update(|s| count_generation(s, &out, true));
                }
                let _ = tx.blocking_send(sse(&head.chunk(None, false, Some(out.finish_reason))));
                if include_usage {
                    let mut u = head.chunk(None, false, None);
                    u["choices"] = json!([]);
                    u["usage"] = ResponseHead::usage(&out);
                    let _ = tx.blocking_send(sse(&u));
                }
            }
            // Headers are already sent: the error travels as an event, as OpenAI does.
            Err(e) => {
                let _ = tx.blocking_send(sse(&engine_error(e).to_body()));
            }
        }
        let _ = tx.blocking_send("data: [DONE]\n\n".to_owned());
    });
    SseStream { rx }
}

/// A finished generation's counts; `deadline_stop`: whether a deadline stop counts here (not for
/// jobs, where [`not_started`] counts it).
fn count_generation(s: &mut meter::CallStats, out: &GenerateOutput, deadline_stop: bool) {
    s.input_tokens += out.prompt_tokens as u64;
    s.output_tokens += out.token_ids.len() as u64;
    s.engine += out.prefill + out.decode;
    if deadline_stop && out.hit_deadline {
        s.deadline_stops += 1;
    }
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `chatcmpl-…` / `cmpl-…`: unique per process (time + counter), no RNG needed.
fn response_id(route: Route) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let prefix = match route {
        Route::Chat => "chatcmpl",
        Route::Completions => "cmpl",
    };
    format!("{prefix}-{t:x}{n:04x}")
}

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::InputTooLong {
            index,
            tokens,
            limit,
        } => ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!("input[{index}] has at least {tokens} tokens, more than the limit of {limit} (MAX_INPUT_TOKENS)"),
        )
        .with_param("input"),
        EngineError::Template(m) => ApiError::new(
            ErrorKind::InvalidValue,
            format!("the model's chat template rejected the messages: {m}"),
        )
        .with_param("messages"),
        EngineError::DeadlineReached { tokens_done } => not_started(&format!(
            "the deadline came before the work was done ({tokens_done} tokens processed); \
             send less per request"
        )),
        e @ EngineError::NoChatTemplate => {
            ApiError::new(ErrorKind::InvalidValue, e.to_string()).with_param("messages")
        }
        other => ApiError::new(ErrorKind::Internal, format!("inference failed: {other}")),
    }
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

/// Requests with more text than this hand their freed memory back to the OS afterwards.
const TRIM_ABOVE_BYTES: usize = 256 * 1024;

/// Returns freed heap memory to the OS. glibc keeps what a large request freed (token records,
/// activations) in its arenas, one per thread that allocated, so RSS would stay at the request's
/// peak for the environment's life, and Lambda bills memory by the configured size but kills at
/// it. Costs about a millisecond; called only after large requests.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
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
    use crate::engine::{ModelInfo, ModelKind};

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
    fn model_ids_in_paths_are_percent_decoded() {
        assert_eq!(percent_decode("Smollm2%20135M"), "Smollm2 135M");
        assert_eq!(percent_decode("caf%C3%A9"), "café");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%ff"), "%zz%ff");
        assert_eq!(percent_decode("plain"), "plain");
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
