//! Chat and completions through the service on the FAKE generator (tests/common): OpenAI shapes,
//! stop strings, max_tokens and its cap, seeds, the deadline, streaming (SSE chunks concatenate
//! to the non-streamed text) and the 4xx answers to bad bodies. The generation loop under the
//! fake is the engine's real one; model quality is the fidelity tests' business.

mod common;

use std::time::{Duration, Instant};

use lambda_inference::service::{
    ApiRequest, ApiResponse, CallOptions, Limits, Method, Reply, Service, Streaming,
    DEADLINE_MARGIN,
};
use serde_json::{json, Value};

use common::{fake_generator_service, fake_service, FAKE_REPLY};

fn service() -> Service {
    fake_generator_service(Limits::default(), Duration::ZERO)
}

fn req(path: &str, body: &Value) -> ApiRequest {
    ApiRequest {
        method: Method::Post,
        path: path.into(),
        body: body.to_string().into_bytes(),
    }
}

async fn chat(s: &Service, body: Value) -> ApiResponse {
    s.handle(req("/v1/chat/completions", &body)).await
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn content(r: &ApiResponse) -> &str {
    r.body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {}", r.body))
}

#[tokio::test]
async fn chat_answers_in_openai_shape_with_usage() {
    let s = service();
    let r = chat(&s, json!({"messages": user("hi"), "temperature": 0})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["object"], "chat.completion");
    assert!(r.body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r.body["model"], "fake-generator");
    assert_eq!(r.body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(content(&r), FAKE_REPLY);
    assert_eq!(r.body["choices"][0]["finish_reason"], "stop");
    // The fake's prompt is "<user>hi\n<assistant>", one token per byte.
    let prompt = "<user>hi\n<assistant>".len();
    assert_eq!(r.body["usage"]["prompt_tokens"], prompt);
    assert_eq!(r.body["usage"]["completion_tokens"], FAKE_REPLY.len());
    assert_eq!(r.body["usage"]["total_tokens"], prompt + FAKE_REPLY.len());

    let r = s
        .handle(req(
            "/v1/completions",
            &json!({"prompt": "Once", "temperature": 0, "max_tokens": 5}),
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["object"], "text_completion");
    assert_eq!(r.body["choices"][0]["text"], "Hello");
    assert_eq!(r.body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn max_tokens_stops_with_length_and_is_capped_by_max_new_tokens() {
    let s = service();
    let r = chat(
        &s,
        json!({"messages": user("hi"), "temperature": 0, "max_tokens": 5}),
    )
    .await;
    assert_eq!(content(&r), "Hello");
    assert_eq!(r.body["choices"][0]["finish_reason"], "length");
    assert_eq!(r.body["usage"]["completion_tokens"], 5);

    let capped = fake_generator_service(
        Limits {
            max_new_tokens: 10,
            ..Limits::default()
        },
        Duration::ZERO,
    );
    let r = chat(
        &capped,
        json!({"messages": user("hi"), "temperature": 0, "max_tokens": 1000}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["usage"]["completion_tokens"], 10);
    assert_eq!(content(&r), "Hello from");
    // No max_tokens: the cap is the default budget.
    let r = chat(&capped, json!({"messages": user("hi"), "temperature": 0})).await;
    assert_eq!(r.body["usage"]["completion_tokens"], 10);
}

#[tokio::test]
async fn stop_strings_end_the_answer_and_are_not_emitted() {
    let s = service();
    let r = chat(
        &s,
        json!({"messages": user("hi"), "temperature": 0, "stop": "STOP"}),
    )
    .await;
    assert_eq!(content(&r), "Hello from the fake model. Wir grüßen 🌍 und ");
    assert_eq!(r.body["choices"][0]["finish_reason"], "stop");
    // The first of several to appear wins; multi-byte stop strings work.
    let r = chat(
        &s,
        json!({"messages": user("hi"), "temperature": 0, "stop": ["STOP", "🌍", "never"]}),
    )
    .await;
    assert_eq!(content(&r), "Hello from the fake model. Wir grüßen ");
}

#[tokio::test]
async fn the_same_seed_gives_the_same_answer() {
    let s = service();
    let body = |seed: u64| json!({"messages": user("hi"), "temperature": 1.5, "seed": seed, "max_tokens": 40});
    let a = chat(&s, body(7)).await;
    let b = chat(&s, body(7)).await;
    let c = chat(&s, body(8)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(content(&a), content(&b));
    assert_ne!(content(&a), content(&c), "another seed samples differently");
    assert_ne!(
        content(&a),
        &FAKE_REPLY[..content(&a).len().min(FAKE_REPLY.len())]
    );
}

#[tokio::test]
async fn generation_stops_before_the_deadline_with_length() {
    let s = fake_generator_service(Limits::default(), Duration::from_millis(10));
    let deadline = Instant::now() + DEADLINE_MARGIN + Duration::from_millis(150);
    let opts = CallOptions {
        deadline: Some(deadline),
        streaming: Streaming::Unsupported("test"),
        budget: None,
    };
    let t = Instant::now();
    let Reply::Full(r) = s
        .handle_call(
            req(
                "/v1/chat/completions",
                &json!({"messages": user("hi"), "temperature": 0}),
            ),
            &opts,
        )
        .await
    else {
        panic!("a stream")
    };
    assert!(
        Instant::now() < deadline,
        "answered after the deadline ({:?})",
        t.elapsed()
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["choices"][0]["finish_reason"], "length");
    let n = r.body["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(n > 3 && n < FAKE_REPLY.len(), "{n} tokens");
    assert!(FAKE_REPLY.starts_with(content(&r)));
}

/// A deadline that leaves no time for the prompt: no empty 200, the embeddings' deadline error,
/// in the full answer and in a stream alike.
#[tokio::test]
async fn a_prompt_the_deadline_stops_gets_503_not_an_empty_answer() {
    let s = fake_generator_service(Limits::default(), Duration::from_millis(10));
    let body = json!({"messages": user("hi"), "temperature": 0});
    let opts = CallOptions {
        deadline: Some(Instant::now() + DEADLINE_MARGIN),
        streaming: Streaming::Unsupported("test"),
        budget: None,
    };
    let Reply::Full(r) = s
        .handle_call(req("/v1/chat/completions", &body), &opts)
        .await
    else {
        panic!("a stream")
    };
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(
        r.body["error"]["code"], "deadline_not_started",
        "{}",
        r.body
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shorter prompt"),
        "{}",
        r.body
    );
    let opts = CallOptions {
        streaming: Streaming::Supported,
        ..opts
    };
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let Reply::Stream(st) = s
        .handle_call(req("/v1/chat/completions", &streamed), &opts)
        .await
    else {
        panic!("not a stream")
    };
    let events = sse_events(&st.collect().await);
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "deadline_not_started", "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e["choices"][0]["finish_reason"].is_null()),
        "{events:?}"
    );
}

/// Parses an SSE body into its JSON events; checks the framing and the final `[DONE]`.
fn sse_events(body: &str) -> Vec<Value> {
    let frames: Vec<&str> = body.split("\n\n").filter(|f| !f.is_empty()).collect();
    assert_eq!(frames.last(), Some(&"data: [DONE]"), "{body}");
    frames[..frames.len() - 1]
        .iter()
        .map(|f| {
            let data = f
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("frame {f:?}"));
            serde_json::from_str(data).unwrap_or_else(|e| panic!("frame {f:?}: {e}"))
        })
        .collect()
}

async fn stream(s: &Service, path: &str, body: Value) -> Vec<Value> {
    let opts = CallOptions {
        deadline: None,
        streaming: Streaming::Supported,
        budget: None,
    };
    match s.handle_call(req(path, &body), &opts).await {
        Reply::Stream(st) => sse_events(&st.collect().await),
        Reply::Full(r) => panic!("not a stream: {} {}", r.status, r.body),
    }
}

#[tokio::test]
async fn streamed_chunks_are_openai_sse_and_concatenate_to_the_full_text() {
    let s = service();
    for stop in [json!(null), json!(["STOP"])] {
        let body = json!({"messages": user("hi"), "temperature": 0, "stop": stop});
        let full = chat(&s, body.clone()).await;
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        sbody["stream_options"] = json!({"include_usage": true});
        let events = stream(&s, "/v1/chat/completions", sbody).await;
        let id = events[0]["id"].as_str().unwrap().to_owned();
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        let mut text = String::new();
        let mut finish = None;
        for e in &events {
            assert_eq!(e["object"], "chat.completion.chunk", "{e}");
            assert_eq!(e["id"], id.as_str(), "one id for the whole stream");
            if let Some(c) = e["choices"].get(0) {
                text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
                if !c["finish_reason"].is_null() {
                    finish = Some(c["finish_reason"].clone());
                }
            }
        }
        assert!(events.len() > 5, "streamed in pieces, got {}", events.len());
        assert_eq!(text, content(&full));
        assert_eq!(
            Some(full.body["choices"][0]["finish_reason"].clone()),
            finish
        );
        let usage = &events.last().unwrap()["usage"];
        assert_eq!(
            usage, &full.body["usage"],
            "include_usage adds a last usage chunk"
        );
    }
    // Completions stream text_completion chunks.
    let events = stream(
        &s,
        "/v1/completions",
        json!({"prompt": "x", "temperature": 0, "max_tokens": 12, "stream": true}),
    )
    .await;
    let text: String = events
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(text, &FAKE_REPLY[..12]);
    assert!(events.iter().all(|e| e["object"] == "text_completion"));
}

#[tokio::test]
async fn streaming_where_the_route_cannot_is_a_clear_400() {
    let s = service();
    let r = chat(&s, json!({"messages": user("hi"), "stream": true})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "stream_unsupported");
    assert_eq!(r.body["error"]["param"], "stream");
}

#[tokio::test]
async fn bad_bodies_get_clear_4xx() {
    let s = service();
    let huge = "word ".repeat(220_000); // ~1.1 MB
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("/v1/chat/completions", json!({}), 400, "messages"),
        (
            "/v1/chat/completions",
            json!({"messages": []}),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": "hi"}),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            400,
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"content": "x"}]}),
            400,
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": 3}]}),
            400,
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "max_tokens": -1}),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "temperature": 2.5}),
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "temperature": -0.1}),
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "top_p": 0}),
            400,
            "top_p",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "n": 2}),
            400,
            "n",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "stop": ["a", "b", "c", "d", "e"]}),
            400,
            "stop",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "frequency_penalty": 3}),
            400,
            "frequency_penalty",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user(&huge)}),
            413,
            "messages",
        ),
        ("/v1/completions", json!({"prompt": huge}), 413, "prompt"),
        ("/v1/completions", json!({}), 400, "prompt"),
        ("/v1/completions", json!({"prompt": ""}), 400, "prompt"),
        (
            "/v1/completions",
            json!({"prompt": ["a", "b"]}),
            400,
            "prompt",
        ),
    ];
    for (path, body, status, param) in cases {
        let r = s.handle(req(path, &body)).await;
        let shown = body.to_string().chars().take(80).collect::<String>();
        assert_eq!(r.status, status, "{path} {shown}: {}", r.body);
        assert_eq!(
            r.body["error"]["param"], param,
            "{path} {shown}: {}",
            r.body
        );
        assert!(
            r.body["error"]["message"].as_str().unwrap().len() > 10,
            "a message a human can act on"
        );
    }
    // Not JSON, and a body over MAX_REQUEST_BYTES (refused before parsing).
    let r = s
        .handle(ApiRequest {
            method: Method::Post,
            path: "/v1/chat/completions".into(),
            body: b"{nope".to_vec(),
        })
        .await;
    assert_eq!(r.status, 400);
    let small = fake_generator_service(
        Limits {
            max_request_bytes: 1_000_000,
            ..Limits::default()
        },
        Duration::ZERO,
    );
    let r = chat(&small, json!({"messages": user(&huge)})).await;
    assert_eq!(r.status, 413);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("MAX_REQUEST_BYTES"));
}

#[tokio::test]
async fn each_kind_of_model_refuses_the_other_kinds_routes() {
    let r = service()
        .handle(req("/v1/embeddings", &json!({"input": "x"})))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["code"], "unsupported_for_model");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("embedding model"));
    let r = fake_service()
        .handle(req("/v1/chat/completions", &json!({"messages": user("x")})))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["code"], "unsupported_for_model");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("chat/generation model"));
}

/// Fields that would change what the answer means are refused with 400 naming the field (a
/// client that asked for a tool call or JSON mode must not get plain text and a 200); their "off"
/// values and harmless fields pass; any integral seed is a seed.
#[tokio::test]
async fn unsupported_openai_fields_are_refused_and_harmless_ones_pass() {
    let s = service();
    let base = || json!({"messages": user("hi"), "max_tokens": 4});
    let refused = [
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("tool_choice", json!("required")),
        ("functions", json!([{"name": "f"}])),
        ("response_format", json!({"type": "json_object"})),
        ("logprobs", json!(true)),
        ("top_logprobs", json!(3)),
        ("logit_bias", json!({"42": 5})),
    ];
    for (field, value) in refused {
        let mut b = base();
        b[field] = value;
        let r = chat(&s, b).await;
        assert_eq!(r.status, 400, "{field}: {}", r.body);
        assert_eq!(r.body["error"]["param"], field, "{}", r.body);
        assert_eq!(r.body["error"]["code"], "unsupported_parameter");
    }
    let passing = [
        ("tools", json!([])),
        ("tool_choice", json!("none")),
        ("response_format", json!({"type": "text"})),
        ("logprobs", json!(false)),
        ("user", json!("u-1")),
        ("metadata", json!({"k": "v"})),
        ("store", json!(false)),
        ("seed", json!(-0.0)),
        ("seed", json!(7.0)),
        ("seed", json!(-1)),
        ("top_p", json!(5e-324)),
    ];
    for (field, value) in passing {
        let mut b = base();
        b[field] = value.clone();
        let r = chat(&s, b).await;
        assert_eq!(r.status, 200, "{field}={value}: {}", r.body);
    }
    let mut b = base();
    b["seed"] = json!(1.5);
    assert_eq!(chat(&s, b).await.body["error"]["param"], "seed");
}

/// A prompt that cannot fit is refused from its byte length, before it is tokenized.
#[tokio::test]
async fn a_prompt_that_cannot_fit_is_refused_before_tokenizing() {
    let s = service();
    let t = Instant::now();
    let r = chat(&s, json!({"messages": user(&"1".repeat(5_000_000))})).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.body["error"]["param"], "messages");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}
