//! A stand-in for the Lambda Runtime API (2018-06-01) that a test scripts request by request, to
//! drive the real `bootstrap` through steps the emulator (`aws-lambda-rie`) does not have: the
//! SnapStart restore sequence. It answers what AWS answers, as the documentation describes it:
//!
//! - "Implementing SnapStart hooks for container images"
//!   (https://docs.aws.amazon.com/lambda/latest/dg/snapstart-runtime-hooks-custom.html): the
//!   runtime checks that AWS_LAMBDA_INITIALIZATION_TYPE is `snap-start`, runs its before-snapshot
//!   hooks at the end of init and calls `GET /runtime/restore/next`; Lambda takes the snapshot
//!   while that call waits, and the call returns in each environment restored from it; the
//!   runtime then runs its after-restore hooks, reports a failure on
//!   `POST /runtime/restore/error`, and otherwise enters the invocation loop
//!   (`GET /runtime/invocation/next`, `POST /runtime/invocation/{id}/response`).
//! - The Runtime API reference (https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html):
//!   the `Lambda-Runtime-*` headers of `/invocation/next`, 202 for responses and errors.
//!
//! Every request but one goes to the test ([`RuntimeApi::expect`]), which answers it when it
//! chooses: a held `/restore/next` is the snapshot. The exception is `GET /credentials`, the
//! container credentials endpoint SnapStart functions get their credentials from
//! (AWS_CONTAINER_CREDENTIALS_FULL_URI): answered at once with fresh credentials, and counted.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

/// An answer: status, headers, body.
type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// One HTTP request the function made, waiting for the test's answer.
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lowercase.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    reply: Sender<Answer>,
}

impl Request {
    pub fn answer(self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let headers = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let _ = self.reply.send((status, headers, body.to_vec()));
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {}: body is not JSON ({e}): {:?}",
                self.method,
                self.path,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// The trace header of a sampled invoke (the X-Ray documentation's example ids).
pub const SAMPLED_TRACE: &str =
    "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";

pub struct RuntimeApi {
    pub port: u16,
    requests: Receiver<Request>,
    /// `GET /credentials` requests answered so far.
    pub credentials_served: Arc<AtomicUsize>,
}

impl RuntimeApi {
    pub fn start() -> RuntimeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = channel();
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let (tx, counter) = (tx.clone(), counter.clone());
                std::thread::spawn(move || serve(conn, tx, counter));
            }
        });
        RuntimeApi {
            port,
            requests: rx,
            credentials_served: served,
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The next request the function makes (within `timeout`); it must be `method path`.
    pub fn expect(&self, method: &str, path: &str, timeout: Duration) -> Request {
        let r = self
            .requests
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no {method} {path} within {timeout:?}: {e}"));
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            (method, path),
            "unexpected request; body: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        r
    }

    /// Whether the function makes any request within `wait`.
    pub fn quiet_for(&self, wait: Duration) -> Option<(String, String)> {
        self.requests
            .recv_timeout(wait)
            .ok()
            .map(|r| (r.method.clone(), r.path.clone()))
    }

    /// Answers a held `GET /runtime/invocation/next` with `event`, as Lambda does (a sampled
    /// trace header).
    pub fn invoke(next: Request, request_id: &str, event: &serde_json::Value) {
        Self::invoke_traced(next, request_id, event, SAMPLED_TRACE);
    }

    /// [`RuntimeApi::invoke`] with `trace` as the invoke's `Lambda-Runtime-Trace-Id`.
    pub fn invoke_traced(next: Request, request_id: &str, event: &serde_json::Value, trace: &str) {
        let deadline = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            + 60_000;
        next.answer(
            200,
            &[
                ("Content-Type", "application/json"),
                ("Lambda-Runtime-Aws-Request-Id", request_id),
                ("Lambda-Runtime-Deadline-Ms", &deadline.to_string()),
                (
                    "Lambda-Runtime-Invoked-Function-Arn",
                    "arn:aws:lambda:us-east-1:123456789012:function:snap:1",
                ),
                ("Lambda-Runtime-Trace-Id", trace),
            ],
            event.to_string().as_bytes(),
        );
    }
}

/// One keep-alive connection: requests in, the test's answers out, in order.
fn serve(conn: TcpStream, tx: Sender<Request>, credentials: Arc<AtomicUsize>) {
    let mut out = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let body = if headers
            .get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            read_chunked(&mut r)
        } else {
            let n: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut b = vec![0; n];
            if r.read_exact(&mut b).is_err() {
                return;
            }
            b
        };
        let (status, hs, body) = if path == "/credentials" {
            let n = credentials.fetch_add(1, Ordering::SeqCst) + 1;
            let creds = serde_json::json!({
                "AccessKeyId": format!("ASIASTANDIN{n:05}"),
                "SecretAccessKey": "stand-in-secret",
                "Token": format!("stand-in-token-{n}"),
                "Expiration": "2099-01-01T00:00:00Z",
            });
            (200, vec![], creds.to_string().into_bytes())
        } else {
            let (reply, answer) = channel();
            let req = Request {
                method,
                path,
                headers,
                body,
                reply,
            };
            if tx.send(req).is_err() {
                return;
            }
            match answer.recv() {
                Ok(a) => a,
                Err(_) => return,
            }
        };
        let mut head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in hs {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if out.write_all(head.as_bytes()).is_err() || out.write_all(&body).is_err() {
            return;
        }
    }
}

fn read_chunked(r: &mut impl BufRead) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let mut len = String::new();
        if r.read_line(&mut len).unwrap_or(0) == 0 {
            return body;
        }
        let n = usize::from_str_radix(len.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        let mut chunk = vec![0; n + 2];
        if r.read_exact(&mut chunk).is_err() {
            return body;
        }
        if n == 0 {
            return body;
        }
        body.extend_from_slice(&chunk[..n]);
    }
}
