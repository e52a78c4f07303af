//! Malformed events and bodies through `events::handle`, on the fake embedder: every row must come
//! back as a response in its event's own shape with the status and OpenAI error body from the
//! error table, never a panic, a Rust error or a Lambda-level failure.

mod common;

use base64::Engine as _;
use lambda_inference::events::{self, direct};
use serde_json::{json, Value};

use common::{fake_service, PANIC_MARKER};

/// How a row's event reaches the function, and so how its answer is read.
enum Shape {
    /// API Gateway v1/v2 or Function URL: `{statusCode, headers, body: <JSON text>}`.
    Http,
    /// Direct invoke: the OpenAI body itself; the status is read from the service underneath.
    Direct,
}

struct Row {
    name: &'static str,
    shape: Shape,
    event: Value,
    status: u16,
    /// For errors: equal to `error.type` or `error.code`, or contained in `error.message`.
    expect: &'static str,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A realistic HTTP API v2 event on the `$default` stage.
fn v2(method: &str, path: &str, body: Option<&str>) -> Value {
    v2_stage(method, path, body, "$default")
}

fn v2_stage(method: &str, path: &str, body: Option<&str>, stage: &str) -> Value {
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "abc123.execute-api.us-east-1.amazonaws.com"},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "abc123",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1",
                     "sourceIp": "192.0.2.1", "userAgent": "curl/8.5.0"},
            "requestId": "JKJaXmPLvHcESHA=",
            "routeKey": "$default",
            "stage": stage,
            "time": "10/Mar/2025:12:00:00 +0000",
            "timeEpoch": 1741608000000u64
        },
        "body": body,
        "isBase64Encoded": false
    })
}

fn v2_b64(path: &str, body_b64: &str) -> Value {
    let mut e = v2("POST", path, Some(body_b64));
    e["isBase64Encoded"] = json!(true);
    e
}

/// A Function URL event: the v2 shape on a `.lambda-url.` domain.
fn url(method: &str, path: &str, body: Option<&str>) -> Value {
    let mut e = v2(method, path, body);
    e["requestContext"]["domainName"] = json!("abcdefg.lambda-url.us-east-1.on.aws");
    e["requestContext"]["apiId"] = json!("abcdefg");
    e
}

/// A realistic REST API v1 proxy event on stage `prod`.
fn v1(method: &str, path: &str, body: Option<&str>) -> Value {
    json!({
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": {"Content-Type": "application/json"},
        "multiValueHeaders": {"Content-Type": ["application/json"]},
        "queryStringParameters": null,
        "pathParameters": {"proxy": path.trim_start_matches('/')},
        "stageVariables": null,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "1234567890",
            "httpMethod": method,
            "path": format!("/prod{path}"),
            "protocol": "HTTP/1.1",
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "resourcePath": "/{proxy+}",
            "stage": "prod"
        },
        "body": body,
        "isBase64Encoded": false
    })
}

fn v1_b64(path: &str, body_b64: &str) -> Value {
    let mut e = v1("POST", path, Some(body_b64));
    e["isBase64Encoded"] = json!(true);
    e
}

fn http(name: &'static str, event: Value, status: u16, expect: &'static str) -> Row {
    Row {
        name,
        shape: Shape::Http,
        event,
        status,
        expect,
    }
}

fn invoke(name: &'static str, event: Value, status: u16, expect: &'static str) -> Row {
    Row {
        name,
        shape: Shape::Direct,
        event,
        status,
        expect,
    }
}

fn rows() -> Vec<Row> {
    const EMB: &str = "/v1/embeddings";
    let many: String = json!({"input": vec!["x"; 10_001]}).to_string();
    let huge: String = json!({"input": "a ".repeat(7 * 512 * 1024)}).to_string();
    let long: String = json!({"input": "word ".repeat(100)}).to_string();
    let panic: String = json!({"input": ["fine", PANIC_MARKER]}).to_string();
    // Leaked so the rows can borrow them as `&'static str` bodies; a test process, freed at exit.
    let many: &'static str = Box::leak(many.into_boxed_str());
    let huge: &'static str = Box::leak(huge.into_boxed_str());
    let long: &'static str = Box::leak(long.into_boxed_str());
    let panic: &'static str = Box::leak(panic.into_boxed_str());
    vec![
        // --- HTTP API v2: bodies ---
        http(
            "v2 body not JSON",
            v2("POST", EMB, Some(r#"{"input": "#)),
            400,
            "invalid_json",
        ),
        http(
            "v2 body empty",
            v2("POST", EMB, Some("")),
            400,
            "request body is empty",
        ),
        http(
            "v2 body absent",
            v2("POST", EMB, None),
            400,
            "request body is empty",
        ),
        http(
            "v2 body null",
            v2("POST", EMB, Some("null")),
            422,
            "invalid_type",
        ),
        http(
            "v2 body an array",
            v2("POST", EMB, Some(r#"["hello"]"#)),
            422,
            "JSON object",
        ),
        http(
            "v2 body a string",
            v2("POST", EMB, Some(r#""hello""#)),
            422,
            "JSON object",
        ),
        http(
            "v2 no input field",
            v2("POST", EMB, Some(r#"{"model": "m"}"#)),
            422,
            "missing field `input`",
        ),
        http(
            "v2 input a number",
            v2("POST", EMB, Some(r#"{"input": 42}"#)),
            422,
            "invalid_type",
        ),
        http(
            "v2 input numbers",
            v2("POST", EMB, Some(r#"{"input": [1, 2, 3]}"#)),
            422,
            "token-id arrays",
        ),
        http(
            "v2 input mixed",
            v2("POST", EMB, Some(r#"{"input": ["a", 1]}"#)),
            422,
            "invalid_type",
        ),
        http(
            "v2 input null",
            v2("POST", EMB, Some(r#"{"input": null}"#)),
            422,
            "invalid_type",
        ),
        http(
            "v2 encoding_format 3",
            v2("POST", EMB, Some(r#"{"input": "a", "encoding_format": 3}"#)),
            422,
            "invalid_type",
        ),
        http(
            "v2 encoding_format hex",
            v2(
                "POST",
                EMB,
                Some(r#"{"input": "a", "encoding_format": "hex"}"#),
            ),
            422,
            "unknown variant `hex`",
        ),
        http(
            "v2 dimensions string",
            v2("POST", EMB, Some(r#"{"input": "a", "dimensions": "8"}"#)),
            422,
            "invalid_type",
        ),
        http(
            "v2 dimensions -1",
            v2("POST", EMB, Some(r#"{"input": "a", "dimensions": -1}"#)),
            422,
            "invalid_type",
        ),
        http(
            "v2 dimensions 2.5",
            v2("POST", EMB, Some(r#"{"input": "a", "dimensions": 2.5}"#)),
            422,
            "invalid_type",
        ),
        http(
            "v2 dimensions 0",
            v2("POST", EMB, Some(r#"{"input": "a", "dimensions": 0}"#)),
            400,
            "dimensions must be between 1 and 8",
        ),
        http(
            "v2 dimensions 9",
            v2("POST", EMB, Some(r#"{"input": "a", "dimensions": 9}"#)),
            400,
            "dimensions must be between 1 and 8",
        ),
        http(
            "v2 input empty string",
            v2("POST", EMB, Some(r#"{"input": ""}"#)),
            400,
            "input[0] is empty",
        ),
        http(
            "v2 input empty array",
            v2("POST", EMB, Some(r#"{"input": []}"#)),
            400,
            "input must not be empty",
        ),
        http(
            "v2 input whitespace",
            v2("POST", EMB, Some(r#"{"input": ["ok", " \n\t "]}"#)),
            400,
            "input[1] is empty",
        ),
        http(
            "v2 10001 inputs",
            v2("POST", EMB, Some(many)),
            413,
            "MAX_INPUTS",
        ),
        http(
            "v2 7 MB body",
            v2("POST", EMB, Some(huge)),
            413,
            "MAX_REQUEST_BYTES",
        ),
        http(
            "v2 input too long",
            v2("POST", EMB, Some(long)),
            413,
            "MAX_INPUT_TOKENS",
        ),
        http(
            "v2 engine panics",
            v2("POST", EMB, Some(panic)),
            500,
            "server_error",
        ),
        http(
            "v2 bad base64",
            v2_b64(EMB, "eyJpbnB1dCI6!!!not-base64"),
            400,
            "not valid base64",
        ),
        http(
            "v2 base64 of bad JSON",
            v2_b64(EMB, &b64("{nope")),
            400,
            "invalid_json",
        ),
        http(
            "v2 valid base64",
            v2_b64(EMB, &b64(r#"{"input": "hello world"}"#)),
            200,
            "",
        ),
        // --- HTTP API v2: routes and methods ---
        http(
            "v2 unknown route",
            v2("POST", "/v2/embeddings", Some("{}")),
            404,
            "no route for /v2/embeddings",
        ),
        http("v2 root", v2("GET", "/", None), 404, "not_found"),
        http(
            "v2 GET embeddings",
            v2("GET", EMB, None),
            405,
            "accepts POST only",
        ),
        http(
            "v2 POST health",
            v2("POST", "/health", Some("{}")),
            405,
            "accepts GET only",
        ),
        http(
            "v2 DELETE models",
            v2("DELETE", "/v1/models", None),
            405,
            "method_not_allowed",
        ),
        http(
            "v2 chat on an embedder",
            v2("POST", "/v1/chat/completions", Some(r#"{"messages": []}"#)),
            400,
            "unsupported_for_model",
        ),
        http(
            "v2 completions on an embedder",
            v2("POST", "/v1/completions", Some(r#"{"prompt": "x"}"#)),
            400,
            "unsupported_for_model",
        ),
        http(
            "v2 jobs",
            v2("POST", "/v1/jobs", Some(r#"{"request": {}}"#)),
            404,
            "JOBS_QUEUE_URL",
        ),
        http(
            "v2 job status",
            v2("GET", "/v1/jobs/abc", None),
            404,
            "not_found",
        ),
        http(
            "v2 unknown model",
            v2("GET", "/v1/models/gpt-4", None),
            404,
            "not served here",
        ),
        http(
            "v2 stage stripped before routing",
            v2_stage("POST", "/prod/v1/nope", Some("{}"), "prod"),
            404,
            "no route for /v1/nope",
        ),
        http(
            "v2 no method",
            json!({"version": "2.0", "rawPath": EMB, "requestContext": {"http": {}}}),
            400,
            "invalid_event",
        ),
        http(
            "v2 no path",
            json!({"version": "2.0", "requestContext": {"http": {"method": "GET"}}}),
            400,
            "rawPath",
        ),
        // --- Function URL ---
        http(
            "url body not JSON",
            url("POST", EMB, Some("not json")),
            400,
            "invalid_json",
        ),
        http(
            "url GET embeddings",
            url("GET", EMB, None),
            405,
            "method_not_allowed",
        ),
        // --- REST API v1 ---
        http(
            "v1 body not JSON",
            v1("POST", EMB, Some("{")),
            400,
            "invalid_json",
        ),
        http(
            "v1 body empty",
            v1("POST", EMB, None),
            400,
            "request body is empty",
        ),
        http(
            "v1 input a number",
            v1("POST", EMB, Some(r#"{"input": 1}"#)),
            422,
            "invalid_type",
        ),
        http(
            "v1 dimensions 0",
            v1("POST", EMB, Some(r#"{"input": "a", "dimensions": 0}"#)),
            400,
            "invalid_value",
        ),
        http(
            "v1 10001 inputs",
            v1("POST", EMB, Some(many)),
            413,
            "payload_too_large",
        ),
        http(
            "v1 7 MB body",
            v1("POST", EMB, Some(huge)),
            413,
            "MAX_REQUEST_BYTES",
        ),
        http(
            "v1 input too long",
            v1("POST", EMB, Some(long)),
            413,
            "MAX_INPUT_TOKENS",
        ),
        http(
            "v1 engine panics",
            v1("POST", EMB, Some(panic)),
            500,
            "internal_error",
        ),
        http("v1 bad base64", v1_b64(EMB, "%%%"), 400, "not valid base64"),
        http(
            "v1 valid base64",
            v1_b64(EMB, &b64(r#"{"input": ["a", "b"]}"#)),
            200,
            "",
        ),
        http(
            "v1 unknown route",
            v1("GET", "/v1/nope", None),
            404,
            "not_found_error",
        ),
        http(
            "v1 GET embeddings",
            v1("GET", EMB, None),
            405,
            "accepts POST only",
        ),
        http(
            "v1 POST health",
            v1("POST", "/health", Some("{}")),
            405,
            "accepts GET only",
        ),
        http(
            "v1 chat on an embedder",
            v1("POST", "/v1/chat/completions", Some(r#"{"messages": []}"#)),
            400,
            "unsupported_for_model",
        ),
        http(
            "v1 jobs",
            v1("POST", "/v1/jobs", Some("{}")),
            404,
            "not_found",
        ),
        http(
            "v1 no path",
            json!({"httpMethod": "GET", "requestContext": {"stage": "prod"}}),
            400,
            "invalid_event",
        ),
        // --- direct invokes ---
        invoke(
            "direct a string",
            json!("embed this"),
            400,
            "the payload is a string",
        ),
        invoke("direct a number", json!(42), 400, "the payload is a number"),
        invoke("direct null", json!(null), 400, "invalid_direct_invoke"),
        invoke(
            "direct an array",
            json!(["a", "b"]),
            400,
            "the payload is an array",
        ),
        invoke(
            "direct no known field",
            json!({"text": "hi"}),
            400,
            "none of the fields",
        ),
        invoke(
            "direct path a number",
            json!({"path": 5}),
            400,
            "\"path\" must be a string",
        ),
        invoke(
            "direct method a number",
            json!({"path": "/health", "method": 7}),
            400,
            "\"method\" must be a string",
        ),
        invoke(
            "direct input a number",
            json!({"input": 5}),
            422,
            "invalid_type",
        ),
        invoke(
            "direct input empty",
            json!({"input": []}),
            400,
            "input must not be empty",
        ),
        invoke(
            "direct dimensions 9",
            json!({"input": "a", "dimensions": 9}),
            400,
            "invalid_value",
        ),
        invoke(
            "direct input too long",
            json!({"input": "word ".repeat(100)}),
            413,
            "MAX_INPUT_TOKENS",
        ),
        invoke(
            "direct engine panics",
            json!({"input": PANIC_MARKER}),
            500,
            "server_error",
        ),
        invoke(
            "direct chat on an embedder",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            400,
            "unsupported_for_model",
        ),
        invoke(
            "direct completions on an embedder",
            json!({"prompt": "hi"}),
            400,
            "unsupported_for_model",
        ),
        invoke(
            "direct path unknown",
            json!({"path": "/nope"}),
            404,
            "no route for /nope",
        ),
        invoke(
            "direct embeddings without body",
            json!({"path": EMB}),
            405,
            "accepts POST only",
        ),
        invoke(
            "direct explicit body not JSON",
            json!({"path": EMB, "body": "{nope"}),
            400,
            "invalid_json",
        ),
        invoke(
            "direct explicit body an array",
            json!({"path": EMB, "body": ["a"]}),
            422,
            "JSON object",
        ),
        invoke(
            "direct explicit POST health",
            json!({"path": "/health", "method": "POST"}),
            405,
            "accepts GET only",
        ),
    ]
}

/// The `{"error": {...}}` body matches the row.
fn check_error(name: &str, body: &Value, expect: &str) {
    let err = &body["error"];
    let message = err["message"].as_str();
    let typ = err["type"].as_str();
    let code = err["code"].as_str();
    assert!(
        message.is_some_and(|m| !m.is_empty()) && typ.is_some() && code.is_some(),
        "{name}: not an OpenAI error body: {body}"
    );
    assert!(
        err.get("param").is_some(),
        "{name}: error.param missing: {body}"
    );
    let (message, typ, code) = (message.unwrap(), typ.unwrap(), code.unwrap());
    assert!(
        typ == expect || code == expect || message.contains(expect),
        "{name}: expected {expect:?} as type, code or in message; got {body}"
    );
}

fn check_success(name: &str, body: &Value) {
    assert!(
        body.get("error").is_none(),
        "{name}: unexpected error {body}"
    );
    assert_eq!(body["object"], "list", "{name}: {body}");
    assert!(
        body["data"].as_array().is_some_and(|d| !d.is_empty()),
        "{name}: {body}"
    );
}

#[tokio::test]
async fn malformed_events_answer_in_their_own_shape() {
    let service = fake_service();
    let rows = rows();
    assert!(
        rows.len() >= 35,
        "the table should stay broad: {} rows",
        rows.len()
    );
    for row in rows {
        let Row {
            name,
            shape,
            event,
            status,
            expect,
        } = row;
        let out = events::handle(&service, event.clone()).await;
        match shape {
            Shape::Http => {
                assert_eq!(out["statusCode"], status, "{name}: {out}");
                assert_eq!(out["headers"]["content-type"], "application/json", "{name}");
                assert_eq!(out["isBase64Encoded"], false, "{name}");
                let text = out["body"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: body not a string: {out}"));
                let body: Value = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("{name}: body is not JSON ({e}): {text}"));
                if status == 200 {
                    check_success(name, &body);
                } else {
                    check_error(name, &body, expect);
                }
            }
            Shape::Direct => {
                // No HTTP envelope: the answer is the body itself. The status the row expects is
                // read from the same request answered by the service directly.
                assert!(
                    out.get("statusCode").is_none(),
                    "{name}: direct answers carry no envelope: {out}"
                );
                let seen = match direct::decode(event) {
                    Ok(req) => service.handle(req).await,
                    Err(e) => e.into(),
                };
                assert_eq!(seen.status, status, "{name}: {}", seen.body);
                // Not the whole body: a 500's message names the panicked task, which differs.
                for k in ["type", "code", "param"] {
                    assert_eq!(
                        seen.body["error"][k], out["error"][k],
                        "{name}: {k} of {out}"
                    );
                }
                if status == 200 {
                    check_success(name, &out);
                } else {
                    check_error(name, &out, expect);
                }
            }
        }
    }
}
