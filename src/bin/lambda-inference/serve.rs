//! `lambda-inference serve`: a local HTTP/1.1 server on the function's own service, so that
//! OpenAI clients (and `curl -N` for streaming) can talk to the model without AWS.
//!
//! Deliberately small (tokio only, no framework): one request per connection
//! (`connection: close`), `content-length` bodies, JSON answers or `text/event-stream` for
//! `stream: true`. Same routing, validation, limits and errors as the Lambda handler, because
//! it is the same [`Service`](lambda_inference::service::Service). Not meant to face the
//! internet, but a client that misbehaves gets an answer, not a dropped connection, and cannot
//! hold the server:
//!
//! | request | answer |
//! |---|---|
//! | request line not `METHOD SP target SP HTTP/1.x` (non-ASCII or non-UTF-8 bytes, missing parts, a target not starting with `/`), a header line without `name:` or with obs-fold, a `content-length` that is not one decimal number fitting 64 bits (`abc`, `-1`, `2^64`) or differs between headers, a body shorter than its `content-length` (client half-closed) | 400 `malformed_request` |
//! | no byte of the head within `--read-timeout-ms` of the connection | closed without an answer |
//! | head (or body) not complete within `--read-timeout-ms` (body: `--body-timeout-ms` in all, each read within `--read-timeout-ms`) | 408 `request_timeout` |
//! | `POST` without `content-length`, or any `transfer-encoding` (chunked bodies are not read) | 411 `length_required` |
//! | `content-length` over `MAX_REQUEST_BYTES` | 413 `payload_too_large`, before any of the body is read |
//! | request line over 8 KiB | 414 `uri_too_long` |
//! | head over 16 KiB, or more than 100 header lines | 431 `request_header_fields_too_large` |
//! | `HTTP/2.0` and other versions but 1.0 and 1.1 | 505 `http_version_not_supported` |
//! | the service's handler panicked | 500 `internal_error` |
//!
//! Every error body is OpenAI's `{"error": {"message", "type", "param", "code"}}` (built with
//! [`ApiError`] where the error table has the kind), and the connection is closed after it. A
//! `POST` with no body at all must still say `content-length: 0` (every POST route needs a JSON
//! body; HTTP clients that send one always send its length, and `curl -X POST` without `-d` gets
//! the 411 that says what is missing). `expect: 100-continue` is answered with `100 Continue`
//! once the length is accepted. `HEAD` answers what `GET` would (status, `content-length`)
//! without the body. A 405 carries `allow` (the route's methods from `service::ROUTES`). The path
//! goes to the service as sent, without its query string and not percent-decoded (as API
//! Gateway's `rawPath`). Reason phrases are the `http` crate's canonical ones.
//!
//! At most `--max-connections` (default 64) connections are open at once; further clients wait
//! in the listen backlog until one closes. With the read timeouts, no connection holds a slot
//! longer than about `--read-timeout-ms` before its request is in, so idle or half-open
//! connections cannot pile up. Writes that stall for 30 s (a client that stopped reading)
//! close the connection, which also stops a streamed generation at its next token.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lambda_inference::api::routes;
use lambda_inference::app::App;
use lambda_inference::error::{ApiError, ErrorKind};
use lambda_inference::events::http::{SSE_HEADERS, SSE_STATUS};
use lambda_inference::service::{
    ApiRequest, ApiResponse, CallOptions, Method, Reply, Streaming, ROUTES,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{timeout, timeout_at, Instant};

/// How `serve` listens and how long it waits for clients.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to listen on.
    pub addr: String,
    /// The request head must arrive within this of the connection being accepted; every read
    /// of the body must make progress within it.
    pub read_timeout: Duration,
    /// The whole body must arrive within this of the head.
    pub body_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// Request line plus headers, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The request line alone.
pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;
/// Header lines.
pub const MAX_HEADERS: usize = 100;
/// A write (response head, body, one SSE event) that makes no progress for this long ends the
/// connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After answering, unread request bytes are drained for at most this long before the socket is
/// closed, so that closing with unread data (an RST) does not destroy the answer in flight.
const LINGER: Duration = Duration::from_secs(2);

/// Serves until the process is stopped.
pub async fn serve(app: Arc<App>, opts: Options) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&opts.addr)
        .await
        .with_context(|| format!("binding {}", opts.addr))?;
    eprintln!(
        "serving {} on http://{} (POST {}, {}, {}, {}, {}, {}; GET {}, {}, {})",
        app.service.meta().id,
        listener.local_addr()?,
        routes::CHAT_COMPLETIONS,
        routes::COMPLETIONS,
        routes::EMBEDDINGS,
        routes::RERANK,
        routes::TEI_RERANK,
        routes::JOBS,
        routes::MODELS,
        routes::HEALTH,
        routes::OPENAPI,
    );
    let slots = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let timeouts = Timeouts {
        read: opts.read_timeout,
        body: opts.body_timeout,
    };
    loop {
        // A slot first, then accept: past the limit, clients wait in the kernel's backlog
        // instead of holding a task and a descriptor here.
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // EMFILE and friends: wait for descriptors to free up instead of exiting.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = sock.set_nodelay(true);
            if let Err(e) = connection(app, sock, timeouts).await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    read: Duration,
    body: Duration,
}

/// A refusal: status and OpenAI error body.
#[derive(Debug)]
struct Refusal {
    status: u16,
    body: Value,
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal {
            status: e.status(),
            body: e.to_body(),
        }
    }
}

/// 400 for a request that is not well-formed HTTP/1.1.
fn malformed(message: impl Into<String>) -> Refusal {
    ApiError::new(ErrorKind::InvalidValue, message)
        .with_code("malformed_request")
        .into()
}

/// The statuses the service's error table has no kind for (408, 411, 414, 431, 505), in the same
/// OpenAI shape.
fn refusal(status: u16, code: &str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        body: json!({
            "error": {
                "message": message.into(),
                "type": "invalid_request_error",
                "param": null,
                "code": code,
            }
        }),
    }
}

/// Why no request came out of the connection.
enum NoRequest {
    /// Closed (or timed out) before sending a byte: nothing to answer.
    Silent,
    Refuse(Refusal),
}

impl From<Refusal> for NoRequest {
    fn from(r: Refusal) -> Self {
        NoRequest::Refuse(r)
    }
}

/// A parsed request head.
#[derive(Debug)]
struct Head {
    method: String,
    /// Path without the query string.
    path: String,
    http11: bool,
    content_length: Option<u64>,
    transfer_encoding: bool,
    expect_continue: bool,
}

async fn connection(app: Arc<App>, sock: TcpStream, t: Timeouts) -> io::Result<()> {
    let mut r = BufReader::new(sock);
    let request = read_request(&app, &mut r, t).await?;
    match request {
        Ok((head, body)) => {
            let head_only = head.method == "HEAD";
            let path = head.path.clone();
            let req = ApiRequest {
                method: Method::parse(&head.method),
                path: head.path,
                body,
            };
            // The service call runs as its own task, so that a panic in it (a bug) still
            // answers 500 instead of dropping the connection.
            let svc = app.clone();
            let call = tokio::spawn(async move {
                let opts = CallOptions {
                    streaming: Streaming::Supported,
                    ..CallOptions::default()
                };
                svc.service.handle_call(req, &opts).await
            });
            let reply = match call.await {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::error!(error = %e, "request handler failed");
                    Reply::Full(
                        ApiError::new(ErrorKind::Internal, "the request handler failed").into(),
                    )
                }
            };
            let allow = allowed_methods(&path);
            let sock = r.get_mut();
            match reply {
                Reply::Full(res) => write_full(sock, &res, head_only, allow.as_deref()).await?,
                Reply::Stream(mut s) => {
                    let mut head = format!("HTTP/1.1 {SSE_STATUS} {}\r\n", reason(SSE_STATUS));
                    for (name, value) in SSE_HEADERS {
                        head.push_str(&format!("{name}: {value}\r\n"));
                    }
                    head.push_str("connection: close\r\n\r\n");
                    write(sock, head.as_bytes()).await?;
                    if !head_only {
                        while let Some(ev) = s.recv().await {
                            write(sock, ev.as_bytes()).await?;
                        }
                    }
                }
            }
        }
        Err(NoRequest::Silent) => return Ok(()),
        Err(NoRequest::Refuse(refusal)) => {
            let res = ApiResponse {
                status: refusal.status,
                body: refusal.body,
            };
            write_full(r.get_mut(), &res, false, None).await?;
        }
    }
    close(r).await;
    Ok(())
}

/// Reads one request: its head, then its body, within the timeouts. `Err` is a socket error
/// (the connection is dropped); `Ok(Err)` says what to answer instead of a service response.
async fn read_request(
    app: &App,
    r: &mut BufReader<TcpStream>,
    t: Timeouts,
) -> io::Result<Result<(Head, Vec<u8>), NoRequest>> {
    let mut got = 0usize;
    let res = timeout(t.read, read_head(r, &mut got)).await;
    let head = match res {
        Ok(Ok(Ok(head))) => head,
        Ok(Ok(Err(e))) => return Ok(Err(e)),
        Ok(Err(e)) => return Err(e),
        Err(_) if got == 0 => return Ok(Err(NoRequest::Silent)),
        Err(_) => {
            return Ok(Err(refusal(
                408,
                "request_timeout",
                format!(
                    "the request head did not arrive within {} ms",
                    t.read.as_millis()
                ),
            )
            .into()))
        }
    };
    if head.transfer_encoding {
        return Ok(Err(refusal(
            411,
            "length_required",
            "transfer-encoding is not supported: send the body with a content-length",
        )
        .into()));
    }
    let len = match head.content_length {
        Some(n) => n,
        None if head.method == "POST" => {
            return Ok(Err(refusal(
                411,
                "length_required",
                "a POST needs a content-length (the JSON body's size in bytes)",
            )
            .into()))
        }
        None => 0,
    };
    let limit = app.service.limits().max_request_bytes;
    if len > limit as u64 {
        return Ok(Err(Refusal::from(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "request body is {len} bytes, more than the limit of {limit} (MAX_REQUEST_BYTES)"
            ),
        ))
        .into()));
    }
    let len = len as usize;
    if head.expect_continue && head.http11 && len > 0 {
        write(r.get_mut(), b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let mut body = vec![0u8; len];
    let mut filled = 0;
    let body_deadline = Instant::now() + t.body;
    while filled < len {
        let step = timeout_at(body_deadline, timeout(t.read, r.read(&mut body[filled..]))).await;
        match step {
            Ok(Ok(Ok(0))) => {
                return Ok(Err(malformed(format!(
                    "the request body ended after {filled} of the {len} bytes its content-length announced"
                ))
                .into()))
            }
            Ok(Ok(Ok(n))) => filled += n,
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) | Err(_) => {
                return Ok(Err(refusal(
                    408,
                    "request_timeout",
                    format!(
                        "the request body stalled: {filled} of the {len} bytes its content-length announced arrived"
                    ),
                )
                .into()))
            }
        }
    }
    Ok(Ok((head, body)))
}

/// What ended a line read.
enum Line {
    /// A complete line, without its CRLF or LF.
    Complete(Vec<u8>),
    /// The bound was reached before a line feed.
    TooLong,
    /// End of stream before a line feed (`got` says whether anything came before).
    Eof,
}

/// Reads one line of at most `max` bytes (line feed included), counting bytes in `got`.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
    got: &mut usize,
) -> io::Result<Line> {
    let mut buf = Vec::new();
    let mut limited = (&mut *r).take(max as u64);
    loop {
        let avail = limited.fill_buf().await?;
        if avail.is_empty() {
            return Ok(if buf.len() as u64 >= max as u64 {
                Line::TooLong
            } else {
                Line::Eof
            });
        }
        match avail.iter().position(|&b| b == b'\n') {
            Some(i) => {
                buf.extend_from_slice(&avail[..i]);
                limited.consume(i + 1);
                *got += i + 1;
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                return Ok(Line::Complete(buf));
            }
            None => {
                let n = avail.len();
                buf.extend_from_slice(avail);
                limited.consume(n);
                *got += n;
            }
        }
    }
}

/// `tchar` of RFC 9110: the characters of methods and header names.
fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Reads the request line and headers (bounded), counting bytes received in `got`.
async fn read_head<R: AsyncBufRead + Unpin>(
    r: &mut R,
    got: &mut usize,
) -> io::Result<Result<Head, NoRequest>> {
    // RFC 9112 2.2: empty lines before the request line are ignored (a few of them).
    let mut used = 0usize;
    let line = loop {
        match read_line(r, MAX_REQUEST_LINE_BYTES + 2, got).await? {
            Line::Complete(l) if l.is_empty() && used < 8 => used += 2,
            Line::Complete(l) => break l,
            Line::TooLong => {
                return Ok(Err(refusal(
                    414,
                    "uri_too_long",
                    format!("the request line is longer than {MAX_REQUEST_LINE_BYTES} bytes"),
                )
                .into()))
            }
            Line::Eof if *got == 0 => return Ok(Err(NoRequest::Silent)),
            Line::Eof => {
                return Ok(Err(malformed(
                    "the connection ended inside the request line",
                )
                .into()))
            }
        }
    };
    used += line.len() + 2;
    let (method, target, http11) = match request_line(&line) {
        Ok(x) => x,
        Err(e) => return Ok(Err(e.into())),
    };
    let mut head = Head {
        method,
        path: target,
        http11,
        content_length: None,
        transfer_encoding: false,
        expect_continue: false,
    };
    let mut lengths: Vec<u64> = Vec::new();
    let mut count = 0usize;
    loop {
        let left = MAX_HEAD_BYTES.saturating_sub(used);
        let too_big = || {
            refusal(
                431,
                "request_header_fields_too_large",
                format!(
                    "the request head is over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} header lines"
                ),
            )
        };
        let line = match read_line(r, left, got).await? {
            Line::Complete(l) => l,
            Line::TooLong => return Ok(Err(too_big().into())),
            Line::Eof => {
                return Ok(Err(malformed(
                    "the connection ended inside the header section",
                )
                .into()))
            }
        };
        used += line.len() + 2;
        if line.is_empty() {
            break;
        }
        count += 1;
        if count > MAX_HEADERS {
            return Ok(Err(too_big().into()));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Ok(Err(malformed(
                "header line folding (a line starting with whitespace) is not allowed",
            )
            .into()));
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Ok(Err(malformed(format!(
                "header line {count} has no ':' (expected name: value)"
            ))
            .into()));
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if !is_token(name) {
            return Ok(Err(malformed(format!(
                "header line {count}: the name must be a token, with no whitespace before ':'"
            ))
            .into()));
        }
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Ok(Err(malformed(format!(
                "header {}: control characters in the value",
                String::from_utf8_lossy(name)
            ))
            .into()));
        }
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            // `1*DIGIT`, possibly repeated as a list of the same number (RFC 9110 8.6).
            for v in value.split(|&b| b == b',') {
                let v = v.trim_ascii();
                match parse_length(v) {
                    Some(n) => lengths.push(n),
                    None => {
                        return Ok(Err(malformed(format!(
                            "content-length {:?} is not a decimal number of bytes (0 to 2^64-1)",
                            String::from_utf8_lossy(v)
                        ))
                        .into()))
                    }
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            head.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            head.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    if let Some(&first) = lengths.first() {
        if lengths.iter().any(|&n| n != first) {
            return Ok(Err(malformed(
                "content-length is given more than once with different values",
            )
            .into()));
        }
        head.content_length = Some(first);
    }
    Ok(Ok(head))
}

/// `1*DIGIT` as a u64: no sign, no spaces, no overflow.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `METHOD SP request-target SP HTTP-version` -> (method, path without query, HTTP/1.1?).
fn request_line(line: &[u8]) -> Result<(String, String, bool), Refusal> {
    let Ok(text) = std::str::from_utf8(line) else {
        return Err(malformed("the request line is not valid UTF-8"));
    };
    if !text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(malformed(
            "the request line must be printable ASCII (percent-encode the target)",
        ));
    }
    let parts: Vec<&str> = text.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(malformed(
            "the request line must be METHOD SP target SP HTTP/1.1",
        ));
    };
    if !is_token(method.as_bytes()) {
        return Err(malformed(format!("{method:?} is not a method")));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v if v.len() == 8
            && v.starts_with("HTTP/")
            && v.as_bytes()[5].is_ascii_digit()
            && v.as_bytes()[6] == b'.'
            && v.as_bytes()[7].is_ascii_digit() =>
        {
            return Err(refusal(
                505,
                "http_version_not_supported",
                format!("{v} is not supported: this server speaks HTTP/1.1"),
            ))
        }
        v => return Err(malformed(format!("{v:?} is not an HTTP version"))),
    };
    // origin-form (`/path?query`), or absolute-form (`http://host/path`, which servers must
    // accept): the path is what the service routes on.
    let path = if let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        }
    } else if target.starts_with('/') {
        target
    } else {
        return Err(malformed(format!(
            "the request target {target:?} must start with '/'"
        )));
    };
    let path = path.split(['?', '#']).next().unwrap_or("/");
    Ok((method.to_owned(), path.to_owned(), http11))
}

/// One write, or an error if the client does not take it within [`WRITE_TIMEOUT`].
async fn write(sock: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    match timeout(WRITE_TIMEOUT, sock.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )),
    }
}

/// A JSON response; for `HEAD`, the same head (with the `content-length` the body would have)
/// and no body.
/// `allow` is the route's methods, sent with a 405.
async fn write_full(
    sock: &mut TcpStream,
    res: &ApiResponse,
    head_only: bool,
    allow: Option<&str>,
) -> io::Result<()> {
    let body = res.body.to_string();
    let allow = allow.filter(|_| res.status == 405);
    let head = response_head(res.status, body.len(), allow);
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    write(sock, &out).await
}

fn response_head(status: u16, content_length: usize, allow: Option<&str>) -> String {
    let allow = allow.map_or(String::new(), |a| format!("allow: {a}\r\n"));
    format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {content_length}\r\n{allow}connection: close\r\n\r\n",
        reason(status)
    )
}

/// The methods [`ROUTES`] has for `path` (`GET` implies `HEAD`), for the `allow` header of a
/// 405; `None` for a path no route matches. A `{param}` segment matches the rest of the path,
/// as the service's routing does.
fn allowed_methods(path: &str) -> Option<String> {
    let path = path.trim_end_matches('/');
    let matches = |template: &str| match template.find('{') {
        Some(i) => path.len() > i && path.starts_with(&template[..i]),
        None => path == template,
    };
    let mut methods: Vec<&str> = Vec::new();
    for &(m, template) in ROUTES {
        if matches(template) && !methods.contains(&m) {
            methods.push(m);
            if m == "GET" {
                methods.push("HEAD");
            }
        }
    }
    (!methods.is_empty()).then(|| methods.join(", "))
}

/// Ends the response (FIN), then drains what the client still sends for a short while, so that
/// the close does not reset a connection whose answer is still in flight.
async fn close(mut r: BufReader<TcpStream>) {
    if r.get_mut().shutdown().await.is_err() {
        return;
    }
    let _ = timeout(LINGER, async {
        let mut sink = [0u8; 8192];
        loop {
            match r.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// The canonical reason phrase of a status (`http` crate).
fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_phrases_are_the_canonical_ones() {
        for (s, r) in [
            (200, "OK"),
            (202, "Accepted"),
            (400, "Bad Request"),
            (404, "Not Found"),
            (405, "Method Not Allowed"),
            (408, "Request Timeout"),
            (409, "Conflict"),
            (411, "Length Required"),
            (413, "Payload Too Large"),
            (414, "URI Too Long"),
            (422, "Unprocessable Entity"),
            (429, "Too Many Requests"),
            (431, "Request Header Fields Too Large"),
            (500, "Internal Server Error"),
            (503, "Service Unavailable"),
            (505, "HTTP Version Not Supported"),
        ] {
            assert_eq!(reason(s), r, "{s}");
        }
        assert_eq!(reason(299), "Unknown");
    }

    #[test]
    fn allow_lists_the_routes_methods() {
        assert_eq!(allowed_methods("/health").as_deref(), Some("GET, HEAD"));
        assert_eq!(allowed_methods("/v1/embeddings/").as_deref(), Some("POST"));
        assert_eq!(allowed_methods("/v1/jobs").as_deref(), Some("POST"));
        assert_eq!(
            allowed_methods("/v1/jobs/j-1").as_deref(),
            Some("GET, HEAD")
        );
        assert_eq!(
            allowed_methods("/v1/models/x/y").as_deref(),
            Some("GET, HEAD")
        );
        assert_eq!(allowed_methods("/nope"), None);
    }

    #[test]
    fn content_lengths_are_plain_decimal_u64() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"abc",
            b"-1",
            b"+1",
            b" 1",
            b"1.0",
            b"0x10",
            b"18446744073709551616",
        ] {
            assert_eq!(parse_length(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn request_lines() {
        let (m, p, v11) = request_line(b"GET /v1/models?x=1 HTTP/1.1").unwrap();
        assert_eq!((m.as_str(), p.as_str(), v11), ("GET", "/v1/models", true));
        let (_, p, v11) =
            request_line(b"POST http://localhost:8080/v1/embeddings HTTP/1.0").unwrap();
        assert_eq!((p.as_str(), v11), ("/v1/embeddings", false));
        assert_eq!(request_line(b"GET / HTTP/2.0").unwrap_err().status, 505);
        for bad in [
            &b"GET /\xff HTTP/1.1"[..],
            b"GET /caf\xc3\xa9 HTTP/1.1",
            b"GET /health",
            b"GET  /health HTTP/1.1",
            b"GET health HTTP/1.1",
            b"G(T / HTTP/1.1",
            b"GET / HTTP/1.1 extra",
            b"GET / FTP/1.1",
        ] {
            let e = request_line(bad).unwrap_err();
            assert_eq!(e.status, 400, "{}", String::from_utf8_lossy(bad));
            assert_eq!(e.body["error"]["code"], "malformed_request");
        }
    }

    #[tokio::test]
    async fn heads_are_bounded() {
        async fn head(raw: &[u8]) -> Result<Head, u16> {
            let mut got = 0;
            let mut r = raw;
            match read_head(&mut r, &mut got).await.unwrap() {
                Ok(h) => Ok(h),
                Err(NoRequest::Refuse(r)) => Err(r.status),
                Err(NoRequest::Silent) => Err(0),
            }
        }
        let h = head(b"\r\nPOST /v1/embeddings HTTP/1.1\r\nContent-Length: 5, 5\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(h.content_length, Some(5));
        assert!(h.expect_continue && h.http11);
        assert_eq!(head(b"").await.unwrap_err(), 0);
        assert_eq!(head(b"GET / HTTP/1.1\r\nHost").await.unwrap_err(), 400);
        assert_eq!(
            head(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .await
                .unwrap_err(),
            400
        );
        let many: String = (0..=MAX_HEADERS)
            .map(|i| format!("x-h{i}: 1\r\n"))
            .collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(head(raw.as_bytes()).await.unwrap_err(), 431);
        let big = format!(
            "GET / HTTP/1.1\r\nx-big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert_eq!(head(big.as_bytes()).await.unwrap_err(), 431);
        let long = format!(
            "GET /{} HTTP/1.1\r\n\r\n",
            "a".repeat(MAX_REQUEST_LINE_BYTES)
        );
        assert_eq!(head(long.as_bytes()).await.unwrap_err(), 414);
    }
}
