//! Reranking fidelity and routes on a real (tiny, random-weight) cross-encoder: the
//! BertForSequenceClassification folder in tests/fixtures/tiny-reranker, converted here by
//! `lambda-inference convert` (f32 and q8_0), against sentence-transformers' CrossEncoder in f32
//! (reference.json, written with the folder by its make.py): token ids of every (query,
//! document) pair identical, scores within 1e-3 (f32; q8_0 within 1e-2, see [`Q8_SCORE_TOL`]), the
//! same order; then `/v1/rerank` and
//! `/rerank` through the service on the q8_0 file: sorted answers in each shape, `top_n`,
//! `return_documents`, `raw_scores`, the token limit per pair, and the wrong-kind refusals.
//!
//! Needs nothing fetched: the fixture is committed.

use std::path::Path;
use std::sync::Arc;

mod common;

use lambda_inference::engine::bert::{BertEmbedder, WeightMode};
use lambda_inference::engine::{self, Engine, ModelKind, Reranker};
use lambda_inference::service::{ApiRequest, Limits, Method, ModelMeta, Service};
use serde_json::{json, Value};

/// Tolerance on CrossEncoder's scores (after its sigmoid) for the f32 file: the bar.
const SCORE_TOL: f64 = 1e-3;
/// For the q8_0 file. Its error is the weights' rounding (as large with them dequantized to f32
/// and f32 activations: both modes are checked), and this random model's weights are drawn 10x wider than BERT's (so that its scores
/// spread apart), which rounds them 10x coarser in absolute terms than a trained model's.
const Q8_SCORE_TOL: f64 = 1e-2;

fn reference() -> Value {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-reranker/reference.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn bert(bytes: &[u8]) -> BertEmbedder {
    bert_with(bytes, WeightMode::default())
}

fn bert_with(bytes: &[u8], mode: WeightMode) -> BertEmbedder {
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(bytes)).unwrap();
    BertEmbedder::load_with(&content, bytes, mode).unwrap()
}

/// Indices sorted best first (ties by index), as the API sorts.
fn order(scores: &[f64]) -> Vec<usize> {
    let mut o: Vec<usize> = (0..scores.len()).collect();
    o.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    o
}

/// Ids identical, scores within `tol` of the reference, the same order; returns the largest
/// score and logit differences.
fn check(dtype: &str, mode: WeightMode, tol: f64) -> (f64, f64) {
    let bytes = common::tiny_reranker_gguf(dtype);
    let e = bert_with(&bytes, mode);
    let info = Reranker::info(&e);
    assert_eq!(info.kind, ModelKind::Reranker);
    assert_eq!(info.details.pooling, "rank");
    assert_eq!(info.quantization, dtype);
    let fx = reference();
    let docs: Vec<&str> = fx["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    let (mut worst_score, mut worst_logit) = (0f64, 0f64);
    for (name, q) in fx["queries"].as_object().unwrap() {
        let query = q["query"].as_str().unwrap();
        let encs = e.tokenize_pairs(query, &docs, usize::MAX).unwrap();
        for (i, (enc, want)) in encs
            .iter()
            .zip(q["input_ids"].as_array().unwrap())
            .enumerate()
        {
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(enc.get_ids(), want, "{name}: ids of pair {i}");
        }
        let out = e.rerank(query, &docs, usize::MAX, None).unwrap();
        let (want_scores, want_logits) = (
            common::json_f64s(&q["scores"]),
            common::json_f64s(&q["logits"]),
        );
        for i in 0..docs.len() {
            let ds = (out.scores[i] as f64 - want_scores[i]).abs();
            let dl = (out.logits[i] as f64 - want_logits[i]).abs();
            assert!(
                ds <= tol,
                "{dtype} {name} doc {i}: score {} vs {}",
                out.scores[i],
                want_scores[i]
            );
            worst_score = worst_score.max(ds);
            worst_logit = worst_logit.max(dl);
        }
        let got: Vec<f64> = out.scores.iter().map(|&s| s as f64).collect();
        assert_eq!(order(&got), order(&want_scores), "{dtype} {name}: order");
    }
    eprintln!("{dtype} {mode:?}: max |score - reference| {worst_score:.2e}, max |logit - reference| {worst_logit:.2e}");
    (worst_score, worst_logit)
}

#[test]
fn f32_scores_and_order_match_sentence_transformers() {
    let (score, logit) = check("f32", WeightMode::default(), SCORE_TOL);
    // f32 throughout: only summation order differs from PyTorch.
    assert!(score < 1e-5 && logit < 1e-4, "{score} {logit}");
}

#[test]
fn q8_0_scores_and_order_match_sentence_transformers() {
    check("q8_0", WeightMode::Int8, Q8_SCORE_TOL);
    check("q8_0", WeightMode::Dense, Q8_SCORE_TOL);
}

fn service() -> Service {
    let s = common::tiny_reranker_service(Limits {
        max_input_tokens: 100,
        ..Limits::default()
    });
    assert!(matches!(s.engine(), Engine::Reranker(_)));
    s
}

async fn post(s: &Service, path: &str, body: Value) -> (u16, Value) {
    let r = s
        .handle(ApiRequest {
            method: Method::Post,
            path: path.into(),
            body: body.to_string().into_bytes(),
        })
        .await;
    (r.status, r.body)
}

#[tokio::test]
async fn both_routes_answer_sorted_scores_in_their_shapes() {
    let s = service();
    let fx = reference();
    let q = &fx["queries"]["es"];
    let docs = &fx["documents"];
    let want = common::json_f64s(&q["scores"]);
    // The long document alone with the query is over the 100-token limit: leave it out here.
    let n = docs.as_array().unwrap().len() - 1;
    let short: Vec<Value> = docs.as_array().unwrap()[..n].to_vec();
    let best: Vec<usize> = order(&want[..n]);

    let (status, body) = post(
        &s,
        "/v1/rerank",
        json!({"query": q["query"], "documents": short, "top_n": 3, "return_documents": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "tiny-reranker");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (r, &i) in results.iter().zip(&best) {
        assert_eq!(r["index"], i);
        assert_eq!(r["document"]["text"], short[i]);
        let score = r["relevance_score"].as_f64().unwrap();
        assert!(
            (score - want[i]).abs() <= Q8_SCORE_TOL,
            "{score} vs {}",
            want[i]
        );
    }
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // TEI's shape: a bare array, `texts`, `raw_scores` gives the logits.
    let (status, body) = post(
        &s,
        "/rerank",
        json!({"query": q["query"], "texts": short, "raw_scores": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let results = body.as_array().unwrap();
    assert_eq!(results.len(), n);
    let logits = common::json_f64s(&q["logits"]);
    for (r, &i) in results.iter().zip(&best) {
        assert_eq!(r["index"], i);
        assert!(r.get("text").is_none());
        let score = r["score"].as_f64().unwrap();
        assert!(
            (score - logits[i]).abs() <= 4.0 * Q8_SCORE_TOL,
            "{score} vs {}",
            logits[i]
        );
    }
}

#[tokio::test]
async fn limits_and_wrong_kinds_are_refused() {
    let s = service();
    let fx = reference();
    let long = fx["documents"].as_array().unwrap().last().unwrap().clone();
    // Query + long document: over MAX_INPUT_TOKENS (100) before truncation.
    let (status, body) = post(
        &s,
        "/v1/rerank",
        json!({"query": "passport", "documents": ["short one", long]}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["param"], "documents");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("documents[1]") && msg.contains("MAX_INPUT_TOKENS"),
        "{msg}"
    );

    let (status, body) = post(&s, "/v1/embeddings", json!({"input": "hi"})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "unsupported_for_model");
    let (status, _) = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 400);

    let health = s.health();
    assert_eq!(health["kind"], "reranker");
    assert_eq!(health["pooling"], "rank");
    assert_eq!(health["context_length"], 128);
    assert!(
        health["quantization_mix"]["q8_0"]["tensors"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(health["quantization_mix"]["f32"]["bytes"].as_u64().unwrap() > 0);
    let models = s.models();
    assert_eq!(models["data"][0]["pooling"], "rank");

    // An embedder refuses reranking, naming what it needs.
    let minilm = common_embedder_service();
    let (status, body) = post(&minilm, "/rerank", json!({"query": "q", "texts": ["d"]})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("a reranker"));
}

#[tokio::test]
async fn tei_truncate_false_refuses_a_pair_longer_than_the_window() {
    // MAX_INPUT_TOKENS well above the model's 128-token window: only `truncate` decides.
    let s = common::tiny_reranker_service(Limits {
        max_input_tokens: 10_000,
        ..Limits::default()
    });
    let fx = reference();
    let long = fx["documents"].as_array().unwrap().last().unwrap().clone();
    let docs = json!(["a short document", long]);
    for truncate in [json!(null), json!(true)] {
        let body = json!({"query": "passport", "texts": docs, "truncate": truncate});
        let (status, body) = post(&s, "/rerank", body).await;
        assert_eq!(status, 200, "truncate {truncate}: {body}");
        assert_eq!(body.as_array().unwrap().len(), 2);
    }
    let (status, body) = post(
        &s,
        "/rerank",
        json!({"query": "passport", "texts": docs, "truncate": false}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["param"], "documents");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("documents[1]") && msg.contains("128") && msg.contains("truncate: false"),
        "{msg}"
    );
    // Pairs that fit are answered with truncate: false as without it.
    let (status, body) = post(
        &s,
        "/v1/rerank",
        json!({"query": "passport", "documents": ["a short document", "another"], "truncate": false}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Only the right end is cut; asking for the left is refused, not ignored.
    let (status, body) = post(
        &s,
        "/rerank",
        json!({"query": "passport", "texts": docs, "truncation_direction": "Left"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "truncation_direction");
    let (status, body) = post(
        &s,
        "/rerank",
        json!({"query": "passport", "texts": docs, "truncation_direction": "Right"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// A service on an embedder that is not a reranker: the same fixture's encoder served as a FAKE
/// embedder would do, so the kind check is all that answers.
fn common_embedder_service() -> Service {
    let bytes = common::tiny_reranker_gguf("f32");
    let e: Arc<dyn engine::Embedder> = Arc::new(bert(&bytes));
    Service::new(Engine::Embedder(e), Limits::default(), ModelMeta::default())
}

/// The fixture folder copied to a fresh temporary folder, with `edit` applied to its config.json;
/// the result of converting it to f32.
fn convert_edited(tag: &str, edit: impl FnOnce(&mut Value)) -> std::process::Output {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-reranker");
    let dir = std::env::temp_dir().join(format!("tiny-reranker-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lambda-inference"))
        .args(["convert", "--quiet", "--dtype", "f32"])
        .arg(&dir)
        .arg(dir.join("out.gguf"))
        .output()
        .unwrap();
    if out.status.success() {
        let bytes = std::fs::read(dir.join("out.gguf")).unwrap();
        let e = bert(&bytes);
        let fx = reference();
        let q = &fx["queries"]["en"];
        let docs: Vec<&str> = fx["documents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap())
            .collect();
        let r = e
            .rerank(q["query"].as_str().unwrap(), &docs, usize::MAX, None)
            .unwrap();
        // Identity: the score is the logit (CrossEncoder's older ms-marco models).
        assert_eq!(r.scores, r.logits, "{tag}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn convert_keeps_an_identity_activation_and_refuses_multi_label_heads() {
    let out = convert_edited("identity", |c| {
        c["sbert_ce_default_activation_function"] = json!("torch.nn.modules.linear.Identity");
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = convert_edited("labels", |c| {
        c["id2label"] = json!({"0": "contradiction", "1": "entailment", "2": "neutral"});
    });
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("id2label") && err.contains("3 labels"),
        "{err}"
    );
}
