//! Shared test support for the layers above the engine (events, service).
//!
//! `FakeEmbedder` is a FAKE: it implements the engine's `Embedder` trait without any model, so the
//! event adapters and the service can be tested fast and deterministically. It says nothing about
//! embedding quality; the real-weights tests do that.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod s3;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lambda_inference::engine::{EmbedOutput, Embedder, Engine, EngineError, ModelInfo, ModelKind};
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
