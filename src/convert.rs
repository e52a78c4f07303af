//! Hugging Face folder -> GGUF converter (stub; being written).
