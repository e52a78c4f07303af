//! Qwen2 / Qwen2.5 (`general.architecture = qwen2`): the llama decoder with biases on q, k and v
//! (`blk.N.attn_{q,k,v}.bias`, which the shared decoder adds whenever a file has them) and NEOX
//! RoPE: llama.cpp's converter does not permute Qwen's q/k rows, so the rotation pairs dimension
//! `i` with `i + rope_dim / 2`. Vocabulary: byte-level BPE with `tokenizer.ggml.pre = qwen2`.
//! Output head tied (0.5B-3B) or not (7B+): both load. Must not do I/O.

use super::llama::{RopeStyle, Variant};

/// What Qwen2 changes in the llama decoder.
pub const VARIANT: Variant = Variant {
    rope: RopeStyle::Halves,
    qk_norm: false,
    fused_qkv: false,
    fused_gate_up: false,
};
