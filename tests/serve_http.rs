//! `lambda-inference serve` against clients that do not speak HTTP/1.1 properly, over real TCP:
//! the real binary on the real MiniLM weights, raw bytes in, the exact status line, headers and
//! OpenAI error body out, for every malformed case its module doc lists; slow and idle clients
//! closed by the read timeouts; at most `--max-connections` connections held; `HEAD` without a
//! body; `expect: 100-continue`.
//!
//! Needs models/all-MiniLM-L6-v2.q8_0.gguf (`scripts/fetch-models`); skips without it, except
//! under CI=true.

mod common;
use common::serve::Serve;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

const MODEL: &str = "models/all-MiniLM-L6-v2.q8_0.gguf";
/// MAX_REQUEST_BYTES of the servers here: small, so the 413 cases stay small.
const LIMIT: usize = 4096;

/// The server under test.
struct Server(Serve);

impl Server {
    /// `serve` on MiniLM with `args` added, or `None` (skip) without the model.
    fn start(args: &[&str]) -> Option<Server> {
        let model = common::needed_file(MODEL, "scripts/fetch-models")?;
        let env = [
            ("THREADS", "1".to_string()),
            ("MAX_REQUEST_BYTES", LIMIT.to_string()),
        ];
        Some(Server(Serve::start(&model, &env, args)))
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.0.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    /// Sends `raw` (then half-closes if asked) and reads until the server closes.
    fn exchange(&self, raw: &[u8], half_close: bool) -> (Response, Duration) {
        let mut s = self.connect();
        let t = Instant::now();
        s.write_all(raw).unwrap();
        if half_close {
            s.shutdown(Shutdown::Write).unwrap();
        }
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .unwrap_or_else(|e| panic!("reading the answer: {e}; got {out:?}"));
        (Response::parse(&out), t.elapsed())
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
struct Response {
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn parse(raw: &[u8]) -> Response {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
        let head = std::str::from_utf8(&raw[..end]).expect("an ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap().to_owned();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").expect("name: value");
                (k.to_ascii_lowercase(), v.to_owned())
            })
            .collect();
        Response {
            status_line,
            headers,
            body: raw[end + 4..].to_vec(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the status line, the JSON headers, `connection: close`, and an OpenAI error body
    /// with `code`.
    fn assert_error(&self, case: &str, status_line: &str, code: &str) {
        assert_eq!(self.status_line, status_line, "{case}: {self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{case}"
        );
        assert_eq!(self.header("connection"), Some("close"), "{case}");
        assert_eq!(
            self.header("content-length"),
            Some(self.body.len().to_string().as_str()),
            "{case}"
        );
        let v: Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{case}: body is not JSON ({e}): {self:?}"));
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{case}: {v}"
        );
        assert!(e["type"].is_string(), "{case}: {v}");
        assert!(e.get("param").is_some(), "{case}: {v}");
        assert_eq!(e["code"], code, "{case}: {v}");
        assert_eq!(v.as_object().unwrap().len(), 1, "{case}: {v}");
    }
}

#[test]
fn malformed_requests_get_an_http_answer_with_an_openai_error() {
    let Some(server) = Server::start(&["--read-timeout-ms", "3000"]) else {
        return;
    };
    let many_headers: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, bool, &str, &str)> = vec![
        (
            "content-length: abc",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: abc\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "content-length: -1",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "content-length: 2^64",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n"
                .to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "content-length: 1.5",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 1.5\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "two different content-lengths",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
                .to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "content-length list of different numbers",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 2, 3\r\n\r\n{}".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "non-UTF-8 request line",
            b"GET /health\xff\xfe HTTP/1.1\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "raw UTF-8 in the target",
            "GET /v1/models/café HTTP/1.1\r\n\r\n".as_bytes().to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "no HTTP version",
            b"GET /health\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "garbage request line",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "target without a leading slash",
            b"GET health HTTP/1.1\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "HTTP/2.0",
            b"GET /health HTTP/2.0\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 505 HTTP Version Not Supported",
            "http_version_not_supported",
        ),
        (
            "header line without a colon",
            b"GET /health HTTP/1.1\r\nHost localhost\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "whitespace before the colon",
            b"GET /health HTTP/1.1\r\nHost : localhost\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "obs-fold",
            b"GET /health HTTP/1.1\r\nX-A: 1\r\n  continued\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "control character in a header value",
            b"GET /health HTTP/1.1\r\nX-A: a\x00b\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "head ends before the blank line",
            b"GET /health HTTP/1.1\r\nHost: x\r\n".to_vec(),
            true,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        (
            "POST without content-length",
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 411 Length Required",
            "length_required",
        ),
        (
            "chunked body",
            b"POST /v1/embeddings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n"
                .to_vec(),
            false,
            "HTTP/1.1 411 Length Required",
            "length_required",
        ),
        (
            "content-length over MAX_REQUEST_BYTES, no body sent",
            format!(
                "POST /v1/embeddings HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                LIMIT + 1
            )
            .into_bytes(),
            false,
            "HTTP/1.1 413 Payload Too Large",
            "payload_too_large",
        ),
        (
            "content-length 2^64-1",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n"
                .to_vec(),
            false,
            "HTTP/1.1 413 Payload Too Large",
            "payload_too_large",
        ),
        (
            "request line over 8 KiB",
            format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9 * 1024)).into_bytes(),
            false,
            "HTTP/1.1 414 URI Too Long",
            "uri_too_long",
        ),
        (
            "header section over 16 KiB",
            format!(
                "GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "a".repeat(17 * 1024)
            )
            .into_bytes(),
            false,
            "HTTP/1.1 431 Request Header Fields Too Large",
            "request_header_fields_too_large",
        ),
        (
            "101 header lines",
            format!("GET /health HTTP/1.1\r\n{many_headers}\r\n").into_bytes(),
            false,
            "HTTP/1.1 431 Request Header Fields Too Large",
            "request_header_fields_too_large",
        ),
        (
            "body shorter than content-length, client half-closed",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"input\": \"x\"}"
                .to_vec(),
            true,
            "HTTP/1.1 400 Bad Request",
            "malformed_request",
        ),
        // What the service answers still comes through, with canonical reason phrases.
        (
            "unknown route",
            b"GET /nope HTTP/1.1\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 404 Not Found",
            "not_found",
        ),
        (
            "empty body with content-length: 0",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "invalid_json",
        ),
        (
            "not JSON",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            false,
            "HTTP/1.1 400 Bad Request",
            "invalid_json",
        ),
    ];
    for (case, raw, half_close, status_line, code) in &cases {
        let (res, took) = server.exchange(raw, *half_close);
        res.assert_error(case, status_line, code);
        // None of these waits for a timeout (the 413s answer before the body they announce).
        assert!(took < Duration::from_secs(2), "{case}: took {took:?}");
    }

    // A 405 says which methods the route has.
    let (res, _) = server.exchange(b"DELETE /health HTTP/1.1\r\n\r\n", false);
    res.assert_error(
        "DELETE /health",
        "HTTP/1.1 405 Method Not Allowed",
        "method_not_allowed",
    );
    assert_eq!(res.header("allow"), Some("GET, HEAD"));
    let (res, _) = server.exchange(b"GET /v1/embeddings HTTP/1.1\r\n\r\n", false);
    res.assert_error(
        "GET /v1/embeddings",
        "HTTP/1.1 405 Method Not Allowed",
        "method_not_allowed",
    );
    assert_eq!(res.header("allow"), Some("POST"));

    // The server is still there and answers a good request.
    let body = br#"{"input": ["hello", "world"]}"#;
    let mut raw = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    let (res, _) = server.exchange(&raw, false);
    assert_eq!(res.status_line, "HTTP/1.1 200 OK");
    let v: Value = serde_json::from_slice(&res.body).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
}

#[test]
fn slow_and_idle_clients_are_cut_off_by_the_read_timeouts() {
    let Some(server) = Server::start(&["--read-timeout-ms", "800", "--body-timeout-ms", "1500"])
    else {
        return;
    };
    // A body shorter than its content-length, connection left open: 408 once reads stall.
    let (res, took) = server.exchange(
        b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"input\": \"x\"}",
        false,
    );
    res.assert_error(
        "stalled body",
        "HTTP/1.1 408 Request Timeout",
        "request_timeout",
    );
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // Slow loris: a header byte every 200 ms never completes the head; the head's deadline
    // counts from the connection, not from the last byte.
    let mut s = server.connect();
    let t = Instant::now();
    s.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ").unwrap();
    let mut got = Vec::new();
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        assert!(t.elapsed() < Duration::from_secs(10), "never closed");
        if s.write_all(b"a").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    let took = t.elapsed();
    assert!(took < Duration::from_secs(4), "{took:?}");
    Response::parse(&got).assert_error(
        "slow loris",
        "HTTP/1.1 408 Request Timeout",
        "request_timeout",
    );

    // A connection that never sends a byte is closed without an answer.
    let mut s = server.connect();
    let t = Instant::now();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(out.is_empty(), "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

/// Open descriptors of a process (Linux).
#[cfg(target_os = "linux")]
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn idle_connections_cannot_pile_up() {
    let Some(server) = Server::start(&["--max-connections", "4", "--read-timeout-ms", "1000"])
    else {
        return;
    };
    // Warm up (one full request), so the descriptors counted next are the steady state.
    let (res, _) = server.exchange(b"GET /health HTTP/1.1\r\n\r\n", false);
    assert_eq!(res.status_line, "HTTP/1.1 200 OK");
    #[cfg(target_os = "linux")]
    let before = open_fds(server.0.child.id());

    let idle: Vec<TcpStream> = (0..20).map(|_| server.connect()).collect();
    std::thread::sleep(Duration::from_millis(300));
    #[cfg(target_os = "linux")]
    {
        let during = open_fds(server.0.child.id());
        assert!(
            during <= before + 4,
            "20 idle clients: {during} descriptors, {before} before (at most 4 connections)"
        );
    }

    // The held slots free up as the idle connections time out; a real request gets through.
    let t = Instant::now();
    let (res, _) = server.exchange(b"GET /health HTTP/1.1\r\n\r\n", false);
    assert_eq!(res.status_line, "HTTP/1.1 200 OK");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    // And every idle connection was closed by the server.
    for mut s in idle {
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
    }
}

#[test]
fn head_answers_the_get_head_without_a_body() {
    let Some(server) = Server::start(&[]) else {
        return;
    };
    let (get, _) = server.exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", false);
    assert_eq!(get.status_line, "HTTP/1.1 200 OK");
    let (head, _) = server.exchange(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n", false);
    assert_eq!(head.status_line, "HTTP/1.1 200 OK");
    assert!(head.body.is_empty(), "{:?}", head.body);
    assert_eq!(head.header("content-type"), Some("application/json"));
    // /health's body changes from "cold" to "warm" after the first request; both are 4 bytes.
    assert_eq!(
        head.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );

    let (head, _) = server.exchange(b"HEAD /v1/embeddings HTTP/1.1\r\n\r\n", false);
    assert_eq!(head.status_line, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(head.header("allow"), Some("POST"));
    assert!(head.body.is_empty());
    assert_ne!(head.header("content-length"), Some("0"));
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let Some(server) = Server::start(&[]) else {
        return;
    };
    let body = br#"{"input": "hello"}"#;
    let mut s = server.connect();
    write!(
        s,
        "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let res = Response::parse(&out);
    assert_eq!(res.status_line, "HTTP/1.1 200 OK");
    let v: Value = serde_json::from_slice(&res.body).unwrap();
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 384);

    // Over the limit: the 413 comes instead of the 100, and no body is waited for.
    let mut s = server.connect();
    write!(
        s,
        "POST /v1/embeddings HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        LIMIT * 10
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    Response::parse(&out).assert_error(
        "413 with expect",
        "HTTP/1.1 413 Payload Too Large",
        "payload_too_large",
    );
}
