//! Inference engines: tokenizers, the quantized BERT embedder (and cross-encoder reranker) and
//! the llama-family generator (chat template, sampling, streaming text).
//!
//! The seam for a new decoder architecture: one file `engine/<arch>.rs` holding its
//! [`llama::Variant`] (what it changes in the shared llama decoder: RoPE pairing, QK-norm, fused
//! q/k/v and gate/up projections; optional tensors such as q/k/v biases and `rope_freqs` are used
//! whenever a file has them) plus one line in [`DECODERS`]. An architecture whose block the shared
//! decoder cannot express (Gemma's extra norms, scaled embeddings, GeGLU and sliding-window
//! layers) needs a new `Variant` field, a branch in `llama.rs`, and a fixture in
//! `tests/fixtures/archs/` that proves it against llama.cpp.
//!
//! Pure candle + tokenizers. This module must not import anything from AWS or Lambda, must not do
//! I/O beyond reading the model bytes it is handed, and knows nothing about HTTP or JSON requests:
//! the service layer validates requests and calls the traits defined here.

pub mod bert;
pub mod chat;
pub mod generate;
pub mod ggml_tokenizer;
pub mod gguf;
pub mod kquants;
pub mod llama;
pub mod ops;
pub mod phi3;
pub mod qgemm;
pub mod qmatmul;
pub mod qwen2;
pub mod qwen3;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use chat::ChatMessage;
pub use generate::{FinishReason, GenerateOutput, GenerateParams, SamplingParams};
pub use qmatmul::SharedBytes;

/// What kind of model a GGUF holds; decides which routes the function serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Embedder,
    Generator,
    /// A cross-encoder: scores (query, document) pairs.
    Reranker,
}

/// Facts about the loaded model, for `/health`, `/v1/models` and responses.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// `general.name` from the GGUF (the config may override the reported id).
    pub name: String,
    /// `general.architecture` (bert, llama, ...); for a BERT GGUF, the checkpoint's family
    /// (`bert.model_type`: `xlm-roberta`; absent: `bert`).
    pub architecture: String,
    pub kind: ModelKind,
    /// Storage type of the large matrices (q8_0, f16, ...).
    pub quantization: String,
    /// Embedding width (embedders) or hidden size (generators).
    pub dimensions: usize,
    /// Tokens per input the model sees; longer inputs are truncated (sentence-transformers habit).
    pub max_seq_len: usize,
    /// What the file says about itself beyond the above (see [`ModelDetails::of`]).
    pub details: ModelDetails,
}

/// Facts read from the GGUF header whatever the architecture, for `/health` and `/v1/models`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelDetails {
    /// `{arch}.context_length`: the positions the model was trained for (0 when absent).
    pub context_length: usize,
    /// How token states become the output: `mean`, `cls` (embedders), `rank` (a cross-encoder's
    /// head), `none` (generators: one state per token).
    pub pooling: &'static str,
    /// Per storage type (`q8_0`, `f32`, ...), the tensors and bytes the file holds in it: a
    /// "Q4_K_M" file is a mix, and this says which.
    pub quantization_mix: BTreeMap<String, TypeShare>,
}

/// One storage type's share of a model file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TypeShare {
    pub tensors: usize,
    pub bytes: u64,
}

impl Default for ModelDetails {
    /// Nothing known: no context length, pooling `none`, no tensors.
    fn default() -> Self {
        Self {
            context_length: 0,
            pooling: "none",
            quantization_mix: BTreeMap::new(),
        }
    }
}

impl ModelDetails {
    /// The details of a parsed GGUF whose `general.architecture` is `arch`.
    pub fn of(
        content: &candle_core::quantized::gguf_file::Content,
        arch: &str,
        pooling: &'static str,
    ) -> Self {
        let meta = gguf::Meta::of(content);
        let mut mix: BTreeMap<String, TypeShare> = BTreeMap::new();
        for info in content.tensor_infos.values() {
            let d = info.ggml_dtype;
            let share = mix.entry(bert::dtype_name(d).to_owned()).or_default();
            share.tensors += 1;
            share.bytes += (info.shape.elem_count() / d.block_size() * d.type_size()) as u64;
        }
        Self {
            context_length: meta.usize(&format!("{arch}.context_length")).unwrap_or(0),
            pooling,
            quantization_mix: mix,
        }
    }
}

/// Result of one rerank call: per document, in the order given, the model's score and logit.
#[derive(Debug, Clone)]
pub struct RerankOutput {
    /// The score sentence-transformers' CrossEncoder gives (the logit through the model's
    /// activation: sigmoid unless the model says otherwise).
    pub scores: Vec<f32>,
    /// The head's raw output.
    pub logits: Vec<f32>,
    /// Tokens fed to the model per pair (query + document + special tokens, after truncation).
    pub token_counts: Vec<usize>,
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
    /// Input `index` has more tokens than the configured limit (before truncation). `tokens` is
    /// a lower bound: counting stops once the limit is passed.
    #[error("input {index} has at least {tokens} tokens, more than the limit of {limit}")]
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
    /// The chat template refused the conversation (`raise_exception`) or failed on it: the
    /// request's fault.
    #[error("chat template: {0}")]
    Template(String),
    /// The deadline came before the work was done; `tokens_done` tokens were processed.
    #[error("stopped at the deadline after {tokens_done} tokens")]
    DeadlineReached { tokens_done: usize },
    /// The model has no `tokenizer.chat_template`: chat needs one, completions do not.
    #[error("this model has no chat template (tokenizer.chat_template); use /v1/completions with a prompt")]
    NoChatTemplate,
}

/// A sentence embedder. Implemented by [`bert::BertEmbedder`]; tests may use fakes.
///
/// `embed` is CPU-bound and blocking: callers run it off the async executor.
pub trait Embedder: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Tokenizes, checks every input against `max_input_tokens` (untruncated count), then embeds
    /// all inputs, batching them internally to share forward passes.
    fn embed(&self, inputs: &[&str], max_input_tokens: usize) -> Result<EmbedOutput, EngineError>;

    /// [`Embedder::embed`], giving up with [`EngineError::DeadlineReached`] rather than start a
    /// forward pass that would end past `deadline` (the first one always runs: it is what
    /// measures the rest). The default ignores the deadline.
    fn embed_until(
        &self,
        inputs: &[&str],
        max_input_tokens: usize,
        deadline: Option<std::time::Instant>,
    ) -> Result<EmbedOutput, EngineError> {
        let _ = deadline;
        self.embed(inputs, max_input_tokens)
    }
}

/// A cross-encoder reranker: scores how well each document answers a query. Implemented by
/// [`bert::BertEmbedder`] on a GGUF with a classifier head; tests may use fakes.
///
/// `rerank` is CPU-bound and blocking: callers run it off the async executor.
pub trait Reranker: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Tokenizes each (query, document) pair, refuses a pair of more than `max_input_tokens`
    /// tokens (untruncated; [`EngineError::InputTooLong`] with the document's index), then
    /// scores all pairs, batching them to share forward passes, giving up with
    /// [`EngineError::DeadlineReached`] rather than start a pass that would end past `deadline`.
    fn rerank(
        &self,
        query: &str,
        documents: &[&str],
        max_input_tokens: usize,
        deadline: Option<std::time::Instant>,
    ) -> Result<RerankOutput, EngineError>;
}

/// A text generator (chat and completions). Implemented by [`llama::LlamaGenerator`] (every
/// architecture in [`DECODERS`]); service
/// tests use fakes built on the same [`generate::generate`] loop.
///
/// `generate` is CPU-bound and blocking: callers run it off the async executor. Implementations
/// serialize concurrent calls themselves (one KV cache), so sharing one generator is safe.
pub trait Generator: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Renders a conversation with the model's chat template, ending with the assistant's turn.
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError>;

    /// Prompt text to token ids, special tokens in the text (`<|im_start|>`) parsed as such, BOS
    /// added if the model asks for it: what llama.cpp's `tokenize(add_special, parse_special)`
    /// gives.
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError>;

    /// The most bytes of text one token can cover: a text of `n` bytes has at least
    /// `n / max_token_bytes` tokens, which lets a prompt that cannot fit be refused from its
    /// length alone, before tokenizing it (tokenizing megabytes costs seconds and gigabytes).
    /// The default claims no bound.
    fn max_token_bytes(&self) -> usize {
        usize::MAX
    }

    /// Generates from `prompt`; `on_text` receives the text as it becomes final.
    fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<GenerateOutput, EngineError>;
}

/// The loaded engine, whatever its kind.
#[derive(Clone)]
pub enum Engine {
    Embedder(Arc<dyn Embedder>),
    Generator(Arc<dyn Generator>),
    Reranker(Arc<dyn Reranker>),
}

impl Engine {
    pub fn info(&self) -> &ModelInfo {
        match self {
            Engine::Embedder(e) => e.info(),
            Engine::Generator(g) => g.info(),
            Engine::Reranker(r) => r.info(),
        }
    }
}

/// Builds the engine a GGUF asks for (`general.architecture`) from borrowed bytes: what a
/// generator keeps is copied (see [`load_shared`] to keep it in place instead).
pub fn load(bytes: &[u8]) -> Result<Engine, EngineError> {
    load_inner(bytes, || Arc::new(bytes.to_vec()))
}

/// Builds the engine from shared bytes. The embedder copies (and transforms) what it keeps, so
/// the bytes can be freed afterwards; the generator keeps its quantized weights in place, like
/// llama.cpp's mmap: no second copy of a 100 MB file in memory.
pub fn load_shared(bytes: SharedBytes) -> Result<Engine, EngineError> {
    let b = bytes.clone();
    load_inner((*b).as_ref(), move || bytes)
}

/// The decoder architectures this build serves: `general.architecture` -> the llama variant
/// that runs it. Adding one: its file and one line here.
pub const DECODERS: &[(&str, llama::Variant)] = &[
    ("llama", llama::VARIANT),
    ("qwen2", qwen2::VARIANT),
    ("qwen3", qwen3::VARIANT),
    ("phi3", phi3::VARIANT),
];

/// The variant of the llama decoder that runs `arch`, if this build serves it.
pub fn decoder_variant(arch: &str) -> Option<llama::Variant> {
    DECODERS
        .iter()
        .find(|(name, _)| *name == arch)
        .map(|(_, v)| *v)
}

/// Every `general.architecture` this build serves, for error messages and docs.
pub fn supported_architectures() -> Vec<&'static str> {
    std::iter::once("bert")
        .chain(DECODERS.iter().map(|(name, _)| *name))
        .collect()
}

/// The init-time refusal of a GGUF whose architecture this build does not serve.
pub(crate) fn unsupported(arch: &str) -> EngineError {
    EngineError::InvalidModel(format!(
        "unsupported general.architecture {arch:?} (this build serves: {})",
        supported_architectures().join(", ")
    ))
}

fn load_inner(bytes: &[u8], shared: impl FnOnce() -> SharedBytes) -> Result<Engine, EngineError> {
    let t0 = std::time::Instant::now();
    let mut cursor = std::io::Cursor::new(bytes);
    let content = candle_core::quantized::gguf_file::Content::read(&mut cursor)
        .map_err(|e| EngineError::InvalidModel(kquants::explain_parse_error(&e.to_string())))?;
    let arch = gguf::Meta::of(&content).str(gguf::ARCHITECTURE)?.to_owned();
    tracing::debug!(
        parse_ms = t0.elapsed().as_secs_f64() * 1e3,
        "gguf header parsed"
    );
    match arch.as_str() {
        "bert" => {
            let bert = Arc::new(bert::BertEmbedder::load(&content, bytes)?);
            Ok(match Embedder::info(bert.as_ref()).kind {
                ModelKind::Reranker => Engine::Reranker(bert),
                _ => Engine::Embedder(bert),
            })
        }
        other => match decoder_variant(other) {
            Some(variant) => Ok(Engine::Generator(Arc::new(llama::LlamaGenerator::load_as(
                &content,
                &shared(),
                variant,
            )?))),
            None => Err(unsupported(other)),
        },
    }
}
