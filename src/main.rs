//! `bootstrap`: the Lambda function. Reads the configuration, loads the model during the init
//! phase, then serves every event through the same handler as the CLI's `invoke`.
//!
//! Responses are buffered JSON, except a Function URL request with `stream: true`, which is
//! answered through Lambda response streaming (the Function URL must use InvokeMode
//! RESPONSE_STREAM): the HTTP metadata prelude, then the server-sent events as they are made.

use std::convert::Infallible;
use std::time::{Instant, SystemTime};

use lambda_inference::events::{self, EventReply};
use lambda_inference::{app, config::Config};
use lambda_runtime::{
    service_fn, Error, FunctionResponse, LambdaEvent, MetadataPrelude, StreamResponse,
};
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// The body stream Lambda sends after the prelude: SSE frames as they are produced.
type SseBody =
    tokio_stream::adapters::Map<ReceiverStream<String>, fn(String) -> Result<String, Infallible>>;

fn main() -> Result<(), Error> {
    lambda_inference::app::init_tracing();
    let config = Config::from_env()?;
    app::configure_threads(config.threads);
    // One executor thread is plenty: requests arrive one at a time, and forward passes run on the
    // blocking pool + the compute pool, not on the executor.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = app::App::init(&config).map_err(|e| {
            tracing::error!(error_type = e.error_type(), error = %e, "init failed");
            Error::from(format!("{}: {e}", e.error_type()))
        })?;
        let service = &app.service;
        lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
            let deadline = deadline_instant(event.context.deadline());
            let reply = events::handle_call(service, event.payload, Some(deadline)).await;
            Ok::<FunctionResponse<Value, SseBody>, Error>(match reply {
                EventReply::Buffered(v) => FunctionResponse::BufferedResponse(v),
                EventReply::Stream(s) => {
                    let mut prelude = MetadataPrelude::default();
                    prelude.headers.insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(events::http::SSE_CONTENT_TYPE),
                    );
                    prelude.headers.insert(
                        http::header::CACHE_CONTROL,
                        http::HeaderValue::from_static("no-cache"),
                    );
                    let ok: fn(String) -> Result<String, Infallible> = Ok;
                    FunctionResponse::StreamingResponse(StreamResponse {
                        metadata_prelude: prelude,
                        stream: ReceiverStream::new(s.rx).map(ok),
                    })
                }
            })
        }))
        .await
    })
}

/// The Lambda context's deadline (wall clock) as a monotonic instant: what the layers below
/// take, so that they never see Lambda types.
fn deadline_instant(deadline: SystemTime) -> Instant {
    let now = SystemTime::now();
    let left = deadline.duration_since(now).unwrap_or_default();
    Instant::now() + left
}
