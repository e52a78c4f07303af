//! The model from S3: one HEAD, then the object in one plain GET or in parallel ranged GETs,
//! written straight into one preallocated buffer and hashed while it arrives.
//!
//! - No second copy: the buffer is allocated once at the size the HEAD gave and each GET writes
//!   into its own disjoint slice of it. The engine later reads that buffer in place.
//! - Hash while downloading: SHA-256 must see the bytes in order, so the hasher follows the
//!   contiguous prefix: the chunk at the front of the prefix hashes each frame as it lands; a
//!   chunk that finishes early waits in a map and is hashed as soon as the front reaches it. By
//!   the time the last byte arrives, at most one chunk is left to hash.
//! - Never a wrong or half model: every GET carries `If-Match: <ETag from the HEAD>` (an object
//!   replaced mid-download fails instead of mixing two versions), every chunk must come back at
//!   exactly its length, and MODEL_SHA256 is checked by the caller on the finished digest.
//! - Plans: one plain GET for small objects; for bigger ones a plain GET that is judged after its
//!   first 2 MiB and split into parallel ranged GETs only if its connection is slow (real S3
//!   gives one connection 60-90 MB/s; a local server 300+ MB/s, and serves ranges badly); or, with
//!   MODEL_FETCH_SPLIT_BELOW_MBPS=0, ranged GETs from the start.
//! - Retries are ours, not the SDK's: a body that breaks after 5 of 8 MB resumes at byte 5 MB of
//!   that chunk (a Range from where it stopped), with exponential backoff; the SDK can only repeat
//!   whole requests. One overall deadline (MODEL_FETCH_TIMEOUT_S) bounds HEAD, chunks and retries.
//!
//! Must not parse the model; used at init only.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use futures_util::TryStreamExt;
use sha2::{Digest, Sha256};

use super::{hex, Artifact, ArtifactError, ArtifactStore, FetchStats, ModelBytes};
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
        let (size, etag) = req.head().await?;
        let head_ms = ms(t0);
        progress.size.store(size, Ordering::Relaxed);
        let size_usize = usize::try_from(size)
            .map_err(|_| ArtifactError::Io(format!("{uri}: {size} bytes do not fit in memory")))?;

        // calloc-backed: the pages are mapped lazily as the GETs write them, so this costs no
        // time up front and the buffer is never copied afterwards.
        let mut buf = vec![0u8; size_usize];
        let hashing = Mutex::new(Hashing {
            hasher: Sha256::new(),
            front: 0,
            waiting: BTreeMap::new(),
        });
        let st = self.settings;
        let chunk =
            usize::try_from(st.chunk_bytes).expect("chunk size is at most 1 GiB (config.rs)");
        let (plan, chunks) = if size <= st.single_get_max_bytes || st.concurrency == 1 {
            // Small objects: one plain GET; parallel requests cannot win back their latency.
            req.chunk(0, 0, true, &mut buf[..], &etag, &hashing, None)
                .await?;
            ("single", 1)
        } else if st.split_below_mb_s == 0 {
            // Static plan: ranged GETs of chunk_bytes, `concurrency` in flight.
            let chunks = buf.len().div_ceil(chunk);
            futures_util::stream::iter(buf.chunks_mut(chunk).enumerate().map(Ok))
                .try_for_each_concurrent(st.concurrency, |(i, slice)| {
                    req.chunk(i, (i * chunk) as u64, false, slice, &etag, &hashing, None)
                })
                .await?;
            ("ranged", chunks)
        } else {
            // Adaptive plan: one plain GET of the whole object, judged after its first bytes.
            // A local server (moto, MinIO on loopback) streams 300-550 MB/s on one connection
            // and serves ranged GETs badly (moto: 98 MB in 0.3 s on one GET, 1.35 s as 12
            // ranges): the GET just goes on. Real S3 gives one connection 60-90 MB/s: the GET
            // keeps the next chunk_bytes, and the rest of the object is fetched as ranged GETs
            // on concurrency-1 more connections.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let probe = Probe {
                after: chunk.min(2 << 20),
                split_below_bytes_per_s: st.split_below_mb_s as f64 * 1e6,
                keep: chunk,
                tail: tx,
            };
            let head = req.chunk(0, 0, true, &mut buf[..], &etag, &hashing, Some(probe));
            let tail = async {
                let Ok(Some(tail)) = rx.await else {
                    return Ok(0);
                };
                let base = size_usize - tail.len();
                let n = tail.len().div_ceil(chunk);
                futures_util::stream::iter(tail.chunks_mut(chunk).enumerate().map(Ok))
                    .try_for_each_concurrent((st.concurrency - 1).max(1), |(j, slice)| {
                        let start = (base + j * chunk) as u64;
                        req.chunk(1 + j, start, false, slice, &etag, &hashing, None)
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
        let Hashing {
            hasher,
            front,
            waiting,
        } = hashing
            .into_inner()
            .expect("no chunk panicked holding the lock");
        assert!(
            front == chunks && waiting.is_empty(),
            "every chunk was hashed, in order"
        );
        drop(waiting);
        let sha256 = hex(&hasher.finalize());
        let fetch_ms = ms(t0);
        let body_s = ((fetch_ms - head_ms) / 1e3).max(1e-9);
        Ok(Artifact {
            bytes: ModelBytes::Heap(buf),
            source: uri.to_owned(),
            sha256: Some(sha256),
            stats: FetchStats {
                plan,
                head_ms,
                fetch_ms,
                bytes: size,
                mb_per_s: size as f64 / 1e6 / body_s,
                chunks,
                retries: progress.retries.load(Ordering::Relaxed),
                etag: Some(etag),
            },
        })
    }
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

/// The in-order hash over chunks that complete out of order.
struct Hashing<'b> {
    hasher: Sha256,
    /// The chunk whose bytes the hasher takes next; every chunk before it is hashed.
    front: usize,
    /// Chunks finished before the front reached them: their not-yet-hashed bytes.
    waiting: BTreeMap<usize, &'b [u8]>,
}

/// The adaptive plan's decision point, carried by its plain GET of the whole object.
struct Probe<'b> {
    /// Bytes after which the connection's rate is judged.
    after: usize,
    /// Split when the rate so far (first-byte latency included) is below this.
    split_below_bytes_per_s: f64,
    /// Bytes the plain GET keeps fetching after the decision.
    keep: usize,
    /// Where the tail goes (`None`: no split).
    tail: tokio::sync::oneshot::Sender<Option<&'b mut [u8]>>,
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
    /// Size and ETag of the object.
    async fn head(&self) -> Result<(u64, String), ArtifactError> {
        let mut attempt = 1;
        loop {
            let r = self
                .client
                .head_object()
                .bucket(self.bucket)
                .key(self.key)
                .send()
                .await;
            let failure = match r {
                Ok(h) => {
                    let size = h.content_length().unwrap_or(-1);
                    let Ok(size) = u64::try_from(size) else {
                        return Err(ArtifactError::Io(format!(
                            "{}: HEAD gave no Content-Length",
                            self.uri
                        )));
                    };
                    // Without an ETag there is nothing to pin the GETs to; S3 always sends one.
                    let etag = h.e_tag().unwrap_or_default().to_owned();
                    return Ok((size, etag));
                }
                Err(e) => classify(self.uri, "HEAD", &e),
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

    /// Fetches chunk `i` (`slice.len()` bytes from `start`) into `slice`, resuming where a broken
    /// body stopped, and feeds the in-order hash.
    #[allow(clippy::too_many_arguments)]
    async fn chunk<'b>(
        &self,
        i: usize,
        start: u64,
        whole: bool,
        mut slice: &'b mut [u8],
        etag: &str,
        hashing: &Mutex<Hashing<'b>>,
        mut probe: Option<Probe<'b>>,
    ) -> Result<(), ArtifactError> {
        let mut len = slice.len();
        let (mut written, mut hashed) = (0usize, 0usize);
        let mut attempt = 1;
        // When the first frame landed, and how many bytes had by then: the probe's rate runs
        // from there, so that the request's first-byte latency (which parallel GETs pay too)
        // does not count as slowness.
        let mut first_frame: Option<(Instant, usize)> = None;
        // Set when the probe handed the tail away while this plain GET still streams the whole
        // object: the rest of its body is someone else's and is dropped unread.
        let mut truncated = false;
        while written < len {
            let from = start + written as u64;
            let to = start + len as u64 - 1;
            let mut get = self.client.get_object().bucket(self.bucket).key(self.key);
            if !etag.is_empty() {
                get = get.if_match(etag);
            }
            if !(whole && written == 0) {
                get = get.range(format!("bytes={from}-{to}"));
            }
            let failure = match get.send().await {
                Err(e) => classify(self.uri, "GET", &e),
                Ok(resp) => {
                    let want = (len - written) as i64;
                    if resp.content_length().is_some_and(|n| n != want) {
                        // An object that grew or shrank since the HEAD (without If-Match
                        // support on the server), or a server ignoring Range.
                        return Err(ArtifactError::Io(format!(
                            "{}: GET bytes {from}-{to} answered {} bytes, expected {want}",
                            self.uri,
                            resp.content_length().unwrap_or(-1)
                        )));
                    }
                    let mut body: ByteStream = resp.body;
                    loop {
                        match body.next().await {
                            Some(Ok(frame)) => {
                                let mut end = written + frame.len();
                                if end > len {
                                    if !truncated {
                                        return Err(ArtifactError::Io(format!(
                                            "{}: GET bytes {from}-{to} sent more than asked",
                                            self.uri
                                        )));
                                    }
                                    end = len;
                                }
                                let n = end - written;
                                slice[written..end].copy_from_slice(&frame[..n]);
                                written = end;
                                self.progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
                                {
                                    let mut h = hashing.lock().expect("hash lock");
                                    if h.front == i {
                                        h.hasher.update(&slice[hashed..written]);
                                        hashed = written;
                                    }
                                }
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
                                    let split = written + p.keep;
                                    let tail = if rate < p.split_below_bytes_per_s
                                        && split + p.keep < len
                                    {
                                        let (head, tail) =
                                            std::mem::take(&mut slice).split_at_mut(split);
                                        slice = head;
                                        len = split;
                                        truncated = true;
                                        Some(tail)
                                    } else {
                                        None
                                    };
                                    // The receiver is gone only if the fetch already failed.
                                    let _ = p.tail.send(tail);
                                }
                                if written == len {
                                    break Failure::Transient(String::new());
                                }
                            }
                            Some(Err(e)) => {
                                break Failure::Transient(format!(
                                    "{}: body of bytes {from}-{to} broke after {} bytes: {}",
                                    self.uri,
                                    written as u64 + start - from,
                                    DisplayErrorContext(&e)
                                ))
                            }
                            None if written == len => break Failure::Transient(String::new()),
                            None => {
                                break Failure::Transient(format!(
                                    "{}: body of bytes {from}-{to} ended early, at {} bytes",
                                    self.uri,
                                    written as u64 + start - from
                                ))
                            }
                        }
                    }
                }
            };
            if written == len {
                break;
            }
            self.backoff_or_fail(failure, &mut attempt).await?;
        }
        // Done: hash what is left if this chunk is the front, then every finished chunk behind
        // it; otherwise leave the unhashed rest for the front to pick up.
        let rest: &'b [u8] = &slice[hashed..];
        let mut h = hashing.lock().expect("hash lock");
        if h.front == i {
            h.hasher.update(rest);
            h.front += 1;
            loop {
                let next = h.front;
                let Some(waiting) = h.waiting.remove(&next) else {
                    break;
                };
                h.hasher.update(waiting);
                h.front += 1;
            }
        } else {
            h.waiting.insert(i, rest);
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
    match e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = e.code().unwrap_or("");
            let msg = format!("{uri}: {op} answered HTTP {status} {code}");
            match (status, code) {
                (404, _) | (_, "NoSuchKey") | (_, "NoSuchBucket") => Failure::Fatal(
                    ArtifactError::NotFound(format!("{msg} (no such bucket or key)")),
                ),
                (401 | 403, _) => Failure::Fatal(ArtifactError::AccessDenied(format!(
                    "{msg} (check the function role's s3:GetObject on this object, and the \
                     bucket's region)"
                ))),
                (412, _) => Failure::Fatal(ArtifactError::Io(format!(
                    "{msg}: the object changed during the download (ETag no longer matches)"
                ))),
                (408 | 429 | 500..=599, _) | (_, "SlowDown") | (_, "RequestTimeout") => {
                    Failure::Transient(msg)
                }
                _ => Failure::Fatal(ArtifactError::Io(format!("{msg}: {detail}"))),
            }
        }
        SdkError::ConstructionFailure(_) => {
            Failure::Fatal(ArtifactError::Io(format!("{uri}: {op}: {detail}")))
        }
        // Connection refused or reset, timeouts, unparseable responses: the network's fault,
        // worth another try.
        _ => Failure::Transient(format!("{uri}: {op} failed: {detail}")),
    }
}
