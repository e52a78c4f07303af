//! Shared test support for the layers above the engine (events, service).
//!
//! `FakeEmbedder` is a FAKE: it implements the engine's `Embedder` trait without any model, so the
//! event adapters and the service can be tested fast and deterministically. It says nothing about
//! embedding quality; the real-weights tests do that.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod emulator;
pub mod runtime_api;
pub mod s3;
pub mod serve;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lambda_inference::engine::{EmbedOutput, Embedder, Engine, EngineError, ModelInfo, ModelKind};
use lambda_inference::jobs::{BoxFuture, JobId, JobQueue, PutOutcome, ResultStore, StoreError};
use lambda_inference::service::{Limits, ModelMeta, Service};

/// Embedding width of the fake.
pub const DIMS: usize = 8;
/// The input that makes the fake panic, to prove a panicking engine answers 500.
pub const PANIC_MARKER: &str = "__panic__";
/// `max_input_tokens` of [`fake_service`]: small, so "too long" inputs stay small in tests.
pub const MAX_INPUT_TOKENS: usize = 64;

/// A fake embedder (for testing the layers above the engine): vectors derived from a hash of the
/// text, token count = whitespace words + 2 (as if [CLS] and [SEP] were added).
pub struct FakeEmbedder {
    info: ModelInfo,
}

impl FakeEmbedder {
    pub fn new() -> Self {
        Self {
            info: ModelInfo {
                name: "fake-embedder".into(),
                architecture: "bert".into(),
                kind: ModelKind::Embedder,
                quantization: "f32".into(),
                dimensions: DIMS,
                max_seq_len: 512,
                details: lambda_inference::engine::ModelDetails {
                    pooling: "mean",
                    ..Default::default()
                },
            },
        }
    }

    /// The unit vector the fake gives `text`.
    pub fn vector(text: &str) -> Vec<f32> {
        let mut v: Vec<f32> = (0..DIMS)
            .map(|i| {
                let mut h = DefaultHasher::new();
                (text, i).hash(&mut h);
                // Map to [-1, 1); never all zero in practice.
                (h.finish() % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        let n = v
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        v.iter_mut().for_each(|x| *x /= n);
        v
    }

    pub fn tokens(text: &str) -> usize {
        text.split_whitespace().count() + 2
    }
}

impl Default for FakeEmbedder {
    fn default() -> Self {
        Self::new()
    }
}

impl Embedder for FakeEmbedder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed(&self, inputs: &[&str], max_input_tokens: usize) -> Result<EmbedOutput, EngineError> {
        if inputs.contains(&PANIC_MARKER) {
            panic!("FakeEmbedder: panic marker in the input (on purpose, for the 500 test)");
        }
        let mut token_counts = Vec::with_capacity(inputs.len());
        for (index, text) in inputs.iter().enumerate() {
            let tokens = Self::tokens(text);
            if tokens > max_input_tokens {
                return Err(EngineError::InputTooLong {
                    index,
                    tokens,
                    limit: max_input_tokens,
                });
            }
            token_counts.push(tokens);
        }
        Ok(EmbedOutput {
            embeddings: inputs.iter().map(|t| Self::vector(t)).collect(),
            token_counts,
        })
    }
}

/// A FAKE embedder that counts engine calls: one call proves jobs shared a forward pass, zero
/// calls that a refusal came before any work.
pub struct CountingEmbedder {
    pub inner: FakeEmbedder,
    pub calls: std::sync::atomic::AtomicUsize,
}

impl CountingEmbedder {
    pub fn new() -> Self {
        Self {
            inner: FakeEmbedder::new(),
            calls: Default::default(),
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Default for CountingEmbedder {
    fn default() -> Self {
        Self::new()
    }
}

impl Embedder for CountingEmbedder {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
    fn embed(&self, inputs: &[&str], max: usize) -> Result<EmbedOutput, EngineError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.embed(inputs, max)
    }
}

/// A FAKE job queue (the SQS one is tested against moto): keeps what it is sent.
#[derive(Default)]
pub struct FakeQueue(pub std::sync::Mutex<Vec<String>>);

impl JobQueue for FakeQueue {
    fn send<'a>(&'a self, body: String) -> BoxFuture<'a, Result<(), StoreError>> {
        self.0.lock().unwrap().push(body);
        Box::pin(async { Ok(()) })
    }
}

/// A service on the fake embedder with the default limits except `max_input_tokens`.
pub fn fake_service() -> Service {
    fake_service_with(Limits {
        max_input_tokens: MAX_INPUT_TOKENS,
        ..Limits::default()
    })
}

/// A service on the fake embedder with the given limits.
pub fn fake_service_with(limits: Limits) -> Service {
    let meta = ModelMeta {
        id: "fake-embedder".into(),
        sha256: "0".repeat(64),
        source: "fake://embedder".into(),
        init_ms: 0.0,
        threads: 1,
    };
    Service::new(
        Engine::Embedder(Arc::new(FakeEmbedder::new())),
        limits,
        meta,
    )
}

/// The repository's `events/` directory (the sample events).
pub fn events_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("events")
}

/// A file a real-parts test needs (model, emulator), relative to the crate root. Missing: `None`
/// with a SKIP line naming `how` to make it, except under CI=true, where a missing file fails.
pub fn needed_file(rel: &str, how: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{} is missing: {how} must run before the tests in CI",
            p.display()
        );
    }
    eprintln!("SKIP: {} missing; run {how}", p.display());
    None
}

/// The message ids an SQS partial batch response asks to redeliver.
pub fn failures(v: &serde_json::Value) -> Vec<String> {
    v["batchItemFailures"]
        .as_array()
        .unwrap_or_else(|| panic!("no batchItemFailures in {v}"))
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
        .collect()
}

/// A FAKE result store (for testing the job worker without S3): a map in memory with the same
/// create-only semantics as S3's `If-None-Match: *`. The S3 store is tested against moto.
#[derive(Default)]
pub struct FakeResultStore {
    pub objects: std::sync::Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
    /// Every successful write, to prove nothing is written twice.
    pub writes: std::sync::Mutex<Vec<String>>,
}

impl ResultStore for FakeResultStore {
    fn get<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move { Ok(self.objects.lock().unwrap().get(id.as_str()).cloned()) })
    }
    fn put_new<'a>(
        &'a self,
        id: &'a JobId,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        Box::pin(async move {
            let mut objects = self.objects.lock().unwrap();
            if objects.contains_key(id.as_str()) {
                return Ok(PutOutcome::AlreadyExists);
            }
            objects.insert(id.as_str().to_owned(), body);
            self.writes.lock().unwrap().push(id.as_str().to_owned());
            Ok(PutOutcome::Written)
        })
    }
    fn location(&self, id: &JobId) -> String {
        format!("fake://results/{id}.json")
    }
}

/// Wraps a store (fake or real) so that the first write of one job id fails with a transient
/// error: the "S3 hiccup" of the job tests.
pub struct FailFirstWrite<S> {
    pub inner: S,
    pub id: String,
    pub failed: std::sync::atomic::AtomicBool,
}

impl<S: ResultStore> ResultStore for FailFirstWrite<S> {
    fn get<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        self.inner.get(id)
    }
    fn put_new<'a>(
        &'a self,
        id: &'a JobId,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        use std::sync::atomic::Ordering;
        if id.as_str() == self.id && !self.failed.swap(true, Ordering::SeqCst) {
            return Box::pin(async {
                Err(StoreError::Transient(
                    "injected: connection reset while writing".into(),
                ))
            });
        }
        self.inner.put_new(id, body)
    }
    fn location(&self, id: &JobId) -> String {
        self.inner.location(id)
    }
}

/// The mixed batch of the job tests: 10 SQS records, of which 2 are malformed, 1 makes the engine
/// panic, 1 (`job-flaky`) has its first result write fail, and 6 are ordinary embedding jobs.
/// Returns the event and the job ids of all 10 in order.
pub fn mixed_sqs_batch() -> (serde_json::Value, Vec<String>) {
    use serde_json::json;
    let mut bodies = Vec::new();
    for i in 0..6 {
        bodies.push((
            format!("job-ok-{i}"),
            json!({"id": format!("job-ok-{i}"), "endpoint": "/v1/embeddings",
                   "request": {"input": [format!("sentence number {i}"), "shared batch"]}})
            .to_string(),
        ));
    }
    bodies.push((
        "job-flaky".into(),
        json!({"id": "job-flaky", "endpoint": "/v1/embeddings", "request": {"input": "flaky write"}})
            .to_string(),
    ));
    bodies.push((
        "job-panic".into(),
        json!({"id": "job-panic", "endpoint": "/v1/embeddings", "request": {"input": PANIC_MARKER}})
            .to_string(),
    ));
    // Malformed: not JSON (stored under its messageId), and a job without a request.
    bodies.push(("msg-bad-json".into(), "{not json".into()));
    bodies.push((
        "job-no-request".into(),
        json!({"id": "job-no-request", "endpoint": "/v1/embeddings"}).to_string(),
    ));
    let records: Vec<serde_json::Value> = bodies
        .iter()
        .enumerate()
        .map(|(i, (id, body))| {
            // The messageId equals the job id for the malformed body without an id.
            let message_id = if id.starts_with("msg-") {
                id.clone()
            } else {
                format!("m-{i}")
            };
            json!({"messageId": message_id, "receiptHandle": "rh", "body": body,
                   "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1700000000000"},
                   "eventSource": "aws:sqs", "awsRegion": "us-east-1",
                   "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:jobs"})
        })
        .collect();
    (
        json!({ "Records": records }),
        bodies.into_iter().map(|(id, _)| id).collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Generators

use std::time::Duration;

use lambda_inference::engine::generate::{self as gen_loop, Detokenizer, TokenModel};
use lambda_inference::engine::{ChatMessage, GenerateOutput, GenerateParams, Generator};

/// What [`FakeGenerator`] answers greedily, byte by byte, before its stop token.
pub const FAKE_REPLY: &str = "Hello from the fake model. Wir grüßen 🌍 und STOP here.";

/// The fake's stop token id (bytes are ids 0..256).
const FAKE_EOS: u32 = 256;

/// A FAKE generator (for testing the layers above the engine): tokens are bytes, the "model"
/// favours the next byte of [`FAKE_REPLY`] and then its stop token, with a spread of other
/// logits so that sampling at temperature > 0 varies with the seed. It runs the engine's real
/// generation loop ([`gen_loop::generate`]): stop strings, max_tokens, seeds, deadlines and UTF-8
/// streaming are the real code. Each forward pass sleeps `step` (deadline tests).
pub struct FakeGenerator {
    info: ModelInfo,
    pieces: Vec<Vec<u8>>,
    pub step: Duration,
}

impl FakeGenerator {
    pub fn new(step: Duration) -> Self {
        let mut pieces: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        pieces.push(Vec::new());
        Self {
            info: ModelInfo {
                name: "fake-generator".into(),
                architecture: "llama".into(),
                kind: ModelKind::Generator,
                quantization: "q4_1".into(),
                dimensions: 8,
                max_seq_len: 4096,
                details: Default::default(),
            },
            pieces,
            step,
        }
    }
}

struct FakeScriptModel {
    pos: usize,
    step: Duration,
}

impl TokenModel for FakeScriptModel {
    fn reset(&mut self, _reach: usize) {
        self.pos = 0;
    }
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        std::thread::sleep(self.step);
        // The prompt's forward (any length) yields reply byte 0, each later one the next byte.
        let _ = tokens;
        let at = self.pos;
        self.pos += 1;
        let reply = FAKE_REPLY.as_bytes();
        let mut logits: Vec<f32> = (0..=FAKE_EOS)
            .map(|i| ((i as f32 * 12.9898 + at as f32 * 78.233).sin() * 43758.547).fract() * 3.0)
            .collect();
        let next = reply.get(at).map_or(FAKE_EOS, |&b| b as u32);
        logits[next as usize] = 6.0;
        Ok(logits)
    }
}

impl Generator for FakeGenerator {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let mut s: String = messages
            .iter()
            .map(|m| format!("<{}>{}\n", m.role, m.content))
            .collect();
        s.push_str("<assistant>");
        Ok(s)
    }
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(text.bytes().map(u32::from).collect())
    }
    fn max_token_bytes(&self) -> usize {
        1
    }
    fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<GenerateOutput, EngineError> {
        let mut m = FakeScriptModel {
            pos: 0,
            step: self.step,
        };
        let d = Detokenizer {
            pieces: &self.pieces,
            stop_ids: &[FAKE_EOS],
        };
        gen_loop::generate(&mut m, &d, prompt, params, on_text)
    }
}

/// A service on [`FakeGenerator`] with the given limits and per-token delay.
pub fn fake_generator_service(limits: Limits, step: Duration) -> Service {
    let meta = ModelMeta {
        id: "fake-generator".into(),
        sha256: "0".repeat(64),
        source: "fake://generator".into(),
        init_ms: 0.0,
        threads: 1,
    };
    Service::new(
        Engine::Generator(Arc::new(FakeGenerator::new(step))),
        limits,
        meta,
    )
}

/// The tiny random cross-encoder of tests/fixtures/tiny-reranker, converted by the CLI
/// (`lambda-inference convert --dtype DTYPE`) into a fresh file: its bytes.
pub fn tiny_reranker_gguf(dtype: &str) -> Vec<u8> {
    converted_fixture("tests/fixtures/tiny-reranker", dtype)
}

/// The Hugging Face folder `dir` (relative to the repository) converted by the CLI
/// (`lambda-inference convert --dtype DTYPE`) into a fresh file: its bytes.
pub fn converted_fixture(dir: &str, dtype: &str) -> Vec<u8> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let out = std::env::temp_dir().join(format!(
        "{}-{}-{}.{dtype}.gguf",
        dir.replace('/', "-"),
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_lambda-inference"))
        .args(["convert", "--quiet", "--dtype", dtype])
        .arg(&fixture)
        .arg(&out)
        .status()
        .expect("running lambda-inference convert");
    assert!(status.success(), "convert {dir} --dtype {dtype} failed");
    let bytes = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    bytes
}

/// A JSON array of token ids.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A JSON array of numbers.
pub fn json_f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// A service on the tiny cross-encoder (q8_0) with the given limits (a real model, not a fake).
pub fn tiny_reranker_service(limits: Limits) -> Service {
    let engine = lambda_inference::engine::load(&tiny_reranker_gguf("q8_0")).unwrap();
    let meta = ModelMeta {
        id: "tiny-reranker".into(),
        sha256: "0".repeat(64),
        source: "tests/fixtures/tiny-reranker".into(),
        init_ms: 0.0,
        threads: 1,
    };
    Service::new(engine, limits, meta)
}

/// The cosine of an embedding (ours, f32) and a reference vector (f64, from the fixtures' JSON).
pub fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}
