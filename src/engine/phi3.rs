//! Phi-3 and Phi-3.5 mini (`general.architecture = phi3`): the llama decoder with q, k and v fused
//! in one `blk.N.attn_qkv` and gate and up fused in one `blk.N.ffn_up` (gate rows first), both cut
//! into their parts at load; NEOX RoPE (llama.cpp's converter keeps Hugging Face's rotate-half
//! layout, as for Qwen2), RMSNorm, no biases, untied output head. Vocabulary: SentencePiece
//! (`tokenizer.ggml.model = llama`) with `<|user|>`, `<|assistant|>`, `<|end|>` as control tokens.
//! The 128k-context models' LongRoPE (`rope_factors_long/short`, Phi-3.5-mini's) is the shared
//! decoder's ([`super::llama`]). Must not do I/O.

use super::llama::{RopeStyle, Variant};

/// What Phi-3 changes in the llama decoder.
pub const VARIANT: Variant = Variant {
    rope: RopeStyle::Halves,
    qk_norm: false,
    fused_qkv: true,
    fused_gate_up: true,
};
