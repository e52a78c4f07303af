//! The tokenizer of a llama.cpp GGUF (`tokenizer.ggml.*`) as a `tokenizers::Tokenizer`, plus
//! the byte pieces of every token for streaming detokenization.
//!
//! Supported `tokenizer.ggml.model`s:
//! - `gpt2`: byte-level BPE (tokens, merges, token types), with the pre-tokenizer regex llama.cpp
//!   picks for `tokenizer.ggml.pre`;
//! - `llama`: SentencePiece BPE (Llama 2, Mistral v0.1, Phi-3), llama.cpp's
//!   `llm_tokenizer_spm`: spaces written as `▁`, a leading `▁` on every stretch of text that starts
//!   the prompt or follows a special token (`tokenizer.ggml.add_space_prefix`, default true), pairs
//!   merged best `tokenizer.ggml.scores` first, characters outside the vocabulary spelled as
//!   `<0xXX>` byte tokens. It is expressed as a BPE whose merges are every split of a token into
//!   two tokens, ranked by the merged token's score (Hugging Face's LlamaTokenizerFast
//!   conversion). One difference is known: llama.cpp breaks a tie between equal scores by
//!   position, the BPE by rank; SentencePiece gives its pieces distinct scores, so only a token
//!   reachable by two different splits at once could tell them apart.
//!
//! Control, user-defined (and for SentencePiece, unknown) tokens (`<|im_start|>`, `<|end|>`)
//! become added tokens matched on the raw text, the way llama.cpp's `parse_special = true` does,
//! with llama.cpp's name-based rule for Phi-3 (whitespace after its special tokens is dropped).
//! Any other model (`bert`, `t5`, ...) is refused with an error naming the supported ones.
//!
//! Encoders ([`encoder`]): a BERT or XLM-RoBERTa GGUF written by llama.cpp's converter holds no
//! tokenizer.json, only these arrays (`bert`: WordPiece in llama.cpp's phantom-space form; `t5`:
//! SentencePiece Unigram). [`encoder`] rebuilds the Hugging Face tokenizer the model was
//! converted from, for Hugging Face's ids rather than llama.cpp's approximation of them. Must not
//! do I/O.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::models::unigram::Unigram;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::{BertNormalizer, NormalizerWrapper, Precompiled, Prepend, Replace};
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf::{self, Meta};
use super::EngineError;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_UNUSED: i32 = 5;
const TYPE_BYTE: i32 = 6;

/// SentencePiece's word-boundary mark: a space in the text.
const SPACE_MARK: char = '\u{2581}';

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
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(EngineError::InvalidModel(format!(
                "tokenizer.ggml.model {other:?} is not supported: this build reads byte-level BPE \
                 (\"gpt2\") and SentencePiece (\"llama\") vocabularies"
            )))
        }
    };
    let (tokens, types) = tokens_and_types(meta)?;
    let (mut tokenizer, add_bos_default) = if spm {
        (sentencepiece(meta, &tokens, &types)?, true)
    } else {
        byte_level_bpe(meta, &tokens)?
    };
    // llama.cpp matches these in prompt text before tokenizing the rest (`parse_special`); for
    // SentencePiece on the raw text, so that the text after one gets its leading `▁`, as llama.cpp
    // gives it.
    let phi3 = strips_after_specials(meta);
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| {
            ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED || (spm && ty == TYPE_UNKNOWN)
        })
        .map(|(t, &ty)| {
            let token = AddedToken::from(t.clone(), ty != TYPE_USER_DEFINED);
            let token = if spm { token.normalized(false) } else { token };
            token.rstrip(phi3 && !matches!(t.as_str(), "<unk>" | "<s>" | "<|endoftext|>"))
        })
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| EngineError::Tokenizer(format!("special tokens: {e}")))?;

    let pieces = if spm {
        tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| spm_piece(t, ty))
            .collect()
    } else {
        let byte_of = unicode_to_byte();
        tokens
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
            .collect()
    };
    let id = |key: &str| -> Option<u32> { meta.usize(key).ok().map(|v| v as u32) };
    let bos_id = id(gguf::TOKENIZER_BOS_ID);
    let eos_id = id(gguf::TOKENIZER_EOS_ID);
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

/// A byte-level BPE (`gpt2`) vocabulary, and whether llama.cpp adds BOS when the file does not say.
fn byte_level_bpe(meta: &Meta, tokens: &[String]) -> Result<(Tokenizer, bool), EngineError> {
    let merges = string_array(meta, "tokenizer.ggml.merges")?;
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
    Ok((tokenizer, add_bos_default))
}

/// A SentencePiece (`llama`) vocabulary as a BPE that gives llama.cpp's `llm_tokenizer_spm` ids.
///
/// llama.cpp merges, among all adjacent pairs of symbols whose concatenation is a token, the one
/// whose token has the highest score (leftmost on a tie), until none is left; characters that
/// are not tokens become their UTF-8 bytes' `<0xXX>` tokens. A BPE whose merges are all
/// `(left, right)` splits of every token, ranked by the merged token's score, performs the same
/// merges (its byte fallback covers the rest), and the normalizer writes the text as llama.cpp
/// hands it to the merging: spaces as `▁`, one `▁` in front when `add_space_prefix`. The
/// normalizer runs on each stretch of text between special tokens, as llama.cpp's prefix does.
fn sentencepiece(meta: &Meta, tokens: &[String], types: &[i32]) -> Result<Tokenizer, EngineError> {
    let scores: Vec<f32> = match meta.0.get(gguf::TOKENIZER_SCORES) {
        Some(v) => v
            .to_vec()
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", gguf::TOKENIZER_SCORES)))?
            .iter()
            .map(|s| s.to_f32().unwrap_or(0.0))
            .collect(),
        // llama.cpp: a vocabulary without scores merges as if they were all 0.
        None => vec![0.0; tokens.len()],
    };
    if scores.len() != tokens.len() {
        return Err(EngineError::InvalidModel(format!(
            "{} {} for {} tokens",
            scores.len(),
            gguf::TOKENIZER_SCORES,
            tokens.len()
        )));
    }
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = spm_merges(tokens, &scores);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    // Without byte tokens for a character, llama.cpp has no id to give it; <unk> is the honest one.
    if let Some(unk) = tokens
        .iter()
        .zip(types)
        .find(|(_, &ty)| ty == TYPE_UNKNOWN)
        .map(|(t, _)| t.clone())
    {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| EngineError::Tokenizer(format!("SentencePiece BPE from GGUF: {e}")))?;
    let add_space_prefix = meta.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let mark = SPACE_MARK.to_string();
    let escape = Replace::new(" ", mark.as_str())
        .map_err(|e| EngineError::Tokenizer(format!("SentencePiece normalizer: {e}")))?;
    let unescape = Replace::new(mark.as_str(), " ")
        .map_err(|e| EngineError::Tokenizer(format!("SentencePiece decoder: {e}")))?;
    let mut normalizers = Vec::new();
    let mut decoders = vec![
        DecoderWrapper::Replace(unescape),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        normalizers.push(NormalizerWrapper::Prepend(Prepend::new(mark.clone())));
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    normalizers.push(NormalizerWrapper::Replace(escape));
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(tokenizers::normalizers::Sequence::new(normalizers)))
        .map_err(|e| EngineError::Tokenizer(format!("SentencePiece normalizer: {e}")))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Every split of a token into two tokens, as a merge, best merged-token score first. Among
/// equal scores: by merged token id, then left token id (deterministic; see the module doc).
fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // A NaN score never wins; -0.0 ties with 0.0 as in llama.cpp's `<` comparison.
    let score = |i: usize| {
        let s = scores[i];
        if s.is_nan() {
            f32::NEG_INFINITY
        } else {
            s + 0.0
        }
    };
    let mut found: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        // Duplicate texts: llama.cpp and the BPE both know the last id only.
        if ids.get(t.as_str()) != Some(&i) {
            continue;
        }
        for (cut, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                found.push((score(i), i, li, ri));
            }
        }
    }
    found.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    found
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

/// The bytes a SentencePiece token stands for in generated text, as llama.cpp's `token_to_piece`
/// without special tokens: `▁` is a space, `<0xXX>` its byte, user-defined tokens their text,
/// control, unknown and unused tokens nothing.
fn spm_piece(token: &str, ty: i32) -> Vec<u8> {
    match ty {
        TYPE_USER_DEFINED => token.as_bytes().to_vec(),
        TYPE_BYTE => byte_token(token)
            .map(|b| vec![b])
            .unwrap_or_else(|| token.as_bytes().to_vec()),
        TYPE_NORMAL => token.replace(SPACE_MARK, " ").into_bytes(),
        _ => Vec::new(),
    }
}

/// `<0xXX>` -> the byte.
fn byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// llama.cpp's per-token attributes that the GGUF does not carry, set by the model's name: for a
/// `general.name` containing "phi-3" or "phi3", the whitespace after each special token but
/// `<unk>`, `<s>` and `<|endoftext|>` is dropped (Phi-3's tokenizer.json marks them `rstrip`), so
/// the newline the chat template writes after `<|user|>` is not a token. (The added tokens strip
/// Unicode whitespace, llama.cpp ASCII whitespace only: a no-break space right after `<|user|>`
/// would be tokenized differently.)
fn strips_after_specials(meta: &Meta) -> bool {
    let name = meta.str(gguf::NAME).unwrap_or("").to_lowercase();
    name.contains("phi-3") || name.contains("phi3")
}

/// `tokenizer.ggml.tokens` and their types (all normal when the file has none).
fn tokens_and_types(meta: &Meta) -> Result<(Vec<String>, Vec<i32>), EngineError> {
    let tokens = string_array(meta, gguf::TOKENIZER_TOKENS)?;
    let types: Vec<i32> = match meta.0.get(gguf::TOKENIZER_TOKEN_TYPE) {
        Some(v) => v
            .to_vec()
            .map_err(|e| EngineError::InvalidModel(format!("token_type: {e}")))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(TYPE_NORMAL))
            .collect(),
        None => vec![TYPE_NORMAL; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(EngineError::InvalidModel(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    Ok((tokens, types))
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

/// The tokenizer of an encoder GGUF (BERT, XLM-RoBERTa) written by llama.cpp's
/// `convert_hf_to_gguf.py`, which stores no tokenizer.json, only `tokenizer.ggml.*`: the
/// Hugging Face tokenizer the model was converted from, rebuilt from those arrays, so that the
/// ids are Hugging Face's (llama.cpp's own WPM and UGM tokenizers are approximations of them).
///
/// - `bert` (WordPiece): llama.cpp rewrites the vocabulary into "phantom space" form (a word's
///   first piece `the` becomes `▁the`, a continuation `##ing` becomes `ing`; control tokens such
///   as `[CLS]` stay as they are), which is inverted here exactly. The normalizer is
///   BertNormalizer with `tokenizer.ggml.normalizer.lowercase` / `.strip_accents` (both true when
///   absent, llama.cpp's defaults; older files always lowercased), then BertPreTokenizer, and
///   `[CLS] $A [SEP]` / `[CLS] $A [SEP] $B [SEP]` with token types 0 then 1.
/// - `t5` (SentencePiece Unigram, what llama.cpp writes for XLM-RoBERTa): the pieces and their
///   scores as a Unigram model, the SentencePiece `Precompiled` normalizer when the file has
///   `tokenizer.ggml.precompiled_charsmap`, whitespace split then Metaspace (`▁`, prepended when
///   `tokenizer.ggml.add_space_prefix`), and RoBERTa's `<s> $A </s>` /
///   `<s> $A </s> </s> $B </s>` (types all 0).
///
/// Control and unknown tokens become special added tokens (a literal `[SEP]` or `<pad>` in the
/// text is that token, as in Hugging Face), user-defined ones ordinary added tokens. Anything
/// else is refused with [`EngineError::InvalidModel`] naming what is supported.
pub fn encoder(meta: &Meta) -> Result<Tokenizer, EngineError> {
    let model = meta.str(gguf::TOKENIZER_MODEL)?;
    let bert = match model {
        "bert" => true,
        "t5" => false,
        other => {
            return Err(EngineError::InvalidModel(format!(
                "{} {other:?} is not supported for an encoder without {}: this build reads \
                 WordPiece (\"bert\") and SentencePiece Unigram (\"t5\") vocabularies as \
                 llama.cpp's converter writes them, or a Hugging Face tokenizer.json stored by \
                 `lambda-inference convert`",
                gguf::TOKENIZER_MODEL,
                gguf::TOKENIZER_HF_JSON
            )))
        }
    };
    let (tokens, mut types) = tokens_and_types(meta)?;
    let id = |key: &str| -> Result<Option<u32>, EngineError> {
        match meta.has(key) {
            true => {
                let id = meta.usize(key)?;
                if id >= tokens.len() {
                    return Err(EngineError::InvalidModel(format!(
                        "{key} = {id}, past the {} tokens",
                        tokens.len()
                    )));
                }
                Ok(Some(id as u32))
            }
            false => Ok(None),
        }
    };
    let unk_id = id(gguf::TOKENIZER_UNK_ID)?.or_else(|| {
        types
            .iter()
            .position(|&t| t == TYPE_UNKNOWN)
            .map(|i| i as u32)
    });
    // llama.cpp's converter stores [CLS]/<s> as BOS and [SEP]/</s> as SEP and EOS (see
    // gguf::TOKENIZER_BOS_ID); a file that names CLS itself is believed first.
    let cls = id(gguf::TOKENIZER_CLS_ID)?.or(id(gguf::TOKENIZER_BOS_ID)?);
    let sep = id(gguf::TOKENIZER_SEP_ID)?.or(id(gguf::TOKENIZER_EOS_ID)?);
    let (Some(cls), Some(sep)) = (cls, sep) else {
        return Err(EngineError::InvalidModel(format!(
            "an encoder's vocabulary needs the ids of its first and separator tokens \
             ({} or {}, and {} or {})",
            gguf::TOKENIZER_CLS_ID,
            gguf::TOKENIZER_BOS_ID,
            gguf::TOKENIZER_SEP_ID,
            gguf::TOKENIZER_EOS_ID
        )));
    };
    // llama.cpp's converter writes a WordPiece vocabulary in phantom-space form, where nearly every
    // word-start piece begins with `▁`. A vocabulary with none is already in WordPiece's own form
    // (`lambda-inference convert` writes it that way beside its tokenizer.json).
    let phantom = bert
        && tokens
            .iter()
            .zip(&types)
            .any(|(t, &ty)| ty != TYPE_CONTROL && t.starts_with(SPACE_MARK));
    let mut texts: Vec<String> = if phantom {
        tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| wordpiece_token(t, ty))
            .collect()
    } else {
        tokens.clone()
    };
    let mut scores = match bert {
        true => Vec::new(),
        false => scores(meta, tokens.len())?,
    };
    // llama.cpp's converter, when it reads a sentencepiece.bpe.model (what XLM-R checkpoints
    // ship, and so bge-m3, multilingual-e5...), lays the pieces out as fairseq does but has no
    // piece for the mask, which fairseq appends after them: that slot holds a placeholder
    // `[PADn]` of type unused, scored -10000. Every fairseq-layout vocabulary names it `<mask>`,
    // a special token to Hugging Face (score 0): restored, so a literal `<mask>` is that token
    // and the placeholder's score does not lower the Unigram's unknown-token score.
    if !bert {
        if let Some(m) = id(gguf::TOKENIZER_MASK_ID)?.map(|m| m as usize) {
            if types[m] == TYPE_UNUSED && texts[m].starts_with("[PAD") {
                texts[m] = "<mask>".to_owned();
                types[m] = TYPE_CONTROL;
                scores[m] = 0.0;
            }
        }
    }
    let unk_id = unk_id.ok_or_else(|| {
        EngineError::InvalidModel(format!(
            "the vocabulary has no unknown token ({} or a token of type unknown)",
            gguf::TOKENIZER_UNK_ID
        ))
    })?;
    let mut tokenizer = if bert {
        // (The BPE's vocabulary type is the map WordPiece takes too; WordPiece exports none.)
        let vocab: tokenizers::models::bpe::Vocab = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        if vocab.len() != texts.len() {
            return Err(EngineError::InvalidModel(format!(
                "{}: two tokens spell the same WordPiece piece once llama.cpp's phantom spaces \
                 are undone",
                gguf::TOKENIZER_TOKENS
            )));
        }
        let wordpiece = WordPiece::builder()
            .vocab(vocab)
            .unk_token(texts[unk_id as usize].clone())
            .continuing_subword_prefix(WORDPIECE_PREFIX.to_owned())
            // Hugging Face's BertTokenizer default; llama.cpp stores none.
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| EngineError::Tokenizer(format!("WordPiece from GGUF: {e}")))?;
        let lowercase = flag(meta, gguf::TOKENIZER_LOWERCASE, true)?;
        let strip_accents = flag(meta, gguf::TOKENIZER_STRIP_ACCENTS, lowercase)?;
        let mut tokenizer = Tokenizer::new(wordpiece);
        tokenizer
            .with_normalizer(Some(BertNormalizer::new(
                true,
                true,
                Some(strip_accents),
                lowercase,
            )))
            .map_err(|e| EngineError::Tokenizer(format!("normalizer: {e}")))?;
        tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
        tokenizer.with_decoder(Some(WordPieceDecoder::new(
            WORDPIECE_PREFIX.to_owned(),
            true,
        )));
        tokenizer
    } else {
        let vocab: Vec<(String, f64)> = texts
            .iter()
            .zip(&scores)
            .map(|(t, &s)| (t.clone(), s as f64))
            .collect();
        let byte_fallback = types.contains(&TYPE_BYTE);
        let unigram = Unigram::from(vocab, Some(unk_id as usize), byte_fallback)
            .map_err(|e| EngineError::Tokenizer(format!("Unigram from GGUF: {e}")))?;
        let mut tokenizer = Tokenizer::new(unigram);
        let charsmap = u8_array(meta, gguf::TOKENIZER_PRECOMPILED_CHARSMAP)?;
        if !charsmap.is_empty() {
            let precompiled = Precompiled::from(&charsmap).map_err(|e| {
                EngineError::InvalidModel(format!("{}: {e}", gguf::TOKENIZER_PRECOMPILED_CHARSMAP))
            })?;
            tokenizer
                .with_normalizer(Some(precompiled))
                .map_err(|e| EngineError::Tokenizer(format!("normalizer: {e}")))?;
        }
        let prepend = match flag(meta, gguf::TOKENIZER_ADD_SPACE_PREFIX, true)? {
            true => PrependScheme::Always,
            false => PrependScheme::Never,
        };
        // Runs of whitespace collapse and the ends are trimmed whatever
        // `tokenizer.ggml.remove_extra_whitespaces` says: Hugging Face's XLM-R tokenizers always
        // do (a `" {2,}"` replacement, or this whitespace split in transformers 5), and llama.cpp's
        // converter writes that key from `clean_up_tokenization_spaces` (a decoding option) when
        // it converts from tokenizer.json, so it is false for such files though the tokenizer
        // collapses.
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            WhitespaceSplit.into(),
            Metaspace::new(SPACE_MARK, prepend, true).into(),
        ])));
        tokenizer.with_decoder(Some(MetaspaceDecoder::new(SPACE_MARK, prepend, true)));
        tokenizer
    };

    let (cls_text, sep_text) = (texts[cls as usize].clone(), texts[sep as usize].clone());
    let (single, pair) = if bert {
        (
            vec!["cls:0", "$A:0", "sep:0"],
            vec!["cls:0", "$A:0", "sep:0", "$B:1", "sep:1"],
        )
    } else {
        (
            vec!["cls:0", "$A:0", "sep:0"],
            vec!["cls:0", "$A:0", "sep:0", "sep:0", "$B:0", "sep:0"],
        )
    };
    let special = |key: &str, id: u32, text: String| {
        tokenizers::processors::template::SpecialToken::new(key.to_owned(), vec![id], vec![text])
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    };
    let post = TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(EngineError::Tokenizer)?
        .special_tokens(vec![
            special("cls", cls, cls_text)?,
            special("sep", sep, sep_text)?,
        ])
        .build()
        .map_err(|e| EngineError::Tokenizer(format!("post-processor: {e}")))?;
    tokenizer.with_post_processor(Some(post));

    // Matched on the raw text before anything else, as Hugging Face matches its added tokens.
    let added = |special: bool| -> Vec<AddedToken> {
        texts
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| match special {
                true => ty == TYPE_CONTROL || ty == TYPE_UNKNOWN,
                false => ty == TYPE_USER_DEFINED,
            })
            .map(|(t, _)| AddedToken::from(t.clone(), special).normalized(!special && bert))
            .collect()
    };
    tokenizer
        .add_special_tokens(added(true))
        .map_err(|e| EngineError::Tokenizer(format!("special tokens: {e}")))?;
    tokenizer
        .add_tokens(added(false))
        .map_err(|e| EngineError::Tokenizer(format!("added tokens: {e}")))?;
    Ok(tokenizer)
}

/// WordPiece's mark of a piece that continues a word.
const WORDPIECE_PREFIX: &str = "##";

/// A WordPiece vocabulary entry from llama.cpp's phantom-space form (its converter's `phantom`:
/// control tokens unchanged, `##x` -> `x`, any other `x` -> `▁x`).
fn wordpiece_token(token: &str, ty: i32) -> String {
    if ty == TYPE_CONTROL {
        return token.to_owned();
    }
    match token.strip_prefix(SPACE_MARK) {
        Some(word_start) => word_start.to_owned(),
        None => format!("{WORDPIECE_PREFIX}{token}"),
    }
}

/// A boolean key, `default` when absent.
fn flag(meta: &Meta, key: &str, default: bool) -> Result<bool, EngineError> {
    match meta.has(key) {
        true => meta.bool(key),
        false => Ok(default),
    }
}

/// `tokenizer.ggml.scores`, one per token.
fn scores(meta: &Meta, n: usize) -> Result<Vec<f32>, EngineError> {
    let scores: Vec<f32> = meta
        .0
        .get(gguf::TOKENIZER_SCORES)
        .ok_or_else(|| {
            EngineError::InvalidModel(format!(
                "a Unigram vocabulary needs {}",
                gguf::TOKENIZER_SCORES
            ))
        })?
        .to_vec()
        .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", gguf::TOKENIZER_SCORES)))?
        .iter()
        .map(|s| s.to_f32())
        .collect::<Result<_, _>>()
        .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", gguf::TOKENIZER_SCORES)))?;
    if scores.len() != n {
        return Err(EngineError::InvalidModel(format!(
            "{} {} for {n} tokens",
            scores.len(),
            gguf::TOKENIZER_SCORES
        )));
    }
    Ok(scores)
}

/// A byte array (empty when absent).
fn u8_array(meta: &Meta, key: &str) -> Result<Vec<u8>, EngineError> {
    let Some(v) = meta.0.get(key) else {
        return Ok(Vec::new());
    };
    v.to_vec()
        .map_err(|e| EngineError::InvalidModel(format!("{key}: {e}")))?
        .iter()
        .map(|b| b.to_u8())
        .collect::<Result<_, _>>()
        .map_err(|e| EngineError::InvalidModel(format!("{key}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Value;

    /// A SentencePiece vocabulary small enough to follow the merges by hand: <unk>, <s>, </s>,
    /// the 256 byte tokens (ids 3..=258), then the pieces below, then two special tokens.
    const PIECES: [(&str, f32); 8] = [
        ("▁a", -1.0),
        ("ab", -2.0),
        ("▁ab", -3.0),
        ("bc", -4.0),
        ("▁", -5.0),
        ("a", -6.0),
        ("b", -7.0),
        ("c", -8.0),
    ];

    fn spm_meta(extra: &[(&str, Value)]) -> HashMap<String, Value> {
        let mut tokens = vec![
            ("<unk>".to_owned(), TYPE_UNKNOWN, 0.0),
            ("<s>".to_owned(), TYPE_CONTROL, 0.0),
        ];
        tokens.push(("</s>".to_owned(), TYPE_CONTROL, 0.0));
        tokens.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), TYPE_BYTE, 0.0)));
        tokens.extend(PIECES.iter().map(|(t, s)| (t.to_string(), TYPE_NORMAL, *s)));
        tokens.push(("<|end|>".to_owned(), TYPE_CONTROL, 0.0));
        tokens.push(("<|tool|>".to_owned(), TYPE_USER_DEFINED, 0.0));
        let mut m = HashMap::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_owned(), v);
        };
        put(gguf::TOKENIZER_MODEL, Value::String("llama".into()));
        put(
            gguf::TOKENIZER_TOKENS,
            Value::Array(tokens.iter().map(|t| Value::String(t.0.clone())).collect()),
        );
        put(
            gguf::TOKENIZER_TOKEN_TYPE,
            Value::Array(tokens.iter().map(|t| Value::I32(t.1)).collect()),
        );
        put(
            gguf::TOKENIZER_SCORES,
            Value::Array(tokens.iter().map(|t| Value::F32(t.2)).collect()),
        );
        put("tokenizer.ggml.bos_token_id", Value::U32(1));
        put("tokenizer.ggml.eos_token_id", Value::U32(2));
        for (k, v) in extra {
            put(k, v.clone());
        }
        m
    }

    /// Token id of a piece of the test vocabulary.
    fn id(t: &str) -> u32 {
        match t {
            "<unk>" => 0,
            "<|end|>" => 267,
            "<|tool|>" => 268,
            _ => 259 + PIECES.iter().position(|(p, _)| *p == t).unwrap() as u32,
        }
    }

    fn byte(b: u8) -> u32 {
        3 + b as u32
    }

    fn encode(v: &GgmlVocab, text: &str) -> Vec<u32> {
        v.tokenizer
            .encode_fast(text, false)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    #[test]
    fn sentencepiece_merges_best_score_first_and_prefixes_a_space() {
        let meta = spm_meta(&[]);
        let v = load(&Meta(&meta)).unwrap();
        assert!(
            v.add_bos,
            "llama.cpp adds BOS to SentencePiece prompts by default"
        );
        assert_eq!((v.bos_id, v.bos_text.as_str()), (Some(1), "<s>"));
        // "▁abc": ▁a (-1) first, then ▁ab (-3) beats bc (-4); merging bc first would give ▁a bc.
        assert_eq!(encode(&v, "abc"), vec![id("▁ab"), id("c")]);
        // No "▁▁" piece: each space of a run stays a ▁.
        assert_eq!(
            encode(&v, "a  b"),
            vec![id("▁a"), id("▁"), id("▁"), id("b")]
        );
    }

    #[test]
    fn sentencepiece_spells_unknown_characters_as_byte_tokens() {
        let meta = spm_meta(&[]);
        let v = load(&Meta(&meta)).unwrap();
        // é is not a piece: its two UTF-8 bytes; the newline too (Llama's <0x0A>).
        assert_eq!(
            encode(&v, "aé\n"),
            vec![id("▁a"), byte(0xC3), byte(0xA9), byte(b'\n')]
        );
        let ids = encode(&v, "aé b");
        assert_eq!(v.tokenizer.decode(&ids, false).unwrap(), "aé b");
        // Streaming pieces: ▁ is a space, a byte token its byte, control tokens nothing.
        let text: Vec<u8> = ids
            .iter()
            .flat_map(|&i| v.pieces[i as usize].clone())
            .collect();
        assert_eq!(text, " aé b".as_bytes());
        assert_eq!(v.pieces[byte(b'A') as usize], b"A");
        assert!(v.pieces[1].is_empty() && v.pieces[0].is_empty());
        assert_eq!(v.pieces[id("<|tool|>") as usize], b"<|tool|>");
    }

    #[test]
    fn sentencepiece_space_prefix_follows_add_space_prefix_and_special_tokens() {
        let meta = spm_meta(&[]);
        let v = load(&Meta(&meta)).unwrap();
        assert_eq!(encode(&v, "ab"), vec![id("▁ab")]);
        // Text after a special token starts a new stretch: it gets its ▁ too (llama.cpp's
        // `is_prev_special`), user-defined tokens included.
        assert_eq!(
            encode(&v, "a<|end|>b"),
            vec![id("▁a"), id("<|end|>"), id("▁"), id("b")]
        );
        assert_eq!(
            encode(&v, "c<|tool|>a<unk>"),
            vec![id("▁"), id("c"), id("<|tool|>"), id("▁a"), id("<unk>")]
        );
        // Without Phi-3's rule the newline after a special token is text.
        assert_eq!(
            encode(&v, "<|end|>\na"),
            vec![id("<|end|>"), id("▁"), byte(b'\n'), id("a")]
        );

        let meta = spm_meta(&[("tokenizer.ggml.add_space_prefix", Value::Bool(false))]);
        let v = load(&Meta(&meta)).unwrap();
        assert_eq!(encode(&v, "ab"), vec![id("ab")]);
        assert_eq!(
            encode(&v, "a<|end|>b"),
            vec![id("a"), id("<|end|>"), id("b")]
        );
        let ids = encode(&v, "ab b");
        assert_eq!(v.tokenizer.decode(&ids, false).unwrap(), "ab b");
    }

    #[test]
    fn phi3_drops_whitespace_after_special_tokens_but_endoftext() {
        let meta = spm_meta(&[(gguf::NAME, Value::String("Phi-3 Mini 4k Instruct".into()))]);
        let v = load(&Meta(&meta)).unwrap();
        assert_eq!(encode(&v, "<|end|>\n  a"), vec![id("<|end|>"), id("▁a")]);
        assert_eq!(
            encode(&v, "<s> a"),
            vec![1, id("▁"), id("▁a")],
            "<s> keeps the space after it"
        );
    }

    #[test]
    fn unsupported_tokenizer_models_are_refused_naming_the_supported_ones() {
        for model in ["t5", "bert", "rwkv"] {
            let meta = spm_meta(&[(gguf::TOKENIZER_MODEL, Value::String(model.into()))]);
            let err = match load(&Meta(&meta)) {
                Err(e) => e,
                Ok(_) => panic!("{model} loaded"),
            };
            let EngineError::InvalidModel(msg) = &err else {
                panic!("not InvalidModel: {err}")
            };
            assert!(msg.contains(&format!("{model:?}")), "{msg}");
            assert!(
                msg.contains("\"gpt2\"") && msg.contains("\"llama\""),
                "{msg}"
            );
        }
    }

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

    /// A WordPiece vocabulary as llama.cpp's converter writes it (phantom-space form) or, with
    /// `phantom` false, as Hugging Face spells it.
    fn wordpiece_meta(phantom: bool, extra: &[(&str, Value)]) -> HashMap<String, Value> {
        let words: [(&str, i32); 8] = [
            ("[PAD]", TYPE_CONTROL),
            ("[UNK]", TYPE_CONTROL),
            ("[CLS]", TYPE_CONTROL),
            ("[SEP]", TYPE_CONTROL),
            ("▁play", TYPE_NORMAL),
            ("ing", TYPE_NORMAL),
            ("▁hello", TYPE_NORMAL),
            ("▁,", TYPE_NORMAL),
        ];
        let text = |t: &str| {
            if phantom || t.starts_with('[') {
                return t.to_owned();
            }
            match t.strip_prefix('▁') {
                Some(w) => w.to_owned(),
                None => format!("##{t}"),
            }
        };
        let mut m = HashMap::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_owned(), v);
        };
        put(gguf::TOKENIZER_MODEL, Value::String("bert".into()));
        put(
            gguf::TOKENIZER_TOKENS,
            Value::Array(words.iter().map(|w| Value::String(text(w.0))).collect()),
        );
        put(
            gguf::TOKENIZER_TOKEN_TYPE,
            Value::Array(words.iter().map(|w| Value::I32(w.1)).collect()),
        );
        put(gguf::TOKENIZER_UNK_ID, Value::U32(1));
        put(gguf::TOKENIZER_BOS_ID, Value::U32(2));
        put(gguf::TOKENIZER_SEP_ID, Value::U32(3));
        for (k, v) in extra {
            put(k, v.clone());
        }
        m
    }

    fn encoder_ids(meta: &HashMap<String, Value>, text: &str) -> Vec<u32> {
        encoder(&Meta(meta))
            .unwrap()
            .encode(text, true)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    #[test]
    fn wordpiece_undoes_llamacpp_phantom_spaces_and_lowercases_by_default() {
        // [CLS] hello , play ##ing [SEP]; llama.cpp's default (no key) lowercases.
        let want = [2, 6, 7, 4, 5, 3];
        assert_eq!(
            encoder_ids(&wordpiece_meta(true, &[]), "Hello, PLAYING"),
            want
        );
        // The same vocabulary in WordPiece's own spelling gives the same ids.
        assert_eq!(
            encoder_ids(&wordpiece_meta(false, &[]), "Hello, PLAYING"),
            want
        );
        // A cased vocabulary (lowercase false): "Hello" is not "hello".
        let cased = wordpiece_meta(true, &[(gguf::TOKENIZER_LOWERCASE, Value::Bool(false))]);
        assert_eq!(encoder_ids(&cased, "Hello hello"), [2, 1, 6, 3]);
        // "ing" alone is only a continuation: a word of its own is unknown.
        assert_eq!(encoder_ids(&wordpiece_meta(true, &[]), "ing"), [2, 1, 3]);
        // A pair: [CLS] a [SEP] b [SEP], types 0 then 1.
        let enc = encoder(&Meta(&wordpiece_meta(true, &[])))
            .unwrap()
            .encode(("hello", "playing"), true)
            .unwrap();
        assert_eq!(enc.get_ids(), [2, 6, 3, 4, 5, 3]);
        assert_eq!(enc.get_type_ids(), [0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn encoder_vocabularies_other_than_wordpiece_and_unigram_are_refused() {
        for model in ["gpt2", "llama", "rwkv"] {
            let meta = wordpiece_meta(
                true,
                &[(gguf::TOKENIZER_MODEL, Value::String(model.into()))],
            );
            let err = match encoder(&Meta(&meta)) {
                Err(e) => e,
                Ok(_) => panic!("{model} loaded as an encoder vocabulary"),
            };
            let EngineError::InvalidModel(msg) = &err else {
                panic!("not InvalidModel: {err}")
            };
            assert!(msg.contains(&format!("{model:?}")), "{msg}");
            assert!(msg.contains("\"bert\"") && msg.contains("\"t5\""), "{msg}");
        }
        // Without the ids of its separators or its unknown token, a vocabulary is refused too.
        let mut meta = wordpiece_meta(true, &[]);
        meta.remove(gguf::TOKENIZER_SEP_ID);
        assert!(matches!(
            encoder(&Meta(&meta)),
            Err(EngineError::InvalidModel(m)) if m.contains(gguf::TOKENIZER_SEP_ID)
        ));
        let mut meta = wordpiece_meta(true, &[]);
        meta.remove(gguf::TOKENIZER_UNK_ID);
        assert!(matches!(
            encoder(&Meta(&meta)),
            Err(EngineError::InvalidModel(m)) if m.contains("unknown token")
        ));
    }
}
