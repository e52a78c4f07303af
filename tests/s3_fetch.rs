//! The model from a real S3-compatible server (moto on loopback): both fetch plans give the
//! object's exact bytes and digest, and every fault ends in a named error or a recovered load,
//! never a wrong or half model. Faults come from the server itself (missing bucket or key), from
//! the uploaded object (wrong digest, truncated GGUF), or from a fault-injecting proxy between
//! the function and the server (refused connections, a body broken once, an object replaced
//! mid-download, a stalled server).
//!
//! Needs `moto_server` (pip install 'moto[server]'); skips without it, fails under CI=true.

use std::time::Duration;

use lambda_inference::app::App;
use lambda_inference::artifacts::s3::S3ArtifactStore;
use lambda_inference::artifacts::{sha256_hex, ArtifactError};
use lambda_inference::config::{Config, FetchSettings};

mod common;
use common::s3::{block_on, client, free_port, upload, Fault, FaultProxy, Moto};

/// Deterministic non-repeating bytes (a repeated pattern could hide a chunk written twice).
fn object(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x243F_6A88_85A3_08D3;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Small chunks, so a 1 MB object is 8 ranged GETs; few fast retries; a short deadline.
fn ranged() -> FetchSettings {
    FetchSettings {
        chunk_bytes: 128 << 10,
        concurrency: 3,
        single_get_max_bytes: 0,
        split_below_mb_s: 0,
        attempts: 3,
        deadline: Duration::from_secs(20),
    }
}

fn single() -> FetchSettings {
    FetchSettings {
        single_get_max_bytes: u64::MAX,
        ..ranged()
    }
}

/// The adaptive plan, with a split threshold no loopback server reaches (always splits) or
/// one every server beats (never splits).
fn adaptive(split_below_mb_s: u64) -> FetchSettings {
    FetchSettings {
        split_below_mb_s,
        ..ranged()
    }
}

async fn fetch(
    endpoint: &str,
    settings: FetchSettings,
    bucket: &str,
    key: &str,
) -> Result<lambda_inference::artifacts::Artifact, ArtifactError> {
    S3ArtifactStore::new(&client(endpoint), settings)
        .fetch_object(bucket, key)
        .await
}

#[test]
fn plans_and_faults_against_a_real_s3_server() {
    let Some(moto) = Moto::start() else { return };
    let data = object((1 << 20) + 12_345); // not a multiple of the chunk size
    let want = sha256_hex(&data);
    block_on(async {
        upload(&client(&moto.endpoint()), "models", "m.bin", &data).await;

        // Every plan: the exact bytes, hashed while arriving, with the plan it says.
        for (settings, plan, chunks) in [
            (single(), "single", 1..=1),
            (ranged(), "ranged", 9..=9),
            // Split at once, but the object is smaller than one chunk: the plain GET alone.
            (
                FetchSettings {
                    chunk_bytes: 4 << 20,
                    ..ranged()
                },
                "ranged",
                1..=1,
            ),
            (adaptive(1), "probe", 1..=1),
            (adaptive(1_000_000), "probe+split", 2..=9),
        ] {
            let a = fetch(&moto.endpoint(), settings, "models", "m.bin")
                .await
                .unwrap();
            assert!(a.bytes[..] == data[..], "{plan}: bytes differ");
            assert_eq!(a.digest.wait(&a.bytes).0, want, "{plan}");
            assert_eq!(a.stats.plan, plan);
            assert!(chunks.contains(&a.stats.chunks), "{plan}: {:?}", a.stats);
            assert_eq!(a.stats.retries, 0);
            assert_eq!(a.stats.bytes, data.len() as u64);
            assert_eq!(a.source, "s3://models/m.bin");
        }

        // Missing bucket and missing key: ModelNotFound, not retried into a timeout.
        for (bucket, key) in [("no-such-bucket", "m.bin"), ("models", "nope.gguf")] {
            let e = fetch(&moto.endpoint(), ranged(), bucket, key)
                .await
                .err()
                .unwrap();
            assert_eq!(e.error_type(), "ModelNotFound", "{bucket}/{key}: {e}");
            assert!(
                e.to_string().contains(&format!("s3://{bucket}/{key}")),
                "{e}"
            );
        }

        // A server refusing connections: retried, then a named FetchFailed.
        let dead = format!("http://127.0.0.1:{}", free_port());
        let e = fetch(&dead, ranged(), "models", "m.bin")
            .await
            .err()
            .unwrap();
        assert_eq!(e.error_type(), "FetchFailed", "{e}");
        assert!(e.to_string().contains("after 3 attempts"), "{e}");

        // One chunk's body breaks once, 10 kB in: that chunk resumes where it stopped and the
        // model is still exactly right.
        for (settings, plan) in [
            (ranged(), "ranged"),
            (single(), "single"),
            (adaptive(1_000_000), "probe+split"),
        ] {
            let proxy = FaultProxy::start(
                moto.port,
                Fault::BreakOnce {
                    // The single plan has one GET; in the ranged plan, break the second.
                    nth_get: if plan == "single" { 1 } else { 2 },
                    after: 10_000,
                },
            );
            let a = fetch(&proxy.endpoint(), settings, "models", "m.bin")
                .await
                .unwrap();
            assert_eq!(a.stats.retries, 1, "{plan}");
            assert!(
                a.bytes[..] == data[..],
                "{plan}: bytes differ after a retry"
            );
            assert_eq!(a.digest.wait(&a.bytes).0, want, "{plan}");
        }

        // The object replaced between the first GET and the next: the later GETs carry the
        // first one's ETag in If-Match, so the fetch fails instead of mixing two versions.
        for (settings, plan) in [(ranged(), "ranged"), (adaptive(1_000_000), "probe+split")] {
            let key = format!("replaced-{plan}.bin");
            upload(&client(&moto.endpoint()), "models", &key, &data).await;
            let proxy = FaultProxy::start(moto.port, Fault::ReplaceBeforeGet { nth_get: 2 });
            let e = fetch(&proxy.endpoint(), settings, "models", &key)
                .await
                .err()
                .unwrap();
            assert_eq!(e.error_type(), "FetchFailed", "{plan}: {e}");
            assert!(
                e.to_string()
                    .contains("the object changed during the download"),
                "{plan}: {e}"
            );
        }

        // A server too slow for the deadline: Timeout, naming the deadline.
        let proxy = FaultProxy::start(moto.port, Fault::Stall);
        let settings = FetchSettings {
            deadline: Duration::from_secs(1),
            ..ranged()
        };
        let e = fetch(&proxy.endpoint(), settings, "models", "m.bin")
            .await
            .err()
            .unwrap();
        assert_eq!(e.error_type(), "Timeout", "{e}");
        assert!(e.to_string().contains("MODEL_FETCH_TIMEOUT_S=1s"), "{e}");
    });
}

/// Init through the whole path (config from the environment, the SDK's default chain, fetch,
/// verify, engine build) against moto: the real model loads and reports its digest; a wrong
/// digest and a truncated GGUF fail with their stable types before anything could be served.
#[test]
fn init_from_s3_verifies_before_serving() {
    let Some(model) = common::needed_file("models/default.gguf", "scripts/fetch-models") else {
        return;
    };
    let Some(moto) = Moto::start() else { return };
    let bytes = std::fs::read(&model).unwrap();
    let sha = sha256_hex(&bytes);
    block_on(async {
        let c = client(&moto.endpoint());
        upload(&c, "models", "minilm.gguf", &bytes).await;
        upload(&c, "models", "truncated.gguf", &bytes[..bytes.len() / 2]).await;
    });
    let env = common::s3::s3_env(&moto.endpoint());
    let config = |uri: &str, sha256: Option<&str>| {
        let mut vars = env.clone();
        vars.push(("MODEL_URI", uri.to_owned()));
        if let Some(s) = sha256 {
            vars.push(("MODEL_SHA256", s.to_owned()));
        }
        Config::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())).unwrap()
    };
    // The SDK reads its own variables from the process environment; this test binary only
    // ever points them at this moto, so setting them once here is race-free.
    for (k, v) in &env {
        std::env::set_var(k, v);
    }

    let app = App::init(&config("s3://models/minilm.gguf", Some(&sha))).unwrap();
    assert_eq!(app.service.meta().sha256, sha);
    assert_eq!(app.service.meta().source, "s3://models/minilm.gguf");
    assert_eq!(app.service.health()["sha256"], sha.as_str());
    assert_eq!(app.report.fetch.bytes, bytes.len() as u64);

    let wrong = "0".repeat(64);
    let e = App::init(&config("s3://models/minilm.gguf", Some(&wrong)))
        .err()
        .unwrap();
    assert_eq!(e.error_type(), "DigestMismatch");
    assert!(
        e.to_string().contains(&sha) && e.to_string().contains(&wrong),
        "both digests named: {e}"
    );

    let e = App::init(&config("s3://models/truncated.gguf", None))
        .err()
        .unwrap();
    assert_eq!(e.error_type(), "InvalidModel", "{e}");

    let e = App::init(&config("s3://models/absent.gguf", None))
        .err()
        .unwrap();
    assert_eq!(e.error_type(), "ModelNotFound", "{e}");
}
