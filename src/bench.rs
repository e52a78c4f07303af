//! Bench commands (stub; being written).
