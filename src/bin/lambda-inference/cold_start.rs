//! `lambda-inference bench cold-start`: the cold start with the model in S3, measured the way
//! Lambda would see it, printed, never asserted.
//!
//! - A moto S3 server on loopback (`moto_server`, a free port) holds the model, uploaded through
//!   aws-sdk-s3.
//! - Fetch throughput, in this process, same object, same run, interleaved: one plain
//!   single-stream GET (`get_object` + `collect`, no hashing), our fetch with the default
//!   settings, and our fetch forced to parallel ranged GETs. Ours is timed until the last byte
//!   landed; its hashing thread runs meanwhile, and how long after the last byte the digest was
//!   ready is printed beside it.
//! - Cold start: spawn of the real `bootstrap` under the real Lambda Runtime Interface Emulator
//!   (.cache/bin/aws-lambda-rie) -> the first embedding response, with the function's own
//!   breakdown (its cold-start EMF line) and its peak RSS (VmHWM of the bootstrap process).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lambda_inference::artifacts::s3::S3ArtifactStore;
use lambda_inference::artifacts::sha256_hex;
use lambda_inference::config::FetchSettings;
use serde_json::Value;

pub struct Options {
    pub model: PathBuf,
    pub runs: usize,
    pub fetch_reps: usize,
    /// Only the fetch figures (models this build cannot serve, e.g. llama GGUFs).
    pub fetch_only: bool,
}

/// Kills (by PID) and reaps a child when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(port: u16, within: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > within {
            bail!("nothing listens on {port} after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    v[v.len() / 2]
}

/// VmHWM (peak RSS) of `pid`, MB.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The PID of `parent`'s child process named `name`.
fn child_named(parent: u32, name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...
        let (comm, rest) = stat.split_once(") ")?;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent && comm.ends_with(&format!("({name}"))).then_some(pid)
    })
}

fn invoke(port: u16, payload: &[u8]) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    )?;
    s.write_all(payload)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("an HTTP response")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body).context("a malformed chunked answer")?
    } else {
        body.to_owned()
    };
    serde_json::from_str(&body).with_context(|| format!("not JSON: {body}"))
}

fn dechunk(mut s: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (len, rest) = s.split_once("\r\n")?;
        let n = usize::from_str_radix(len.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        s = rest.get(n + 2..)?;
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let root = std::env::current_dir()?;
    let rie = root.join(".cache/bin/aws-lambda-rie");
    if !opts.fetch_only && !rie.exists() {
        bail!("{} missing: run scripts/fetch-tools", rie.display());
    }
    let exe = std::env::current_exe()?;
    let bootstrap = exe.with_file_name("bootstrap");
    if !opts.fetch_only && !bootstrap.exists() {
        bail!(
            "{} missing: build it first (cargo build --release)",
            bootstrap.display()
        );
    }
    let bytes =
        std::fs::read(&opts.model).with_context(|| format!("model {}", opts.model.display()))?;
    let sha = sha256_hex(&bytes);
    let mb = bytes.len() as f64 / 1e6;
    println!("model        {} ({mb:.1} MB)", opts.model.display());

    let moto_port = free_port()?;
    let moto = Killed(
        Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &moto_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting moto_server (pip install 'moto[server]')")?,
    );
    wait_listening(moto_port, Duration::from_secs(60))?;
    let endpoint = format!("http://127.0.0.1:{moto_port}");
    let env: Vec<(&str, String)> = vec![
        ("AWS_ENDPOINT_URL_S3", endpoint.clone()),
        ("AWS_ACCESS_KEY_ID", "bench".into()),
        ("AWS_SECRET_ACCESS_KEY", "bench".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("S3_FORCE_PATH_STYLE", "true".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ];
    // SAFETY of set_var (edition 2021): no other thread of this process runs yet; the SDK
    // reads these through its default chain, exactly as the function does.
    for (k, v) in &env {
        std::env::set_var(k, v);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = rt.block_on(async {
        let sdk = lambda_inference::aws::sdk_config().await;
        lambda_inference::aws::s3_client(&sdk, true)
    });
    rt.block_on(async {
        // moto may accept before its app is ready: retry the bucket for a few seconds.
        let t = Instant::now();
        while client
            .create_bucket()
            .bucket("models")
            .send()
            .await
            .is_err()
        {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("moto did not accept create_bucket");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        client
            .put_object()
            .bucket("models")
            .key("model.gguf")
            .body(bytes.clone().into())
            .send()
            .await
            .context("upload")?;
        anyhow::Ok(())
    })?;
    drop(bytes);

    // Fetch throughput, interleaved so that server warm-up and noise hit every variant alike.
    let defaults = FetchSettings::default();
    let forced_ranged = FetchSettings {
        single_get_max_bytes: 0,
        split_below_mb_s: 0,
        ..defaults
    };
    // Every variant's buffer on fresh pages, as in a cold process: glibc otherwise raises its
    // mmap threshold after the first big free and serves later big buffers from memory already
    // faulted in, which flatters whichever variant runs after a big free.
    #[cfg(target_env = "gnu")]
    // SAFETY: a plain allocator setting, made before the loop allocates anything big.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
    let (mut plain, mut ours, mut ranged, mut floor) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Per variant: when the digest was ready, ms after the last byte landed (hashing that did
    // not fit in the download's idle CPU; in the function it overlaps the engine build).
    let (mut ours_hash_tail, mut ranged_hash_tail) = (Vec::new(), Vec::new());
    let mut plan = "";
    for _ in 0..opts.fetch_reps.max(1) {
        rt.block_on(async {
            let t = Instant::now();
            let body = client
                .get_object()
                .bucket("models")
                .key("model.gguf")
                .send()
                .await?
                .body
                .collect()
                .await?
                .into_bytes();
            plain.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(body.len() as f64 == mb * 1e6, "plain GET came back short");
            drop(body);
            // The transfer alone: the same GET with every frame dropped as it arrives (no
            // buffer, no copy). No fetch can land the bytes faster; printed for scale.
            let t = Instant::now();
            let mut body = client
                .get_object()
                .bucket("models")
                .key("model.gguf")
                .send()
                .await?
                .body;
            let mut n = 0;
            while let Some(frame) = body.try_next().await? {
                n += frame.len();
            }
            floor.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(n as f64 == mb * 1e6, "frames-only GET came back short");
            for (settings, out, tail, is_default) in [
                (defaults, &mut ours, &mut ours_hash_tail, true),
                (forced_ranged, &mut ranged, &mut ranged_hash_tail, false),
            ] {
                let t = Instant::now();
                let a = S3ArtifactStore::new(&client, settings)
                    .fetch_object("models", "model.gguf")
                    .await?;
                out.push(t.elapsed().as_secs_f64());
                let (digest, after_ms) = a.digest.wait(&a.bytes);
                anyhow::ensure!(digest == sha, "digest differs");
                tail.push(after_ms);
                if is_default {
                    plan = a.stats.plan;
                }
            }
            anyhow::Ok(())
        })?;
    }
    let (p, o, r, f) = (median(plain), median(ours), median(ranged), median(floor));
    println!(
        "fetch        plain single GET {:.0} MB/s ({:.1} ms); ours, defaults ({plan}) {:.0} MB/s \
         ({:.1} ms, {:.2}x plain; digest ready {:.1} ms after the last byte); ours, forced ranged \
         ({} MiB x {}) {:.0} MB/s ({:.1} ms, {:.2}x; digest +{:.1} ms); transfer alone (frames \
         dropped) {:.0} MB/s ({:.1} ms); medians of {} interleaved reps",
        mb / p,
        p * 1e3,
        mb / o,
        o * 1e3,
        p / o,
        median(ours_hash_tail),
        defaults.chunk_bytes >> 20,
        defaults.concurrency,
        mb / r,
        r * 1e3,
        p / r,
        median(ranged_hash_tail),
        mb / f,
        f * 1e3,
        opts.fetch_reps.max(1)
    );
    if opts.fetch_only {
        drop(moto);
        return Ok(());
    }

    let mut colds = Vec::new();
    let mut rss = Vec::new();
    for run in 0..opts.runs.max(1) {
        let (port, api_port) = (free_port()?, free_port()?);
        let t0 = Instant::now();
        let mut child = Command::new(&rie)
            .arg("--runtime-interface-emulator-address")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--runtime-api-address")
            .arg(format!("127.0.0.1:{api_port}"))
            .arg(&bootstrap)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("MODEL_URI", "s3://models/model.gguf")
            .env("MODEL_SHA256", &sha)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting aws-lambda-rie")?;
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let (out, sink) = (child.stdout.take().expect("piped"), lines.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(l);
            }
        });
        let rie_pid = child.id();
        let child = Killed(child);
        wait_listening(port, Duration::from_secs(10))?;
        let resp = invoke(
            port,
            br#"{"input": "A man is playing a guitar on the stage tonight."}"#,
        )?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if resp["data"][0]["embedding"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0)
            == 0
        {
            bail!("cold invoke answered {resp}");
        }
        let peak = child_named(rie_pid, "bootstrap")
            .and_then(peak_rss_mb)
            .unwrap_or(f64::NAN);
        // The function prints its cold-start record right after answering.
        let t = Instant::now();
        let rec = loop {
            let found = lines
                .lock()
                .expect("lines")
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["event"] == "cold_start");
            if let Some(v) = found {
                break v;
            }
            if t.elapsed() > Duration::from_secs(5) {
                bail!("no cold_start record from the function");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        drop(child);
        println!(
            "cold {run}       {ms:.1} ms spawn -> first embedding; in the function: config {:.1}, first byte {:.1}, \
             fetch {:.1} ms ({:.0} MB/s, {} {} chunk(s), {} retries), verify {:.1}, engine {:.1}, \
             first invoke {:.1}, process start -> answer {:.1} ms; peak RSS {peak:.1} MB",
            rec["ConfigMs"].as_f64().unwrap_or(f64::NAN),
            rec["FirstByteMs"].as_f64().unwrap_or(f64::NAN),
            rec["FetchMs"].as_f64().unwrap_or(f64::NAN),
            rec["FetchMBps"].as_f64().unwrap_or(f64::NAN),
            rec["fetch_plan"].as_str().unwrap_or("?"),
            rec["fetch_chunks"],
            rec["FetchRetries"],
            rec["VerifyMs"].as_f64().unwrap_or(f64::NAN),
            rec["EngineMs"].as_f64().unwrap_or(f64::NAN),
            rec["FirstInvokeMs"].as_f64().unwrap_or(f64::NAN),
            rec["ColdStartMs"].as_f64().unwrap_or(f64::NAN),
        );
        colds.push(ms);
        rss.push(peak);
    }
    let min = colds.iter().cloned().fold(f64::MAX, f64::min);
    let rss_max = rss.iter().cloned().fold(0.0, f64::max);
    println!(
        "cold start   p50 {:.1} ms, min {min:.1} ms over {} spawns (emulator spawn -> first embedding, \
         model from loopback S3, MODEL_SHA256 enforced)",
        median(colds.clone()),
        colds.len()
    );
    println!(
        "peak RSS     {rss_max:.1} MB (bootstrap, max over runs) = model {mb:.1} MB + {:.1} MB",
        rss_max - mb
    );
    drop(moto);
    Ok(())
}
