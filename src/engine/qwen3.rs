//! Qwen3 dense models (`general.architecture = qwen3`): the llama decoder with an RMS norm on
//! every head of q and of k before RoPE (`blk.N.attn_{q,k}_norm`, `[head_dim]`), NEOX RoPE (as
//! Qwen2), no biases, and heads wider than `n_embd / n_head` (`qwen3.attention.key_length`: 0.6B
//! has 16 heads of 128 on a 1024-wide stream). Vocabulary as Qwen2. The mixture-of-experts
//! `qwen3moe` is another architecture and is not served. Must not do I/O.

use super::llama::{RopeStyle, Variant};

/// What Qwen3 changes in the llama decoder.
pub const VARIANT: Variant = Variant {
    rope: RopeStyle::Halves,
    qk_norm: true,
    fused_qkv: false,
    fused_gate_up: false,
};
