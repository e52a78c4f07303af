//! The llama-family decoder (SmolLM2, Llama 2/3.x, Mistral-style GQA, and through a [`Variant`]
//! Qwen2, Qwen3 and Phi-3) from a GGUF as llama.cpp writes it: `token_embd`, `blk.N.{attn_norm,
//! attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}`, `output_norm`,
//! `output` (absent: tied to `token_embd`), hyper-parameters under `{arch}.*`. Optional pieces are
//! used when the file has them, as llama.cpp does: `attn_{q,k,v}.bias` (Qwen2), `rope_freqs` (the
//! per-pair RoPE divisors llama.cpp's converter writes for Llama 3.1+'s `llama3` rope scaling);
//! what a [`Variant`] requires is checked at load (`attn_{q,k}_norm` for Qwen3, the fused
//! `attn_qkv` and gate+up `ffn_up` for Phi-3, cut into their parts at load). LongRoPE
//! (`rope_factors_long/short` and an attention factor, Phi-3-*-128k and Phi-3.5) as llama.cpp
//! runs it: the short factors unless the request may run past the original context.
//!
//! The shape of candle-transformers' quantized_llama (Config from GGUF metadata, `load` +
//! `forward` per block, checkpoint names), but the forward pass runs on f32 slices with the
//! kernels of [`super::qmatmul`]: for a 135M model candle's per-op dispatch (~30 ops x 30 layers
//! per token) costs as much as the arithmetic, and candle has no SIMD Q4_1 kernel.
//!
//! Numerics follow llama.cpp where that is free, so that greedy decoding matches it: activations
//! quantized to 8 bits per 32 for the matmuls, rms-norm summed in f64, RoPE angles built by
//! repeated f32 multiplication, K and V rounded to f16 (llama.cpp's default f16 KV cache). Rounding
//! the query and the attention weights to f16 as well (llama.cpp's non-flash path) was measured
//! and moved our logits further from the reference, so they stay f32.
//!
//! The weights are immutable and shared; everything that changes during a request lives in a
//! [`State`] (the KV cache) that the caller owns, so concurrency is the caller's choice (the
//! generator keeps one `State` behind a mutex). Must not do I/O or know about requests.

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use std::sync::Mutex;

use super::chat::{ChatMessage, ChatTemplate};
use super::generate::{self, Detokenizer, GenerateOutput, GenerateParams, TokenModel};
use super::ggml_tokenizer::{self, GgmlVocab};
use super::gguf::{self, Meta};
use super::ops;
use super::qmatmul::{matmul_many, Format, QActs, QMatrix, SharedBytes};
use super::{EngineError, Generator, ModelInfo, ModelKind};

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)`: llama.cpp's "normal" RoPE. llama.cpp's converter permutes
    /// the q/k rows of Llama checkpoints so that this matches Hugging Face's rotate-half.
    Adjacent,
    /// Halves `(i, i + rope_dim / 2)`: llama.cpp's NEOX RoPE, Hugging Face's rotate-half on
    /// unpermuted weights (Qwen2, Qwen3).
    Halves,
}

/// What a member of the llama family changes in the shared decoder. One per architecture file
/// (`llama.rs`'s [`VARIANT`], `qwen2.rs`, `qwen3.rs`, `phi3.rs`), named in `engine::DECODERS`.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub rope: RopeStyle,
    /// Per-head RMS norms of q and k before RoPE (`blk.N.attn_{q,k}_norm`, Qwen3): required.
    pub qk_norm: bool,
    /// q, k and v stored as one `blk.N.attn_qkv` (`[q_dim + 2 * kv_dim, n_embd]`, rows of q then k
    /// then v; Phi-3): required. Its rows are cut into the three matrices at load, in place, so the
    /// forward pass is the unfused one.
    pub fused_qkv: bool,
    /// Gate and up stored as one `blk.N.ffn_up` (`[2 * n_ff, n_embd]`) and no `ffn_gate` (Phi-3):
    /// required. The first `n_ff` rows are the gate (llama.cpp's SwiGLU on the fused output takes
    /// SiLU of the first half, as Phi-3's `gate_up_proj.chunk(2)` does); cut at load like q, k, v.
    pub fused_gate_up: bool,
}

/// Llama, Llama 2/3.x, SmolLM2, Mistral: adjacent-pair RoPE, no QK-norm, separate projections.
pub const VARIANT: Variant = Variant {
    rope: RopeStyle::Adjacent,
    qk_norm: false,
    fused_qkv: false,
    fused_gate_up: false,
};

/// Hyper-parameters, from `{arch}.*` GGUF keys.
#[derive(Debug, Clone)]
pub struct Config {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Width of one head: `{arch}.attention.key_length`, else `n_embd / n_head` (Qwen3's heads
    /// are wider than that: q is `n_head * head_dim` wide, not `n_embd`).
    pub head_dim: usize,
    pub n_ff: usize,
    pub rope_dim: usize,
    pub rope_base: f32,
    /// `1 / {arch}.rope.scaling.factor` for linear RoPE scaling, else 1.
    pub rope_freq_scale: f32,
    /// `{arch}.rope.scaling.attn_factor` (LongRoPE's `sqrt(1 + ln(s) / ln(original))`), else 1:
    /// multiplies RoPE's cos and sin, as ggml's `rope_yarn` does with its `mscale`.
    pub rope_attn_factor: f32,
    /// `{arch}.rope.scaling.original_context_length`, else the context length: a request that
    /// may fill more positions than this runs LongRoPE's long factors.
    pub rope_original_context: usize,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl Config {
    pub fn from_gguf(meta: &Meta, arch: &str) -> Result<Self, EngineError> {
        let key = |k: &str| format!("{arch}.{k}");
        let n_embd = meta.usize(&key("embedding_length"))?;
        let n_head = meta.usize(&key("attention.head_count"))?;
        let n_head_kv = if meta.has(&key("attention.head_count_kv")) {
            meta.usize(&key("attention.head_count_kv"))?
        } else {
            n_head
        };
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(EngineError::InvalidModel(format!(
                "{arch}: {n_head} heads / {n_head_kv} kv heads does not divide"
            )));
        }
        let head_dim = if meta.has(&key("attention.key_length")) {
            meta.usize(&key("attention.key_length"))?
        } else if n_embd % n_head == 0 {
            n_embd / n_head
        } else {
            0
        };
        let value_dim = if meta.has(&key("attention.value_length")) {
            meta.usize(&key("attention.value_length"))?
        } else {
            head_dim
        };
        if head_dim == 0 || head_dim % 2 != 0 || value_dim != head_dim {
            return Err(EngineError::InvalidModel(format!(
                "{arch}: heads of {head_dim} (keys) / {value_dim} (values) wide on a {n_embd}-wide \
                 model with {n_head} heads: this build needs equal, even key and value widths"
            )));
        }
        // llama.cpp's `rope.scaling.type`: none and linear are a factor on every angle; Llama
        // 3.1+'s scaling is not a type but the `rope_freqs` tensor, LongRoPE's the
        // `rope_factors_*` tensors (read at load). llama.cpp applies `rope.scaling.factor` to
        // any type but none, so does this.
        let rope_freq_scale = match meta.str(&key("rope.scaling.type")).unwrap_or("none") {
            "none" => 1.0,
            "linear" | "longrope" => match meta.f32(&key("rope.scaling.factor")) {
                Ok(f) if f > 0.0 => 1.0 / f,
                _ => 1.0,
            },
            other => {
                return Err(EngineError::InvalidModel(format!(
                    "{arch}: RoPE scaling {other:?} is not supported (supported: none, linear, \
                     longrope, and llama3's rope_freqs)"
                )))
            }
        };
        let context_length = if meta.has(&key("context_length")) {
            meta.usize(&key("context_length"))?
        } else {
            2048
        };
        let rope_dim = if meta.has(&key("rope.dimension_count")) {
            meta.usize(&key("rope.dimension_count"))?
        } else {
            head_dim
        };
        Ok(Self {
            n_layer: meta.usize(&key("block_count"))?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: meta.usize(&key("feed_forward_length"))?,
            rope_dim: rope_dim.min(head_dim),
            rope_freq_scale,
            rope_attn_factor: match meta.f32(&key("rope.scaling.attn_factor")) {
                Ok(f) if f > 0.0 => f,
                _ => 1.0,
            },
            rope_original_context: match meta.usize(&key("rope.scaling.original_context_length")) {
                Ok(n) if n > 0 => n,
                _ => context_length,
            },
            rope_base: if meta.has(&key("rope.freq_base")) {
                meta.f32(&key("rope.freq_base"))?
            } else {
                10_000.0
            },
            rms_eps: if meta.has(&key("attention.layer_norm_rms_epsilon")) {
                meta.f32(&key("attention.layer_norm_rms_epsilon"))?
            } else {
                1e-5
            },
            context_length,
            vocab_size: 0, // from the embedding matrix below
        })
    }

    fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Width of q and of the attention output: `n_head * head_dim`.
    fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
}

/// RoPE's per-pair divisors: the ones every sequence uses, and LongRoPE's long ones.
type RopeFactors = (Option<Vec<f32>>, Option<Vec<f32>>);

/// Reads tensors from the GGUF: quantized matrices in place, small vectors as f32.
struct Tensors<'a> {
    content: &'a Content,
    bytes: &'a SharedBytes,
}

impl Tensors<'_> {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A `[n, k]` matrix. The block-quantized types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)
    /// are used as stored, borrowed from the file (no copy). Unquantized f32/f16/bf16 matrices are
    /// quantized to Q8_0 at load (a copy, logged). Anything else fails the load, naming the tensor,
    /// its type and the supported ones.
    fn matrix(&self, name: &str, n: usize, k: usize) -> Result<QMatrix, EngineError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| EngineError::InvalidModel(format!("GGUF has no tensor {name}")))?;
        if info.shape.dims() != [n, k] {
            return Err(EngineError::InvalidModel(format!(
                "{name}: shape {:?}, expected [{n}, {k}]",
                info.shape.dims()
            )));
        }
        let start = self.content.tensor_data_offset as usize + info.offset as usize;
        let bad = |e: String| EngineError::InvalidModel(format!("{name}: {e}"));
        let format = match info.ggml_dtype {
            GgmlDType::Q4_0 => Format::Q4_0,
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q5_0 => Format::Q5_0,
            GgmlDType::Q5_1 => Format::Q5_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q2K => Format::Q2K,
            GgmlDType::Q3K => Format::Q3K,
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q5K => Format::Q5K,
            GgmlDType::Q6K => Format::Q6K,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                tracing::info!(tensor = name, dtype = ?info.ggml_dtype, "quantizing to q8_0 at load (unquantized matrix)");
                let t = self.read(name)?.dequantize(&candle_core::Device::Cpu)?;
                let q = QTensor::quantize(&t, GgmlDType::Q8_0)?;
                let data = q.data()?.into_owned();
                let len = data.len();
                let owned: SharedBytes = std::sync::Arc::new(data);
                return QMatrix::new(Format::Q8_0, n, k, owned, 0..len).map_err(bad);
            }
            other => {
                return Err(bad(format!(
                    "tensor type {other:?} is not supported for matrices; supported: {}",
                    super::kquants::SUPPORTED
                )))
            }
        };
        let len = n * format.row_bytes(k);
        QMatrix::new(format, n, k, self.bytes.clone(), start..start + len).map_err(bad)
    }

    /// A `[sum(rows), k]` matrix cut into consecutive `[rows[i], k]` parts (a fused projection).
    fn matrices(&self, name: &str, rows: &[usize], k: usize) -> Result<Vec<QMatrix>, EngineError> {
        self.matrix(name, rows.iter().sum(), k)?
            .split_rows(rows)
            .map_err(|e| EngineError::InvalidModel(format!("{name}: {e}")))
    }

    fn read(&self, name: &str) -> Result<QTensor, EngineError> {
        let info = &self.content.tensor_infos[name];
        let mut cur = std::io::Cursor::new((**self.bytes).as_ref());
        Ok(info.read(
            &mut cur,
            self.content.tensor_data_offset,
            &candle_core::Device::Cpu,
        )?)
    }

    /// The per-pair RoPE divisors, as llama.cpp picks them: `rope_freqs` (Llama 3.1+) when the
    /// file has it; else LongRoPE's `(rope_factors_short, rope_factors_long)`, which come as a
    /// pair; else none.
    fn rope_factors(&self, n: usize) -> Result<RopeFactors, EngineError> {
        const LONG: &str = "rope_factors_long.weight";
        const SHORT: &str = "rope_factors_short.weight";
        if self.has("rope_freqs.weight") {
            return Ok((Some(self.vector("rope_freqs.weight", n)?), None));
        }
        match (self.has(SHORT), self.has(LONG)) {
            (true, true) => Ok((Some(self.vector(SHORT, n)?), Some(self.vector(LONG, n)?))),
            (false, false) => Ok((None, None)),
            (short, _) => Err(EngineError::InvalidModel(format!(
                "GGUF has {} but not {}: LongRoPE needs both",
                if short { SHORT } else { LONG },
                if short { LONG } else { SHORT }
            ))),
        }
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>, EngineError> {
        if !self.has(name) {
            return Err(EngineError::InvalidModel(format!(
                "GGUF has no tensor {name}"
            )));
        }
        let v = self
            .read(name)?
            .dequantize(&candle_core::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if v.len() != n {
            return Err(EngineError::InvalidModel(format!(
                "{name}: {} values, expected {n}",
                v.len()
            )));
        }
        Ok(v)
    }
}

/// One transformer block.
struct Block {
    attn_norm: Vec<f32>,
    attn_q: QMatrix,
    attn_k: QMatrix,
    attn_v: QMatrix,
    /// `attn_{q,k,v}.bias` when the file has them (Qwen2).
    qkv_bias: Option<[Vec<f32>; 3]>,
    /// `attn_{q,k}_norm` (`[head_dim]` each) when the variant has QK-norm (Qwen3).
    qk_norm: Option<[Vec<f32>; 2]>,
    attn_output: QMatrix,
    ffn_norm: Vec<f32>,
    ffn_gate: QMatrix,
    ffn_up: QMatrix,
    ffn_down: QMatrix,
}

impl Block {
    fn load(t: &Tensors, cfg: &Config, variant: &Variant, i: usize) -> Result<Self, EngineError> {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let bias = |s: &str| format!("blk.{i}.{s}.bias");
        let (d, qd, kv, ff) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.n_ff);
        let qkv_bias = if t.has(&bias("attn_q")) {
            Some([
                t.vector(&bias("attn_q"), qd)?,
                t.vector(&bias("attn_k"), kv)?,
                t.vector(&bias("attn_v"), kv)?,
            ])
        } else {
            None
        };
        let qk_norm = if variant.qk_norm {
            Some([
                t.vector(&n("attn_q_norm"), cfg.head_dim)?,
                t.vector(&n("attn_k_norm"), cfg.head_dim)?,
            ])
        } else {
            None
        };
        let (attn_q, attn_k, attn_v) = if variant.fused_qkv {
            let [q, k, v]: [QMatrix; 3] = t
                .matrices(&n("attn_qkv"), &[qd, kv, kv], d)?
                .try_into()
                .map_err(|_| EngineError::InvalidModel("attn_qkv: not three parts".into()))?;
            (q, k, v)
        } else {
            (
                t.matrix(&n("attn_q"), qd, d)?,
                t.matrix(&n("attn_k"), kv, d)?,
                t.matrix(&n("attn_v"), kv, d)?,
            )
        };
        let (ffn_gate, ffn_up) = if variant.fused_gate_up {
            let [gate, up]: [QMatrix; 2] = t
                .matrices(&n("ffn_up"), &[ff, ff], d)?
                .try_into()
                .map_err(|_| EngineError::InvalidModel("ffn_up: not two parts".into()))?;
            (gate, up)
        } else {
            (
                t.matrix(&n("ffn_gate"), ff, d)?,
                t.matrix(&n("ffn_up"), ff, d)?,
            )
        };
        Ok(Self {
            attn_norm: t.vector(&n("attn_norm"), d)?,
            attn_q,
            attn_k,
            attn_v,
            qkv_bias,
            qk_norm,
            attn_output: t.matrix(&n("attn_output"), d, qd)?,
            ffn_norm: t.vector(&n("ffn_norm"), d)?,
            ffn_gate,
            ffn_up,
            ffn_down: t.matrix(&n("ffn_down"), d, ff)?,
        })
    }
}

/// The weights of a llama model. Immutable; shared by every request.
pub struct LlamaModel {
    pub cfg: Config,
    token_embd: QMatrix,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    /// `output.weight`, or `token_embd` again when the checkpoint ties them (SmolLM2).
    output: QMatrix,
    /// RoPE `theta_scale = base^(-2 / rope_dim)`, llama.cpp's iteration factor.
    theta_scale: f32,
    /// `rope_freqs` (`[rope_dim / 2]`, Llama 3.1+) or LongRoPE's `rope_factors_short`: pair
    /// `i`'s angle is divided by `freq_factors[i]`; absent: all 1.
    freq_factors: Option<Vec<f32>>,
    /// LongRoPE's `rope_factors_long`, used instead of the short ones when the request may run
    /// past [`Config::rope_original_context`] ([`State::long_context`]).
    long_factors: Option<Vec<f32>>,
    variant: Variant,
}

/// Per-request mutable state: the KV cache. Reset between requests.
#[derive(Default)]
pub struct State {
    /// Per layer and kv head (`[layer * n_head_kv + head]`), `[pos, head_dim]` keys and values,
    /// in f16 as llama.cpp's cache holds them (half the memory and the bytes each decoded token
    /// reads of f32); one vector per head, so that attention streams contiguous rows.
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
    /// Positions filled.
    pub len: usize,
    /// Whether this sequence runs LongRoPE's long factors ([`LlamaModel::long_context`] of the
    /// positions the request may fill; the generation loop sets it when it starts a request).
    /// Fixed for a sequence: keys already cached were rotated with one set.
    pub long_context: bool,
    /// Values per position in each cache vector (the head width; 0 until the first forward
    /// pass).
    width: usize,
}

impl State {
    /// Forgets the cache, keeping at most 1,024 positions' worth of its allocation, so that one
    /// long request does not pin its memory for the environment's lifetime (tests/memory.rs
    /// checks what the longest prompt leaves behind).
    pub fn reset(&mut self) {
        const KEEP_POSITIONS: usize = 1024;
        let keep = KEEP_POSITIONS * self.width;
        for c in self.k.iter_mut().chain(self.v.iter_mut()) {
            c.clear();
            if c.capacity() > keep {
                c.shrink_to(keep);
            }
        }
        self.len = 0;
        self.long_context = false;
    }
}

impl LlamaModel {
    /// Loads from a parsed GGUF whose tensor data lives in `bytes` (borrowed in place).
    pub fn load(
        content: &Content,
        bytes: &SharedBytes,
        arch: &str,
        variant: Variant,
    ) -> Result<Self, EngineError> {
        let meta = Meta::of(content);
        let mut cfg = Config::from_gguf(&meta, arch)?;
        let t = Tensors { content, bytes };
        let embd_info = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| {
                EngineError::InvalidModel("GGUF has no tensor token_embd.weight".into())
            })?;
        cfg.vocab_size = embd_info.shape.dims()[0];
        let token_embd = t.matrix("token_embd.weight", cfg.vocab_size, cfg.n_embd)?;
        let output = if t.has("output.weight") {
            t.matrix("output.weight", cfg.vocab_size, cfg.n_embd)?
        } else {
            t.matrix("token_embd.weight", cfg.vocab_size, cfg.n_embd)?
        };
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::load(&t, &cfg, &variant, i))
            .collect::<Result<Vec<_>, _>>()?;
        let output_norm = t.vector("output_norm.weight", cfg.n_embd)?;
        let theta_scale = cfg.rope_base.powf(-2.0 / cfg.rope_dim as f32);
        let (freq_factors, long_factors) = t.rope_factors(cfg.rope_dim / 2)?;
        Ok(Self {
            cfg,
            token_embd,
            blocks,
            output_norm,
            output,
            theta_scale,
            freq_factors,
            long_factors,
            variant,
        })
    }

    /// Storage types of the block matrices, for `/health`: one name (`q4_1`), or llama.cpp's
    /// mix in order of first use (`q5_0+q8_0+q4_K+q6_K`).
    pub fn quantization(&self) -> String {
        let mut seen: Vec<&'static str> = Vec::new();
        for b in &self.blocks {
            for m in [
                &b.attn_q,
                &b.attn_k,
                &b.attn_v,
                &b.attn_output,
                &b.ffn_gate,
                &b.ffn_up,
                &b.ffn_down,
            ] {
                if !seen.contains(&m.format.name()) {
                    seen.push(m.format.name());
                }
            }
        }
        seen.join("+")
    }

    /// Runs `tokens` (positions `state.len..`) through the model as one batch, appends their
    /// keys and values to `state`, and returns the logits of the last token.
    ///
    /// The pass runs on a compute-pool thread ([`on_compute_pool`] moves it there from any other
    /// thread; the generator already calls it from one): its ~5 parallel ops per layer then fork
    /// from inside the pool, the forking thread working on its share while the others steal
    /// theirs, instead of each op parking the caller and waking it through a futex when done
    /// (13% of a decode profile of `bench generate`, which calls this directly, was that).
    pub fn forward(&self, state: &mut State, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        on_compute_pool(|| self.forward_in_pool(state, tokens))
    }

    fn forward_in_pool(&self, state: &mut State, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let cfg = &self.cfg;
        let (t, d, qd, kvd) = (tokens.len(), cfg.n_embd, cfg.q_dim(), cfg.kv_dim());
        if t == 0 {
            return Err(EngineError::InvalidModel("forward on no tokens".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(EngineError::Tokenizer(format!(
                "token id {bad} outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let nkv = cfg.n_head_kv;
        if state.k.len() != cfg.n_layer * nkv {
            state.k = vec![Vec::new(); cfg.n_layer * nkv];
            state.v = vec![Vec::new(); cfg.n_layer * nkv];
            state.len = 0;
        }
        state.width = cfg.head_dim;
        let pos0 = state.len;
        let mut x = vec![0f32; t * d];
        for (row, &id) in x.chunks_exact_mut(d).zip(tokens) {
            self.token_embd.row_f32(id as usize, row);
        }
        let (cos, sin) = self.rope_tables(pos0, t, state.long_context);
        let mut h = vec![0f32; t * d];
        let mut q = vec![0f32; t * qd];
        let mut k = vec![0f32; t * kvd];
        let mut v = vec![0f32; t * kvd];
        let mut att = vec![0f32; t * qd];
        let mut o = vec![0f32; t * d];
        let mut gate = vec![0f32; t * cfg.n_ff];
        let mut up = vec![0f32; t * cfg.n_ff];
        for (l, b) in self.blocks.iter().enumerate() {
            rms_norm(&x, &b.attn_norm, cfg.rms_eps, &mut h);
            let qkv = [&b.attn_q, &b.attn_k, &b.attn_v];
            let a = QActs::quantize_for(&h, d, &qkv);
            matmul_many(&qkv, &a, &mut [&mut q, &mut k, &mut v]);
            if let Some([bq, bk, bv]) = &b.qkv_bias {
                add_bias(&mut q, bq);
                add_bias(&mut k, bk);
                add_bias(&mut v, bv);
            }
            if let Some([nq, nk]) = &b.qk_norm {
                rms_norm_in_place(&mut q, nq, cfg.rms_eps);
                rms_norm_in_place(&mut k, nk, cfg.rms_eps);
            }
            let style = self.variant.rope;
            rope(&mut q, style, cfg.head_dim, cfg.rope_dim, &cos, &sin);
            rope(&mut k, style, cfg.head_dim, cfg.rope_dim, &cos, &sin);
            let hd = cfg.head_dim;
            let layer = l * nkv..(l + 1) * nkv;
            for (cache, new) in [
                (&mut state.k[layer.clone()], &k),
                (&mut state.v[layer.clone()], &v),
            ] {
                for (g, c) in cache.iter_mut().enumerate() {
                    for pos in new.chunks_exact(kvd) {
                        c.extend(pos[g * hd..(g + 1) * hd].iter().map(|&x| f16::from_f32(x)));
                    }
                }
            }
            attention(
                cfg,
                &q,
                &state.k[layer.clone()],
                &state.v[layer],
                pos0,
                &mut att,
            );
            let a = QActs::quantize_for(&att, qd, &[&b.attn_output]);
            matmul_many(&[&b.attn_output], &a, &mut [&mut o]);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);

            rms_norm(&x, &b.ffn_norm, cfg.rms_eps, &mut h);
            let gate_up = [&b.ffn_gate, &b.ffn_up];
            let a = QActs::quantize_for(&h, d, &gate_up);
            matmul_many(&gate_up, &a, &mut [&mut gate, &mut up]);
            gate.iter_mut()
                .zip(&up)
                .for_each(|(g, u)| *g = silu(*g) * u);
            let a = QActs::quantize_for(&gate, cfg.n_ff, &[&b.ffn_down]);
            matmul_many(&[&b.ffn_down], &a, &mut [&mut o]);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        }
        state.len += t;
        // Only the last position's logits are needed (prefill and decode alike).
        let last = &x[(t - 1) * d..];
        let mut hn = vec![0f32; d];
        rms_norm(last, &self.output_norm, cfg.rms_eps, &mut hn);
        let mut logits = vec![0f32; cfg.vocab_size];
        matmul_many(
            &[&self.output],
            &QActs::quantize_for(&hn, d, &[&self.output]),
            &mut [&mut logits],
        );
        Ok(logits)
    }

    /// Whether a sequence of `reach` positions runs LongRoPE's long factors: llama.cpp's rule
    /// (`n_ctx > n_ctx_orig`) with the context being what the request may fill.
    pub fn long_context(&self, reach: usize) -> bool {
        self.long_factors.is_some() && reach > self.cfg.rope_original_context
    }

    /// `cos`/`sin` `[t, rope_dim / 2]` for positions `pos0..pos0 + t`, computed as llama.cpp does
    /// (`theta = p; theta *= theta_scale` per pair, in f32; the angle used is
    /// `freq_scale * theta / freq_factor[i]`, and both are multiplied by the attention factor:
    /// ggml's `rope_yarn` without its YaRN part). `long` picks LongRoPE's long factors.
    fn rope_tables(&self, pos0: usize, t: usize, long: bool) -> (Vec<f32>, Vec<f32>) {
        let half = self.cfg.rope_dim / 2;
        let (scale, mscale) = (self.cfg.rope_freq_scale, self.cfg.rope_attn_factor);
        let factors = match (long, &self.long_factors) {
            (true, Some(f)) => Some(f),
            _ => self.freq_factors.as_ref(),
        };
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in pos0..pos0 + t {
            let mut theta = p as f32;
            for i in 0..half {
                let ff = factors.map_or(1.0, |f| f[i]);
                let angle = scale * (theta / ff);
                cos.push(angle.cos() * mscale);
                sin.push(angle.sin() * mscale);
                theta *= self.theta_scale;
            }
        }
        (cos, sin)
    }
}

/// A llama model served as a [`Generator`]: weights, tokenizer, chat template and one KV cache.
///
/// Concurrency: the weights are shared read-only; the KV cache ([`State`]) sits behind a
/// `Mutex`, so concurrent `generate` calls run one after the other (a Lambda execution
/// environment serves one request at a time anyway; `serve` may receive several). The state is
/// reset at the start of every request, so nothing of one request leaks into the next.
pub struct LlamaGenerator {
    info: ModelInfo,
    model: LlamaModel,
    vocab: GgmlVocab,
    template: Option<ChatTemplate>,
    state: Mutex<State>,
    /// The most text bytes one token can stand for (see [`Generator::max_token_bytes`]).
    max_token_bytes: usize,
}

impl LlamaGenerator {
    /// Loads any architecture of the llama family ([`super::decoder_variant`]), as
    /// `general.architecture` names it.
    pub fn load(content: &Content, bytes: &SharedBytes) -> Result<Self, EngineError> {
        let arch = Meta::of(content).str(gguf::ARCHITECTURE)?.to_owned();
        let variant = super::decoder_variant(&arch).ok_or_else(|| super::unsupported(&arch))?;
        Self::load_as(content, bytes, variant)
    }

    /// Loads with the given variant of the decoder, whatever `general.architecture` says.
    pub fn load_as(
        content: &Content,
        bytes: &SharedBytes,
        variant: Variant,
    ) -> Result<Self, EngineError> {
        let meta = Meta::of(content);
        let arch = meta.str(gguf::ARCHITECTURE)?.to_owned();
        // The tokenizer (a 49k-entry BPE) and the weights are independent: both cores.
        let t0 = std::time::Instant::now();
        let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        let (vocab, model) = rayon::join(
            || {
                let r = ggml_tokenizer::load(&meta);
                tracing::debug!(tokenizer_ms = ms(t0), "llama tokenizer built");
                r
            },
            || {
                let r = LlamaModel::load(content, bytes, &arch, variant);
                tracing::debug!(weights_ms = ms(t0), "llama weights mapped");
                r
            },
        );
        let (vocab, model) = (vocab?, model?);
        let template = match meta.str("tokenizer.chat_template") {
            Ok(src) => Some(ChatTemplate::new(src, &vocab.bos_text, &vocab.eos_text)?),
            Err(_) => None,
        };
        // A token's piece is exactly the bytes it stands for; special and user-defined tokens
        // (whose pieces may be empty) match their added-token text. No clone of the 49k-entry
        // vocabulary on the cold-start path.
        let max_token_bytes = vocab
            .tokenizer
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.len())
            .chain(vocab.pieces.iter().map(Vec::len))
            .max()
            .unwrap_or(1)
            .max(1);
        let info = ModelInfo {
            name: meta.str(gguf::NAME).unwrap_or(&arch).to_owned(),
            details: super::ModelDetails::of(content, &arch, "none"),
            architecture: arch,
            kind: ModelKind::Generator,
            quantization: model.quantization(),
            dimensions: model.cfg.n_embd,
            max_seq_len: model.cfg.context_length,
        };
        Ok(Self {
            info,
            model,
            vocab,
            template,
            state: Mutex::new(State::default()),
            max_token_bytes,
        })
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// Prefill + decode with the KV cache of this generator (for benches and tests that need
    /// logits rather than text).
    pub fn with_state<R: Send>(&self, f: impl FnOnce(&LlamaModel, &mut State) -> R + Send) -> R {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st: &mut State = &mut st;
        on_compute_pool(|| f(&self.model, st))
    }
}

/// The model plus the state it runs with, as the generation loop's [`TokenModel`].
struct Session<'a> {
    model: &'a LlamaModel,
    state: &'a mut State,
}

impl TokenModel for Session<'_> {
    fn reset(&mut self, reach: usize) {
        self.state.reset();
        self.state.long_context = self.model.long_context(reach);
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        self.model.forward(self.state, tokens)
    }
}

impl Generator for LlamaGenerator {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let text = self
            .template
            .as_ref()
            .ok_or(EngineError::NoChatTemplate)?
            .render(messages, true)?;
        // Llama 3's template starts with `{{ bos_token }}` and its vocabulary adds BOS too:
        // llama.cpp's chat code (common/chat.cpp) strips the rendered one so that the prompt
        // holds a single BOS; so do we.
        let bos = &self.vocab.bos_text;
        match text.strip_prefix(bos.as_str()) {
            Some(rest) if self.vocab.add_bos && !bos.is_empty() => Ok(rest.to_owned()),
            _ => Ok(text),
        }
    }

    fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .vocab
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let (true, Some(bos)) = (self.vocab.add_bos, self.vocab.bos_id) {
            ids.push(bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<GenerateOutput, EngineError> {
        // A panic in an earlier request poisons the lock; the state is reset below anyway.
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut session = Session {
            model: &self.model,
            state: &mut guard,
        };
        let detok = Detokenizer {
            pieces: &self.vocab.pieces,
            stop_ids: &self.vocab.stop_ids,
        };
        let out =
            on_compute_pool(|| generate::generate(&mut session, &detok, prompt, params, on_text));
        // The cache is not reused by the next request: shrink it now rather than when that
        // request starts, so that a long prompt's cache is not resident in between.
        guard.reset();
        out
    }
}

/// Runs `f` on a compute-pool (rayon) worker and waits for it. From any other thread, every
/// parallel op inside a forward pass (~150 per token) would be handed to the pool and the caller
/// put to sleep and woken again: a third thread fighting two workers for two cores. From a
/// worker, the ops split in place and the other worker steals half.
fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn add_bias(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(x, b)| *x += b);
    }
}

/// [`rms_norm`] of every `w.len()`-wide piece of `x` in place (QK-norm: one piece per head).
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for xr in x.chunks_exact_mut(d) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = 1.0 / ((ss / d as f64) as f32 + eps).sqrt();
        xr.iter_mut().zip(w).for_each(|(v, &g)| *v = *v * scale * g);
    }
}

/// Row-wise `x / sqrt(mean(x^2) + eps) * w` (sum of squares in f64, as llama.cpp).
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = 1.0 / ((ss / d as f64) as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// RoPE on the first `rope_dim` dimensions of every head of every row of `x`
/// (`[t, heads * head_dim]`), pairing them as `style` says.
fn rope(
    x: &mut [f32],
    style: RopeStyle,
    head_dim: usize,
    rope_dim: usize,
    cos: &[f32],
    sin: &[f32],
) {
    let half = rope_dim / 2;
    let t = cos.len() / half.max(1);
    let row_len = x.len() / t;
    for (r, row) in x.chunks_exact_mut(row_len).enumerate() {
        let (c, s) = (
            &cos[r * half..(r + 1) * half],
            &sin[r * half..(r + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (ia, ib) = match style {
                    RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                    RopeStyle::Halves => (i, i + half),
                };
                let (a, b) = (head[ia], head[ib]);
                head[ia] = a * c[i] - b * s[i];
                head[ib] = a * s[i] + b * c[i];
            }
        }
    }
}

/// Positions per attention task in a prefill: each block of keys and values, widened to f32
/// once, serves this many positions of every head of its group from L1, instead of each query
/// streaming the whole cache.
const Q_TILE: usize = 16;
/// Keys per block: 64 rows of a 64-wide head are 16 KB of f32 keys and 16 KB of values.
const K_BLOCK: usize = 64;
/// Attention tasks wanted per call: when the kv heads and tiles of positions make fewer (a
/// decode step makes one per kv head), each task takes a range of the keys instead, and the
/// ranges' softmax states are merged.
const MIN_TASKS: usize = 16;
/// Keys per range at least: below that, a range's fixed costs (its buffers, its share of the
/// merge) outweigh what a second thread gains on a short context.
const MIN_RANGE: usize = 256;

/// `Σ a·b` in 8 fused lanes, the lanes then summed pairwise; the scalar form of [`dot4`]'s sums.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(0f32, |t, (x, y)| x.mul_add(*y, t));
    let mut acc = [0f32; 8];
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    lane_sum(acc) + tail
}

/// The eight lanes summed as [`dot4`]'s horizontal adds do: ((0+1)+(2+3)) + ((4+5)+(6+7)).
#[inline(always)]
fn lane_sum(l: [f32; 8]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// [`dot`] of `a` with four vectors at once, the same sums bit for bit: the four chains of
/// fused multiply-adds overlap, and the lanes are summed by three horizontal adds for all four.
fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    assert!(b.iter().all(|b| b.len() == a.len()));
    let n = a.len() / 8 * 8;
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    // SAFETY: AVX and FMA are enabled for the whole build (target_feature); every load reads 8
    // values below `n`, within all five slices (same length, asserted).
    let mut out = unsafe {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_setzero_ps(); 4];
        for c in (0..n).step_by(8) {
            let x = _mm256_loadu_ps(a.as_ptr().add(c));
            for (acc, b) in acc.iter_mut().zip(&b) {
                *acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(b.as_ptr().add(c)), *acc);
            }
        }
        // hadd(x, y) = [x0+x1, x2+x3, y0+y1, y2+y3 | x4+x5, x6+x7, y4+y5, y6+y7]; twice, then
        // the halves: ((0+1)+(2+3)) + ((4+5)+(6+7)) of each accumulator, in `lane_sum`'s order.
        let h = _mm256_hadd_ps(
            _mm256_hadd_ps(acc[0], acc[1]),
            _mm256_hadd_ps(acc[2], acc[3]),
        );
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), s);
        out
    };
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    let mut out = b.map(|b| {
        let mut l = [0f32; 8];
        for c in (0..n).step_by(8) {
            for i in 0..8 {
                l[i] = a[c + i].mul_add(b[c + i], l[i]);
            }
        }
        lane_sum(l)
    });
    for (o, b) in out.iter_mut().zip(&b) {
        *o += a[n..]
            .iter()
            .zip(&b[n..])
            .fold(0f32, |t, (x, y)| x.mul_add(*y, t));
    }
    out
}

/// A block of cache rows (f16) widened into `dst` (f32, exact): once per block, whatever the
/// number of queries reading it.
fn widen(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    let n = src.len() / 8 * 8;
    #[cfg(all(target_arch = "x86_64", target_feature = "f16c"))]
    // SAFETY: F16C is enabled for the whole build; each step reads and writes 8 values below
    // `n`, within both slices (same length, asserted).
    unsafe {
        use std::arch::x86_64::*;
        for c in (0..n).step_by(8) {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(c).cast()));
            _mm256_storeu_ps(dst.as_mut_ptr().add(c), x);
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "f16c")))]
    dst[..n]
        .iter_mut()
        .zip(&src[..n])
        .for_each(|(d, s)| *d = s.to_f32());
    dst[n..]
        .iter_mut()
        .zip(&src[n..])
        .for_each(|(d, s)| *d = s.to_f32());
}

/// `r = fma(s_j * inv, v_j, r)` over the rows `v_j` of `v` (`[scores.len(), r.len()]`) in
/// order, for every element (bit for bit that plain loop), with `r` held in registers up to 64
/// values at a time instead of loaded and stored once per row.
fn weighted_rows(r: &mut [f32], scores: &[f32], inv: f32, v: &[f32]) {
    let hd = r.len();
    assert!(v.len() >= scores.len() * hd);
    // Where the vector loops stopped; the rest by the plain loop below.
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    // SAFETY: AVX and FMA are enabled for the whole build; loads and stores stay within `r`
    // (e + 8 * W <= hd) and within row j of `v` (asserted above).
    let e = unsafe {
        use std::arch::x86_64::*;
        #[inline(always)]
        unsafe fn run<const W: usize>(
            r: &mut [f32],
            scores: &[f32],
            inv: f32,
            v: &[f32],
            mut e: usize,
        ) -> usize {
            let hd = r.len();
            while e + 8 * W <= hd {
                let mut acc = [0; W].map(|_| _mm256_setzero_ps());
                for (o, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_loadu_ps(r.as_ptr().add(e + 8 * o));
                }
                for (j, &s) in scores.iter().enumerate() {
                    let p = _mm256_set1_ps(s * inv);
                    let vj = v.as_ptr().add(j * hd + e);
                    for (o, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj.add(8 * o)), *acc);
                    }
                }
                for (o, acc) in acc.into_iter().enumerate() {
                    _mm256_storeu_ps(r.as_mut_ptr().add(e + 8 * o), acc);
                }
                e += 8 * W;
            }
            e
        }
        let e = run::<8>(r, scores, inv, v, 0);
        run::<1>(r, scores, inv, v, e)
    };
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    let e = 0;
    let r = &mut r[e..];
    for (j, &s) in scores.iter().enumerate() {
        let p = s * inv;
        let vj = &v[j * hd + e..(j + 1) * hd];
        r.iter_mut()
            .zip(vj)
            .for_each(|(r, v)| *r = p.mul_add(*v, *r));
    }
}

/// One attention task's result for each of its queries (`[position, head of the group]`): the
/// online softmax state over its range of keys (as FlashAttention keeps it): the largest score,
/// `Σ e^(s - max)` and `Σ e^(s - max) · v`.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// Which queries and keys one task covers: kv head `g`, positions `i0..i0 + m` of the batch,
/// keys `j0..j1` (each position sees at most its own and earlier ones).
#[derive(Clone, Copy)]
struct AttnTask {
    g: usize,
    i0: usize,
    m: usize,
    j0: usize,
    j1: usize,
}

#[inline(never)] // a profile line of its own
/// Causal grouped-query attention of `t` new queries (positions `pos0..pos0 + t`) over the cache
/// (`pos0 + t` positions, `[pos, head_dim]` f16 per kv head). One task per kv head and tile of [`Q_TILE`]
/// positions (split further into key ranges when that makes fewer than [`MIN_TASKS`]);
/// keys and values walked in blocks of [`K_BLOCK`], each widened to f32 once for every query of
/// the task. Scores by [`dot4`], softmax online per block with the vectorized exp
/// (`ops::exp_nonpositive`, within 1e-6 of libm), values weighted by fused multiply-adds; the
/// key ranges' states merged at the end. `out` is `[t, n_head * head_dim]`.
fn attention(
    cfg: &Config,
    q: &[f32],
    kc: &[Vec<f16>],
    vc: &[Vec<f16>],
    pos0: usize,
    out: &mut [f32],
) {
    let (hd, nh) = (cfg.head_dim, cfg.n_head);
    let (d, t, group) = (nh * hd, q.len() / (nh * hd), nh / cfg.n_head_kv);
    let tiles = t.div_ceil(Q_TILE);
    // Too few (kv head, tile) tasks to keep the pool busy (a decode step has one per kv head):
    // split each tile's keys into ranges of whole blocks. Depends on the shapes only, never on
    // the thread count: the same request gives the same numbers on any machine.
    let ranges = MIN_TASKS.div_ceil(cfg.n_head_kv * tiles);
    let split = (pos0 + t)
        .div_ceil(ranges)
        .next_multiple_of(K_BLOCK)
        .max(MIN_RANGE);
    let mut tasks = Vec::new();
    for g in 0..cfg.n_head_kv {
        for i0 in (0..t).step_by(Q_TILE) {
            let m = Q_TILE.min(t - i0);
            let width = pos0 + i0 + m;
            let mut j0 = 0;
            while j0 < width {
                let j1 = j0.saturating_add(split).min(width);
                tasks.push(AttnTask { g, i0, m, j0, j1 });
                j0 = j1;
            }
        }
    }
    let parts: Vec<Partial> = tasks
        .par_iter()
        .map(|task| attend(cfg, q, kc, vc, pos0, task))
        .collect();
    // Merge the key ranges of each (kv head, tile): consecutive tasks.
    let mut first = 0;
    while first < tasks.len() {
        let AttnTask { g, i0, m, .. } = tasks[first];
        let last = first
            + tasks[first..]
                .iter()
                .take_while(|x| x.g == g && x.i0 == i0)
                .count();
        let ranges = &parts[first..last];
        for qi in 0..m * group {
            let (i, h) = (i0 + qi / group, g * group + qi % group);
            let max = ranges
                .iter()
                .fold(f32::NEG_INFINITY, |a, p| a.max(p.max[qi]));
            let o = &mut out[i * d + h * hd..i * d + (h + 1) * hd];
            o.fill(0.0);
            let mut sum = 0f32;
            for p in ranges.iter().filter(|p| p.sum[qi] > 0.0) {
                let f = ops::exp_nonpositive(p.max[qi] - max);
                sum += f * p.sum[qi];
                let acc = &p.acc[qi * hd..(qi + 1) * hd];
                o.iter_mut()
                    .zip(acc)
                    .for_each(|(o, a)| *o = f.mul_add(*a, *o));
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        }
        first = last;
    }
}

/// One [`AttnTask`]: the softmax state of each of its queries over its keys.
fn attend(
    cfg: &Config,
    q: &[f32],
    kc: &[Vec<f16>],
    vc: &[Vec<f16>],
    pos0: usize,
    task: &AttnTask,
) -> Partial {
    let (hd, nh) = (cfg.head_dim, cfg.n_head);
    let (d, group) = (nh * hd, nh / cfg.n_head_kv);
    let scale = 1.0 / (hd as f32).sqrt();
    let AttnTask { g, i0, m, j0, j1 } = *task;
    let nq = m * group;
    let mut p = Partial {
        max: vec![f32::NEG_INFINITY; nq],
        sum: vec![0f32; nq],
        acc: vec![0f32; nq * hd],
    };
    let mut kb = vec![0f32; K_BLOCK * hd];
    let mut vb = vec![0f32; K_BLOCK * hd];
    let mut s = [0f32; K_BLOCK];
    for jb in (j0..j1).step_by(K_BLOCK) {
        let nb = K_BLOCK.min(j1 - jb);
        widen(&kc[g][jb * hd..(jb + nb) * hd], &mut kb[..nb * hd]);
        widen(&vc[g][jb * hd..(jb + nb) * hd], &mut vb[..nb * hd]);
        for qi in 0..nq {
            let (i, h) = (i0 + qi / group, g * group + qi % group);
            // Keys this position sees in the block: up to its own.
            let n = (jb + nb).min(pos0 + i + 1).saturating_sub(jb);
            if n == 0 {
                continue;
            }
            let qh = &q[i * d + h * hd..i * d + (h + 1) * hd];
            let s = &mut s[..n];
            let mut quads = s.chunks_exact_mut(4);
            for (j, s4) in (&mut quads).enumerate() {
                let k = |x: usize| &kb[(4 * j + x) * hd..(4 * j + x + 1) * hd];
                for (s, d) in s4.iter_mut().zip(dot4(qh, [k(0), k(1), k(2), k(3)])) {
                    *s = d * scale;
                }
            }
            let done = n / 4 * 4;
            for (j, s) in quads.into_remainder().iter_mut().enumerate() {
                *s = dot(qh, &kb[(done + j) * hd..(done + j + 1) * hd]) * scale;
            }
            let block_max = s.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let acc = &mut p.acc[qi * hd..(qi + 1) * hd];
            if block_max > p.max[qi] {
                // A larger maximum: what was summed so far shrinks by e^(old - new).
                let f = ops::exp_nonpositive(p.max[qi] - block_max);
                p.sum[qi] *= f;
                acc.iter_mut().for_each(|a| *a *= f);
                p.max[qi] = block_max;
            }
            let max = p.max[qi];
            s.iter_mut()
                .for_each(|x| *x = ops::exp_nonpositive(*x - max));
            p.sum[qi] += ops::sum(s);
            weighted_rows(acc, s, 1.0, &vb);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::qmatmul::tests::rng;

    #[test]
    fn rope_rotates_pairs_and_keeps_norms() {
        let mut x: Vec<f32> = (0..8).map(|i| i as f32 + 1.0).collect();
        let n0: f32 = x.iter().map(|v| v * v).sum();
        // One row, head_dim 8, position with angles 1.0 (pair 0) and 0.5 (pair 1..).
        let cos = vec![1f32.cos(), 0.5f32.cos(), 0.0f32.cos(), 0.0f32.cos()];
        let sin = vec![1f32.sin(), 0.5f32.sin(), 0.0, 0.0];
        rope(&mut x, RopeStyle::Adjacent, 8, 8, &cos, &sin);
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        assert!((x[0] - (1.0 * 1f32.cos() - 2.0 * 1f32.sin())).abs() < 1e-6);
        assert_eq!(&x[4..], &[5.0, 6.0, 7.0, 8.0]);
    }

    /// A reset keeps at most 1,024 positions of cache whatever the kv width, and empties it.
    #[test]
    fn reset_keeps_at_most_1024_positions_of_cache() {
        for width in [8usize, 192] {
            let filled = vec![f16::from_f32(0.5); 5000 * width];
            let mut st = State {
                k: vec![filled.clone(); 2],
                v: vec![filled; 2],
                len: 5000,
                long_context: true,
                width,
            };
            st.reset();
            assert_eq!(st.len, 0);
            assert!(!st.long_context, "the next request picks its own factors");
            for c in st.k.iter().chain(&st.v) {
                assert!(c.is_empty());
                assert!(
                    c.capacity() <= 1024 * width,
                    "{} > {}",
                    c.capacity(),
                    1024 * width
                );
            }
        }
    }

    /// dot4 is four `dot`s, bit for bit, on lengths with and without a tail.
    #[test]
    fn dot4_is_four_dots() {
        let mut r = rng(0x2545_f491_4f6c_dd1d);
        for n in [1usize, 8, 13, 64, 67, 128] {
            let a: Vec<f32> = (0..n).map(|_| r()).collect();
            let b: Vec<Vec<f32>> = (0..4).map(|_| (0..n).map(|_| r()).collect()).collect();
            let got = dot4(&a, [&b[0], &b[1], &b[2], &b[3]]);
            for (g, b) in got.iter().zip(&b) {
                assert_eq!(g.to_bits(), dot(&a, b).to_bits(), "n {n}");
            }
        }
    }

    /// weighted_rows is the plain loop of fused multiply-adds, bit for bit, on widths with and
    /// without a tail (64 and 8 at a time in registers, then one by one).
    #[test]
    fn weighted_rows_is_the_plain_loop() {
        let mut r = rng(0x9e37_79b9_7f4a_7c15);
        for (hd, n) in [(64usize, 37usize), (72, 5), (7, 3), (128, 1), (136, 9)] {
            let v: Vec<f32> = (0..n * hd).map(|_| r()).collect();
            let scores: Vec<f32> = (0..n).map(|_| r().abs()).collect();
            let init: Vec<f32> = (0..hd).map(|_| r()).collect();
            let mut got = init.clone();
            weighted_rows(&mut got, &scores, 0.37, &v);
            let mut want = init;
            for (j, s) in scores.iter().enumerate() {
                let p = s * 0.37;
                for (e, w) in want.iter_mut().enumerate() {
                    *w = p.mul_add(v[j * hd + e], *w);
                }
            }
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "hd {hd}");
        }
    }

    /// Widening f16 to f32 is exact, tails included.
    #[test]
    fn widen_is_exact() {
        let mut r = rng(0x3c6e_f372_fe94_f82b);
        for n in [0usize, 7, 8, 64, 203] {
            let src: Vec<f16> = (0..n).map(|_| f16::from_f32(r())).collect();
            let mut dst = vec![0f32; n];
            widen(&src, &mut dst);
            assert!(dst.iter().zip(&src).all(|(d, s)| *d == s.to_f32()), "n {n}");
        }
    }

    #[test]
    fn attention_of_one_position_returns_its_value() {
        let cfg = Config {
            n_layer: 1,
            n_embd: 4,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 2,
            n_ff: 4,
            rope_dim: 2,
            rope_base: 10000.0,
            rope_freq_scale: 1.0,
            rope_attn_factor: 1.0,
            rope_original_context: 8,
            rms_eps: 1e-5,
            context_length: 8,
            vocab_size: 1,
        };
        let q = vec![0.3, -0.2, 1.0, 0.5];
        let (k, v) = (
            [0.7, 0.1].map(f16::from_f32),
            [0.25, -1.5].map(f16::from_f32),
        );
        let mut out = vec![0f32; 4];
        attention(&cfg, &q, &[k.to_vec()], &[v.to_vec()], 0, &mut out);
        // A single key gets all the weight: every head returns the (shared) value.
        assert_eq!(out, vec![0.25, -1.5, 0.25, -1.5]);
    }

    /// Softmax attention in f64 on the same (f16) cache, within 1e-5: prefills longer than a
    /// tile with and without a cached prefix, decode steps split into key ranges (one at a
    /// range's edge, one past several ranges), grouped heads, head widths with tails; and a
    /// prefill gives the same numbers as the same positions decoded one by one, to 1e-6.
    #[test]
    fn attention_is_softmax_attention() {
        let mut r = rng(0x6a09_e667_f3bc_c909);
        for (n_head, n_head_kv, head_dim, pos0, t) in [
            (4usize, 2usize, 64usize, 0usize, 37usize),
            (3, 1, 72, 70, 21),
            (2, 2, 7, 130, 1),
            (6, 3, 64, 200, 16),
            (9, 3, 64, 255, 1),
            (9, 3, 64, 700, 2),
        ] {
            let cfg = Config {
                n_layer: 1,
                n_embd: n_head * head_dim,
                n_head,
                n_head_kv,
                head_dim,
                n_ff: 4,
                rope_dim: head_dim,
                rope_base: 10000.0,
                rope_freq_scale: 1.0,
                rope_attn_factor: 1.0,
                rope_original_context: 1024,
                rms_eps: 1e-5,
                context_length: 1024,
                vocab_size: 1,
            };
            let (d, kvd, n) = (n_head * head_dim, n_head_kv * head_dim, pos0 + t);
            let q: Vec<f32> = (0..t * d).map(|_| 2.0 * r()).collect();
            let kc: Vec<f16> = (0..n * kvd).map(|_| f16::from_f32(2.0 * r())).collect();
            let vc: Vec<f16> = (0..n * kvd).map(|_| f16::from_f32(r())).collect();
            // The cache as the model keeps it: per kv head, the first `upto` positions.
            let heads = |c: &[f16], upto: usize| -> Vec<Vec<f16>> {
                (0..n_head_kv)
                    .map(|g| {
                        (0..upto)
                            .flat_map(|j| c[j * kvd + g * head_dim..][..head_dim].to_vec())
                            .collect()
                    })
                    .collect()
            };
            let mut got = vec![0f32; t * d];
            attention(&cfg, &q, &heads(&kc, n), &heads(&vc, n), pos0, &mut got);
            let label = format!("{n_head}/{n_head_kv} x {head_dim}, {pos0} + {t}");
            let scale = 1.0 / (head_dim as f64).sqrt();
            let at =
                |c: &[f16], j: usize, g: usize, e: usize| c[j * kvd + g * head_dim + e].to_f64();
            for i in 0..t {
                let seen = pos0 + i + 1;
                for h in 0..n_head {
                    let g = h / (n_head / n_head_kv);
                    let qh = &q[i * d + h * head_dim..][..head_dim];
                    let s: Vec<f64> = (0..seen)
                        .map(|j| {
                            let dot: f64 =
                                (0..head_dim).map(|e| qh[e] as f64 * at(&kc, j, g, e)).sum();
                            dot * scale
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let z: f64 = w.iter().sum();
                    for e in 0..head_dim {
                        let want: f64 = (0..seen).map(|j| w[j] / z * at(&vc, j, g, e)).sum();
                        let o = got[i * d + h * head_dim + e] as f64;
                        assert!(
                            (o - want).abs() < 1e-5,
                            "{label}, position {i}, head {h}: {o} vs {want}"
                        );
                    }
                }
                // The same position as a decode step over the cache up to it.
                let mut one = vec![0f32; d];
                attention(
                    &cfg,
                    &q[i * d..(i + 1) * d],
                    &heads(&kc, seen),
                    &heads(&vc, seen),
                    pos0 + i,
                    &mut one,
                );
                for (a, b) in one.iter().zip(&got[i * d..(i + 1) * d]) {
                    assert!(
                        (a - b).abs() < 1e-6,
                        "{label}, position {i}: decoded {a}, prefilled {b}"
                    );
                }
            }
        }
    }
}
