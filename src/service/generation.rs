//! `POST /v1/chat/completions` and `POST /v1/completions`: one request, answered whole or as
//! server-sent events. The steps, each a function of that name (as in `embeddings`): [`decode`]
//! the body, [`validate`] it (unsupported fields, sampling ranges, `stop`, `n`, `max_tokens`
//! capped at `MAX_NEW_TOKENS`, `stream` where the entry point can carry it), `limit` (render the
//! chat template, tokenize, refuse a prompt over `MAX_INPUT_TOKENS` or the context, cut
//! `max_tokens` to the room left, admit a job against its time budget), `run` the generator on
//! the blocking pool (`run_stream` for SSE), `encode` OpenAI's completion or chunk.
//!
//! This module must not sample or decode tokens itself (the engine's generation loop does), nor
//! know which entry point a request came from beyond [`CallOptions`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    engine_error, limits, meter, not_started, parse_body, trim_after, ApiResponse, CallOptions,
    CostModel, Limits, Reply, Service, SseStream, Streaming, DEADLINE_MARGIN,
};
use crate::api::routes;
use crate::engine::{
    ChatMessage, Engine, FinishReason, GenerateOutput, GenerateParams, Generator, SamplingParams,
};
use crate::error::{ApiError, ErrorKind};

impl Service {
    fn generator(&self, route: Route) -> Result<&Arc<dyn Generator>, ApiError> {
        match &self.engine {
            Engine::Generator(g) => Ok(g),
            Engine::Embedder(_) | Engine::Reranker(_) => Err(self.wrong_kind(route.path())),
        }
    }

    /// `POST /v1/chat/completions` and `POST /v1/completions`.
    pub(super) async fn generate(
        &self,
        route: Route,
        body: &[u8],
        opts: &CallOptions,
    ) -> Result<Reply, ApiError> {
        let gen = self.generator(route)?.clone();
        let v = validate(route, decode(body)?, &self.limits, opts.streaming)?;
        // The deadline with room to encode and send the answer (and for Lambda to take it).
        let deadline = opts
            .deadline
            .map(|d| d.checked_sub(DEADLINE_MARGIN).unwrap_or(d));
        let (prompt, max_tokens) =
            limit(&gen, &v, self.limits, &self.cost, opts.budget, deadline).await?;
        let params = GenerateParams {
            // Never past the context window: the prompt fits (checked), the answer is cut.
            max_tokens,
            sampling: v.sampling.clone(),
            stop: v.stop.clone(),
            deadline,
            cancel: None,
            prefill_per_token: self.cost.prefill_per_token(),
        };
        let head = ResponseHead {
            id: response_id(route),
            created: unix_now(),
            model: self.meta.id.clone(),
            route,
        };
        if v.stream {
            return Ok(Reply::Stream(run_stream(
                gen,
                prompt,
                params,
                head,
                v.include_usage,
            )));
        }
        let out = run(gen, prompt, params, &self.cost, opts.budget.is_some()).await?;
        Ok(Reply::Full(ApiResponse::ok(head.encode(&out))))
    }
}

/// Step 3, what needs the work's size: the prompt's token ids (rendered and tokenized off the
/// executor, refused over the token limit), `max_tokens` cut to the context left after them, and
/// for a job (with a `budget`) whether its estimated cost fits before `deadline`.
async fn limit(
    gen: &Arc<dyn Generator>,
    v: &Validated,
    limits: Limits,
    cost: &CostModel,
    budget: Option<Duration>,
    deadline: Option<Instant>,
) -> Result<(Vec<u32>, usize), ApiError> {
    // Template rendering and tokenization are CPU work proportional to the input (a 1 MB
    // prompt takes a while): off the executor, like the forward passes.
    let g = gen.clone();
    let prompt_src = v.prompt.clone();
    let prompt = tokio::task::spawn_blocking(move || prompt_ids(&*g, &prompt_src, &limits))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("prompt task failed: {e}")))??;
    let ctx = gen.info().max_seq_len;
    let max_tokens = v.max_tokens.min(ctx.saturating_sub(prompt.len()));
    if let Some(budget) = budget {
        limits::admit(cost.generation(prompt.len(), max_tokens), budget, deadline)?;
    }
    Ok((prompt, max_tokens))
}

/// Step 4, for a whole answer: the generator on the blocking pool; the time taken feeds `cost`.
/// For a `job` a generation the deadline stopped is not a result: it answers [`not_started`].
async fn run(
    gen: Arc<dyn Generator>,
    prompt: Vec<u32>,
    params: GenerateParams,
    cost: &CostModel,
    job: bool,
) -> Result<GenerateOutput, ApiError> {
    // Generation is CPU-bound for up to the function's timeout: the blocking pool keeps the
    // executor (and the Runtime API client on it) responsive. A panic becomes a 500.
    let out = tokio::task::spawn_blocking(move || gen.generate(&prompt, &params, &mut |_| {}))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("generation task failed: {e}")))?
        .map_err(engine_error)?;
    trim_after(0, 0, out.prompt_tokens);
    cost.observe_prefill(out.prefill, out.prompt_tokens);
    cost.observe_decode(out.decode, out.token_ids.len().saturating_sub(1));
    // With a budget (a job), or with no answer, a deadline stop is counted by `not_started`.
    let unanswered = unanswered(&out).filter(|_| !job);
    meter::record(|s| count_generation(s, &out, !job && unanswered.is_none()));
    if let Some(why) = unanswered {
        return Err(not_started(&why));
    }
    if job && out.hit_deadline {
        // A job must finish: a partial answer is not its result. Handed back, it runs again
        // in a fresh invocation, planned with the rates this run has just measured.
        return Err(not_started(
            "the invocation's deadline stopped this generation before it finished",
        ));
    }
    Ok(out)
}

/// The two generation routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Chat,
    Completions,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::Chat => routes::CHAT_COMPLETIONS,
            Route::Completions => routes::COMPLETIONS,
        }
    }
}

/// `POST /v1/chat/completions` and `/v1/completions` bodies (OpenAI), one struct: the routes
/// differ in `messages` vs `prompt`. Loosely typed where OpenAI accepts several shapes, so
/// that validation can say exactly what is wrong.
#[derive(Debug, Deserialize)]
struct GenerationRequest {
    #[serde(default)]
    messages: Option<Value>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)] // accepted for OpenAI compatibility; the loaded model answers
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<i64>,
    /// Any JSON number: `-0` and `42.0` are integers to a JavaScript client.
    #[serde(default)]
    seed: Option<serde_json::Number>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<Value>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    repetition_penalty: Option<f64>,
    #[serde(default)]
    n: Option<i64>,
    /// OpenAI fields that change what the answer means. None is implemented: a client that
    /// asked for a tool call or JSON mode must hear so, not get plain text and a 200. Read
    /// loosely (any JSON) so that the 400 names the field whatever its shape.
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    logit_bias: Option<Value>,
    #[serde(default)]
    echo: Option<Value>,
    #[serde(default)]
    best_of: Option<Value>,
    #[serde(default)]
    suffix: Option<Value>,
    #[serde(default)]
    modalities: Option<Value>,
    #[serde(default)]
    audio: Option<Value>,
}

impl GenerationRequest {
    /// The first field set to something this function cannot honour, with why. Absent, `null`
    /// and the values that mean "off" (`tools: []`, `tool_choice: "none"`, `logprobs: false`,
    /// `response_format: {"type": "text"}`, ...) pass.
    fn unsupported(&self) -> Option<(&'static str, &'static str)> {
        let off = |v: &Option<Value>, offs: &[Value]| match v {
            None | Some(Value::Null) => true,
            Some(x) => offs.contains(x),
        };
        let empty = |v: &Option<Value>| match v {
            None | Some(Value::Null) => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(Value::String(s)) => s.is_empty(),
            _ => false,
        };
        let text_format = json!({"type": "text"});
        let checks: [(&'static str, bool, &'static str); 13] = [
            (
                "tools",
                empty(&self.tools),
                "tool calling is not supported by this function",
            ),
            (
                "tool_choice",
                off(&self.tool_choice, &[json!("none"), json!("auto")]),
                "tool calling is not supported by this function",
            ),
            (
                "functions",
                empty(&self.functions),
                "function calling is not supported by this function",
            ),
            (
                "function_call",
                off(&self.function_call, &[json!("none"), json!("auto")]),
                "function calling is not supported by this function",
            ),
            (
                "response_format",
                off(&self.response_format, &[text_format]),
                "only response_format {\"type\": \"text\"} is supported (no JSON mode or schema)",
            ),
            (
                "logprobs",
                off(&self.logprobs, &[json!(false), json!(0)]),
                "logprobs are not returned by this function",
            ),
            (
                "top_logprobs",
                off(&self.top_logprobs, &[json!(0)]),
                "logprobs are not returned by this function",
            ),
            (
                "logit_bias",
                empty(&self.logit_bias),
                "logit_bias is not supported by this function",
            ),
            (
                "echo",
                off(&self.echo, &[json!(false)]),
                "echo is not supported by this function",
            ),
            (
                "best_of",
                off(&self.best_of, &[json!(1)]),
                "only best_of=1 is supported",
            ),
            (
                "suffix",
                empty(&self.suffix),
                "suffix (insertion) is not supported by this function",
            ),
            (
                "modalities",
                off(&self.modalities, &[json!(["text"])]),
                "only text output is supported",
            ),
            ("audio", empty(&self.audio), "audio output is not supported"),
        ];
        checks
            .into_iter()
            .find(|(_, ok, _)| !ok)
            .map(|(field, _, why)| (field, why))
    }
}

/// Where the prompt text comes from.
#[derive(Debug, Clone)]
enum PromptSource {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// A validated generation request.
#[derive(Debug)]
struct Validated {
    prompt: PromptSource,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn invalid(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidValue, msg).with_param(param)
}

/// Step 1: the body as a generation request (400 for bad JSON, 422 for a wrong shape).
fn decode(body: &[u8]) -> Result<GenerationRequest, ApiError> {
    parse_body(body)
}

/// Step 2: everything that can be refused from the request alone, before tokenizing; `streaming`:
/// whether the entry point can carry `stream: true`.
fn validate(
    route: Route,
    r: GenerationRequest,
    limits: &Limits,
    streaming: Streaming,
) -> Result<Validated, ApiError> {
    if let Some((field, why)) = r.unsupported() {
        return Err(ApiError::new(
            ErrorKind::InvalidValue,
            format!("{field}: {why}; remove the field (or send its default) to get a plain answer"),
        )
        .with_param(field)
        .with_code("unsupported_parameter"));
    }
    let prompt = match route {
        Route::Chat => PromptSource::Chat(messages(r.messages)?),
        Route::Completions => PromptSource::Text(prompt_text(r.prompt)?),
    };
    let max_tokens = match r.max_completion_tokens.or(r.max_tokens) {
        None => limits.max_new_tokens,
        Some(n) if n < 1 => {
            return Err(invalid(
                "max_tokens",
                format!("max_tokens must be at least 1, got {n}"),
            ))
        }
        // Capped, not refused: MAX_NEW_TOKENS is this deployment's budget, not the client's.
        Some(n) => (n as u64).min(limits.max_new_tokens as u64) as usize,
    };
    let range = |name: &str, v: Option<f64>, lo: f64, hi: f64, default: f64| {
        let x = v.unwrap_or(default);
        if !(lo..=hi).contains(&x) || !x.is_finite() {
            Err(invalid(
                name,
                format!("{name} must be between {lo} and {hi}, got {x}"),
            ))
        } else {
            Ok(x as f32)
        }
    };
    let temperature = range("temperature", r.temperature, 0.0, 2.0, 1.0)?;
    let top_p = range("top_p", r.top_p, 0.0, 1.0, 1.0)?;
    if r.top_p.is_some_and(|p| p <= 0.0) {
        return Err(invalid("top_p", "top_p must be greater than 0"));
    }
    // A positive f64 below f32's range (5e-324) still means "only the most likely token".
    let top_p = top_p.max(f32::MIN_POSITIVE);
    let frequency_penalty = range("frequency_penalty", r.frequency_penalty, -2.0, 2.0, 0.0)?;
    let presence_penalty = range("presence_penalty", r.presence_penalty, -2.0, 2.0, 0.0)?;
    let repetition_penalty = range("repetition_penalty", r.repetition_penalty, 0.01, 10.0, 1.0)?;
    let top_k = match r.top_k {
        None => 0,
        Some(k) if k < 0 => {
            return Err(invalid(
                "top_k",
                format!("top_k must be 0 (off) or more, got {k}"),
            ))
        }
        Some(k) => k as usize,
    };
    if let Some(n) = r.n.filter(|&n| n != 1) {
        return Err(invalid("n", format!("only n=1 is supported, got {n}")));
    }
    let stop = match r.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|s| match s {
                Value::String(s) => Ok(s),
                _ => Err(invalid(
                    "stop",
                    "stop must be a string or an array of strings",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(invalid(
                "stop",
                "stop must be a string or an array of strings",
            ))
        }
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(invalid("stop", "stop takes at most 4 non-empty strings"));
    }
    let include_usage = r
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // No seed: a fresh one per request (OpenAI's behaviour), so sampling varies between calls.
    let seed = match &r.seed {
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        Some(n) => seed_value(n).ok_or_else(|| {
            invalid(
                "seed",
                format!("seed must be an integer between -2^63 and 2^64-1, got {n}"),
            )
        })?,
    };
    let stream = r.stream.unwrap_or(false);
    if stream {
        if let Streaming::Unsupported(why) = streaming {
            return Err(ApiError::new(
                ErrorKind::InvalidValue,
                format!("stream=true is not possible here: {why}; send stream=false"),
            )
            .with_param("stream")
            .with_code("stream_unsupported"));
        }
    }
    Ok(Validated {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
        },
        stop,
        stream,
        include_usage,
    })
}

/// A seed as any integral JSON number (`42`, `-1`, `-0`, `7.0`): negative ones wrap, as the
/// i64 -> u64 cast always did.
fn seed_value(n: &serde_json::Number) -> Option<u64> {
    if let Some(u) = n.as_u64() {
        return Some(u);
    }
    if let Some(i) = n.as_i64() {
        return Some(i as u64);
    }
    let f = n.as_f64()?;
    (f.fract() == 0.0 && f >= -(2f64.powi(63)) && f < 2f64.powi(64)).then_some(if f < 0.0 {
        f as i64 as u64
    } else {
        f as u64
    })
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

fn messages(v: Option<Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(v) = v else {
        return Err(invalid(
            "messages",
            "messages is required: [{\"role\": \"user\", \"content\": \"...\"}]",
        ));
    };
    let Value::Array(items) = v else {
        return Err(invalid(
            "messages",
            "messages must be an array of {role, content} objects",
        ));
    };
    if items.is_empty() {
        return Err(invalid("messages", "messages must not be empty"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
            if !ROLES.contains(&role) {
                return Err(invalid(
                    &format!("messages[{i}].role"),
                    format!("messages[{i}].role must be one of system, user, assistant; got {:?}", m.get("role").cloned().unwrap_or(Value::Null)),
                ));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                // OpenAI's content parts: only text parts can reach a text model.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(invalid(
                            &format!("messages[{i}].content"),
                            format!("messages[{i}].content: only {{\"type\": \"text\", \"text\": ...}} parts are supported"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                _ => {
                    return Err(invalid(
                        &format!("messages[{i}].content"),
                        format!("messages[{i}].content must be a string"),
                    ))
                }
            };
            Ok(ChatMessage {
                role: role.to_owned(),
                content,
            })
        })
        .collect()
}

fn prompt_text(v: Option<Value>) -> Result<String, ApiError> {
    let s =
        match v {
            Some(Value::String(s)) => s,
            Some(Value::Array(mut a)) if a.len() == 1 && a[0].is_string() => match a.remove(0) {
                Value::String(s) => s,
                _ => unreachable!("checked is_string"),
            },
            Some(Value::Array(_)) => return Err(invalid(
                "prompt",
                "prompt must be one string (batches of prompts and token arrays are not supported)",
            )),
            None => return Err(invalid("prompt", "prompt is required")),
            Some(_) => return Err(invalid("prompt", "prompt must be a string")),
        };
    if s.is_empty() {
        return Err(invalid("prompt", "prompt must not be empty"));
    }
    Ok(s)
}

/// The prompt's token ids (chat template, then tokenization), refused over the token limit:
/// `MAX_INPUT_TOKENS`, or the model's context less the one token the answer needs. The service
/// counts here because the generator can only tokenize a whole text (see the service's module
/// doc). Blocking.
fn prompt_ids(
    gen: &dyn Generator,
    src: &PromptSource,
    limits: &Limits,
) -> Result<Vec<u32>, ApiError> {
    let (text, param) = match src {
        PromptSource::Chat(m) => (gen.render_chat(m).map_err(engine_error)?, "messages"),
        PromptSource::Text(t) => (t.clone(), "prompt"),
    };
    let ctx = gen.info().max_seq_len;
    let limit = limits.max_input_tokens.min(ctx.saturating_sub(1));
    let which = if limit == limits.max_input_tokens {
        "MAX_INPUT_TOKENS"
    } else {
        "the model's context length"
    };
    // Conclusive from the length alone: no token covers more than max_token_bytes bytes.
    let at_least = text.len() / gen.max_token_bytes().max(1);
    if at_least > limit {
        return Err(limits::too_many_tokens(
            param,
            format!(
                "the prompt is {} bytes, at least {at_least} tokens for this model",
                text.len()
            ),
            limit,
            which,
        ));
    }
    let ids = gen.tokenize(&text).map_err(engine_error);
    let text_bytes = text.len();
    drop(text);
    trim_after(text_bytes, 0, 0);
    let ids = ids?;
    if ids.len() > limit {
        return Err(limits::too_many_tokens(
            param,
            format!("the prompt has {} tokens", ids.len()),
            limit,
            which,
        ));
    }
    if ids.is_empty() {
        return Err(invalid(param, "the prompt has no tokens"));
    }
    Ok(ids)
}

/// What every response and chunk of one generation shares.
#[derive(Debug, Clone)]
struct ResponseHead {
    id: String,
    created: u64,
    model: String,
    route: Route,
}

impl ResponseHead {
    fn usage(out: &GenerateOutput) -> Value {
        json!({
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.token_ids.len(),
            "total_tokens": out.prompt_tokens + out.token_ids.len(),
        })
    }

    /// Step 5, for a whole answer: OpenAI's `chat.completion` or `text_completion`.
    fn encode(&self, out: &GenerateOutput) -> Value {
        let choice = match self.route {
            Route::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": null,
                "finish_reason": out.finish_reason,
            }),
            Route::Completions => json!({
                "index": 0, "text": out.text, "logprobs": null, "finish_reason": out.finish_reason,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.route { Route::Chat => "chat.completion", Route::Completions => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": Self::usage(out),
        })
    }

    /// Step 5, for a stream: one chunk, a text delta and/or the finish reason.
    fn encode_chunk(&self, text: Option<&str>, role: bool, finish: Option<FinishReason>) -> Value {
        let choice = match self.route {
            Route::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Route::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": match self.route { Route::Chat => "chat.completion.chunk", Route::Completions => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// Step 4, for a stream: starts generation on the blocking pool, sending each text delta as an
/// SSE event.
fn run_stream(
    gen: Arc<dyn Generator>,
    prompt: Vec<u32>,
    mut params: GenerateParams,
    head: ResponseHead,
    include_usage: bool,
) -> SseStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    // The call returns before the generation ends: the meter goes along with the task and with
    // the stream, and the entry point's record is written when both have let go of it (after the
    // last event is produced and taken).
    let meter = meter::current();
    let held = meter.clone();
    tokio::task::spawn_blocking(move || {
        if head.route == Route::Chat {
            let _ = tx.blocking_send(sse(&head.encode_chunk(Some(""), true, None)));
        }
        // A client that went away closes the channel: cancel at the next token instead of
        // generating into the void.
        let cancel = Arc::new(AtomicBool::new(false));
        params.cancel = Some(cancel.clone());
        let res = gen.generate(&prompt, &params, &mut |t: &str| {
            if tx
                .blocking_send(sse(&head.encode_chunk(Some(t), false, None)))
                .is_err()
            {
                cancel.store(true, Ordering::Relaxed);
            }
        });
        if let Ok(out) = &res {
            trim_after(0, 0, out.prompt_tokens);
        }
        match res {
            Ok(out) if unanswered(&out).is_some() => {
                if let Some(m) = &meter {
                    m.update(|s| count_generation(s, &out, true));
                }
                let why = unanswered(&out).unwrap_or_default();
                let e =
                    ApiError::new(ErrorKind::Unavailable, why).with_code(limits::NOT_STARTED_CODE);
                let _ = tx.blocking_send(sse(&e.to_body()));
            }
            Ok(out) => {
                if let Some(m) = &meter {
                    m.update(|s| count_generation(s, &out, true));
                }
                let _ = tx.blocking_send(sse(&head.encode_chunk(
                    None,
                    false,
                    Some(out.finish_reason),
                )));
                if include_usage {
                    let mut u = head.encode_chunk(None, false, None);
                    u["choices"] = json!([]);
                    u["usage"] = ResponseHead::usage(&out);
                    let _ = tx.blocking_send(sse(&u));
                }
            }
            // Headers are already sent: the error travels as an event, as OpenAI does.
            Err(e) => {
                let _ = tx.blocking_send(sse(&engine_error(e).to_body()));
            }
        }
        let _ = tx.blocking_send("data: [DONE]\n\n".to_owned());
    });
    SseStream::new(rx, held)
}

/// Why a request (not a job: see [`run`]) has no answer to give, when the deadline stopped it
/// before its prompt was read: then it gets the embeddings' deadline error (503
/// `deadline_not_started`), not an empty 200.
fn unanswered(out: &GenerateOutput) -> Option<String> {
    (out.hit_deadline && out.token_ids.is_empty()).then(|| {
        format!(
            "the deadline came before the prompt's {} tokens were read; send a shorter prompt \
             or give the function a longer timeout",
            out.prompt_tokens
        )
    })
}

/// A finished generation's counts; `deadline_stop`: whether a deadline stop counts here (not for
/// jobs, where [`not_started`] counts it).
fn count_generation(s: &mut meter::CallStats, out: &GenerateOutput, deadline_stop: bool) {
    s.input_tokens += out.prompt_tokens as u64;
    s.output_tokens += out.token_ids.len() as u64;
    s.engine += out.prefill + out.decode;
    if deadline_stop && out.hit_deadline {
        s.deadline_stops += 1;
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `chatcmpl-…` / `cmpl-…`: unique per process (time + counter), no RNG needed.
fn response_id(route: Route) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let prefix = match route {
        Route::Chat => "chatcmpl",
        Route::Completions => "cmpl",
    };
    format!("{prefix}-{t:x}{n:04x}")
}
