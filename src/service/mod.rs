//! The service: answers a protocol-neutral request (routing, validation, limits, the engine call
//! off the async executor, the OpenAI response), the same way whatever the entry point.
//!
//! Every event adapter (API Gateway v1/v2, Function URL, direct invoke, and SQS jobs) reduces its
//! event to an [`ApiRequest`] and turns the [`ApiResponse`] back into its own shape, so routing,
//! limits and error bodies are identical whatever the entry point. Generation requests may
//! answer as a stream of server-sent events ([`Reply::Stream`]) where the entry point says it can
//! carry one ([`CallOptions`]), and stop before the invocation's deadline. This module must not
//! see Lambda/AWS event types (the deadline arrives as an `Instant`) and must not call candle
//! directly (only the engine traits).
//!
//! One file per concern:
//! - `routing`: path and method to an API, the request-size limit, `/v1/models`, `/health`,
//!   `/openapi.json`, `/v1/jobs` handed to `jobs`; the per-call metrics' route and status;
//! - `embeddings`: `POST /v1/embeddings`, one request or a batch of jobs sharing forward passes;
//! - `rerank`: `POST /v1/rerank` and TEI's `POST /rerank` on a cross-encoder;
//! - `generation`: `POST /v1/chat/completions` and `/v1/completions`, whole or streamed;
//! - `limits`: the limit checks both APIs share (time budget and deadline, the token-count error);
//! - `cost`, `meter`: what work costs here, and what one call did (for metrics).
//!
//! Both APIs take the same named steps, each a function of that name in its file:
//! `decode` (the JSON body into the request type) -> `validate` (everything that can be refused
//! from the request alone) -> `limit` (what needs the work's size: token counts, the time
//! budget) -> `run` (the engine, on the blocking pool) -> `encode` (the OpenAI response body).
//!
//! # Limits: each checked in one layer
//! The service decides every limit (from [`Limits`] and the model's facts) and checks it before
//! the work it guards. The engine enforces only what needs its tokenizer, with the value the
//! service passes down, and reports it as [`EngineError::InputTooLong`]; every token-count
//! refusal, wherever counted, is the same 413 (`limits::too_many_tokens`).
//!
//! `MAX_INPUT_TOKENS` is that one limit: a token count. For embeddings the engine counts
//! (`BertEmbedder::tokenize_bounded` counts a long input window by window, so its memory stays
//! bounded whatever the input's size; counting here would tokenize it whole), with the limit
//! passed in `Embedder::embed_until`. For generation the `Generator` trait can only tokenize a
//! whole text, with no bound to pass down, so `generation::limit` counts: first a lower bound
//! from the prompt's bytes (`Generator::max_token_bytes`), which refuses a prompt that cannot fit
//! before tokenizing it, then the ids.
//!
//! Where each limit is checked (the first place it can be, before the work it guards):
//! - the route and method, and `MAX_REQUEST_BYTES`: `routing`, for every entry point, before the
//!   body is decoded (`jobs::submit` also bounds a job's queue message by it; `serve` refuses a
//!   larger `content-length` before reading the body);
//! - the model's kind (embedder or generator): each API's first step, before decoding;
//! - `MAX_INPUTS`, empty inputs, `dimensions`, and Lambda's 6 MB response
//!   ([`MAX_RESPONSE_BYTES`], estimated from the inputs, the width and the encoding):
//!   `embeddings::validate`;
//! - sampling ranges, `stop`, `n`, unsupported fields, `stream` where the entry point cannot
//!   stream, and `MAX_NEW_TOKENS` (it caps `max_tokens`, never refuses): `generation::validate`;
//! - `MAX_INPUT_TOKENS`: for embeddings the engine, inside `embeddings::run`; for generation
//!   `generation::limit` (see above);
//! - the model's context: `generation::limit` (the prompt at most context - 1 tokens, `max_tokens`
//!   cut to the room left); an embedder truncates to its window, which refuses nothing;
//! - a job's time budget ([`CallOptions::budget`]): `limits`' `admit`, from each API's `limit`;
//! - the deadline: the engine, forward pass by forward pass (`Embedder::embed_until`,
//!   `GenerateParams::deadline`); generation first keeps [`DEADLINE_MARGIN`] for the answer.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Engine, EngineError};
use crate::error::{ApiError, ErrorKind};
use crate::jobs::JobPorts;

mod cost;
mod embeddings;
mod generation;
mod limits;
pub mod meter;
mod rerank;
mod routing;
// The shared types of the service's signature, defined in the leaf `api` module (so that `config`
// and `jobs`, below the service, can use them too); re-exported here for the service's callers.
pub use crate::api::{parse_body, ApiKeys, ApiResponse, Limits};
pub use cost::CostModel;
pub use limits::{not_started, DEADLINE_MARGIN, MAX_RESPONSE_BYTES, NOT_STARTED_CODE};
pub use routing::{route_template, ApiRequest, Method, OPENAPI_JSON, ROUTES};

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
}

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

/// A service answer: one response, or server-sent events as they are produced.
pub enum Reply {
    Full(ApiResponse),
    Stream(SseStream),
}

/// `text/event-stream` events, each a complete `data: ...\n\n` frame; the last is
/// `data: [DONE]\n\n`. Dropping the receiver stops the generation at its next token.
///
/// It holds the call's meter until its last event is taken (or it is dropped), so the invoke's
/// record is written after the answer has gone out, not when the producer has queued it.
pub struct SseStream {
    rx: tokio::sync::mpsc::Receiver<String>,
    meter: Option<Arc<meter::Meter>>,
}

impl SseStream {
    /// Events from `rx`; `meter` (the call's, if any) is let go at the stream's end.
    pub fn new(rx: tokio::sync::mpsc::Receiver<String>, meter: Option<Arc<meter::Meter>>) -> Self {
        Self { rx, meter }
    }

    /// The next event, or `None` after the last.
    pub async fn recv(&mut self) -> Option<String> {
        std::future::poll_fn(|cx| {
            tokio_stream::Stream::poll_next(std::pin::Pin::new(&mut *self), cx)
        })
        .await
    }

    /// Waits for every event and returns them concatenated (for entry points that buffer).
    pub async fn collect(mut self) -> String {
        let mut out = String::new();
        while let Some(ev) = self.recv().await {
            out.push_str(&ev);
        }
        out
    }
}

impl tokio_stream::Stream for SseStream {
    type Item = String;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<String>> {
        let next = self.rx.poll_recv(cx);
        if let std::task::Poll::Ready(None) = next {
            self.meter = None;
        }
        next
    }
}

/// An engine error as the client's error: the request's fault (too long, a template that refused
/// it), a lack of time (503, try again), or the function's (500).
fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::InputTooLong {
            index,
            tokens,
            limit,
        } => limits::too_many_tokens(
            "input",
            format!("input[{index}] has at least {tokens} tokens"),
            limit,
            "MAX_INPUT_TOKENS",
        ),
        EngineError::Template(m) => ApiError::new(
            ErrorKind::InvalidValue,
            format!("the model's chat template rejected the messages: {m}"),
        )
        .with_param("messages"),
        EngineError::DeadlineReached { tokens_done } => limits::not_started(&format!(
            "the deadline came before the work was done ({tokens_done} tokens processed); \
             send less per request"
        )),
        e @ EngineError::NoChatTemplate => {
            ApiError::new(ErrorKind::InvalidValue, e.to_string()).with_param("messages")
        }
        other => ApiError::new(ErrorKind::Internal, format!("inference failed: {other}")),
    }
}

/// Requests past any of these hand their freed memory back to the OS afterwards: the text (token
/// records), the items (one output each) or the tokens run (activations grow with tokens x width;
/// 32 full 256-token windows left 13-24 MB behind at random in tests/memory.rs, where glibc's
/// dynamic trim threshold, up to 64 MB, kept the top of the heap).
const TRIM_ABOVE_BYTES: usize = 256 * 1024;
const TRIM_ABOVE_ITEMS: usize = 256;
const TRIM_ABOVE_TOKENS: usize = 2048;

/// Trims the heap ([`trim_heap`]) after a request this large; a no-op for ordinary requests,
/// whose millisecond the trim would add to.
pub fn trim_after(text_bytes: usize, items: usize, tokens: usize) {
    if text_bytes > TRIM_ABOVE_BYTES || items > TRIM_ABOVE_ITEMS || tokens > TRIM_ABOVE_TOKENS {
        trim_heap();
    }
}

/// Returns freed heap memory to the OS. glibc keeps what a large request freed (token records,
/// activations) in its arena, so RSS would stay at the request's peak for the environment's life,
/// and Lambda bills memory by the configured size but kills at it. Costs about a millisecond.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
