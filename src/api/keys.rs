//! The API keys a deployment accepts (ApiAuth=KEY), held as SHA-256 digests only, and the
//! [`Owner`] a key makes a caller (whose job results it may read).
//!
//! Why here, below the events layer that checks them: the keys are state built once at init (read
//! by `config`), like the job ports, and held by the [`Service`](crate::service::Service), the one
//! object every entry point already receives. Holding them there means `events::handle` and `events::handle_call` (the bootstrap,
//! the CLI, the tests) cannot be called without the keys the deployment was configured with, so a
//! forgotten argument can never switch authentication off. The check itself (which events carry a
//! key, the `Authorization` header, the 401) is decided in `events::auth`; this module only knows
//! digests, and must not see events, headers or AWS.
//!
//! Keys come from the Secrets Manager secret (`API_KEYS_SECRET_ARN`, JSON `{"key": "...",
//! "keys": ["...", ...]}`) and from `API_KEYS` (comma-separated, for local runs and tests); the
//! plain keys are dropped as soon as they are hashed.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::truncate;
use crate::error::{ApiError, ErrorKind};

/// Shortest key accepted: anything shorter could be guessed (the template generates 48).
pub const MIN_KEY_LEN: usize = 16;
/// Longest key accepted, and the bound on what the check reads from a header.
pub const MAX_KEY_LEN: usize = 512;

/// The accepted keys' SHA-256 digests. `Debug` shows how many, never a digest.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

/// Whether `key` can be an API key: [`MIN_KEY_LEN`]..=[`MAX_KEY_LEN`] visible ASCII characters
/// other than `,` (what a bearer token can carry, and what `API_KEYS` can list).
pub fn check_key(key: &str) -> Result<(), String> {
    if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) {
        return Err(format!(
            "a key has {} characters; keys need {MIN_KEY_LEN} to {MAX_KEY_LEN}",
            key.len()
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(
            "a key may hold visible ASCII characters only (no spaces, no commas)".to_owned(),
        );
    }
    Ok(())
}

impl ApiKeys {
    /// Hashes `keys` (already checked with [`check_key`]); duplicates count once.
    pub fn new<K: AsRef<[u8]>>(keys: impl IntoIterator<Item = K>) -> ApiKeys {
        let mut digests: Vec<[u8; 32]> = keys
            .into_iter()
            .map(|k| Sha256::digest(k.as_ref()).into())
            .collect();
        digests.sort_unstable();
        digests.dedup();
        ApiKeys { digests }
    }

    /// Both sets together (API_KEYS and the secret's keys).
    pub fn merge(mut self, other: ApiKeys) -> ApiKeys {
        self.digests.extend(other.digests);
        self.digests.sort_unstable();
        self.digests.dedup();
        self
    }

    /// Reads the secret's JSON: `{"key": "<key>"}` (what the template generates), optionally with
    /// `"keys": ["<key>", ...]` for more. At least one key; every key passes [`check_key`]. The
    /// error never quotes a key.
    pub fn from_secret_json(text: &str) -> Result<ApiKeys, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            format!(
                "the secret is not JSON ({}); expected {{\"key\": \"...\"}}",
                json_error_kind(&e)
            )
        })?;
        let obj = v
            .as_object()
            .ok_or("the secret is not a JSON object; expected {\"key\": \"...\"}")?;
        let mut keys: Vec<&str> = Vec::new();
        match obj.get("key") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(k)) => keys.push(k),
            Some(_) => return Err("\"key\" must be a string".to_owned()),
        }
        match obj.get("keys") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(a)) => {
                for (i, k) in a.iter().enumerate() {
                    keys.push(
                        k.as_str()
                            .ok_or_else(|| format!("\"keys\"[{i}] must be a string"))?,
                    );
                }
            }
            Some(_) => return Err("\"keys\" must be an array of strings".to_owned()),
        }
        if keys.is_empty() {
            return Err("the secret has no key: expected {\"key\": \"...\"}".to_owned());
        }
        for (i, k) in keys.iter().enumerate() {
            check_key(k).map_err(|e| format!("key {} of the secret: {e}", i + 1))?;
        }
        Ok(ApiKeys::new(keys))
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The owner of `presented` if it is one of the keys. Its SHA-256 is compared with every
    /// stored digest in constant time, all of them whatever matched, so the time taken says
    /// nothing about which digest (or how much of one) matched. Comparing digests rather than keys
    /// also hides the keys' lengths.
    pub fn identify(&self, presented: &[u8]) -> Option<Owner> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = subtle::Choice::from(0);
        for d in &self.digests {
            found |= d.ct_eq(&digest);
        }
        bool::from(found).then(|| Owner::of_key_digest(&digest))
    }
}

/// What kind of JSON error, without serde_json's message: that may quote the text (a key).
fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "wrong shape",
        serde_json::error::Category::Eof => "cut short",
    }
}

/// Whose job it is: 32 lowercase hex digits derived from the SHA-256 of the caller's API key (see
/// [`Owner::of_key_digest`]). It names the caller's result prefix; it is not a secret, and the key
/// cannot be recovered from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner(String);

impl Owner {
    /// The owner of the key whose SHA-256 is `key_digest`: a second, labelled hash of it, cut to
    /// 128 bits, so that the owner written into queue messages and object keys is never the
    /// digest the keys are checked against.
    pub fn of_key_digest(key_digest: &[u8; 32]) -> Owner {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"lambda-inference job owner v1\0");
        h.update(key_digest);
        Owner(crate::hex::hex(&h.finalize()[..16]))
    }

    /// Reads an owner from a queued message: exactly 32 lowercase hex digits, nothing that could
    /// name another prefix.
    pub fn parse(s: &str) -> Result<Owner, ApiError> {
        if s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Owner(s.to_owned()))
        } else {
            Err(ApiError::new(
                ErrorKind::InvalidValue,
                format!(
                    "job owner {:?} is not valid: 32 lowercase hex digits",
                    truncate(s, 80)
                ),
            )
            .with_param("owner"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn identifies_only_the_keys_it_holds() {
        let keys = ApiKeys::new([A, B, A]);
        assert_eq!(keys.len(), 2);
        let a = keys.identify(A.as_bytes()).expect("A is a key");
        let b = keys.identify(B.as_bytes()).expect("B is a key");
        assert_ne!(a, b, "each key has its own owner");
        assert_eq!(keys.identify(A.as_bytes()), Some(a));
        assert!(keys.identify(&A.as_bytes()[1..]).is_none());
        assert!(keys.identify(b"").is_none());
        assert!(ApiKeys::new(Vec::<&str>::new())
            .identify(A.as_bytes())
            .is_none());
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");
    }

    #[test]
    fn reads_the_secret_shape_and_never_quotes_a_key() {
        let k = ApiKeys::from_secret_json(&format!(r#"{{"key": "{A}"}}"#)).unwrap();
        assert!(k.identify(A.as_bytes()).is_some());
        let k =
            ApiKeys::from_secret_json(&format!(r#"{{"key": "{A}", "keys": ["{B}"]}}"#)).unwrap();
        assert_eq!(k.len(), 2);
        let k = ApiKeys::from_secret_json(&format!(r#"{{"keys": ["{B}"]}}"#)).unwrap();
        assert!(k.identify(B.as_bytes()).is_some());
        for bad in [
            "".to_owned(),
            A.to_owned(),
            format!("[\"{A}\"]"),
            "{}".to_owned(),
            r#"{"key": 5}"#.to_owned(),
            r#"{"keys": "x"}"#.to_owned(),
            r#"{"key": "short"}"#.to_owned(),
            format!(r#"{{"key": "{A} {A}"}}"#),
            format!(r#"{{"key": "{A}", "keys": [1]}}"#),
            format!(r#"{{"key": "{A}"#),
        ] {
            let e = ApiKeys::from_secret_json(&bad).unwrap_err();
            assert!(!e.contains(A), "{bad}: {e}");
        }
    }

    #[test]
    fn key_rules() {
        assert!(check_key(A).is_ok());
        assert!(check_key(&"x".repeat(MIN_KEY_LEN - 1)).is_err());
        assert!(check_key(&"x".repeat(MAX_KEY_LEN + 1)).is_err());
        for bad in ["aaaaaaaa aaaaaaaa", "aaaaaaaa,aaaaaaaa", "aaaaaaaaaaaaaaaé"] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
    }
}
