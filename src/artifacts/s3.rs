//! The model from S3: one plain GET whose headers give the size and ETag, continued alone or
//! joined by parallel ranged GETs, written straight into one preallocated buffer that a thread of
//! its own hashes as the bytes land.
//!
//! - No HEAD: the first GET's response carries the same size and ETag, and its body is already
//!   coming. A HEAD first costs one more round trip (3.5 ms on a loopback moto, one first-byte
//!   latency on S3) before any byte moves.
//! - No second copy: the buffer ([`Landing`]) is allocated once at the size the first GET gave;
//!   each GET writes into its own disjoint range of it (a [`Claim`]). The engine later reads that
//!   buffer in place.
//! - Hash while downloading, off the download's path: a hashing thread follows the contiguous
//!   landed prefix at idle priority (see [`super::landing`]), so it never slows the GETs; what is
//!   left when the last byte lands is finished while the engine is built.
//! - Never a wrong or half model: every later GET carries `If-Match: <ETag of the first GET>` (an
//!   object replaced mid-download fails instead of mixing two versions), every ranged GET must
//!   come back at exactly its length, and MODEL_SHA256 is checked by the caller on the digest.
//! - Plans: one plain GET for small objects; for bigger ones the plain GET is judged after its
//!   first 2 MiB and split into parallel ranged GETs only if its connection is slow (real S3
//!   gives one connection 60-90 MB/s; a local server 300+ MB/s, and serves ranges badly); or, with
//!   MODEL_FETCH_SPLIT_BELOW_MBPS=0, split into ranged GETs as soon as its headers arrive.
//! - Retries are ours, not the SDK's: a body that breaks after 5 of 8 MB resumes at byte 5 MB of
//!   that chunk (a Range from where it stopped), with exponential backoff; the SDK can only repeat
//!   whole requests. One overall deadline (MODEL_FETCH_TIMEOUT_S) bounds every request and retry.
//!
//! Must not parse the model; used at init only.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectOutput;
use aws_sdk_s3::primitives::ByteStream;
use futures_util::TryStreamExt;

use super::landing::{Claim, Landed, Landing};
use super::{Artifact, ArtifactError, ArtifactStore, FetchStats, ModelBytes, ModelDigest};
use crate::aws::SdkFailure;
use crate::config::{FetchSettings, ModelUri};

/// Downloads models from S3 (or any S3-compatible server the SDK is pointed at).
pub struct S3ArtifactStore {
    client: aws_sdk_s3::Client,
    settings: FetchSettings,
}

impl S3ArtifactStore {
    /// A store on a copy of `client` with the SDK's retries off: ours resume a broken chunk where
    /// it stopped, and two retry layers would multiply attempts past the deadline.
    pub fn new(client: &aws_sdk_s3::Client, settings: FetchSettings) -> Self {
        let conf = client
            .config()
            .to_builder()
            .retry_config(RetryConfig::disabled())
            .build();
        Self {
            client: aws_sdk_s3::Client::from_conf(conf),
            settings,
        }
    }

    /// Fetches `s3://bucket/key` into memory, hashed, within the deadline.
    pub async fn fetch_object(&self, bucket: &str, key: &str) -> Result<Artifact, ArtifactError> {
        let uri = format!("s3://{bucket}/{key}");
        let progress = Progress::default();
        let deadline = self.settings.deadline;
        match tokio::time::timeout(deadline, self.fetch_inner(bucket, key, &uri, &progress)).await
        {
            Ok(r) => r,
            Err(_) => Err(ArtifactError::Timeout(format!(
                "{uri}: not fetched within MODEL_FETCH_TIMEOUT_S={}s ({} of {} bytes arrived, {} retries)",
                deadline.as_secs(),
                progress.bytes.load(Ordering::Relaxed),
                match progress.size.load(Ordering::Relaxed) {
                    u64::MAX => "?".to_owned(),
                    n => n.to_string(),
                },
                progress.retries.load(Ordering::Relaxed),
            ))),
        }
    }

    async fn fetch_inner(
        &self,
        bucket: &str,
        key: &str,
        uri: &str,
        progress: &Progress,
    ) -> Result<Artifact, ArtifactError> {
        let t0 = Instant::now();
        let req = Req {
            client: &self.client,
            bucket,
            key,
            uri,
            attempts: self.settings.attempts,
            progress,
        };
        // Every plan starts as one plain GET of the whole object: its headers carry the size and
        // ETag a HEAD would give, without the HEAD's round trip (3.5 ms on a loopback moto, one
        // first-byte latency on S3), and its body is already on the way.
        let (first, size, etag) = req.first_get().await?;
        let first_byte_ms = ms(t0);
        progress.size.store(size, Ordering::Relaxed);
        let size_usize = usize::try_from(size)
            .map_err(|_| ArtifactError::Io(format!("{uri}: {size} bytes do not fit in memory")))?;
        let (req, etag) = (&req, etag.as_str());
        let (landing, mut all) = Landing::new(size_usize).map_err(|e| {
            ArtifactError::Io(format!("{uri}: cannot map a {size}-byte buffer: {e}"))
        })?;
        let digest = landing.follow_with_sha256();

        let st = self.settings;
        let chunk =
            usize::try_from(st.chunk_bytes).expect("chunk size is at most 1 GiB (config.rs)");
        let (plan, chunks) = if size <= st.single_get_max_bytes || st.concurrency == 1 {
            // Small objects: the one plain GET; parallel requests cannot win back their latency.
            req.chunk(all, Some(first), etag, false, None).await?;
            ("single", 1)
        } else if st.split_below_mb_s == 0 {
            // Static plan: the plain GET keeps the first chunk_bytes; the rest is ranged GETs of
            // chunk_bytes, `concurrency` in flight in all.
            let tail = split_into(all.split_off(chunk.min(size_usize)), chunk);
            let n = tail.len();
            let head = req.chunk(all, Some(first), etag, true, None);
            let tail = async {
                futures_util::stream::iter(tail.into_iter().map(Ok))
                    .try_for_each_concurrent((st.concurrency - 1).max(1), move |c| {
                        req.chunk(c, None, etag, false, None)
                    })
                    .await
            };
            futures_util::future::try_join(head, tail).await?;
            ("ranged", 1 + n)
        } else {
            // Adaptive plan: the plain GET is judged after its first bytes. A local server
            // (moto, MinIO on loopback) streams 300-1500 MB/s on one connection and serves
            // ranged GETs badly (moto: 98 MB in 0.3 s on one GET, 1.35 s as 12 ranges): the GET
            // just goes on. Real S3 gives one connection 60-90 MB/s: the GET keeps the next
            // chunk_bytes, and the rest of the object is fetched as ranged GETs on
            // concurrency-1 more connections.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let probe = Probe {
                after: chunk.min(2 << 20),
                split_below_bytes_per_s: st.split_below_mb_s as f64 * 1e6,
                keep: chunk,
                tail: tx,
            };
            let head = req.chunk(all, Some(first), etag, false, Some(probe));
            let tail = async {
                let Ok(Some(tail)) = rx.await else {
                    return Ok(0);
                };
                let tail = split_into(tail, chunk);
                let n = tail.len();
                futures_util::stream::iter(tail.into_iter().map(Ok))
                    .try_for_each_concurrent((st.concurrency - 1).max(1), move |c| {
                        req.chunk(c, None, etag, false, None)
                    })
                    .await?;
                Ok(n)
            };
            let ((), tail_chunks) = futures_util::future::try_join(head, tail).await?;
            if tail_chunks == 0 {
                ("probe", 1)
            } else {
                ("probe+split", 1 + tail_chunks)
            }
        };
        let fetch_ms = ms(t0);
        let landed_at = Instant::now();
        let bytes = Landed::new(landing).ok_or_else(|| {
            ArtifactError::Io(format!(
                "{uri}: every GET ended, yet some bytes are missing"
            ))
        })?;
        let body_s = ((fetch_ms - first_byte_ms) / 1e3).max(1e-9);
        Ok(Artifact {
            bytes: ModelBytes::Landed(bytes),
            source: uri.to_owned(),
            digest: ModelDigest::Following { digest, landed_at },
            stats: FetchStats {
                plan,
                first_byte_ms,
                fetch_ms,
                bytes: size,
                mb_per_s: size as f64 / 1e6 / body_s,
                chunks,
                retries: progress.retries.load(Ordering::Relaxed),
                etag: Some(etag.to_owned()),
            },
        })
    }
}

/// `claim` cut into claims of `chunk` bytes (the last one shorter).
fn split_into(mut claim: Claim, chunk: usize) -> Vec<Claim> {
    let mut out = Vec::new();
    while claim.remaining() > chunk {
        let rest = claim.split_off(claim.cursor() + chunk);
        out.push(std::mem::replace(&mut claim, rest));
    }
    if claim.remaining() > 0 {
        out.push(claim);
    }
    out
}

impl ArtifactStore for S3ArtifactStore {
    fn fetch<'a>(
        &'a self,
        uri: &'a ModelUri,
    ) -> Pin<Box<dyn Future<Output = Result<Artifact, ArtifactError>> + Send + 'a>> {
        Box::pin(async move {
            match uri {
                ModelUri::S3 { bucket, key } => self.fetch_object(bucket, key).await,
                other => Err(ArtifactError::Unsupported(format!(
                    "{other}: not an s3:// URI"
                ))),
            }
        })
    }
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

/// Counters the deadline's error message reports (the fetch future is dropped by then).
struct Progress {
    size: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU32,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            size: AtomicU64::new(u64::MAX),
            bytes: AtomicU64::new(0),
            retries: AtomicU32::new(0),
        }
    }
}

/// The adaptive plan's decision point, carried by its plain GET of the whole object.
struct Probe {
    /// Bytes after which the connection's rate is judged.
    after: usize,
    /// Split when the rate so far (first-byte latency included) is below this.
    split_below_bytes_per_s: f64,
    /// Bytes the plain GET keeps fetching after the decision.
    keep: usize,
    /// Where the tail goes (`None`: no split).
    tail: tokio::sync::oneshot::Sender<Option<Claim>>,
}

/// What one failed request means for the fetch.
enum Failure {
    /// Worth another attempt (connection refused or reset, 5xx, throttling, a short body).
    Transient(String),
    /// Retrying cannot help (404, 403, a changed object).
    Fatal(ArtifactError),
}

/// One fetch's shared request context.
struct Req<'a> {
    client: &'a aws_sdk_s3::Client,
    bucket: &'a str,
    key: &'a str,
    uri: &'a str,
    attempts: u32,
    progress: &'a Progress,
}

impl Req<'_> {
    /// The plain GET of the whole object every plan starts with, retried until its headers
    /// arrive; with the object's size and ETag from them.
    async fn first_get(&self) -> Result<(GetObjectOutput, u64, String), ArtifactError> {
        let mut attempt = 1;
        loop {
            let r = self
                .client
                .get_object()
                .bucket(self.bucket)
                .key(self.key)
                .send()
                .await;
            let failure = match r {
                Ok(resp) => {
                    let Some(size) = resp.content_length().and_then(|n| u64::try_from(n).ok())
                    else {
                        return Err(ArtifactError::Io(format!(
                            "{}: GET gave no Content-Length",
                            self.uri
                        )));
                    };
                    // Without an ETag there is nothing to pin the other GETs to; S3 always
                    // sends one.
                    let etag = resp.e_tag().unwrap_or_default().to_owned();
                    return Ok((resp, size, etag));
                }
                Err(e) => classify(self.uri, "GET", &e),
            };
            self.backoff_or_fail(failure, &mut attempt).await?;
        }
    }

    /// Sleeps before the next attempt, or returns the error when retrying is pointless or the
    /// attempts are spent.
    async fn backoff_or_fail(&self, f: Failure, attempt: &mut u32) -> Result<(), ArtifactError> {
        match f {
            Failure::Fatal(e) => Err(e),
            Failure::Transient(msg) if *attempt >= self.attempts => Err(ArtifactError::Io(
                format!("{msg} (after {} attempts)", self.attempts),
            )),
            Failure::Transient(msg) => {
                tracing::warn!(attempt = *attempt, error = %msg, "model fetch: retrying");
                self.progress.retries.fetch_add(1, Ordering::Relaxed);
                // 50, 100, 200, ... ms, at most 2 s, with up to 25% jitter so that the chunks
                // that failed together (a dropped connection pool) do not come back in lockstep.
                let base = 50u64 << (*attempt - 1).min(6);
                let jitter = u64::from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos()),
                ) % (base / 4 + 1);
                tokio::time::sleep(Duration::from_millis((base + jitter).min(2000))).await;
                *attempt += 1;
                Ok(())
            }
        }
    }

    /// Fills `claim` from the object's bytes at the same offsets: from `first` (the plain
    /// GET's response, which may run past the claim when `overrun` is set: the rest is someone
    /// else's and is dropped unread), else from ranged GETs; a broken body resumes where it
    /// stopped. Every frame lands in the buffer, where the hashing thread picks it up.
    async fn chunk(
        &self,
        mut claim: Claim,
        mut first: Option<GetObjectOutput>,
        etag: &str,
        mut overrun: bool,
        mut probe: Option<Probe>,
    ) -> Result<(), ArtifactError> {
        let mut attempt = 1;
        let claim_start = claim.cursor();
        // When the first frame landed, and how many bytes had by then: the probe's rate runs
        // from there, so that the request's first-byte latency (which parallel GETs pay too)
        // does not count as slowness.
        let mut first_frame: Option<(Instant, usize)> = None;
        while claim.remaining() > 0 {
            let (from, to) = (claim.cursor() as u64, claim.end() as u64 - 1);
            let resp = match first.take() {
                Some(resp) => Ok(resp),
                None => {
                    let mut get = self
                        .client
                        .get_object()
                        .bucket(self.bucket)
                        .key(self.key)
                        .range(format!("bytes={from}-{to}"));
                    if !etag.is_empty() {
                        get = get.if_match(etag);
                    }
                    // A resumed plain GET is a ranged GET that stops at the claim's end.
                    overrun = false;
                    match get.send().await {
                        Ok(resp) => {
                            let want = (to - from + 1) as i64;
                            if resp.content_length().is_some_and(|n| n != want) {
                                // An object that changed size without the server honouring
                                // If-Match, or a server ignoring Range.
                                return Err(ArtifactError::Io(format!(
                                    "{}: GET bytes {from}-{to} answered {} bytes, expected {want}",
                                    self.uri,
                                    resp.content_length().unwrap_or(-1)
                                )));
                            }
                            Ok(resp)
                        }
                        Err(e) => Err(classify(self.uri, "GET", &e)),
                    }
                }
            };
            let failure = match resp {
                Err(f) => f,
                Ok(resp) => {
                    let mut body: ByteStream = resp.body;
                    loop {
                        match body.next().await {
                            Some(Ok(frame)) => {
                                let n = frame.len().min(claim.remaining());
                                if n < frame.len() && !overrun {
                                    return Err(ArtifactError::Io(format!(
                                        "{}: GET bytes {from}-{to} sent more than asked",
                                        self.uri
                                    )));
                                }
                                claim.write(&frame[..n]);
                                self.progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
                                let written = claim.cursor() - claim_start;
                                let (t0, at0) =
                                    *first_frame.get_or_insert((Instant::now(), written));
                                if probe.as_ref().is_some_and(|p| written >= p.after) {
                                    let p = probe.take().expect("checked just above");
                                    let secs = t0.elapsed().as_secs_f64();
                                    let rate = if secs > 0.0 {
                                        (written - at0) as f64 / secs
                                    } else {
                                        f64::INFINITY
                                    };
                                    let split = claim.cursor() + p.keep;
                                    let tail = (rate < p.split_below_bytes_per_s
                                        && split + p.keep < claim.end())
                                    .then(|| {
                                        overrun = true;
                                        claim.split_off(split)
                                    });
                                    // The receiver is gone only if the fetch already failed.
                                    let _ = p.tail.send(tail);
                                }
                                if claim.remaining() == 0 {
                                    break Failure::Transient(String::new());
                                }
                            }
                            Some(Err(e)) => {
                                break Failure::Transient(format!(
                                    "{}: body of bytes {from}-{to} broke after {} bytes: {}",
                                    self.uri,
                                    claim.cursor() as u64 - from,
                                    DisplayErrorContext(&e)
                                ))
                            }
                            None if claim.remaining() == 0 => {
                                break Failure::Transient(String::new())
                            }
                            None => {
                                break Failure::Transient(format!(
                                    "{}: body of bytes {from}-{to} ended early, at {} bytes",
                                    self.uri,
                                    claim.cursor() as u64 - from
                                ))
                            }
                        }
                    }
                }
            };
            if claim.remaining() == 0 {
                break;
            }
            self.backoff_or_fail(failure, &mut attempt).await?;
        }
        Ok(())
    }
}

/// Sorts an SDK error into retry-or-fail, with a message that names the object and the status.
fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    uri: &str,
    op: &str,
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Failure {
    let detail = DisplayErrorContext(e);
    let class = crate::aws::classify_sdk_error(e);
    match e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = e.code().unwrap_or("");
            let msg = format!("{uri}: {op} answered HTTP {status} {code}");
            match class {
                SdkFailure::NotFound => Failure::Fatal(ArtifactError::NotFound(format!(
                    "{msg} (no such bucket or key)"
                ))),
                SdkFailure::Denied => Failure::Fatal(ArtifactError::AccessDenied(format!(
                    "{msg} (check the function role's s3:GetObject on this object, and the \
                     bucket's region)"
                ))),
                SdkFailure::PreconditionFailed => Failure::Fatal(ArtifactError::Io(format!(
                    "{msg}: the object changed during the download (ETag no longer matches)"
                ))),
                SdkFailure::Transient => Failure::Transient(msg),
                SdkFailure::Permanent => {
                    Failure::Fatal(ArtifactError::Io(format!("{msg}: {detail}")))
                }
            }
        }
        _ if class == SdkFailure::Transient => {
            Failure::Transient(format!("{uri}: {op} failed: {detail}"))
        }
        _ => Failure::Fatal(ArtifactError::Io(format!("{uri}: {op}: {detail}"))),
    }
}
