//! Fidelity on real weights: our GGUF conversions of all-MiniLM-L6-v2 against the
//! sentence-transformers reference (tests/fixtures/minilm_public.json, computed with PyTorch fp32).
//!
//! Needs the converted models that `scripts/fetch-models` makes (models/all-MiniLM-L6-v2.*.gguf).
//! Without them the test says so and skips, except under CI=true, where a missing model fails.

use std::path::{Path, PathBuf};

use lambda_inference::engine::bert::{BertEmbedder, WeightMode};
use lambda_inference::engine::Embedder;
use serde_json::Value;

mod common;

fn model(name: &str) -> Option<PathBuf> {
    common::needed_file(&format!("models/{name}"), "scripts/fetch-models")
}

fn load(path: &Path) -> BertEmbedder {
    load_with(path, WeightMode::default())
}

fn load_with(path: &Path, mode: WeightMode) -> BertEmbedder {
    let bytes = std::fs::read(path).unwrap();
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes[..]))
            .unwrap();
    BertEmbedder::load_with(&content, &bytes, mode).unwrap()
}

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_public.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Token ids identical, then the minimum cosine over sentences, one at a time and batched.
fn check(file: &str, min_cos: f64) {
    check_mode(file, WeightMode::default(), min_cos)
}

fn check_mode(file: &str, mode: WeightMode, min_cos: f64) {
    let Some(path) = model(file) else { return };
    let e = load_with(&path, mode);
    let dtype = file.split('.').nth(1).unwrap();
    assert_eq!(e.info().quantization, dtype, "reported quantization");
    let fx = fixture();
    let items = fx["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();

    let (encs, full) = e.tokenize(&texts).unwrap();
    for ((item, enc), n) in items.iter().zip(&encs).zip(&full) {
        let want: Vec<u32> = item["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            enc.get_ids(),
            &want[..],
            "token ids differ for {:?}",
            item["text"]
        );
        assert_eq!(*n as u64, item["num_tokens_untruncated"].as_u64().unwrap());
    }

    let batched = e.embed(&texts, 8192).unwrap();
    let mut worst = f64::MAX;
    for (i, item) in items.iter().enumerate() {
        let want: Vec<f64> = item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let single = e.embed(&texts[i..i + 1], 8192).unwrap();
        let c1 = common::cosine(&single.embeddings[0], &want);
        let c2 = common::cosine(&batched.embeddings[i], &want);
        let norm: f32 = single.embeddings[0]
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not normalized: {norm}");
        assert_eq!(
            batched.token_counts[i] as u64,
            item["num_tokens"].as_u64().unwrap()
        );
        eprintln!("{file} {mode:?} [{i}] cos single {c1:.6} batched {c2:.6}");
        worst = worst.min(c1).min(c2);
    }
    eprintln!("{file} {mode:?}: min cosine {worst:.6} (need >= {min_cos})");
    assert!(worst >= min_cos, "{file}: min cosine {worst} < {min_cos}");
}

#[test]
fn f16_matches_sentence_transformers() {
    check("all-MiniLM-L6-v2.f16.gguf", 0.9999);
}

/// The default for q8_0 files: the int8 GEMM.
#[test]
fn q8_0_matches_sentence_transformers() {
    check("all-MiniLM-L6-v2.q8_0.gguf", 0.999);
}

#[test]
fn q8_0_dense_matches_sentence_transformers() {
    check_mode("all-MiniLM-L6-v2.q8_0.gguf", WeightMode::Dense, 0.999);
}

#[test]
fn too_long_input_is_refused_not_truncated_past_the_limit() {
    let Some(path) = model("all-MiniLM-L6-v2.q8_0.gguf") else {
        return;
    };
    let e = load(&path);
    let long = "word ".repeat(300);
    let Err(err) = e.embed(&["short", &long], 100) else {
        panic!("a 302-token input must be refused under a limit of 100 tokens")
    };
    assert!(err.to_string().contains("input 1"), "{err}");
    // Under the limit, long inputs are truncated to max_seq_len like sentence-transformers.
    let out = e.embed(&[&long], 8192).unwrap();
    assert_eq!(out.token_counts[0], e.config().max_seq_len);
}
