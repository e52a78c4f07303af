//! Quantized BERT sentence embedder: GGUF (llama.cpp's BERT names) -> sentence embeddings that
//! match sentence-transformers.
//!
//! Written the way candle's `quantized_t5.rs` is: a [`Config`] read from GGUF metadata, then
//! `load` + `forward` per block, tensor names mirroring the checkpoint. The pipeline is
//! tokenizer -> embeddings + LayerNorm -> N encoder layers (self-attention with a padding mask,
//! GELU feed-forward, post-LayerNorm) -> mean (or CLS) pooling over the mask -> L2 normalization.
//!
//! A cross-encoder (reranker) is the same encoder with a classifier head instead of pooling
//! (`bert.pooling_type` = 4, llama.cpp's RANK, and llama.cpp's `cls` / `cls.output` tensors): each
//! (query, document) pair is tokenized as one sequence by the stored tokenizer's post-processor
//! (BERT: `[CLS] q [SEP] d [SEP]`, token types 0 then 1; XLM-R: `<s> q </s></s> d </s>`), with
//! longest-first truncation, as sentence-transformers' CrossEncoder does, and the first token's
//! state goes through `cls` (dense + tanh: BERT's pooler, RoBERTa's `classifier.dense`) and
//! `cls.output` (one logit).
//!
//! XLM-RoBERTa runs on the same code (a BERT GGUF, as llama.cpp writes it too); what differs is
//! data in the file: its SentencePiece Unigram tokenizer (tokenizer.json), a one-row token-type
//! table, its LayerNorm epsilon, and positions numbered from `bert.position_offset` (RoBERTa's
//! `padding_idx + 1`) instead of 0.
//!
//! Weights: the GGUF stores the big matrices quantized (q8_0 by default) so the artifact is small
//! and fast to fetch. At load, [`WeightMode::Dense`] dequantizes the encoder matrices to f32 and
//! runs them through candle's f32 gemm, which on AVX2 beats candle's quantized matmul on batches
//! (the `bench embeddings` command prints both); the token embedding table, the largest tensor,
//! stays quantized and only the rows a batch needs are dequantized.
//!
//! Must not do I/O or know about requests: it is handed GGUF bytes and strings.

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use rayon::prelude::*;
use tokenizers::{Encoding, Tokenizer, TruncationDirection};

use super::ggml_tokenizer;
use super::gguf::{self, tensor as tn, Meta};
use super::ops::{self, AddLayerNorm, Attention, GeluErf};
use super::qgemm::Q8Linear;
use super::{
    EmbedOutput, Embedder, EngineError, ModelDetails, ModelInfo, ModelKind, RerankOutput, Reranker,
};

/// How the encoder's matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMode {
    /// Dequantized to f32 at load, candle's f32 gemm. What f32/f16 files always use.
    Dense,
    /// Kept in the file's quantized format; candle's quantized matmul (kept for comparison: 3x
    /// slower than Dense on batches, it re-reads each weight row for every input row).
    Quantized,
    /// The default: q8_0 weights multiplied by our own GEMM ([`super::qgemm`]): kept as int8 for
    /// the AVX2, AVX-512 VNNI and AMX-INT8 kernels (or rounded once to bf16 for AMX-BF16 when
    /// INT8_KERNEL=amx-bf16 asks for it). Faster and smaller than Dense (`bench embeddings` prints both); other
    /// stored types load as Dense.
    #[default]
    Int8,
}

/// Model hyper-parameters, from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Positions the model can take (`bert.context_length`): the position table has
    /// `position_offset` more rows.
    pub max_position_embeddings: usize,
    /// The position row of a sequence's first token: 0 for BERT, `padding_idx + 1` for RoBERTa
    /// (see [`gguf::BERT_POSITION_OFFSET`]).
    pub position_offset: usize,
    /// What the checkpoint was (`bert`, `xlm-roberta`): reported, not used.
    pub model_type: String,
    pub layer_norm_eps: f64,
    /// Tokens per input fed to the model (sentence-transformers' max_seq_length).
    pub max_seq_len: usize,
    pub pooling: Pooling,
    pub normalize: bool,
    /// What a reranker's logit goes through to become its score.
    pub activation: Activation,
}

/// How token states become one sentence vector (or, for a cross-encoder, one score).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    /// The classifier head on the first token: a cross-encoder.
    Rank,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Rank => "rank",
        }
    }
}

/// A reranker's logit to its score, as sentence-transformers' CrossEncoder does it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Sigmoid,
    Identity,
}

impl Config {
    pub fn from_gguf(meta: &Meta) -> Result<Self, EngineError> {
        let ctx = meta.usize(gguf::BERT_CONTEXT_LENGTH)?;
        let pooling = if meta.has(gguf::BERT_POOLING_TYPE) {
            match meta.usize(gguf::BERT_POOLING_TYPE)? as u32 {
                gguf::POOLING_MEAN => Pooling::Mean,
                gguf::POOLING_CLS => Pooling::Cls,
                gguf::POOLING_RANK => Pooling::Rank,
                other => {
                    return Err(EngineError::InvalidModel(format!(
                        "{} = {other}: only mean (1), cls (2) and rank (4, a cross-encoder) \
                         pooling are supported",
                        gguf::BERT_POOLING_TYPE
                    )))
                }
            }
        } else {
            Pooling::Mean
        };
        let max_seq_len = if meta.has(gguf::ST_MAX_SEQ_LENGTH) {
            meta.usize(gguf::ST_MAX_SEQ_LENGTH)?.min(ctx)
        } else {
            ctx
        };
        let activation = if meta.has(gguf::ST_CE_ACTIVATION) {
            match meta.str(gguf::ST_CE_ACTIVATION)? {
                "sigmoid" => Activation::Sigmoid,
                "identity" => Activation::Identity,
                other => {
                    return Err(EngineError::InvalidModel(format!(
                        "{} = {other:?}: only \"sigmoid\" and \"identity\" are supported",
                        gguf::ST_CE_ACTIVATION
                    )))
                }
            }
        } else {
            Activation::Sigmoid
        };
        let cfg = Config {
            hidden_size: meta.usize(gguf::BERT_EMBEDDING_LENGTH)?,
            intermediate_size: meta.usize(gguf::BERT_FEED_FORWARD_LENGTH)?,
            num_hidden_layers: meta.usize(gguf::BERT_BLOCK_COUNT)?,
            num_attention_heads: meta.usize(gguf::BERT_HEAD_COUNT)?,
            max_position_embeddings: ctx,
            position_offset: if meta.has(gguf::BERT_POSITION_OFFSET) {
                meta.usize(gguf::BERT_POSITION_OFFSET)?
            } else {
                0
            },
            model_type: if meta.has(gguf::BERT_MODEL_TYPE) {
                meta.str(gguf::BERT_MODEL_TYPE)?.to_owned()
            } else {
                "bert".to_owned()
            },
            layer_norm_eps: meta.f32(gguf::BERT_LAYER_NORM_EPS)? as f64,
            max_seq_len,
            pooling,
            normalize: !meta.has(gguf::ST_NORMALIZE) || meta.bool(gguf::ST_NORMALIZE)?,
            activation,
        };
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(EngineError::InvalidModel(format!(
                "hidden size {} is not a multiple of {} heads",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if cfg.max_seq_len < 2 {
            return Err(EngineError::InvalidModel(
                "max sequence length below 2".into(),
            ));
        }
        Ok(cfg)
    }
}

/// Reads tensors out of the GGUF bytes by name.
struct Weights<'a> {
    content: &'a Content,
    bytes: &'a [u8],
    device: Device,
}

impl Weights<'_> {
    fn qtensor(&self, name: &str) -> Result<QTensor, EngineError> {
        let mut cursor = std::io::Cursor::new(self.bytes);
        self.content
            .tensor(&mut cursor, name, &self.device)
            .map_err(|e| EngineError::InvalidModel(format!("tensor {name}: {e}")))
    }

    /// The stored bytes, type and shape of tensor `name`.
    fn raw(&self, name: &str) -> Result<(&[u8], GgmlDType, Vec<usize>), EngineError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| EngineError::InvalidModel(format!("GGUF has no tensor {name}")))?;
        let dtype = info.ggml_dtype;
        let size = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let raw = self.bytes.get(start..start + size).ok_or_else(|| {
            EngineError::InvalidModel(format!("tensor {name} runs past the end of the file"))
        })?;
        Ok((raw, dtype, info.shape.dims().to_vec()))
    }

    /// Dequantizes tensor `name` (exactly `out.len()` elements) straight from the file bytes into
    /// `out`: no intermediate QTensor copy, which keeps the load's peak RSS to the final weights.
    /// f32, f16 and q8_0 (what `convert` writes) are converted here; other types through candle.
    fn dequantize_into(&self, name: &str, out: &mut [f32]) -> Result<(), EngineError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| EngineError::InvalidModel(format!("GGUF has no tensor {name}")))?;
        let n = info.shape.elem_count();
        if n != out.len() {
            return Err(EngineError::InvalidModel(format!(
                "tensor {name} has shape {:?} ({n} elements), expected {} elements",
                info.shape.dims(),
                out.len()
            )));
        }
        let dtype = info.ggml_dtype;
        let size = n / dtype.block_size() * dtype.type_size();
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let raw = self.bytes.get(start..start + size).ok_or_else(|| {
            EngineError::InvalidModel(format!("tensor {name} runs past the end of the file"))
        })?;
        match dtype {
            GgmlDType::F32 => {
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            GgmlDType::F16 => {
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            GgmlDType::Q8_0 => {
                // Block: f16 scale, then 32 signed bytes.
                for (o, b) in out.chunks_exact_mut(32).zip(raw.chunks_exact(34)) {
                    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    for (o, &q) in o.iter_mut().zip(&b[2..]) {
                        *o = (q as i8) as f32 * d;
                    }
                }
            }
            _ => {
                let t = self
                    .qtensor(name)?
                    .dequantize(&self.device)?
                    .flatten_all()?;
                out.copy_from_slice(&t.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }

    /// A tensor as f32, checked against the expected shape.
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Tensor, EngineError> {
        let t = self.qtensor(name)?.dequantize(&self.device)?;
        if t.dims() != shape {
            return Err(EngineError::InvalidModel(format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        Ok(t)
    }
}

/// A dense layer `y = x W^T + b`.
struct Linear {
    weight: LinearWeight,
    bias: Tensor,
}

enum LinearWeight {
    /// f32 `[out, in]`, used through `matmul(w.t())` (gemm reads the transposed view directly).
    Dense(Tensor),
    Quantized(QMatMul),
    /// q8_0 repacked for the int8 GEMM; holds the bias too.
    Int8(Q8Linear),
}

impl Linear {
    /// Loads `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]`; `parts` > 1 fuses several
    /// same-input projections (q, k, v) into one matmul by stacking their rows.
    fn load(
        w: &Weights,
        prefixes: &[String],
        in_dim: usize,
        out_dim: usize,
        mode: WeightMode,
    ) -> Result<Self, EngineError> {
        let mut biases = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            biases.push(w.f32(&format!("{p}.bias"), &[out_dim])?);
        }
        let bias = Tensor::cat(&biases, 0)?;
        let all_q8 = || -> Result<bool, EngineError> {
            for p in prefixes {
                if w.raw(&format!("{p}.weight"))?.1 != GgmlDType::Q8_0 {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        let mode = if mode == WeightMode::Int8 && !all_q8()? {
            WeightMode::Dense
        } else {
            mode
        };
        let weight = match mode {
            WeightMode::Int8 => {
                let mut data = Vec::new();
                for p in prefixes {
                    let name = format!("{p}.weight");
                    let (raw, _, dims) = w.raw(&name)?;
                    if dims != [out_dim, in_dim] {
                        return Err(EngineError::InvalidModel(format!(
                            "tensor {name} has shape {dims:?}, expected [{out_dim}, {in_dim}]"
                        )));
                    }
                    data.extend_from_slice(raw);
                }
                let rows = out_dim * prefixes.len();
                let b = bias.to_vec1::<f32>()?;
                LinearWeight::Int8(Q8Linear::from_q8_0(&data, rows, in_dim, b)?)
            }
            WeightMode::Dense => {
                // Stacked parts dequantize straight into one buffer: no per-part tensors + cat.
                let part = out_dim * in_dim;
                let mut data = vec![0f32; part * prefixes.len()];
                for (p, out) in prefixes.iter().zip(data.chunks_exact_mut(part)) {
                    w.dequantize_into(&format!("{p}.weight"), out)?;
                }
                let rows = out_dim * prefixes.len();
                LinearWeight::Dense(Tensor::from_vec(data, (rows, in_dim), &w.device)?)
            }
            WeightMode::Quantized => {
                let mut qs = Vec::with_capacity(prefixes.len());
                for p in prefixes {
                    let q = w.qtensor(&format!("{p}.weight"))?;
                    if q.shape().dims() != [out_dim, in_dim] {
                        return Err(EngineError::InvalidModel(format!(
                            "tensor {p}.weight has shape {:?}, expected [{out_dim}, {in_dim}]",
                            q.shape().dims()
                        )));
                    }
                    qs.push(q);
                }
                LinearWeight::Quantized(QMatMul::from_qtensor(concat_rows(qs, in_dim)?)?)
            }
        };
        Ok(Self { weight, bias })
    }

    /// Whether `rows` input rows run on the calling thread (only the int8 GEMM says so; candle's
    /// matmuls may split any size).
    fn serial_at(&self, rows: usize) -> bool {
        matches!(&self.weight, LinearWeight::Int8(q) if q.serial_at(rows))
    }

    /// `x`: `[n, in]` -> `[n, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
            LinearWeight::Quantized(q) => q.forward(x)?,
            LinearWeight::Int8(q) => return Ok(x.apply_op1_no_bwd(q)?),
        };
        Ok(y.broadcast_add(&self.bias)?)
    }
}

/// Stacks quantized matrices with the same row length: rows are independent blocks in every GGML
/// format, so the byte concatenation is the stacked matrix.
fn concat_rows(qs: Vec<QTensor>, in_dim: usize) -> Result<QTensor, EngineError> {
    if qs.len() == 1 {
        return Ok(qs.into_iter().next().expect("one element, checked above"));
    }
    let dtype = qs[0].dtype();
    if qs.iter().any(|q| q.dtype() != dtype) {
        return Err(EngineError::InvalidModel(
            "q/k/v projections are stored in different types".into(),
        ));
    }
    let rows: usize = qs.iter().map(|q| q.shape().dims()[0]).sum();
    let mut data = Vec::new();
    for q in &qs {
        data.extend_from_slice(&q.data()?);
    }
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(data),
        &Device::Cpu,
        dtype,
    )?;
    Ok(QTensor::new(storage, (rows, in_dim))?)
}

/// LayerNorm of a sum: every norm in BERT follows a residual add (or the embeddings' sum).
struct LayerNorm(AddLayerNorm);

impl LayerNorm {
    fn load(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self, EngineError> {
        Ok(Self(AddLayerNorm {
            weight: w.f32(&format!("{prefix}.weight"), &[dim])?.to_vec1()?,
            bias: w.f32(&format!("{prefix}.bias"), &[dim])?.to_vec1()?,
            eps: eps as f32,
        }))
    }

    /// `LayerNorm(a + b)`.
    fn forward_add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor, EngineError> {
        Ok(a.apply_op2_no_bwd(b, &self.0)?)
    }
}

/// Token + position + token-type embeddings, then LayerNorm (`token_embd*`, `position_embd`,
/// `token_types`).
struct Embeddings {
    /// Kept quantized: 30k x 384 is the largest tensor, and a batch needs a few hundred rows.
    token: QTensor,
    position: Tensor,
    /// The token-type table `[types, h]`: pairs (a BERT reranker's query and document) use rows
    /// 0 and 1. RoBERTa-family models have one row.
    token_types: Tensor,
    /// Row 0 of the token-type table: single-sentence inputs have type 0 everywhere.
    token_type0: Tensor,
    norm: LayerNorm,
}

impl Embeddings {
    fn load(w: &Weights, cfg: &Config) -> Result<Self, EngineError> {
        let h = cfg.hidden_size;
        let token = w.qtensor(tn::TOKEN_EMBD)?;
        if token.shape().dims().len() != 2 || token.shape().dims()[1] != h {
            return Err(EngineError::InvalidModel(format!(
                "{} has shape {:?}, expected [vocab, {h}]",
                tn::TOKEN_EMBD,
                token.shape().dims()
            )));
        }
        let rows = cfg
            .max_position_embeddings
            .checked_add(cfg.position_offset)
            .ok_or_else(|| {
                EngineError::InvalidModel(format!("{} is too large", gguf::BERT_POSITION_OFFSET))
            })?;
        let position = w.f32(tn::POSITION_EMBD, &[rows, h])?;
        let types = w.qtensor(tn::TOKEN_TYPES)?.dequantize(&w.device)?;
        if types.dims().len() != 2 || types.dims()[1] != h {
            return Err(EngineError::InvalidModel(format!(
                "{} has shape {:?}, expected [types, {h}]",
                tn::TOKEN_TYPES,
                types.dims()
            )));
        }
        Ok(Self {
            token,
            position,
            token_type0: types.get(0)?,
            token_types: types,
            norm: LayerNorm::load(w, tn::TOKEN_EMBD_NORM, h, cfg.layer_norm_eps)?,
        })
    }

    /// `ids`, `positions` and `types` (`None`: type 0 everywhere): `[n]` u32 (packed
    /// sequences) -> `[n, h]`.
    fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        types: Option<&Tensor>,
    ) -> Result<Tensor, EngineError> {
        let tok = self.token.embedding(ids)?; // [n, h]
        let pos = self.position.index_select(positions, 0)?;
        let pos = match types {
            None => pos.broadcast_add(&self.token_type0)?,
            Some(t) => {
                let max = t.max(0)?.to_scalar::<u32>()? as usize;
                if max >= self.token_types.dims()[0] {
                    return Err(EngineError::InvalidModel(format!(
                        "token type {max} used, but {} has {} rows",
                        tn::TOKEN_TYPES,
                        self.token_types.dims()[0]
                    )));
                }
                (pos + self.token_types.index_select(t, 0)?)?
            }
        }; // [n, h]
        self.norm.forward_add(&tok, &pos)
    }
}

/// One encoder layer: self-attention + feed-forward, each with residual and post-LayerNorm.
struct Layer {
    qkv: Linear,
    attn_output: Linear,
    attn_output_norm: LayerNorm,
    ffn_up: Linear,
    ffn_down: Linear,
    layer_output_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
    span: tracing::Span,
}

impl Layer {
    fn load(w: &Weights, cfg: &Config, i: usize, mode: WeightMode) -> Result<Self, EngineError> {
        let h = cfg.hidden_size;
        let ff = cfg.intermediate_size;
        let qkv = [tn::ATTN_Q, tn::ATTN_K, tn::ATTN_V].map(|n| tn::blk(i, n));
        Ok(Self {
            qkv: Linear::load(w, &qkv, h, h, mode)?,
            attn_output: Linear::load(w, &[tn::blk(i, tn::ATTN_OUTPUT)], h, h, mode)?,
            attn_output_norm: LayerNorm::load(
                w,
                &tn::blk(i, tn::ATTN_OUTPUT_NORM),
                h,
                cfg.layer_norm_eps,
            )?,
            ffn_up: Linear::load(w, &[tn::blk(i, tn::FFN_UP)], h, ff, mode)?,
            ffn_down: Linear::load(w, &[tn::blk(i, tn::FFN_DOWN)], ff, h, mode)?,
            layer_output_norm: LayerNorm::load(
                w,
                &tn::blk(i, tn::LAYER_OUTPUT_NORM),
                h,
                cfg.layer_norm_eps,
            )?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            span: tracing::span!(tracing::Level::TRACE, "bert-layer", i),
        })
    }

    /// `x`: `[Σ lens, h]`, the sequences packed one after another (no padding).
    fn forward(&self, x: &Tensor, lens: &[usize]) -> Result<Tensor, EngineError> {
        let _enter = self.span.enter();
        let qkv = self.qkv.forward(x)?;
        let ctx = qkv.apply_op1_no_bwd(&Attention {
            heads: self.heads,
            head_dim: self.head_dim,
            lens: lens.to_vec(),
        })?;
        let attn = self.attn_output.forward(&ctx)?;
        let x = self.attn_output_norm.forward_add(&attn, x)?;
        let up = self.ffn_up.forward(&x)?;
        up.inplace_op1(&GeluErf)?;
        let down = self.ffn_down.forward(&up)?;
        self.layer_output_norm.forward_add(&down, &x)
    }
}

/// A cross-encoder's classifier head, run on each sequence's first token as llama.cpp runs it:
/// `cls` (dense + tanh) if present, then `cls.output` (the projection) if present.
struct ClassifierHead {
    dense: Option<Linear>,
    output: Option<Linear>,
}

impl ClassifierHead {
    fn load(w: &Weights, h: usize) -> Result<Self, EngineError> {
        // Small, and the score is what the user sees: kept in f32 whatever the file stores.
        let load = |name: &str, inp: usize| -> Result<Option<(Linear, usize)>, EngineError> {
            let weight = format!("{name}.weight");
            if !w.content.tensor_infos.contains_key(&weight) {
                return Ok(None);
            }
            let out = match w.raw(&weight)?.2.as_slice() {
                [out, i] if *i == inp => *out,
                dims => {
                    return Err(EngineError::InvalidModel(format!(
                        "tensor {weight} has shape {dims:?}, expected [outputs, {inp}]"
                    )))
                }
            };
            let linear = Linear::load(w, &[name.to_owned()], inp, out, WeightMode::Dense)?;
            Ok(Some((linear, out)))
        };
        let dense = load(tn::CLS, h)?;
        let inp = dense.as_ref().map_or(h, |(_, out)| *out);
        let output = load(tn::CLS_OUTPUT, inp)?;
        let outputs = match (&dense, &output) {
            (_, Some((_, n))) | (Some((_, n)), None) => *n,
            (None, None) => {
                return Err(EngineError::InvalidModel(format!(
                    "{} = 4 (rank) but the GGUF has neither {}.weight nor {}.weight (the \
                     cross-encoder's classifier head)",
                    gguf::BERT_POOLING_TYPE,
                    tn::CLS,
                    tn::CLS_OUTPUT
                )))
            }
        };
        if outputs != 1 {
            return Err(EngineError::InvalidModel(format!(
                "the classifier head has {outputs} outputs; reranking needs a cross-encoder with \
                 one (num_labels = 1)"
            )));
        }
        Ok(Self {
            dense: dense.map(|(l, _)| l),
            output: output.map(|(l, _)| l),
        })
    }

    /// `first`: `[n, h]`, each sequence's first token -> `n` logits.
    fn forward(&self, first: &Tensor) -> Result<Vec<f32>, EngineError> {
        let mut x = first.clone();
        if let Some(d) = &self.dense {
            x = d.forward(&x)?.tanh()?;
        }
        if let Some(o) = &self.output {
            x = o.forward(&x)?;
        }
        Ok(x.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// The BERT encoder with its tokenizer, and a classifier head when the GGUF is a cross-encoder.
pub struct BertEmbedder {
    info: ModelInfo,
    cfg: Config,
    tokenizer: Tokenizer,
    /// Special tokens the post-processor adds around one sequence ([CLS] ... [SEP]: 2).
    added_tokens: usize,
    /// Special tokens it adds around a pair ([CLS] q [SEP] d [SEP]: 3).
    added_pair_tokens: usize,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// `Some` exactly when the pooling is [`Pooling::Rank`].
    head: Option<ClassifierHead>,
    device: Device,
}

/// One input of at most this many bytes is tokenized on the calling thread (see `embed_until`),
/// and run there too if [`BertEmbedder::runs_serially`] says so.
const SERIAL_INPUT_BYTES: usize = 256;

/// Inputs per forward pass; also bounds the padded activations of one pass.
const MAX_BATCH: usize = 32;

/// Inputs longer than this many bytes are tokenized window by window (see
/// [`BertEmbedder::tokenize_bounded`]).
pub const WINDOW: usize = 16 * 1024;

/// Where the window starting at `start` ends: [`WINDOW`] bytes on, moved back to the last
/// whitespace in its second half (a word is never cut), else to a char boundary.
fn window_end(text: &str, start: usize) -> usize {
    let mut end = start + WINDOW;
    if end >= text.len() {
        return text.len();
    }
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut half = start + WINDOW / 2;
    while !text.is_char_boundary(half) {
        half += 1;
    }
    match text[half..end].rfind(char::is_whitespace) {
        Some(at) if half + at > start => half + at,
        _ => end,
    }
}

impl BertEmbedder {
    /// Builds the embedder from a parsed GGUF and its bytes, with the default [`WeightMode`].
    pub fn load(content: &Content, bytes: &[u8]) -> Result<Self, EngineError> {
        Self::load_with(content, bytes, WeightMode::default())
    }

    pub fn load_with(
        content: &Content,
        bytes: &[u8],
        mode: WeightMode,
    ) -> Result<Self, EngineError> {
        let meta = Meta::of(content);
        let mut cfg = Config::from_gguf(&meta)?;
        // llama.cpp's converter writes no pooling type for a cross-encoder (llama.cpp is told
        // `--pooling rank` when it runs one), only its head: `cls` / `cls.output` tensors, which
        // it never keeps for an embedder (BERT's pooler and MLM head are dropped). Served as an
        // embedder, such a file would answer, wrongly; its head makes it a reranker.
        let has_head = [tn::CLS, tn::CLS_OUTPUT]
            .iter()
            .any(|n| content.tensor_infos.contains_key(&format!("{n}.weight")));
        if !meta.has(gguf::BERT_POOLING_TYPE) && has_head {
            tracing::info!(
                key = gguf::BERT_POOLING_TYPE,
                "absent, and the file has a classifier head: a cross-encoder (rank pooling)"
            );
            cfg.pooling = Pooling::Rank;
        }
        // llama.cpp's converter writes neither of our sentence-transformers keys: the defaults
        // are said, not assumed silently (an embedder's; a cross-encoder's window is its
        // positions, as CrossEncoder's, and it is not normalized).
        let embedder = cfg.pooling != Pooling::Rank;
        if embedder && !meta.has(gguf::ST_NORMALIZE) {
            tracing::info!(
                key = gguf::ST_NORMALIZE,
                "absent: embeddings are L2-normalized (what sentence-transformers' Normalize \
                 module does, and llama.cpp's embedding example by default)"
            );
        }
        if embedder && !meta.has(gguf::ST_MAX_SEQ_LENGTH) {
            tracing::warn!(
                key = gguf::ST_MAX_SEQ_LENGTH,
                max_seq_len = cfg.max_seq_len,
                "absent: inputs are truncated at {}, which can be longer than the \
                 sentence-transformers model's max_seq_length (all-MiniLM-L6-v2: 512, not 256); \
                 inputs between the two embed differently",
                gguf::BERT_CONTEXT_LENGTH
            );
        }
        let device = Device::Cpu;
        let w = Weights {
            content,
            bytes,
            device: device.clone(),
        };
        // Cold start is on the user's clock: the tokenizer (JSON parse of a 30k vocab) and the
        // weights (dequantize + fresh pages) are independent, so they load on both cores.
        let t0 = std::time::Instant::now();
        let (tokenizer, weights) = rayon::join(
            || load_tokenizer(&meta),
            || -> Result<_, EngineError> {
                let embeddings = Embeddings::load(&w, &cfg)?;
                let layers = (0..cfg.num_hidden_layers)
                    .into_par_iter()
                    .map(|i| Layer::load(&w, &cfg, i, mode))
                    .collect::<Result<Vec<_>, _>>()?;
                let head = match cfg.pooling {
                    Pooling::Rank => Some(ClassifierHead::load(&w, cfg.hidden_size)?),
                    Pooling::Mean | Pooling::Cls => None,
                };
                Ok((embeddings, layers, head))
            },
        );
        let (tokenizer, (embeddings, layers, head)) = (tokenizer?, weights?);
        tracing::debug!(load_ms = t0.elapsed().as_secs_f64() * 1e3, "bert loaded");
        let added = |pair| {
            tokenizer
                .get_post_processor()
                .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, pair))
        };
        let (added_tokens, added_pair_tokens) = (added(false), added(true));
        if cfg.max_seq_len <= added_pair_tokens && head.is_some() {
            return Err(EngineError::InvalidModel(format!(
                "max sequence length {} leaves no room for a query and a document",
                cfg.max_seq_len
            )));
        }
        let quantization = content
            .tensor_infos
            .get(&format!("{}.weight", tn::blk(0, tn::FFN_UP)))
            .map(|t| dtype_name(t.ggml_dtype))
            .unwrap_or("unknown")
            .to_owned();
        let name = meta
            .str(gguf::NAME)
            .map(str::to_owned)
            .unwrap_or_else(|_| "bert".to_owned());
        let info = ModelInfo {
            name,
            architecture: cfg.model_type.clone(),
            kind: if head.is_some() {
                ModelKind::Reranker
            } else {
                ModelKind::Embedder
            },
            quantization,
            dimensions: cfg.hidden_size,
            max_seq_len: cfg.max_seq_len,
            details: ModelDetails::of(content, "bert", cfg.pooling.name()),
        };
        Ok(Self {
            info,
            cfg,
            tokenizer,
            added_tokens,
            added_pair_tokens,
            embeddings,
            layers,
            head,
            device,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Token ids per input exactly as sentence-transformers feeds them: special tokens added,
    /// truncated to `max_seq_len`, no padding. Also returns the untruncated lengths.
    pub fn tokenize(&self, inputs: &[&str]) -> Result<(Vec<Encoding>, Vec<usize>), EngineError> {
        self.tokenize_bounded(inputs, usize::MAX)
    }

    /// [`Self::tokenize`], refusing an input of more than `max_input_tokens` tokens with
    /// [`EngineError::InputTooLong`], in memory bounded whatever the input's size: an input
    /// longer than [`WINDOW`] bytes is counted window by window (stopping as soon as it is over
    /// the limit), and only the prefix that holds the model's window is encoded. Tokenizing a
    /// 6 MB input whole would hold millions of token records (gigabytes) for a model that sees
    /// 256 of them.
    pub fn tokenize_bounded(
        &self,
        inputs: &[&str],
        max_input_tokens: usize,
    ) -> Result<(Vec<Encoding>, Vec<usize>), EngineError> {
        let added = self.added_tokens;
        let keep = self.cfg.max_seq_len - added;
        let (raw, counts) =
            self.encode_raw(inputs, keep, max_input_tokens.saturating_sub(added))?;
        let mut full = Vec::with_capacity(raw.len());
        let mut out = Vec::with_capacity(raw.len());
        for (index, (mut enc, count)) in raw.into_iter().zip(counts).enumerate() {
            let tokens = count.saturating_add(added);
            if tokens > max_input_tokens {
                return Err(EngineError::InputTooLong {
                    index,
                    tokens,
                    limit: max_input_tokens,
                });
            }
            full.push(tokens);
            if enc.len() > keep {
                enc.truncate(keep, 0, TruncationDirection::Right);
            }
            let enc = self
                .tokenizer
                .post_process(enc, None, true)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            out.push(enc);
        }
        Ok((out, full))
    }

    /// The (query, document) pairs as a cross-encoder sees them, exactly as Hugging Face
    /// tokenizers encode a pair with longest-first truncation to `max_seq_len` (what
    /// sentence-transformers' CrossEncoder asks for), special tokens and token types from the
    /// tokenizer's own post-processor (BERT: `[CLS] q [SEP] d [SEP]`, types 0 then 1; XLM-R:
    /// `<s> q </s></s> d </s>`). A pair of more than `max_input_tokens` tokens before truncation is refused with
    /// [`EngineError::InputTooLong`] naming the document (the query alone: document 0); counting
    /// is bounded as in [`Self::tokenize_bounded`].
    pub fn tokenize_pairs(
        &self,
        query: &str,
        documents: &[&str],
        max_input_tokens: usize,
    ) -> Result<Vec<Encoding>, EngineError> {
        let added = self.added_pair_tokens;
        let budget = self.cfg.max_seq_len - added;
        let stop = max_input_tokens.saturating_sub(added);
        let (mut q, qn) = self.encode_raw(&[query], budget, stop)?;
        let (q, qn) = (q.remove(0), qn[0]);
        let too_long = |index, tokens| EngineError::InputTooLong {
            index,
            tokens,
            limit: max_input_tokens,
        };
        if qn.saturating_add(added) > max_input_tokens {
            return Err(too_long(0, qn.saturating_add(added)));
        }
        let (docs, counts) = self.encode_raw(documents, budget, stop - qn)?;
        let params = tokenizers::utils::truncation::TruncationParams {
            max_length: budget,
            strategy: tokenizers::utils::truncation::TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        };
        let mut out = Vec::with_capacity(docs.len());
        for (index, (d, dn)) in docs.into_iter().zip(counts).enumerate() {
            let tokens = qn.saturating_add(dn).saturating_add(added);
            if tokens > max_input_tokens {
                return Err(too_long(index, tokens));
            }
            let (a, b) =
                tokenizers::utils::truncation::truncate_encodings(q.clone(), Some(d), &params)
                    .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            let enc = self
                .tokenizer
                .post_process(a, b, true)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            out.push(enc);
        }
        Ok(out)
    }

    /// Each text's tokens without special tokens, and its count. A text longer than [`WINDOW`]
    /// bytes is counted window by window (stopping once over `stop_above`, so the count is then
    /// a lower bound above it) and only the prefix holding at least `keep` tokens is encoded.
    fn encode_raw(
        &self,
        inputs: &[&str],
        keep: usize,
        stop_above: usize,
    ) -> Result<(Vec<Encoding>, Vec<usize>), EngineError> {
        let mut texts = Vec::with_capacity(inputs.len());
        let mut counted = vec![None; inputs.len()];
        for (index, &text) in inputs.iter().enumerate() {
            if text.len() <= WINDOW {
                texts.push(text);
                continue;
            }
            let (prefix_end, count) = self.count_windows(text, keep, stop_above)?;
            counted[index] = Some(count);
            if count > stop_above {
                // Over the limit: the caller refuses it, nothing more of it is needed.
                texts.push("");
            } else {
                texts.push(&text[..prefix_end]);
            }
        }
        // Tokenize without specials; the callers truncate, then post-process: the same order
        // tokenizers' own `encode` uses, but they also learn the untruncated length.
        let raw = if let [text] = texts.as_slice() {
            // One text: encoded here. `encode_batch` hands even one text to the compute pool,
            // which from outside it (the one-short-input path of `embed_until`) is a thread
            // wake-up each way; `encode_batch` encodes each text with this same call.
            vec![self
                .tokenizer
                .encode_char_offsets(*text, false)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?]
        } else {
            self.tokenizer
                .encode_batch(texts, false)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?
        };
        let counts = raw
            .iter()
            .zip(&counted)
            .map(|(enc, c)| c.unwrap_or(enc.len()))
            .collect();
        Ok((raw, counts))
    }

    /// Counts the tokens of a long text window by window, stopping once the count is over
    /// `stop_above`. Returns the end of the shortest prefix (made of whole windows) holding at
    /// least `keep` tokens, and the count. Windows are cut before whitespace, where BERT's
    /// pre-tokenizer (and SentencePiece's Metaspace, which splits at spaces too) splits anyway,
    /// so the prefix's tokens are the text's first tokens.
    fn count_windows(
        &self,
        text: &str,
        keep: usize,
        stop_above: usize,
    ) -> Result<(usize, usize), EngineError> {
        let (mut start, mut count, mut prefix_end) = (0, 0usize, None);
        while start < text.len() {
            let end = window_end(text, start);
            let n = self
                .tokenizer
                .encode_fast(&text[start..end], false)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?
                .len();
            count += n;
            start = end;
            if prefix_end.is_none() && count >= keep {
                prefix_end = Some(end);
            }
            if count > stop_above {
                break;
            }
        }
        Ok((prefix_end.unwrap_or(text.len()), count))
    }

    /// The encoder over a batch of inputs, packed one after another with no padding (every op
    /// is per token except attention, which is per sequence): `[Σ lens, h]` token states.
    fn encode(&self, encs: &[&Encoding], lens: &[usize]) -> Result<Tensor, EngineError> {
        let rows: usize = lens.iter().sum();
        let mut ids = Vec::with_capacity(rows);
        let mut positions = Vec::with_capacity(rows);
        let offset = self.cfg.position_offset as u32;
        for e in encs {
            ids.extend_from_slice(e.get_ids());
            if offset == 0 {
                positions.extend(0..e.len() as u32);
            } else {
                // transformers' create_position_ids_from_input_ids: RoBERTa counts positions
                // over the tokens that are not its pad token (id padding_idx = offset - 1),
                // from offset on, and gives a pad token the row padding_idx. Batches here are
                // packed, so only a literal pad token in the text is one.
                let pad = offset - 1;
                let mut next = offset;
                positions.extend(e.get_ids().iter().map(|&id| {
                    if id == pad {
                        pad
                    } else {
                        next += 1;
                        next - 1
                    }
                }));
            }
        }
        // Token types only where some are not 0 (pairs): single inputs add row 0 to every token.
        // A one-row table is RoBERTa's: its tokenizers return no token types, so transformers
        // adds row 0 to every token whatever the post-processor numbered the segments.
        let types = if self.embeddings.token_types.dims()[0] > 1
            && encs
                .iter()
                .any(|e| e.get_type_ids().iter().any(|&t| t != 0))
        {
            let t: Vec<u32> = encs
                .iter()
                .flat_map(|e| e.get_type_ids())
                .copied()
                .collect();
            Some(Tensor::from_vec(t, rows, &self.device)?)
        } else {
            None
        };
        let ids = Tensor::from_vec(ids, rows, &self.device)?;
        let positions = Tensor::from_vec(positions, rows, &self.device)?;
        let mut x = self.embeddings.forward(&ids, &positions, types.as_ref())?;
        for layer in &self.layers {
            x = layer.forward(&x, lens)?;
        }
        Ok(x)
    }

    /// One forward pass of (query, document) pairs through the encoder and the head: a logit
    /// per pair.
    fn score_batch(
        &self,
        head: &ClassifierHead,
        encs: &[&Encoding],
    ) -> Result<Vec<f32>, EngineError> {
        let lens: Vec<usize> = encs.iter().map(|e| e.len()).collect();
        let x = self.encode(encs, &lens)?;
        let mut first = Vec::with_capacity(lens.len());
        let mut start = 0u32;
        for &len in &lens {
            first.push(start);
            start += len as u32;
        }
        let first = Tensor::from_vec(first, lens.len(), &self.device)?;
        let cls = x.to_dtype(DType::F32)?.index_select(&first, 0)?;
        head.forward(&cls)
    }

    /// Whether a forward pass over `tokens` packed tokens of one sequence would run every op on
    /// one thread even on the pool: each int8 GEMM is under its split threshold, GELU and the
    /// norms fit one chunk (attention splits by sequence only).
    fn runs_serially(&self, tokens: usize) -> bool {
        tokens <= ops::NORM_ROWS
            && tokens * self.cfg.intermediate_size <= ops::GELU_CHUNK
            && self.layers.iter().all(|l| {
                [&l.qkv, &l.attn_output, &l.ffn_up, &l.ffn_down]
                    .iter()
                    .all(|x| x.serial_at(tokens))
            })
    }

    /// One forward pass over a batch of inputs: `[n][h]` sentence vectors.
    fn forward_batch(&self, encs: &[&Encoding]) -> Result<Vec<Vec<f32>>, EngineError> {
        let lens: Vec<usize> = encs.iter().map(|e| e.len()).collect();
        let x = self.encode(encs, &lens)?;
        let h = self.cfg.hidden_size;
        let x = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(encs.len());
        let mut start = 0;
        for &len in &lens {
            let seq = &x[start * h..(start + len) * h];
            start += len;
            let mut v = match self.cfg.pooling {
                // A cross-encoder's embedding is its first token's state (it is not served as
                // an embedder; the load decides).
                Pooling::Cls | Pooling::Rank => seq[..h].to_vec(),
                Pooling::Mean => {
                    let mut sum = vec![0f32; h];
                    for row in seq.chunks_exact(h) {
                        for (s, r) in sum.iter_mut().zip(row) {
                            *s += r;
                        }
                    }
                    let inv = 1.0 / len.max(1) as f32;
                    sum.iter_mut().for_each(|s| *s *= inv);
                    sum
                }
            };
            if self.cfg.normalize {
                let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|a| *a /= norm);
            }
            out.push(v);
        }
        Ok(out)
    }
}

impl Embedder for BertEmbedder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed(&self, inputs: &[&str], max_input_tokens: usize) -> Result<EmbedOutput, EngineError> {
        self.embed_until(inputs, max_input_tokens, None)
    }

    fn embed_until(
        &self,
        inputs: &[&str],
        max_input_tokens: usize,
        deadline: Option<std::time::Instant>,
    ) -> Result<EmbedOutput, EngineError> {
        // One short input (a search query, the usual warm request): every op of its forward
        // pass runs on one thread anyway (the int8 GEMMs do not split under ~12M multiply-adds,
        // GELU and the norms work in chunks larger than its rows), so it runs on the calling
        // thread, without handing the call to the pool and sleeping until a worker is done.
        if let [one] = inputs {
            if one.len() <= SERIAL_INPUT_BYTES {
                let (encs, _) = self.tokenize_bounded(inputs, max_input_tokens)?;
                let run = || -> Result<EmbedOutput, EngineError> {
                    Ok(EmbedOutput {
                        embeddings: self.in_batches(&encs, deadline, |b| self.forward_batch(b))?,
                        token_counts: vec![encs[0].len()],
                    })
                };
                return if self.runs_serially(encs[0].len()) {
                    run()
                } else {
                    rayon::scope(|_| run())
                };
            }
        }
        // Anything else runs on a compute-pool worker: every parallel op inside (gemm,
        // attention, layer norm) then forks from a worker, instead of each one handing its work
        // from the caller's thread to the pool and sleeping until it is done (a wake-up per op,
        // hundreds per forward pass).
        rayon::scope(|_| self.embed_on_pool(inputs, max_input_tokens, deadline))
    }
}

impl Reranker for BertEmbedder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn rerank(
        &self,
        query: &str,
        documents: &[&str],
        max_input_tokens: usize,
        deadline: Option<std::time::Instant>,
    ) -> Result<RerankOutput, EngineError> {
        // On a compute-pool worker, as `embed`.
        rayon::scope(|_| self.rerank_on_pool(query, documents, max_input_tokens, deadline))
    }
}

impl BertEmbedder {
    fn rerank_on_pool(
        &self,
        query: &str,
        documents: &[&str],
        max_input_tokens: usize,
        deadline: Option<std::time::Instant>,
    ) -> Result<RerankOutput, EngineError> {
        let head = self.head.as_ref().ok_or_else(|| {
            EngineError::InvalidModel("this model has no classifier head: not a reranker".into())
        })?;
        let encs = self.tokenize_pairs(query, documents, max_input_tokens)?;
        let logits = self.in_batches(&encs, deadline, |batch| self.score_batch(head, batch))?;
        let scores = logits
            .iter()
            .map(|&l| match self.cfg.activation {
                Activation::Sigmoid => 1.0 / (1.0 + (-l).exp()),
                Activation::Identity => l,
            })
            .collect();
        Ok(RerankOutput {
            scores,
            logits,
            token_counts: encs.iter().map(|e| e.len()).collect(),
        })
    }

    /// Runs `pass` over the encodings in batches of [`MAX_BATCH`], longest first, giving up
    /// with [`EngineError::DeadlineReached`] rather than start a pass that would end past
    /// `deadline`; returns the outputs in the encodings' order.
    fn in_batches<T: Default + Clone>(
        &self,
        encs: &[Encoding],
        deadline: Option<std::time::Instant>,
        mut pass: impl FnMut(&[&Encoding]) -> Result<Vec<T>, EngineError>,
    ) -> Result<Vec<T>, EngineError> {
        // Longest first: the deadline estimate below (per token so far) then errs on the safe side.
        let mut order: Vec<usize> = (0..encs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encs[i].len()));
        let mut outputs = vec![T::default(); encs.len()];
        let t0 = std::time::Instant::now();
        let mut tokens_done = 0usize;
        for chunk in order.chunks(MAX_BATCH) {
            let batch: Vec<&Encoding> = chunk.iter().map(|&i| &encs[i]).collect();
            // Batches go longest first, so the rate so far over-estimates what is left.
            let tokens: usize = batch.iter().map(|e| e.len()).sum();
            if let Some(d) = deadline.filter(|_| tokens_done > 0) {
                let per_token = t0.elapsed() / tokens_done as u32;
                if std::time::Instant::now() + per_token * tokens as u32 >= d {
                    return Err(EngineError::DeadlineReached { tokens_done });
                }
            }
            tokens_done += tokens;
            let out = pass(&batch)?;
            for (&i, v) in chunk.iter().zip(out) {
                outputs[i] = v;
            }
        }
        Ok(outputs)
    }

    fn embed_on_pool(
        &self,
        inputs: &[&str],
        max_input_tokens: usize,
        deadline: Option<std::time::Instant>,
    ) -> Result<EmbedOutput, EngineError> {
        let (encs, _) = self.tokenize_bounded(inputs, max_input_tokens)?;
        let embeddings = self.in_batches(&encs, deadline, |batch| self.forward_batch(batch))?;
        Ok(EmbedOutput {
            embeddings,
            token_counts: encs.iter().map(|e| e.len()).collect(),
        })
    }
}

/// The HF tokenizer stored in the GGUF (what `lambda-inference convert` writes), or, in a file
/// written by llama.cpp's converter, the one rebuilt from its `tokenizer.ggml.*` arrays
/// ([`ggml_tokenizer::encoder`]). The file's own truncation/padding is removed: all-MiniLM's
/// tokenizer.json pads to a fixed 128 and truncates at 128, which sentence-transformers
/// overrides (truncation at max_seq_length, no padding); we truncate ourselves in
/// [`BertEmbedder::tokenize`] and pad per batch.
pub fn load_tokenizer(meta: &Meta) -> Result<Tokenizer, EngineError> {
    let mut tok = if meta.has(gguf::TOKENIZER_HF_JSON) {
        let json = meta.str(gguf::TOKENIZER_HF_JSON)?;
        Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", gguf::TOKENIZER_HF_JSON)))?
    } else if meta.has(gguf::TOKENIZER_MODEL) {
        ggml_tokenizer::encoder(meta)?
    } else {
        return Err(EngineError::InvalidModel(format!(
            "GGUF has no tokenizer: neither {} (`lambda-inference convert` writes it) nor {} \
             (llama.cpp's converter writes it)",
            gguf::TOKENIZER_HF_JSON,
            gguf::TOKENIZER_MODEL
        )));
    };
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    Ok(tok)
}

/// The name users know a GGML type by (q8_0, q4_k, f16).
pub fn dtype_name(d: GgmlDType) -> &'static str {
    match d {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}
