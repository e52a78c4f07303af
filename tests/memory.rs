//! Memory under the worst requests the default limits allow, through the real `bootstrap` under
//! the real Lambda Runtime Interface Emulator, inside a cgroup (v1) holding the template's
//! default memory (2,048 MB, `memory.limit_in_bytes`) and Lambda's CPU share at that size
//! (2,048 / 1,769 of a vCPU, `cpu.cfs_quota_us`): the emulator enforces neither, so the test does.
//!
//! Requests, on MiniLM (the embedded default):
//! - one 6 MB input of "!" (every character a token): refused with 413 from a bounded count,
//!   never tokenized whole (that took 2.9 GB before);
//! - a 5.9 MB body of 2,048 inputs (MAX_INPUTS) of ~2.8 KB, words padded with spaces: the most
//!   inputs and bytes a request may carry, cheap to embed;
//! - a full forward-pass batch: 32 inputs of a full 256-token window (the engine's largest
//!   activation; more inputs only repeat it batch by batch).
//!
//! Peak RSS of the function stays under [`PEAK_BOUND_MB`], and after the requests RSS is back
//! within 20 MB of where it was after the first (warm-up) request.
//!
//! On SmolLM2-135M Q4_1 (the generator `scripts/fetch-models` fetches), the longest prompt the
//! limits allow: the model's context less the one token the answer needs (8,191 tokens, under
//! `MAX_INPUT_TOKENS`' 8,192), the most KV cache and prefill work a request can make. Peak RSS
//! stays under [`GEN_PEAK_BOUND_MB`], and after it the cache and heap go back to within
//! [`GEN_KEPT_MB`] of where they were. The wall time is printed: it is what `ApiTimeout` must
//! allow for such a prompt at this memory size.
//!
//! Needs root (cgroup v1 memory and cpu controllers), the emulator and the model; skips without
//! them, fails under CI=true.

use std::time::Instant;

use serde_json::json;

mod common;
use common::emulator::Emulator;

/// The template's default MemorySize.
const MEMORY_MB: u64 = 2048;
/// The bound asserted on the function's peak RSS (model mapping included).
const PEAK_BOUND_MB: f64 = 400.0;
/// The same for the longest prompt on SmolLM2-135M Q4_1 (98 MB file, 8,191 positions of f16
/// cache at 23 KB each: 189 MB, prefill activations of one 512-token chunk).
const GEN_PEAK_BOUND_MB: f64 = 500.0;
/// What a finished generation may keep: the cache's first 1,024 positions (23.6 MB on this
/// model) and what glibc keeps below its trim threshold.
const GEN_KEPT_MB: f64 = 40.0;

/// The tests share the process, so its cgroup: one at a time, each timed alone.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn status_kb(pid: u32, field: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Moves this test process (and so the emulator and function it starts) into fresh cgroups with
/// Lambda's memory and CPU at `MEMORY_MB`. `None`: no cgroup v1 controllers writable here.
fn enter_lambda_cgroup() -> Option<()> {
    let name = format!("lambda-inference-memory-{}", std::process::id());
    let mem = format!("/sys/fs/cgroup/memory/{name}");
    let cpu = format!("/sys/fs/cgroup/cpu/{name}");
    let setup = || -> std::io::Result<()> {
        std::fs::create_dir_all(&mem)?;
        std::fs::write(
            format!("{mem}/memory.limit_in_bytes"),
            (MEMORY_MB << 20).to_string(),
        )?;
        std::fs::create_dir_all(&cpu)?;
        std::fs::write(format!("{cpu}/cpu.cfs_period_us"), "100000")?;
        let quota = 100_000 * MEMORY_MB / 1769;
        std::fs::write(format!("{cpu}/cpu.cfs_quota_us"), quota.to_string())?;
        let me = std::process::id().to_string();
        std::fs::write(format!("{mem}/cgroup.procs"), &me)?;
        std::fs::write(format!("{cpu}/cgroup.procs"), &me)?;
        Ok(())
    };
    match setup() {
        Ok(()) => Some(()),
        Err(e) => {
            let msg = format!("cgroup v1 memory/cpu controllers not writable here: {e}");
            assert!(std::env::var("CI").is_err(), "{msg}");
            eprintln!("SKIP: {msg}");
            None
        }
    }
}

/// The real bootstrap on `model` under the emulator, in the Lambda cgroup, with the template's
/// memory size and a timeout that lets the slowest request finish. `None`: skipped (no
/// emulator, model or cgroup here).
fn function_in_lambda_cgroup(model: &str) -> Option<Emulator> {
    let rie = common::needed_file(".cache/bin/aws-lambda-rie", "scripts/fetch-tools")?;
    let model = common::needed_file(model, "scripts/fetch-models")?;
    enter_lambda_cgroup()?;
    let env = [
        ("MODEL_URI", model.display().to_string()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", MEMORY_MB.to_string()),
        ("AWS_LAMBDA_FUNCTION_TIMEOUT", "900".to_string()),
    ];
    Some(Emulator::start(&rie, &env))
}

fn words(n_bytes: usize, seed: usize) -> String {
    let mut s = String::new();
    let mut i = seed;
    while s.len() + 12 < n_bytes {
        s.push_str(&format!("word{} ", (i * 7919) % 10007));
        i += 1;
    }
    s
}

#[test]
fn worst_requests_stay_bounded_under_the_template_memory_and_memory_goes_back() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(emu) = function_in_lambda_cgroup("models/default.gguf") else {
        return;
    };
    let warm = emu.invoke(br#"{"input": "warm up"}"#);
    assert_eq!(warm["data"][0]["embedding"].as_array().unwrap().len(), 384);
    let pid = emu
        .function_pid()
        .expect("bootstrap runs under the emulator");
    let before = status_kb(pid, "VmRSS:") / 1024.0;

    // 1. One 6 MB input, each character a token.
    let bang = json!({ "input": "!".repeat(6_000_000) }).to_string();
    let t = Instant::now();
    let out = emu.invoke(bang.as_bytes());
    let bang_s = t.elapsed().as_secs_f64();
    assert_eq!(out["error"]["code"], "payload_too_large", "{out}");
    assert!(bang_s < 2.0, "the 413 took {bang_s:.2} s");

    // 2. MAX_INPUTS inputs filling the body limit (6 MiB): cheap to embed, most to parse.
    let padded: Vec<String> = (0..2048)
        .map(|i| format!("{}{}", words(40, i), " ".repeat(2_800)))
        .collect();
    let many = json!({ "input": padded, "encoding_format": "base64" }).to_string();
    assert!(
        many.len() > 5_800_000 && many.len() <= 6 << 20,
        "{}",
        many.len()
    );
    let t = Instant::now();
    let out = emu.invoke(many.as_bytes());
    let many_s = t.elapsed().as_secs_f64();
    assert_eq!(
        out["data"].as_array().map(Vec::len),
        Some(2048),
        "{}",
        &out.to_string()[..200.min(out.to_string().len())]
    );

    // 3. One full batch of full windows: the engine's largest activations.
    let full: Vec<String> = (0..32).map(|i| words(3_000, i)).collect();
    let t = Instant::now();
    let out = emu.invoke(json!({ "input": full }).to_string().as_bytes());
    let full_s = t.elapsed().as_secs_f64();
    assert_eq!(out["data"].as_array().map(Vec::len), Some(32));
    assert_eq!(out["usage"]["prompt_tokens"], 32 * 256, "{}", out["usage"]);

    let peak = status_kb(pid, "VmHWM:") / 1024.0;
    let after = status_kb(pid, "VmRSS:") / 1024.0;
    eprintln!(
        "memory (MiniLM q8_0, {MEMORY_MB} MB cgroup, {:.2} vCPU): RSS before {before:.1} MB, \
         peak {peak:.1} MB, after {after:.1} MB; 6 MB '!' -> 413 in {bang_s:.2} s, \
         2048 inputs in {many_s:.1} s, 32 full windows in {full_s:.1} s",
        MEMORY_MB as f64 / 1769.0
    );
    assert!(
        peak < PEAK_BOUND_MB,
        "peak RSS {peak:.1} MB over {PEAK_BOUND_MB} MB"
    );
    assert!(
        after - before < 20.0,
        "RSS {after:.1} MB after the requests, {before:.1} MB before: memory not given back"
    );
}

#[test]
fn the_longest_prompt_stays_bounded_under_the_template_memory_and_the_cache_goes_back() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(emu) = function_in_lambda_cgroup("models/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let chat = |content: &str, max_tokens: u32| {
        json!({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
            .to_string()
    };
    let warm = emu.invoke(chat("hi", 1).as_bytes());
    assert_eq!(warm["usage"]["completion_tokens"], 1, "{warm}");
    let pid = emu
        .function_pid()
        .expect("bootstrap runs under the emulator");
    let before = status_kb(pid, "VmRSS:") / 1024.0;

    // 1,669 of these words and the chat template are 8,191 tokens: the context less one.
    let words: Vec<String> = (0..1669)
        .map(|i| format!("word{}", (i * 7919) % 10007))
        .collect();
    let t = Instant::now();
    let out = emu.invoke_within(
        chat(&words.join(" "), 512).as_bytes(),
        std::time::Duration::from_secs(900),
    );
    let wall = t.elapsed().as_secs_f64();
    assert_eq!(out["usage"]["prompt_tokens"], 8191, "{}", out["usage"]);
    // max_tokens is cut to the context left: one token.
    assert_eq!(out["usage"]["completion_tokens"], 1, "{}", out["usage"]);

    let peak = status_kb(pid, "VmHWM:") / 1024.0;
    let after = status_kb(pid, "VmRSS:") / 1024.0;
    eprintln!(
        "memory (SmolLM2-135M Q4_1, {MEMORY_MB} MB cgroup, {:.2} vCPU): RSS before {before:.1} MB, \
         peak {peak:.1} MB, after {after:.1} MB; 8,191-token prompt answered in {wall:.1} s",
        MEMORY_MB as f64 / 1769.0
    );
    assert!(
        peak < GEN_PEAK_BOUND_MB,
        "peak RSS {peak:.1} MB over {GEN_PEAK_BOUND_MB} MB"
    );
    assert!(
        after - before < GEN_KEPT_MB,
        "RSS {after:.1} MB after the prompt, {before:.1} MB before: the cache was not given back"
    );
}
