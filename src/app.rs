//! Init: configuration -> model bytes -> engine -> service, timed step by step.
//!
//! Runs once per execution environment (the Lambda init phase, or the CLI's start). Both the
//! `bootstrap` binary and the CLI build the same [`App`], so a local invoke exercises exactly what
//! the function runs. Must not run on the request path.

use std::time::Instant;

use serde_json::json;

use crate::artifacts::{self, ArtifactError};
use crate::config::Config;
use crate::engine::{self, EngineError, SharedBytes};
use crate::service::{ModelMeta, Service};

/// Why init failed; `error_type` is the stable name reported to Lambda and in logs.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("InvalidModel: {0}")]
    Engine(#[from] EngineError),
}

impl InitError {
    pub fn error_type(&self) -> &'static str {
        match self {
            InitError::Artifact(a) => a.error_type(),
            InitError::Engine(_) => "InvalidModel",
        }
    }
}

/// Where init time went, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct InitReport {
    pub fetch_ms: f64,
    /// SHA-256 of the bytes (overlapped with the engine build).
    pub verify_ms: f64,
    /// GGUF parse + weight preparation + tokenizer build.
    pub engine_ms: f64,
    pub total_ms: f64,
    pub model_bytes: usize,
}

/// The fetched model bytes as the engine's shared byte buffer.
struct FileBytes(artifacts::ModelBytes);

impl AsRef<[u8]> for FileBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Everything an execution environment serves with.
pub struct App {
    pub service: Service,
    pub report: InitReport,
}

/// Sizes the compute pool. Must run before any candle or rayon work: rayon's global pool is built
/// once, and candle's gemm reads RAYON_NUM_THREADS to split work. Rayon workers park on a condvar
/// after a short yield loop, so idle threads do not burn the function's CPU share.
pub fn configure_threads(threads: usize) {
    // SAFETY of set_var (a plain fn in edition 2021): called at process start, before other
    // threads exist that could read the environment concurrently.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("compute-{i}"))
        .build_global();
}

impl App {
    /// Loads and verifies the model and builds the engine. Blocking (CPU and file I/O).
    pub fn init(config: &Config) -> Result<App, InitError> {
        let t0 = Instant::now();
        let art = artifacts::fetch(&config.model_uri)?;
        let model_bytes = art.bytes.len();
        // Shared with the engine: an embedder copies what it needs and lets go (the bytes are
        // freed when `bytes` drops below); a generator keeps its weights in place, as llama.cpp
        // does with its mmap, instead of holding a second copy of the file.
        let bytes: SharedBytes = std::sync::Arc::new(FileBytes(art.bytes));
        // Hash on one core while the engine is built on the other. Building from bytes not yet
        // verified is harmless: nothing is served, and a mismatch drops the engine and fails init.
        let (hashed, built) = rayon::join(
            || {
                let t = Instant::now();
                (
                    artifacts::sha256_hex((*bytes).as_ref()),
                    t.elapsed().as_secs_f64() * 1e3,
                )
            },
            || {
                let t = Instant::now();
                (
                    engine::load_shared(bytes.clone()),
                    t.elapsed().as_secs_f64() * 1e3,
                )
            },
        );
        let ((sha256, verify_ms), (engine, engine_ms)) = (hashed, built);
        artifacts::verify(&art.source, &sha256, config.model_sha256.as_deref())?;
        let engine = engine?;
        drop(bytes);
        let id = config
            .model_id
            .clone()
            .unwrap_or_else(|| engine.info().name.clone());
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        let report = InitReport {
            fetch_ms: art.fetch_ms,
            verify_ms,
            engine_ms,
            total_ms,
            model_bytes,
        };
        if config.model_sha256.is_none() {
            tracing::info!(sha256 = %sha256, "MODEL_SHA256 unset: digest computed, not enforced");
        }
        tracing::info!(
            target: "cold_start",
            breakdown = %json!({
                "model": id, "source": art.source, "sha256": sha256,
                "threads": config.threads, "threads_reason": config.threads_reason,
                "fetch_ms": report.fetch_ms, "verify_ms": report.verify_ms,
                "engine_ms": report.engine_ms, "total_ms": report.total_ms,
                "bytes": model_bytes,
            }),
            "model ready"
        );
        let meta = ModelMeta {
            id,
            sha256,
            source: art.source,
            init_ms: total_ms,
            threads: config.threads,
        };
        Ok(App {
            service: Service::new(engine, config.limits, meta),
            report,
        })
    }
}

/// JSON logs on stderr (what Lambda's JSON log format expects), level from RUST_LOG or
/// AWS_LAMBDA_LOG_LEVEL, default info.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| {
            EnvFilter::try_new(
                std::env::var("AWS_LAMBDA_LOG_LEVEL")
                    .unwrap_or_else(|_| "info".into())
                    .to_lowercase(),
            )
        })
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(false)
        .try_init();
}
