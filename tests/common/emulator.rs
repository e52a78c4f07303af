//! The real AWS Lambda Runtime Interface Emulator (`aws-lambda-rie` from the aws-sam-cli wheel,
//! put in .cache/bin by scripts/fetch-tools) with the real `bootstrap` under it, on free loopback
//! ports; its stdout collected (the cold-start EMF record goes there); killed by PID when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::s3::free_port;

pub struct Emulator {
    child: Child,
    port: u16,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Emulator {
    /// Starts the emulator with `bootstrap` at 2048 MB, logs at warn; `env` is applied last
    /// (MODEL_URI, AWS_LAMBDA_FUNCTION_MEMORY_SIZE, ... override the defaults).
    pub fn start(rie: &Path, env: &[(&str, String)]) -> Emulator {
        let (port, api_port) = (free_port(), free_port());
        let mut cmd = Command::new(rie);
        cmd.arg("--runtime-interface-emulator-address")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--runtime-api-address")
            .arg(format!("127.0.0.1:{api_port}"))
            .arg(env!("CARGO_BIN_EXE_bootstrap"))
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048")
            .env("RUST_LOG", "warn")
            .env("LOG_LEVEL", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("starting aws-lambda-rie");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (out, sink) = (child.stdout.take().unwrap(), stdout.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "emulator did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Emulator {
            child,
            port,
            stdout,
        }
    }

    /// The process id of the function under the emulator (`bootstrap`, its child), once started.
    pub fn function_pid(&self) -> Option<u32> {
        let parent = self.child.id().to_string();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": the comm may hold spaces, so split after the ')'.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            (ppid == parent && exe.ends_with("bootstrap")).then_some(pid)
        })
    }

    /// One synchronous invoke, as `aws lambda invoke` makes it: the HTTP head and the (de-chunked)
    /// body the emulator answers.
    pub fn invoke_http(&self, payload: &[u8]) -> (String, String) {
        self.invoke_http_within(payload, Duration::from_secs(120))
    }

    /// [`Self::invoke_http`], waiting up to `limit` for the answer.
    pub fn invoke_http_within(&self, payload: &[u8], limit: Duration) -> (String, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(limit)).unwrap();
        write!(
            s,
            "POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            payload.len()
        )
        .unwrap();
        s.write_all(payload).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        (head.to_owned(), body)
    }

    /// The raw body of a successful invoke (a streamed response: prelude, NULs, body).
    pub fn invoke_raw(&self, payload: &[u8]) -> String {
        let (head, body) = self.invoke_http(payload);
        assert!(head.starts_with("HTTP/1.1 200"), "emulator answered {head}");
        body
    }

    /// The JSON an invoke answers (a function error is `{"errorType", "errorMessage"}`).
    pub fn invoke(&self, payload: &[u8]) -> Value {
        self.invoke_within(payload, Duration::from_secs(120))
    }

    /// [`Self::invoke`], waiting up to `limit` for the answer (a long generation).
    pub fn invoke_within(&self, payload: &[u8], limit: Duration) -> Value {
        let (head, body) = self.invoke_http_within(payload, limit);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {head}\n{body}"))
    }

    /// The cold-start EMF record the function printed, once it has printed it.
    pub fn cold_start_record(&self) -> Value {
        self.record("cold_start", |_| true)
    }

    /// The first JSON line on the function's stdout whose `event` is `event` and that `pred`
    /// accepts, waiting up to 10 s for it (records are written after the answer).
    pub fn record(&self, event: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .stdout
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["event"] == event && pred(v));
            if let Some(v) = found {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no matching {event} record on stdout"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (len, rest) = s.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(len.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}
