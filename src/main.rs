//! `bootstrap`: the Lambda function. Reads the configuration, loads the model during the init
//! phase, then serves every event through the same handler as the CLI's `invoke`.

use lambda_inference::{app, config::Config, events};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;

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
            Ok::<Value, Error>(events::handle(service, event.payload).await)
        }))
        .await
    })
}
