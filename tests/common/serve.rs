//! `lambda-inference serve` (the real binary) on a free loopback port, waited for until it
//! listens; killed by PID when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Serve {
    pub child: Child,
    pub port: u16,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// `serve` on `model` with `env` (THREADS, limits, ...) and extra CLI `args`; logs at warn.
    pub fn start(model: &Path, env: &[(&str, String)], args: &[&str]) -> Serve {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_lambda-inference"))
            .args(["serve", "--addr", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("MODEL_URI", model)
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting lambda-inference serve");
        let server = Serve { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "serve did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}
