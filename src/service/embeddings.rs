//! `POST /v1/embeddings`: one request, or the embedding jobs of an SQS batch sharing forward
//! passes. The steps, each a function of that name (as in `generation`): [`decode`] the body,
//! [`validate`] it (input count, empty inputs, dimensions, the response's size), `limit` (a job's
//! time budget; the token limit is the engine's, passed down in `run`), `run` the embedder on the
//! blocking pool, `encode` OpenAI's list of embeddings (floats at f32 precision, or base64).
//!
//! This module must not tokenize (the engine counts tokens, window by window, with the limit it
//! is given: see the service's module doc), nor know which entry point a request came from.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    engine_error, limits, meter, parse_body, trim_after, CallOptions, CostModel, Limits, Service,
    MAX_RESPONSE_BYTES, NOT_STARTED_CODE,
};
use crate::api::routes;
use crate::engine::{EmbedOutput, Embedder, Engine, EngineError};
use crate::error::{ApiError, ErrorKind};

/// What an embeddings request asks for besides its inputs.
#[derive(Debug, Clone, Copy)]
struct EmbeddingShape {
    dims: usize,
    format: EncodingFormat,
}

/// `input` of an embeddings request: one string or an array of strings.
#[derive(Debug)]
struct Inputs(Vec<String>);

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Strings { array: true }).map(Inputs)
    }
}

/// Reads `input`: a string, or where `array`, an array whose elements are read again without it,
/// so that a token-id array (or an array of them) is refused with a message that says so.
#[derive(Clone, Copy)]
struct Strings {
    array: bool,
}

impl<'de> DeserializeSeed<'de> for Strings {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strings {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(if self.array {
            "a string or an array of strings"
        } else {
            "a string (token-id arrays are not supported)"
        })
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
        Ok(vec![v.to_owned()])
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Vec<String>, E> {
        Ok(vec![v])
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        if !self.array {
            return Err(de::Error::invalid_type(de::Unexpected::Seq, &self));
        }
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(one) = seq.next_element_seed(Strings { array: false })? {
            out.extend(one);
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

/// `POST /v1/embeddings` body (OpenAI).
#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    input: Inputs,
    #[serde(default)]
    #[allow(dead_code)]
    // accepted for OpenAI compatibility; the loaded model answers regardless
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    dimensions: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)] // accepted for OpenAI compatibility
    user: Option<String>,
}

/// Step 1: the body as an embeddings request (400 for bad JSON, 422 for a wrong shape).
fn decode(body: &[u8]) -> Result<EmbeddingsRequest, ApiError> {
    parse_body(body)
}

/// Step 2: everything that can be refused from the request alone, before any compute: the inputs
/// (none, more than `MAX_INPUTS`, an empty one), `dimensions` against the model's `full_dims`,
/// and a response Lambda could not deliver.
fn validate(
    req: EmbeddingsRequest,
    limits: &Limits,
    full_dims: usize,
) -> Result<(Vec<String>, EmbeddingShape), ApiError> {
    let inputs = req.input.0;
    if inputs.is_empty() {
        return Err(
            ApiError::new(ErrorKind::InvalidValue, "input must not be empty").with_param("input"),
        );
    }
    if inputs.len() > limits.max_inputs {
        return Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "{} inputs, more than the limit of {} (MAX_INPUTS)",
                inputs.len(),
                limits.max_inputs
            ),
        )
        .with_param("input"));
    }
    if let Some(i) = inputs.iter().position(|s| s.trim().is_empty()) {
        return Err(ApiError::new(
            ErrorKind::InvalidValue,
            format!("input[{i}] is empty; every input must contain text"),
        )
        .with_param("input"));
    }
    let dims = match req.dimensions {
        None => full_dims,
        Some(d) if d == 0 || d as usize > full_dims => {
            return Err(ApiError::new(
                ErrorKind::InvalidValue,
                format!("dimensions must be between 1 and {full_dims} for this model, got {d}"),
            )
            .with_param("dimensions"))
        }
        Some(d) => d as usize,
    };
    let format = req.encoding_format.unwrap_or_default();
    // Lambda refuses a synchronous response over 6 MB (the client then sees an opaque 502),
    // so refuse up front what could not be delivered, before spending the compute. Worst-case
    // bytes per number: a float prints as up to ~14 JSON chars ("-0.0123456789,"), base64
    // carries 4 bytes as 5.33 chars.
    let per_value = match format {
        EncodingFormat::Float => 14.0,
        EncodingFormat::Base64 => 16.0 / 3.0,
    };
    let estimate = inputs.len() as f64 * (dims as f64 * per_value + 64.0) + 256.0;
    if estimate > MAX_RESPONSE_BYTES as f64 {
        return Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "{} embeddings of {dims} dimensions would make a response of ~{:.1} MB, over \
                 Lambda's {} MB response limit: send fewer inputs per request, or use \
                 encoding_format=base64 (about 2.6x smaller) or dimensions",
                inputs.len(),
                estimate / 1e6,
                MAX_RESPONSE_BYTES / 1_000_000
            ),
        )
        .with_param("input"));
    }
    Ok((inputs, EmbeddingShape { dims, format }))
}

impl Service {
    fn embedder(&self) -> Result<&Arc<dyn Embedder>, ApiError> {
        match &self.engine {
            Engine::Embedder(e) => Ok(e),
            Engine::Generator(_) | Engine::Reranker(_) => Err(self.wrong_kind(routes::EMBEDDINGS)),
        }
    }

    /// `POST /v1/embeddings`; forward passes stop rather than run past `deadline` (a 503 beats
    /// the invocation being cut off: API Gateway would answer an opaque 504).
    pub async fn embeddings(
        &self,
        body: &[u8],
        deadline: Option<Instant>,
    ) -> Result<Value, ApiError> {
        let embedder = self.embedder()?;
        let info = embedder.info();
        let (inputs, shape) = validate(decode(body)?, &self.limits, info.dimensions)?;
        // No budget: a single request runs, and the deadline stops what it cannot finish.
        limit(&self.cost, info.max_seq_len, &inputs, None, deadline)?;
        let max_tokens = self.limits.max_input_tokens;
        let out = run(embedder.clone(), max_tokens, &self.cost, inputs, deadline).await?;
        Ok(encode(
            &self.meta.id,
            shape,
            out.embeddings,
            &out.token_counts,
        ))
    }

    /// Several embeddings requests (the embedding jobs of one SQS batch) answered with shared
    /// forward passes: one engine call over all their inputs, split back per request. An invalid
    /// request fails alone; if the shared call fails (one input over the token limit, an engine
    /// panic), the group is bisected until only the guilty request fails.
    ///
    /// With a budget in `opts` (jobs), requests are admitted in order while their estimated cost
    /// fits before the deadline; the rest answer [`not_started`](super::not_started) errors, and
    /// a request that could not finish even in a whole invocation ([`CallOptions::budget`])
    /// fails with 413.
    pub async fn embeddings_many(
        &self,
        bodies: &[&[u8]],
        opts: &CallOptions,
    ) -> Vec<Result<Value, ApiError>> {
        // The model's kind refuses every request alike.
        let embedder = match self.embedder() {
            Ok(e) => e,
            Err(e) => return bodies.iter().map(|_| Err(e.clone())).collect(),
        };
        let info = embedder.info();
        let mut results: Vec<Option<Result<Value, ApiError>>> = vec![None; bodies.len()];
        let mut valid: Vec<(usize, EmbeddingShape, Vec<String>)> = Vec::new();
        let deadline = opts.deadline;
        let mut planned = Duration::ZERO;
        for (i, body) in bodies.iter().enumerate() {
            // The requests admitted before this one run first: it must fit in what they leave.
            let later = deadline.map(|d| d.checked_sub(planned).unwrap_or(d));
            let admitted = decode(body).and_then(|req| {
                let (inputs, shape) = validate(req, &self.limits, info.dimensions)?;
                let cost = limit(&self.cost, info.max_seq_len, &inputs, opts.budget, later)?;
                Ok((inputs, shape, cost))
            });
            match admitted {
                Ok((inputs, shape, cost)) => {
                    planned += cost;
                    valid.push((i, shape, inputs))
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for (i, r) in self.embed_group(embedder, valid, deadline).await {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| r.expect("every request answered"))
            .collect()
    }

    /// One engine call for the whole group; if it fails, the group is split in halves and each
    /// half tried again, so one bad request costs a few extra calls, not one call per request.
    fn embed_group<'a>(
        &'a self,
        embedder: &'a Arc<dyn Embedder>,
        group: Vec<(usize, EmbeddingShape, Vec<String>)>,
        deadline: Option<Instant>,
    ) -> futures_util::future::BoxFuture<'a, Vec<(usize, Result<Value, ApiError>)>> {
        Box::pin(async move {
            // Nothing to embed (every request was refused before): no engine call, and no
            // bisecting an empty group forever.
            if group.is_empty() {
                return Vec::new();
            }
            let all: Vec<String> = group
                .iter()
                .flat_map(|(_, _, v)| v.iter().cloned())
                .collect();
            let max_tokens = self.limits.max_input_tokens;
            match run(embedder.clone(), max_tokens, &self.cost, all, deadline).await {
                Ok(out) => {
                    let mut embeddings = out.embeddings.into_iter();
                    let mut counts = out.token_counts.into_iter();
                    group
                        .into_iter()
                        .map(|(i, shape, inputs)| {
                            let n = inputs.len();
                            let e: Vec<Vec<f32>> = embeddings.by_ref().take(n).collect();
                            let c: Vec<usize> = counts.by_ref().take(n).collect();
                            (i, Ok(encode(&self.meta.id, shape, e, &c)))
                        })
                        .collect()
                }
                Err(e) if group.len() == 1 => vec![(group[0].0, Err(e))],
                // Out of time: no request is at fault, and splitting would not make time.
                Err(e) if e.code.as_deref() == Some(NOT_STARTED_CODE) => group
                    .into_iter()
                    .map(|(i, _, _)| (i, Err(e.clone())))
                    .collect(),
                Err(_) => {
                    let mut left = group;
                    let right = left.split_off(left.len() / 2);
                    let mut out = self.embed_group(embedder, left, deadline).await;
                    out.extend(self.embed_group(embedder, right, deadline).await);
                    out
                }
            }
        })
    }
}

/// Step 3, what needs the work's size: a job (with a `budget`) starts only if its estimated cost
/// fits before `deadline`; returns that estimate (zero without a budget). The token limit is not
/// checked here but by the engine, which counts the tokens, in [`run`].
fn limit(
    cost: &CostModel,
    window: usize,
    inputs: &[String],
    budget: Option<Duration>,
    deadline: Option<Instant>,
) -> Result<Duration, ApiError> {
    let Some(budget) = budget else {
        return Ok(Duration::ZERO);
    };
    // From the byte lengths, before tokenizing: at most one token per 2 bytes of text (English
    // averages about 4), at most the model's window per input, plus the special tokens.
    let tokens = inputs
        .iter()
        .map(|s| (s.len().div_ceil(2) + 2).min(window))
        .sum();
    let estimate = cost.embeddings(tokens);
    limits::admit(estimate, budget, deadline)?;
    Ok(estimate.unwrap_or_default())
}

/// Step 4: the embedder on the blocking pool, with `max_input_tokens` passed down (the engine
/// refuses a longer input as it counts it); the time taken feeds `cost`.
async fn run(
    embedder: Arc<dyn Embedder>,
    max_input_tokens: usize,
    cost: &CostModel,
    inputs: Vec<String>,
    deadline: Option<Instant>,
) -> Result<EmbedOutput, ApiError> {
    let t = Instant::now();
    let text_bytes: usize = inputs.iter().map(String::len).sum();
    // Forward passes are CPU-bound for milliseconds to seconds: run them on the blocking pool
    // so the runtime's executor (and the Lambda Runtime API client on it) stays responsive. A
    // panic in the engine comes back as a JoinError and becomes a 500, not a dead function.
    let out = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        embedder.embed_until(&refs, max_input_tokens, deadline)
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Internal, format!("embedding task failed: {e}")))?
    .map_err(|e| {
        if let EngineError::DeadlineReached { tokens_done } = e {
            // What was done still tells what the rest would cost.
            cost.observe_embed(t.elapsed(), tokens_done);
            trim_after(text_bytes, 0, tokens_done);
        }
        engine_error(e)
    })?;
    cost.observe_embed(t.elapsed(), out.token_counts.iter().sum());
    meter::record(|s| {
        s.input_tokens += out.token_counts.iter().sum::<usize>() as u64;
        s.engine += t.elapsed();
    });
    trim_after(
        text_bytes,
        out.embeddings.len(),
        out.token_counts.iter().sum(),
    );
    Ok(out)
}

/// Step 5: the OpenAI response for one request's embeddings, as `model`.
fn encode(
    model: &str,
    shape: EmbeddingShape,
    embeddings: Vec<Vec<f32>>,
    token_counts: &[usize],
) -> Value {
    let EmbeddingShape { dims, format } = shape;
    let total: usize = token_counts.iter().sum();
    let data: Vec<Value> = embeddings
        .into_iter()
        .enumerate()
        .map(|(index, mut v)| {
            if dims < v.len() {
                v.truncate(dims);
                l2_normalize(&mut v);
            }
            let embedding = match format {
                EncodingFormat::Float => Value::Array(v.iter().map(|&x| f32_json(x)).collect()),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    })
}

/// An f32 as a JSON number with the f32's shortest decimal form. Widening to f64 first would
/// print ~17 significant digits of which 9 are noise ("0.020110268145799637" for 0.020110268):
/// 40% more bytes on every response, and closer to Lambda's 6 MB limit.
pub(super) fn f32_json(x: f32) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    let mut buf = ryu::Buffer::new();
    let shortest = buf.format_finite(x);
    shortest
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ModelInfo, ModelKind};
    use crate::service::{ApiRequest, ApiResponse, Method, ModelMeta};

    /// A fake embedder (unit test of the service layer): zero-cost vectors of a real model's width.
    struct Wide(ModelInfo);

    impl Embedder for Wide {
        fn info(&self) -> &ModelInfo {
            &self.0
        }
        fn embed(&self, inputs: &[&str], _: usize) -> Result<EmbedOutput, EngineError> {
            Ok(EmbedOutput {
                embeddings: vec![vec![0.051; self.0.dimensions]; inputs.len()],
                token_counts: vec![3; inputs.len()],
            })
        }
    }

    fn service() -> Service {
        let info = ModelInfo {
            name: "wide".into(),
            architecture: "bert".into(),
            kind: ModelKind::Embedder,
            quantization: "q8_0".into(),
            dimensions: 384,
            max_seq_len: 256,
            details: Default::default(),
        };
        Service::new(
            Engine::Embedder(Arc::new(Wide(info))),
            Limits::default(),
            ModelMeta::default(),
        )
    }

    async fn post(s: &Service, body: Value) -> ApiResponse {
        s.handle(ApiRequest {
            method: Method::Post,
            path: "/v1/embeddings".into(),
            body: body.to_string().into_bytes(),
        })
        .await
    }

    #[tokio::test]
    async fn responses_lambda_cannot_deliver_are_refused_up_front() {
        let s = service();
        let inputs = vec!["x"; 2048];
        let r = post(&s, json!({ "input": inputs })).await;
        assert_eq!(r.status, 413, "{}", r.body);
        assert!(r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("base64"));

        // The same request in base64 fits, and really is under the limit.
        let r = post(&s, json!({ "input": inputs, "encoding_format": "base64" })).await;
        assert_eq!(r.status, 200);
        assert!(r.body.to_string().len() < MAX_RESPONSE_BYTES);

        // The largest float request the estimate lets through also fits.
        let ok = (1..=2048)
            .rev()
            .find(|&n| {
                let e = n as f64 * (384.0 * 14.0 + 64.0) + 256.0;
                e <= MAX_RESPONSE_BYTES as f64
            })
            .unwrap();
        let r = post(&s, json!({ "input": vec!["x"; ok] })).await;
        assert_eq!(r.status, 200);
        assert!(r.body.to_string().len() < MAX_RESPONSE_BYTES);
    }

    #[test]
    fn input_is_a_string_or_strings_and_token_arrays_are_named() {
        let read = |s: &str| {
            decode(s.as_bytes())
                .map(|r| r.input.0)
                .map_err(|e| e.message)
        };
        assert_eq!(read(r#"{"input": "a"}"#).unwrap(), ["a"]);
        assert_eq!(read(r#"{"input": ["a", "b"]}"#).unwrap(), ["a", "b"]);
        for bad in [r#"{"input": [[1, 2]]}"#, r#"{"input": ["a", 1]}"#] {
            let e = read(bad).unwrap_err();
            assert!(e.contains("token-id arrays are not supported"), "{e}");
        }
        let e = read(r#"{"input": 42}"#).unwrap_err();
        assert!(
            e.contains("expected a string or an array of strings"),
            "{e}"
        );
    }

    #[test]
    fn floats_print_at_f32_precision_and_round_trip() {
        for x in [0.020110268f32, -0.1688717, 1.0, 3.5e-8, -0.0] {
            let s = f32_json(x).to_string();
            assert!(s.len() <= 13, "{s}");
            assert_eq!(s.parse::<f32>().unwrap(), x);
        }
        assert_eq!(f32_json(f32::NAN), Value::Null);
    }
}
