//! Asynchronous jobs: what a job is ([`JobSpec`], [`JobId`]), `POST /v1/jobs` / `GET /v1/jobs/{id}`
//! (called by the service's router), and the two ports they need (a result store and a job queue).
//! The SQS worker that runs jobs through the service sits above it, in `crate::worker`; this module
//! is below the service and must not use it.
//!
//! A job is `{id?, endpoint, request}`: the same OpenAI body a synchronous call would send, run
//! through the same service by the worker, its answer written once to
//! `RESULTS_URI/<id>.json` as `{id, status, result | error, model, digest, timings}`.
//!
//! Results belong to whoever submitted the job: a job submitted with an API key (ApiAuth=KEY)
//! carries its [`Owner`] (a digest of the key, never the key) in the queued message, its result
//! goes to `RESULTS_URI/<owner>/<id>.json`, and `GET /v1/jobs/{id}` reads under the caller's own
//! owner only, so knowing another caller's job id reads nothing. Jobs without an owner (IAM, JWT or
//! no auth, direct invokes, messages sent to the queue by other producers) keep `<id>.json`.
//!
//! What is permanent and what is transient decides whether SQS retries: a malformed or invalid job,
//! and a job whose engine call panicked, get a `failed` result and are acknowledged; a result that
//! could not be written, a throttled dependency or a model not yet loaded are reported back so SQS
//! redelivers. Writes are create-only (S3 `If-None-Match: *`), so a redelivered job never overwrites
//! a finished one.
//!
//! This module sees AWS only through the [`ResultStore`] and [`JobQueue`] traits; [`aws`] holds the
//! S3/SQS implementations and is the only place here that names an AWS type. It never touches
//! candle: inference goes through the service.

pub mod aws;

use std::sync::Arc;

use serde_json::{json, Value};

use crate::api::{parse_body, routes, truncate, ApiResponse, Limits, Owner};
use crate::error::{ApiError, ErrorKind};

/// A boxed future, so the ports can be trait objects.
pub use futures_util::future::BoxFuture;

/// SQS's message size limit (1 MiB since 2025): a job over it is refused at submit with 413.
pub const MAX_JOB_BYTES: usize = 1024 * 1024;

/// The routes a job may run.
pub const JOB_ENDPOINTS: [&str; 5] = [
    routes::EMBEDDINGS,
    routes::RERANK,
    routes::TEI_RERANK,
    routes::CHAT_COMPLETIONS,
    routes::COMPLETIONS,
];

/// A validated job id: 1-128 characters of `[A-Za-z0-9._-]`, not starting with `.`, so that
/// `<prefix><id>.json` can never name an object outside the results prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobId(String);

impl JobId {
    pub fn parse(s: &str) -> Result<JobId, ApiError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(JobId(s.to_owned()))
        } else {
            Err(ApiError::new(
                ErrorKind::InvalidValue,
                format!(
                    "job id {:?} is not valid: use 1-128 characters of A-Z a-z 0-9 . _ - , not starting with '.'",
                    truncate(s, 80)
                ),
            )
            .with_param("id"))
        }
    }

    /// A fresh id for a job submitted without one: `job-` and 128 bits from the operating system's
    /// random source (getrandom(2)), so that an id cannot be guessed from another (a time or a
    /// counter could be, and without keys the id is all that protects a result).
    pub fn generate() -> Result<JobId, ApiError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| {
            ApiError::new(
                ErrorKind::Internal,
                format!("no random job id: the OS random source failed: {e}"),
            )
        })?;
        Ok(JobId(format!("job-{}", crate::hex::hex(&bytes))))
    }

    /// The id of a message whose own id and messageId are both unusable (a hand-made event):
    /// `msg-` and 96 bits of the SHA-256 of the messageId, so a redelivery maps to the same id.
    pub fn of_message_id(message_id: &str) -> JobId {
        use sha2::Digest;
        let d = sha2::Sha256::digest(message_id.as_bytes());
        JobId(format!("msg-{}", crate::hex::hex(&d[..12])))
    }

    /// The key the result store sees for this job: the id itself, or `<owner>/<id>` for a job
    /// that belongs to an API key. Safe as an object key for the same reason the id is: an owner
    /// is hex digits only.
    pub fn stored_as(&self, owner: Option<&Owner>) -> JobId {
        match owner {
            Some(o) => JobId(format!("{}/{}", o.as_str(), self.0)),
            None => self.clone(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job as submitted: which route, which body, under which id, for whom.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub id: JobId,
    pub endpoint: &'static str,
    /// The request body, serialized (what the service parses).
    pub request: Vec<u8>,
    /// The API key's owner that submitted it (set by `POST /v1/jobs`, never by the client).
    pub owner: Option<Owner>,
}

impl JobSpec {
    /// Reads `{id?, endpoint, request, owner?}`. `default_id` is used when the body has no id (the
    /// SQS messageId); `None` generates one (submit). The error says what is wrong, for the job's
    /// result.
    pub fn parse(body: &[u8], default_id: Option<&str>) -> Result<JobSpec, ApiError> {
        let v: Value = parse_body(body)?;
        let id = match v.get("id") {
            None | Some(Value::Null) => match default_id {
                Some(d) => JobId::parse(d)?,
                None => JobId::generate()?,
            },
            Some(Value::String(s)) => JobId::parse(s)?,
            Some(_) => {
                return Err(
                    ApiError::new(ErrorKind::InvalidType, "job id must be a string")
                        .with_param("id"),
                )
            }
        };
        let endpoint = match v.get("endpoint").and_then(Value::as_str) {
            Some(e) => JOB_ENDPOINTS
                .iter()
                .find(|&&k| k == e.trim_end_matches('/'))
                .copied()
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorKind::InvalidValue,
                        format!(
                            "endpoint {:?} cannot run as a job; use one of {}",
                            truncate(e, 80),
                            JOB_ENDPOINTS.join(", ")
                        ),
                    )
                    .with_param("endpoint")
                })?,
            None => {
                return Err(ApiError::new(
                    ErrorKind::InvalidType,
                    format!(
                        "a job needs \"endpoint\" (one of {}) and \"request\" (its body)",
                        JOB_ENDPOINTS.join(", ")
                    ),
                )
                .with_param("endpoint"))
            }
        };
        let request = match v.get("request") {
            Some(r @ Value::Object(m)) => {
                if m.get("stream").and_then(Value::as_bool) == Some(true) {
                    return Err(ApiError::new(
                        ErrorKind::InvalidValue,
                        "a job cannot stream (its result is one stored object): drop \"stream\"",
                    )
                    .with_param("request.stream"));
                }
                serde_json::to_vec(r).expect("a JSON value serializes")
            }
            _ => {
                return Err(ApiError::new(
                    ErrorKind::InvalidType,
                    "a job needs \"request\": the JSON object the endpoint takes",
                )
                .with_param("request"))
            }
        };
        let owner = match v.get("owner") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Owner::parse(s)?),
            Some(_) => {
                return Err(
                    ApiError::new(ErrorKind::InvalidType, "job owner must be a string")
                        .with_param("owner"),
                )
            }
        };
        Ok(JobSpec {
            id,
            endpoint,
            request,
            owner,
        })
    }

    /// The key its result is stored under (see [`JobId::stored_as`]).
    pub fn result_key(&self) -> JobId {
        self.id.stored_as(self.owner.as_ref())
    }

    /// The SQS message body for this job (id always explicit, so `GET /v1/jobs/{id}` finds it).
    ///
    /// SQS refuses a message containing characters outside XML's (#x9 | #xA | #xD | #x20-#xD7FF |
    /// #xE000-#xFFFD | #x10000-#x10FFFF; SendMessage, "MessageBody"). serde_json already escapes
    /// the control characters; U+FFFE and U+FFFF, which JSON allows raw, are escaped here too, so
    /// any JSON a client sends travels unchanged.
    pub fn to_message(&self) -> String {
        let request: Value = serde_json::from_slice(&self.request).expect("parsed from JSON");
        let mut message =
            json!({"id": self.id.as_str(), "endpoint": self.endpoint, "request": request});
        if let Some(owner) = &self.owner {
            message["owner"] = json!(owner.as_str());
        }
        let text = message.to_string();
        if text.contains(['\u{FFFE}', '\u{FFFF}']) {
            // Both can only occur inside JSON strings, where an escape means the same character.
            text.replace('\u{FFFE}', "\\ufffe")
                .replace('\u{FFFF}', "\\uffff")
        } else {
            text
        }
    }
}

/// Why a store or queue call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Worth retrying: network, throttling, 5xx.
    #[error("transient: {0}")]
    Transient(String),
    /// Retrying the same call will not help: access denied, no such bucket or queue.
    #[error("{0}")]
    Permanent(String),
}

/// What a create-only write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Written,
    /// A result for this id was already there (a redelivery, or a concurrent worker won).
    AlreadyExists,
}

/// Where job results live (`RESULTS_URI`). Its `id`s are the keys results are stored under
/// ([`JobId::stored_as`]: `<id>`, or `<owner>/<id>` for a job that belongs to an API key): who may
/// read what is decided before a store is asked.
pub trait ResultStore: Send + Sync {
    /// The stored result of `id`, if any.
    fn get<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>>;
    /// Writes `body` as the result of `id` unless one exists.
    fn put_new<'a>(
        &'a self,
        id: &'a JobId,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>>;
    /// Where a result goes, for messages (`s3://bucket/prefix/<id>.json`).
    fn location(&self, id: &JobId) -> String;
}

/// Where submitted jobs go (`JOBS_QUEUE_URL`).
pub trait JobQueue: Send + Sync {
    fn send<'a>(&'a self, body: String) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// The job ports a function has: results (needed by the worker and `GET /v1/jobs/{id}`) and the
/// queue (needed by `POST /v1/jobs`).
#[derive(Clone, Default)]
pub struct JobPorts {
    pub results: Option<Arc<dyn ResultStore>>,
    pub queue: Option<Arc<dyn JobQueue>>,
}

/// A store failure as the client sees it. The detail names the bucket, the key (with the caller's
/// owner digest) and the SDK's error: it goes to the log; the answer says only what failed.
fn store_error(e: StoreError) -> ApiError {
    let (kind, detail, said) = match e {
        StoreError::Transient(m) => (
            ErrorKind::Unavailable,
            m,
            "the job store did not answer; retry later",
        ),
        StoreError::Permanent(m) => (
            ErrorKind::Internal,
            m,
            "the job store refused the request (the function's log has the cause)",
        ),
    };
    tracing::error!(error = %detail, "job store failure");
    ApiError::new(kind, said)
}

/// `POST /v1/jobs`: validates the job, refuses what SQS could not carry, sends it, answers 202.
/// `owner`: the caller's API key owner (events decide it), written into the message so that the
/// worker stores the result under it.
pub async fn submit(
    ports: &JobPorts,
    limits: &Limits,
    body: &[u8],
    owner: Option<&Owner>,
) -> Result<ApiResponse, ApiError> {
    let Some(queue) = &ports.queue else {
        return Err(ApiError::new(
            ErrorKind::NotFound,
            "asynchronous jobs are not enabled on this function (JOBS_QUEUE_URL is unset)",
        ));
    };
    let mut spec = JobSpec::parse(body, None)?;
    // The owner comes from the caller's key, never from the body: a client naming one could
    // write results into another caller's prefix.
    if spec.owner.is_some() {
        return Err(ApiError::new(
            ErrorKind::InvalidValue,
            "\"owner\" is set by the function from your API key; drop it from the job",
        )
        .with_param("owner"));
    }
    spec.owner = owner.cloned();
    let message = spec.to_message();
    if message.len() > MAX_JOB_BYTES.min(limits.max_request_bytes) {
        return Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "the job is {} bytes as a queue message, over SQS's limit of {MAX_JOB_BYTES}: \
                 split it, or call {} synchronously",
                message.len(),
                spec.endpoint
            ),
        )
        .with_param("request"));
    }
    // An id that already has a result would never run again (writes are create-only): say so
    // instead of accepting a job that silently does nothing.
    if let Some(store) = &ports.results {
        // A look-up that fails does not stop the submission: the worker's create-only write
        // still keeps an existing result from being overwritten.
        let existing = store.get(&spec.result_key()).await.unwrap_or_else(|e| {
            tracing::warn!(job = %spec.id, error = %e, "could not check for an earlier result");
            None
        });
        if existing.is_some() {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!(
                    "job {} already has a result; GET /v1/jobs/{} reads it, or submit under a new id",
                    spec.id, spec.id
                ),
            )
            .with_param("id"));
        }
    }
    queue.send(message).await.map_err(store_error)?;
    Ok(ApiResponse {
        status: 202,
        body: json!({"id": spec.id.as_str(), "object": "job", "status": "pending",
                     "endpoint": spec.endpoint}),
    })
}

/// `GET /v1/jobs/{id}`: the stored result, or pending while there is none. Only the caller's own
/// results are read (`owner`, from its API key): another caller's job reads as pending, exactly as
/// an unknown id does, so ids cannot even be probed.
pub async fn status(
    ports: &JobPorts,
    id: &str,
    owner: Option<&Owner>,
) -> Result<ApiResponse, ApiError> {
    let Some(store) = &ports.results else {
        return Err(ApiError::new(
            ErrorKind::NotFound,
            "asynchronous jobs are not enabled on this function (RESULTS_URI is unset)",
        ));
    };
    let id = JobId::parse(id)?;
    match store.get(&id.stored_as(owner)).await.map_err(store_error)? {
        Some(bytes) => {
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::new(
                    ErrorKind::Internal,
                    format!("stored result of job {id} is not JSON: {e}"),
                )
            })?;
            Ok(ApiResponse::ok(v))
        }
        // Without a result the job is queued, running, or unknown: a queue cannot be searched by
        // id, so all three read as pending (documented).
        None => Ok(ApiResponse::ok(
            json!({"id": id.as_str(), "object": "job", "status": "pending"}),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake store (unit test of this layer) that fails every call with `err`.
    struct FailingStore(StoreError);

    impl ResultStore for FailingStore {
        fn get<'a>(&'a self, _: &'a JobId) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
            Box::pin(async move { Err(self.0.clone()) })
        }
        fn put_new<'a>(
            &'a self,
            _: &'a JobId,
            _: Vec<u8>,
        ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
            Box::pin(async move { Err(self.0.clone()) })
        }
        fn location(&self, id: &JobId) -> String {
            format!("s3://secret-bucket/results/{id}.json")
        }
    }

    #[test]
    fn store_failures_do_not_show_the_store_layout_to_clients() {
        let detail = "GET s3://secret-bucket/results/0123456789abcdef0123456789abcdef/j-1.json: \
                      AccessDenied";
        for (err, code) in [
            (StoreError::Permanent(detail.into()), 500),
            (StoreError::Transient(detail.into()), 503),
        ] {
            let ports = JobPorts {
                results: Some(Arc::new(FailingStore(err))),
                queue: None,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let e = rt.block_on(status(&ports, "j-1", None)).unwrap_err();
            assert_eq!(e.status(), code);
            let said = e.to_string();
            assert!(
                !said.contains("secret-bucket") && !said.contains("0123456789abcdef"),
                "{said}"
            );
            assert!(said.contains("job store"), "{said}");
        }
    }

    #[test]
    fn ids_cannot_escape_the_results_prefix() {
        for ok in [
            "a",
            "job-1",
            "3f2a_b.c",
            "550e8400-e29b-41d4-a716-446655440000",
        ] {
            assert!(JobId::parse(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(129);
        for bad in [
            "", "../x", "a/b", ".hidden", "..", "a b", "é", "a\\b", "%2e%2e", &long,
        ] {
            let e = JobId::parse(bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("id"), "{bad}");
            assert_eq!(e.status(), 400);
        }
        let a = JobId::generate().unwrap();
        let b = JobId::generate().unwrap();
        assert_ne!(a, b);
        assert!(JobId::parse(a.as_str()).is_ok());
        // job- and 32 hex digits: 128 random bits.
        assert_eq!(a.as_str().len(), 4 + 32, "{a}");
        assert!(a.as_str()[4..].bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn owners_are_hex_and_scope_the_result_key() {
        let o = Owner::of_key_digest(&[7; 32]);
        assert_eq!(o.as_str().len(), 32);
        assert_eq!(Owner::parse(o.as_str()).unwrap(), o);
        assert_ne!(o, Owner::of_key_digest(&[8; 32]));
        let id = JobId::parse("j-1").unwrap();
        assert_eq!(id.stored_as(None).as_str(), "j-1");
        assert_eq!(
            id.stored_as(Some(&o)).as_str(),
            format!("{o}/j-1", o = o.as_str())
        );
        for bad in [
            "",
            "../x",
            &"A".repeat(32),
            &"0".repeat(31),
            &"0".repeat(33),
            "0/0",
        ] {
            assert_eq!(
                Owner::parse(bad).unwrap_err().param.as_deref(),
                Some("owner")
            );
        }
        // The owner travels in the message and comes back; a bad one fails the job.
        let mut s = JobSpec::parse(
            br#"{"endpoint": "/v1/embeddings", "request": {"input": "hi"}}"#,
            Some("m-1"),
        )
        .unwrap();
        assert_eq!(s.owner, None);
        s.owner = Some(o.clone());
        let back = JobSpec::parse(s.to_message().as_bytes(), None).unwrap();
        assert_eq!(back.owner.as_ref(), Some(&o));
        assert_eq!(back.result_key().as_str(), format!("{}/m-1", o.as_str()));
        let e = JobSpec::parse(
            br#"{"endpoint": "/v1/embeddings", "request": {}, "owner": "../../x"}"#,
            Some("m"),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("owner"));
    }

    #[test]
    fn specs_parse_and_refuse_clearly() {
        let s = JobSpec::parse(
            br#"{"endpoint": "/v1/embeddings", "request": {"input": "hi"}}"#,
            Some("m-1"),
        )
        .unwrap();
        assert_eq!(s.id.as_str(), "m-1");
        assert_eq!(s.endpoint, "/v1/embeddings");
        let round = JobSpec::parse(s.to_message().as_bytes(), None).unwrap();
        assert_eq!(round.id, s.id);
        assert_eq!(round.request, s.request);

        // Characters SQS refuses in a message travel escaped, and come back unchanged.
        let odd = JobSpec::parse(
            "{\"endpoint\": \"/v1/embeddings\", \"request\": {\"input\": \"a\u{FFFE}b\u{FFFF}\\u0001\"}}"
                .as_bytes(),
            Some("m-2"),
        )
        .unwrap();
        let msg = odd.to_message();
        assert!(!msg.contains(['\u{FFFE}', '\u{FFFF}', '\u{1}']), "{msg:?}");
        let back = JobSpec::parse(msg.as_bytes(), None).unwrap();
        let input: Value = serde_json::from_slice(&back.request).unwrap();
        assert_eq!(input["input"], "a\u{FFFE}b\u{FFFF}\u{1}");

        let cases: [(&[u8], &str); 7] = [
            (b"not json", "invalid_json"),
            (br#"{"request": {}}"#, "endpoint"),
            (br#"{"endpoint": "/v1/jobs", "request": {}}"#, "endpoint"),
            (br#"{"endpoint": "/v1/embeddings"}"#, "request"),
            (
                br#"{"endpoint": "/v1/embeddings", "request": "hi"}"#,
                "request",
            ),
            (
                br#"{"id": "../../etc", "endpoint": "/v1/embeddings", "request": {}}"#,
                "id",
            ),
            (
                br#"{"endpoint": "/v1/chat/completions", "request": {"stream": true}}"#,
                "request.stream",
            ),
        ];
        for (body, what) in cases {
            let e = JobSpec::parse(body, Some("m")).unwrap_err();
            let got = e
                .param
                .clone()
                .unwrap_or_else(|| e.to_body()["error"]["code"].to_string());
            assert!(
                got.contains(what),
                "{}: {got} / {}",
                String::from_utf8_lossy(body),
                e.message
            );
        }
    }
}
