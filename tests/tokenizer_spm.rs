//! The SentencePiece (`tokenizer.ggml.model = llama`) tokenizer on a real vocabulary: Phi-3-mini's
//! 32k pieces (tests/fixtures/spm/, copied from llama.cpp's models/ by its make.py), against
//! llama.cpp's own tokenizer test cases (`.inp`/`.out`: no BOS, special tokens not parsed; none of
//! the inputs contains one) and chat-formatted prompts tokenized by llama.cpp as a prompt is (BOS,
//! special tokens parsed, Phi-3's whitespace stripping after them). Also the streaming pieces:
//! each case's tokens, piece by piece, spell the input back.

use lambda_inference::engine::ggml_tokenizer::{self, GgmlVocab};
use lambda_inference::engine::gguf::Meta;
use serde_json::Value;

fn dir() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/spm/")
}

fn vocab() -> GgmlVocab {
    let bytes = std::fs::read(format!("{}phi3-vocab.gguf", dir())).unwrap();
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes))
            .unwrap();
    ggml_tokenizer::load(&Meta::of(&content)).unwrap()
}

fn encode(v: &GgmlVocab, text: &str) -> Vec<u32> {
    v.tokenizer
        .encode_fast(text, false)
        .unwrap()
        .get_ids()
        .to_vec()
}

fn spell(v: &GgmlVocab, ids: &[u32]) -> Vec<u8> {
    ids.iter()
        .flat_map(|&i| v.pieces[i as usize].iter().copied())
        .collect()
}

#[test]
fn llama_cpp_tokenizer_test_cases_give_the_same_ids() {
    let v = vocab();
    let inp = std::fs::read_to_string(format!("{}phi3-vocab.inp", dir())).unwrap();
    let out = std::fs::read_to_string(format!("{}phi3-vocab.out", dir())).unwrap();
    let texts: Vec<&str> = inp
        .strip_suffix("\n__ggml_vocab_test__\n")
        .unwrap()
        .split("\n__ggml_vocab_test__\n")
        .collect();
    let wants: Vec<&str> = out.lines().collect();
    assert_eq!(texts.len(), wants.len());
    assert!(texts.len() > 40);
    for (text, line) in texts.iter().zip(wants) {
        let want: Vec<u32> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(encode(&v, text), want, "{text:?}");
        // The leading ▁ of add_space_prefix is the one byte the pieces add.
        let spelled = spell(&v, &want);
        let expected = if text.is_empty() {
            String::new()
        } else {
            format!(" {text}")
        };
        assert_eq!(
            String::from_utf8_lossy(&spelled),
            expected,
            "{text:?}: pieces"
        );
    }
}

#[test]
fn chat_prompts_give_llama_cpps_ids() {
    let v = vocab();
    assert!(v.add_bos);
    let fx: Value =
        serde_json::from_slice(&std::fs::read(format!("{}phi3-prompts.json", dir())).unwrap())
            .unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        // What `Generator::tokenize` does: BOS, then the text with special tokens parsed.
        let mut ids = vec![v.bos_id.unwrap()];
        ids.extend(encode(&v, text));
        assert_eq!(ids, want, "{text:?}");
    }
    // <|end|> and <|endoftext|> end generation; <|assistant|> does not.
    for (t, stops) in [(32007, true), (32000, true), (32001, false)] {
        assert_eq!(v.stop_ids.contains(&t), stops, "{t}");
    }
}
