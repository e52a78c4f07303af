//! Model artifacts: where the GGUF bytes come from, and proof of what they are.
//!
//! Used once, at init: the bytes are fetched through an [`ArtifactStore`] (a local file, mapped;
//! or S3, downloaded in parallel and hashed as it lands: [`s3`], [`landing`]), hashed with
//! SHA-256 and checked against MODEL_SHA256 before anything is served. Must not parse the model, and must
//! not be called on the request path.

pub mod landing;
pub mod s3;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use sha2::{Digest, Sha256};

use crate::config::{Config, ModelUri};

/// Why the model could not be had. [`ArtifactError::error_type`] is the stable `errorType` of the
/// init failure, the one place its name is written; the message (`Display`) does not repeat it,
/// so an entry point that prints `"{type}: {message}"` says it once.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("model {uri} has sha256 {actual}, MODEL_SHA256 expects {expected}")]
    DigestMismatch {
        uri: String,
        expected: String,
        actual: String,
    },
    /// The fetch did not finish within its deadline (MODEL_FETCH_TIMEOUT_S).
    #[error("{0}")]
    Timeout(String),
    /// Transport or server failures that outlived their retries, or an object that changed
    /// during the download.
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Unsupported(String),
}

impl ArtifactError {
    /// Whether retrying cannot help in this execution environment: the configuration, the
    /// object or its permissions must change first (and changing them starts new environments).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ArtifactError::NotFound(_)
                | ArtifactError::AccessDenied(_)
                | ArtifactError::DigestMismatch { .. }
                | ArtifactError::Unsupported(_)
        )
    }

    /// The stable Lambda `errorType` for an init failure of this kind.
    pub fn error_type(&self) -> &'static str {
        match self {
            ArtifactError::NotFound(_) => "ModelNotFound",
            ArtifactError::AccessDenied(_) => "AccessDenied",
            ArtifactError::DigestMismatch { .. } => "DigestMismatch",
            ArtifactError::Timeout(_) => "Timeout",
            ArtifactError::Io(_) => "FetchFailed",
            ArtifactError::Unsupported(_) => "InvalidConfig",
        }
    }
}

/// The model's bytes: a finished download or a read-only mapping of a local file.
pub enum ModelBytes {
    Landed(landing::Landed),
    /// The image's model is a read-only file in the page cache: mapping it costs one syscall,
    /// where reading it into a fresh buffer costs a copy and ~6k page faults (~25 ms for 25 MB).
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for ModelBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ModelBytes::Landed(v) => v,
            ModelBytes::Mapped(m) => m,
        }
    }
}

/// How a fetch went, for the cold-start breakdown.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FetchStats {
    /// `file` (mapped), `single` (one plain GET), `probe` (a plain GET judged fast enough to go
    /// on alone), `probe+split` (judged slow, joined by ranged GETs) or `ranged` (split at once).
    pub plan: &'static str,
    /// Until the first GET's response headers (size and ETag known), ms (S3 only).
    pub first_byte_ms: f64,
    /// Until the last byte landed, ms.
    pub fetch_ms: f64,
    pub bytes: u64,
    /// Body throughput (after the first byte), MB/s (10^6 bytes).
    pub mb_per_s: f64,
    /// GET requests the body was split into (0 for a mapped file).
    pub chunks: usize,
    /// Requests repeated after a transient failure.
    pub retries: u32,
    /// The object's ETag (S3), pinned with If-Match on every GET.
    pub etag: Option<String>,
}

/// A source of model bytes. Implemented by [`FileArtifactStore`] and [`s3::S3ArtifactStore`];
/// the only seam where a fake may stand in for the outside world at init.
pub trait ArtifactStore: Send + Sync {
    /// Fetches the whole model named by `uri` into memory.
    fn fetch<'a>(
        &'a self,
        uri: &'a ModelUri,
    ) -> Pin<Box<dyn Future<Output = Result<Artifact, ArtifactError>> + Send + 'a>>;
}

/// Model bytes in memory, not yet verified.
pub struct Artifact {
    pub bytes: ModelBytes,
    pub source: String,
    pub digest: ModelDigest,
    pub stats: FetchStats,
}

/// The SHA-256 of an artifact's bytes, as far as the store got with it.
pub enum ModelDigest {
    /// Computed by a thread that followed the download (finished, or finishing the part that
    /// was left when the last byte landed at `landed_at`).
    Following {
        digest: landing::PendingDigest,
        landed_at: std::time::Instant,
    },
    /// Not computed: the caller hashes the bytes (a mapped file, hashed in parallel with the
    /// engine build, see `App::build`).
    ByCaller,
}

impl ModelDigest {
    /// Whether [`wait`](Self::wait) would return at once.
    pub fn is_ready(&self) -> bool {
        matches!(self, ModelDigest::Following { digest, .. } if digest.is_finished())
    }

    /// The lowercase hex digest of `bytes`, and the ms it cost beyond the fetch: the hashing
    /// left after the last byte landed, or the whole hash when the caller computes it.
    pub fn wait(self, bytes: &[u8]) -> (String, f64) {
        let t = std::time::Instant::now();
        let hashed_here = || (sha256_hex(bytes), t.elapsed().as_secs_f64() * 1e3);
        match self {
            ModelDigest::Following { digest, landed_at } => match digest.wait() {
                Some((sha, ready_at)) => (
                    sha,
                    ready_at.saturating_duration_since(landed_at).as_secs_f64() * 1e3,
                ),
                // Only when the download was given up, which `bytes` says it was not.
                None => hashed_here(),
            },
            ModelDigest::ByCaller => hashed_here(),
        }
    }
}

/// Fetches the model named by `config.model_uri` through the store for its scheme. The caller
/// [`verify`]s the digest before serving anything.
pub async fn fetch(config: &Config) -> Result<Artifact, ArtifactError> {
    match &config.model_uri {
        uri @ ModelUri::File(_) => FileArtifactStore.fetch(uri).await,
        uri @ ModelUri::S3 { .. } => {
            let sdk = crate::aws::sdk_config().await;
            let client = crate::aws::s3_client_at(
                &sdk,
                config.s3_force_path_style,
                config.s3_endpoint.as_deref(),
            );
            s3::S3ArtifactStore::new(&client, config.fetch)
                .fetch(uri)
                .await
        }
    }
}

/// Local files (`file://` and plain paths): the model baked into the image, or a dev file.
pub struct FileArtifactStore;

impl ArtifactStore for FileArtifactStore {
    fn fetch<'a>(
        &'a self,
        uri: &'a ModelUri,
    ) -> Pin<Box<dyn Future<Output = Result<Artifact, ArtifactError>> + Send + 'a>> {
        Box::pin(async move {
            match uri {
                // Mapping with MAP_POPULATE reads the whole file (seconds for a multi-GB model on
                // a cold image layer): on a blocking thread, so the init budget's timer on the
                // async thread keeps running.
                ModelUri::File(p) => {
                    let p = p.clone();
                    tokio::task::spawn_blocking(move || read_file(&p))
                        .await
                        .map_err(|e| ArtifactError::Io(format!("reading the model file: {e}")))?
                }
                other => Err(ArtifactError::Unsupported(format!(
                    "{other}: not a file URI"
                ))),
            }
        })
    }
}

fn read_file(path: &Path) -> Result<Artifact, ArtifactError> {
    let source = path.display().to_string();
    let t0 = std::time::Instant::now();
    let f = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ArtifactError::NotFound(format!("{source}: no such file")),
        std::io::ErrorKind::PermissionDenied => {
            ArtifactError::AccessDenied(format!("{source}: {e}"))
        }
        _ => ArtifactError::Io(format!("{source}: {e}")),
    })?;
    // SAFETY: the mapping is only read, and the model file is not modified while the process
    // runs (in the image it lives on a read-only layer); a file truncated underneath would
    // SIGBUS rather than serve a wrong model, and the digest check covers content changes
    // before serving. MAP_POPULATE maps every page in one go instead of faulting them singly.
    let bytes = unsafe { memmap2::MmapOptions::new().populate().map(&f) }
        .map(ModelBytes::Mapped)
        .map_err(|e| ArtifactError::Io(format!("{source}: {e}")))?;
    let bytes_len = bytes.len() as u64;
    Ok(Artifact {
        bytes,
        source,
        digest: ModelDigest::ByCaller,
        stats: FetchStats {
            plan: "file",
            fetch_ms: t0.elapsed().as_secs_f64() * 1e3,
            bytes: bytes_len,
            ..FetchStats::default()
        },
    })
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::hex::hex(&Sha256::digest(bytes))
}

/// Fails with both digests named when `expected` is set and differs.
pub fn verify(source: &str, actual: &str, expected: Option<&str>) -> Result<(), ArtifactError> {
    match expected {
        Some(exp) if !exp.eq_ignore_ascii_case(actual) => Err(ArtifactError::DigestMismatch {
            uri: source.to_owned(),
            expected: exp.to_owned(),
            actual: actual.to_owned(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_is_read_hashed_and_verified() {
        let dir = std::env::temp_dir().join(format!("li-art-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.gguf");
        std::fs::write(&p, b"abc").unwrap();
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let fetch = |uri: ModelUri| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(FileArtifactStore.fetch(&uri))
        };
        let a = fetch(ModelUri::File(p.clone())).unwrap();
        assert_eq!(&a.bytes[..], b"abc");
        assert_eq!(sha256_hex(&a.bytes), sha);
        verify(&a.source, sha, Some(&sha.to_uppercase())).unwrap();
        let e = verify(&a.source, sha, Some(&"0".repeat(64))).unwrap_err();
        assert_eq!(e.error_type(), "DigestMismatch");
        assert!(e.to_string().contains(sha), "{e}");
        let e = fetch(ModelUri::File(dir.join("nope.gguf"))).err().unwrap();
        assert_eq!(e.error_type(), "ModelNotFound");
    }
}
