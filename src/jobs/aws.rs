//! The job ports on AWS: results in S3 (`RESULTS_URI`), submissions to SQS (`JOBS_QUEUE_URL`).
//!
//! The only module of `jobs` that names AWS types. Clients come from [`crate::aws`] (the default
//! credential chain; `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL_SQS` point them at moto or MinIO).
//! Must not decide what is retried: it only sorts each failure into transient or permanent.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;

use super::{BoxFuture, JobId, JobPorts, JobQueue, PutOutcome, ResultStore, StoreError};
use crate::aws::SdkFailure;
use crate::config::{Config, S3Location};

/// Results as `s3://bucket/prefix<id>.json`, written create-only.
pub struct S3ResultStore {
    client: aws_sdk_s3::Client,
    location: S3Location,
}

impl S3ResultStore {
    pub fn new(client: aws_sdk_s3::Client, location: S3Location) -> Self {
        Self { client, location }
    }

    fn key(&self, id: &JobId) -> String {
        format!("{}{id}.json", self.location.prefix)
    }
}

/// Sorts an SDK error by [`crate::aws::classify_sdk_error`]: throttling, 5xx, timeouts and network
/// failures are transient; the rest (access denied, no such bucket, a bad request) will not get
/// better by retrying.
fn classify<E>(what: &str, e: &SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let detail = DisplayErrorContext(e);
    match (crate::aws::classify_sdk_error(e), e.code()) {
        (SdkFailure::Transient, Some(code)) => {
            StoreError::Transient(format!("{what}: {code}: {detail}"))
        }
        (SdkFailure::Transient, None) => StoreError::Transient(format!("{what}: {detail}")),
        _ => StoreError::Permanent(format!("{what}: {detail}")),
    }
}

impl ResultStore for S3ResultStore {
    fn get<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            let key = self.key(id);
            let out = self
                .client
                .get_object()
                .bucket(&self.location.bucket)
                .key(&key)
                .send()
                .await;
            match out {
                Ok(o) => {
                    let bytes = o.body.collect().await.map_err(|e| {
                        StoreError::Transient(format!("reading {}: {e}", self.location(id)))
                    })?;
                    Ok(Some(bytes.into_bytes().to_vec()))
                }
                Err(SdkError::ServiceError(se)) if se.err().is_no_such_key() => Ok(None),
                Err(e) => Err(classify(&format!("GET {}", self.location(id)), &e)),
            }
        })
    }

    fn put_new<'a>(
        &'a self,
        id: &'a JobId,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<PutOutcome, StoreError>> {
        Box::pin(async move {
            let out = self
                .client
                .put_object()
                .bucket(&self.location.bucket)
                .key(self.key(id))
                .content_type("application/json")
                // Create-only: S3 answers 412 if the key exists (conditional writes, 2024).
                .if_none_match("*")
                .body(ByteStream::from(body))
                .send()
                .await;
            match out {
                Ok(_) => Ok(PutOutcome::Written),
                Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 412 => {
                    Ok(PutOutcome::AlreadyExists)
                }
                Err(e) => Err(classify(&format!("PUT {}", self.location(id)), &e)),
            }
        })
    }

    fn location(&self, id: &JobId) -> String {
        format!("s3://{}/{}", self.location.bucket, self.key(id))
    }
}

/// Submissions as SQS messages.
pub struct SqsJobQueue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl SqsJobQueue {
    pub fn new(client: aws_sdk_sqs::Client, url: String) -> Self {
        Self { client, url }
    }
}

impl JobQueue for SqsJobQueue {
    fn send<'a>(&'a self, body: String) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.client
                .send_message()
                .queue_url(&self.url)
                .message_body(body)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(&format!("SendMessage to {}", self.url), &e))
        })
    }
}

/// The ports the configuration asks for (none when RESULTS_URI and JOBS_QUEUE_URL are unset: no
/// SDK configuration is loaded then, so a function without jobs pays nothing at init).
pub async fn ports(config: &Config) -> JobPorts {
    if config.results_uri.is_none() && config.jobs_queue_url.is_none() {
        return JobPorts::default();
    }
    let sdk = crate::aws::sdk_config().await;
    JobPorts {
        results: config.results_uri.clone().map(|loc| {
            let client = crate::aws::s3_client_at(
                &sdk,
                config.s3_force_path_style,
                config.s3_endpoint.as_deref(),
            );
            std::sync::Arc::new(S3ResultStore::new(client, loc)) as std::sync::Arc<dyn ResultStore>
        }),
        queue: config.jobs_queue_url.clone().map(|url| {
            std::sync::Arc::new(SqsJobQueue::new(aws_sdk_sqs::Client::new(&sdk), url))
                as std::sync::Arc<dyn JobQueue>
        }),
    }
}
