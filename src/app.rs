//! Init: configuration -> model bytes (and API keys) -> engine -> service, timed step by step.
//!
//! Runs once per execution environment (the Lambda init phase, or the CLI's start). Both the
//! `bootstrap` binary and the CLI build the same [`App`], so a local invoke exercises exactly what
//! the function runs. [`LazyApp`] is the bootstrap's view of it: a load started before the runtime
//! loop that the first invoke can await if it outlives the init budget. Must not run on the
//! request path (except that one await).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use serde_json::{json, Value};

use crate::api::ApiKeys;
use crate::artifacts::{self, Artifact, ArtifactError, ArtifactStore, FetchStats, ModelDigest};
use crate::config::Config;
use crate::engine::{self, EngineError, SharedBytes};
use crate::service::{ModelMeta, Service};

/// Why init failed; [`InitError::error_type`] is the stable name reported to Lambda and in logs,
/// written only there: the message (`Display`) does not repeat it.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// The load task panicked or was cancelled: a bug, never the model's fault.
    #[error("{0}")]
    Panicked(String),
    /// The API keys (API_KEYS_SECRET_ARN) could not be read or are not usable: nothing is served
    /// rather than serving without the authentication the deployment asked for.
    #[error("{message}")]
    AuthConfig { message: String, permanent: bool },
    /// SnapStart's after-restore step failed for a reason the other variants do not name.
    #[error("{message}")]
    Restore {
        error_type: &'static str,
        message: String,
    },
}

impl InitError {
    /// Whether a new load in this environment would fail the same way (a wrong digest, a model
    /// the engine cannot run, a missing object or permission): such a failure is kept for the
    /// environment's life instead of re-downloading the model on every request.
    pub fn is_permanent(&self) -> bool {
        match self {
            InitError::Artifact(a) => a.is_permanent(),
            InitError::Engine(_) => true,
            InitError::Panicked(_) => false,
            InitError::AuthConfig { permanent, .. } => *permanent,
            InitError::Restore { .. } => true,
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            InitError::Artifact(a) => a.error_type(),
            InitError::Engine(_) => "InvalidModel",
            InitError::Panicked(_) => "InitPanic",
            InitError::AuthConfig { .. } => "AuthConfig",
            InitError::Restore { error_type, .. } => error_type,
        }
    }
}

/// Where init time went, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct InitReport {
    /// Fetch (S3: until the last byte landed; file: mmap).
    pub fetch_ms: f64,
    /// SHA-256 of the bytes: for a mapped file, overlapped with the engine build; for a download,
    /// the hashing left after the last byte landed (none when the hash kept up with the
    /// download; otherwise overlapped with the engine build).
    pub verify_ms: f64,
    /// GGUF parse + weight preparation + tokenizer build.
    pub engine_ms: f64,
    pub total_ms: f64,
    /// When the verification (hashing left to do) and the engine build began, in ms after the
    /// load started: the init subsegments' start times (crate::xray).
    pub verify_at_ms: f64,
    pub engine_at_ms: f64,
    /// When the load started (wall clock).
    #[serde(skip)]
    pub started: Option<std::time::SystemTime>,
    pub model_bytes: usize,
    pub fetch: FetchStats,
    pub sha256: String,
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

/// Applies the process-wide engine settings: the int8 kernel choice and the compute pool. Must
/// run before any model is loaded.
pub fn configure(config: &Config) {
    // One malloc arena for the whole process. glibc gives each thread that allocates its own
    // arena, and malloc_trim (service::trim_heap, after large requests) cannot shrink the top of
    // a thread's arena: the compute pool's arenas kept tens of MB of a large request's freed
    // activations for the environment's life (tests/memory.rs). The allocations here are few and
    // large (tensors per op), so one lock costs nothing measurable.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    use crate::config::Int8Kernel;
    engine::qgemm::cap_kernel(match config.int8_kernel {
        Int8Kernel::Auto => engine::qgemm::Kernel::Amx,
        Int8Kernel::Vnni => engine::qgemm::Kernel::Vnni,
        Int8Kernel::Avx2 => engine::qgemm::Kernel::Avx2,
        Int8Kernel::AmxBf16 => engine::qgemm::Kernel::AmxBf16,
    });
    configure_threads(crate::threads::pool_size(config).threads);
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
    /// Loads and verifies the model and builds the engine, blocking the calling thread (the CLI).
    /// Must not be called from inside a tokio runtime; async callers use [`App::load`].
    pub fn init(config: &Config) -> Result<App, InitError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ArtifactError::Io(format!("starting the fetch runtime: {e}")))?;
        rt.block_on(Self::load(config))
    }

    /// Fetches the model (async I/O), then verifies it and builds the engine on a blocking
    /// thread, so that a runtime loop sharing this executor keeps answering meanwhile.
    pub async fn load(config: &Config) -> Result<App, InitError> {
        let t0 = Instant::now();
        let started = std::time::SystemTime::now();
        // The job clients (if RESULTS_URI / JOBS_QUEUE_URL are set) are made while the model
        // downloads; they do no I/O until the first job. The API keys are read meanwhile too.
        let (art, jobs, keys) = tokio::join!(
            artifacts::fetch(config),
            crate::jobs::aws::ports(config),
            api_keys(config)
        );
        let art = art?;
        let keys = keys?;
        let config = config.clone();
        let app = tokio::task::spawn_blocking(move || Self::build(art, &config, t0, started))
            .await
            .map_err(|e| InitError::Panicked(format!("engine build: {e}")))??;
        let service = app.service.with_jobs(jobs);
        Ok(App {
            service: match keys {
                Some(keys) => service.with_api_keys(keys),
                None => service,
            },
            report: app.report,
        })
    }

    fn build(
        art: Artifact,
        config: &Config,
        t0: Instant,
        started: std::time::SystemTime,
    ) -> Result<App, InitError> {
        let model_bytes = art.bytes.len();
        let since_t0 = || t0.elapsed().as_secs_f64() * 1e3;
        let verify_at_ms = since_t0();
        // Shared with the engine: an embedder copies what it needs and lets go (the bytes are
        // freed when `bytes` drops below); a generator keeps its weights in place, as llama.cpp
        // does with its mmap, instead of holding a second copy of the file.
        let bytes: SharedBytes = Arc::new(FileBytes(art.bytes));
        let engine_at = std::sync::OnceLock::new();
        let build = || {
            let t = Instant::now();
            let _ = engine_at.set(since_t0());
            let engine = engine::load_shared(bytes.clone());
            (engine, t.elapsed().as_secs_f64() * 1e3)
        };
        let expected = config.model_sha256.as_deref();
        let (sha256, verify_ms, engine, engine_ms) = match art.digest {
            // Hashed while it arrived, and the hash kept up: check before building, so a wrong
            // model is never even parsed.
            digest if digest.is_ready() => {
                let (sha, verify_ms) = digest.wait((*bytes).as_ref());
                artifacts::verify(&art.source, &sha, expected)?;
                let (engine, engine_ms) = build();
                (sha, verify_ms, engine, engine_ms)
            }
            // Not hashed yet: the hash runs on one core while the engine is built on this one.
            // Building from bytes not yet verified is harmless: nothing is served, and a
            // mismatch drops the engine and fails init.
            digest => {
                let ((sha, verify_ms), (engine, engine_ms)) = match digest {
                    // A download that outran its hashing thread (the server shared our cores):
                    // that thread finishes on its own.
                    ModelDigest::Following { .. } => {
                        let built = build();
                        (digest.wait((*bytes).as_ref()), built)
                    }
                    // A mapped file: hashed on a second rayon worker.
                    ModelDigest::ByCaller => rayon::join(|| digest.wait((*bytes).as_ref()), build),
                };
                artifacts::verify(&art.source, &sha, expected)?;
                (sha, verify_ms, engine, engine_ms)
            }
        };
        let engine = engine?;
        drop(bytes);
        let id = config
            .model_id
            .clone()
            .unwrap_or_else(|| engine.info().name.clone());
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        let report = InitReport {
            fetch_ms: art.stats.fetch_ms,
            verify_ms,
            engine_ms,
            total_ms,
            verify_at_ms,
            engine_at_ms: engine_at.get().copied().unwrap_or(verify_at_ms),
            started: Some(started),
            model_bytes,
            fetch: art.stats,
            sha256: sha256.clone(),
        };
        if config.model_sha256.is_none() {
            tracing::info!(sha256 = %sha256, "MODEL_SHA256 unset: digest computed, not enforced");
        }
        let pool = crate::threads::pool_size(config);
        tracing::info!(
            target: "model_ready",
            model = %id, source = %art.source, sha256 = %sha256,
            threads = pool.threads, threads_reason = %pool.reason,
            fetch = %json!(report.fetch), verify_ms, engine_ms, total_ms,
            "model ready"
        );
        let meta = ModelMeta {
            id,
            sha256,
            source: art.source,
            init_ms: total_ms,
            threads: pool.threads,
        };
        Ok(App {
            service: Service::new(engine, config.limits, meta),
            report,
        })
    }
}

/// The keys API Gateway requests must carry: API_KEYS and the secret at API_KEYS_SECRET_ARN
/// together; `None` when neither is set (the gateway authenticates, or nobody does).
async fn api_keys(config: &Config) -> Result<Option<ApiKeys>, InitError> {
    let Some(arn) = &config.api_keys_secret_arn else {
        return Ok(config.api_keys.clone());
    };
    let sdk = crate::aws::sdk_config().await;
    let text = crate::aws::secret_string(&sdk, arn, config.fetch.deadline)
        .await
        .map_err(|e| InitError::AuthConfig {
            message: format!("API_KEYS_SECRET_ARN: {e}"),
            permanent: e.permanent,
        })?;
    let keys = ApiKeys::from_secret_json(&text).map_err(|e| InitError::AuthConfig {
        message: format!("API_KEYS_SECRET_ARN {arn}: {e}"),
        permanent: true,
    })?;
    tracing::info!(keys = keys.len(), "API keys read from API_KEYS_SECRET_ARN");
    Ok(Some(match config.api_keys.clone() {
        Some(local) => keys.merge(local),
        None => keys,
    }))
}

/// A load shared by everyone who waits for it: init (up to its budget) and the first invoke.
type LoadFuture = Shared<BoxFuture<'static, Result<Arc<App>, Arc<InitError>>>>;

/// The bootstrap's App: loading in the background from before the runtime loop starts.
///
/// Init waits for the load up to the budget ([`LazyApp::wait`]); an invoke awaits the same load
/// ([`LazyApp::get`]), so a model that takes longer than Lambda's 10 s init cap finishes during the
/// first invoke instead of being killed with init. A permanent failure
/// ([`InitError::is_permanent`]) is kept for the environment's life: every invoke answers it at
/// once. A transient one (a network failure, a timeout) is retried by a later invoke, no sooner
/// than a backoff that doubles with each failure (1 s up to 60 s): until then invokes answer the
/// last error without touching S3.
pub struct LazyApp {
    config: Arc<Config>,
    current: Mutex<Option<LoadFuture>>,
    /// The last transient failure: when, how many in a row, and the error.
    backoff: Mutex<Option<(Instant, u32, Arc<InitError>)>>,
}

/// The wait before retrying a transient load failure after `failures` in a row.
pub fn load_backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

impl LazyApp {
    /// Starts loading now, on the current tokio runtime: the load runs as its own task and makes
    /// progress while init waits and while the runtime loop polls for events.
    pub fn start(config: Config) -> LazyApp {
        let config = Arc::new(config);
        let first = Self::spawn(config.clone());
        LazyApp {
            config,
            current: Mutex::new(Some(first)),
            backoff: Mutex::new(None),
        }
    }

    fn spawn(config: Arc<Config>) -> LoadFuture {
        let task =
            tokio::spawn(async move { App::load(&config).await.map(Arc::new).map_err(Arc::new) });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(Arc::new(InitError::Panicked(format!(
                    "model load task: {e}"
                ))))
            })
        }
        .boxed()
        .shared()
    }

    fn current(&self) -> LoadFuture {
        let mut cur = self
            .current
            .lock()
            .expect("LazyApp lock is never held across a panic");
        cur.get_or_insert_with(|| Self::spawn(self.config.clone()))
            .clone()
    }

    /// Waits up to `budget` for the load. `None`: still loading; the caller moves on.
    pub async fn wait(&self, budget: Duration) -> Option<Result<Arc<App>, Arc<InitError>>> {
        tokio::time::timeout(budget, self.current()).await.ok()
    }

    /// The loaded App, awaiting the load in progress (or starting a new one after a transient
    /// failure, once its backoff has passed).
    pub async fn get(&self) -> Result<Arc<App>, Arc<InitError>> {
        {
            let backoff = self.backoff.lock().expect("never held across a panic");
            if let Some((at, failures, e)) = backoff.as_ref() {
                let cur = self.current.lock().expect("never held across a panic");
                if cur.is_none() && at.elapsed() < load_backoff(*failures) {
                    return Err(e.clone());
                }
            }
        }
        let fut = self.current();
        let r = fut.clone().await;
        match &r {
            Err(e) if !e.is_permanent() => {
                // Same order as above (backoff, then current): no lock-order inversion.
                let mut backoff = self.backoff.lock().expect("never held across a panic");
                let mut cur = self.current.lock().expect("never held across a panic");
                if cur.as_ref().is_some_and(|c| c.ptr_eq(&fut)) {
                    *cur = None;
                    let failures = backoff.as_ref().map_or(0, |b| b.1) + 1;
                    *backoff = Some((Instant::now(), failures, e.clone()));
                }
            }
            Ok(_) => *self.backoff.lock().expect("never held across a panic") = None,
            // Permanent: the failed load stays current, so every later call answers it at once.
            Err(_) => {}
        }
        r
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// SnapStart's after-restore work: what init made once and every environment restored from
    /// the snapshot would otherwise share or trust without looking.
    ///
    /// 1. Randomness: nothing here keeps random state from init (job ids read getrandom(2) per id,
    ///    sampling seeds are drawn per request), so there is nothing to re-seed; the hook draws
    ///    the environment's own id from the kernel after the restore, so that restored
    ///    environments are told apart in the logs (SnapStart environments have no log stream
    ///    name).
    /// 2. Credentials: the SDK clients init made (job results, queue) cached the credentials of
    ///    the environment that was snapshotted; they are rebuilt from a fresh SDK configuration,
    ///    which fetches this environment's own credentials on its first call.
    /// 3. API keys: read again from API_KEYS_SECRET_ARN (the secret may have been rotated since
    ///    the snapshot was taken).
    /// 4. Model digest: a model mapped from a file (the image's) is hashed again and must match
    ///    the digest verified at init; a model downloaded from S3 is not fetched again (that is
    ///    the work SnapStart saves): its recorded digest is checked against MODEL_SHA256.
    ///
    /// Then the served App is replaced by one with the new clients and keys (the engine is
    /// shared, not rebuilt). An error fails the restore: the caller reports it to the Runtime
    /// API's restore error path and nothing is served from this environment.
    pub async fn after_restore(&self) -> Result<RestoreReport, InitError> {
        let t0 = Instant::now();
        let app = self.get().await.map_err(|e| InitError::Restore {
            error_type: e.error_type(),
            message: format!("the snapshot holds no loaded model: {e}"),
        })?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| InitError::Restore {
            error_type: "RestoreFailed",
            message: format!("getrandom after restore: {e}"),
        })?;
        let environment = crate::hex::hex(&id);
        let config = self.config.clone();
        let meta = app.service.meta().clone();
        let t_digest = Instant::now();
        let digest = recheck_digest(&config, &meta.sha256).await?;
        let digest_ms = t_digest.elapsed().as_secs_f64() * 1e3;
        let (jobs, keys) = tokio::join!(crate::jobs::aws::ports(&config), api_keys(&config));
        let keys = keys?;
        let report = RestoreReport {
            environment,
            sha256: meta.sha256.clone(),
            digest,
            digest_ms,
            api_keys: keys.as_ref().map(ApiKeys::len),
            jobs: jobs.results.is_some() || jobs.queue.is_some(),
            total_ms: 0.0,
        };
        let service =
            Service::new(app.service.engine().clone(), config.limits, meta).with_jobs(jobs);
        let restored = App {
            service: match keys {
                Some(keys) => service.with_api_keys(keys),
                None => service,
            },
            report: app.report.clone(),
        };
        let ready: LoadFuture = futures_util::future::ready(Ok(Arc::new(restored)))
            .boxed()
            .shared();
        *self.current.lock().expect("never held across a panic") = Some(ready);
        Ok(RestoreReport {
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
            ..report
        })
    }
}

/// What [`LazyApp::after_restore`] did, for the `after_restore` log line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// This environment's id, drawn after the restore (16 hex digits).
    pub environment: String,
    /// The digest of the model served (verified at init, checked again here).
    pub sha256: String,
    /// How the digest was checked: `file re-hashed` or `recorded, against MODEL_SHA256`.
    pub digest: &'static str,
    pub digest_ms: f64,
    /// How many API keys were read again (None: none are checked here).
    pub api_keys: Option<usize>,
    /// Whether job clients were rebuilt (RESULTS_URI or JOBS_QUEUE_URL set).
    pub jobs: bool,
    pub total_ms: f64,
}

/// The digest check of [`LazyApp::after_restore`]: says how it checked, or fails with the
/// artifact's DigestMismatch.
async fn recheck_digest(config: &Config, verified: &str) -> Result<&'static str, InitError> {
    let expected = config.model_sha256.as_deref();
    match &config.model_uri {
        uri @ crate::config::ModelUri::File(_) => {
            let art = artifacts::FileArtifactStore.fetch(uri).await?;
            let source = art.source.clone();
            let sha = tokio::task::spawn_blocking(move || artifacts::sha256_hex(&art.bytes))
                .await
                .map_err(|e| InitError::Panicked(format!("digest after restore: {e}")))?;
            // Against what init verified, and against MODEL_SHA256 when it is set.
            artifacts::verify(&source, &sha, Some(verified))?;
            artifacts::verify(&source, &sha, expected)?;
            Ok("file re-hashed")
        }
        uri => {
            artifacts::verify(&uri.to_string(), verified, expected)?;
            Ok("recorded, against MODEL_SHA256")
        }
    }
}

/// The cold start of one execution environment, from process start to the first answer.
#[derive(Debug, Clone, Default)]
pub struct ColdStart {
    /// Process start -> configuration read and validated.
    pub config_ms: f64,
    /// How long init waited for the model (capped by INIT_BUDGET_MS unless provisioned).
    pub init_wait_ms: f64,
    /// Whether the load outlived the init budget and finished during the first invoke.
    pub continued_into_invoke: bool,
    /// The first invoke: awaiting the rest of the load (if any) + answering.
    pub first_invoke_ms: f64,
    /// Process start (a SnapStart environment: its restore) -> first answer ready.
    pub total_ms: f64,
    /// SnapStart: how long the after-restore hooks took; `None` when not restored.
    pub restore_ms: Option<f64>,
}

/// The cold-start breakdown as one JSON object that is both a structured log line and a
/// CloudWatch Embedded Metric Format record (the `_aws` key): printed as one line on stdout,
/// Lambda ships it to CloudWatch Logs, which extracts the metrics without any API call. Its
/// metric names, units and dimensions are [`crate::metrics::COLD_START`].
pub fn cold_start_record(
    init: &InitReport,
    cold: &ColdStart,
    function: Option<&str>,
    unix_ms: u128,
) -> Value {
    let f = &init.fetch;
    let metrics: Vec<Value> = crate::metrics::COLD_START[0]
        .metrics
        .iter()
        .map(|(n, u)| json!({"Name": n, "Unit": u}))
        .collect();
    json!({
        "_aws": {
            "Timestamp": unix_ms as u64,
            "CloudWatchMetrics": [{
                "Namespace": crate::metrics::NAMESPACE,
                "Dimensions": crate::metrics::COLD_START[0].dimensions,
                "Metrics": metrics,
            }],
        },
        "FunctionName": function.unwrap_or("local"),
        "event": "cold_start",
        "ConfigMs": cold.config_ms,
        "FirstByteMs": f.first_byte_ms,
        "FetchMs": f.fetch_ms,
        "FetchMBps": f.mb_per_s,
        "FetchRetries": f.retries,
        "VerifyMs": init.verify_ms,
        "EngineMs": init.engine_ms,
        "FirstInvokeMs": cold.first_invoke_ms,
        "ColdStartMs": cold.total_ms,
        "fetch_plan": f.plan,
        "fetch_bytes": f.bytes,
        "fetch_chunks": f.chunks,
        "etag": f.etag,
        "sha256": init.sha256,
        "load_ms": init.total_ms,
        "init_wait_ms": cold.init_wait_ms,
        "continued_into_invoke": cold.continued_into_invoke,
        "restored": cold.restore_ms.is_some(),
        "restore_ms": cold.restore_ms,
    })
}

/// JSON logs on stderr (what Lambda's JSON log format expects), level from RUST_LOG or
/// AWS_LAMBDA_LOG_LEVEL, default info.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = crate::config::log_filters()
        .into_iter()
        .find_map(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // The span an invoke runs in (`invoke`, with the Lambda request id), not the whole list.
        .with_current_span(true)
        .with_span_list(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stable name is said once: `error_type()` is its one home, the message never repeats it
    /// (entry points print `"{type}: {message}"`; "ModelNotFound: ModelNotFound: ..." was the bug).
    #[test]
    fn an_init_error_names_its_type_once() {
        let errors = [
            InitError::Artifact(ArtifactError::NotFound("/m.gguf: no such file".into())),
            InitError::Artifact(ArtifactError::AccessDenied("s3://b/k: 403".into())),
            InitError::Artifact(ArtifactError::DigestMismatch {
                uri: "/m.gguf".into(),
                expected: "00".into(),
                actual: "11".into(),
            }),
            InitError::Artifact(ArtifactError::Timeout("after 60 s".into())),
            InitError::Artifact(ArtifactError::Io("connection reset".into())),
            InitError::Artifact(ArtifactError::Unsupported("http://x".into())),
            InitError::Engine(EngineError::InvalidModel(
                "no tensor token_embd.weight".into(),
            )),
            InitError::Panicked("engine build: boom".into()),
            InitError::AuthConfig {
                message: "the secret has no key".into(),
                permanent: true,
            },
        ];
        for e in errors {
            let t = e.error_type();
            let printed = format!("{t}: {e}");
            assert_eq!(printed.matches(t).count(), 1, "{printed}");
            assert!(!e.to_string().starts_with(t), "{e}");
        }
    }
}
