//! SQS jobs against a short function timeout, end to end: the real `bootstrap` under the real
//! Lambda Runtime Interface Emulator with `AWS_LAMBDA_FUNCTION_TIMEOUT` (the emulator sets each
//! invocation's deadline from it and cuts the invocation off there, as Lambda does), the real
//! MiniLM model, results in a real S3 API (moto on loopback).
//!
//! The batch holds more work than one invocation can do. What must hold, round after round of
//! redelivery (SQS hands back exactly the `batchItemFailures`): no invocation outlives the
//! timeout; every job acknowledged has its result stored; every job handed back has none (it was
//! not started); the one job that can never fit in an invocation ends as a `failed` result naming
//! the limit instead of looping; and every job finishes within the template's maxReceiveCount (5),
//! so nothing that could succeed reaches the DLQ.
//!
//! Needs the emulator (scripts/fetch-tools), models/default.gguf (scripts/fetch-models) and
//! moto_server; skips without them, fails under CI=true.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::emulator::Emulator;
use common::s3::{block_on, client, s3_env, Moto};

const BUCKET: &str = "deadline-results";
const TIMEOUT_S: u64 = 8;
/// The template's DLQ redrive policy: a message received this often goes to the DLQ.
const MAX_RECEIVE_COUNT: u32 = 5;

/// About 1,500 characters: more than MiniLM's 256-token window, so every input costs a full one.
fn long_text(seed: usize) -> String {
    (0..120)
        .map(|i| format!("item{} ", (seed * 131 + i * 17) % 997))
        .collect()
}

/// One full-window input's embedding time on this machine, measured through the function.
fn per_input(emu: &Emulator) -> Duration {
    let input: Vec<String> = (0..4).map(long_text).collect();
    let body = json!({ "input": input }).to_string();
    let mut best = Duration::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        let out = emu.invoke(body.as_bytes());
        assert_eq!(out["data"].as_array().map(Vec::len), Some(4), "{out}");
        best = best.min(t.elapsed());
    }
    best / 4
}

fn job(id: &str, inputs: usize) -> String {
    let input: Vec<String> = (0..inputs).map(long_text).collect();
    json!({"id": id, "endpoint": "/v1/embeddings", "request": {"input": input}}).to_string()
}

fn record(message_id: &str, body: &str, receives: u32) -> Value {
    json!({"messageId": message_id, "eventSource": "aws:sqs", "body": body,
           "attributes": {"ApproximateReceiveCount": receives.to_string(),
                          "SentTimestamp": "1700000000000"}})
}

fn stored(moto: &Moto, id: &str) -> Option<Value> {
    let s3 = client(&moto.endpoint());
    let key = format!("r/{id}.json");
    // One runtime for the request and its body: a pooled connection must not outlive it.
    let bytes = block_on(async {
        let out = s3.get_object().bucket(BUCKET).key(&key).send().await.ok()?;
        Some(out.body.collect().await.unwrap().into_bytes())
    })?;
    Some(serde_json::from_slice(&bytes).unwrap())
}

#[test]
fn a_batch_longer_than_the_timeout_keeps_every_finished_result_and_hands_back_only_unstarted_jobs()
{
    let Some(rie) = common::needed_file(".cache/bin/aws-lambda-rie", "scripts/fetch-tools") else {
        return;
    };
    let Some(model) = common::needed_file("models/default.gguf", "scripts/fetch-models") else {
        return;
    };
    let Some(moto) = Moto::start() else {
        return;
    };
    block_on(
        client(&moto.endpoint())
            .create_bucket()
            .bucket(BUCKET)
            .send(),
    )
    .unwrap();
    let mut env = s3_env(&moto.endpoint());
    env.extend([
        ("MODEL_URI", model.display().to_string()),
        ("RESULTS_URI", format!("s3://{BUCKET}/r/")),
        ("AWS_LAMBDA_FUNCTION_TIMEOUT", TIMEOUT_S.to_string()),
        // Two vCPUs, as this machine has.
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "3538".into()),
    ]);
    let emu = Emulator::start(&rie, &env);

    // Ten messages (the template's batch size): nine ordinary jobs sized so that together they
    // take about 1.5 times what one invocation can give, and one of 600 inputs (under SQS's 1 MiB)
    // that no invocation of 8 s can embed.
    let per_input = per_input(&emu);
    let per_job =
        ((TIMEOUT_S as f64 * 1.5 / 9.0) / per_input.as_secs_f64()).clamp(1.0, 64.0) as usize;
    eprintln!("one input: {per_input:?}; {per_job} inputs per job");
    let mut bodies: BTreeMap<String, String> = (0..9)
        .map(|i| (format!("m{i}"), job(&format!("job-{i}"), per_job)))
        .collect();
    bodies.insert("m9".into(), job("job-giant", 600));
    assert!(bodies["m9"].len() < 1024 * 1024);

    let mut receives: BTreeMap<String, u32> = BTreeMap::new();
    let mut pending: Vec<String> = bodies.keys().cloned().collect();
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        assert!(
            rounds <= MAX_RECEIVE_COUNT,
            "still pending after {rounds} rounds: {pending:?}"
        );
        let records: Vec<Value> = pending
            .iter()
            .map(|m| {
                let n = receives.entry(m.clone()).or_default();
                *n += 1;
                record(m, &bodies[m], *n)
            })
            .collect();
        let t = Instant::now();
        let out = emu.invoke(json!({ "Records": records }).to_string().as_bytes());
        let took = t.elapsed();
        assert!(
            out.get("errorType").is_none(),
            "round {rounds}: the invocation failed (timed out?) after {took:?}: {out}"
        );
        assert!(
            took < Duration::from_secs(TIMEOUT_S),
            "round {rounds}: {took:?}"
        );
        let failed = common::failures(&out);
        eprintln!(
            "round {rounds}: {} jobs in {took:?}, {} handed back",
            pending.len(),
            failed.len()
        );
        for m in &pending {
            let id = if m == "m9" {
                "job-giant".to_owned()
            } else {
                format!("job-{}", &m[1..])
            };
            let result = stored(&moto, &id);
            if failed.contains(m) {
                assert!(
                    result.is_none(),
                    "{m} handed back but has a result: {result:?}"
                );
            } else {
                let r = result.unwrap_or_else(|| panic!("{m} acknowledged without a result"));
                if m == "m9" {
                    assert_eq!(r["status"], "failed", "{r}");
                    assert_eq!(r["error"]["code"], "exceeds_invocation_time", "{r}");
                } else {
                    assert_eq!(r["status"], "succeeded", "{m}: {r}");
                    assert_eq!(r["result"]["data"].as_array().unwrap().len(), per_job);
                }
            }
        }
        assert!(
            failed.len() < pending.len(),
            "round {rounds} made no progress"
        );
        pending = failed;
    }
    // The batch really outlasted one invocation.
    assert!(
        rounds >= 2,
        "one round did everything: make the jobs bigger"
    );
}
