//! AWS clients: the one place that builds them, from aws-config's default chain.
//!
//! Credentials, region and endpoint come from the standard sources the SDK reads itself
//! (AWS_ACCESS_KEY_ID/..., the Lambda container credentials, AWS_REGION, AWS_ENDPOINT_URL_S3 or
//! AWS_ENDPOINT_URL, ~/.aws/config). The only thing we add is the HTTP client: rustls on *ring*
//! instead of the SDK's default rustls on aws-lc-rs, whose C build (aws-lc-sys) costs minutes per
//! clean build and brings nothing S3 needs (both speak TLS 1.2/1.3 with the same cipher suites).
//! The clients must not know what they are used for (model fetch, job results); [`AWS_CALLS`] is
//! the one list of what the code does with them, which the functions' IAM roles in template.yaml
//! must grant and nothing more (tests/template_iam.rs checks both ways). The one call made here is
//! [`secret_string`], a plain read of a secret at init (what it holds is the caller's business).
//! [`classify_sdk_error`] is the one reading of an SDK error as retry-or-not, for every caller.

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

/// What an AWS SDK error means for a retry. The one classification of SDK errors: the model fetch
/// (artifacts/s3.rs) and the job ports (jobs/aws.rs) both use it, so they cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdkFailure {
    /// HTTP 404, `NoSuchKey`, `NoSuchBucket`.
    NotFound,
    /// HTTP 401 or 403: the role, the resource's policy or the region must change first.
    Denied,
    /// HTTP 412: a condition of the request (`If-Match`, `If-None-Match`) did not hold.
    PreconditionFailed,
    /// Throttling, a timeout, a 5xx (with or without an error code), the network: worth another
    /// try.
    Transient,
    /// Anything else (a bad request, a request the SDK could not build): retrying the same call
    /// will not help.
    Permanent,
}

/// Error codes that mean "try again" whatever the status they come with (S3, SQS, STS spellings).
const TRANSIENT_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "ConditionalRequestConflict",
];

/// Classifies a service's answer by its HTTP status and error code (`""` when it has none).
pub fn classify_service_error(status: u16, code: &str) -> SdkFailure {
    match (status, code) {
        (404, _) | (_, "NoSuchKey" | "NoSuchBucket") => SdkFailure::NotFound,
        (401 | 403, _) => SdkFailure::Denied,
        (412, _) => SdkFailure::PreconditionFailed,
        (408 | 429 | 500..=599, _) => SdkFailure::Transient,
        (_, code) if TRANSIENT_CODES.contains(&code) => SdkFailure::Transient,
        _ => SdkFailure::Permanent,
    }
}

/// Classifies any SDK call's error (S3, SQS, ...): a service's answer by its status and code, a
/// request that could not be built as permanent, and the rest (connection refused or reset,
/// timeouts, unparseable responses: the network's fault) as transient.
pub fn classify_sdk_error<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> SdkFailure {
    match e {
        SdkError::ServiceError(se) => {
            classify_service_error(se.raw().status().as_u16(), se.err().code().unwrap_or(""))
        }
        SdkError::ConstructionFailure(_) => SdkFailure::Permanent,
        _ => SdkFailure::Transient,
    }
}

/// Loads the shared SDK configuration through the default chain, with our HTTPS client.
///
/// Retries are the SDK's standard mode (3 attempts); callers that retry on their own terms (the
/// model fetch resumes a broken chunk where it stopped) switch them off per client.
pub async fn sdk_config() -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .load()
        .await
}

/// An S3 client on `sdk`. `force_path_style` (S3_FORCE_PATH_STYLE, see config.rs) makes requests
/// go to `endpoint/bucket/key` instead of `bucket.endpoint/key`: what MinIO, moto or any server
/// behind a plain host name needs. Endpoints given as an IP address use path style anyway.
pub fn s3_client(sdk: &SdkConfig, force_path_style: bool) -> aws_sdk_s3::Client {
    s3_client_at(sdk, force_path_style, None)
}

/// As [`s3_client`], at an explicit endpoint (S3_ENDPOINT_URL, see config.rs) when one is given.
pub fn s3_client_at(
    sdk: &SdkConfig,
    force_path_style: bool,
    endpoint: Option<&str>,
) -> aws_sdk_s3::Client {
    let mut conf = aws_sdk_s3::config::Builder::from(sdk).force_path_style(force_path_style);
    if let Some(url) = endpoint {
        conf = conf.endpoint_url(url);
    }
    aws_sdk_s3::Client::from_conf(conf.build())
}

/// Why a secret could not be read, sorted as the other AWS ports sort their failures: `permanent`
/// when retrying in this environment cannot help (no such secret, access denied, a KMS key the role
/// cannot use), transient otherwise (throttling, 5xx, network, timeout).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SecretError {
    pub message: String,
    pub permanent: bool,
}

/// The SecretString of secret `id` (an ARN or a name), read with the default chain's credentials;
/// the whole read (SDK retries included) ends within `timeout`.
pub async fn secret_string(
    sdk: &SdkConfig,
    id: &str,
    timeout: std::time::Duration,
) -> Result<String, SecretError> {
    use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
    let client = aws_sdk_secretsmanager::Client::new(sdk);
    let call = client.get_secret_value().secret_id(id).send();
    let fail = |permanent, message: String| SecretError { message, permanent };
    let out = match tokio::time::timeout(timeout, call).await {
        Err(_) => {
            return Err(fail(
                false,
                format!("GetSecretValue {id}: no answer within {timeout:?}"),
            ))
        }
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            let detail = DisplayErrorContext(&e);
            return Err(match &e {
                SdkError::ServiceError(se) => {
                    let code = e.code().unwrap_or("");
                    let status = se.raw().status().as_u16();
                    let msg = format!("GetSecretValue {id}: HTTP {status} {code}: {detail}");
                    let transient = matches!(status, 408 | 429 | 500..=599)
                        || matches!(
                            code,
                            "ThrottlingException" | "InternalServiceError" | "RequestTimeout"
                        );
                    fail(!transient, msg)
                }
                SdkError::ConstructionFailure(_) => {
                    fail(true, format!("GetSecretValue {id}: {detail}"))
                }
                // Connection refused or reset, timeouts, unparseable answers: worth another try.
                _ => fail(false, format!("GetSecretValue {id} failed: {detail}")),
            });
        }
    };
    out.secret_string.ok_or_else(|| {
        fail(
            true,
            format!(
                "secret {id} has no SecretString (a binary secret?): expected {{\"key\": \"...\"}}"
            ),
        )
    })
}

/// The function whose execution role makes a call (template.yaml: ApiFunctionRole,
/// WorkerFunctionRole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The API function (HTTP API, Function URL, direct invokes).
    Api,
    /// The SQS job worker.
    Worker,
    /// Both functions.
    Both,
}

impl Caller {
    /// Whether a call made by `self` is made by `role`'s function (`role` is `Api` or `Worker`).
    pub fn includes(self, role: Caller) -> bool {
        self == Caller::Both || self == role
    }
}

/// What a call touches, as template.yaml names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsResource {
    /// The model object, `ModelUri` (`s3://bucket/key`; only when the model comes from S3).
    ModelObject,
    /// Job results: objects under `results/` in `ResultsBucket` (`RESULTS_URI`).
    ResultsPrefix,
    /// `JobsQueue` (`JOBS_QUEUE_URL`).
    JobsQueue,
    /// `ApiKeysSecret` (`API_KEYS_SECRET_ARN`; only when `ApiAuth=KEY`).
    ApiKeysSecret,
}

/// One AWS API call the deployed code makes.
#[derive(Debug, Clone, Copy)]
pub struct AwsCall {
    pub caller: Caller,
    /// The IAM action, e.g. `s3:GetObject`.
    pub action: &'static str,
    pub resource: AwsResource,
    /// Where in the code, and why.
    pub why: &'static str,
}

/// Every AWS call the code deployed in the image makes (the `bootstrap` binary; the
/// `lambda-inference` tool's benchmarks are not deployed). What the Lambda service does with a role
/// on the function's behalf (logs, traces, polling SQS for the worker) is not a call of ours and is
/// listed in tests/template_iam.rs instead.
pub const AWS_CALLS: &[AwsCall] = &[
    AwsCall {
        caller: Caller::Both,
        action: "s3:GetObject",
        resource: AwsResource::ModelObject,
        why: "artifacts/s3.rs: the model fetch at init, plain and ranged GETs (If-Match)",
    },
    AwsCall {
        caller: Caller::Both,
        action: "s3:GetObject",
        resource: AwsResource::ResultsPrefix,
        why: "jobs/aws.rs S3ResultStore::get: GET /v1/jobs/{id} and the submit-time check (api), \
              the already-done check before a batch runs (worker)",
    },
    AwsCall {
        caller: Caller::Worker,
        action: "s3:PutObject",
        resource: AwsResource::ResultsPrefix,
        why: "jobs/aws.rs S3ResultStore::put_new: the create-only result write (If-None-Match)",
    },
    AwsCall {
        caller: Caller::Api,
        action: "sqs:SendMessage",
        resource: AwsResource::JobsQueue,
        why: "jobs/aws.rs SqsJobQueue::send: POST /v1/jobs",
    },
    AwsCall {
        caller: Caller::Api,
        action: "secretsmanager:GetSecretValue",
        resource: AwsResource::ApiKeysSecret,
        why: "aws.rs secret_string, called by app.rs: the accepted API keys, read at init \
              (ApiAuth=KEY)",
    },
];

#[cfg(test)]
mod sdk_error_tests {
    use super::*;
    use aws_sdk_s3::operation::get_object::GetObjectError;

    #[test]
    fn sdk_errors_are_classified_once_for_every_caller() {
        use SdkFailure::*;
        for (status, code, want) in [
            // A 5xx without a code: transient (jobs/aws.rs called it permanent).
            (500, "", Transient),
            (502, "", Transient),
            (503, "", Transient),
            (503, "SlowDown", Transient),
            (500, "InternalError", Transient),
            (408, "", Transient),
            (429, "", Transient),
            (400, "RequestTimeout", Transient),
            (400, "ThrottlingException", Transient),
            (400, "RequestThrottled", Transient),
            (409, "ConditionalRequestConflict", Transient),
            (404, "", NotFound),
            (404, "NoSuchKey", NotFound),
            (400, "NoSuchBucket", NotFound),
            (403, "AccessDenied", Denied),
            (401, "", Denied),
            (412, "PreconditionFailed", PreconditionFailed),
            (400, "InvalidArgument", Permanent),
            (400, "", Permanent),
            (409, "BucketAlreadyExists", Permanent),
        ] {
            assert_eq!(
                classify_service_error(status, code),
                want,
                "{status} {code:?}"
            );
        }
        let timeout: SdkError<GetObjectError, HttpResponse> =
            SdkError::timeout_error("read timed out");
        assert_eq!(classify_sdk_error(&timeout), Transient);
        let unbuildable: SdkError<GetObjectError, HttpResponse> =
            SdkError::construction_failure("no region");
        assert_eq!(classify_sdk_error(&unbuildable), Permanent);
    }
}
