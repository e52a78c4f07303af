//! The shared request/response types: what the service, the job ports below it and the
//! configuration all speak (limits, the protocol-neutral response, body parsing, API keys and the
//! caller's identity). A leaf: it may use only `error` and `hex`, so every layer can use it.

use serde::de;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ApiError, ErrorKind};

pub mod keys;
pub mod routes;
pub use keys::{check_key, ApiKeys, Owner, MAX_KEY_LEN, MIN_KEY_LEN};

/// Request limits, checked before any work proportional to the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Inputs per embeddings request (OpenAI allows 2048).
    pub max_inputs: usize,
    /// Tokens per input before truncation; longer inputs are refused with 413.
    pub max_input_tokens: usize,
    /// Generated tokens per request (chat/completions).
    pub max_new_tokens: usize,
    /// Request body size in bytes.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_inputs: 2048,
            max_input_tokens: 8192,
            max_new_tokens: 512,
            // Lambda's synchronous invoke payload limit is 6 MB; a bigger body cannot arrive
            // through API Gateway anyway, this catches local and direct invokes.
            max_request_bytes: 6 * 1024 * 1024,
        }
    }
}

/// A protocol-neutral response: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Value,
}

impl ApiResponse {
    pub fn ok(body: Value) -> Self {
        Self { status: 200, body }
    }
}

impl From<ApiError> for ApiResponse {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status(),
            body: e.to_body(),
        }
    }
}

/// Parses a JSON body into `T`: a syntax error is 400, a shape/type error 422.
///
/// Every request body is a JSON object. serde's derived struct deserializers also accept a JSON
/// array, filling fields by position (`["hi"]` would read as `{"input": "hi"}`), so anything that
/// is not an object is refused here, before or after parsing.
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::new(
            ErrorKind::InvalidJson,
            "request body is empty",
        ));
    }
    let is_object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let not_object = || ApiError::new(ErrorKind::InvalidType, "request body must be a JSON object");
    let parsed = serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data if !is_object => not_object(),
            Category::Data => {
                ApiError::new(ErrorKind::InvalidType, format!("invalid request body: {e}"))
            }
            // serde_json reports a wrongly typed enum value (`"encoding_format": 3`) as a syntax
            // error; valid JSON of the wrong shape is a 422 whatever the category says.
            Category::Syntax | Category::Eof | Category::Io
                if serde_json::from_slice::<de::IgnoredAny>(body).is_ok() =>
            {
                ApiError::new(
                    ErrorKind::InvalidType,
                    format!("invalid request body: a field has the wrong type ({e})"),
                )
            }
            Category::Syntax | Category::Eof | Category::Io => ApiError::new(
                ErrorKind::InvalidJson,
                format!("request body is not valid JSON: {e}"),
            ),
        }
    })?;
    if is_object {
        Ok(parsed)
    } else {
        Err(not_object())
    }
}

/// The first `n` characters of `s`, for quoting client input in an error message.
pub(crate) fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
