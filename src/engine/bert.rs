//! Quantized BERT sentence embedder (stub; being written).
use super::{EmbedOutput, Embedder, EngineError, ModelInfo};

pub struct BertEmbedder {
    info: ModelInfo,
}

impl BertEmbedder {
    pub fn load(
        _content: &candle_core::quantized::gguf_file::Content,
        _bytes: &[u8],
    ) -> Result<Self, EngineError> {
        Err(EngineError::InvalidModel("not yet implemented".into()))
    }
}

impl Embedder for BertEmbedder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn embed(&self, _inputs: &[&str], _max: usize) -> Result<EmbedOutput, EngineError> {
        Err(EngineError::InvalidModel("not yet implemented".into()))
    }
}
