//! `lambda-inference bench embeddings`: the figures users pay for, printed, never asserted.
//!
//! - cold start: spawn of this binary's `invoke` on an API Gateway event -> the response on
//!   stdout, in fresh processes (page cache warm after the first), with each child's peak RSS;
//! - warm latency: one short sentence through the full handler (event decode -> engine -> JSON),
//!   and interleaved with it the same request with bootstrap's per-invoke EMF record (its cost);
//! - throughput: 256 sentences as 8 requests of 32 inputs through the same handler;
//! - weight modes: dense f32 vs candle's quantized matmul on the same file, same inputs;
//! - idle CPU: CPU time burnt while the function waits between requests (must be ~0: no spinning).
//!
//! Reference figures (sentence-transformers, ONNX Runtime) were measured on this kind of machine
//! and are printed beside ours as ratios; they cannot be re-run here (no PyTorch in CI).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lambda_inference::engine::bert::{BertEmbedder, WeightMode};
use lambda_inference::engine::Embedder;
use lambda_inference::service::meter;
use lambda_inference::{app, config::Config, events, metrics};
use serde_json::{json, Value};

/// Reference figures from ../shared/fixtures/README.md (2-vCPU Zen 4 VM, 2 threads).
const ST_COLD_S: f64 = 6.0;
const ST_P50_MS: f64 = 13.8;
const ST_P95_MS: f64 = 19.6;
const ST_SENT_S: f64 = 173.0;
const ST_RSS_MB: f64 = 825.0;
const ORT_INT8_COLD_S: f64 = 0.25;
const ORT_INT8_P50_MS: f64 = 2.4;
const ORT_INT8_SENT_S: f64 = 453.0;

pub struct Options {
    pub model: PathBuf,
    pub cold_runs: usize,
    pub warm_iters: usize,
}

/// An HTTP API (v2) POST of `body` to `path`, as API Gateway delivers it.
pub(crate) fn http_event(path: &str, body: &Value) -> Value {
    json!({
        "version": "2.0",
        "routeKey": format!("POST {path}"),
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/json"},
        "requestContext": {
            "http": {"method": "POST", "path": path, "protocol": "HTTP/1.1",
                     "sourceIp": "127.0.0.1", "userAgent": "bench"},
            "stage": "$default", "requestId": "bench", "routeKey": format!("POST {path}")
        },
        "body": body.to_string(),
        "isBase64Encoded": false
    })
}

fn apigw_v2(body: &Value) -> Value {
    http_event("/v1/embeddings", body)
}

/// Deterministic English-like sentences of `min..=max` words.
pub(crate) fn sentences(n: usize, min: usize, max: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the",
        "function",
        "model",
        "serverless",
        "request",
        "answers",
        "quickly",
        "a",
        "cold",
        "start",
        "from",
        "memory",
        "vector",
        "search",
        "engine",
        "returns",
        "similar",
        "documents",
        "for",
        "every",
        "query",
        "while",
        "users",
        "wait",
        "on",
        "their",
        "phones",
        "and",
        "cloud",
        "bills",
        "grow",
        "slowly",
        "weather",
        "in",
        "Paris",
        "is",
        "mild",
        "today",
        "with",
        "light",
        "rain",
        "expected",
        "tonight",
        "guitar",
        "player",
        "stage",
        "concert",
        "ticket",
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|_| {
            let len = min + (next() % (max - min + 1) as u64) as usize;
            let mut s: Vec<&str> = (0..len)
                .map(|_| WORDS[(next() % WORDS.len() as u64) as usize])
                .collect();
            s.push(".");
            s.join(" ")
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("timings are finite"));
    percentile(v, 0.5)
}

/// Peak RSS of this process (VmHWM), MB.
fn self_peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU time (user + system) this process has used, seconds.
fn self_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the struct we own; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Spawns `invoke` on `event_file`; returns (seconds to the response line, child peak RSS MB).
fn cold_once(exe: &Path, model: &Path, event_file: &Path) -> anyhow::Result<(f64, f64, Value)> {
    let t0 = Instant::now();
    let mut child = Command::new(exe)
        .arg("invoke")
        .arg(event_file)
        .env("MODEL_URI", model)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning invoke")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout is piped")).read_line(&mut line)?;
    let secs = t0.elapsed().as_secs_f64();
    let pid = child.id() as libc::pid_t;
    // wait4 instead of Child::wait: it also returns the child's peak RSS.
    let mut status = 0;
    // SAFETY: plain syscall on our own child's pid with structs we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("invoke exited abnormally (status {status})");
    }
    let resp: Value = serde_json::from_str(line.trim()).context("invoke printed no JSON")?;
    Ok((secs, ru.ru_maxrss as f64 / 1024.0, resp))
}

/// The model's absolute path and the configuration with it as MODEL_URI (the rest from the
/// environment), applied to this process; prints the model and thread lines every bench starts with.
/// The model's absolute path and the configuration with it as MODEL_URI (the rest from the
/// environment), applied to this process.
pub(crate) fn configure(model: &Path) -> anyhow::Result<(PathBuf, Config)> {
    let model = model
        .canonicalize()
        .with_context(|| format!("model {}", model.display()))?;
    let config = Config::from_lookup(|k| match k {
        "MODEL_URI" => Some(model.display().to_string()),
        _ => std::env::var(k).ok(),
    })?;
    app::configure(&config);
    Ok((model, config))
}

/// [`configure`], then prints the model and thread lines every bench starts with.
fn setup(model: &Path) -> anyhow::Result<(PathBuf, Config)> {
    let (model, config) = configure(model)?;
    let size_mb = std::fs::metadata(&model)?.len() as f64 / 1e6;
    println!("model        {} ({size_mb:.1} MB)", model.display());
    println!(
        "threads      {} ({})",
        config.threads, config.threads_reason
    );
    Ok((model, config))
}

pub fn embeddings(opts: &Options) -> anyhow::Result<()> {
    let (model, config) = setup(&opts.model)?;

    // Cold start: fresh processes through the real invoke path.
    let short = "A man is playing a guitar on the stage tonight.";
    let tmp = std::env::temp_dir().join(format!("li-bench-{}.json", std::process::id()));
    std::fs::write(&tmp, apigw_v2(&json!({"input": short})).to_string())?;
    let exe = std::env::current_exe()?;
    let mut colds = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..opts.cold_runs.max(1) {
        let (s, r, resp) = cold_once(&exe, &model, &tmp)?;
        if resp["statusCode"] != 200 {
            bail!("cold invoke answered {resp}");
        }
        colds.push(s * 1e3);
        rss.push(r);
    }
    let _ = std::fs::remove_file(&tmp);
    let cold_min = colds.iter().cloned().fold(f64::MAX, f64::min);
    let cold_p50 = median(&mut colds.clone());
    let rss_max = rss.iter().cloned().fold(0.0, f64::max);
    println!(
        "cold start   p50 {cold_p50:.1} ms, min {cold_min:.1} ms over {} spawns (spawn -> response, \
         page cache warm); sentence-transformers {ST_COLD_S} s = {:.0}x, ORT int8 {ORT_INT8_COLD_S} s = {:.1}x",
        colds.len(),
        ST_COLD_S * 1e3 / cold_p50,
        ORT_INT8_COLD_S * 1e3 / cold_p50
    );
    println!(
        "peak RSS     {rss_max:.1} MB (cold-start process: load + first answer); sentence-transformers {ST_RSS_MB} MB"
    );

    // Warm: the same process serves many requests through the full handler.
    let app = app::App::init(&config).map_err(|e| anyhow::anyhow!("{}: {e}", e.error_type()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let one = apigw_v2(&json!({"input": short}));
    let mut lat = Vec::with_capacity(opts.warm_iters);
    // The same request with bootstrap's per-invoke metrics (a meter, the EMF `request` record
    // built and written as one line, here to /dev/null), interleaved with the plain one so that
    // both see the same machine.
    let mut lat_emf = Vec::with_capacity(opts.warm_iters);
    let devnull = Arc::new(Mutex::new(
        std::fs::OpenOptions::new().write(true).open("/dev/null")?,
    ));
    for i in 0..opts.warm_iters + 10 {
        let t = Instant::now();
        let r = rt.block_on(events::handle(&app.service, one.clone()));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if r["statusCode"] != 200 {
            bail!("warm invoke answered {r}");
        }
        let t = Instant::now();
        let sink = devnull.clone();
        let inv = metrics::Invoke {
            function: "bench".into(),
            request_id: format!("bench-{i}"),
            source: "http-api",
            model: app.service.meta().id.clone(),
            received: t,
        };
        let m = metrics::request_meter(inv, move |line| {
            let _ = writeln!(sink.lock().expect("not poisoned"), "{line}");
        });
        let r = rt.block_on(meter::scope(
            m.clone(),
            events::handle(&app.service, one.clone()),
        ));
        drop(m);
        let ms_emf = t.elapsed().as_secs_f64() * 1e3;
        if r["statusCode"] != 200 {
            bail!("warm invoke answered {r}");
        }
        if i >= 10 {
            lat.push(ms);
            lat_emf.push(ms_emf);
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    lat_emf.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let (p50, p95) = (percentile(&lat, 0.5), percentile(&lat, 0.95));
    let (p50_emf, p95_emf) = (percentile(&lat_emf, 0.5), percentile(&lat_emf, 0.95));
    println!(
        "warm 1 sent  p50 {p50:.2} ms, p95 {p95:.2} ms ({} iters, 13 tokens, full handler); \
         sentence-transformers p50 {ST_P50_MS} / p95 {ST_P95_MS} ms = {:.1}x, ORT int8 p50 {ORT_INT8_P50_MS} ms = {:.2}x",
        lat.len(),
        ST_P50_MS / p50,
        ORT_INT8_P50_MS / p50
    );
    println!(
        "warm + EMF   p50 {p50_emf:.2} ms, p95 {p95_emf:.2} ms (the same request with the per-invoke \
         metrics record, interleaved with the line above: p50 {:+.3} ms)",
        p50_emf - p50
    );

    // Throughput: 256 sentences, 8 requests of 32; a mixed set (8-28 words) and a short set
    // (5-12 words, around the 13-token sentence of the latency figure).
    let mut sents = Vec::new();
    for (label, min, max) in [("mixed", 8, 28), ("short", 5, 12)] {
        let set = sentences(256, min, max);
        let reqs: Vec<Value> = set
            .chunks(32)
            .map(|c| apigw_v2(&json!({ "input": c })))
            .collect();
        let mut best = f64::MAX;
        let mut tokens = 0u64;
        for _ in 0..3 {
            let t = Instant::now();
            tokens = 0;
            for r in &reqs {
                let out = rt.block_on(events::handle(&app.service, r.clone()));
                let body: Value = serde_json::from_str(out["body"].as_str().unwrap_or("{}"))?;
                tokens += body["usage"]["total_tokens"].as_u64().unwrap_or(0);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let sps = 256.0 / best;
        println!(
            "throughput   {sps:.0} sent/s {label} ({:.1} tokens/sentence, {:.0} tokens/s, 8 requests x 32, best of 3); \
             sentence-transformers {ST_SENT_S} = {:.2}x, ORT int8 {ORT_INT8_SENT_S} = {:.2}x",
            tokens as f64 / 256.0,
            tokens as f64 / best,
            sps / ST_SENT_S,
            sps / ORT_INT8_SENT_S
        );
        if sents.is_empty() {
            sents = set;
        }
    }

    // Idle: does anything burn CPU while the function waits for its next event?
    let c0 = self_cpu_s();
    std::thread::sleep(Duration::from_millis(1000));
    println!(
        "idle CPU     {:.1} ms of CPU in 1 s idle after the runs (0 = no spin-waiting threads)",
        (self_cpu_s() - c0) * 1e3
    );
    println!(
        "bench RSS    {:.1} MB peak in this process (after the runs)",
        self_peak_rss_mb()
    );
    drop(app);

    // Weight modes, engine only, same inputs.
    let bytes = std::fs::read(&model)?;
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes[..]))?;
    let refs: Vec<&str> = sents.iter().map(String::as_str).collect();
    for mode in [WeightMode::Dense, WeightMode::Quantized, WeightMode::Int8] {
        let t = Instant::now();
        let e = BertEmbedder::load_with(&content, &bytes, mode)?;
        let load_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut single = Vec::new();
        for i in 0..60 {
            let t = Instant::now();
            e.embed(&[short], 8192)?;
            if i >= 10 {
                single.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let t = Instant::now();
        for c in refs.chunks(32) {
            e.embed(c, 8192)?;
        }
        let sps = 256.0 / t.elapsed().as_secs_f64();
        println!(
            "engine {:<9} load {load_ms:.1} ms, 1 sentence p50 {:.2} ms, {sps:.0} sent/s",
            format!("{mode:?}"),
            median(&mut single)
        );
    }
    Ok(())
}

/// llama.cpp on SmolLM2-135M Q4_1, 2 threads (../shared/fixtures/README.md).
const LCPP_COLD_S: f64 = 0.32;
const LCPP_PREFILL: f64 = 208.0;
const LCPP_DECODE: f64 = 75.6;
const LCPP_RSS_MB: f64 = 211.0;

pub struct GenerateOptions {
    pub model: PathBuf,
    pub cold_runs: usize,
    pub runs: usize,
}

/// A ~120-token chat: the prefill figure's prompt.
fn long_chat() -> Value {
    json!({"messages": [
        {"role": "system", "content": "You are a concise assistant for an engineering team that runs serverless workloads on AWS."},
        {"role": "user", "content": "We deploy a small language model as a Lambda container function behind a Function URL. \
            Cold starts take a few hundred milliseconds, and most requests are short summaries of support tickets. \
            Which three settings should we look at first to keep latency low and costs predictable, and why? \
            Please also say how provisioned concurrency, memory size and response streaming interact, \
            and what we should log on every request to notice regressions early."}
    ]})
}

/// `lambda-inference bench generate`.
pub fn generate(opts: &GenerateOptions) -> anyhow::Result<()> {
    use lambda_inference::engine::generate::argmax;
    use lambda_inference::engine::llama::LlamaGenerator;
    use lambda_inference::engine::{Generator, SharedBytes};
    use std::sync::Arc;

    let (model, _config) = setup(&opts.model)?;

    // Spawn -> first token: a fresh `invoke` process on a short chat with max_tokens 1.
    let tmp = std::env::temp_dir().join(format!("li-bench-gen-{}.json", std::process::id()));
    let short = json!({"messages": [{"role": "user", "content": "What is the capital of Germany?"}],
                       "max_tokens": 1, "temperature": 0});
    std::fs::write(&tmp, short.to_string())?;
    let exe = std::env::current_exe()?;
    let (mut colds, mut rss) = (Vec::new(), Vec::new());
    for _ in 0..opts.cold_runs.max(1) {
        let (s, r, resp) = cold_once(&exe, &model, &tmp)?;
        if resp.get("error").is_some() {
            bail!("cold invoke answered {resp}");
        }
        colds.push(s);
        rss.push(r);
    }
    let _ = std::fs::remove_file(&tmp);
    let cold_min = colds.iter().cloned().fold(f64::MAX, f64::min);
    let cold_p50 = median(&mut colds.clone());
    let rss_max = rss.iter().cloned().fold(0.0, f64::max);
    println!(
        "first token  p50 {:.0} ms, min {:.0} ms over {} spawns (spawn `invoke` -> 1-token chat answer, page cache warm); \
         llama.cpp {:.0} ms = {:.2}x",
        cold_p50 * 1e3,
        cold_min * 1e3,
        colds.len(),
        LCPP_COLD_S * 1e3,
        LCPP_COLD_S / cold_p50
    );
    println!(
        "peak RSS     {rss_max:.1} MB (that process: load + first token); llama.cpp {LCPP_RSS_MB} MB = {:.2}x",
        rss_max / LCPP_RSS_MB
    );

    // In-process: load, then prefill / decode through the model with its KV cache.
    let t = Instant::now();
    let bytes: SharedBytes = Arc::new(artifacts_bytes(&model)?);
    let content = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(
        (*bytes).as_ref(),
    ))?;
    let gen = LlamaGenerator::load(&content, &bytes)?;
    println!(
        "load         {:.1} ms (parse + tokenizer + weights in place, file in page cache)",
        t.elapsed().as_secs_f64() * 1e3
    );
    let chat = long_chat();
    let msgs: Vec<lambda_inference::engine::ChatMessage> = chat["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| lambda_inference::engine::ChatMessage {
            role: m["role"].as_str().unwrap_or_default().into(),
            content: m["content"].as_str().unwrap_or_default().into(),
        })
        .collect();
    let prompt = gen.tokenize(&gen.render_chat(&msgs)?)?;
    let (mut pf, mut dc, mut dc_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..opts.runs.max(1) {
        let (p, d, c) = gen.with_state(|m, st| -> anyhow::Result<(f64, f64, f64)> {
            st.reset();
            let t = Instant::now();
            let mut logits = m.forward(st, &prompt)?;
            let p = t.elapsed().as_secs_f64();
            let (t, c0) = (Instant::now(), self_cpu_s());
            // 128 tokens whatever they are (EOS included): a fixed amount of work.
            for _ in 0..128 {
                let id = argmax(&logits);
                logits = m.forward(st, &[id])?;
            }
            Ok((p, t.elapsed().as_secs_f64(), self_cpu_s() - c0))
        })?;
        pf.push(prompt.len() as f64 / p);
        dc.push(128.0 / d);
        dc_cpu.push(c / 128.0 * 1e3);
    }
    let (pf50, dc50) = (median(&mut pf), median(&mut dc));
    println!(
        "prefill      {pf50:.1} tok/s median of {} ({}-token chat prompt, one batch); llama.cpp {LCPP_PREFILL} = {:.2}x",
        opts.runs,
        prompt.len(),
        pf50 / LCPP_PREFILL
    );
    println!(
        "decode       {dc50:.1} tok/s median of {} (128 tokens after that prompt); llama.cpp {LCPP_DECODE} = {:.2}x",
        opts.runs,
        dc50 / LCPP_DECODE
    );
    // Wall-clock figures fall when other processes share the cores; CPU time per token does
    // not (much), and tells a loaded machine from a slow kernel.
    println!(
        "decode CPU   {:.1} ms of CPU per token (all threads; wall {:.1} ms); load average {}",
        median(&mut dc_cpu),
        1e3 / dc50,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?")
    );
    let c0 = self_cpu_s();
    std::thread::sleep(Duration::from_millis(1000));
    println!(
        "idle CPU     {:.1} ms of CPU in 1 s idle after the runs (0 = no spin-waiting threads)",
        (self_cpu_s() - c0) * 1e3
    );
    println!(
        "bench RSS    {:.1} MB peak in this process",
        self_peak_rss_mb()
    );
    Ok(())
}

/// The model file's bytes, mapped like the function maps them.
fn artifacts_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    Ok(std::fs::read(path)?)
}
