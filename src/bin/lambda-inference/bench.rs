//! `lambda-inference bench embeddings` and `bench generate`: our own figures, printed, never
//! asserted.
//!
//! Embeddings:
//! - cold start: spawn of this binary's `invoke` on an API Gateway event -> the response on
//!   stdout, in fresh processes (page cache warm after the first), with each child's peak RSS;
//! - warm latency: the latency sentence through the full handler (event decode -> engine -> JSON),
//!   and interleaved with it the same request with bootstrap's per-invoke EMF record (its cost);
//! - throughput: each sentence set as requests of `batch_size` inputs through the same handler;
//! - weight modes: dense f32, candle's quantized matmul and our int8 GEMM on the same file, engine
//!   only, same inputs;
//! - idle CPU: CPU time burnt while the function waits between requests (must be ~0: no spinning).
//!
//! Generation: spawn -> first token, load, prefill and decode tok/s, CPU per decoded token.
//!
//! What runs (sentences, chats, loop counts) is a workload in the JSON format of the anchors kit's
//! `workload.json` (`--workload FILE`); without one, [`EmbeddingsWorkload::builtin`] and
//! [`GenerateWorkload::builtin`], which are that file's content (a unit test compares them with the
//! copy in `tests/fixtures/anchors-workload.json`).
//!
//! Must not: print figures measured elsewhere or ratios against them. A figure from another
//! machine or another run is not comparable with ours; the anchors kit runs the other stacks
//! (ONNX Runtime, llama.cpp) beside this bench on the same workload and prints the ratios. It
//! parses the lines this module prints (`threads`, `cold start p50 .. min ..`, `peak RSS`,
//! `warm 1 sent p50 .. p95 ..`, `throughput .. sent/s <set> (.. tokens/sentence, .. tokens/s`,
//! `engine Int8 load .. 1 sentence p50 .. sent/s`, `idle CPU`, `bench RSS`, `first token p50 ..
//! min ..`, `load`, `prefill .. tok/s .. (N-token chat prompt`, `decode .. tok/s`, `decode CPU`):
//! change their wording only together with the kit's harness.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use lambda_inference::engine::bert::{BertEmbedder, WeightMode};
use lambda_inference::engine::Embedder;
use lambda_inference::service::meter;
use lambda_inference::{app, config::Config, events, metrics};
use serde_json::{json, Map, Value};

pub struct Options {
    pub model: PathBuf,
    pub cold_runs: usize,
    /// Overrides the workload's `timed_calls`.
    pub warm_iters: Option<usize>,
    pub workload: Option<PathBuf>,
}

pub struct GenerateOptions {
    pub model: PathBuf,
    pub cold_runs: usize,
    /// Overrides the workload's `runs`.
    pub runs: Option<usize>,
    pub workload: Option<PathBuf>,
}

// --- the workload --------------------------------------------------------------------------------

/// The workload file format this bench reads (`"schema"` in the file).
const SCHEMA: u64 = 1;

/// What `bench embeddings` runs: the file's top-level `threads` and its `embeddings` part.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EmbeddingsWorkload {
    /// The thread count the workload was written for. The bench runs with `THREADS` (the variable
    /// the function reads), and says so when the two differ.
    pub threads: usize,
    /// The sentence of the cold-start, warm-latency and engine-only figures.
    pub latency_sentence: String,
    /// Untimed handler calls before the timed ones.
    pub warmup_calls: usize,
    pub timed_calls: usize,
    /// Inputs per throughput request.
    pub batch_size: usize,
    /// Requests per throughput pass (`batch_size * requests` = the sentences of each set).
    pub requests: usize,
    /// Throughput passes per set; the best one is reported.
    pub passes: usize,
    pub sets: Vec<SentenceSet>,
    /// Engine-only calls on the latency sentence; the first `engine_skip` are not timed.
    pub engine_calls: usize,
    pub engine_skip: usize,
    /// The set of the engine-only throughput figure, and its passes (best reported).
    pub engine_set: String,
    pub engine_passes: usize,
    /// How long the idle-CPU figure waits.
    pub idle_seconds: f64,
}

/// One throughput set: a label and its sentences (`min_words..=max_words` words each).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SentenceSet {
    pub label: String,
    pub min_words: usize,
    pub max_words: usize,
    pub sentences: Vec<String>,
}

/// What `bench generate` runs: the file's top-level `threads` and its `generation` part.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GenerateWorkload {
    pub threads: usize,
    /// The direct-invoke chat body of the spawn -> first token figure.
    pub first_token_request: Value,
    /// The chat (role, content) prefilled as one batch.
    pub prefill_messages: Vec<(String, String)>,
    /// Greedy tokens decoded after the prefill, EOS ignored: a fixed amount of work.
    pub decode_steps: usize,
    /// Prefill + decode runs; medians are reported.
    pub runs: usize,
    pub idle_seconds: f64,
}

impl EmbeddingsWorkload {
    /// The built-in workload: the anchors kit's `workload.json` (mixed and short sets from
    /// [`sentences`]).
    pub fn builtin() -> Self {
        let (batch_size, requests) = (32, 8);
        let sets = [("mixed", 8, 28), ("short", 5, 12)]
            .into_iter()
            .map(|(label, min_words, max_words)| SentenceSet {
                label: label.into(),
                min_words,
                max_words,
                sentences: sentences(batch_size * requests, min_words, max_words),
            })
            .collect();
        EmbeddingsWorkload {
            threads: 2,
            latency_sentence: "A man is playing a guitar on the stage tonight.".into(),
            warmup_calls: 10,
            timed_calls: 200,
            batch_size,
            requests,
            passes: 3,
            sets,
            engine_calls: 60,
            engine_skip: 10,
            engine_set: "mixed".into(),
            engine_passes: 1,
            idle_seconds: 1.0,
        }
    }

    /// Reads the `embeddings` part of a workload file (and `schema`, `threads`); an error names
    /// the field, as a path from the top of the file.
    pub fn from_json(doc: &Value) -> Result<Self, FieldError> {
        let top = Fields::top(doc)?;
        let threads = top.schema_and_threads()?;
        let e = top.object("embeddings")?;
        let tp = e.object("throughput")?;
        let (batch_size, requests) = (tp.count("batch_size", 1)?, tp.count("requests", 1)?);
        let mut sets = Vec::new();
        for (i, s) in tp.array("sets")?.iter().enumerate() {
            let s = Fields::new(s, format!("{}.sets[{i}]", tp.at))?;
            let at = s.path("sentences");
            let sentences = s
                .array("sentences")?
                .iter()
                .enumerate()
                .map(|(j, v)| match v.as_str() {
                    Some(t) if !t.trim().is_empty() => Ok(t.to_string()),
                    _ => Err(FieldError::new(
                        format!("{at}[{j}]"),
                        "a non-empty string",
                        v,
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if sentences.len() != batch_size * requests {
                return Err(FieldError::msg(
                    at,
                    format!(
                        "{} sentences, but batch_size x requests = {batch_size} x {requests} = {}",
                        sentences.len(),
                        batch_size * requests
                    ),
                ));
            }
            let set = SentenceSet {
                label: s.text("label")?.to_string(),
                min_words: s.count("min_words", 1)?,
                max_words: s.count("max_words", 1)?,
                sentences,
            };
            if sets.iter().any(|o: &SentenceSet| o.label == set.label) {
                return Err(FieldError::msg(
                    s.path("label"),
                    format!("{:?} twice", set.label),
                ));
            }
            sets.push(set);
        }
        if sets.is_empty() {
            return Err(FieldError::msg(tp.path("sets"), "no set"));
        }
        let eo = e.object("engine_only")?;
        let engine_calls = eo.count("calls", 1)?;
        let engine_skip = eo.count("skip", 0)?;
        if engine_skip >= engine_calls {
            return Err(FieldError::msg(
                eo.path("skip"),
                format!("{engine_skip}: must be less than calls ({engine_calls})"),
            ));
        }
        let engine_set = eo.text("throughput_set")?.to_string();
        if !sets.iter().any(|s| s.label == engine_set) {
            return Err(FieldError::msg(
                eo.path("throughput_set"),
                format!("{engine_set:?} is not the label of a set"),
            ));
        }
        Ok(EmbeddingsWorkload {
            threads,
            latency_sentence: e.text("latency_sentence")?.to_string(),
            warmup_calls: e.count("warmup_calls", 0)?,
            timed_calls: e.count("timed_calls", 1)?,
            batch_size,
            requests,
            passes: tp.count("passes", 1)?,
            sets,
            engine_calls,
            engine_skip,
            engine_set,
            engine_passes: eo.count("throughput_passes", 1)?,
            idle_seconds: e.seconds("idle_seconds")?,
        })
    }
}

impl GenerateWorkload {
    /// The built-in workload: the anchors kit's `workload.json`.
    pub fn builtin() -> Self {
        GenerateWorkload {
            threads: 2,
            first_token_request: json!({
                "messages": [{"role": "user", "content": "What is the capital of Germany?"}],
                "max_tokens": 1, "temperature": 0
            }),
            prefill_messages: vec![
                ("system".into(), "You are a concise assistant for an engineering team that runs \
                    serverless workloads on AWS.".into()),
                ("user".into(), "We deploy a small language model as a Lambda container function \
                    behind a Function URL. Cold starts take a few hundred milliseconds, and most \
                    requests are short summaries of support tickets. Which three settings should we \
                    look at first to keep latency low and costs predictable, and why? Please also \
                    say how provisioned concurrency, memory size and response streaming interact, \
                    and what we should log on every request to notice regressions early.".into()),
            ],
            decode_steps: 128,
            runs: 5,
            idle_seconds: 1.0,
        }
    }

    /// Reads the `generation` part of a workload file (and `schema`, `threads`); an error names
    /// the field, as a path from the top of the file.
    pub fn from_json(doc: &Value) -> Result<Self, FieldError> {
        let top = Fields::top(doc)?;
        let threads = top.schema_and_threads()?;
        let g = top.object("generation")?;
        // Sent to `invoke` as it is; the handler's own validation answers for its fields, but
        // a chat body it must be.
        let first = g.object("first_token_request")?;
        first.array("messages")?;
        let mut prefill_messages = Vec::new();
        for (i, m) in g.array("prefill_messages")?.iter().enumerate() {
            let m = Fields::new(m, format!("{}[{i}]", g.path("prefill_messages")))?;
            prefill_messages.push((m.text("role")?.to_string(), m.text("content")?.to_string()));
        }
        if prefill_messages.is_empty() {
            return Err(FieldError::msg(g.path("prefill_messages"), "no message"));
        }
        Ok(GenerateWorkload {
            threads,
            first_token_request: Value::Object(first.map.clone()),
            prefill_messages,
            decode_steps: g.count("decode_steps", 1)?,
            runs: g.count("runs", 1)?,
            idle_seconds: g.seconds("idle_seconds")?,
        })
    }
}

/// A field of a workload file that is missing or not what the bench needs.
#[derive(Debug)]
pub(crate) struct FieldError {
    /// From the top of the file: `embeddings.throughput.sets[1].sentences`.
    pub field: String,
    pub problem: String,
}

impl FieldError {
    fn msg(field: String, problem: impl Into<String>) -> Self {
        FieldError {
            field,
            problem: problem.into(),
        }
    }

    fn new(field: String, expected: &str, found: &Value) -> Self {
        let mut found = found.to_string();
        if found.chars().count() > 60 {
            found = found.chars().take(60).chain("...".chars()).collect();
        }
        Self::msg(field, format!("expected {expected}, found {found}"))
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for FieldError {}

/// The workload in `path` (its part read by `parse`), or the built-in one.
fn read_workload<T>(
    path: Option<&Path>,
    builtin: fn() -> T,
    parse: fn(&Value) -> Result<T, FieldError>,
) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(builtin());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the workload {}", path.display()))?;
    let doc: Value = serde_json::from_str(&text)
        .with_context(|| format!("workload {} is not JSON", path.display()))?;
    parse(&doc).map_err(|e| anyhow!("workload {}: {e}", path.display()))
}

/// A JSON object of the workload file and where it is in the file, for errors that name the field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    /// Empty at the top of the file.
    at: String,
}

impl<'a> Fields<'a> {
    fn top(doc: &'a Value) -> Result<Self, FieldError> {
        match doc {
            Value::Object(map) => Ok(Fields {
                map,
                at: String::new(),
            }),
            _ => Err(FieldError::new(
                "(the whole file)".into(),
                "a JSON object",
                doc,
            )),
        }
    }

    fn new(v: &'a Value, at: String) -> Result<Self, FieldError> {
        match v {
            Value::Object(map) => Ok(Fields { map, at }),
            _ => Err(FieldError::new(at, "an object", v)),
        }
    }

    fn path(&self, key: &str) -> String {
        if self.at.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.at)
        }
    }

    fn get(&self, key: &str) -> Result<&'a Value, FieldError> {
        self.map
            .get(key)
            .ok_or_else(|| FieldError::msg(self.path(key), "missing"))
    }

    fn object(&self, key: &str) -> Result<Fields<'a>, FieldError> {
        Fields::new(self.get(key)?, self.path(key))
    }

    fn array(&self, key: &str) -> Result<&'a Vec<Value>, FieldError> {
        let v = self.get(key)?;
        v.as_array()
            .ok_or_else(|| FieldError::new(self.path(key), "an array", v))
    }

    fn text(&self, key: &str) -> Result<&'a str, FieldError> {
        let v = self.get(key)?;
        match v.as_str() {
            Some(s) if !s.trim().is_empty() => Ok(s),
            _ => Err(FieldError::new(self.path(key), "a non-empty string", v)),
        }
    }

    /// A whole number, at least `min`.
    fn count(&self, key: &str, min: u64) -> Result<usize, FieldError> {
        let v = self.get(key)?;
        match v.as_u64() {
            Some(n) if n >= min => Ok(n as usize),
            _ => Err(FieldError::new(
                self.path(key),
                &format!("a whole number >= {min}"),
                v,
            )),
        }
    }

    /// A duration in seconds, more than 0 (figures are divided by it).
    fn seconds(&self, key: &str) -> Result<f64, FieldError> {
        let v = self.get(key)?;
        match v.as_f64() {
            Some(s) if s > 0.0 && s.is_finite() => Ok(s),
            _ => Err(FieldError::new(
                self.path(key),
                "a number of seconds > 0",
                v,
            )),
        }
    }

    /// `schema` must be the one this bench reads; returns `threads`.
    fn schema_and_threads(&self) -> Result<usize, FieldError> {
        let v = self.get("schema")?;
        if v.as_u64() != Some(SCHEMA) {
            return Err(FieldError::new(
                "schema".into(),
                &format!("{SCHEMA} (the format this bench reads)"),
                v,
            ));
        }
        self.count("threads", 1)
    }
}

// --- measuring -----------------------------------------------------------------------------------

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

/// Deterministic English-like sentences of `min..=max` words (the built-in workload's sets).
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

/// Nearest rank: `sorted[round((n - 1) * p)]`, as the anchors compute theirs.
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

/// CPU burnt while this process sleeps `seconds`, in ms per second: spin-waiting threads show here.
fn idle_cpu_ms_per_s(seconds: f64) -> f64 {
    let c0 = self_cpu_s();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    (self_cpu_s() - c0) * 1e3 / seconds
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

/// `cold_runs` spawns of `invoke` on `event`, each answer checked by `ok`; returns
/// (p50 ms, min ms, the largest peak RSS MB, spawns).
fn cold_starts(
    model: &Path,
    event: &Value,
    cold_runs: usize,
    ok: impl Fn(&Value) -> bool,
) -> anyhow::Result<(f64, f64, f64, usize)> {
    let tmp = std::env::temp_dir().join(format!("li-bench-{}.json", std::process::id()));
    std::fs::write(&tmp, event.to_string())?;
    let exe = std::env::current_exe()?;
    let (mut colds, mut rss) = (Vec::new(), 0.0f64);
    let result = (|| {
        for _ in 0..cold_runs.max(1) {
            let (s, r, resp) = cold_once(&exe, model, &tmp)?;
            if !ok(&resp) {
                bail!("cold invoke answered {resp}");
            }
            colds.push(s * 1e3);
            rss = rss.max(r);
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    let min = colds.iter().cloned().fold(f64::MAX, f64::min);
    Ok((median(&mut colds), min, rss, colds.len()))
}

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

/// [`configure`], then prints the model, thread and workload lines every bench starts with.
fn setup(
    model: &Path,
    workload: Option<&Path>,
    workload_threads: usize,
) -> anyhow::Result<(PathBuf, Config)> {
    let (model, config) = configure(model)?;
    let size_mb = std::fs::metadata(&model)?.len() as f64 / 1e6;
    println!("model        {} ({size_mb:.1} MB)", model.display());
    let pool = lambda_inference::threads::pool_size(&config);
    println!("threads      {} ({})", pool.threads, pool.reason);
    let threads_note = if pool.threads == workload_threads {
        String::new()
    } else {
        format!("; written for {workload_threads} threads, run with THREADS")
    };
    match workload {
        Some(p) => println!("workload     {}{threads_note}", p.display()),
        None => println!("workload     built in (the anchors kit's workload.json){threads_note}"),
    }
    Ok((model, config))
}

/// Nonzero counts from the command line, which override the workload's.
fn at_least_one(flag: &str, n: Option<usize>) -> anyhow::Result<Option<usize>> {
    match n {
        Some(0) => bail!("{flag} must be at least 1"),
        n => Ok(n),
    }
}

pub fn embeddings(opts: &Options) -> anyhow::Result<()> {
    // The workload first: a bad file fails before anything is loaded or spawned.
    let mut w = read_workload(
        opts.workload.as_deref(),
        EmbeddingsWorkload::builtin,
        EmbeddingsWorkload::from_json,
    )?;
    if let Some(n) = at_least_one("--warm-iters", opts.warm_iters)? {
        w.timed_calls = n;
    }
    let (model, config) = setup(&opts.model, opts.workload.as_deref(), w.threads)?;
    let short = w.latency_sentence.as_str();
    let one = apigw_v2(&json!({ "input": short }));

    // Cold start: fresh processes through the real invoke path.
    let (cold_p50, cold_min, rss_max, spawns) =
        cold_starts(&model, &one, opts.cold_runs, |r| r["statusCode"] == 200)?;
    println!(
        "cold start   p50 {cold_p50:.1} ms, min {cold_min:.1} ms over {spawns} spawns (spawn -> response, \
         page cache warm)"
    );
    println!("peak RSS     {rss_max:.1} MB (cold-start process: load + first answer)");

    // Warm: the same process serves many requests through the full handler.
    let app = app::App::init(&config).map_err(|e| anyhow!("{}: {e}", e.error_type()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut lat = Vec::with_capacity(w.timed_calls);
    // The same request with bootstrap's per-invoke metrics (a meter, the EMF `request` record
    // built and written as one line, here to /dev/null), interleaved with the plain one so that
    // both see the same machine.
    let mut lat_emf = Vec::with_capacity(w.timed_calls);
    let devnull = Arc::new(Mutex::new(
        std::fs::OpenOptions::new().write(true).open("/dev/null")?,
    ));
    let mut short_tokens = 0;
    for i in 0..w.warmup_calls + w.timed_calls {
        let t = Instant::now();
        let r = rt.block_on(events::handle(&app.service, one.clone()));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if r["statusCode"] != 200 {
            bail!("warm invoke answered {r}");
        }
        if i == 0 {
            short_tokens = total_tokens(&r)?;
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
        if i >= w.warmup_calls {
            lat.push(ms);
            lat_emf.push(ms_emf);
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    lat_emf.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let (p50, p95) = (percentile(&lat, 0.5), percentile(&lat, 0.95));
    let (p50_emf, p95_emf) = (percentile(&lat_emf, 0.5), percentile(&lat_emf, 0.95));
    println!(
        "warm 1 sent  p50 {p50:.2} ms, p95 {p95:.2} ms ({} calls after {} untimed, {short_tokens} tokens, \
         full handler)",
        lat.len(),
        w.warmup_calls
    );
    println!(
        "warm + EMF   p50 {p50_emf:.2} ms, p95 {p95_emf:.2} ms (the same request with the per-invoke \
         metrics record, interleaved with the line above: p50 {:+.3} ms)",
        p50_emf - p50
    );

    // Throughput: each set as requests of batch_size inputs through the handler, best pass.
    for set in &w.sets {
        let n = set.sentences.len();
        let reqs: Vec<Value> = set
            .sentences
            .chunks(w.batch_size)
            .map(|c| apigw_v2(&json!({ "input": c })))
            .collect();
        let mut best = f64::MAX;
        let mut tokens = 0u64;
        for _ in 0..w.passes {
            let t = Instant::now();
            tokens = 0;
            for r in &reqs {
                let out = rt.block_on(events::handle(&app.service, r.clone()));
                if out["statusCode"] != 200 {
                    bail!("throughput request answered {out}");
                }
                tokens += total_tokens(&out)?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "throughput   {:.0} sent/s {} ({:.1} tokens/sentence, {:.0} tokens/s, {} requests x {}, \
             {}-{} words, best of {})",
            n as f64 / best,
            set.label,
            tokens as f64 / n as f64,
            tokens as f64 / best,
            reqs.len(),
            w.batch_size,
            set.min_words,
            set.max_words,
            w.passes
        );
    }

    // Idle: does anything burn CPU while the function waits for its next event?
    println!(
        "idle CPU     {:.1} ms of CPU per 1 s idle ({} s after the runs; 0 = no spin-waiting threads)",
        idle_cpu_ms_per_s(w.idle_seconds),
        w.idle_seconds
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
    let set = w
        .sets
        .iter()
        .find(|s| s.label == w.engine_set)
        .expect("the workload parser checked that engine_set names a set");
    let refs: Vec<&str> = set.sentences.iter().map(String::as_str).collect();
    for mode in [WeightMode::Dense, WeightMode::Quantized, WeightMode::Int8] {
        let t = Instant::now();
        let e = BertEmbedder::load_with(&content, &bytes, mode)?;
        let load_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut single = Vec::new();
        for i in 0..w.engine_calls {
            let t = Instant::now();
            e.embed(&[short], 8192)?;
            if i >= w.engine_skip {
                single.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let mut best = f64::MAX;
        for _ in 0..w.engine_passes {
            let t = Instant::now();
            for c in refs.chunks(w.batch_size) {
                e.embed(c, 8192)?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "engine {:<9} load {load_ms:.1} ms, 1 sentence p50 {:.2} ms, {:.0} sent/s ({}, best of {})",
            format!("{mode:?}"),
            median(&mut single),
            refs.len() as f64 / best,
            set.label,
            w.engine_passes
        );
    }
    Ok(())
}

/// `usage.total_tokens` of an embeddings response event.
fn total_tokens(resp: &Value) -> anyhow::Result<u64> {
    let body: Value = serde_json::from_str(resp["body"].as_str().unwrap_or("{}"))?;
    body["usage"]["total_tokens"]
        .as_u64()
        .ok_or_else(|| anyhow!("no usage.total_tokens in {body}"))
}

/// `lambda-inference bench generate`.
pub fn generate(opts: &GenerateOptions) -> anyhow::Result<()> {
    use lambda_inference::engine::generate::argmax;
    use lambda_inference::engine::generate::PREFILL_CHUNK;
    use lambda_inference::engine::llama::LlamaGenerator;
    use lambda_inference::engine::{ChatMessage, Generator, SharedBytes};

    // The workload first: a bad file fails before anything is loaded or spawned.
    let mut w = read_workload(
        opts.workload.as_deref(),
        GenerateWorkload::builtin,
        GenerateWorkload::from_json,
    )?;
    if let Some(n) = at_least_one("--runs", opts.runs)? {
        w.runs = n;
    }
    let (model, _config) = setup(&opts.model, opts.workload.as_deref(), w.threads)?;

    // Spawn -> first token: fresh `invoke` processes on the first-token chat body.
    let (cold_p50, cold_min, rss_max, spawns) =
        cold_starts(&model, &w.first_token_request, opts.cold_runs, |r| {
            r.get("error").is_none()
        })?;
    println!(
        "first token  p50 {cold_p50:.0} ms, min {cold_min:.0} ms over {spawns} spawns (spawn `invoke` -> \
         first-token chat answer, page cache warm)"
    );
    println!("peak RSS     {rss_max:.1} MB (that process: load + first token)");

    // In-process: load, then prefill / decode through the model with its KV cache.
    let t = Instant::now();
    let bytes: SharedBytes = Arc::new(std::fs::read(&model)?);
    let content = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(
        (*bytes).as_ref(),
    ))?;
    let gen = LlamaGenerator::load(&content, &bytes)?;
    println!(
        "load         {:.1} ms (read + parse + tokenizer + weights in place, file in page cache)",
        t.elapsed().as_secs_f64() * 1e3
    );
    let msgs: Vec<ChatMessage> = w
        .prefill_messages
        .iter()
        .map(|(role, content)| ChatMessage {
            role: role.clone(),
            content: content.clone(),
        })
        .collect();
    let prompt = gen.tokenize(&gen.render_chat(&msgs)?)?;
    let steps = w.decode_steps;
    let (mut pf, mut dc, mut dc_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..w.runs {
        let (p, d, c) = gen.with_state(|m, st| -> anyhow::Result<(f64, f64, f64)> {
            st.reset();
            let t = Instant::now();
            // In the product's batches: one for any prompt up to PREFILL_CHUNK tokens.
            let mut logits = Vec::new();
            for chunk in prompt.chunks(PREFILL_CHUNK) {
                logits = m.forward(st, chunk)?;
            }
            let p = t.elapsed().as_secs_f64();
            let (t, c0) = (Instant::now(), self_cpu_s());
            // `steps` tokens whatever they are (EOS included): a fixed amount of work.
            for _ in 0..steps {
                let id = argmax(&logits);
                logits = m.forward(st, &[id])?;
            }
            Ok((p, t.elapsed().as_secs_f64(), self_cpu_s() - c0))
        })?;
        pf.push(prompt.len() as f64 / p);
        dc.push(steps as f64 / d);
        dc_cpu.push(c / steps as f64 * 1e3);
    }
    let (pf50, dc50) = (median(&mut pf), median(&mut dc));
    println!(
        "prefill      {pf50:.1} tok/s median of {} ({}-token chat prompt, batches of {PREFILL_CHUNK})",
        w.runs,
        prompt.len()
    );
    println!(
        "decode       {dc50:.1} tok/s median of {} ({steps} greedy tokens after that prompt, EOS ignored)",
        w.runs
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
    println!(
        "idle CPU     {:.1} ms of CPU per 1 s idle ({} s after the runs; 0 = no spin-waiting threads)",
        idle_cpu_ms_per_s(w.idle_seconds),
        w.idle_seconds
    );
    println!(
        "bench RSS    {:.1} MB peak in this process",
        self_peak_rss_mb()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The anchors kit's workload.json, copied (CI does not have the kit).
    const KIT: &str = include_str!("../../../tests/fixtures/anchors-workload.json");

    fn kit() -> Value {
        serde_json::from_str(KIT).expect("the fixture is JSON")
    }

    #[test]
    fn the_kits_workload_parses_and_is_the_builtin_one() {
        let e = EmbeddingsWorkload::from_json(&kit()).unwrap();
        assert_eq!(e, EmbeddingsWorkload::builtin());
        assert_eq!(e.sets.len(), 2);
        assert_eq!(e.sets[1].sentences.len(), 256);
        let g = GenerateWorkload::from_json(&kit()).unwrap();
        assert_eq!(g, GenerateWorkload::builtin());
    }

    #[test]
    fn a_small_workload_file_is_read_as_written() {
        let doc = json!({
            "schema": 1, "threads": 1,
            "embeddings": {
                "latency_sentence": "Hello there.", "warmup_calls": 0, "timed_calls": 3,
                "throughput": {"batch_size": 2, "requests": 1, "passes": 4, "sets": [
                    {"label": "tiny", "min_words": 1, "max_words": 2, "sentences": ["a .", "b c ."]}
                ]},
                "engine_only": {"calls": 2, "skip": 1, "throughput_set": "tiny", "throughput_passes": 2},
                "idle_seconds": 0.25
            },
            "generation": {
                "first_token_request": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
                "prefill_messages": [{"role": "user", "content": "Hello"}],
                "decode_steps": 3, "runs": 2, "idle_seconds": 0.5
            }
        });
        let e = EmbeddingsWorkload::from_json(&doc).unwrap();
        assert_eq!(
            (
                e.threads,
                e.latency_sentence.as_str(),
                e.warmup_calls,
                e.timed_calls
            ),
            (1, "Hello there.", 0, 3)
        );
        assert_eq!((e.batch_size, e.requests, e.passes), (2, 1, 4));
        assert_eq!(
            e.sets,
            vec![SentenceSet {
                label: "tiny".into(),
                min_words: 1,
                max_words: 2,
                sentences: vec!["a .".into(), "b c .".into()],
            }]
        );
        assert_eq!(
            (
                e.engine_calls,
                e.engine_skip,
                e.engine_set.as_str(),
                e.engine_passes
            ),
            (2, 1, "tiny", 2)
        );
        assert_eq!(e.idle_seconds, 0.25);
        let g = GenerateWorkload::from_json(&doc).unwrap();
        assert_eq!(
            g.first_token_request,
            doc["generation"]["first_token_request"]
        );
        assert_eq!(g.prefill_messages, vec![("user".into(), "Hello".into())]);
        assert_eq!((g.decode_steps, g.runs, g.idle_seconds), (3, 2, 0.5));
    }

    /// Each malformed variant of the kit's file is refused, and the error names the field.
    #[test]
    fn a_malformed_workload_is_refused_with_the_field_named() {
        let cases: &[(&str, &str, Option<Value>)] = &[
            ("", "schema", Some(json!(2))),
            ("", "threads", Some(json!(0))),
            ("", "embeddings", None),
            (
                "/embeddings",
                "embeddings.latency_sentence",
                Some(json!("")),
            ),
            ("/embeddings", "embeddings.timed_calls", Some(json!(0))),
            ("/embeddings", "embeddings.warmup_calls", Some(json!(-1))),
            ("/embeddings", "embeddings.idle_seconds", Some(json!(0))),
            (
                "/embeddings/throughput",
                "embeddings.throughput.batch_size",
                None,
            ),
            (
                "/embeddings/throughput",
                "embeddings.throughput.batch_size",
                Some(json!("32")),
            ),
            (
                "/embeddings/throughput",
                "embeddings.throughput.passes",
                Some(json!(1.5)),
            ),
            (
                "/embeddings/throughput",
                "embeddings.throughput.sets",
                Some(json!([])),
            ),
            (
                "/embeddings/throughput",
                "embeddings.throughput.requests",
                Some(json!(7)),
            ),
            (
                "/embeddings/throughput/sets/1",
                "embeddings.throughput.sets[1].label",
                Some(json!("mixed")),
            ),
            (
                "/embeddings/throughput/sets/1",
                "embeddings.throughput.sets[1].max_words",
                None,
            ),
            (
                "/embeddings/engine_only",
                "embeddings.engine_only.skip",
                Some(json!(60)),
            ),
            (
                "/embeddings/engine_only",
                "embeddings.engine_only.throughput_set",
                Some(json!("long")),
            ),
            ("", "generation", Some(json!([]))),
            ("/generation", "generation.decode_steps", Some(json!(0))),
            ("/generation", "generation.runs", Some(json!(null))),
            (
                "/generation",
                "generation.first_token_request",
                Some(json!("hi")),
            ),
            (
                "/generation/first_token_request",
                "generation.first_token_request.messages",
                None,
            ),
            (
                "/generation",
                "generation.prefill_messages",
                Some(json!([])),
            ),
            (
                "/generation/prefill_messages/0",
                "generation.prefill_messages[0].role",
                None,
            ),
        ];
        for (parent, field, value) in cases {
            let mut doc = kit();
            let key = field.rsplit(['.', ']']).next().expect("a field name");
            let obj = doc
                .pointer_mut(parent)
                .and_then(Value::as_object_mut)
                .expect("the case's parent is an object of the fixture");
            match value {
                Some(v) => obj.insert(key.to_string(), v.clone()),
                None => obj.remove(key),
            };
            let err = if field.starts_with("generation") {
                GenerateWorkload::from_json(&doc).err()
            } else {
                EmbeddingsWorkload::from_json(&doc).err()
            };
            let err = err.unwrap_or_else(|| panic!("{field} = {value:?} was accepted"));
            // `embeddings.throughput.requests` = 7: the sets no longer have batch_size x requests
            // sentences, and that is where the error points.
            let want = if *field == "embeddings.throughput.requests" {
                "embeddings.throughput.sets[0].sentences"
            } else {
                field
            };
            assert_eq!(err.field, want, "{err}");
        }
        // One sentence that is not a string: named by its index.
        let mut doc = kit();
        doc["embeddings"]["throughput"]["sets"][0]["sentences"][5] = json!(5);
        let err = EmbeddingsWorkload::from_json(&doc).unwrap_err();
        assert_eq!(err.field, "embeddings.throughput.sets[0].sentences[5]");
        assert_eq!(
            err.to_string(),
            "embeddings.throughput.sets[0].sentences[5]: expected a non-empty string, found 5"
        );
    }

    #[test]
    fn a_workload_file_that_is_not_json_is_refused_with_its_name() {
        let p = std::env::temp_dir().join(format!("li-bench-workload-{}.json", std::process::id()));
        std::fs::write(&p, "{\"schema\": 1,").unwrap();
        let err = read_workload(
            Some(&p),
            EmbeddingsWorkload::builtin,
            EmbeddingsWorkload::from_json,
        )
        .unwrap_err();
        let _ = std::fs::remove_file(&p);
        assert!(
            format!("{err:#}").contains(&format!("workload {} is not JSON", p.display())),
            "{err:#}"
        );
    }
}
