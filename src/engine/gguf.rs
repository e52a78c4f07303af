//! GGUF names shared by the converter (writer) and the engines (readers).
//!
//! Keys and tensor names follow llama.cpp's converter for BERT (`bert.*`, `token_embd`,
//! `blk.N.attn_q`, ...) so that BERT GGUFs written by llama.cpp load too; an XLM-RoBERTa model is
//! a BERT GGUF as well (llama.cpp does the same). A few keys are ours, because llama.cpp has no
//! place for them: the sentence-transformers truncation length, whether the pipeline ends with a
//! Normalize module, a cross-encoder's activation, where RoBERTa's positions start, and the
//! checkpoint's `model_type`. Must not do any I/O of its own.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};

use super::EngineError;

pub const ARCHITECTURE: &str = "general.architecture";
pub const NAME: &str = "general.name";
pub const FILE_TYPE: &str = "general.file_type";

pub const BERT_CONTEXT_LENGTH: &str = "bert.context_length";
pub const BERT_EMBEDDING_LENGTH: &str = "bert.embedding_length";
pub const BERT_FEED_FORWARD_LENGTH: &str = "bert.feed_forward_length";
pub const BERT_BLOCK_COUNT: &str = "bert.block_count";
pub const BERT_HEAD_COUNT: &str = "bert.attention.head_count";
pub const BERT_LAYER_NORM_EPS: &str = "bert.attention.layer_norm_epsilon";
pub const BERT_CAUSAL: &str = "bert.attention.causal";
/// Ours: the row of `position_embd` that a sequence's first token takes; absent: 0 (BERT).
/// RoBERTa-family checkpoints (XLM-R) number positions from `padding_idx + 1` (2) and give a
/// literal pad token the row `padding_idx`, so this is `padding_idx + 1` and the pad token's id
/// is one less (RoBERTa's `padding_idx` is its `pad_token_id`). The table then has
/// `bert.context_length` + this many rows: the context length counts the usable positions, as
/// in llama.cpp's XLM-R files (which drop the first rows instead).
pub const BERT_POSITION_OFFSET: &str = "bert.position_offset";
/// Ours: config.json's `model_type` when it is not `bert` (`xlm-roberta`), what `/health` and
/// `/v1/models` report as the architecture; absent: `bert`.
pub const BERT_MODEL_TYPE: &str = "bert.model_type";
/// llama.cpp's enum: 0 none, 1 mean, 2 cls, 3 last, 4 rank (a cross-encoder: the `cls` head).
pub const BERT_POOLING_TYPE: &str = "bert.pooling_type";
/// llama.cpp: the labels of a classifier head's outputs (`id2label`), when not the dummy ones.
pub const BERT_CLASSIFIER_LABELS: &str = "bert.classifier.output_labels";

/// Ours: tokens per input sentence-transformers feeds the model (`max_seq_length`, 256 for
/// all-MiniLM-L6-v2); absent: `bert.context_length`.
pub const ST_MAX_SEQ_LENGTH: &str = "sentence_transformers.max_seq_length";
/// Ours: whether embeddings are L2-normalized (a Normalize module); absent: true.
pub const ST_NORMALIZE: &str = "sentence_transformers.normalize";

/// Ours: what sentence-transformers' CrossEncoder applies to a reranker's logit (`sigmoid` or
/// `identity`); absent: `sigmoid`, its default for one output.
pub const ST_CE_ACTIVATION: &str = "sentence_transformers.cross_encoder.activation";

/// The Hugging Face tokenizer.json, verbatim (standard GGUF key). `lambda-inference convert`
/// writes it; llama.cpp's converter does not (its files carry only the `tokenizer.ggml.*` keys
/// below, from which `ggml_tokenizer::encoder` rebuilds the tokenizer).
pub const TOKENIZER_HF_JSON: &str = "tokenizer.huggingface.json";
/// The vocabulary's kind: `gpt2`, `llama` (generators); `bert` (WordPiece), `t5` (SentencePiece
/// Unigram, what llama.cpp writes for XLM-RoBERTa) for encoders.
pub const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
pub const TOKENIZER_TOKENS: &str = "tokenizer.ggml.tokens";
/// A SentencePiece Unigram vocabulary's log-probabilities, one per token.
pub const TOKENIZER_SCORES: &str = "tokenizer.ggml.scores";
pub const TOKENIZER_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub const TOKENIZER_TOKEN_TYPE_COUNT: &str = "tokenizer.ggml.token_type_count";
pub const TOKENIZER_UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
/// (sic) llama.cpp spells it this way.
pub const TOKENIZER_SEP_ID: &str = "tokenizer.ggml.seperator_token_id";
pub const TOKENIZER_PAD_ID: &str = "tokenizer.ggml.padding_token_id";
pub const TOKENIZER_CLS_ID: &str = "tokenizer.ggml.cls_token_id";
pub const TOKENIZER_MASK_ID: &str = "tokenizer.ggml.mask_token_id";
/// llama.cpp's converter writes a BERT's [CLS] and [SEP] as BOS and EOS (and SEP): its
/// `SpecialVocab` has no handler for `cls`, so `tokenizer.ggml.cls_token_id` is usually absent.
pub const TOKENIZER_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
pub const TOKENIZER_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
/// A WordPiece vocabulary's BertNormalizer flags (llama.cpp's defaults when absent: lowercase
/// true, strip_accents = lowercase, as Hugging Face's `strip_accents: null`).
pub const TOKENIZER_LOWERCASE: &str = "tokenizer.ggml.normalizer.lowercase";
pub const TOKENIZER_STRIP_ACCENTS: &str = "tokenizer.ggml.normalizer.strip_accents";
/// SentencePiece's normalization rules (the `Precompiled` normalizer's bytes), a u8 array.
pub const TOKENIZER_PRECOMPILED_CHARSMAP: &str = "tokenizer.ggml.precompiled_charsmap";
/// Whether SentencePiece puts a `▁` in front of the text (default true).
pub const TOKENIZER_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// llama.cpp pooling types.
pub const POOLING_NONE: u32 = 0;
pub const POOLING_MEAN: u32 = 1;
pub const POOLING_CLS: u32 = 2;
pub const POOLING_LAST: u32 = 3;
pub const POOLING_RANK: u32 = 4;

/// Tensor names (llama.cpp's BERT naming). `{i}` is the block index.
pub mod tensor {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    pub const POSITION_EMBD: &str = "position_embd.weight";
    pub const TOKEN_TYPES: &str = "token_types.weight";
    pub const TOKEN_EMBD_NORM: &str = "token_embd_norm";
    pub fn blk(i: usize, name: &str) -> String {
        format!("blk.{i}.{name}")
    }
    pub const ATTN_Q: &str = "attn_q";
    pub const ATTN_K: &str = "attn_k";
    pub const ATTN_V: &str = "attn_v";
    pub const ATTN_OUTPUT: &str = "attn_output";
    pub const ATTN_OUTPUT_NORM: &str = "attn_output_norm";
    pub const FFN_UP: &str = "ffn_up";
    pub const FFN_DOWN: &str = "ffn_down";
    pub const LAYER_OUTPUT_NORM: &str = "layer_output_norm";
    /// A cross-encoder's head, as llama.cpp names it: `cls` is the dense + tanh on the first
    /// token (BERT's pooler, RoBERTa's `classifier.dense`), `cls.output` the projection to the
    /// score (BERT's `classifier`, RoBERTa's `classifier.out_proj`). Either may be absent in
    /// llama.cpp's files; llama.cpp runs whichever is there, and so does the engine.
    pub const CLS: &str = "cls";
    pub const CLS_OUTPUT: &str = "cls.output";
}

/// Typed access to GGUF metadata with errors that name the key.
pub struct Meta<'a>(pub &'a HashMap<String, Value>);

impl<'a> Meta<'a> {
    pub fn of(content: &'a Content) -> Self {
        Meta(&content.metadata)
    }

    fn get(&self, key: &str) -> Result<&'a Value, EngineError> {
        self.0
            .get(key)
            .ok_or_else(|| EngineError::InvalidModel(format!("GGUF metadata has no {key}")))
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    pub fn str(&self, key: &str) -> Result<&'a str, EngineError> {
        self.get(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| EngineError::InvalidModel(format!("{key}: {e}")))
    }

    /// Any unsigned or signed integer type, as llama.cpp and other writers differ.
    pub fn usize(&self, key: &str) -> Result<usize, EngineError> {
        let v = self.get(key)?;
        let n: Option<i128> = match v {
            Value::U8(x) => Some(*x as i128),
            Value::I8(x) => Some(*x as i128),
            Value::U16(x) => Some(*x as i128),
            Value::I16(x) => Some(*x as i128),
            Value::U32(x) => Some(*x as i128),
            Value::I32(x) => Some(*x as i128),
            Value::U64(x) => Some(*x as i128),
            Value::I64(x) => Some(*x as i128),
            _ => None,
        };
        n.filter(|n| *n >= 0)
            .map(|n| n as usize)
            .ok_or_else(|| EngineError::InvalidModel(format!("{key}: not a non-negative integer")))
    }

    pub fn f32(&self, key: &str) -> Result<f32, EngineError> {
        match self.get(key)? {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            _ => Err(EngineError::InvalidModel(format!("{key}: not a float"))),
        }
    }

    pub fn bool(&self, key: &str) -> Result<bool, EngineError> {
        match self.get(key)? {
            Value::Bool(b) => Ok(*b),
            _ => Err(EngineError::InvalidModel(format!("{key}: not a bool"))),
        }
    }
}
