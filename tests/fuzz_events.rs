//! Fuzzing every event shape through the real event handler, on the FAKE engines (this tests the
//! layers above the engine: adapters, routing, validation, limits, the job worker) with a fake
//! in-memory result store.
//!
//! Seed corpus: every sample in events/ (HTTP API v2, REST v1, Function URL, direct, SQS).
//! Each case mutates one seed: the request body replaced by random JSON (deep nesting, huge and
//! odd strings — U+FFFE, NUL, RTL marks —, extreme numbers, wrong types), the OpenAI fields swapped
//! for hostile values, the event's own structure damaged (fields deleted, retyped), invalid
//! base64 claimed, random methods and paths.
//!
//! Properties, for every case: the handler answers (never panics, never a Lambda-level error),
//! within a time bound; an HTTP answer is an envelope whose status is below 500 and whose error
//! body has OpenAI's shape; a direct answer is JSON, its error OpenAI-shaped and never a server
//! error; an SQS answer is a partial batch response naming only messages of the batch.
//!
//! Bounded: FUZZ_CASES cases (default 1,500) or FUZZ_SECONDS (default 60) of wall time, whichever
//! ends first. The seed is printed; FUZZ_SEED=<n> replays a run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lambda_inference::events;
use lambda_inference::jobs::JobPorts;
use lambda_inference::service::{Limits, Service};
use serde_json::{json, Map, Value};

mod common;
use common::FakeResultStore;

/// SplitMix64: a small seedable generator, so a failing case replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const ODD_CHARS: &[&str] = &[
    "\u{FFFE}",
    "\u{FFFF}",
    "\u{0}",
    "\u{202E}",
    "\u{FEFF}",
    "é",
    "日本",
    "🦀",
    "\\",
    "\"",
    "\n",
    "\r\n",
    "\t",
    "%00",
    "../",
    "<|im_start|>",
    "<|endoftext|>",
    "[CLS]",
    "[SEP]",
    " ",
    "!",
];

fn string(r: &mut Rng) -> String {
    let n = match r.below(10) {
        0 => 0,
        1 => 10_000 + r.below(200_000),
        _ => r.below(40),
    };
    let mut s = String::new();
    while s.len() < n {
        if r.chance(30) {
            let c: &&str = r.pick(ODD_CHARS);
            s.push_str(c);
        } else {
            s.push((b'a' + r.below(26) as u8) as char);
        }
        if n > 1000 && r.chance(1) {
            // Long runs make long strings cheaply.
            let piece = s.clone();
            s.push_str(&piece);
        }
    }
    s
}

fn number(r: &mut Rng) -> Value {
    match r.below(9) {
        0 => json!(-0.0),
        1 => json!(1e308),
        2 => json!(-1),
        3 => json!(u64::MAX),
        4 => json!(i64::MIN),
        5 => json!(0.5),
        6 => json!(1e-40),
        7 => json!(r.below(5000)),
        _ => json!(r.next() as f64 / 3.0),
    }
}

fn value(r: &mut Rng, depth: usize) -> Value {
    let k = if depth == 0 { r.below(4) } else { r.below(6) };
    match k {
        0 => Value::Null,
        1 => json!(r.chance(50)),
        2 => number(r),
        3 => json!(string(r)),
        4 => Value::Array((0..r.below(5)).map(|_| value(r, depth - 1)).collect()),
        _ => {
            let mut m = Map::new();
            for _ in 0..r.below(5) {
                m.insert(string(r).chars().take(12).collect(), value(r, depth - 1));
            }
            Value::Object(m)
        }
    }
}

/// Nesting deeper than serde_json's default recursion limit (128).
fn deep(n: usize) -> Value {
    (0..n).fold(json!("x"), |v, _| json!([v]))
}

const FIELDS: &[&str] = &[
    "input",
    "messages",
    "prompt",
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "dimensions",
    "encoding_format",
    "tools",
    "tool_choice",
    "response_format",
    "logprobs",
    "user",
    "frequency_penalty",
    "id",
    "endpoint",
    "request",
];

/// A request body: a plausible OpenAI request with hostile fields, or random JSON, or not JSON.
fn body(r: &mut Rng) -> Value {
    match r.below(8) {
        0 => value(r, 4),
        1 => deep(130 + r.below(200)),
        2 => json!({"input": (0..r.below(3000)).map(|_| json!(string(r))).collect::<Vec<_>>()}),
        3 => {
            json!({"messages": [{"role": r.pick(&["user", "system", "tool", "x"]), "content": value(r, 2)}],
                    "max_tokens": number(r), "temperature": number(r), "stop": value(r, 2)})
        }
        _ => {
            let mut m = Map::new();
            for _ in 0..1 + r.below(5) {
                m.insert((*r.pick(FIELDS)).into(), value(r, 3));
            }
            if r.chance(50) {
                m.insert("input".into(), json!(string(r)));
            }
            Value::Object(m)
        }
    }
}

fn body_text(r: &mut Rng) -> String {
    match r.below(10) {
        0 => string(r),
        1 => "{\"input\": \"x\\ud800y\"}".into(),
        2 => "{\"input\": \"unterminated".into(),
        _ => body(r).to_string(),
    }
}

const PATHS: &[&str] = &[
    "/v1/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/v1/jobs",
    "/v1/jobs/x",
    "/v1/jobs/../../etc",
    "/v1/models/x",
    "/openapi.json",
    "/",
    "",
    "/v1/embeddings/",
    "//v1//embeddings",
    "/v1/jobs/%2e%2e",
];

/// Damages the event's own structure (what a hand-made or proxied event might look like).
fn damage(r: &mut Rng, event: &mut Value) {
    let Some(obj) = event.as_object_mut() else {
        return;
    };
    let keys: Vec<String> = obj.keys().cloned().collect();
    if keys.is_empty() {
        return;
    }
    let k = r.pick(&keys).clone();
    match r.below(3) {
        0 => {
            obj.remove(&k);
        }
        1 => {
            obj.insert(k, value(r, 2));
        }
        _ => {
            obj.insert(k, json!(string(r)));
        }
    }
}

fn mutate(r: &mut Rng, seed: &Value) -> Value {
    let mut e = seed.clone();
    if let Some(records) = e.get_mut("Records").and_then(Value::as_array_mut) {
        for rec in records.iter_mut() {
            if r.chance(70) {
                let job = match r.below(3) {
                    0 => json!({"endpoint": r.pick(PATHS), "request": body(r)}),
                    1 => json!({"id": string(r), "endpoint": "/v1/embeddings", "request": body(r)}),
                    _ => value(r, 3),
                };
                rec["body"] = json!(if r.chance(80) {
                    job.to_string()
                } else {
                    body_text(r)
                });
            }
            if r.chance(10) {
                damage(r, rec);
            }
        }
    } else if e.get("requestContext").is_some() || e.get("httpMethod").is_some() {
        e["body"] = json!(body_text(r));
        if r.chance(20) {
            e["isBase64Encoded"] = json!(true);
        }
        if r.chance(20) {
            let p = r.pick(PATHS).to_string();
            e["rawPath"] = json!(p);
            e["path"] = json!(p);
        }
        if r.chance(15) {
            let m = r
                .pick(&["GET", "POST", "PUT", "DELETE", "HEAD", "", "post"])
                .to_string();
            e["httpMethod"] = json!(m);
            if let Some(http) = e.pointer_mut("/requestContext/http") {
                http["method"] = json!(m);
            }
        }
    } else if r.chance(80) {
        e = body(r);
    } else {
        e = json!({"path": r.pick(PATHS), "method": value(r, 0), "body": value(r, 3)});
    }
    if r.chance(10) {
        damage(r, &mut e);
    }
    e
}

fn check_error_body(b: &Value, what: &str) {
    let err = &b["error"];
    assert!(err["message"].is_string(), "{what}: no error.message: {b}");
    assert!(err["type"].is_string(), "{what}: no error.type: {b}");
    assert!(err["code"].is_string(), "{what}: no error.code: {b}");
    assert_ne!(err["type"], "server_error", "{what}: a server error: {b}");
}

fn check(seed_event: &Value, event: &Value, out: &Value, what: &str) {
    if let Some(records) = event.get("Records").and_then(Value::as_array) {
        if records.iter().any(|r| r["eventSource"] == "aws:sqs") {
            let failures = out["batchItemFailures"]
                .as_array()
                .unwrap_or_else(|| panic!("{what}: not a partial batch response: {out}"));
            for f in failures {
                assert!(f["itemIdentifier"].is_string(), "{what}: {out}");
            }
            return;
        }
    }
    let _ = seed_event;
    if let Some(status) = out.get("statusCode") {
        let status = status.as_u64().unwrap_or_else(|| panic!("{what}: {out}"));
        assert!(
            (200..500).contains(&status),
            "{what}: status {status}: {out}"
        );
        let text = out["body"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {out}"));
        if out["headers"]["content-type"] == "text/event-stream" {
            return;
        }
        let b: Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: body not JSON ({e})"));
        if status >= 400 {
            check_error_body(&b, what);
        }
    } else if out.get("error").is_some() {
        check_error_body(out, what);
    } else {
        assert!(out.is_object(), "{what}: {out}");
    }
}

fn services() -> Vec<(&'static str, Service)> {
    let jobs = || JobPorts {
        results: Some(Arc::new(FakeResultStore::default())),
        queue: None,
    };
    vec![
        ("embedder", common::fake_service().with_jobs(jobs())),
        (
            "generator",
            common::fake_generator_service(
                Limits {
                    max_new_tokens: 16,
                    ..Limits::default()
                },
                Duration::ZERO,
            )
            .with_jobs(jobs()),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_of_any_shape_gets_a_server_error_or_a_malformed_answer() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let seed = env(
        "FUZZ_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    let (cases, seconds) = (env("FUZZ_CASES", 1500), env("FUZZ_SECONDS", 60));
    eprintln!("fuzz_events: FUZZ_SEED={seed} (cases {cases}, at most {seconds} s)");
    let mut seeds: Vec<Value> = std::fs::read_dir(common::events_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect();
    seeds.sort_by_key(|v| v.to_string());
    assert!(seeds.len() >= 10, "the seed corpus is events/");
    let services = services();
    let mut r = Rng(seed);
    let stop = Instant::now() + Duration::from_secs(seconds);
    let mut done = 0;
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    while done < cases && Instant::now() < stop {
        let s = r.pick(&seeds).clone();
        let event = mutate(&mut r, &s);
        let (name, service) = r.pick(&services);
        let what = format!("case {done} (FUZZ_SEED={seed}) on the {name}");
        let t = Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            events::handle(service, event.clone()),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"));
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: took {:?}",
            t.elapsed()
        );
        check(&s, &event, &out, &what);
        let key = out
            .get("statusCode")
            .map(|s| s.to_string())
            .or_else(|| out["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "ok".into());
        *statuses.entry(key).or_default() += 1;
        done += 1;
    }
    eprintln!("fuzz_events: {done} cases; answers: {statuses:?}");
    assert!(done >= 100, "only {done} cases ran");
}
