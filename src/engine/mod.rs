//! Inference engines: tokenizer, quantized BERT embedder (and, later, the llama generator).
//!
//! Pure candle + tokenizers. This module must not import anything from AWS or Lambda, must not do
//! I/O beyond reading the model bytes it is handed, and knows nothing about HTTP or JSON requests:
//! the service layer validates requests and calls the traits defined here.

pub mod bert;
pub mod gguf;
pub mod ops;
pub mod qgemm;

use std::sync::Arc;

/// What kind of model a GGUF holds; decides which routes the function serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Embedder,
    Generator,
}

/// Facts about the loaded model, for `/health`, `/v1/models` and responses.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// `general.name` from the GGUF (the config may override the reported id).
    pub name: String,
    /// `general.architecture` (bert, llama, ...).
    pub architecture: String,
    pub kind: ModelKind,
    /// Storage type of the large matrices (q8_0, f16, ...).
    pub quantization: String,
    /// Embedding width (embedders) or hidden size (generators).
    pub dimensions: usize,
    /// Tokens per input the model sees; longer inputs are truncated (sentence-transformers habit).
    pub max_seq_len: usize,
}

/// Result of one embedding call: one L2-normalized vector and one token count per input, in the
/// order the inputs were given.
#[derive(Debug, Clone)]
pub struct EmbedOutput {
    pub embeddings: Vec<Vec<f32>>,
    /// Tokens actually fed to the model per input (after truncation, special tokens included).
    pub token_counts: Vec<usize>,
}

/// Errors of the engine layer. The service maps them into client-facing errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Input `index` has more tokens than the configured limit (before truncation).
    #[error("input {index} has {tokens} tokens, more than the limit of {limit}")]
    InputTooLong {
        index: usize,
        tokens: usize,
        limit: usize,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The GGUF is not a model this engine can run (missing tensor, wrong shape, unknown arch).
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A sentence embedder. Implemented by [`bert::BertEmbedder`]; tests may use fakes.
///
/// `embed` is CPU-bound and blocking: callers run it off the async executor.
pub trait Embedder: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Tokenizes, checks every input against `max_input_tokens` (untruncated count), then embeds
    /// all inputs, batching them internally to share forward passes.
    fn embed(&self, inputs: &[&str], max_input_tokens: usize) -> Result<EmbedOutput, EngineError>;
}

/// The loaded engine, whatever its kind.
#[derive(Clone)]
pub enum Engine {
    Embedder(Arc<dyn Embedder>),
}

impl Engine {
    pub fn info(&self) -> &ModelInfo {
        match self {
            Engine::Embedder(e) => e.info(),
        }
    }
}

/// Builds the engine a GGUF asks for (`general.architecture`). The bytes are only borrowed: the
/// engine copies what it keeps, so the caller can free the file buffer afterwards.
pub fn load(bytes: &[u8]) -> Result<Engine, EngineError> {
    let t0 = std::time::Instant::now();
    let mut cursor = std::io::Cursor::new(bytes);
    let content = candle_core::quantized::gguf_file::Content::read(&mut cursor)
        .map_err(|e| EngineError::InvalidModel(format!("not a readable GGUF file: {e}")))?;
    let arch = gguf::Meta::of(&content).str(gguf::ARCHITECTURE)?.to_owned();
    tracing::debug!(
        parse_ms = t0.elapsed().as_secs_f64() * 1e3,
        "gguf header parsed"
    );
    match arch.as_str() {
        "bert" => Ok(Engine::Embedder(Arc::new(bert::BertEmbedder::load(
            &content, bytes,
        )?))),
        other => Err(EngineError::InvalidModel(format!(
            "unsupported general.architecture {other:?} (this build serves: bert)"
        ))),
    }
}
