//! Configuration: every environment variable the function reads, declared once in [`VARS`] (name,
//! parser, default, one-line doc), read once and validated into typed values; errors name the
//! variable. `tests/config_table.rs` checks the README's configuration table against [`VARS`].
//!
//! Must not: read anything but the lookup it is given (no /sys, no network: the compute pool's
//! size from the cgroup is `crate::threads`). The one exception is an unset MODEL_URI: the
//! default is the first of the two default model paths that exists.
//!
//! Nothing else in `src/` reads the environment, with these exceptions:
//! - the AWS SDK reads its own standard variables ([`SDK_VARS`]);
//! - the CLI's benches pass `std::env::var` to [`Config::from_lookup`] with MODEL_URI replaced;
//! - the converter's ignored `real_minilm` test reads MINILM_DIR (the folder it converts).
//!
//! Four variables are read before [`Config`] exists, by [`runtime_api_address`],
//! [`lambda_function_name`] and [`log_filters`]: an invalid configuration must still be logged
//! and reported to the Runtime API. They are declared in [`VARS`] like the rest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::api::{ApiKeys, Limits};

/// One environment variable as the README's configuration table shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var {
    pub name: &'static str,
    /// What an unset (or blank) variable means.
    pub unset: Unset,
    /// What it sets, in one line.
    pub doc: &'static str,
}

/// What an unset or blank variable means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unset {
    /// This value, written as one would set it and parsed like a set value (so the documented
    /// default is the one in force).
    Default(&'static str),
    /// No value; what happens instead.
    Means(&'static str),
}

/// Variables the README lists that the AWS SDK reads itself (default credential chain, endpoint
/// and region); the crate never reads them.
pub const SDK_VARS: &[&str] = &[
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_SQS",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// Declares the variables: `var::NAME` and [`VARS`] for each, and for those read into [`Config`]
/// the typed field of `Values` and its parser. A parser gets the raw value (never blank) and
/// says what is wrong without the variable's name; [`ConfigError`] adds it.
macro_rules! declare {
    (
        config {
            $( $field:ident : $ty:ty {
                name: $name:ident,
                parse: $parse:expr,
                $when:ident: $text:literal,
                doc: $doc:literal $(,)?
            } )*
        }
        before_config {
            $( $ename:ident { $ewhen:ident: $etext:literal, doc: $edoc:literal $(,)? } )*
        }
    ) => {
        /// Each variable's declaration, under its own name.
        pub mod var {
            use super::{Unset, Var};
            $(
                #[doc = $doc]
                pub const $name: Var =
                    Var { name: stringify!($name), unset: declare!(@unset $when $text), doc: $doc };
            )*
            $(
                #[doc = $edoc]
                pub const $ename: Var =
                    Var { name: stringify!($ename), unset: declare!(@unset $ewhen $etext), doc: $edoc };
            )*
        }

        /// Every variable the crate reads, in the order they are read.
        pub const VARS: &[Var] = &[$(var::$name,)* $(var::$ename,)*];

        /// The declared variables, parsed (before they are combined into [`Config`]).
        struct Values {
            $( $field: $ty, )*
        }

        impl Values {
            fn read(get: &dyn Fn(&str) -> Option<String>) -> Result<Values, ConfigError> {
                Ok(Values {
                    $( $field: declare!(@read $when, get, var::$name, $parse)?, )*
                })
            }
        }
    };
    (@unset default $text:literal) => { Unset::Default($text) };
    (@unset unset $text:literal) => { Unset::Means($text) };
    (@read default, $get:expr, $var:expr, $parse:expr) => { read_or_default($get, &$var, $parse) };
    (@read unset, $get:expr, $var:expr, $parse:expr) => { read_optional($get, &$var, $parse) };
}

declare! {
    config {
        model_uri: Option<ModelUri> {
            name: MODEL_URI,
            parse: |v| parse_model_uri(v.trim()).map_err(|e| e.message),
            unset: "`/opt/models/default.gguf` in the image, else `./models/default.gguf`",
            doc: "where the model comes from: `s3://bucket/key.gguf`, `file:///path` or a plain path",
        }
        model_sha256: Option<String> {
            name: MODEL_SHA256,
            parse: sha256,
            unset: "unset: computed, logged, shown on `/health`",
            doc: "the SHA-256 the model must have (64 hex digits); a mismatch fails init",
        }
        max_inputs: usize {
            name: MAX_INPUTS,
            parse: positive,
            default: "2048",
            doc: "inputs per embeddings request",
        }
        max_input_tokens: usize {
            name: MAX_INPUT_TOKENS,
            parse: positive,
            default: "8192",
            doc: "tokens per input or prompt; longer ones are refused",
        }
        max_new_tokens: usize {
            name: MAX_NEW_TOKENS,
            parse: positive,
            default: "512",
            doc: "generated tokens per request; a larger `max_tokens` is capped to it",
        }
        max_request_bytes: usize {
            name: MAX_REQUEST_BYTES,
            parse: positive,
            default: "6291456",
            doc: "request body size in bytes",
        }
        lambda_memory_mb: Option<u64> {
            name: AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
            parse: |v| v.trim().parse::<u64>().map_err(|_| format!("not a number: {v:?}")),
            unset: "set by Lambda",
            doc: "the function's memory in MB: the vCPU share the compute pool is sized to",
        }
        threads: Option<usize> {
            name: THREADS,
            parse: |v| {
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or_else(|| format!("expected 1..=256, got {v:?}"))
            },
            unset: "the vCPU share Lambda gives: `ceil(memory / 1769 MB)`, capped by the cgroup CPU quota and the visible CPUs",
            doc: "compute threads (1..=256)",
        }
        fetch_chunk_mb: u64 {
            name: MODEL_FETCH_CHUNK_MB,
            parse: ranged(1, 1024),
            default: "8",
            doc: "MiB per ranged GET of the model",
        }
        fetch_concurrency: u64 {
            name: MODEL_FETCH_CONCURRENCY,
            parse: ranged(1, 64),
            default: "8",
            doc: "ranged GETs in flight",
        }
        fetch_single_get_max_mb: u64 {
            name: MODEL_FETCH_SINGLE_GET_MAX_MB,
            parse: ranged(0, 1_000_000),
            default: "8",
            doc: "models up to this many MiB come in one plain GET",
        }
        fetch_split_below_mb_s: u64 {
            name: MODEL_FETCH_SPLIT_BELOW_MBPS,
            parse: ranged(0, 1_000_000),
            default: "150",
            doc: "a bigger model's plain GET slower than this (MB/s) is split into ranged GETs; 0: always ranged",
        }
        fetch_attempts: u64 {
            name: MODEL_FETCH_ATTEMPTS,
            parse: ranged(1, 20),
            default: "4",
            doc: "tries per request (the first GET, each chunk) on transient errors",
        }
        fetch_timeout_s: u64 {
            name: MODEL_FETCH_TIMEOUT_S,
            parse: ranged(1, 900),
            default: "120",
            doc: "seconds the whole fetch (every GET and retry) may take",
        }
        init_budget_ms: u64 {
            name: INIT_BUDGET_MS,
            parse: ranged(0, 900_000),
            default: "9000",
            doc: "how long init waits for the model before the runtime loop starts anyway",
        }
        s3_endpoint: Option<String> {
            name: S3_ENDPOINT_URL,
            parse: |v| {
                let t = v.trim();
                if t.starts_with("http://") || t.starts_with("https://") {
                    Ok(t.to_owned())
                } else {
                    Err(format!("expected http(s)://host[:port], got {v:?}"))
                }
            },
            unset: "unset",
            doc: "an S3-compatible endpoint (MinIO, moto) for the model and the job results",
        }
        s3_force_path_style: Option<bool> {
            name: S3_FORCE_PATH_STYLE,
            parse: |v| match v.trim() {
                t if t.eq_ignore_ascii_case("true") || t == "1" => Ok(true),
                t if t.eq_ignore_ascii_case("false") || t == "0" => Ok(false),
                _ => Err(format!("expected true or false, got {v:?}")),
            },
            unset: "true with `S3_ENDPOINT_URL`, else false (IP endpoints get it anyway)",
            doc: "`endpoint/bucket/key` addressing",
        }
        results_uri: Option<S3Location> {
            name: RESULTS_URI,
            parse: |v| parse_results_uri(v.trim()).map_err(|e| e.message),
            unset: "unset: SQS batches are not acknowledged, `GET /v1/jobs/{id}` 404",
            doc: "`s3://bucket/prefix/` where SQS job results go",
        }
        jobs_queue_url: Option<String> {
            name: JOBS_QUEUE_URL,
            parse: |v| {
                let t = v.trim();
                if t.starts_with("https://") || t.starts_with("http://") {
                    Ok(t.to_owned())
                } else {
                    Err(format!(
                        "expected the queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME), got {v:?}"
                    ))
                }
            },
            unset: "unset: that route 404",
            doc: "the SQS queue `POST /v1/jobs` sends to",
        }
        function_url_streaming: bool {
            name: FUNCTION_URL_INVOKE_MODE,
            parse: |v| match v.trim() {
                "BUFFERED" => Ok(false),
                "RESPONSE_STREAM" => Ok(true),
                _ => Err(format!("expected BUFFERED or RESPONSE_STREAM, got {v:?}")),
            },
            default: "BUFFERED",
            doc: "the invoke mode of the function's URL, which its events cannot tell",
        }
        rest_api_streaming: bool {
            name: REST_API_TRANSFER_MODE,
            parse: |v| match v.trim() {
                "BUFFERED" => Ok(false),
                "STREAM" => Ok(true),
                _ => Err(format!("expected BUFFERED or STREAM, got {v:?}")),
            },
            default: "BUFFERED",
            doc: "the response transfer mode of the REST API's integration, which its events cannot tell",
        }
        int8_kernel: Int8Kernel {
            name: INT8_KERNEL,
            parse: |v| match v.trim() {
                "auto" => Ok(Int8Kernel::Auto),
                "vnni" => Ok(Int8Kernel::Vnni),
                "avx2" => Ok(Int8Kernel::Avx2),
                "amx-bf16" => Ok(Int8Kernel::AmxBf16),
                _ => Err(format!("expected auto, vnni, avx2 or amx-bf16, got {v:?}")),
            },
            default: "auto",
            doc: "the int8 kernels: `auto` the fastest this CPU runs (embedder: AMX-INT8, AVX-512 VNNI, AVX2; generator: AVX-512 VNNI, AVX2); `vnni` never AMX; `avx2` never AVX-512; `amx-bf16` the embedder's weights rounded to bf16 for AMX-BF16 (faster on large batches, slower on one short input, twice the weights' memory)",
        }
        api_keys_secret_arn: Option<String> {
            name: API_KEYS_SECRET_ARN,
            parse: |v| {
                let t = v.trim();
                if t.starts_with("arn:") && v.contains(":secretsmanager:") {
                    Ok(t.to_owned())
                } else {
                    Err(format!(
                        "expected a secret's ARN (arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME), got {:?}",
                        v.chars().take(200).collect::<String>()
                    ))
                }
            },
            unset: "unset: no key checked (the template sets it under `ApiAuth=KEY`)",
            doc: "the Secrets Manager secret holding the API keys, read once at init",
        }
        api_keys: Option<ApiKeys> {
            name: API_KEYS,
            parse: api_keys,
            unset: "unset",
            doc: "more accepted API keys, comma-separated (local runs and tests)",
        }
        init_type: Option<InitType> {
            name: AWS_LAMBDA_INITIALIZATION_TYPE,
            parse: |v| Ok(match v.trim() {
                "provisioned-concurrency" => InitType::Provisioned,
                "snap-start" => InitType::SnapStart,
                _ => InitType::OnDemand,
            }),
            unset: "set by Lambda",
            doc: "`provisioned-concurrency` or `snap-start`: the whole model load happens at init; `snap-start` also runs the after-restore hooks",
        }
        model_id: Option<String> {
            name: MODEL_ID,
            parse: trimmed,
            unset: "GGUF `general.name`",
            doc: "the `model` reported in responses",
        }
        function_name: Option<String> {
            name: AWS_LAMBDA_FUNCTION_NAME,
            parse: trimmed,
            unset: "set by Lambda (`local` in the metrics outside it)",
            doc: "the function's name: the metrics' `FunctionName` dimension",
        }
        xray_daemon: Option<String> {
            name: AWS_XRAY_DAEMON_ADDRESS,
            parse: trimmed,
            unset: "set by Lambda when tracing is Active; unset: no subsegments",
            doc: "the X-Ray daemon's `host:port`: a sampled invoke sends its subsegments there",
        }
    }
    before_config {
        AWS_LAMBDA_RUNTIME_API {
            unset: "set by Lambda",
            doc: "`host:port` of the Runtime API, where an init error is reported",
        }
        RUST_LOG {
            unset: "`AWS_LAMBDA_LOG_LEVEL`",
            doc: "the log filter (`debug`, `lambda_inference=debug,info`, ...)",
        }
        AWS_LAMBDA_LOG_LEVEL {
            default: "info",
            doc: "the log level when RUST_LOG is unset (Lambda sets it from the logging config)",
        }
    }
}

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

/// Which int8 kernels the embedder and the generator may use (INT8_KERNEL); the fastest allowed
/// that the CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AMX where the CPU and the kernel grant it, else AVX-512 VNNI, else AVX2.
    Auto,
    /// AVX-512 VNNI at most (comparisons; AMX off).
    Vnni,
    /// AVX2 only: what every x86_64 Lambda host runs (comparisons).
    Avx2,
    /// The embedder on AMX-BF16 (bf16 weights) where AMX works: for batch-heavy deployments.
    AmxBf16,
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

/// Typed configuration of one execution environment. What each variable means is in [`VARS`];
/// the notes here are about the values.
#[derive(Debug, Clone)]
pub struct Config {
    pub model_uri: ModelUri,
    /// Lowercase hex SHA-256 the model must have; `None`: computed and reported, not enforced.
    pub model_sha256: Option<String>,
    /// Overrides the reported model id.
    pub model_id: Option<String>,
    pub limits: Limits,
    /// THREADS, if set; `crate::threads` sizes the pool from it, the memory and the cgroup.
    pub threads: Option<usize>,
    /// AWS_LAMBDA_FUNCTION_MEMORY_SIZE (set by Lambda).
    pub lambda_memory_mb: Option<u64>,
    /// How the model is downloaded from S3.
    pub fetch: FetchSettings,
    /// S3_FORCE_PATH_STYLE: `endpoint/bucket/key` addressing (MinIO, moto, any server behind a
    /// plain host name); on by default with S3_ENDPOINT_URL. Endpoints given as an IP address get
    /// path style without it.
    pub s3_force_path_style: bool,
    /// INIT_BUDGET_MS. Lambda kills an on-demand init at 10 s, so the default (9 s) leaves one
    /// second for the runtime to register.
    pub init_budget: Duration,
    /// AWS_LAMBDA_INITIALIZATION_TYPE=provisioned-concurrency: init has no 10 s cap there and is
    /// not on a caller's clock, so the whole load happens at init whatever the budget. Also
    /// under `snap-start`: the snapshot must hold the loaded model, or every environment restored
    /// from it would load the model again on its first invoke.
    pub wait_for_whole_load: bool,
    /// AWS_LAMBDA_INITIALIZATION_TYPE=snap-start: init ends in a snapshot, and the runtime runs
    /// the after-restore hooks (`app::LazyApp::after_restore`) before the first invoke.
    pub snap_start: bool,
    /// FUNCTION_URL_INVOKE_MODE=RESPONSE_STREAM: the function's URL streams (the template's does),
    /// so every Function URL answer goes out through response streaming (metadata prelude + body),
    /// not only `stream: true` ones; a buffered answer would reach the client as the raw envelope.
    pub function_url_streaming: bool,
    /// REST_API_TRANSFER_MODE=STREAM: the REST API in front of the function invokes it with
    /// response streaming (integration responseTransferMode STREAM, the template's
    /// RestApiStreaming), so every REST API answer goes out through response streaming and
    /// `stream: true` streams there; API Gateway could not read a buffered answer from it.
    pub rest_api_streaming: bool,
    /// INT8_KERNEL: which int8 kernels may run (see [`Int8Kernel`]).
    pub int8_kernel: Int8Kernel,
    /// AWS_LAMBDA_FUNCTION_NAME: the dimension of the metrics.
    pub function_name: Option<String>,
    /// AWS_XRAY_DAEMON_ADDRESS: where a sampled invoke's subsegments go (crate::xray).
    pub xray_daemon: Option<String>,
    /// S3_ENDPOINT_URL. Unlike the SDK's own AWS_ENDPOINT_URL_S3 (also honoured), an empty value
    /// means unset, so a SAM template can pass a parameter through as is.
    pub s3_endpoint: Option<String>,
    /// RESULTS_URI; unset: SQS batches are not acknowledged and `GET /v1/jobs/{id}` answers 404.
    pub results_uri: Option<S3Location>,
    /// JOBS_QUEUE_URL; unset: `POST /v1/jobs` answers 404.
    pub jobs_queue_url: Option<String>,
    /// API_KEYS_SECRET_ARN (ApiAuth=KEY): the secret holds `{"key": "...", "keys"?: [...]}`.
    /// Empty = unset (`sam local` passes an unset template value as ""); unset: keys are not
    /// checked (unless API_KEYS).
    pub api_keys_secret_arn: Option<String>,
    /// API_KEYS, for local runs and tests without Secrets Manager (in AWS use the secret: a
    /// variable is readable by anyone who can read the function's configuration). Hashed here;
    /// the plain keys are not kept.
    pub api_keys: Option<ApiKeys>,
}

/// How Lambda started this execution environment (AWS_LAMBDA_INITIALIZATION_TYPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitType {
    OnDemand,
    Provisioned,
    SnapStart,
}

/// Model download settings (S3). The defaults are measured (README "Model from S3" has the
/// figures) and declared in [`VARS`]; `Default` parses those declarations.
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
        let v = Values::read(&|_| None).expect("the declared defaults parse (unit-tested)");
        v.fetch()
    }
}

/// Where the image keeps its default model (Dockerfile.lambda copies it there).
pub const IMAGE_DEFAULT_MODEL: &str = "/opt/models/default.gguf";
/// The local default, made by `scripts/fetch-models`.
pub const LOCAL_DEFAULT_MODEL: &str = "models/default.gguf";

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(env)
    }

    /// Reads configuration through `get` (the environment, or a map in tests). A blank value is
    /// unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let v = Values::read(&|k| get(k).filter(|v| !v.trim().is_empty()))?;
        let fetch = v.fetch();
        let model_uri = match v.model_uri {
            Some(uri) => uri,
            None => default_model()?,
        };
        Ok(Config {
            model_uri,
            model_sha256: v.model_sha256,
            model_id: v.model_id,
            limits: Limits {
                max_inputs: v.max_inputs,
                max_input_tokens: v.max_input_tokens,
                max_new_tokens: v.max_new_tokens,
                max_request_bytes: v.max_request_bytes,
            },
            threads: v.threads,
            lambda_memory_mb: v.lambda_memory_mb,
            fetch,
            s3_force_path_style: v.s3_force_path_style.unwrap_or(v.s3_endpoint.is_some()),
            init_budget: Duration::from_millis(v.init_budget_ms),
            wait_for_whole_load: v.init_type.is_some_and(|t| t != InitType::OnDemand),
            snap_start: v.init_type == Some(InitType::SnapStart),
            function_url_streaming: v.function_url_streaming,
            rest_api_streaming: v.rest_api_streaming,
            int8_kernel: v.int8_kernel,
            function_name: v.function_name,
            xray_daemon: v.xray_daemon,
            s3_endpoint: v.s3_endpoint,
            results_uri: v.results_uri,
            jobs_queue_url: v.jobs_queue_url,
            api_keys_secret_arn: v.api_keys_secret_arn,
            api_keys: v.api_keys,
        })
    }
}

impl Values {
    fn fetch(&self) -> FetchSettings {
        const MIB: u64 = 1024 * 1024;
        // The declared ranges make these conversions lossless.
        FetchSettings {
            chunk_bytes: self.fetch_chunk_mb * MIB,
            concurrency: self.fetch_concurrency as usize,
            single_get_max_bytes: self.fetch_single_get_max_mb * MIB,
            split_below_mb_s: self.fetch_split_below_mb_s,
            attempts: self.fetch_attempts as u32,
            deadline: Duration::from_secs(self.fetch_timeout_s),
        }
    }
}

/// The process environment; a blank value is unset.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A variable with an [`Unset::Default`]: its value, or the declared default, parsed.
fn read_or_default<T>(
    get: &dyn Fn(&str) -> Option<String>,
    var: &Var,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    let Unset::Default(default) = var.unset else {
        unreachable!("{} is declared with a default", var.name)
    };
    let v = get(var.name).unwrap_or_else(|| default.to_owned());
    parse(&v).map_err(|m| err(var.name, m))
}

/// A variable with no default: `None` when unset.
fn read_optional<T>(
    get: &dyn Fn(&str) -> Option<String>,
    var: &Var,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    get(var.name)
        .map(|v| parse(&v).map_err(|m| err(var.name, m)))
        .transpose()
}

/// AWS_LAMBDA_RUNTIME_API (`host:port`, set by Lambda): where init errors are reported. Read
/// apart from [`Config`] because a configuration error must be reported through it too.
pub fn runtime_api_address() -> Option<String> {
    env(var::AWS_LAMBDA_RUNTIME_API.name)
}

/// AWS_LAMBDA_FUNCTION_NAME, read apart from [`Config`] for the metrics of a failed init
/// (the configuration may be what failed).
pub fn lambda_function_name() -> Option<String> {
    read_optional(&env, &var::AWS_LAMBDA_FUNCTION_NAME, trimmed)
        .ok()
        .flatten()
}

/// The log filters to try, in order: RUST_LOG, then AWS_LAMBDA_LOG_LEVEL (lowercased; Lambda
/// writes `INFO`) or its default. Read before [`Config`], so that its errors are logged.
pub fn log_filters() -> Vec<String> {
    let level = read_or_default(&env, &var::AWS_LAMBDA_LOG_LEVEL, |v| Ok(v.to_lowercase()))
        .unwrap_or_else(|_| "info".to_owned());
    env(var::RUST_LOG.name).into_iter().chain([level]).collect()
}

fn trimmed(v: &str) -> Result<String, String> {
    Ok(v.trim().to_owned())
}

fn positive(v: &str) -> Result<usize, String> {
    v.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("expected a positive integer, got {v:?}"))
}

/// An integer in `lo..=hi`.
fn ranged(lo: u64, hi: u64) -> impl Fn(&str) -> Result<u64, String> {
    move |v| {
        v.trim()
            .parse::<u64>()
            .ok()
            .filter(|n| (lo..=hi).contains(n))
            .ok_or_else(|| format!("expected an integer in {lo}..={hi}, got {v:?}"))
    }
}

fn sha256(v: &str) -> Result<String, String> {
    let v = v.trim().to_ascii_lowercase();
    if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("expected 64 hex digits, got {v:?}"));
    }
    Ok(v)
}

fn api_keys(v: &str) -> Result<ApiKeys, String> {
    let keys: Vec<&str> = v.split(',').map(str::trim).collect();
    for (i, k) in keys.iter().enumerate() {
        // The message names the position, never the key.
        crate::api::check_key(k).map_err(|e| format!("key {}: {e}", i + 1))?;
    }
    Ok(ApiKeys::new(keys))
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
            ("REST_API_TRANSFER_MODE", "RESPONSE_STREAM"),
            ("INT8_KERNEL", "amx"),
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
        assert_eq!(c.threads, Some(3));
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
        assert!(!c.snap_start);
        let c = cfg(&[("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand")]).unwrap();
        assert!(!c.wait_for_whole_load && !c.snap_start);
        let c = cfg(&[("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start")]).unwrap();
        assert!(c.wait_for_whole_load && c.snap_start);
    }

    #[test]
    fn declared_defaults_are_the_ones_in_force() {
        // Limits::default lives below config (api), so the two are compared here.
        assert_eq!(cfg(&[]).unwrap().limits, Limits::default());
        let c = cfg(&[]).unwrap();
        assert_eq!(c.fetch.chunk_bytes, 8 << 20);
        assert_eq!((c.fetch.attempts, c.fetch.concurrency), (4, 8));
        assert!(
            c.int8_kernel == Int8Kernel::Auto && !c.function_url_streaming && !c.rest_api_streaming
        );
    }

    #[test]
    fn every_variable_is_declared_once_and_read_through_the_table() {
        let mut names: Vec<&str> = VARS.iter().map(|v| v.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a variable is declared twice");
        for v in VARS {
            assert!(
                v.name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                v.name
            );
            assert!(
                !v.doc.is_empty() && !v.doc.contains('\n'),
                "{}: one-line doc",
                v.name
            );
            assert!(!SDK_VARS.contains(&v.name), "{} is the SDK's", v.name);
        }
        // Every variable of the Config block is looked up, by its declared name.
        let seen = std::cell::RefCell::new(Vec::new());
        let _ = Config::from_lookup(|k| {
            seen.borrow_mut().push(k.to_owned());
            (k == "MODEL_URI").then(|| "/tmp/x.gguf".to_owned())
        });
        let seen = seen.into_inner();
        for v in VARS {
            let early = [
                var::AWS_LAMBDA_RUNTIME_API.name,
                var::RUST_LOG.name,
                var::AWS_LAMBDA_LOG_LEVEL.name,
            ];
            assert_eq!(
                seen.contains(&v.name.to_owned()),
                !early.contains(&v.name),
                "{}",
                v.name
            );
        }
        assert_eq!(seen.len(), VARS.len() - 3, "{seen:?}");
    }
}
