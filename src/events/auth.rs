//! API keys on API Gateway requests (ApiAuth=KEY): `Authorization: Bearer <key>`, what OpenAI
//! clients send (`OpenAI(api_key=...)`).
//!
//! Checked here, before the body is even decoded and before any model work, for the two sources
//! that reach the function without Lambda authenticating the caller: API Gateway HTTP API (payload
//! 2.0) and REST API (1.0) proxy events. Not for Function URL events (the URL's AuthType is
//! AWS_IAM: Lambda has checked the SigV4 signature, which is what their `Authorization` header
//! holds), direct invokes or SQS batches (whoever can invoke the function or send to its queue
//! passed IAM). With no keys configured (IAM, JWT or no auth at the gateway) nothing is checked.
//!
//! The accepted keys are SHA-256 digests held by the [`Service`](crate::service::Service)
//! ([`ApiKeys`]; why there: see service/keys.rs). A presented key is bounded in length before it is
//! hashed, and its digest is compared with all of them in constant time. Every refusal is the same
//! 401 OpenAI body (`type: invalid_request_error`, `code: invalid_api_key`) with
//! `www-authenticate: Bearer`; the message says what to send, never what was sent. An accepted key
//! yields the caller's [`Owner`], which scopes its `/v1/jobs` results.

use serde_json::Value;

use super::http::HttpReply;
use crate::api::{ApiKeys, Owner, MAX_KEY_LEN};
use crate::error::{ApiError, ErrorKind};

/// The longest `Authorization` value looked at: a scheme, a few spaces and the longest key. A
/// longer one (a 1 MB header) is refused as it is, without being copied or hashed.
const MAX_AUTHORIZATION_LEN: usize = MAX_KEY_LEN + 32;

const MISSING: &str = "You didn't provide an API key. Send it in the Authorization header as \
    `Authorization: Bearer YOUR_KEY` (with an OpenAI SDK: api_key=YOUR_KEY).";
const MALFORMED: &str =
    "Send your API key as one Authorization header of the form `Bearer YOUR_KEY`.";
const INCORRECT: &str = "Incorrect API key provided.";

/// Decides an API Gateway (v2 or v1) event: `Ok(None)` when no keys are configured, `Ok(owner)`
/// for an accepted key, `Err(response)` (the 401 in the HTTP shape) otherwise.
pub fn authorize(keys: Option<&ApiKeys>, event: &Value) -> Result<Option<Owner>, HttpReply> {
    let Some(keys) = keys else {
        return Ok(None);
    };
    let refused = |why: &'static str, message: &str| {
        tracing::info!(reason = why, "request refused: API key");
        unauthorized(message)
    };
    let value = match authorization(event) {
        Found::None => return Err(refused("missing", MISSING)),
        Found::Several => return Err(refused("several", MALFORMED)),
        Found::One(v) => v,
    };
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(refused("too long", INCORRECT));
    }
    let Some(key) = bearer(value) else {
        return Err(refused("malformed", MALFORMED));
    };
    match keys.identify(key.as_bytes()) {
        Some(owner) => Ok(Some(owner)),
        None => Err(refused("incorrect", INCORRECT)),
    }
}

/// The 401 in the HTTP response shape: the OpenAI error body and `www-authenticate: Bearer`.
pub fn unauthorized(message: &str) -> HttpReply {
    let mut out = HttpReply::json(&ApiError::new(ErrorKind::Unauthorized, message).into());
    out.headers.push(("www-authenticate", "Bearer"));
    out
}

/// What an event says about `Authorization`.
#[derive(Debug, PartialEq, Eq)]
enum Found<'a> {
    None,
    One(&'a str),
    /// Different values (two headers, or two spellings of the name in a hand-written event):
    /// which one API Gateway or a proxy meant is not ours to guess.
    Several,
}

/// The `Authorization` value, by case-insensitive name: v2 `headers` (lowercased by API Gateway,
/// repeated headers joined with commas), v1 `headers` (as sent: any case; the last of repeated
/// headers) and v1 `multiValueHeaders` (every value). Borrowed from the event, never copied.
fn authorization(event: &Value) -> Found<'_> {
    let mut found: Option<&str> = None;
    let single = event["headers"].as_object().into_iter().flatten();
    let multi = event["multiValueHeaders"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(name, values)| {
            let values = values.as_array().map(Vec::as_slice).unwrap_or(&[]);
            values.iter().map(move |v| (name, v))
        });
    for (name, value) in single.chain(multi) {
        if !name.eq_ignore_ascii_case("authorization") {
            continue;
        }
        // A non-string value (a hand-written event) counts as a malformed header.
        let value = value.as_str().unwrap_or("");
        match found {
            None => found = Some(value),
            Some(f) if f == value => {}
            Some(_) => return Found::Several,
        }
    }
    found.map_or(Found::None, Found::One)
}

/// The key in `Bearer <key>`: the scheme in any case, then spaces, then one token without spaces.
fn bearer(value: &str) -> Option<&str> {
    let value = value.trim_matches(|c| c == ' ' || c == '\t');
    let (scheme, key) = value.split_once([' ', '\t'])?;
    let key = key.trim_start_matches([' ', '\t']);
    let ok = scheme.eq_ignore_ascii_case("bearer")
        && !key.is_empty()
        && !key.bytes().any(|b| b.is_ascii_whitespace());
    ok.then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::{Duration, Instant};

    const KEY: &str = "k3yK3yk3yK3yk3yK3yk3yK3yk3yK3yk3yK3yk3yK3yk3yK3y";
    const OTHER: &str = "0therdeploymentkey0therdeploymentkey0therdeploym";

    fn keys() -> ApiKeys {
        ApiKeys::new([KEY, "second-key-second-key"])
    }

    fn v2(headers: Value) -> Value {
        json!({"version": "2.0", "rawPath": "/health", "headers": headers,
               "requestContext": {"http": {"method": "GET"}, "domainName": "x.execute-api.us-east-1.amazonaws.com"}})
    }

    fn refused(r: Result<Option<Owner>, HttpReply>) -> Value {
        let out = r.expect_err("must be refused").to_envelope();
        assert_eq!(out["statusCode"], 401);
        assert_eq!(out["headers"]["www-authenticate"], "Bearer");
        let body: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert_eq!(body["error"]["param"], Value::Null);
        body
    }

    #[test]
    fn accepts_a_good_key_in_any_scheme_case() {
        let k = keys();
        for auth in [
            format!("Bearer {KEY}"),
            format!("bearer {KEY}"),
            format!("BEARER  {KEY} "),
        ] {
            let owner = authorize(Some(&k), &v2(json!({"authorization": auth})))
                .unwrap_or_else(|e| panic!("{auth}: {e:?}"));
            assert_eq!(owner, k.identify(KEY.as_bytes()));
            assert!(owner.is_some());
        }
        // No keys configured: nothing is checked, nobody is an owner.
        assert_eq!(authorize(None, &v2(json!({}))), Ok(None));
    }

    #[test]
    fn refuses_wrong_empty_malformed_and_missing_keys() {
        let k = keys();
        for (headers, message) in [
            (
                json!({"authorization": format!("Bearer {OTHER}")}),
                INCORRECT,
            ),
            (
                json!({"authorization": format!("Bearer {KEY}x")}),
                INCORRECT,
            ),
            (json!({"authorization": "Bearer "}), MALFORMED),
            (json!({"authorization": "Bearer"}), MALFORMED),
            (json!({"authorization": ""}), MALFORMED),
            (json!({"authorization": KEY}), MALFORMED),
            (json!({"authorization": format!("Basic {KEY}")}), MALFORMED),
            (
                json!({"authorization": format!("Bearer {KEY} {KEY}")}),
                MALFORMED,
            ),
            (json!({"authorization": 5}), MALFORMED),
            (json!({}), MISSING),
            (json!({"x-api-key": KEY}), MISSING),
            (Value::Null, MISSING),
        ] {
            let body = refused(authorize(Some(&k), &v2(headers.clone())));
            assert_eq!(body["error"]["message"], message, "{headers}");
            assert!(!body.to_string().contains(KEY), "a key is never echoed");
        }
    }

    #[test]
    fn a_megabyte_header_is_refused_quickly() {
        let huge = format!("Bearer {}", "a".repeat(1 << 20));
        let event = v2(json!({ "authorization": huge }));
        let t = Instant::now();
        let body = refused(authorize(Some(&keys()), &event));
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(body["error"]["message"], INCORRECT);
    }

    #[test]
    fn v1_headers_in_any_case_and_multi_value_headers() {
        let k = keys();
        let v1 = |headers: Value, multi: Value| {
            json!({"httpMethod": "GET", "path": "/health", "headers": headers,
                   "multiValueHeaders": multi, "requestContext": {"stage": "prod"}})
        };
        let good = format!("Bearer {KEY}");
        for event in [
            v1(json!({"Authorization": good}), Value::Null),
            v1(
                json!({"AUTHORIZATION": good}),
                json!({"AUTHORIZATION": [good]}),
            ),
            v1(Value::Null, json!({"Authorization": [good]})),
        ] {
            assert!(authorize(Some(&k), &event).unwrap().is_some(), "{event}");
        }
        // Two different values, in one list or under two spellings: refused, not guessed.
        let bad = format!("Bearer {OTHER}");
        for event in [
            v1(
                json!({"Authorization": good}),
                json!({"Authorization": [bad, good]}),
            ),
            v1(
                json!({"Authorization": good, "authorization": bad}),
                Value::Null,
            ),
        ] {
            let body = refused(authorize(Some(&k), &event));
            assert_eq!(body["error"]["message"], MALFORMED, "{event}");
        }
        refused(authorize(
            Some(&k),
            &v1(Value::Null, json!({"Authorization": []})),
        ));
    }
}
