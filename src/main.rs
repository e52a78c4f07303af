//! `bootstrap`: the Lambda function. Reads the configuration, starts the model load, waits for it
//! up to the init budget, then serves every event through the same handler as the CLI's `invoke`.
//!
//! Init, step by step (the why is in `app::LazyApp`):
//! 1. configuration (a bad variable is an init error named after it);
//! 2. the model load starts as a task: fetch (S3 or file), verify, engine build;
//! 3. init waits up to INIT_BUDGET_MS (9 s: Lambda kills an on-demand init at 10 s), or for the
//!    whole load under provisioned concurrency; a load that fails in that time is reported on the
//!    Runtime API's init error path with its stable error type, and the process exits;
//! 4. under SnapStart (AWS_LAMBDA_INITIALIZATION_TYPE=snap-start), lambda_runtime asks the Runtime
//!    API for `/restore/next`, Lambda snapshots the environment while that request waits, and it
//!    returns in each environment restored from the snapshot; the runtime then runs
//!    [`SnapStartHooks::after_restore`] (`app::LazyApp::after_restore`: fresh credentials, API keys
//!    read again, model digest checked again), whose failure lambda_runtime reports on
//!    `/restore/error`. Elsewhere lambda_runtime skips the step;
//! 5. the runtime loop starts; the first invoke awaits the rest of the load if there is any, and a
//!    failure then answers that invoke with the same error type.
//!
//! Responses are buffered JSON, except through the doors that invoke the function with response
//! streaming: a Function URL of InvokeMode RESPONSE_STREAM (FUNCTION_URL_INVOKE_MODE) and a REST
//! API integration of responseTransferMode STREAM (REST_API_TRANSFER_MODE). Every answer through
//! those goes out in Lambda response streaming's wire format: the HTTP metadata prelude (status,
//! headers), eight NUL bytes, then the body: a `stream: true` generation's server-sent events as
//! they are made, any other answer as one chunk.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use lambda_inference::app::{self, ColdStart, LazyApp};
use lambda_inference::config::{self, Config};
use lambda_inference::error::{self, ApiError, ErrorKind};
use lambda_inference::events::http::{HttpReply, SSE_HEADERS, SSE_STATUS};
use lambda_inference::events::{self, EventReply, Invocation, Source};
use lambda_inference::metrics;
use lambda_inference::service::{meter, SseStream};
use lambda_inference::xray::{Daemon, Subsegment, Trace};
use lambda_runtime::{
    service_fn, BoxFuture, Diagnostic, Error, FunctionResponse, LambdaEvent, MetadataPrelude,
    Runtime, SnapStartResource, StreamResponse,
};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_stream::StreamExt;
use tracing::Instrument;

/// The body stream Lambda sends after the prelude: SSE frames as they are produced.
type SseBody = tokio_stream::adapters::Map<SseStream, fn(String) -> Result<String, Infallible>>;

fn main() -> Result<(), Error> {
    let t_start = Instant::now();
    app::init_tracing();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return Err(init_failed("InvalidConfig", &e.to_string())),
    };
    let config_ms = t_start.elapsed().as_secs_f64() * 1e3;
    app::configure(&config);
    // One executor thread is plenty: requests arrive one at a time, and forward passes and the
    // engine build run on the blocking pool + the compute pool, not on the executor.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let budget = (!config.wait_for_whole_load).then_some(config.init_budget);
        let lazy = Arc::new(LazyApp::start(config));
        let waited = match budget {
            Some(b) => lazy.wait(b).await,
            None => Some(lazy.get().await),
        };
        let init_wait_ms = t_start.elapsed().as_secs_f64() * 1e3 - config_ms;
        match &waited {
            Some(Err(e)) => return Err(init_failed(e.error_type(), &e.to_string())),
            Some(Ok(_)) => {}
            None => tracing::warn!(
                budget_ms = budget.unwrap_or_default().as_millis() as u64,
                "model not ready within INIT_BUDGET_MS: init ends here, the first invoke awaits \
                 the rest of the load"
            ),
        }
        let cold = ColdStart {
            config_ms,
            init_wait_ms,
            continued_into_invoke: waited.is_none(),
            ..ColdStart::default()
        };
        let first_done = AtomicBool::new(false);
        let hooks = Arc::new(SnapStartHooks {
            lazy: lazy.clone(),
            restored: OnceLock::new(),
        });
        let (lazy, cold, first_done, restored) = (&*lazy, &cold, &first_done, &hooks.restored);
        // The payload arrives as raw JSON text and is parsed here, not by lambda_runtime: JSON
        // that Lambda delivers but serde_json refuses as a Value (a lone surrogate escape such as
        // "\ud800", nesting deeper than 128) must get a 400 in the client's shape, not a
        // Lambda-level error named after a Rust type. Capturing raw text checks neither.
        // lambda_runtime::run, plus the SnapStart hooks (run only under SnapStart).
        let handler = service_fn(move |event: LambdaEvent<Box<RawValue>>| {
            // Every log line of the invoke carries its request id (`span.requestId` in the JSON
            // log), as its metrics record does (`requestId`).
            let span = tracing::info_span!("invoke", requestId = %event.context.request_id);
            async move {
                let t = Instant::now();
                let deadline = deadline_instant(event.context.deadline());
                let request_id = event.context.request_id.clone();
                let traced = Traced::of(
                    lazy.config(),
                    event.context.xray_trace_id.as_deref(),
                    &request_id,
                );
                // Requests this large leave freed memory in glibc's arenas: trimmed afterwards.
                let large = event.payload.get().len() > 256 * 1024;
                let payload = match serde_json::from_str::<Value>(event.payload.get()) {
                    Ok(v) => v,
                    // Only a direct invoke can carry such JSON: AWS event sources write their own.
                    Err(e) => {
                        let body = ApiError::new(
                            ErrorKind::InvalidJson,
                            format!("the payload is not JSON this function can read: {e}"),
                        )
                        .to_body();
                        unmetered(lazy.config(), &request_id, Source::Direct, 400, t, traced);
                        return Ok(FunctionResponse::BufferedResponse(body));
                    }
                };
                let source = events::detect(&payload);
                let config = lazy.config();
                // Invoked through a door that streams: every answer must go out streamed (a
                // buffered envelope would reach the client as text, or fail the gateway).
                let streams = match source {
                    Source::FunctionUrl => config.function_url_streaming,
                    Source::RestApiV1 => config.rest_api_streaming,
                    _ => false,
                };
                let app = match lazy.get().await {
                    Ok(app) => app,
                    Err(e) => {
                        let function = function_name(config);
                        emit_init_error(&function, e.error_type(), &e.to_string());
                        unmetered(config, &request_id, source, 503, t, traced);
                        return load_failed(source, e.error_type(), &e.to_string())
                            .map(|reply| respond(reply, streams));
                    }
                };
                let invocation = Invocation {
                    deadline,
                    received: t,
                    url_streams: config.function_url_streaming,
                    rest_streams: config.rest_api_streaming,
                };
                // The invoke's `request` metrics record is written when `meter` and every copy
                // of it are dropped: below for a buffered answer, after a stream's last event.
                let sent = traced.clone();
                let meter = metrics::request_meter(
                    metrics::Invoke {
                        function: function_name(lazy.config()),
                        request_id: request_id.clone(),
                        source: source.name(),
                        model: app.service.meta().id.clone(),
                        received: t,
                    },
                    move |line| {
                        println!("{line}");
                        if let Some(tr) = &sent {
                            tr.send_inference(line);
                        }
                    },
                );
                let reply = meter::scope(
                    meter.clone(),
                    events::handle_call(&app.service, payload, Some(invocation)),
                )
                .await;
                if large {
                    // The request's buffers are free now; its answer is freed once sent, so the
                    // heap is trimmed again then (the task runs while the runtime sends).
                    lambda_inference::service::trim_heap();
                    tokio::spawn(async {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        lambda_inference::service::trim_heap();
                    });
                }
                if !first_done.swap(true, Ordering::Relaxed) {
                    // A restored environment's cold start runs from its restore: init happened
                    // when the version was published.
                    let (since, restore_ms) = match restored.get() {
                        Some(&(at, ms)) => (at, Some(ms)),
                        None => (t_start, None),
                    };
                    let cold = ColdStart {
                        first_invoke_ms: t.elapsed().as_secs_f64() * 1e3,
                        total_ms: since.elapsed().as_secs_f64() * 1e3,
                        restore_ms,
                        ..cold.clone()
                    };
                    emit_cold_start(&app.report, &cold, lazy.config().function_name.as_deref());
                    if let Some(tr) = &traced {
                        tr.send_init(lazy.config(), &app.report, restored.get().copied());
                    }
                }
                drop(meter);
                Ok::<FunctionResponse<Value, SseBody>, Diagnostic>(respond(reply, streams))
            }
            .instrument(span)
        });
        Runtime::new(handler)
            .layer(lambda_runtime::layers::TracingLayer::new())
            .register_snapstart_resource(hooks.clone())
            .run()
            .await
    })
}

/// The SnapStart hooks lambda_runtime runs around `/restore/next` (only when
/// AWS_LAMBDA_INITIALIZATION_TYPE=snap-start). Nothing to do before the snapshot: init waited for
/// the whole load, and no connection is held open between invokes.
struct SnapStartHooks {
    lazy: Arc<LazyApp>,
    /// When the restore's hooks started, and how long they took (ms): set once they succeeded.
    restored: OnceLock<(Instant, f64)>,
}

impl SnapStartResource for SnapStartHooks {
    fn after_restore(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let t = Instant::now();
            match self.lazy.after_restore().await {
                Ok(report) => {
                    let _ = self.restored.set((t, report.total_ms));
                    tracing::info!(
                        target: "after_restore",
                        report = %serde_json::json!(report),
                        "restored from a SnapStart snapshot"
                    );
                    Ok(())
                }
                Err(e) => {
                    // lambda_runtime posts this to /restore/error (errorType: the Rust type's
                    // name); the stable type goes to the log and the init_error record.
                    let function = function_name(self.lazy.config());
                    tracing::error!(error_type = e.error_type(), error = %e, "after-restore hook failed");
                    emit_init_error(&function, e.error_type(), &e.to_string());
                    Err(Error::from(format!("{}: {e}", e.error_type())))
                }
            }
        })
    }
}

/// The cold-start breakdown: one EMF line on stdout (metrics + the whole breakdown), and the same
/// as a tracing event for Lambda's JSON log format.
fn emit_cold_start(report: &app::InitReport, cold: &ColdStart, function: Option<&str>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let record = app::cold_start_record(report, cold, function, now);
    println!("{record}");
    tracing::info!(target: "cold_start", breakdown = %record, "cold start");
}

/// AWS_LAMBDA_FUNCTION_NAME, the metrics' `FunctionName` (`local` outside Lambda).
fn function_name(config: &Config) -> String {
    config
        .function_name
        .clone()
        .unwrap_or_else(|| "local".to_owned())
}

/// A sampled invoke's trace and the daemon its subsegments go to (crate::xray).
#[derive(Clone)]
struct Traced {
    trace: Trace,
    daemon: &'static Daemon,
    request_id: String,
    received: SystemTime,
}

impl Traced {
    /// `Some` when the invoke's trace header says sampled and AWS_XRAY_DAEMON_ADDRESS is usable.
    fn of(config: &Config, header: Option<&str>, request_id: &str) -> Option<Traced> {
        static DAEMON: OnceLock<Option<Daemon>> = OnceLock::new();
        let received = SystemTime::now();
        let trace = Trace::sampled(header)?;
        let daemon = DAEMON
            .get_or_init(|| {
                let address = config.xray_daemon.as_deref()?;
                let daemon = Daemon::new(address);
                if daemon.is_none() {
                    tracing::warn!(address, "AWS_XRAY_DAEMON_ADDRESS unusable: no subsegments");
                }
                daemon
            })
            .as_ref()?;
        Some(Traced {
            trace,
            daemon,
            request_id: request_id.to_owned(),
            received,
        })
    }

    /// `inference`: received -> `request` record written (answer done), annotated from the
    /// record: route, status, source, model, tokens.
    fn send_inference(&self, record: &str) {
        let mut s = Subsegment::new("inference", self.received, SystemTime::now());
        if let Ok(Value::Object(r)) = serde_json::from_str::<Value>(record) {
            for (from, to) in [
                ("Route", "route"),
                ("Status", "status"),
                ("source", "source"),
                ("model", "model"),
                ("InputTokens", "input_tokens"),
                ("OutputTokens", "output_tokens"),
                ("DeadlineStops", "deadline_stops"),
                ("Jobs", "jobs"),
                ("JobsFailed", "jobs_failed"),
            ] {
                if let Some(v) = r.get(from) {
                    s.annotations.insert(to.into(), v.clone());
                }
            }
        }
        self.daemon
            .send(&self.trace, &format!("{}/inference", self.request_id), &[s]);
    }

    /// The first invoke's trace: what its environment's init (or SnapStart restore) was made of,
    /// at the times it happened. Not under provisioned concurrency: that init ran long before,
    /// outside any invoke's trace.
    fn send_init(
        &self,
        config: &Config,
        report: &app::InitReport,
        restored: Option<(Instant, f64)>,
    ) {
        let ms = |v: f64| Duration::from_secs_f64(v.max(0.0) / 1e3);
        let subsegments = match (restored, report.started) {
            (Some((at, restore_ms)), _) => {
                let ago = at.elapsed();
                vec![Subsegment::before(
                    "restore",
                    SystemTime::now(),
                    ago,
                    ms(restore_ms),
                )]
            }
            _ if config.wait_for_whole_load => return,
            (None, Some(start)) => vec![
                Subsegment::new("fetch", start, start + ms(report.fetch_ms)),
                Subsegment::new(
                    "verify",
                    start + ms(report.verify_at_ms),
                    start + ms(report.verify_at_ms + report.verify_ms),
                ),
                Subsegment::new(
                    "engine",
                    start + ms(report.engine_at_ms),
                    start + ms(report.engine_at_ms + report.engine_ms),
                ),
            ],
            (None, None) => return,
        };
        self.daemon.send(
            &self.trace,
            &format!("{}/init", self.request_id),
            &subsegments,
        );
    }
}

/// The `request` record of an invoke answered before the service saw it (a payload that is not
/// JSON, a failed model load).
fn unmetered(
    config: &Config,
    request_id: &str,
    source: Source,
    status: u16,
    t: Instant,
    traced: Option<Traced>,
) {
    let stats = meter::CallStats {
        status: Some(status),
        ..Default::default()
    };
    let inv = metrics::Invoke {
        function: function_name(config),
        request_id: request_id.to_owned(),
        source: source.name(),
        model: String::new(),
        received: t,
    };
    let record = metrics::request_record(&stats, &inv, t.elapsed(), metrics::unix_ms()).to_string();
    println!("{record}");
    if let Some(tr) = traced {
        tr.send_inference(&record);
    }
}

/// The `init_error` record (InitErrors by ErrorType), on stdout like every EMF record.
fn emit_init_error(function: &str, error_type: &str, message: &str) {
    let record = metrics::init_error_record(function, error_type, message, metrics::unix_ms());
    println!("{record}");
}

/// The model could not be loaded after init: HTTP events get the error table's load-failure
/// answer in their own shape (a Lambda-level error would reach an API Gateway client as an opaque
/// 502); direct invokes and SQS batches fail with the stable error type (SQS then redelivers the
/// batch).
fn load_failed(source: Source, error_type: &str, message: &str) -> Result<EventReply, Diagnostic> {
    tracing::error!(error_type, error = %message, "model load failed");
    match source {
        Source::HttpApiV2 | Source::FunctionUrl | Source::RestApiV1 => Ok(EventReply::Http(
            HttpReply::json(&error::load_failure(error_type, message).into()),
        )),
        Source::Sqs | Source::Direct => Err(Diagnostic {
            error_type: error_type.to_owned(),
            error_message: message.to_owned(),
        }),
    }
}

/// Logs an init failure and reports it on the Runtime API's init error path, so that Lambda (and
/// the emulator) show the stable `errorType` instead of a bare "Runtime.ExitError".
fn init_failed(error_type: &str, message: &str) -> Error {
    tracing::error!(error_type, error = %message, "init failed");
    // Config may be what failed: the function's name straight from Lambda's variable.
    let function = config::lambda_function_name().unwrap_or_else(|| "local".to_owned());
    emit_init_error(&function, error_type, message);
    if let Some(api) = config::runtime_api_address() {
        if let Err(e) = post_init_error(&api, error_type, message) {
            tracing::error!(error = %e, "could not report the init error to the Runtime API");
        }
    }
    Error::from(format!("{error_type}: {message}"))
}

/// `POST /2018-06-01/runtime/init/error`. lambda_runtime 1.x only reports init errors of its
/// own SnapStart hooks (privately), so this is the documented request, made by hand: one
/// loopback HTTP/1.1 POST, before the runtime client exists.
fn post_init_error(api: &str, error_type: &str, message: &str) -> std::io::Result<()> {
    let body = serde_json::json!({"errorType": error_type, "errorMessage": message}).to_string();
    let mut s = std::net::TcpStream::connect(api)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "POST /2018-06-01/runtime/init/error HTTP/1.1\r\nHost: {api}\r\n\
         Lambda-Runtime-Function-Error-Type: {error_type}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = [0u8; 64];
    let n = s.read(&mut answer)?;
    let status = String::from_utf8_lossy(&answer[..n]);
    if !status.starts_with("HTTP/1.1 202") && !status.starts_with("HTTP/1.1 200") {
        tracing::warn!(answer = %status.lines().next().unwrap_or(""), "init/error answer");
    }
    Ok(())
}

/// The event's answer as Lambda takes it. `streams`: the invocation came through a door that
/// streams, so an HTTP answer goes out as response streaming too (its status and headers as the
/// metadata prelude, its body as the one chunk); otherwise as the buffered envelope.
fn respond(reply: EventReply, streams: bool) -> FunctionResponse<Value, SseBody> {
    let ok: fn(String) -> Result<String, Infallible> = Ok;
    let (prelude, rx) = match reply {
        EventReply::Buffered(v) => return FunctionResponse::BufferedResponse(v),
        EventReply::Http(r) if !streams => {
            return FunctionResponse::BufferedResponse(r.to_envelope())
        }
        EventReply::Http(r) => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            // Capacity 1 and a fresh channel: this send cannot fail or wait.
            let _ = tx.try_send(r.body);
            (prelude(r.status, &r.headers), SseStream::new(rx, None))
        }
        EventReply::Stream(s) => (prelude(SSE_STATUS, &SSE_HEADERS), s),
    };
    FunctionResponse::StreamingResponse(StreamResponse {
        metadata_prelude: prelude,
        stream: rx.map(ok),
    })
}

/// Response streaming's metadata prelude for `status` and `headers` (static names and values
/// written by the events layer: none can be invalid, so none is dropped).
fn prelude(status: u16, headers: &[(&'static str, &'static str)]) -> MetadataPrelude {
    let mut prelude = MetadataPrelude {
        status_code: http::StatusCode::from_u16(status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR),
        ..MetadataPrelude::default()
    };
    for &(name, value) in headers {
        prelude.headers.insert(
            http::header::HeaderName::from_static(name),
            http::HeaderValue::from_static(value),
        );
    }
    prelude
}

/// The Lambda context's deadline (wall clock) as a monotonic instant: what the layers below
/// take, so that they never see Lambda types.
fn deadline_instant(deadline: SystemTime) -> Instant {
    let now = SystemTime::now();
    let left = deadline.duration_since(now).unwrap_or_default();
    Instant::now() + left
}
