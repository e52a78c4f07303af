//! docs/openapi.json against the code: it is OpenAPI 3.1, documents exactly the routes the
//! service routes (`service::ROUTES`), every `$ref` resolves, `GET /openapi.json` serves it, and
//! what the service really answers (on the fake embedder and the FAKE generator of
//! tests/common, and fake job ports) has a documented status on its route and matches the
//! documented schema: embeddings (float, base64, dimensions), chat and completions (JSON and
//! every streamed chunk), models, health, jobs (202, pending, 409), and the error bodies
//! (400, 404, 409, 413, 422). The request examples in the document are also checked against
//! their request schemas, and answered 200 by the service.
//!
//! JSON Schema is checked by the small validator below: the keywords the document uses
//! (`$ref`, `type`, `const`, `enum`, `properties`, `required`, `additionalProperties: false`,
//! `items`, `minItems`/`maxItems`, `minLength`/`maxLength`, `maxProperties`, `minimum`/
//! `maximum`/`exclusiveMinimum`, `anyOf`, `oneOf`, `not`); `pattern` is checked only for the
//! forms it takes there (`^prefix`, `\S`), other patterns are skipped. schemathesis
//! (scripts/schemathesis) checks the document against the real server with a full validator.

mod common;
use common::FakeQueue;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use lambda_inference::jobs::{JobId, JobPorts, JobQueue, ResultStore};
use lambda_inference::service::{
    ApiRequest, CallOptions, Limits, Method, Reply, Service, Streaming, ROUTES,
};
use serde_json::{json, Value};

fn doc() -> Value {
    let raw = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
        .expect("docs/openapi.json");
    serde_json::from_str(&raw).expect("docs/openapi.json is JSON")
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Follows a local `$ref` (`#/components/...`), repeatedly.
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let ptr = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local $ref {r}"));
        v = doc
            .pointer(ptr)
            .unwrap_or_else(|| panic!("$ref {r} does not resolve"));
    }
    v
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// JSON equality with numbers compared by value (JSON Schema's `const`/`enum`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Errors of `v` against `schema` (empty: valid), with JSON pointers to where.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let s = resolve(doc, schema);
    let Some(s) = s.as_object() else {
        if s == &Value::Bool(false) {
            errs.push(format!("{at}: false schema"));
        }
        return;
    };
    let mut fail = |m: String| errs.push(format!("{at}: {m} (value {v})"));
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(t) => vec![t.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => panic!("bad type {t}"),
        };
        let vt = json_type(v);
        if !types
            .iter()
            .any(|&t| t == vt || (t == "number" && vt == "integer"))
        {
            fail(format!("type {vt}, expected {types:?}"));
            return;
        }
    }
    if let Some(c) = s.get("const") {
        if !json_eq(c, v) {
            fail(format!("expected const {c}"));
        }
    }
    if let Some(Value::Array(e)) = s.get("enum") {
        if !e.iter().any(|x| json_eq(x, v)) {
            fail(format!("not one of {e:?}"));
        }
    }
    if let Some(n) = v.as_f64().filter(|_| v.is_number()) {
        let num = |k: &str| s.get(k).and_then(Value::as_f64);
        if num("minimum").is_some_and(|m| n < m)
            || num("maximum").is_some_and(|m| n > m)
            || num("exclusiveMinimum").is_some_and(|m| n <= m)
        {
            fail("out of range".into());
        }
    }
    if let Some(text) = v.as_str() {
        let chars = text.chars().count() as u64;
        if s.get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|m| chars < m)
            || s.get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| chars > m)
        {
            fail("length out of range".into());
        }
        if let Some(p) = s.get("pattern").and_then(Value::as_str) {
            let ok = if p == "\\S" {
                text.chars().any(|c| !c.is_whitespace())
            } else if let Some(prefix) = p
                .strip_prefix('^')
                .filter(|r| r.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            {
                text.starts_with(prefix)
            } else {
                true // not checked here
            };
            if !ok {
                fail(format!("does not match {p}"));
            }
        }
    }
    if let Some(a) = v.as_array() {
        if s.get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| (a.len() as u64) < m)
            || s.get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| (a.len() as u64) > m)
        {
            fail(format!("{} items out of range", a.len()));
        }
        if let Some(items) = s.get("items") {
            for (i, x) in a.iter().enumerate() {
                validate(doc, items, x, &format!("{at}/{i}"), errs);
            }
        }
    }
    if let Some(o) = v.as_object() {
        if let Some(Value::Array(req)) = s.get("required") {
            for k in req.iter().filter_map(Value::as_str) {
                if !o.contains_key(k) {
                    errs.push(format!("{at}: missing required {k:?} (value {v})"));
                }
            }
        }
        if s.get("maxProperties")
            .and_then(Value::as_u64)
            .is_some_and(|m| o.len() as u64 > m)
        {
            errs.push(format!("{at}: too many properties"));
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(doc, ps, x, &format!("{at}/{k}"), errs),
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errs.push(format!("{at}: property {k:?} not allowed"))
                }
                None => {}
            }
        }
    }
    let passes = |sub: &Value| {
        let mut e = Vec::new();
        validate(doc, sub, v, at, &mut e);
        e.is_empty()
    };
    if let Some(Value::Array(any)) = s.get("anyOf") {
        if !any.iter().any(passes) {
            errs.push(format!("{at}: matches none of anyOf (value {v})"));
        }
    }
    if let Some(Value::Array(one)) = s.get("oneOf") {
        let n = one.iter().filter(|x| passes(x)).count();
        if n != 1 {
            errs.push(format!("{at}: matches {n} of oneOf (value {v})"));
        }
    }
    if let Some(not) = s.get("not") {
        if passes(not) {
            errs.push(format!("{at}: matches `not` (value {v})"));
        }
    }
}

fn assert_valid(doc: &Value, schema: &Value, v: &Value, what: &str) {
    let mut errs = Vec::new();
    validate(doc, schema, v, "", &mut errs);
    assert!(errs.is_empty(), "{what}:\n{}", errs.join("\n"));
}

/// The operation documented for `method` on `template`.
fn operation<'a>(doc: &'a Value, method: &str, template: &str) -> &'a Value {
    doc["paths"]
        .get(template)
        .and_then(|p| p.get(method.to_ascii_lowercase()))
        .unwrap_or_else(|| panic!("{method} {template} is not documented"))
}

/// The documented response schema for `status` and `content_type` of an operation.
fn response_schema<'a>(
    doc: &'a Value,
    method: &str,
    template: &str,
    status: u16,
    content_type: &str,
) -> &'a Value {
    let op = operation(doc, method, template);
    let r = op["responses"]
        .get(status.to_string())
        .unwrap_or_else(|| panic!("{method} {template} answers {status}, which is not documented"));
    let r = resolve(doc, r);
    r["content"]
        .get(content_type)
        .map(|c| &c["schema"])
        .unwrap_or_else(|| {
            panic!("{method} {template} {status}: no {content_type} content documented")
        })
}

/// Sends one request and checks the answer against the document; returns status and body.
async fn check(
    doc: &Value,
    svc: &Service,
    method: &str,
    template: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let req = ApiRequest {
        method: Method::parse(method),
        path: path.into(),
        body: body.map_or(Vec::new(), |b| b.to_string().into_bytes()),
    };
    let r = svc.handle(req).await;
    let schema = response_schema(doc, method, template, r.status, "application/json");
    assert_valid(
        doc,
        schema,
        &r.body,
        &format!("{method} {path} -> {}", r.status),
    );
    (r.status, r.body)
}

#[test]
fn the_document_is_openapi_3_1_with_resolvable_refs() {
    let doc = doc();
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")),
        "{}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    // Every $ref anywhere resolves.
    fn walk(doc: &Value, v: &Value) {
        match v {
            Value::Object(o) => {
                if o.contains_key("$ref") {
                    resolve(doc, v);
                }
                o.values().for_each(|x| walk(doc, x));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(doc, x)),
            _ => {}
        }
    }
    walk(&doc, &doc);
    // Every operation has an id, a success answer, and Error bodies for every error status.
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            assert!(op["operationId"].is_string(), "{method} {template}");
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{method} {template}: no 2xx"
            );
            for (status, r) in responses {
                if status.starts_with('2') {
                    continue;
                }
                let schema = &resolve(&doc, r)["content"]["application/json"]["schema"];
                assert_eq!(
                    schema["$ref"], "#/components/schemas/Error",
                    "{method} {template} {status}"
                );
            }
        }
    }
    // Path parameters are declared for every {param} of the template.
    for (template, item) in doc["paths"].as_object().unwrap() {
        for seg in template.split('/').filter(|s| s.starts_with('{')) {
            let name = seg.trim_matches(['{', '}']);
            for (method, op) in item.as_object().unwrap() {
                let declared = op["parameters"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p["name"] == name && p["in"] == "path" && p["required"] == true)
                });
                assert!(declared, "{method} {template}: path parameter {name}");
            }
        }
    }
}

#[test]
fn every_route_is_documented_and_nothing_else() {
    let doc = doc();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|m| METHODS.contains(&m.as_str()))
                .map(|m| (m.to_ascii_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|&(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    assert_eq!(
        routed.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routed but not documented"
    );
    assert_eq!(
        documented.difference(&routed).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented but not routed"
    );
}

#[tokio::test]
async fn the_service_serves_the_document() {
    let doc = doc();
    let svc = common::fake_service();
    let (status, body) = check(&doc, &svc, "GET", "/openapi.json", "/openapi.json", None).await;
    assert_eq!(status, 200);
    assert_eq!(body, doc);
}

#[tokio::test]
async fn embedder_answers_match_the_document() {
    let doc = doc();
    let svc = common::fake_service();
    let post = |body: Value| {
        check(
            &doc,
            &svc,
            "POST",
            "/v1/embeddings",
            "/v1/embeddings",
            Some(body),
        )
    };

    let example = operation(&doc, "post", "/v1/embeddings")["requestBody"]["content"]
        ["application/json"]["schema"]
        .clone();
    let req_schema = resolve(&doc, &example).clone();
    let ex = req_schema["example"].clone();
    assert_valid(&doc, &req_schema, &ex, "request example");
    assert_eq!(post(ex).await.0, 200);

    for body in [
        json!({"input": "hello"}),
        json!({"input": ["a", "b"], "encoding_format": "base64"}),
        json!({"input": ["a"], "dimensions": 4, "model": "x", "user": "u"}),
    ] {
        assert_valid(&doc, &req_schema, &body, "request");
        assert_eq!(post(body).await.0, 200);
    }
    // Every error the route documents for bad bodies, each answered in the Error shape.
    // `outside`: the request schema already excludes it (the others depend on the model or
    // the limits: the schema cannot know the width or MAX_INPUT_TOKENS).
    for (body, status, outside) in [
        (json!({"input": []}), 400, true),
        (json!({"input": ["ok", "  "]}), 400, true),
        (json!({"input": "x", "dimensions": 0}), 400, true),
        (
            json!({"input": "x", "dimensions": common::DIMS + 1}),
            400,
            false,
        ),
        (json!({"input": 3}), 422, true),
        (json!({"input": [[1, 2]]}), 422, true),
        (json!({"input": "x", "encoding_format": "int8"}), 422, true),
        (json!({"input": "x", "dimensions": -1}), 422, true),
        (json!({"text": "x"}), 422, true),
        (json!(["x"]), 422, true),
        (
            json!({"input": "word ".repeat(common::MAX_INPUT_TOKENS)}),
            413,
            false,
        ),
    ] {
        if outside {
            assert_valid(
                &doc,
                &json!({"not": req_schema.clone()}),
                &body,
                "a refused body is outside the request schema",
            );
        }
        assert_eq!(post(body.clone()).await.0, status, "{body}");
    }
    let raw = svc
        .handle(ApiRequest {
            method: Method::Post,
            path: "/v1/embeddings".into(),
            body: b"{not json".to_vec(),
        })
        .await;
    assert_eq!(raw.status, 400);
    assert_valid(
        &doc,
        response_schema(&doc, "POST", "/v1/embeddings", 400, "application/json"),
        &raw.body,
        "invalid JSON",
    );
    // Chat on an embedder: 400 unsupported_for_model, documented.
    let (s, b) = check(
        &doc,
        &svc,
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        Some(json!({"messages": [{"role": "user", "content": "hi"}]})),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("unsupported_for_model"))
    );

    // The GET routes.
    assert_eq!(
        check(&doc, &svc, "GET", "/health", "/health", None).await.0,
        200
    );
    assert_eq!(
        check(&doc, &svc, "GET", "/v1/models", "/v1/models", None)
            .await
            .0,
        200
    );
    let (s, b) = check(
        &doc,
        &svc,
        "GET",
        "/v1/models/{model}",
        "/v1/models/fake-embedder",
        None,
    )
    .await;
    assert_eq!((s, b["id"].as_str()), (200, Some("fake-embedder")));
    let (s, _) = check(
        &doc,
        &svc,
        "GET",
        "/v1/models/{model}",
        "/v1/models/gpt-4",
        None,
    )
    .await;
    assert_eq!(s, 404);
    // Jobs not enabled here: 404 on both routes, as documented.
    let job = json!({"endpoint": "/v1/embeddings", "request": {"input": "x"}});
    assert_eq!(
        check(&doc, &svc, "POST", "/v1/jobs", "/v1/jobs", Some(job))
            .await
            .0,
        404
    );
    assert_eq!(
        check(&doc, &svc, "GET", "/v1/jobs/{id}", "/v1/jobs/j-1", None)
            .await
            .0,
        404
    );

    // The body limit answers 413 on a small-limit service.
    let small = common::fake_service_with(Limits {
        max_request_bytes: 64,
        ..Limits::default()
    });
    let (s, _) = check(
        &doc,
        &small,
        "POST",
        "/v1/embeddings",
        "/v1/embeddings",
        Some(json!({"input": "x".repeat(100)})),
    )
    .await;
    assert_eq!(s, 413);
}

#[tokio::test]
async fn reranker_answers_match_the_document() {
    let doc = doc();
    // The real tiny cross-encoder (tests/fixtures/tiny-reranker): reranking has no fake.
    let svc = common::tiny_reranker_service(Limits {
        max_input_tokens: 40,
        ..Limits::default()
    });
    let schema_of = |template: &str| {
        let s = operation(&doc, "post", template)["requestBody"]["content"]["application/json"]
            ["schema"]
            .clone();
        resolve(&doc, &s).clone()
    };
    let req_schema = schema_of("/v1/rerank");
    assert_eq!(
        req_schema,
        schema_of("/rerank"),
        "both routes take one body"
    );
    let ex = req_schema["example"].clone();
    assert_valid(&doc, &req_schema, &ex, "request example");
    for template in ["/v1/rerank", "/rerank"] {
        let post = |body: Value| check(&doc, &svc, "POST", template, template, Some(body));
        let (status, body) = post(ex.clone()).await;
        assert_eq!(status, 200, "{body}");
        for body in [
            json!({"query": "q", "texts": ["a", "b"], "return_text": true, "raw_scores": true}),
            json!({"query": "q", "documents": ["a"], "return_documents": true, "top_n": 5,
                   "model": "x"}),
        ] {
            assert_valid(&doc, &req_schema, &body, "request");
            assert_eq!(post(body).await.0, 200);
        }
        for (body, status, outside) in [
            (json!({"query": "q", "documents": []}), 400, true),
            (json!({"query": " ", "documents": ["a"]}), 400, true),
            (json!({"query": "q", "documents": ["a", " "]}), 400, true),
            (
                json!({"query": "q", "documents": ["a"], "texts": ["a"]}),
                400,
                true,
            ),
            (
                json!({"query": "q", "documents": ["a"], "top_n": 0}),
                400,
                true,
            ),
            (json!({"query": "q"}), 422, true),
            (json!({"query": "q", "documents": [1]}), 422, true),
            (json!({"query": "q", "documents": "a"}), 422, true),
            (
                json!({"query": "q", "documents": ["word ".repeat(60)]}),
                413,
                false,
            ),
        ] {
            if outside {
                assert_valid(
                    &doc,
                    &json!({"not": req_schema.clone()}),
                    &body,
                    "a refused request outside the schema",
                );
            }
            let (got, answer) = post(body.clone()).await;
            assert_eq!(got, status, "{template} {body}: {answer}");
        }
    }
    for (template, path) in [("/health", "/health"), ("/v1/models", "/v1/models")] {
        let (status, body) = check(&doc, &svc, "GET", template, path, None).await;
        assert_eq!(status, 200);
        let kind = if template == "/health" {
            &body["kind"]
        } else {
            &body["data"][0]["kind"]
        };
        assert_eq!(kind, "reranker");
    }
    // The other kinds refuse reranking with a documented 400.
    let embedder = common::fake_service();
    let (status, _) = check(&doc, &embedder, "POST", "/rerank", "/rerank", Some(ex)).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn generator_answers_match_the_document() {
    let doc = doc();
    let svc = common::fake_generator_service(Limits::default(), Duration::ZERO);
    for template in ["/v1/chat/completions", "/v1/completions"] {
        let req_schema = resolve(
            &doc,
            &operation(&doc, "post", template)["requestBody"]["content"]["application/json"]
                ["schema"],
        )
        .clone();
        let ex = req_schema["example"].clone();
        assert_valid(&doc, &req_schema, &ex, "request example");
        let (s, b) = check(&doc, &svc, "POST", template, template, Some(ex.clone())).await;
        assert_eq!(s, 200, "{b}");

        // Streamed: every chunk matches the chunk schema, the last event is [DONE].
        let mut sreq = ex.clone();
        sreq["stream"] = json!(true);
        sreq["stream_options"] = json!({"include_usage": true});
        assert_valid(&doc, &req_schema, &sreq, "stream request");
        let opts = CallOptions {
            streaming: Streaming::Supported,
            ..CallOptions::default()
        };
        let reply = svc
            .handle_call(
                ApiRequest {
                    method: Method::Post,
                    path: template.into(),
                    body: sreq.to_string().into_bytes(),
                },
                &opts,
            )
            .await;
        let Reply::Stream(stream) = reply else {
            panic!("{template}: stream=true did not stream");
        };
        let media = &resolve(&doc, &operation(&doc, "post", template)["responses"]["200"])
            ["content"]["text/event-stream"];
        let chunk_schema = &media["x-event-schema"];
        assert!(chunk_schema.is_object(), "{template}: x-event-schema");
        let text = stream.collect().await;
        let frames: Vec<&str> = text.split("\n\n").filter(|f| !f.is_empty()).collect();
        assert_eq!(frames.last(), Some(&"data: [DONE]"));
        for f in &frames {
            // Each event as an SSE client (and schemathesis) parses it.
            let data = f.strip_prefix("data: ").unwrap();
            let event = json!({ "data": data, "event": "message" });
            assert_valid(&doc, &media["schema"], &event, "SSE event");
        }
        for f in &frames[..frames.len() - 1] {
            let v: Value = serde_json::from_str(f.strip_prefix("data: ").unwrap()).unwrap();
            assert_valid(&doc, chunk_schema, &v, &format!("{template} chunk"));
        }

        // Refusals, each documented.
        for (body, status) in [
            (json!({"temperature": 3}), 400),
            (json!({"top_p": 0}), 400),
            (json!({"max_tokens": 0}), 400),
            (json!({"n": 2}), 400),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), 400),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
                400,
            ),
            (json!({"response_format": {"type": "json_object"}}), 400),
            (json!({"logprobs": true}), 400),
            (json!({"temperature": "hot"}), 422),
            (json!({"max_tokens": 1.5}), 422),
            (json!({"stream": "yes"}), 422),
        ] {
            let mut req = ex.clone();
            for (k, v) in body.as_object().unwrap() {
                req[k] = v.clone();
            }
            assert_valid(
                &doc,
                &json!({"not": req_schema.clone()}),
                &req,
                "a refused body is outside the request schema",
            );
            let (s, b) = check(&doc, &svc, "POST", template, template, Some(req.clone())).await;
            assert_eq!(s, status, "{template} {req}: {b}");
        }
        // Harmless OpenAI fields are accepted and ignored.
        let mut req = ex.clone();
        req["user"] = json!("u-1");
        req["metadata"] = json!({"k": "v"});
        req["store"] = json!(false);
        req["tools"] = json!([]);
        req["tool_choice"] = json!("none");
        req["response_format"] = json!({"type": "text"});
        req["logprobs"] = json!(false);
        req["n"] = json!(1);
        assert_valid(&doc, &req_schema, &req, "harmless fields");
        let (s, b) = check(&doc, &svc, "POST", template, template, Some(req)).await;
        assert_eq!(s, 200, "{b}");
    }
    // Embeddings on a generator: 400 unsupported_for_model.
    let (s, _) = check(
        &doc,
        &svc,
        "POST",
        "/v1/embeddings",
        "/v1/embeddings",
        Some(json!({"input": "x"})),
    )
    .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn job_answers_match_the_document() {
    let doc = doc();
    let store = Arc::new(common::FakeResultStore::default());
    let queue = Arc::new(FakeQueue::default());
    let svc = common::fake_service().with_jobs(JobPorts {
        results: Some(store.clone() as Arc<dyn ResultStore>),
        queue: Some(queue.clone() as Arc<dyn JobQueue>),
    });
    let req_schema = resolve(
        &doc,
        &operation(&doc, "post", "/v1/jobs")["requestBody"]["content"]["application/json"]
            ["schema"],
    )
    .clone();
    let ex = req_schema["example"].clone();
    assert_valid(&doc, &req_schema, &ex, "request example");
    let (s, b) = check(&doc, &svc, "POST", "/v1/jobs", "/v1/jobs", Some(ex)).await;
    assert_eq!(s, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    assert_eq!(queue.0.lock().unwrap().len(), 1);
    let (s, b) = check(
        &doc,
        &svc,
        "GET",
        "/v1/jobs/{id}",
        &format!("/v1/jobs/{id}"),
        None,
    )
    .await;
    assert_eq!((s, b["status"].as_str()), (200, Some("pending")));

    // A stored result is answered as stored, and its id cannot be submitted again.
    let done = json!({"id": "job-done", "object": "job", "status": "succeeded",
        "endpoint": "/v1/embeddings", "model": "fake-embedder", "digest": "0", "message_id": "m-1",
        "completed_at_ms": 1, "timings": {}, "result": {"object": "list"}});
    store
        .put_new(
            &JobId::parse("job-done").unwrap(),
            done.to_string().into_bytes(),
        )
        .await
        .unwrap();
    let (s, b) = check(
        &doc,
        &svc,
        "GET",
        "/v1/jobs/{id}",
        "/v1/jobs/job-done",
        None,
    )
    .await;
    assert_eq!((s, b), (200, done));
    let again = json!({"id": "job-done", "endpoint": "/v1/embeddings", "request": {"input": "x"}});
    assert_eq!(
        check(&doc, &svc, "POST", "/v1/jobs", "/v1/jobs", Some(again))
            .await
            .0,
        409
    );

    // `outside`: excluded by the request schema as this file's validator checks it (it skips
    // the id and endpoint patterns; schemathesis checks those).
    for (body, status, outside) in [
        (
            json!({"id": "../x", "endpoint": "/v1/embeddings", "request": {}}),
            400,
            false,
        ),
        (json!({"endpoint": "/v1/jobs", "request": {}}), 400, false),
        (
            json!({"endpoint": "/v1/chat/completions", "request": {"stream": true}}),
            400,
            true,
        ),
        (json!({"request": {}}), 422, true),
        (
            json!({"endpoint": "/v1/embeddings", "request": "x"}),
            422,
            true,
        ),
        (
            json!({"id": 5, "endpoint": "/v1/embeddings", "request": {}}),
            422,
            true,
        ),
        (
            json!({"owner": "0123456789abcdef0123456789abcdef", "endpoint": "/v1/embeddings", "request": {}}),
            400,
            true,
        ),
        (
            json!({"owner": 5, "endpoint": "/v1/embeddings", "request": {}}),
            422,
            true,
        ),
    ] {
        if outside {
            assert_valid(
                &doc,
                &json!({"not": req_schema.clone()}),
                &body,
                "a refused body is outside the request schema",
            );
        }
        let (s, b) = check(
            &doc,
            &svc,
            "POST",
            "/v1/jobs",
            "/v1/jobs",
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, status, "{body}: {b}");
    }
    assert_eq!(
        check(&doc, &svc, "GET", "/v1/jobs/{id}", "/v1/jobs/.hidden", None)
            .await
            .0,
        400
    );
}

#[test]
fn the_validator_is_not_vacuous() {
    let doc = doc();
    let schema = json!({"$ref": "#/components/schemas/EmbeddingsResponse"});
    let good = json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
                      "model": "m", "usage": {"prompt_tokens": 1, "total_tokens": 1}});
    assert_valid(&doc, &schema, &good, "good");
    for bad in [
        json!({"object": "list"}),
        json!({"object": "lists", "data": good["data"], "model": "m", "usage": good["usage"]}),
        json!({"object": "list", "data": [{"object": "embedding", "index": -1, "embedding": [0.5]}], "model": "m", "usage": good["usage"]}),
        json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": 5}], "model": "m", "usage": good["usage"]}),
        json!({"object": "list", "data": [], "model": "m", "usage": good["usage"]}),
    ] {
        let mut errs = Vec::new();
        validate(&doc, &schema, &bad, "", &mut errs);
        assert!(!errs.is_empty(), "accepted {bad}");
    }
    let err = json!({"$ref": "#/components/schemas/Error"});
    let mut errs = Vec::new();
    validate(
        &doc,
        &err,
        &json!({"error": {"message": "m", "type": "invalid_request_error", "param": null, "code": "c"}, "x": 1}),
        "",
        &mut errs,
    );
    assert!(!errs.is_empty(), "additionalProperties: false");
}
