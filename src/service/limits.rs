//! The limit checks both APIs share: the request's size, the token-count refusal (one 413 whether
//! the engine or the service counted), a job's time budget against the deadline, and the margin
//! generation keeps before the deadline. The module doc of `service` lists which limit is checked
//! where.
//!
//! Checks only: this module must not parse request bodies, call the engine, or decide a limit's
//! value (that comes from [`Limits`], the model and the entry point).

use std::time::{Duration, Instant};

use super::{meter, Limits};
use crate::error::{ApiError, ErrorKind};

/// Lambda's limit on a synchronous invocation's response payload (6 MB).
pub const MAX_RESPONSE_BYTES: usize = 6_000_000;

/// Generation stops this long before the invocation's deadline, so the answer (finish_reason
/// "length") is encoded and returned before Lambda would kill the invocation.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

/// The `error.code` of work refused or stopped for lack of time before the deadline: retrying in
/// a fresh invocation will do it (status 503).
pub const NOT_STARTED_CODE: &str = "deadline_not_started";

/// An error for work not done for lack of time in this invocation (see
/// [`CallOptions::budget`](super::CallOptions::budget)).
pub fn not_started(message: &str) -> ApiError {
    meter::record(|s| s.deadline_stops += 1);
    ApiError::new(ErrorKind::Unavailable, message).with_code(NOT_STARTED_CODE)
}

/// `MAX_REQUEST_BYTES`, checked on every route before the body is decoded.
pub(super) fn request_bytes(limits: &Limits, len: usize) -> Result<(), ApiError> {
    if len > limits.max_request_bytes {
        return Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "request body is {len} bytes, more than the limit of {} (MAX_REQUEST_BYTES)",
                limits.max_request_bytes
            ),
        ));
    }
    Ok(())
}

/// The refusal of an input with more tokens than `limit`: `counted` says what was counted
/// ("input[2] has at least 9000 tokens"), `which` names the limit (`MAX_INPUT_TOKENS`, or the
/// model's context length), `param` the request field.
pub(super) fn too_many_tokens(param: &str, counted: String, limit: usize, which: &str) -> ApiError {
    ApiError::new(
        ErrorKind::PayloadTooLarge,
        format!("{counted}, more than the limit of {limit} ({which})"),
    )
    .with_param(param)
}

/// Whether work of estimated `cost` may start for a caller that needs it finished before
/// `deadline` (a job, whose whole invocation gives `budget`). Unknown cost (nothing measured
/// yet) is admitted: the first request measures it.
pub(super) fn admit(
    cost: Option<Duration>,
    budget: Duration,
    deadline: Option<Instant>,
) -> Result<(), ApiError> {
    let Some(cost) = cost else { return Ok(()) };
    if cost > budget {
        return Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "this request would take about {:.1} s here, more than a whole invocation \
                 allows ({:.1} s, the function's timeout): it can never finish as a job; \
                 split it, lower max_tokens, or raise the worker's timeout",
                cost.as_secs_f64(),
                budget.as_secs_f64()
            ),
        )
        .with_code("exceeds_invocation_time"));
    }
    if deadline.is_some_and(|d| Instant::now() + cost > d) {
        return Err(not_started(
            "not started: it would not finish before this invocation's deadline",
        ));
    }
    Ok(())
}
