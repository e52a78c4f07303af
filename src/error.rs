//! The one table from error kind to HTTP status, OpenAI error body and Lambda error type.
//!
//! Every layer has its own error enum (engine: [`crate::engine::EngineError`], artifacts:
//! [`crate::artifacts::ArtifactError`], config: [`crate::config::ConfigError`]); the service turns
//! them into an [`ApiError`], and only this module decides what a client sees for each kind.
//! This module must not know about event shapes (API Gateway, SQS): adapters wrap its output.

use serde::Serialize;
use serde_json::{json, Value};

/// What went wrong, from the client's point of view. The variants are the rows of the table in
/// [`ErrorKind::status`], [`ErrorKind::openai_type`] and [`ErrorKind::lambda_error_type`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorKind {
    /// The body is not JSON at all (syntax error, wrong encoding).
    InvalidJson,
    /// Well-formed JSON of the wrong shape: missing field, wrong type, unknown enum value.
    /// 422, as axum/TEI answer for a body that parses but does not deserialize.
    InvalidType,
    /// A value that has the right type but is not acceptable (empty input, dimensions too big).
    InvalidValue,
    /// The route exists but the loaded model cannot serve it (chat on an embedder).
    WrongModelKind,
    /// No API key, or not one this deployment accepts (ApiAuth=KEY): `Authorization: Bearer <key>`.
    Unauthorized,
    /// No such route.
    NotFound,
    /// The route exists, the method does not.
    MethodNotAllowed,
    /// Too many inputs, an input too long, a body too large.
    PayloadTooLarge,
    /// The request conflicts with stored state (a job id that already has a result).
    Conflict,
    /// Throttled (by us or by a downstream service).
    TooManyRequests,
    /// The model is not (yet) loaded or a dependency is down; retrying may help.
    Unavailable,
    /// A bug or an unexpected failure: never the client's fault.
    Internal,
}

impl ErrorKind {
    /// HTTP status for this kind.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidJson | ErrorKind::InvalidValue | ErrorKind::WrongModelKind => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Conflict => 409,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::InvalidType => 422,
            ErrorKind::TooManyRequests => 429,
            ErrorKind::Internal => 500,
            ErrorKind::Unavailable => 503,
        }
    }

    /// The OpenAI `error.type` string.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidJson
            | ErrorKind::InvalidType
            | ErrorKind::InvalidValue
            | ErrorKind::WrongModelKind
            | ErrorKind::PayloadTooLarge
            | ErrorKind::Conflict
            | ErrorKind::MethodNotAllowed
            // What OpenAI answers for a missing or wrong key.
            | ErrorKind::Unauthorized => "invalid_request_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::TooManyRequests => "rate_limit_error",
            ErrorKind::Unavailable => "service_unavailable",
            ErrorKind::Internal => "server_error",
        }
    }

    /// The default OpenAI `error.code` string (a caller may give a more precise one).
    pub fn default_code(self) -> &'static str {
        match self {
            ErrorKind::InvalidJson => "invalid_json",
            ErrorKind::InvalidType => "invalid_type",
            ErrorKind::InvalidValue => "invalid_value",
            ErrorKind::WrongModelKind => "unsupported_for_model",
            ErrorKind::Unauthorized => "invalid_api_key",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Conflict => "conflict",
            ErrorKind::TooManyRequests => "rate_limited",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal_error",
        }
    }

    /// The `errorType` a Lambda-level error of this kind carries (direct invokes that must fail
    /// the invocation, init errors). Stable names: users alarm and retry on them.
    pub fn lambda_error_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidJson | ErrorKind::InvalidType | ErrorKind::InvalidValue => {
                "InvalidRequest"
            }
            ErrorKind::WrongModelKind => "UnsupportedForModel",
            ErrorKind::Unauthorized => "Unauthorized",
            ErrorKind::NotFound => "NotFound",
            ErrorKind::MethodNotAllowed => "MethodNotAllowed",
            ErrorKind::PayloadTooLarge => "PayloadTooLarge",
            ErrorKind::Conflict => "Conflict",
            ErrorKind::TooManyRequests => "Throttled",
            ErrorKind::Unavailable => "Unavailable",
            ErrorKind::Internal => "InternalError",
        }
    }
}

/// An error as the client sees it: kind, human message, and the offending parameter if any.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// Names the request field at fault (`input`, `dimensions`, ...).
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Overrides the default machine-readable code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// `{"error": {"message", "type", "param", "code"}}`, the OpenAI shape.
    pub fn to_body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind.openai_type(),
                "param": self.param,
                "code": self.code.as_deref().unwrap_or(self.kind.default_code()),
            }
        })
    }
}

/// The answer to an HTTP request that arrived after init but found no model: the load failed (or
/// failed after INIT_BUDGET_MS, in the first invoke). One row of the table, kept here rather than
/// at the entry point: it is [`ErrorKind::Unavailable`] (503, retrying may help: a transient
/// failure is retried with backoff by the next invoke), and its `code` is the init error's stable
/// type (`ModelNotFound`, `DigestMismatch`, ...), the same name Lambda and the `init_error` metric
/// carry. The message is the failure's, except for `AuthConfig`: without its keys the function
/// cannot tell who is asking, and the details (the secret's ARN, the account) are for the log,
/// not for an unauthenticated caller.
pub fn load_failure(init_error_type: &str, message: &str) -> ApiError {
    let message = if init_error_type == "AuthConfig" {
        "the function could not load its API keys; its log says why"
    } else {
        message
    };
    ApiError::new(ErrorKind::Unavailable, message).with_code(init_error_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape_and_default_code() {
        let e = ApiError::new(ErrorKind::PayloadTooLarge, "too many inputs").with_param("input");
        let b = e.to_body();
        assert_eq!(b["error"]["message"], "too many inputs");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["param"], "input");
        assert_eq!(b["error"]["code"], "payload_too_large");
        assert_eq!(e.status(), 413);
    }

    #[test]
    fn every_kind_has_a_distinct_status_row() {
        use ErrorKind::*;
        let kinds = [
            InvalidJson,
            InvalidType,
            InvalidValue,
            WrongModelKind,
            Unauthorized,
            NotFound,
            MethodNotAllowed,
            PayloadTooLarge,
            Conflict,
            TooManyRequests,
            Unavailable,
            Internal,
        ];
        for k in kinds {
            let s = k.status();
            assert!((400..600).contains(&s), "{k:?} -> {s}");
            assert!(!k.lambda_error_type().is_empty());
        }
        let statuses: std::collections::BTreeSet<u16> = kinds
            .iter()
            .filter(|k| !matches!(k, InvalidValue | WrongModelKind))
            .map(|k| k.status())
            .collect();
        assert_eq!(statuses.len(), kinds.len() - 2, "{statuses:?}");
        assert_eq!(Internal.status(), 500);
        assert_eq!(Unavailable.status(), 503);
    }

    #[test]
    fn unauthorized_is_what_openai_answers_for_a_bad_key() {
        let b = ApiError::new(ErrorKind::Unauthorized, "no key").to_body();
        assert_eq!(ErrorKind::Unauthorized.status(), 401);
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["code"], "invalid_api_key");
        assert_eq!(b["error"]["param"], serde_json::Value::Null);
        assert_eq!(ErrorKind::Unauthorized.lambda_error_type(), "Unauthorized");
    }

    #[test]
    fn a_failed_load_is_a_503_named_after_the_init_error() {
        let e = load_failure("DigestMismatch", "expected aa, got bb");
        assert_eq!(e.status(), 503);
        let b = e.to_body();
        assert_eq!(b["error"]["type"], "service_unavailable");
        assert_eq!(b["error"]["code"], "DigestMismatch");
        assert_eq!(b["error"]["message"], "expected aa, got bb");
        let keys = load_failure(
            "AuthConfig",
            "secret arn:aws:secretsmanager:1234: AccessDenied",
        );
        assert_eq!(keys.status(), 503);
        assert!(!keys.message.contains("arn:"), "{}", keys.message);
        assert_eq!(keys.to_body()["error"]["code"], "AuthConfig");
    }
}
