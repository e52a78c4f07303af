//! `POST /v1/rerank` and `POST /rerank`: a query and documents -> each document's relevance score
//! from a cross-encoder, best first. `/v1/rerank` answers as Cohere, Jina and llama.cpp's server do
//! (`{results: [{index, relevance_score, document?}], usage}`); `/rerank` as text-embeddings-
//! inference does (a bare array of `{index, score, text?}`). Both take `documents` or TEI's
//! `texts`, `top_n`, `return_documents` (TEI: `return_text`) and `raw_scores`.
//!
//! The steps, each a function of that name (as in `embeddings`): [`decode`] the body, [`validate`]
//! it (the same input count, empty-input and response-size limits as embeddings), `limit` (a job's
//! time budget; the token limit is the engine's, per (query, document) pair), `run` the reranker on
//! the blocking pool, `encode` the scores sorted.
//!
//! This module must not tokenize (the engine counts a pair's tokens with the limit it is given),
//! nor know which entry point a request came from.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use super::embeddings::f32_json;
use super::{
    engine_error, limits, meter, parse_body, trim_after, CallOptions, CostModel, Limits, Service,
    MAX_RESPONSE_BYTES,
};
use crate::api::routes;
use crate::engine::{Engine, EngineError, RerankOutput, Reranker};
use crate::error::{ApiError, ErrorKind};

/// Which API's answer a rerank request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// `/v1/rerank`: `{object, model, results: [{index, relevance_score, document?: {text}}],
    /// usage}`.
    Cohere,
    /// `/rerank` (text-embeddings-inference): `[{index, score, text?}]`.
    Tei,
}

/// The body of both routes: Cohere/Jina's fields and TEI's.
#[derive(Debug, Deserialize)]
struct RerankRequest {
    query: String,
    #[serde(default)]
    documents: Option<Vec<String>>,
    /// TEI's name for `documents`.
    #[serde(default)]
    texts: Option<Vec<String>>,
    #[serde(default)]
    top_n: Option<u64>,
    #[serde(default)]
    return_documents: Option<bool>,
    /// TEI's name for `return_documents`.
    #[serde(default)]
    return_text: Option<bool>,
    /// TEI: the head's logit instead of the model's score.
    #[serde(default)]
    raw_scores: Option<bool>,
    /// TEI: `false` refuses a pair longer than the model's window (413) instead of cutting it.
    /// Absent: cut, as sentence-transformers' CrossEncoder does.
    #[serde(default)]
    truncate: Option<bool>,
    /// TEI: which end a cut removes. Only `right` (the end of the longer text, what CrossEncoder
    /// does) is served; `left` is a 400 rather than an answer cut at the other end.
    #[serde(default)]
    truncation_direction: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    // accepted for compatibility; the loaded model answers regardless
    model: Option<String>,
}

/// What a valid request asks for besides its texts.
#[derive(Debug, Clone, Copy)]
struct Answer {
    top_n: usize,
    echo: bool,
    raw: bool,
    /// Pairs longer than the model's window are cut (else refused).
    truncate: bool,
}

/// Step 1: the body as a rerank request (400 for bad JSON, 422 for a wrong shape).
fn decode(body: &[u8]) -> Result<RerankRequest, ApiError> {
    parse_body(body)
}

/// Step 2: everything that can be refused from the request alone: the query, the documents (one
/// list, not empty, at most `MAX_INPUTS`, none empty), `top_n`, and an answer Lambda could not
/// deliver.
fn validate(
    req: RerankRequest,
    limits: &Limits,
) -> Result<(String, Vec<String>, Answer), ApiError> {
    let invalid =
        |param: &str, m: String| ApiError::new(ErrorKind::InvalidValue, m).with_param(param);
    let (docs, param) = match (req.documents, req.texts) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "texts",
                "give the documents as either documents or texts, not both".into(),
            ))
        }
        (Some(d), None) => (d, "documents"),
        (None, Some(t)) => (t, "texts"),
        (None, None) => {
            return Err(ApiError::new(
                ErrorKind::InvalidType,
                "invalid request body: missing field `documents` (or TEI's `texts`)",
            )
            .with_param("documents"))
        }
    };
    if req.query.trim().is_empty() {
        return Err(invalid("query", "query must contain text".into()));
    }
    if docs.is_empty() {
        return Err(invalid(param, format!("{param} must not be empty")));
    }
    if docs.len() > limits.max_inputs {
        return Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "{} documents, more than the limit of {} (MAX_INPUTS)",
                docs.len(),
                limits.max_inputs
            ),
        )
        .with_param(param));
    }
    if let Some(i) = docs.iter().position(|s| s.trim().is_empty()) {
        return Err(invalid(
            param,
            format!("{param}[{i}] is empty; every document must contain text"),
        ));
    }
    let top_n = match req.top_n {
        None => docs.len(),
        Some(0) => return Err(invalid("top_n", "top_n must be at least 1".into())),
        Some(n) => (n.min(docs.len() as u64)) as usize,
    };
    let echo = req.return_documents.or(req.return_text).unwrap_or(false);
    // Lambda refuses a synchronous response over 6 MB (an opaque 502 for the client): refuse up
    // front what could not be delivered. A result is under 100 bytes of JSON; an echoed document
    // costs its escaped length (a control character escapes to 6 bytes).
    let mut estimate = 256 + top_n * 100;
    if echo {
        let mut lens: Vec<usize> = docs.iter().map(|d| escaped_len(d)).collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        estimate += lens.iter().take(top_n).sum::<usize>();
    }
    if estimate > MAX_RESPONSE_BYTES {
        return Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "echoing the documents would make a response of ~{:.1} MB, over Lambda's {} MB \
                 response limit: leave return_documents off (results carry each document's \
                 index), or send a smaller top_n",
                estimate as f64 / 1e6,
                MAX_RESPONSE_BYTES / 1_000_000
            ),
        )
        .with_param("return_documents"));
    }
    match req.truncation_direction.as_deref() {
        None => {}
        Some(d) if d.eq_ignore_ascii_case("right") => {}
        Some(d) => {
            return Err(invalid(
                "truncation_direction",
                format!(
                    "truncation_direction {d:?} is not served: pairs are cut at the right end \
                     (\"right\"), as sentence-transformers' CrossEncoder cuts them; send \
                     truncate: false to be told instead when a pair does not fit"
                ),
            ))
        }
    }
    let raw = req.raw_scores.unwrap_or(false);
    let truncate = req.truncate.unwrap_or(true);
    Ok((
        req.query,
        docs,
        Answer {
            top_n,
            echo,
            raw,
            truncate,
        },
    ))
}

/// The length of `s` as a JSON string's contents, at most (what serde_json writes or less).
fn escaped_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

impl Service {
    fn reranker(&self, path: &str) -> Result<&Arc<dyn Reranker>, ApiError> {
        match &self.engine {
            Engine::Reranker(r) => Ok(r),
            Engine::Embedder(_) | Engine::Generator(_) => Err(self.wrong_kind(path)),
        }
    }

    /// `POST /v1/rerank` and `POST /rerank`. Forward passes stop rather than run past the
    /// deadline (503); with a budget (jobs) the work starts only if it fits, as embeddings do.
    pub(super) async fn rerank(
        &self,
        shape: Shape,
        body: &[u8],
        opts: &CallOptions,
    ) -> Result<Value, ApiError> {
        let path = match shape {
            Shape::Cohere => routes::RERANK,
            Shape::Tei => routes::TEI_RERANK,
        };
        let reranker = self.reranker(path)?;
        let window = reranker.info().max_seq_len;
        let (query, docs, answer) = validate(decode(body)?, &self.limits)?;
        limit(
            &self.cost,
            window,
            &query,
            &docs,
            opts.budget,
            opts.deadline,
        )?;
        // `truncate: false`: the model's window becomes the pair limit, so a pair that would be
        // cut is refused by the same count that refuses one over MAX_INPUT_TOKENS.
        let limit = if !answer.truncate && window < self.limits.max_input_tokens {
            (window, "the model's window, with truncate: false")
        } else {
            (self.limits.max_input_tokens, "MAX_INPUT_TOKENS")
        };
        let out = run(
            reranker.clone(),
            limit,
            &self.cost,
            query,
            &docs,
            opts.deadline,
        )
        .await?;
        Ok(encode(shape, &self.meta.id, answer, &docs, out))
    }
}

/// Step 3, what needs the work's size: a job (with a `budget`) starts only if its estimated cost
/// fits before `deadline`. The token limit is the engine's, in [`run`].
fn limit(
    cost: &CostModel,
    window: usize,
    query: &str,
    docs: &[String],
    budget: Option<Duration>,
    deadline: Option<Instant>,
) -> Result<(), ApiError> {
    let Some(budget) = budget else {
        return Ok(());
    };
    // From the byte lengths, before tokenizing, as embeddings estimate: at most one token per 2
    // bytes, at most the model's window per pair, plus the special tokens.
    let tokens = docs
        .iter()
        .map(|d| ((query.len() + d.len()).div_ceil(2) + 3).min(window))
        .sum();
    limits::admit(cost.embeddings(tokens), budget, deadline)
}

/// Step 4: the reranker on the blocking pool, with `max_input_tokens` passed down (the engine
/// refuses a longer pair as it counts it); the time taken feeds `cost` (a cross-encoder's pass
/// costs per token what an embedder's does).
async fn run(
    reranker: Arc<dyn Reranker>,
    (max_input_tokens, which): (usize, &str),
    cost: &CostModel,
    query: String,
    docs: &[String],
    deadline: Option<Instant>,
) -> Result<RerankOutput, ApiError> {
    let t = Instant::now();
    let text_bytes: usize = query.len() + docs.iter().map(String::len).sum::<usize>();
    let docs = docs.to_vec();
    // CPU-bound for milliseconds to seconds: on the blocking pool, so the runtime's executor stays
    // responsive; an engine panic comes back as a JoinError (a 500), not a dead function.
    let out = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        reranker.rerank(&query, &refs, max_input_tokens, deadline)
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Internal, format!("rerank task failed: {e}")))?
    .map_err(|e| match e {
        EngineError::InputTooLong {
            index,
            tokens,
            limit,
        } => limits::too_many_tokens(
            "documents",
            format!("the query with documents[{index}] has at least {tokens} tokens"),
            limit,
            which,
        ),
        EngineError::DeadlineReached { tokens_done } => {
            cost.observe_embed(t.elapsed(), tokens_done);
            engine_error(e)
        }
        other => engine_error(other),
    })?;
    let tokens: usize = out.token_counts.iter().sum();
    cost.observe_embed(t.elapsed(), tokens);
    meter::record(|s| {
        s.input_tokens += tokens as u64;
        s.engine += t.elapsed();
    });
    trim_after(text_bytes, out.scores.len(), tokens);
    Ok(out)
}

/// Step 5: the results best first (ties in the order given), cut to `top_n`, in `shape`.
fn encode(shape: Shape, model: &str, answer: Answer, docs: &[String], out: RerankOutput) -> Value {
    let scores = if answer.raw { &out.logits } else { &out.scores };
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(answer.top_n);
    let results = order.iter().map(|&i| {
        let score = f32_json(scores[i]);
        match (shape, answer.echo) {
            (Shape::Cohere, false) => json!({"index": i, "relevance_score": score}),
            (Shape::Cohere, true) => {
                json!({"index": i, "relevance_score": score, "document": {"text": docs[i]}})
            }
            (Shape::Tei, false) => json!({"index": i, "score": score}),
            (Shape::Tei, true) => json!({"index": i, "score": score, "text": docs[i]}),
        }
    });
    match shape {
        Shape::Tei => Value::Array(results.collect()),
        Shape::Cohere => {
            let total: usize = out.token_counts.iter().sum();
            json!({
                "object": "list",
                "model": model,
                "results": results.collect::<Vec<_>>(),
                "usage": {"prompt_tokens": total, "total_tokens": total},
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: Value) -> Result<(String, Vec<String>, Answer), ApiError> {
        validate(decode(body.to_string().as_bytes())?, &Limits::default())
    }

    #[test]
    fn documents_or_texts_one_list_of_text() {
        let (q, d, a) = read(json!({"query": "q", "documents": ["a", "b"]})).unwrap();
        assert_eq!((q.as_str(), d.len(), a.top_n, a.echo), ("q", 2, 2, false));
        let (_, d, a) = read(json!({"query": "q", "texts": ["a"], "return_text": true})).unwrap();
        assert_eq!((d.len(), a.echo), (1, true));
        let cases = [
            (json!({"query": "q"}), 422, "documents"),
            (
                json!({"query": "q", "documents": ["a"], "texts": ["b"]}),
                400,
                "texts",
            ),
            (json!({"query": " ", "documents": ["a"]}), 400, "query"),
            (json!({"query": "q", "documents": []}), 400, "documents"),
            (json!({"query": "q", "texts": ["a", " "]}), 400, "texts"),
            (
                json!({"query": "q", "documents": ["a"], "top_n": 0}),
                400,
                "top_n",
            ),
            (json!({"query": "q", "documents": [1]}), 422, ""),
            (json!({"documents": ["a"]}), 422, ""),
        ];
        for (body, status, param) in cases {
            let e = read(body.clone()).unwrap_err();
            assert_eq!(e.status(), status, "{body}: {}", e.message);
            if !param.is_empty() {
                assert_eq!(e.param.as_deref(), Some(param), "{body}");
            }
        }
        let many = vec!["x"; Limits::default().max_inputs + 1];
        let e = read(json!({"query": "q", "documents": many})).unwrap_err();
        assert_eq!(e.status(), 413);
    }

    #[test]
    fn top_n_is_capped_and_echoes_that_cannot_be_delivered_are_refused() {
        let (_, _, a) = read(json!({"query": "q", "documents": ["a"], "top_n": 9})).unwrap();
        assert_eq!(a.top_n, 1);
        // 3 documents of 1.5 MB of control characters: 27 MB escaped.
        let big = "\u{1}".repeat(1_500_000);
        let body = json!({"query": "q", "documents": [big, big, big], "return_documents": true});
        assert_eq!(read(body.clone()).unwrap_err().status(), 413);
        // The same without the echo, or echoing only the largest one fitting, passes.
        let mut no_echo = body.clone();
        no_echo["return_documents"] = json!(false);
        assert!(read(no_echo).is_ok());
        let small = "x".repeat(1_500_000);
        let body =
            json!({"query": "q", "documents": [small, small, small], "return_documents": true});
        assert!(read(body).is_ok());
    }

    #[test]
    fn results_are_sorted_best_first_and_cut_to_top_n() {
        let out = RerankOutput {
            scores: vec![0.2, 0.9, 0.2, 0.5],
            logits: vec![-1.5, 2.25, -1.5, 0.0],
            token_counts: vec![5, 6, 7, 8],
        };
        let docs: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let answer = Answer {
            top_n: 3,
            echo: true,
            raw: false,
            truncate: true,
        };
        let v = encode(Shape::Cohere, "m", answer, &docs, out.clone());
        let idx: Vec<u64> = v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["index"].as_u64().unwrap())
            .collect();
        assert_eq!(idx, [1, 3, 0]);
        assert_eq!(v["results"][0]["document"]["text"], "b");
        assert_eq!(v["usage"]["total_tokens"], 26);
        let raw = Answer {
            top_n: 4,
            echo: false,
            raw: true,
            truncate: true,
        };
        let v = encode(Shape::Tei, "m", raw, &docs, out);
        let got: Vec<(u64, f64)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["index"].as_u64().unwrap(), r["score"].as_f64().unwrap()))
            .collect();
        assert_eq!(got, [(1, 2.25), (3, 0.0), (0, -1.5), (2, -1.5)]);
        assert!(v[0].get("text").is_none());
    }
}
