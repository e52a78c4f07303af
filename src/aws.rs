//! AWS clients: the one place that builds them, from aws-config's default chain.
//!
//! Credentials, region and endpoint come from the standard sources the SDK reads itself
//! (AWS_ACCESS_KEY_ID/..., the Lambda container credentials, AWS_REGION, AWS_ENDPOINT_URL_S3 or
//! AWS_ENDPOINT_URL, ~/.aws/config). The only thing we add is the HTTP client: rustls on *ring*
//! instead of the SDK's default rustls on aws-lc-rs, whose C build (aws-lc-sys) costs minutes per
//! clean build and brings nothing S3 needs (both speak TLS 1.2/1.3 with the same cipher suites).
//! Must not know what the clients are used for (model fetch, job results).

use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

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
