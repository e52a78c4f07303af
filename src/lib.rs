//! lambda-inference: quantized model inference as one AWS Lambda container function.
//!
//! Module map, top layer first; arrows point to what a module may use. The exact list of allowed
//! edges is `src/layers.txt`, and `tests/layers.rs` fails on any import not in it:
//!
//! ```text
//! main.rs (bootstrap) / bin/lambda-inference/ (CLI: invoke, serve, convert, bench; the
//!                   Hugging Face -> GGUF converter lives in the CLI: bootstrap never links it)
//!     -> app        init: config -> artifacts -> engine -> service, timed; job ports; metrics
//!     -> metrics    CloudWatch EMF records (cold start, per request, init errors): the one
//!                   table of namespace, metric names, units and dimensions; entry points only
//!     -> events     decode Lambda events (API Gateway v1/v2, Function URL, direct, SQS) into
//!                   service requests and encode the answers back (Function URL streams as
//!                   server-sent events); no candle, no inference
//!     -> worker     the SQS jobs worker: runs a batch of job messages through the service
//!     -> service    routing, validation, limits, batching, engine calls off the executor,
//!                   OpenAI shapes, SSE chunks, the deadline margin
//!     -> jobs       /v1/jobs submit and status, job parsing, result store and queue ports
//!                   (traits; jobs/aws.rs implements them on S3/SQS); never the service
//!     -> engine     tokenizers + models (BERT embedder, llama generator), kernels, sampling,
//!                   chat templates; no AWS/Lambda types, no I/O, nothing else of the crate
//! xray              X-Ray subsegments of sampled invokes, as UDP datagrams to Lambda's daemon;
//!                   entry points only
//! artifacts         model bytes from a file or S3 (ArtifactStore) + SHA-256; used at init only
//! threads           the compute pool's size (THREADS, Lambda's vCPU share, the cgroup quota)
//! aws               the one place AWS SDK clients are built (default credential chain)
//! config            every environment variable, declared once (config::VARS), read once, typed;
//!                   errors name the variable
//! api               shared request/response types: Limits, ApiResponse, parse_body, API keys
//!                   and the caller's Owner (a leaf: only error and hex)
//! hex, error        lowercase hex; error kind -> HTTP status, OpenAI body, Lambda error type
//! ```

pub mod api;
pub mod app;
pub mod artifacts;
pub mod aws;
pub mod config;
pub mod engine;
pub mod error;
pub mod events;
pub mod hex;
pub mod jobs;
pub mod metrics;
pub mod service;
pub mod threads;
pub mod worker;
pub mod xray;
