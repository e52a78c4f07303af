//! SnapStart's restore path, end to end: the real `bootstrap` under a Runtime API stand-in
//! (tests/common/runtime_api.rs) that follows the documented sequence: init, a held
//! `GET /runtime/restore/next` (the snapshot), its answer (the restore), the after-restore hooks,
//! then invokes, or `POST /runtime/restore/error` when a hook fails.
//!
//! - Restored: between snapshot and restore the API key is rotated in Secrets Manager (moto on
//!   loopback); after the restore the new key is accepted and the old one refused (the keys were
//!   read again), the container credentials endpoint was asked again (the SDK clients were
//!   rebuilt), the model file was hashed again, and the cold-start record says it was restored.
//! - Failed: between snapshot and restore the model file is replaced by other bytes; the digest
//!   check fails, the function reports it on `/restore/error` and exits without asking for an
//!   invoke.
//!
//! Needs the MiniLM model (scripts/fetch-models) and, for the first, moto (scripts/test installs
//! it); missing locally they skip, under CI=true they fail.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::runtime_api::RuntimeApi;

const RESTORE_NEXT: &str = "/2018-06-01/runtime/restore/next";
const RESTORE_ERROR: &str = "/2018-06-01/runtime/restore/error";
const NEXT: &str = "/2018-06-01/runtime/invocation/next";
/// Init loads the model (debug build of our crate) before asking for /restore/next.
const INIT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(30);

/// The function process, its stdout and stderr lines collected; killed by PID when dropped.
struct Function {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Function {
    fn start(api: &RuntimeApi, env: &[(&str, String)]) -> Function {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bootstrap"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_LAMBDA_RUNTIME_API", api.address())
            .env("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")
            .env("AWS_LAMBDA_FUNCTION_NAME", "snap")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting bootstrap");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    sink.lock().unwrap().push(line);
                }
            });
        }
        Function { child, lines }
    }

    /// The first JSON line (stdout or stderr) that `pred` accepts, waiting up to 10 s.
    fn line(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| pred(v));
            if let Some(v) = found {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} line; the function wrote:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A copy of the MiniLM model in a fresh folder, so that a test can replace it.
fn model_copy(name: &str) -> Option<PathBuf> {
    let model = common::needed_file("models/all-MiniLM-L6-v2.q8_0.gguf", "scripts/fetch-models")?;
    let dir = std::env::temp_dir().join(format!("snapstart-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("model.gguf");
    std::fs::copy(&model, &copy).unwrap();
    Some(copy)
}

/// An HTTP API embeddings event carrying `key` as its bearer token.
fn embeddings_event(key: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("events/apigw-v2-embeddings.json");
    let mut ev: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    ev["headers"]["authorization"] = Value::String(format!("Bearer {key}"));
    ev
}

fn secrets_client(endpoint: &str) -> aws_sdk_secretsmanager::Client {
    let conf = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(aws_sdk_secretsmanager::config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .http_client(common::s3::http_client())
        .region(aws_sdk_secretsmanager::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_secretsmanager::config::Credentials::new(
            "test", "test", None, None, "tests",
        ))
        .build();
    aws_sdk_secretsmanager::Client::from_conf(conf)
}

/// One invoke through the stand-in: the envelope the function answered.
fn invoke(api: &RuntimeApi, request_id: &str, event: &Value) -> Value {
    let next = api.expect("GET", NEXT, STEP);
    RuntimeApi::invoke(next, request_id, event);
    let path = format!("/2018-06-01/runtime/invocation/{request_id}/response");
    let response = api.expect("POST", &path, STEP);
    let envelope = response.json();
    response.answer(202, &[], b"");
    envelope
}

#[test]
fn a_restored_environment_reads_its_keys_and_credentials_again_and_serves() {
    let Some(model) = model_copy("ok") else {
        return;
    };
    let Some(moto) = common::s3::Moto::start() else {
        return;
    };
    let (old_key, new_key) = (
        "snapstart-old-key-0123456789",
        "snapstart-new-key-9876543210",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let secrets = secrets_client(&moto.endpoint());
    let arn = rt.block_on(async {
        secrets
            .create_secret()
            .name("snapstart-keys")
            .secret_string(json!({ "key": old_key }).to_string())
            .send()
            .await
            .unwrap()
            .arn
            .unwrap()
    });
    let api = RuntimeApi::start();
    let f = Function::start(
        &api,
        &[
            ("MODEL_URI", model.display().to_string()),
            ("API_KEYS_SECRET_ARN", arn.clone()),
            ("AWS_ENDPOINT_URL", moto.endpoint()),
            // How SnapStart functions get credentials: the container credentials endpoint,
            // here the stand-in's.
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!("http://{}/credentials", api.address()),
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "stand-in".into()),
        ],
    );

    // Init ends by asking for /restore/next: the snapshot is taken while it waits.
    let snapshot = api.expect("GET", RESTORE_NEXT, INIT);
    let at_snapshot = api.credentials_served.load(Ordering::SeqCst);
    assert!(
        at_snapshot >= 1,
        "init read the secret with container credentials"
    );
    // While the snapshot sits in Lambda's cache, the key is rotated.
    rt.block_on(async {
        secrets
            .put_secret_value()
            .secret_id(&arn)
            .secret_string(json!({ "key": new_key }).to_string())
            .send()
            .await
            .unwrap();
    });
    // The restore: /restore/next returns; the after-restore hooks run before the first invoke.
    snapshot.answer(200, &[], b"");

    let ok = invoke(&api, "req-new-key", &embeddings_event(new_key));
    assert_eq!(ok["statusCode"], 200, "{ok}");
    let body: Value = serde_json::from_str(ok["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["object"], "list", "{body}");
    assert!(
        api.credentials_served.load(Ordering::SeqCst) > at_snapshot,
        "the restored environment fetched its own credentials"
    );
    let refused = invoke(&api, "req-old-key", &embeddings_event(old_key));
    assert_eq!(refused["statusCode"], 401, "{refused}");

    let restored = f.line("after_restore", |v| v["target"] == "after_restore");
    let report: Value =
        serde_json::from_str(restored["fields"]["report"].as_str().unwrap()).unwrap();
    eprintln!("after_restore: {report}");
    assert_eq!(report["digest"], "file re-hashed", "{report}");
    assert_eq!(report["api_keys"], 1, "{report}");
    assert_eq!(
        report["environment"].as_str().unwrap().len(),
        16,
        "{report}"
    );
    let cold = f.line("cold_start", |v| v["event"] == "cold_start");
    assert_eq!(cold["restored"], true, "{cold}");
    assert_eq!(cold["sha256"], report["sha256"], "{cold}");
    assert!(cold["restore_ms"].as_f64().unwrap() >= 0.0, "{cold}");
    drop(f);
    let _ = std::fs::remove_dir_all(model.parent().unwrap());
}

#[test]
fn a_failed_after_restore_hook_reports_on_restore_error_and_serves_nothing() {
    let Some(model) = model_copy("bad") else {
        return;
    };
    let api = RuntimeApi::start();
    let mut f = Function::start(&api, &[("MODEL_URI", model.display().to_string())]);
    let snapshot = api.expect("GET", RESTORE_NEXT, INIT);
    // Other bytes at the model's path (a new file renamed over it: the mapping init made keeps
    // the old one).
    let other = model.with_extension("new");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes.push(0);
    std::fs::write(&other, bytes).unwrap();
    std::fs::rename(&other, &model).unwrap();
    snapshot.answer(200, &[], b"");

    let report = api.expect("POST", RESTORE_ERROR, STEP);
    let error = report.json();
    assert_eq!(
        report
            .headers
            .get("lambda-runtime-function-error-type")
            .map(String::as_str),
        Some("Runtime.AfterRestoreError")
    );
    let message = error["errorMessage"].as_str().unwrap();
    assert!(message.starts_with("DigestMismatch: "), "{error}");
    report.answer(202, &[], b"");
    // It exits instead of asking for an invoke.
    assert_eq!(api.quiet_for(Duration::from_secs(3)), None);
    let deadline = Instant::now() + STEP;
    while f.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "bootstrap did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let record = f.line("init_error", |v| v["event"] == "init_error");
    assert_eq!(record["ErrorType"], "DigestMismatch", "{record}");
    let _ = std::fs::remove_dir_all(model.parent().unwrap());
}
