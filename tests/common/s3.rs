//! Real-S3-server support: a moto server on loopback (started per test, killed by PID when
//! dropped), uploads through aws-sdk-s3 itself, and a fault-injecting TCP proxy that sits between
//! the function and the server to break, stall or delay responses.
//!
//! moto is `pip install 'moto[server]'` (scripts/test installs it). Missing locally: the tests
//! skip with a SKIP line; under CI=true they fail.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

/// A free loopback port (bound, then released: nothing listens there until someone does).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An executable on PATH that a real-parts test needs. Missing: `None` with a SKIP line naming
/// `how` to install it, except under CI=true, where it fails.
pub fn needed_command(name: &str, how: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{name} is not on PATH: {how} must run before the tests in CI");
        }
        eprintln!("SKIP: {name} not on PATH; run {how}");
    }
    found
}

/// A moto S3 server on a free loopback port; killed (by PID) when dropped.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Starts `moto_server` and waits until it answers. `None`: moto missing locally (skip).
    pub fn start() -> Option<Moto> {
        let exe = needed_command("moto_server", "pip install 'moto[server]' (scripts/test)")?;
        let port = free_port();
        let child = Command::new(exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                // Listening is not enough: werkzeug accepts before the app is imported.
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = write!(
                    s,
                    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                );
                let mut b = [0u8; 12];
                if s.read(&mut b).is_ok_and(|n| n > 0) {
                    return Some(moto);
                }
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The environment a function process needs to reach a loopback S3 server at `endpoint`:
/// the standard SDK variables, dummy credentials (moto does not check signatures), path style.
pub fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL_S3", endpoint.to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("S3_FORCE_PATH_STYLE", "true".into()),
        // Keep the SDK away from the instance metadata service (it has what it needs).
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
}

/// An S3 client for `endpoint` with dummy credentials and path-style addressing, on the same
/// HTTP stack as the function (rustls on ring; plain http for loopback).
pub fn client(endpoint: &str) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .force_path_style(true)
        .http_client(http_client())
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// An SQS client for a loopback server at `endpoint` (moto serves SQS on the same port as S3).
pub fn sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let conf = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http_client())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .build();
    aws_sdk_sqs::Client::from_conf(conf)
}

/// The function's HTTP stack (rustls on ring; plain http for loopback).
pub fn http_client() -> aws_sdk_s3::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// Creates `bucket` and uploads `bytes` as `key` through aws-sdk-s3: one PUT below 16 MB,
/// multipart (8 MB parts) above, as a user's `aws s3 cp` would.
pub async fn upload(client: &aws_sdk_s3::Client, bucket: &str, key: &str, bytes: &[u8]) {
    let _ = client.create_bucket().bucket(bucket).send().await;
    const PART: usize = 8 << 20;
    if bytes.len() < 2 * PART {
        client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(bytes.to_vec()))
            .send()
            .await
            .expect("put_object");
        return;
    }
    let up = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("create_multipart_upload");
    let id = up.upload_id().expect("an upload id");
    let mut parts = Vec::new();
    for (i, part) in bytes.chunks(PART).enumerate() {
        let n = i as i32 + 1;
        let r = client
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(id)
            .part_number(n)
            .body(ByteStream::from(part.to_vec()))
            .send()
            .await
            .expect("upload_part");
        parts.push(
            CompletedPart::builder()
                .part_number(n)
                .set_e_tag(r.e_tag().map(str::to_owned))
                .build(),
        );
    }
    let done = client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await;
    // moto 5.x answers 200 with a <CompleteMultipartUploadResponse> root, which the SDK refuses
    // to parse (S3 says <CompleteMultipartUploadResult>). The upload is complete all the same;
    // the HEAD below is what proves it.
    if let Err(e) = &done {
        let status = e.raw_response().map(|r| r.status().as_u16());
        assert_eq!(status, Some(200), "complete_multipart_upload: {e:?}");
    }
    let head = client
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("head_object after the upload");
    assert_eq!(head.content_length(), Some(bytes.len() as i64));
}

/// Runs `f` on a fresh current-thread runtime (for the sync tests).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// What the proxy does to the requests it relays.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Relay everything.
    Pass,
    /// The `nth` GET (1-based) gets `after` bytes of its response (headers included), then the
    /// connection drops: a body broken mid-way, once.
    BreakOnce { nth_get: usize, after: usize },
    /// Every request is read and never answered: a server too slow for any deadline.
    Stall,
    /// Every request waits this long before it is relayed: a slow server.
    Delay(Duration),
    /// Before the `nth` GET is relayed, the object it asks for is overwritten (a PUT straight to
    /// the server with a dummy signature, which moto does not check): an object replaced
    /// mid-download.
    ReplaceBeforeGet { nth_get: usize },
}

/// A loopback TCP proxy in front of an S3 server, one request per connection (it asks both
/// sides for `Connection: close`), injecting a [`Fault`]. Stops accepting when dropped.
pub struct FaultProxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// GET requests seen.
    pub gets: Arc<AtomicUsize>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl FaultProxy {
    pub fn start(upstream_port: u16, fault: Fault) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let gets = Arc::new(AtomicUsize::new(0));
        let (stop2, gets2) = (stop.clone(), gets.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let gets = gets2.clone();
                let stop = stop2.clone();
                std::thread::spawn(move || relay(conn, upstream_port, fault, &gets, &stop));
            }
        });
        FaultProxy { port, stop, gets }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// `PUT path` with `body` on a fresh connection (signature not computed), waiting for the answer.
fn put_unchecked(port: u16, path: &str, body: &[u8]) {
    let mut up = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        up,
        "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, \
         SignedHeaders=host, Signature=0\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    up.write_all(body).unwrap();
    let mut answer = String::new();
    up.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "PUT {path}: {answer}");
}

fn relay(
    mut client: TcpStream,
    upstream_port: u16,
    fault: Fault,
    gets: &AtomicUsize,
    stop: &AtomicBool,
) {
    // The request head (HEAD and GET carry no body).
    let mut head = Vec::new();
    let mut b = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let is_get = text.starts_with("GET ");
    let nth = if is_get {
        gets.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        0
    };
    let mut limit = usize::MAX;
    match fault {
        Fault::Pass => {}
        Fault::BreakOnce { nth_get, after } if nth == nth_get => limit = after,
        Fault::BreakOnce { .. } => {}
        Fault::Delay(d) => std::thread::sleep(d),
        Fault::ReplaceBeforeGet { nth_get } if nth == nth_get => {
            let path = text
                .split(' ')
                .nth(1)
                .unwrap_or("/")
                .split('?')
                .next()
                .unwrap();
            put_unchecked(
                upstream_port,
                path,
                b"replaced while it was being downloaded",
            );
        }
        Fault::ReplaceBeforeGet { .. } => {}
        Fault::Stall => {
            // Hold the connection until the client gives up (or the test ends).
            let _ = client.set_read_timeout(Some(Duration::from_millis(100)));
            let t0 = Instant::now();
            while !stop.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(60) {
                match client.read(&mut b) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
            return;
        }
    }
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
        return;
    };
    // One request per connection: drop any Connection header and ask for close.
    let mut lines: Vec<&str> = text.split("\r\n").collect();
    lines.retain(|l| !l.to_ascii_lowercase().starts_with("connection:"));
    let end = lines
        .iter()
        .position(|l| l.is_empty())
        .unwrap_or(lines.len());
    lines.insert(end, "Connection: close");
    if up.write_all(lines.join("\r\n").as_bytes()).is_err() {
        return;
    }
    let mut sent = 0usize;
    loop {
        match up.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let n = n.min(limit - sent);
                if client.write_all(&b[..n]).is_err() {
                    break;
                }
                sent += n;
                if sent >= limit {
                    break;
                }
            }
        }
    }
    let _ = client.shutdown(Shutdown::Both);
}
