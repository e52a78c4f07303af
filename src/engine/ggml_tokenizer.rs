//! The tokenizer of a llama.cpp GGUF (`tokenizer.ggml.*`) as a `tokenizers::Tokenizer`, plus
//! the byte pieces of every token for streaming detokenization.
//!
//! Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE: tokens, merges, token types), with
//! the pre-tokenizer regex llama.cpp picks for `tokenizer.ggml.pre`. Control and user-defined
//! tokens (`<|im_start|>`) become added tokens, so they are matched in prompt text the way
//! llama.cpp's `parse_special = true` does. The SentencePiece variant (`llama`) is refused with a
//! clear error. Must not do I/O.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf::{self, Meta};
use super::EngineError;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// Llama 3's pre-tokenizer regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's (and Qwen3's) pre-tokenizer regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`): Llama 3's
/// with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Everything the generator needs from the GGUF's tokenizer metadata.
pub struct GgmlVocab {
    pub tokenizer: Tokenizer,
    /// The bytes each token id stands for in generated text (empty for control tokens: they are
    /// never shown, as with `skip_special_tokens`).
    pub pieces: Vec<Vec<u8>>,
    /// Ids that end generation (EOS, EOT, and end-of-turn control tokens).
    pub stop_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    pub add_bos: bool,
    /// Token texts of BOS/EOS, for the chat template's `bos_token` / `eos_token`.
    pub bos_text: String,
    pub eos_text: String,
}

/// Builds the tokenizer from GGUF metadata.
pub fn load(meta: &Meta) -> Result<GgmlVocab, EngineError> {
    let model = meta.str(gguf::TOKENIZER_MODEL)?;
    if model != "gpt2" {
        return Err(EngineError::InvalidModel(format!(
            "tokenizer.ggml.model {model:?} is not supported: this build reads byte-level BPE \
             (\"gpt2\") vocabularies; SentencePiece (\"llama\") GGUFs are not supported yet"
        )));
    }
    let tokens = string_array(meta, gguf::TOKENIZER_TOKENS)?;
    let merges = string_array(meta, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match meta.0.get(gguf::TOKENIZER_TOKEN_TYPE) {
        Some(v) => v
            .to_vec()
            .map_err(|e| EngineError::InvalidModel(format!("token_type: {e}")))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| m.split_once(' '))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    let pre = meta.str("tokenizer.ggml.pre").unwrap_or("default");
    let (pre_tok, ignore_merges) = pre_tokenizer(pre)?;
    // llama.cpp adds BOS for the Llama 3 vocabularies unless the file says otherwise.
    let add_bos_default = matches!(pre, "llama3" | "llama-bpe" | "llama-v3");
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| EngineError::Tokenizer(format!("BPE from GGUF: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tok));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED)
        .map(|(t, &ty)| AddedToken::from(t.clone(), ty == TYPE_CONTROL))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| EngineError::Tokenizer(format!("special tokens: {e}")))?;

    let byte_of = unicode_to_byte();
    let pieces = tokens
        .iter()
        .zip(&types)
        .map(|(t, &ty)| match ty {
            TYPE_CONTROL => Vec::new(),
            TYPE_USER_DEFINED => t.as_bytes().to_vec(),
            _ => t
                .chars()
                .map(|c| byte_of.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| t.as_bytes().to_vec()),
        })
        .collect();
    let id = |key: &str| -> Option<u32> { meta.usize(key).ok().map(|v| v as u32) };
    let bos_id = id("tokenizer.ggml.bos_token_id");
    let eos_id = id("tokenizer.ggml.eos_token_id");
    let mut stop_ids: Vec<u32> = [
        eos_id,
        id("tokenizer.ggml.eot_token_id"),
        id("tokenizer.ggml.eom_token_id"),
    ]
    .into_iter()
    .flatten()
    .collect();
    // llama.cpp also ends generation on these control tokens when the GGUF does not name them.
    for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == TYPE_CONTROL
            && matches!(
                t.as_str(),
                "<|eot_id|>" | "<|im_end|>" | "<|end|>" | "<end_of_turn>" | "<|endoftext|>"
            )
        {
            stop_ids.push(i as u32);
        }
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let text = |id: Option<u32>| {
        id.and_then(|i| tokens.get(i as usize).cloned())
            .unwrap_or_default()
    };
    let add_bos = meta
        .bool("tokenizer.ggml.add_bos_token")
        .unwrap_or(add_bos_default);
    Ok(GgmlVocab {
        tokenizer,
        pieces,
        stop_ids,
        bos_id,
        add_bos,
        bos_text: text(bos_id),
        eos_text: text(eos_id),
    })
}

fn string_array(meta: &Meta, key: &str) -> Result<Vec<String>, EngineError> {
    let v = meta
        .0
        .get(key)
        .ok_or_else(|| EngineError::InvalidModel(format!("GGUF metadata has no {key}")))?;
    v.to_vec()
        .map_err(|e| EngineError::InvalidModel(format!("{key}: {e}")))?
        .iter()
        .map(|s| {
            s.to_string()
                .cloned()
                .map_err(|e| EngineError::InvalidModel(format!("{key}: {e}")))
        })
        .collect()
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, and whether BPE skips merges for
/// whole-word vocabulary hits (Llama 3).
fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool), EngineError> {
    let byte_level =
        |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    Ok(match pre {
        // GPT-2's regex (inside ByteLevel), digits kept in runs.
        "default" | "gpt2" | "gpt-2" | "olmo" | "jais" => (byte_level(true), false),
        // llama.cpp: "\p{N}" isolated first, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (
                PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    PreTokenizerWrapper::Digits(Digits::new(true)),
                    byte_level(true),
                ])),
                false,
            )
        }
        // llama.cpp: the split regex, then bytes; Llama 3 skips merges for whole-word hits.
        "llama3" | "llama-bpe" | "llama-v3" | "dbrx" | "smaug-bpe" => {
            (split_then_bytes(LLAMA3_REGEX, pre)?, true)
        }
        "qwen2" => (split_then_bytes(QWEN2_REGEX, pre)?, false),
        other => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre: using GPT-2's pre-tokenizer; prompt token ids may \
                 differ from llama.cpp's"
            );
            (byte_level(true), false)
        }
    })
}

/// A regex split (matches kept as pieces) followed by the byte-level mapping without GPT-2's regex.
fn split_then_bytes(regex: &str, pre: &str) -> Result<PreTokenizerWrapper, EngineError> {
    let split = Split::new(
        SplitPattern::Regex(regex.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| EngineError::Tokenizer(format!("{pre} pre-tokenizer: {e}")))?;
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ])))
}

/// GPT-2's byte-level alphabet, reversed: the char each byte is written as -> the byte.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = ('!' as u32..='~' as u32).collect();
    printable.extend('¡' as u32..='¬' as u32);
    printable.extend('®' as u32..='ÿ' as u32);
    let mut map = HashMap::with_capacity(256);
    let mut n = 0;
    for b in 0..=255u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            n += 1;
            255 + n
        };
        map.insert(
            char::from_u32(c).expect("byte-level chars are valid"),
            b as u8,
        );
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        let m = unicode_to_byte();
        assert_eq!(m.len(), 256);
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
        assert_eq!(m[&'a'], b'a');
        let mut bytes: Vec<u8> = m.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
    }
}
