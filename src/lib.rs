//! lambda-inference: quantized model inference as one AWS Lambda container function.
//!
//! Module map, and the one dependency rule (arrows point to what a module may use):
//!
//! ```text
//! main.rs (bootstrap) / bin/lambda-inference.rs (CLI: invoke, serve, convert, bench)
//!     -> app        init: config -> artifacts -> engine -> service, timed
//!     -> events     decode Lambda events (API Gateway v1/v2, Function URL, direct) into
//!                   service requests and encode the answers back (Function URL streams as
//!                   server-sent events); no candle, no inference
//!     -> jobs       SQS worker + /v1/jobs: job parsing, result store and queue ports (traits;
//!                   jobs/aws.rs implements them on S3/SQS), runs jobs through the service
//!     -> service    routing, validation, limits, batching, engine calls off the executor,
//!                   OpenAI shapes, SSE chunks, the deadline margin
//!     -> engine     tokenizers + models (BERT embedder, llama generator), kernels, sampling,
//!                   chat templates; no AWS/Lambda types, no I/O
//! artifacts         model bytes from a file or S3 (ArtifactStore) + SHA-256; used at init only
//! aws               the one place AWS SDK clients are built (default credential chain)
//! metrics           CloudWatch EMF records (cold start, per request, init errors): the one
//!                   table of namespace, metric names, units and dimensions; entry points only
//! config            every environment variable, read once, typed, errors name the variable
//! error             error kind -> HTTP status, OpenAI body, Lambda error type (one table)
//! convert           Hugging Face folder -> GGUF (the `convert` subcommand); engine-level names
//! ```

pub mod app;
pub mod artifacts;
pub mod aws;
pub mod config;
pub mod convert;
pub mod engine;
pub mod error;
pub mod events;
pub mod jobs;
pub mod metrics;
pub mod service;
