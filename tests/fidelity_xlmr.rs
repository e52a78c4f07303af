//! XLM-RoBERTa fidelity on real (tiny, random-weight) models: the folders in
//! tests/fixtures/tiny-xlmr (a SentencePiece Unigram tokenizer trained on Spanish, English and
//! mixed text; an XLMRobertaModel sentence-transformers embedder with mean pooling + Normalize;
//! an XLMRobertaForSequenceClassification cross-encoder), converted here by `lambda-inference
//! convert`, against sentence-transformers in f32 (reference.json, written with the folders by
//! their make.py): token ids identical on every input, embeddings' cosine per language group
//! (f32, f16, q8_0), a long Spanish input truncated as sentence-transformers truncates it,
//! reranker scores and order, and what `/health` and `/v1/models` say about the model.
//!
//! Needs nothing fetched: the fixture is committed.

mod common;

use std::path::Path;

use lambda_inference::engine::bert::{BertEmbedder, WeightMode};
use lambda_inference::engine::{self, Embedder, Engine, ModelKind, Reranker};
use lambda_inference::service::{Limits, ModelMeta, Service};
use serde_json::Value;

/// Reranker scores (after CrossEncoder's sigmoid) against the f32 reference, for the f32 file.
const SCORE_TOL: f64 = 1e-3;
/// For the q8_0 file (the issue asks 1e-3 of a trained model): as in tests/fidelity_reranker.rs,
/// this random model's weights are drawn several times wider than a trained model's, which
/// rounds them as much coarser in absolute terms.
const Q8_SCORE_TOL: f64 = 1e-2;

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-xlmr")
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(fixture_dir().join("reference.json")).unwrap()).unwrap()
}

/// `tests/fixtures/tiny-xlmr/<model>` converted by the CLI (`convert --dtype DTYPE`): its bytes.
fn gguf(model: &str, dtype: &str) -> Vec<u8> {
    common::converted_fixture(&format!("tests/fixtures/tiny-xlmr/{model}"), dtype)
}

fn load(bytes: &[u8], mode: WeightMode) -> BertEmbedder {
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(bytes)).unwrap();
    BertEmbedder::load_with(&content, bytes, mode).unwrap()
}

/// Token ids identical to the reference's, then each input's cosine to sentence-transformers'
/// embedding, one at a time and batched; returns the worst cosine per language group.
fn check_embedder(dtype: &str, mode: WeightMode, min_cos: f64) -> Vec<(String, f64)> {
    let e = load(&gguf("embedder", dtype), mode);
    assert_eq!(Embedder::info(&e).quantization, dtype);
    let fx = reference();
    let items = fx["embedder"]["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();

    let (encs, full) = e.tokenize(&texts).unwrap();
    for ((item, enc), n) in items.iter().zip(&encs).zip(&full) {
        assert_eq!(
            enc.get_ids(),
            common::json_ids(&item["input_ids"]),
            "token ids differ for {:?}",
            item["text"]
        );
        assert_eq!(*n as u64, item["num_tokens_untruncated"].as_u64().unwrap());
    }

    let batched = e.embed(&texts, usize::MAX).unwrap();
    let mut worst: Vec<(String, f64)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let want = common::json_f64s(&item["embedding"]);
        let single = e.embed(&texts[i..i + 1], usize::MAX).unwrap();
        assert_eq!(
            batched.token_counts[i],
            item["input_ids"].as_array().unwrap().len()
        );
        let c = common::cosine(&single.embeddings[0], &want)
            .min(common::cosine(&batched.embeddings[i], &want));
        let group = item["group"].as_str().unwrap().to_owned();
        match worst.iter_mut().find(|(g, _)| *g == group) {
            Some((_, w)) => *w = w.min(c),
            None => worst.push((group, c)),
        }
    }
    for (group, c) in &worst {
        eprintln!("embedder {dtype} {mode:?} {group}: min cosine {c:.7} (need >= {min_cos})");
        assert!(*c >= min_cos, "{dtype} {mode:?} {group}: min cosine {c}");
    }
    worst
}

#[test]
fn f32_embeddings_match_sentence_transformers() {
    check_embedder("f32", WeightMode::default(), 0.99999);
}

#[test]
fn f16_embeddings_match_sentence_transformers() {
    check_embedder("f16", WeightMode::default(), 0.9999);
}

/// The default for q8_0 files (the int8 GEMM), and the weights dequantized to f32.
#[test]
fn q8_0_embeddings_match_sentence_transformers() {
    let worst = check_embedder("q8_0", WeightMode::Int8, 0.999);
    // Every group of the reference is there: Spanish, English, mixed, the long Spanish input.
    let groups: Vec<&str> = worst.iter().map(|(g, _)| g.as_str()).collect();
    assert_eq!(groups, ["es", "en", "mixed", "long-es"]);
    check_embedder("q8_0", WeightMode::Dense, 0.999);
}

#[test]
fn a_long_spanish_input_is_truncated_as_sentence_transformers_truncates_it() {
    let e = load(&gguf("embedder", "q8_0"), WeightMode::default());
    let fx = reference();
    let max_seq = fx["embedder"]["max_seq_length"].as_u64().unwrap() as usize;
    assert_eq!(e.config().max_seq_len, max_seq);
    let long = fx["embedder"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["group"] == "long-es")
        .unwrap();
    let text = long["text"].as_str().unwrap();
    let untruncated = long["num_tokens_untruncated"].as_u64().unwrap() as usize;
    assert!(untruncated > max_seq);

    // Its first max_seq - 2 pieces between <s> and </s>, the last position row used.
    let (encs, full) = e.tokenize(&[text]).unwrap();
    assert_eq!(encs[0].get_ids(), common::json_ids(&long["input_ids"]));
    assert_eq!(full[0], untruncated);
    let fed = encs[0].get_ids();
    assert_eq!((fed[0], fed[fed.len() - 1]), (0, 2), "<s> ... </s>");
    let out = e.embed(&[text], usize::MAX).unwrap();
    assert_eq!(out.token_counts[0], max_seq);
    let c = common::cosine(&out.embeddings[0], &common::json_f64s(&long["embedding"]));
    assert!(c >= 0.999, "{c}");

    // Longer than the tokenizer's window (WINDOW bytes), it is counted window by window, cut
    // at spaces, which SentencePiece's pre-tokenizer splits at too: the same count and the same
    // first tokens as the text tokenized whole.
    let reps = lambda_inference::engine::bert::WINDOW / text.len() + 2;
    let huge = vec![text; reps].join(" ");
    let (encs, full) = e.tokenize(&[&huge]).unwrap();
    assert_eq!(encs[0].get_ids(), common::json_ids(&long["input_ids"]));
    assert_eq!(full[0], (untruncated - 2) * reps + 2);

    // Over the request limit (counted before truncation): refused, naming the input.
    let Err(err) = e.embed(&["hola", text], untruncated - 1) else {
        panic!("an input over the limit must be refused")
    };
    assert!(err.to_string().contains("input 1"), "{err}");
}

/// Ids identical, scores within `tol` of CrossEncoder's, the same order; returns the largest
/// score difference.
fn check_reranker(dtype: &str, mode: WeightMode, tol: f64) -> f64 {
    let e = load(&gguf("reranker", dtype), mode);
    let info = Reranker::info(&e);
    assert_eq!(info.kind, ModelKind::Reranker);
    assert_eq!(info.details.pooling, "rank");
    let fx = reference();
    let r = &fx["reranker"];
    let docs: Vec<&str> = r["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    let mut worst = 0f64;
    for (name, q) in r["queries"].as_object().unwrap() {
        let query = q["query"].as_str().unwrap();
        let encs = e.tokenize_pairs(query, &docs, usize::MAX).unwrap();
        for (i, (enc, want)) in encs
            .iter()
            .zip(q["input_ids"].as_array().unwrap())
            .enumerate()
        {
            assert_eq!(
                enc.get_ids(),
                common::json_ids(want),
                "{name}: ids of pair {i}"
            );
        }
        let out = e.rerank(query, &docs, usize::MAX, None).unwrap();
        let want = common::json_f64s(&q["scores"]);
        assert_eq!(out.scores.len(), want.len());
        for (i, (&got, &want)) in out.scores.iter().zip(&want).enumerate() {
            let d = (got as f64 - want).abs();
            assert!(d <= tol, "{dtype} {name} doc {i}: {got} vs {want}");
            worst = worst.max(d);
        }
        let got: Vec<f64> = out.scores.iter().map(|&s| s as f64).collect();
        assert_eq!(order(&got), order(&want), "{dtype} {name}: order");
    }
    eprintln!("reranker {dtype} {mode:?}: max |score - reference| {worst:.2e}");
    worst
}

/// Indices sorted best first (ties by index), as the API sorts.
fn order(scores: &[f64]) -> Vec<usize> {
    let mut o: Vec<usize> = (0..scores.len()).collect();
    o.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    o
}

#[test]
fn reranker_f32_scores_and_order_match_sentence_transformers() {
    let worst = check_reranker("f32", WeightMode::default(), SCORE_TOL);
    // f32 throughout: only summation order differs from PyTorch.
    assert!(worst < 1e-5, "{worst}");
}

#[test]
fn reranker_f16_scores_and_order_match_sentence_transformers() {
    check_reranker("f16", WeightMode::default(), SCORE_TOL);
}

#[test]
fn reranker_q8_0_scores_and_order_match_sentence_transformers() {
    check_reranker("q8_0", WeightMode::Int8, Q8_SCORE_TOL);
    check_reranker("q8_0", WeightMode::Dense, Q8_SCORE_TOL);
}

#[test]
fn pairs_are_joined_by_the_tokenizers_own_separators() {
    let e = load(&gguf("reranker", "f32"), WeightMode::default());
    let enc = &e.tokenize_pairs("hola", &["mundo"], usize::MAX).unwrap()[0];
    let ids = enc.get_ids();
    // <s> q </s></s> d </s>: XLM-R's ids (0 and 2), not BERT's [CLS]/[SEP].
    assert_eq!(ids[0], 0);
    assert_eq!(ids[ids.len() - 1], 2);
    let seps: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == 2).collect();
    assert_eq!(seps.len(), 3, "{ids:?}");
    assert_eq!(seps[1], seps[0] + 1, "</s></s> between the two: {ids:?}");
}

#[test]
fn health_and_models_report_xlm_roberta_and_its_pooling() {
    for (model, kind, pooling) in [
        ("embedder", "embedder", "mean"),
        ("reranker", "reranker", "rank"),
    ] {
        let engine = engine::load(&gguf(model, "q8_0")).unwrap();
        let info = engine.info().clone();
        assert_eq!(info.architecture, "xlm-roberta");
        assert_eq!(info.details.context_length, 64, "positions past the offset");
        assert_eq!(info.max_seq_len, 64);
        match (&engine, kind) {
            (Engine::Embedder(_), "embedder") | (Engine::Reranker(_), "reranker") => {}
            _ => panic!("{model}: wrong engine kind {:?}", info.kind),
        }
        let s = Service::new(engine, Limits::default(), ModelMeta::default());
        let health = s.health();
        assert_eq!(health["architecture"], "xlm-roberta");
        assert_eq!(health["kind"], kind);
        assert_eq!(health["pooling"], pooling);
        assert_eq!(health["dimensions"], 64);
        let models = s.models();
        assert_eq!(models["data"][0]["architecture"], "xlm-roberta");
        assert_eq!(models["data"][0]["pooling"], pooling);
    }
    // A BERT file, which has neither new key, still says bert.
    let bert = load(&tiny_bert(), WeightMode::default());
    assert_eq!(Reranker::info(&bert).architecture, "bert");
    assert_eq!(bert.config().position_offset, 0);
}

/// The BERT cross-encoder of tests/fixtures/tiny-reranker, converted (f32).
fn tiny_bert() -> Vec<u8> {
    let out = std::env::temp_dir().join(format!("tiny-xlmr-bert-{}.gguf", std::process::id()));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_lambda-inference"))
        .args(["convert", "--quiet", "--dtype", "f32"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-reranker"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    bytes
}
