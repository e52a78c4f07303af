//! Configuration: every environment variable the function reads, read once, validated into typed
//! values. Errors name the variable. Nothing else in the crate calls `std::env::var` (the AWS SDK
//! reads its own standard variables, AWS_ENDPOINT_URL_S3 and friends).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::{ApiKeys, Limits};

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelUri {
    /// A local file (`file:///path` or a plain path): the model baked into the image, or a dev file.
    File(PathBuf),
    /// `s3://bucket/key`.
    S3 { bucket: String, key: String },
}

impl std::fmt::Display for ModelUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelUri::File(p) => write!(f, "{}", p.display()),
            ModelUri::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

/// An S3 prefix: where job results go (`RESULTS_URI=s3://bucket/prefix/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Empty or ending in `/`.
    pub prefix: String,
}

/// Parses `s3://bucket[/prefix]` for RESULTS_URI; the prefix gets a trailing `/`.
pub fn parse_results_uri(v: &str) -> Result<S3Location, ConfigError> {
    let rest = v.strip_prefix("s3://").ok_or_else(|| {
        err(
            "RESULTS_URI",
            format!("expected s3://bucket/prefix/, got {v:?}"),
        )
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !bucket_ok {
        return Err(err(
            "RESULTS_URI",
            format!("{bucket:?} is not a valid S3 bucket name"),
        ));
    }
    if prefix.split('/').any(|seg| seg == "..") {
        return Err(err("RESULTS_URI", "the prefix must not contain \"..\""));
    }
    let mut prefix = prefix.to_owned();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok(S3Location {
        bucket: bucket.to_owned(),
        prefix,
    })
}

/// A configuration error: which variable, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

fn err(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

/// Typed configuration of one execution environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub model_uri: ModelUri,
    /// Lowercase hex SHA-256 the model must have; `None`: computed and reported, not enforced.
    pub model_sha256: Option<String>,
    /// Overrides the reported model id.
    pub model_id: Option<String>,
    pub limits: Limits,
    /// Compute threads, and how the number was chosen (for the logs).
    pub threads: usize,
    pub threads_reason: String,
    /// How the model is downloaded from S3.
    pub fetch: FetchSettings,
    /// S3_FORCE_PATH_STYLE: `endpoint/bucket/key` addressing (MinIO, moto, any server behind a
    /// plain host name). Endpoints given as an IP address get path style without it.
    pub s3_force_path_style: bool,
    /// INIT_BUDGET_MS: how long the init phase waits for the model before the runtime loop starts
    /// anyway and the first invoke awaits the rest of the load. Lambda kills an on-demand init at
    /// 10 s, so the default (9 s) leaves one second for the runtime to register.
    pub init_budget: Duration,
    /// AWS_LAMBDA_INITIALIZATION_TYPE=provisioned-concurrency: init has no 10 s cap there and is
    /// not on a caller's clock, so the whole load happens at init whatever the budget.
    pub wait_for_whole_load: bool,
    /// FUNCTION_URL_INVOKE_MODE=RESPONSE_STREAM: the function's URL streams (the template's does),
    /// so every Function URL answer goes out through response streaming (metadata prelude + body),
    /// not only `stream: true` ones; a buffered answer would reach the client as the raw envelope.
    /// The event does not say which mode its URL has, hence the variable. Default BUFFERED.
    pub function_url_streaming: bool,
    /// INT8_KERNEL: `auto` (AVX-512 VNNI where the CPU has it, else AVX2) or `avx2` (force the
    /// AVX2 kernel, to compare the two on one machine).
    pub int8_vnni: bool,
    /// AWS_LAMBDA_FUNCTION_NAME (set by Lambda): the dimension of the cold-start metrics.
    pub function_name: Option<String>,
    /// S3_ENDPOINT_URL: an S3-compatible endpoint (MinIO, moto) for the model and the results,
    /// with path-style addressing unless S3_FORCE_PATH_STYLE=false. Unlike the SDK's own
    /// AWS_ENDPOINT_URL_S3 (also honoured), an empty value means unset, so a SAM template can pass
    /// a parameter through as is.
    pub s3_endpoint: Option<String>,
    /// RESULTS_URI: where SQS job results go; unset: SQS batches are not acknowledged and
    /// `GET /v1/jobs/{id}` answers 404.
    pub results_uri: Option<S3Location>,
    /// JOBS_QUEUE_URL: where `POST /v1/jobs` sends; unset: that route answers 404.
    pub jobs_queue_url: Option<String>,
    /// API_KEYS_SECRET_ARN (ApiAuth=KEY): the Secrets Manager secret holding the keys API Gateway
    /// requests must carry, `{"key": "...", "keys"?: [...]}`, read once at init. Empty = unset
    /// (`sam local` passes an unset template value as ""); unset: keys are not checked (unless
    /// API_KEYS).
    pub api_keys_secret_arn: Option<String>,
    /// API_KEYS: more accepted keys, comma-separated, for local runs and tests without Secrets
    /// Manager (in AWS use the secret: a variable is readable by anyone who can read the
    /// function's configuration). Hashed here; the plain keys are not kept.
    pub api_keys: Option<ApiKeys>,
}

/// Model download settings (S3). Defaults are measured; README "Model from S3" has the figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchSettings {
    /// MODEL_FETCH_CHUNK_MB: bytes per ranged GET.
    pub chunk_bytes: u64,
    /// MODEL_FETCH_CONCURRENCY: ranged GETs in flight.
    pub concurrency: usize,
    /// MODEL_FETCH_SINGLE_GET_MAX_MB: objects up to this size come in one plain GET.
    pub single_get_max_bytes: u64,
    /// MODEL_FETCH_SPLIT_BELOW_MBPS: larger objects start as one plain GET; if its first bytes
    /// arrive slower than this (MB/s), the rest is split into ranged GETs. 0: always ranged.
    pub split_below_mb_s: u64,
    /// MODEL_FETCH_ATTEMPTS: tries per request (the first GET, each chunk) on transient errors.
    pub attempts: u32,
    /// MODEL_FETCH_TIMEOUT_S: the whole fetch (every GET and retry) must end by then.
    pub deadline: Duration,
}

impl Default for FetchSettings {
    fn default() -> Self {
        const MIB: u64 = 1024 * 1024;
        Self {
            chunk_bytes: 8 * MIB,
            concurrency: 8,
            single_get_max_bytes: 8 * MIB,
            split_below_mb_s: 150,
            attempts: 4,
            deadline: Duration::from_secs(120),
        }
    }
}

/// Where the image keeps its default model (Dockerfile.lambda copies it there).
pub const IMAGE_DEFAULT_MODEL: &str = "/opt/models/default.gguf";
/// The local default, made by `scripts/fetch-models`.
pub const LOCAL_DEFAULT_MODEL: &str = "models/default.gguf";

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let model_uri = match get("MODEL_URI") {
            Some(v) => parse_model_uri(v.trim())?,
            None => default_model()?,
        };
        let model_sha256 = match get("MODEL_SHA256") {
            Some(v) => {
                let v = v.trim().to_ascii_lowercase();
                if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(err(
                        "MODEL_SHA256",
                        format!("expected 64 hex digits, got {v:?}"),
                    ));
                }
                Some(v)
            }
            None => None,
        };
        let d = Limits::default();
        let limits = Limits {
            max_inputs: positive(&get, "MAX_INPUTS", d.max_inputs)?,
            max_input_tokens: positive(&get, "MAX_INPUT_TOKENS", d.max_input_tokens)?,
            max_new_tokens: positive(&get, "MAX_NEW_TOKENS", d.max_new_tokens)?,
            max_request_bytes: positive(&get, "MAX_REQUEST_BYTES", d.max_request_bytes)?,
        };
        let memory_mb = match get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE") {
            Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
                err(
                    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                    format!("not a number: {v:?}"),
                )
            })?),
            None => None,
        };
        let explicit = match get("THREADS") {
            Some(v) => Some(
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or_else(|| err("THREADS", format!("expected 1..=256, got {v:?}")))?,
            ),
            None => None,
        };
        let visible = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (threads, threads_reason) =
            compute_threads(explicit, memory_mb, cgroup_cpu_quota(), visible);
        const MIB: u64 = 1024 * 1024;
        let df = FetchSettings::default();
        let fetch = FetchSettings {
            chunk_bytes: ranged(&get, "MODEL_FETCH_CHUNK_MB", 1..=1024, df.chunk_bytes / MIB)?
                * MIB,
            concurrency: ranged(
                &get,
                "MODEL_FETCH_CONCURRENCY",
                1..=64,
                df.concurrency as u64,
            )? as usize,
            single_get_max_bytes: ranged(
                &get,
                "MODEL_FETCH_SINGLE_GET_MAX_MB",
                0..=1_000_000,
                df.single_get_max_bytes / MIB,
            )? * MIB,
            split_below_mb_s: ranged(
                &get,
                "MODEL_FETCH_SPLIT_BELOW_MBPS",
                0..=1_000_000,
                df.split_below_mb_s,
            )?,
            attempts: ranged(&get, "MODEL_FETCH_ATTEMPTS", 1..=20, df.attempts as u64)? as u32,
            deadline: Duration::from_secs(ranged(
                &get,
                "MODEL_FETCH_TIMEOUT_S",
                1..=900,
                df.deadline.as_secs(),
            )?),
        };
        let init_budget =
            Duration::from_millis(ranged(&get, "INIT_BUDGET_MS", 0..=900_000, 9_000)?);
        let s3_endpoint = match get("S3_ENDPOINT_URL") {
            Some(v) if v.trim().starts_with("http://") || v.trim().starts_with("https://") => {
                Some(v.trim().to_owned())
            }
            Some(v) => {
                return Err(err(
                    "S3_ENDPOINT_URL",
                    format!("expected http(s)://host[:port], got {v:?}"),
                ))
            }
            None => None,
        };
        let s3_force_path_style = match get("S3_FORCE_PATH_STYLE").as_deref().map(str::trim) {
            None => s3_endpoint.is_some(),
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => true,
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => false,
            Some(v) => {
                return Err(err(
                    "S3_FORCE_PATH_STYLE",
                    format!("expected true or false, got {v:?}"),
                ))
            }
        };
        let results_uri = get("RESULTS_URI")
            .map(|v| parse_results_uri(v.trim()))
            .transpose()?;
        let jobs_queue_url = match get("JOBS_QUEUE_URL") {
            Some(v) if v.trim().starts_with("https://") || v.trim().starts_with("http://") => {
                Some(v.trim().to_owned())
            }
            Some(v) => {
                return Err(err(
                    "JOBS_QUEUE_URL",
                    format!("expected the queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME), got {v:?}"),
                ))
            }
            None => None,
        };
        let function_url_streaming = match get("FUNCTION_URL_INVOKE_MODE").as_deref().map(str::trim)
        {
            None | Some("BUFFERED") => false,
            Some("RESPONSE_STREAM") => true,
            Some(v) => {
                return Err(err(
                    "FUNCTION_URL_INVOKE_MODE",
                    format!("expected BUFFERED or RESPONSE_STREAM, got {v:?}"),
                ))
            }
        };
        let int8_vnni = match get("INT8_KERNEL").as_deref().map(str::trim) {
            None | Some("auto") => true,
            Some("avx2") => false,
            Some(v) => {
                return Err(err(
                    "INT8_KERNEL",
                    format!("expected auto or avx2, got {v:?}"),
                ))
            }
        };
        let api_keys_secret_arn = match get("API_KEYS_SECRET_ARN") {
            Some(v) if v.trim().starts_with("arn:") && v.contains(":secretsmanager:") => {
                Some(v.trim().to_owned())
            }
            Some(v) => {
                return Err(err(
                    "API_KEYS_SECRET_ARN",
                    format!(
                        "expected a secret's ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME), got {:?}",
                        v.chars().take(200).collect::<String>()
                    ),
                ))
            }
            None => None,
        };
        let api_keys = match get("API_KEYS") {
            Some(v) => {
                let keys: Vec<&str> = v.split(',').map(str::trim).collect();
                for (i, k) in keys.iter().enumerate() {
                    // The message names the position, never the key.
                    crate::api::check_key(k)
                        .map_err(|e| err("API_KEYS", format!("key {}: {e}", i + 1)))?;
                }
                Some(ApiKeys::new(keys))
            }
            None => None,
        };
        let wait_for_whole_load = get("AWS_LAMBDA_INITIALIZATION_TYPE")
            .is_some_and(|v| v.trim() == "provisioned-concurrency");
        Ok(Config {
            model_uri,
            model_sha256,
            model_id: get("MODEL_ID").map(|s| s.trim().to_owned()),
            limits,
            threads,
            threads_reason,
            fetch,
            s3_force_path_style,
            init_budget,
            wait_for_whole_load,
            function_url_streaming,
            int8_vnni,
            function_name: get("AWS_LAMBDA_FUNCTION_NAME").map(|s| s.trim().to_owned()),
            s3_endpoint,
            results_uri,
            jobs_queue_url,
            api_keys_secret_arn,
            api_keys,
        })
    }
}

fn positive(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: usize,
) -> Result<usize, ConfigError> {
    match get(var) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| err(var, format!("expected a positive integer, got {v:?}"))),
    }
}

/// AWS_LAMBDA_RUNTIME_API (`host:port`, set by Lambda): where init errors are reported. Read
/// apart from [`Config`] because a configuration error must be reported through it too.
pub fn runtime_api_address() -> Option<String> {
    std::env::var("AWS_LAMBDA_RUNTIME_API")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// An integer variable within `range`, or `default` when unset.
fn ranged(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    range: std::ops::RangeInclusive<u64>,
    default: u64,
) -> Result<u64, ConfigError> {
    match get(var) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                err(
                    var,
                    format!(
                        "expected an integer in {}..={}, got {v:?}",
                        range.start(),
                        range.end()
                    ),
                )
            }),
    }
}

fn default_model() -> Result<ModelUri, ConfigError> {
    for p in [IMAGE_DEFAULT_MODEL, LOCAL_DEFAULT_MODEL] {
        if Path::new(p).exists() {
            return Ok(ModelUri::File(PathBuf::from(p)));
        }
    }
    Err(err(
        "MODEL_URI",
        format!(
            "unset, and no default model at {IMAGE_DEFAULT_MODEL} or ./{LOCAL_DEFAULT_MODEL} \
             (run scripts/fetch-models, or set MODEL_URI=s3://bucket/key.gguf or a path)"
        ),
    ))
}

/// Parses `s3://bucket/key`, `file:///path` or a plain path.
pub fn parse_model_uri(v: &str) -> Result<ModelUri, ConfigError> {
    if let Some(rest) = v.strip_prefix("s3://") {
        let (bucket, key) = rest
            .split_once('/')
            .filter(|(b, k)| !b.is_empty() && !k.is_empty())
            .ok_or_else(|| err("MODEL_URI", format!("expected s3://bucket/key, got {v:?}")))?;
        return Ok(ModelUri::S3 {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        });
    }
    if let Some(path) = v.strip_prefix("file://") {
        if path.is_empty() {
            return Err(err("MODEL_URI", "file:// needs a path"));
        }
        return Ok(ModelUri::File(PathBuf::from(path)));
    }
    if v.contains("://") {
        return Err(err(
            "MODEL_URI",
            format!("unsupported scheme in {v:?}: use s3://, file:// or a path"),
        ));
    }
    Ok(ModelUri::File(PathBuf::from(v)))
}

/// Chooses the compute pool size. Lambda shows every function 2+ CPUs but gives a *share* of a
/// vCPU proportional to memory (1,769 MB = one full vCPU, up to 6 at 10,240 MB); threads beyond
/// that share only contend. So: THREADS if set; otherwise the smallest of the memory-derived share,
/// the cgroup CPU quota and the visible CPUs.
pub fn compute_threads(
    explicit: Option<usize>,
    lambda_memory_mb: Option<u64>,
    cgroup_quota_cpus: Option<f64>,
    visible: usize,
) -> (usize, String) {
    if let Some(n) = explicit {
        return (n, format!("THREADS={n}"));
    }
    let mut n = visible.max(1);
    let mut why = format!("{visible} visible CPUs");
    if let Some(mb) = lambda_memory_mb {
        let share = (mb as f64 / 1769.0).ceil().max(1.0) as usize;
        if share < n {
            n = share;
            why = format!("{mb} MB Lambda memory = {share} vCPU share");
        }
    }
    if let Some(q) = cgroup_quota_cpus {
        let share = q.ceil().max(1.0) as usize;
        if share < n {
            n = share;
            why = format!("cgroup CPU quota {q:.2} CPUs");
        }
    }
    (n, why)
}

/// CPU quota from cgroup v2 `cpu.max` ("max 100000" means unlimited) or v1 cfs files.
fn cgroup_cpu_quota() -> Option<f64> {
    if let Ok(s) = std::fs::read_to_string("/sys/fs/cgroup/cpu.max") {
        let mut it = s.split_whitespace();
        let (q, p) = (it.next()?, it.next()?);
        if q == "max" {
            return None;
        }
        return Some(q.parse::<f64>().ok()? / p.parse::<f64>().ok()?);
    }
    let q: f64 = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let p: f64 = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (q > 0.0 && p > 0.0).then(|| q / p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.entry("MODEL_URI".into()).or_insert("/tmp/x.gguf".into());
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn model_uri_forms() {
        assert_eq!(
            parse_model_uri("s3://b/k/m.gguf").unwrap(),
            ModelUri::S3 {
                bucket: "b".into(),
                key: "k/m.gguf".into()
            }
        );
        assert_eq!(
            parse_model_uri("file:///a/b").unwrap(),
            ModelUri::File("/a/b".into())
        );
        assert_eq!(
            parse_model_uri("rel/m.gguf").unwrap(),
            ModelUri::File("rel/m.gguf".into())
        );
        for bad in [
            "s3://",
            "s3://bucket",
            "s3://bucket/",
            "http://x/y",
            "file://",
        ] {
            let e = parse_model_uri(bad).unwrap_err();
            assert_eq!(e.var, "MODEL_URI", "{bad}");
        }
    }

    #[test]
    fn results_uri_gets_a_trailing_slash() {
        let l = parse_results_uri("s3://my-bucket/jobs/results").unwrap();
        assert_eq!(
            (l.bucket.as_str(), l.prefix.as_str()),
            ("my-bucket", "jobs/results/")
        );
        let l = parse_results_uri("s3://my-bucket").unwrap();
        assert_eq!(l.prefix, "");
        let c = cfg(&[
            ("RESULTS_URI", "s3://b-1/r/"),
            ("JOBS_QUEUE_URL", "http://127.0.0.1:5000/123456789012/jobs"),
        ])
        .unwrap();
        assert_eq!(c.results_uri.unwrap().prefix, "r/");
        assert!(c.jobs_queue_url.unwrap().ends_with("/jobs"));
        assert!(!c.s3_force_path_style);
        let c = cfg(&[
            ("S3_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("S3_ENDPOINT_URL_X", ""),
        ])
        .unwrap();
        assert!(
            c.s3_force_path_style,
            "a custom endpoint defaults to path style"
        );
        assert!(cfg(&[("S3_ENDPOINT_URL", "")])
            .unwrap()
            .s3_endpoint
            .is_none());
    }

    #[test]
    fn errors_name_the_variable() {
        for (var, val) in [
            ("MODEL_SHA256", "abc"),
            ("MAX_INPUTS", "0"),
            ("MAX_INPUT_TOKENS", "-3"),
            ("MAX_REQUEST_BYTES", "lots"),
            ("THREADS", "0"),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "big"),
            ("MODEL_FETCH_CHUNK_MB", "0"),
            ("MODEL_FETCH_CONCURRENCY", "65"),
            ("MODEL_FETCH_SINGLE_GET_MAX_MB", "-1"),
            ("MODEL_FETCH_SPLIT_BELOW_MBPS", "fast"),
            ("MODEL_FETCH_ATTEMPTS", "x"),
            ("MODEL_FETCH_TIMEOUT_S", "0"),
            ("INIT_BUDGET_MS", "9s"),
            ("S3_FORCE_PATH_STYLE", "yes"),
            ("RESULTS_URI", "results/"),
            ("RESULTS_URI", "s3://Bad_Bucket/x"),
            ("RESULTS_URI", "s3://bucket/a/../b"),
            ("JOBS_QUEUE_URL", "jobs"),
            ("S3_ENDPOINT_URL", "localhost:9000"),
            ("FUNCTION_URL_INVOKE_MODE", "stream"),
            ("INT8_KERNEL", "vnni"),
            ("API_KEYS_SECRET_ARN", "ApiKeysSecret"),
            ("API_KEYS_SECRET_ARN", "arn:aws:s3:::bucket"),
            ("API_KEYS", "short"),
            ("API_KEYS", "a-long-enough-key-1,,a-long-enough-key-2"),
            ("API_KEYS", "a-long-enough key-1"),
        ] {
            let e = cfg(&[(var, val)]).unwrap_err();
            assert_eq!(e.var, var);
            assert!(e.to_string().starts_with(var), "{e}");
        }
    }

    #[test]
    fn api_keys_settings() {
        let c = cfg(&[]).unwrap();
        assert!(c.api_keys_secret_arn.is_none() && c.api_keys.is_none());
        // `sam local` passes an unset template value as "": unset, not an error.
        let c = cfg(&[("API_KEYS_SECRET_ARN", ""), ("API_KEYS", " ")]).unwrap();
        assert!(c.api_keys_secret_arn.is_none() && c.api_keys.is_none());
        let arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:keys-AbCdEf";
        let c = cfg(&[
            ("API_KEYS_SECRET_ARN", arn),
            ("API_KEYS", "local-key-0123456789, local-key-abcdefghij"),
        ])
        .unwrap();
        assert_eq!(c.api_keys_secret_arn.as_deref(), Some(arn));
        let keys = c.api_keys.unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.identify(b"local-key-abcdefghij").is_some());
        let e = cfg(&[("API_KEYS", "secret-but-too-short,x")]).unwrap_err();
        assert!(!e.to_string().contains("secret-but"), "{e}");
    }

    #[test]
    fn digest_is_normalized_and_limits_parse() {
        let c = cfg(&[
            ("MODEL_SHA256", &"AB".repeat(32)),
            ("MAX_INPUTS", "7"),
            ("THREADS", "3"),
        ])
        .unwrap();
        assert_eq!(c.model_sha256.unwrap(), "ab".repeat(32));
        assert_eq!(c.limits.max_inputs, 7);
        assert_eq!(c.threads, 3);
    }

    #[test]
    fn fetch_and_init_settings_parse_with_defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.fetch, FetchSettings::default());
        assert_eq!(c.init_budget, Duration::from_secs(9));
        assert!(!c.wait_for_whole_load && !c.s3_force_path_style);
        let c = cfg(&[
            ("MODEL_FETCH_CHUNK_MB", "4"),
            ("MODEL_FETCH_CONCURRENCY", "3"),
            ("MODEL_FETCH_SINGLE_GET_MAX_MB", "0"),
            ("MODEL_FETCH_TIMEOUT_S", "5"),
            ("INIT_BUDGET_MS", "250"),
            ("S3_FORCE_PATH_STYLE", "TRUE"),
            ("AWS_LAMBDA_INITIALIZATION_TYPE", "provisioned-concurrency"),
        ])
        .unwrap();
        assert_eq!(c.fetch.chunk_bytes, 4 << 20);
        assert_eq!(c.fetch.concurrency, 3);
        assert_eq!(c.fetch.single_get_max_bytes, 0);
        assert_eq!(c.fetch.deadline, Duration::from_secs(5));
        assert_eq!(c.init_budget, Duration::from_millis(250));
        assert!(c.wait_for_whole_load && c.s3_force_path_style);
        let c = cfg(&[("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand")]).unwrap();
        assert!(!c.wait_for_whole_load);
    }

    #[test]
    fn threads_follow_lambda_memory_and_quota_not_visible_cpus() {
        assert_eq!(compute_threads(None, Some(1024), None, 2).0, 1);
        assert_eq!(compute_threads(None, Some(1769), None, 2).0, 1);
        assert_eq!(compute_threads(None, Some(3538), None, 6).0, 2);
        assert_eq!(compute_threads(None, Some(10240), None, 6).0, 6);
        assert_eq!(compute_threads(None, None, Some(0.5), 4).0, 1);
        assert_eq!(compute_threads(None, None, Some(1.5), 4).0, 2);
        assert_eq!(compute_threads(None, None, None, 2).0, 2);
        assert_eq!(compute_threads(Some(4), Some(128), Some(0.1), 1).0, 4);
    }
}
