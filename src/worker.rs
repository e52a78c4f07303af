//! The SQS worker: runs one batch of job messages and says which messages SQS must redeliver.
//!
//! Per message: parse the job (malformed → a `failed` result, acknowledged), skip it if its result
//! already exists (redelivery), run it through the service, write the result create-only. Only a
//! transient failure (result not written, a dependency throttling, the model not loaded) lands in
//! the returned failures, i.e. `batchItemFailures`. A panic anywhere in one job fails that job only.
//! Valid embedding jobs of the batch share forward passes (one engine call for all their inputs).
//!
//! An adapter above the service, like `events`: job types and ports are `crate::jobs`'s, below the
//! service. Must not know the SQS event shape (events/sqs.rs decodes it) nor AWS types (the ports hide them).

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::FutureExt;
use serde_json::{json, Value};

use crate::error::{ApiError, ErrorKind};
use crate::jobs::{JobId, JobPorts, JobSpec, PutOutcome, ResultStore, StoreError};
use crate::service::{meter, ApiRequest, CallOptions, Method, Reply, Service, Streaming};

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
        .unwrap_or_else(|| JobId::of_message_id(&m.message_id))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The invocation a batch runs in: the deadline, and what a whole invocation gives (the
/// function's timeout, as far as the handler can tell).
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub deadline: Instant,
    pub budget: Duration,
}

/// Time kept back from the deadline to write the last results and answer Lambda.
pub const WRITE_MARGIN: Duration = Duration::from_millis(1500);

/// Inputs per shared forward-pass group of embedding jobs: results are written after each
/// group, so a big batch makes progress that a timeout cannot take back.
const EMBED_GROUP_INPUTS: usize = 256;

/// A result write in flight: the message index, the status written, the store's answer.
type Write = tokio::task::JoinHandle<(usize, &'static str, Result<PutOutcome, StoreError>)>;

/// Runs one batch. Never panics and never fails as a whole: every message gets an [`Outcome`].
///
/// With a `plan` (an invocation deadline), each result is written as soon as it is computed, no
/// job starts that its measured cost says cannot finish before the deadline (less
/// [`WRITE_MARGIN`]), and the jobs not started are handed back for redelivery; a job that could
/// not finish even in a whole invocation gets a `failed` result naming the limit. A generation
/// stopped by the deadline anyway is handed back, not stored as a partial result (decided in
/// [`crate::service::CallOptions::budget`]).
pub async fn run_batch(
    service: &Service,
    ports: &JobPorts,
    messages: Vec<Message>,
    plan: Option<Plan>,
) -> BatchReport {
    let started = Instant::now();
    count_queue_wait(&messages);
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
        let failures: Vec<String> = outcomes.iter().map(|(id, _)| id.clone()).collect();
        meter::record(|s| s.jobs_retried += failures.len() as u64);
        return BatchReport { outcomes, failures };
    };
    let opts = CallOptions {
        deadline: plan.map(|p| p.deadline.checked_sub(WRITE_MARGIN).unwrap_or(p.deadline)),
        streaming: Streaming::Unsupported("a job's result is one stored object"),
        budget: plan.map(|p| p.budget.saturating_sub(WRITE_MARGIN)),
    };
    let n = messages.len();
    let mut results = Results {
        store: store.clone(),
        meta: service.meta(),
        batch_size: n,
        outcomes: vec![None; n],
        writes: Vec::new(),
    };

    // 1. Parse. Malformed jobs get their failed result right away. `ids` name the jobs (in
    // results and logs), `keys` are where their results are stored (`<owner>/<id>` for a job
    // submitted with an API key).
    let mut ids = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut specs: Vec<Option<JobSpec>> = Vec::with_capacity(n);
    for (i, m) in messages.iter().enumerate() {
        match JobSpec::parse(m.body.as_bytes(), Some(&m.message_id)) {
            Ok(spec) => {
                ids.push(spec.id.clone());
                keys.push(spec.result_key());
                specs.push(Some(spec));
            }
            Err(e) => {
                // Its owner, if any, is unreadable too: the failure goes under the bare id.
                ids.push(fallback_id(m));
                keys.push(ids[i].clone());
                specs.push(None);
                let answer = Answer::from_api_error(&e);
                results.settle(i, (&ids[i], &keys[i], m), None, answer, 0.0);
            }
        }
    }

    // 2. Redeliveries: a job whose result exists is done; it is neither recomputed nor rewritten.
    // A failed look-up is not a reason to hand the job back: the create-only write below keeps a
    // redelivered job from overwriting a result all the same.
    let todo: Vec<usize> = (0..n).filter(|&i| specs[i].is_some()).collect();
    let existing = join_all(todo.iter().map(|&i| store.get(&keys[i]))).await;
    for (&i, found) in todo.iter().zip(existing) {
        match found {
            Ok(Some(_)) => results.outcomes[i] = Some(Outcome::AlreadyDone(ids[i].clone())),
            Ok(None) => {}
            Err(e) => tracing::warn!(job = %ids[i], error = %e,
                "could not check for an earlier result; running the job (the write is create-only)"),
        }
    }
    let runnable =
        |i: usize, outcomes: &[Option<Outcome>]| specs[i].is_some() && outcomes[i].is_none();

    // 3. Embedding jobs: in groups that share forward passes, each group's results written as
    // soon as it is done. The first group of a fresh environment (nothing measured yet) is one
    // job: it measures what the rest will cost.
    let embed_idx: Vec<usize> = (0..n)
        .filter(|&i| runnable(i, &results.outcomes))
        .filter(|&i| {
            specs[i]
                .as_ref()
                .is_some_and(|s| s.endpoint == "/v1/embeddings")
        })
        .collect();
    let mut rest = &embed_idx[..];
    while !rest.is_empty() {
        // Without a deadline (the CLI, tests) there is nothing to plan: one group.
        let measured = plan.is_none() || service.cost().embeddings(1).is_some();
        let mut take = 0;
        let mut inputs = 0;
        let cap = if plan.is_some() {
            EMBED_GROUP_INPUTS
        } else {
            usize::MAX
        };
        while take < rest.len() && (take == 0 || (measured && inputs < cap)) {
            inputs += input_count(&specs[rest[take]].as_ref().expect("parsed").request);
            take += 1;
        }
        let (group, tail) = rest.split_at(take);
        rest = tail;
        let bodies: Vec<&[u8]> = group
            .iter()
            .map(|&i| specs[i].as_ref().expect("parsed").request.as_slice())
            .collect();
        let t = Instant::now();
        let answers = AssertUnwindSafe(service.embeddings_many(&bodies, &opts))
            .catch_unwind()
            .await;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        for (k, &i) in group.iter().enumerate() {
            let answer = match &answers {
                Ok(r) => match &r[k] {
                    Ok(v) => Answer::Ok(v.clone()),
                    Err(e) => Answer::from_api_error(e),
                },
                Err(_) => panicked(),
            };
            let endpoint = specs[i].as_ref().map(|s| s.endpoint);
            results.settle(i, (&ids[i], &keys[i], &messages[i]), endpoint, answer, ms);
        }
    }

    // 4. The other jobs one by one, each guarded so that a panic outside the engine (the
    // engine's own are caught by the service) fails that job only.
    for i in 0..n {
        if !runnable(i, &results.outcomes) {
            continue;
        }
        let spec = specs[i].as_ref().expect("runnable jobs parsed");
        if opts.deadline.is_some_and(|d| Instant::now() >= d) {
            meter::record(|s| s.deadline_stops += 1);
            results.outcomes[i] = Some(Outcome::Retry(
                "not started: the invocation's deadline is near".into(),
            ));
            continue;
        }
        let req = ApiRequest {
            method: Method::Post,
            path: spec.endpoint.to_owned(),
            body: spec.request.clone(),
        };
        let t = Instant::now();
        let answer = match AssertUnwindSafe(service.handle_call(req, &opts))
            .catch_unwind()
            .await
        {
            Ok(Reply::Full(r)) if (200..300).contains(&r.status) => Answer::Ok(r.body),
            Ok(Reply::Full(r)) => Answer::Err {
                error: r.body.get("error").cloned().unwrap_or(r.body),
                transient: r.status == 503 || r.status == 429,
            },
            // Jobs never ask to stream (JobSpec refuses it), so the service never streams here.
            Ok(Reply::Stream(_)) => panicked(),
            Err(_) => panicked(),
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        results.settle(
            i,
            (&ids[i], &keys[i], &messages[i]),
            Some(spec.endpoint),
            answer,
            ms,
        );
    }

    // 5. Wait for the writes (most finished while later jobs computed).
    let Results {
        mut outcomes,
        writes,
        ..
    } = results;
    for w in writes {
        let (i, status, r) = match w.await {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "a result write task failed");
                continue;
            }
        };
        let id = ids[i].clone();
        outcomes[i] = Some(match r {
            Ok(PutOutcome::Written) if status == "succeeded" => Outcome::Succeeded(id),
            Ok(PutOutcome::Written) => Outcome::Failed(id),
            Ok(PutOutcome::AlreadyExists) => Outcome::AlreadyDone(id),
            Err(StoreError::Transient(e)) | Err(StoreError::Permanent(e)) => {
                Outcome::Retry(format!("writing {}: {e}", store.location(&keys[i])))
            }
        });
    }

    let mut report = BatchReport::default();
    for (m, o) in messages.into_iter().zip(outcomes) {
        let o = o.unwrap_or_else(|| Outcome::Retry("not run".into()));
        if let Outcome::Retry(reason) = &o {
            tracing::warn!(message_id = %m.message_id, %reason, "job left for redelivery");
            report.failures.push(m.message_id.clone());
        }
        report.outcomes.push((m.message_id, o));
    }
    let failed = report
        .outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .count();
    meter::record(|s| {
        s.jobs_failed += failed as u64;
        s.jobs_retried += report.failures.len() as u64;
    });
    tracing::info!(
        messages = report.outcomes.len(),
        redeliver = report.failures.len(),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "sqs batch done"
    );
    report
}

/// Counts the batch's messages and how long each waited in the queue: from `SentTimestamp` to
/// now, the batch's start (clocks of SQS and of this host: a negative wait counts as none).
fn count_queue_wait(messages: &[Message]) {
    let now = unix_ms();
    meter::record(|s| {
        s.jobs += messages.len() as u64;
        s.queue_wait.extend(
            messages
                .iter()
                .filter_map(|m| m.sent_timestamp_ms)
                .map(|t| Duration::from_millis(now.saturating_sub(t))),
        );
    });
}

/// How many inputs an embeddings body carries (for grouping; a body that does not parse counts
/// as one, and the service refuses it properly).
fn input_count(body: &[u8]) -> usize {
    #[derive(serde::Deserialize)]
    struct Peek {
        input: Value,
    }
    match serde_json::from_slice::<Peek>(body) {
        Ok(Peek {
            input: Value::Array(a),
        }) => a.len().max(1),
        _ => 1,
    }
}

/// The batch's answers so far: each message's outcome, and the result writes in flight.
struct Results<'a> {
    store: std::sync::Arc<dyn ResultStore>,
    meta: &'a crate::service::ModelMeta,
    batch_size: usize,
    outcomes: Vec<Option<Outcome>>,
    writes: Vec<Write>,
}

impl Results<'_> {
    /// Settles message `i`'s answer (`job`: its id, result key and message): a transient error
    /// is handed back to SQS (nothing written), a final answer starts its create-only write at
    /// once.
    fn settle(
        &mut self,
        i: usize,
        (id, key, m): (&JobId, &JobId, &Message),
        endpoint: Option<&'static str>,
        answer: Answer,
        compute_ms: f64,
    ) {
        let (status, payload) = match answer {
            Answer::Err {
                transient: true,
                error,
            } => {
                self.outcomes[i] = Some(Outcome::Retry(format!(
                    "transient: {}",
                    error["message"].as_str().unwrap_or("unavailable")
                )));
                return;
            }
            Answer::Ok(v) => ("succeeded", ("result", v)),
            Answer::Err { error, .. } => ("failed", ("error", error)),
        };
        let now = unix_ms();
        let mut doc = json!({
            "id": id.as_str(),
            "object": "job",
            "status": status,
            "endpoint": endpoint,
            "model": self.meta.id,
            "digest": self.meta.sha256,
            "message_id": m.message_id,
            "completed_at_ms": now,
            "timings": {
                "queue_ms": m.sent_timestamp_ms.map(|t| now.saturating_sub(t)),
                "compute_ms": compute_ms,
                "batch_size": self.batch_size,
            },
        });
        doc[payload.0] = payload.1;
        let bytes = serde_json::to_vec(&doc).expect("a JSON value serializes");
        // Until the write answers, the job counts as not done (and is not run again in this batch).
        self.outcomes[i] = Some(Outcome::Retry("the result write did not finish".into()));
        let store = self.store.clone();
        let key = key.clone();
        self.writes.push(tokio::spawn(async move {
            let r = store.put_new(&key, bytes).await;
            (i, status, r)
        }));
    }
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
