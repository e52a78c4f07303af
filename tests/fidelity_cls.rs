//! CLS pooling without normalization, on a real (tiny, random-weight) model: the folder in
//! tests/fixtures/tiny-bert-cls (a BertModel on all-MiniLM-L6-v2's first 2,000 WordPiece entries,
//! sentence-transformers CLS pooling, no Normalize module: the bge/e5 shape minus the
//! normalization), converted here by `lambda-inference convert` in f32, f16 and q8_0, against
//! sentence-transformers' `encode` in f32 (reference.json, written with the folder by its
//! make.py): token ids identical, the first token's state as the embedding (cosine per
//! language group), its length kept (no normalization), and the pooling `/health` reports.
//!
//! Needs nothing fetched: the fixture is committed.

mod common;

use lambda_inference::engine::bert::{BertEmbedder, WeightMode};
use lambda_inference::engine::Embedder;
use serde_json::Value;

fn reference() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-bert-cls/reference.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn load(dtype: &str, mode: WeightMode) -> BertEmbedder {
    let bytes = common::converted_fixture("tests/fixtures/tiny-bert-cls", dtype);
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes))
            .unwrap();
    BertEmbedder::load_with(&content, &bytes, mode).unwrap()
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// Ids identical, then per group the worst cosine (each input alone and the group batched) and
/// the worst relative length difference against the reference.
fn check(dtype: &str, mode: WeightMode, min_cos: f64, max_len_err: f64) {
    let e = load(dtype, mode);
    assert_eq!(e.info().quantization, dtype);
    let fx = reference();
    for (group, g) in fx["groups"].as_object().unwrap() {
        let texts: Vec<&str> = g["sentences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        let (encs, _) = e.tokenize(&texts).unwrap();
        for (enc, want) in encs.iter().zip(g["input_ids"].as_array().unwrap()) {
            assert_eq!(enc.get_ids(), common::json_ids(want), "{group}: token ids");
        }
        let batched = e.embed(&texts, usize::MAX).unwrap();
        let (mut worst_cos, mut worst_len) = (1f64, 0f64);
        for (i, want) in g["embeddings"].as_array().unwrap().iter().enumerate() {
            let want = common::json_f64s(want);
            let single = e.embed(&texts[i..i + 1], usize::MAX).unwrap();
            for got in [&single.embeddings[0], &batched.embeddings[i]] {
                let (ng, nw) = (
                    norm(got.iter().map(|&a| a as f64)),
                    norm(want.iter().copied()),
                );
                worst_cos = worst_cos.min(common::cosine(got, &want));
                worst_len = worst_len.max((ng - nw).abs() / nw);
            }
        }
        eprintln!(
            "{dtype} {mode:?} {group}: min cosine {worst_cos:.7}, length error {worst_len:.2e}"
        );
        assert!(worst_cos >= min_cos, "{dtype} {group}: cosine {worst_cos}");
        assert!(
            worst_len <= max_len_err,
            "{dtype} {group}: length error {worst_len}"
        );
    }
}

#[test]
fn f32_cls_embeddings_match_sentence_transformers() {
    check("f32", WeightMode::default(), 0.99999, 1e-4);
}

#[test]
fn f16_cls_embeddings_match_sentence_transformers() {
    check("f16", WeightMode::default(), 0.9999, 1e-3);
}

#[test]
fn q8_0_cls_embeddings_match_sentence_transformers() {
    check("q8_0", WeightMode::Int8, 0.999, 1e-2);
    check("q8_0", WeightMode::Dense, 0.999, 1e-2);
}

#[test]
fn the_model_reports_cls_pooling_and_no_normalization() {
    let e = load("q8_0", WeightMode::default());
    let info = e.info();
    assert_eq!(info.details.pooling, "cls");
    // Not normalized: the reference vectors are not unit length, and neither are ours.
    let v = &e
        .embed(&["how do I renew my passport"], usize::MAX)
        .unwrap()
        .embeddings[0];
    let n = norm(v.iter().map(|&a| a as f64));
    assert!((n - 1.0).abs() > 0.05, "length {n}: normalized");
}
