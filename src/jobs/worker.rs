//! The SQS worker: runs one batch of job messages and says which messages SQS must redeliver.
//!
//! Per message: parse the job (malformed → a `failed` result, acknowledged), skip it if its result
//! already exists (redelivery), run it through the service, write the result create-only. Only a
//! transient failure (result not written, a dependency throttling, the model not loaded) lands in
//! the returned failures, i.e. `batchItemFailures`. A panic anywhere in one job fails that job only.
//! Valid embedding jobs of the batch share forward passes (one engine call for all their inputs).
//!
//! Must not know the SQS event shape (events/sqs.rs decodes it) nor AWS types (the ports hide them).

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use futures_util::future::join_all;
use futures_util::FutureExt;
use serde_json::{json, Value};

use super::{JobId, JobPorts, JobSpec, PutOutcome, StoreError};
use crate::error::{ApiError, ErrorKind};
use crate::service::{ApiRequest, Method, Service};

/// One SQS message, as the event adapter hands it over.
#[derive(Debug, Clone)]
pub struct Message {
    pub message_id: String,
    pub body: String,
    /// `attributes.SentTimestamp` (ms since the epoch), for the queue-wait timing.
    pub sent_timestamp_ms: Option<u64>,
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Result written, status succeeded.
    Succeeded(JobId),
    /// Result written, status failed (malformed, invalid, or the engine failed on it).
    Failed(JobId),
    /// A result was already stored: a redelivery; nothing recomputed or overwritten.
    AlreadyDone(JobId),
    /// Nothing written; SQS must redeliver (reason given).
    Retry(String),
}

/// The batch's outcome: one entry per message, in order, and the message ids to redeliver.
#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    pub outcomes: Vec<(String, Outcome)>,
    pub failures: Vec<String>,
}

/// A job's answer before it is written: the response body, or the error and whether it is worth
/// retrying.
enum Answer {
    Ok(Value),
    Err { error: Value, transient: bool },
}

impl Answer {
    fn from_api_error(e: &ApiError) -> Answer {
        Answer::Err {
            error: e.to_body()["error"].clone(),
            transient: is_transient(e.kind),
        }
    }
}

fn is_transient(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Unavailable | ErrorKind::TooManyRequests)
}

/// The id a malformed message's failed result is stored under: its own `id` if readable and
/// valid, else the messageId, else (a hand-made event with an unusable messageId) a digest of it.
fn fallback_id(m: &Message) -> JobId {
    serde_json::from_str::<Value>(&m.body)
        .ok()
        .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
        .and_then(|s| JobId::parse(&s).ok())
        .or_else(|| JobId::parse(&m.message_id).ok())
        .unwrap_or_else(|| {
            use sha2::Digest;
            let d = sha2::Sha256::digest(m.message_id.as_bytes());
            JobId(format!(
                "msg-{}",
                d[..12]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ))
        })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs one batch. Never panics and never fails as a whole: every message gets an [`Outcome`].
pub async fn run_batch(service: &Service, ports: &JobPorts, messages: Vec<Message>) -> BatchReport {
    let started = Instant::now();
    let Some(store) = ports.results.clone() else {
        // Misconfiguration: nothing can be stored, so nothing may be acknowledged. SQS redelivers
        // and the DLQ keeps the messages until RESULTS_URI is set.
        tracing::error!(
            messages = messages.len(),
            "SQS batch received but RESULTS_URI is unset: every message reported as failed"
        );
        let outcomes: Vec<(String, Outcome)> = messages
            .into_iter()
            .map(|m| (m.message_id, Outcome::Retry("RESULTS_URI is unset".into())))
            .collect();
        let failures = outcomes.iter().map(|(id, _)| id.clone()).collect();
        return BatchReport { outcomes, failures };
    };

    // 1. Parse. Malformed jobs get their failed answer right away.
    let mut ids = Vec::with_capacity(messages.len());
    let mut answers: Vec<Option<Answer>> = Vec::with_capacity(messages.len());
    let mut specs: Vec<Option<JobSpec>> = Vec::with_capacity(messages.len());
    for m in &messages {
        match JobSpec::parse(m.body.as_bytes(), Some(&m.message_id)) {
            Ok(spec) => {
                ids.push(spec.id.clone());
                specs.push(Some(spec));
                answers.push(None);
            }
            Err(e) => {
                ids.push(fallback_id(m));
                specs.push(None);
                answers.push(Some(Answer::from_api_error(&e)));
            }
        }
    }

    // 2. Redeliveries: a job whose result exists is done; it is neither recomputed nor rewritten.
    let existing = join_all(ids.iter().map(|id| store.get(id))).await;
    let mut outcomes: Vec<Option<Outcome>> = vec![None; messages.len()];
    for (i, found) in existing.into_iter().enumerate() {
        match found {
            Ok(Some(_)) => outcomes[i] = Some(Outcome::AlreadyDone(ids[i].clone())),
            Ok(None) => {}
            Err(e) => outcomes[i] = Some(Outcome::Retry(format!("reading the result: {e}"))),
        }
    }

    // 3. Run what is left: embedding jobs together, the rest one by one. Each is guarded so a
    // panic outside the engine (the engine's own are caught by the service) fails that job only.
    let compute_start = Instant::now();
    let runnable: Vec<bool> = (0..messages.len())
        .map(|i| outcomes[i].is_none() && answers[i].is_none())
        .collect();
    let embed_idx: Vec<usize> = (0..messages.len())
        .filter(|&i| runnable[i])
        .filter(|&i| {
            specs[i]
                .as_ref()
                .is_some_and(|s| s.endpoint == "/v1/embeddings")
        })
        .collect();
    if !embed_idx.is_empty() {
        let bodies: Vec<&[u8]> = embed_idx
            .iter()
            .map(|&i| specs[i].as_ref().unwrap().request.as_slice())
            .collect();
        match AssertUnwindSafe(service.embeddings_many(&bodies))
            .catch_unwind()
            .await
        {
            Ok(results) => {
                for (&i, r) in embed_idx.iter().zip(results) {
                    answers[i] = Some(match r {
                        Ok(v) => Answer::Ok(v),
                        Err(e) => Answer::from_api_error(&e),
                    });
                }
            }
            Err(_) => {
                for &i in &embed_idx {
                    answers[i] = Some(panicked());
                }
            }
        }
    }
    for i in 0..messages.len() {
        if !runnable[i] || answers[i].is_some() {
            continue;
        }
        let spec = specs[i].as_ref().expect("runnable jobs parsed");
        let req = ApiRequest {
            method: Method::Post,
            path: spec.endpoint.to_owned(),
            body: spec.request.clone(),
        };
        answers[i] = Some(
            match AssertUnwindSafe(service.handle(req)).catch_unwind().await {
                Ok(r) if (200..300).contains(&r.status) => Answer::Ok(r.body),
                Ok(r) => Answer::Err {
                    error: r.body.get("error").cloned().unwrap_or(r.body),
                    transient: r.status == 503 || r.status == 429,
                },
                Err(_) => panicked(),
            },
        );
    }
    let compute_ms = compute_start.elapsed().as_secs_f64() * 1e3;

    // 4. Write every answer that is final, create-only and concurrently.
    let meta = service.meta();
    let now = unix_ms();
    let mut writes = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if outcomes[i].is_some() {
            continue;
        }
        let answer = answers[i].take().expect("every runnable job has an answer");
        let (status, payload) = match answer {
            Answer::Err {
                transient: true,
                error,
            } => {
                outcomes[i] = Some(Outcome::Retry(format!(
                    "transient: {}",
                    error["message"].as_str().unwrap_or("unavailable")
                )));
                continue;
            }
            Answer::Ok(v) => ("succeeded", ("result", v)),
            Answer::Err { error, .. } => ("failed", ("error", error)),
        };
        let endpoint = specs[i].as_ref().map(|s| s.endpoint);
        let mut doc = json!({
            "id": ids[i].as_str(),
            "object": "job",
            "status": status,
            "endpoint": endpoint,
            "model": meta.id,
            "digest": meta.sha256,
            "message_id": m.message_id,
            "completed_at_ms": now,
            "timings": {
                "queue_ms": m.sent_timestamp_ms.map(|t| now.saturating_sub(t)),
                "batch_compute_ms": compute_ms,
                "batch_size": messages.len(),
            },
        });
        doc[payload.0] = payload.1;
        let bytes = serde_json::to_vec(&doc).expect("a JSON value serializes");
        let store = store.clone();
        let id = ids[i].clone();
        writes.push(async move {
            let r = store.put_new(&id, bytes).await;
            (i, status, r)
        });
    }
    for (i, status, r) in join_all(writes).await {
        let id = ids[i].clone();
        outcomes[i] = Some(match r {
            Ok(PutOutcome::Written) if status == "succeeded" => Outcome::Succeeded(id),
            Ok(PutOutcome::Written) => Outcome::Failed(id),
            Ok(PutOutcome::AlreadyExists) => Outcome::AlreadyDone(id),
            Err(StoreError::Transient(e)) | Err(StoreError::Permanent(e)) => {
                Outcome::Retry(format!("writing {}: {e}", store.location(&ids[i])))
            }
        });
    }

    let mut report = BatchReport::default();
    for (m, o) in messages.into_iter().zip(outcomes) {
        let o = o.expect("every message has an outcome");
        if let Outcome::Retry(reason) = &o {
            tracing::warn!(message_id = %m.message_id, %reason, "job left for redelivery");
            report.failures.push(m.message_id.clone());
        }
        report.outcomes.push((m.message_id, o));
    }
    tracing::info!(
        messages = report.outcomes.len(),
        redeliver = report.failures.len(),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "sqs batch done"
    );
    report
}

fn panicked() -> Answer {
    Answer::Err {
        error: ApiError::new(
            ErrorKind::Internal,
            "the job panicked inside the function; it was stopped and the rest of the batch ran",
        )
        .to_body()["error"]
            .clone(),
        transient: false,
    }
}
