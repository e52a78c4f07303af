//! `lambda-inference serve`: a local HTTP/1.1 server on the function's own service, so that
//! OpenAI clients (and `curl -N` for streaming) can talk to the model without AWS.
//!
//! Deliberately small (tokio only, no framework): one request per connection
//! (`connection: close`), `content-length` bodies, JSON answers or `text/event-stream` for
//! `stream: true`. Same routing, validation, limits and errors as the Lambda handler, because
//! it is the same [`Service`]. Not meant to face the internet.

use std::sync::Arc;

use anyhow::Context;
use lambda_inference::app::App;
use lambda_inference::service::{ApiRequest, CallOptions, Method, Reply, Streaming};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Serves until the process is stopped.
pub async fn serve(app: Arc<App>, addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!(
        "serving {} on http://{} (POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /health)",
        app.service.meta().id,
        listener.local_addr()?
    );
    loop {
        let (sock, _) = listener.accept().await?;
        let app = app.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(&app, sock).await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}

async fn connection(app: &App, sock: TcpStream) -> anyhow::Result<()> {
    let mut r = BufReader::new(sock);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let (method, path) = (Method::parse(method), target.to_owned());
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().context("content-length")?;
            }
        }
    }
    let limit = app.service.limits().max_request_bytes;
    // Read at most one byte past the limit: the service answers 413 without us buffering more.
    let mut body = vec![0u8; len.min(limit + 1)];
    r.read_exact(&mut body).await?;
    let req = ApiRequest {
        method,
        path: path.split('?').next().unwrap_or("/").to_owned(),
        body,
    };
    let opts = CallOptions {
        deadline: None,
        streaming: Streaming::Supported,
    };
    let mut sock = r.into_inner();
    match app.service.handle_call(req, &opts).await {
        Reply::Full(res) => {
            let body = res.body.to_string();
            let head = format!(
                "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                res.status,
                reason(res.status),
                body.len()
            );
            sock.write_all(head.as_bytes()).await?;
            sock.write_all(body.as_bytes()).await?;
        }
        Reply::Stream(mut s) => {
            sock.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n",
            )
            .await?;
            while let Some(ev) = s.rx.recv().await {
                sock.write_all(ev.as_bytes()).await?;
                sock.flush().await?;
            }
        }
    }
    sock.shutdown().await?;
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}
