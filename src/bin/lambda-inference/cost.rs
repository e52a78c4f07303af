//! `lambda-inference bench cost`: what a request costs at each Lambda memory size, measured.
//!
//! For each memory size the function runs in fresh processes inside cgroup v1 limits that stand in
//! for Lambda's: `memory.limit_in_bytes` = the size, and `cpu.cfs_quota_us` = the CPU share Lambda
//! gives at that size (1,769 MB = one vCPU, proportional, 6 vCPUs at most), capped at the cores
//! this machine has (said in the output where the cap applies: those rows are not Lambda's speed).
//! The process is told the size (`AWS_LAMBDA_FUNCTION_MEMORY_SIZE`), so it sizes its threads as it
//! does on Lambda. Per size: cold start (spawn -> first embedding), warm one-sentence latency,
//! sentences/s in batches of 32, and generated tokens/s on the chat model.
//!
//! Then, from the price table in `prices.json` (one file, with its date, region and source): the
//! cost of 1M embedding requests and of 1M generated tokens, one provisioned environment for a
//! month, and the request rate above which an always-on instance at `--instance-hourly` dollars an
//! hour is cheaper. x86_64 prices apply to what was measured here; arm64 rows use the same speeds
//! (not measured: no arm64 machine here) and say so. Markdown and an SVG chart go to `--out-dir`.
//!
//! Must not: claim a speed for a size this machine cannot give its full CPU share to, or compare
//! against figures from another machine.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use lambda_inference::{app, events};
use serde_json::{json, Value};

const PRICES: &str = include_str!("prices.json");
/// Lambda's CPU share: one vCPU per 1,769 MB, at most 6.
const MB_PER_VCPU: f64 = 1769.0;
const MAX_VCPU: f64 = 6.0;
const CHAT_TOKENS: u64 = 64;
const BATCH: usize = 32;

pub struct Options {
    pub embed_model: PathBuf,
    pub chat_model: Option<PathBuf>,
    pub sizes: Vec<u32>,
    pub cold_runs: usize,
    pub warm_iters: usize,
    pub instance_hourly: f64,
    pub out_dir: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// The child side (`bench cost-probe`): loads the model, answers one request, prints
/// `{"ready":...}`, then measures the warm figures and prints them as one JSON line.
pub fn probe(kind: &str, model: &Path, warm_iters: usize) -> anyhow::Result<()> {
    let (_, config) = crate::bench::configure(model)?;
    let threads = lambda_inference::threads::pool_size(&config).threads;
    let app = app::App::init(&config).map_err(|e| anyhow::anyhow!("{}: {e}", e.error_type()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let call = |path: &str, body: Value| -> anyhow::Result<Value> {
        let r = rt.block_on(events::handle(
            &app.service,
            crate::bench::http_event(path, &body),
        ));
        if r["statusCode"] != 200 {
            bail!("{path} answered {r}");
        }
        Ok(serde_json::from_str(r["body"].as_str().unwrap_or("{}"))?)
    };
    let mut out = std::io::stdout().lock();
    match kind {
        "embed" => {
            let one = json!({"input": "A man is playing a guitar on the stage tonight."});
            call("/v1/embeddings", one.clone())?;
            writeln!(out, "{}", json!({"ready": true, "threads": threads}))?;
            out.flush()?;
            let mut lat = Vec::new();
            for i in 0..warm_iters + 5 {
                let t = Instant::now();
                call("/v1/embeddings", one.clone())?;
                if i >= 5 {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            let sents = crate::bench::sentences(BATCH * 4, 8, 28);
            let t = Instant::now();
            for chunk in sents.chunks(BATCH) {
                call("/v1/embeddings", json!({ "input": chunk }))?;
            }
            let sent_s = sents.len() as f64 / t.elapsed().as_secs_f64();
            writeln!(
                out,
                "{}",
                json!({"warm_p50_ms": median(lat), "sentences_per_s": sent_s})
            )?;
        }
        "chat" => {
            let ask = |max_tokens: u64| {
                json!({"messages": [{"role": "user",
                        "content": "Explain in a few sentences why serverless functions have cold starts."}],
                       "max_tokens": max_tokens, "temperature": 0})
            };
            call("/v1/chat/completions", ask(1))?;
            writeln!(out, "{}", json!({"ready": true, "threads": threads}))?;
            out.flush()?;
            let mut tps = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                let r = call("/v1/chat/completions", ask(CHAT_TOKENS))?;
                let n = r["usage"]["completion_tokens"].as_f64().unwrap_or(0.0);
                tps.push(n / t.elapsed().as_secs_f64());
            }
            writeln!(out, "{}", json!({"tokens_per_s": median(tps)}))?;
        }
        other => bail!("unknown probe kind {other}"),
    }
    Ok(())
}

/// cgroup v1 directories holding Lambda's limits at `memory_mb`; removed when dropped.
struct Limits {
    dirs: [String; 2],
}

impl Limits {
    fn new(memory_mb: u32, vcpu: f64) -> anyhow::Result<Limits> {
        let name = format!("lambda-inference-cost-{}-{memory_mb}", std::process::id());
        let mem = format!("/sys/fs/cgroup/memory/{name}");
        let cpu = format!("/sys/fs/cgroup/cpu/{name}");
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(&mem)?;
            std::fs::create_dir_all(&cpu)?;
            std::fs::write(
                format!("{mem}/memory.limit_in_bytes"),
                (u64::from(memory_mb) << 20).to_string(),
            )?;
            // No swap beyond the limit where the kernel offers the knob (Lambda has none).
            let _ = std::fs::write(
                format!("{mem}/memory.memsw.limit_in_bytes"),
                (u64::from(memory_mb) << 20).to_string(),
            );
            std::fs::write(format!("{cpu}/cpu.cfs_period_us"), "100000")?;
            std::fs::write(
                format!("{cpu}/cpu.cfs_quota_us"),
                ((vcpu * 100_000.0).round() as u64).to_string(),
            )
        })();
        let limits = Limits { dirs: [mem, cpu] };
        made.context(
            "cgroup v1 memory and cpu controllers are not writable here (bench cost needs root \
             and /sys/fs/cgroup/{memory,cpu})",
        )?;
        Ok(limits)
    }

    /// A command that joins these cgroups, then execs `exe args`: the whole process runs inside.
    fn command(&self, exe: &Path) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(
                "echo $$ > \"$1/cgroup.procs\" && echo $$ > \"$2/cgroup.procs\" && shift 2 && exec \"$@\"",
            )
            .arg("sh")
            .arg(&self.dirs[0])
            .arg(&self.dirs[1])
            .arg(exe);
        c
    }
}

impl Drop for Limits {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// One probe process: (seconds from spawn to ready, the measurement line).
fn run_probe(
    limits: &Limits,
    kind: &str,
    model: &Path,
    memory_mb: u32,
    warm_iters: usize,
) -> anyhow::Result<(f64, Value, Value)> {
    let exe = std::env::current_exe()?;
    let t0 = Instant::now();
    let mut child = limits
        .command(&exe)
        .args(["bench", "cost-probe", "--kind", kind, "--model"])
        .arg(model)
        .args(["--warm-iters", &warm_iters.to_string()])
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory_mb.to_string())
        .env_remove("THREADS")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning the probe")?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let ready: Value = match lines.next() {
        Some(l) => serde_json::from_str(&l?)?,
        None => bail!("the {kind} probe at {memory_mb} MB exited before answering (killed by the memory limit?)"),
    };
    let cold = t0.elapsed().as_secs_f64();
    let figures: Value = match lines.next() {
        Some(l) => serde_json::from_str(&l?)?,
        None => bail!("the {kind} probe at {memory_mb} MB printed no figures"),
    };
    let status = child.wait()?;
    if !status.success() {
        bail!("the {kind} probe at {memory_mb} MB exited with {status}");
    }
    Ok((cold, ready, figures))
}

struct Row {
    memory_mb: u32,
    vcpu: f64,
    emulated_vcpu: f64,
    threads: u64,
    cold_ms: f64,
    warm_p50_ms: f64,
    sentences_per_s: f64,
    tokens_per_s: Option<f64>,
}

struct Prices {
    requests_per_million: f64,
    duration_gb_s: f64,
    provisioned_gb_s: f64,
}

fn prices(arch: &str) -> anyhow::Result<(Prices, String)> {
    let p: Value = serde_json::from_str(PRICES)?;
    let a = &p[arch];
    let f = |v: &Value, k: &str| {
        v[k].as_f64()
            .with_context(|| format!("prices.json: {arch}.{k}"))
    };
    Ok((
        Prices {
            requests_per_million: f(&p, "requests_per_million")?,
            duration_gb_s: f(a, "duration_gb_s")?,
            provisioned_gb_s: f(a, "provisioned_gb_s")?,
        },
        format!(
            "{} prices, {}, read {}",
            p["region"].as_str().unwrap_or("?"),
            p["source"].as_str().unwrap_or("?"),
            p["date"].as_str().unwrap_or("?")
        ),
    ))
}

/// Dollars for 1M one-sentence embedding requests at the warm p50 (billed per started ms).
fn per_million_embeddings(row: &Row, p: &Prices) -> f64 {
    let gb = f64::from(row.memory_mb) / 1024.0;
    1e6 * (row.warm_p50_ms.ceil() / 1e3 * gb * p.duration_gb_s) + p.requests_per_million
}

/// Dollars for 1M generated tokens, in answers of CHAT_TOKENS tokens.
fn per_million_tokens(row: &Row, p: &Prices) -> Option<f64> {
    let gb = f64::from(row.memory_mb) / 1024.0;
    row.tokens_per_s.map(|tps| {
        1e6 / tps * gb * p.duration_gb_s + 1e6 / CHAT_TOKENS as f64 * p.requests_per_million / 1e6
    })
}

/// Dollars a month (730 h) for one provisioned environment, idle.
fn provisioned_month(row: &Row, p: &Prices) -> f64 {
    f64::from(row.memory_mb) / 1024.0 * 730.0 * 3600.0 * p.provisioned_gb_s
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!(
        "bench cost: {} cores ({cpu_model}); Lambda CPU share emulated with cgroup v1 cpu.cfs_quota_us \
         (1,769 MB = 1 vCPU), memory with memory.limit_in_bytes",
        cores
    );
    let mut rows = Vec::new();
    for &mb in &opts.sizes {
        let vcpu = (f64::from(mb) / MB_PER_VCPU).min(MAX_VCPU);
        let emulated = vcpu.min(cores);
        let limits = Limits::new(mb, emulated)?;
        let mut colds = Vec::new();
        let mut last = (json!({}), json!({}));
        for _ in 0..opts.cold_runs.max(1) {
            let (cold, ready, figures) =
                run_probe(&limits, "embed", &opts.embed_model, mb, opts.warm_iters)?;
            colds.push(cold * 1e3);
            last = (ready, figures);
        }
        let tokens_per_s = match &opts.chat_model {
            Some(m) => Some(
                run_probe(&limits, "chat", m, mb, 0)?.2["tokens_per_s"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            ),
            None => None,
        };
        let row = Row {
            memory_mb: mb,
            vcpu,
            emulated_vcpu: emulated,
            threads: last.0["threads"].as_u64().unwrap_or(0),
            cold_ms: median(colds),
            warm_p50_ms: last.1["warm_p50_ms"].as_f64().unwrap_or(f64::NAN),
            sentences_per_s: last.1["sentences_per_s"].as_f64().unwrap_or(f64::NAN),
            tokens_per_s,
        };
        eprintln!(
            "  {mb} MB: cold {:.0} ms, warm p50 {:.2} ms, {:.0} sent/s, {} tok/s",
            row.cold_ms,
            row.warm_p50_ms,
            row.sentences_per_s,
            row.tokens_per_s.map_or("-".into(), |t| format!("{t:.1}"))
        );
        rows.push(row);
    }
    let md = markdown(&rows, opts.instance_hourly, cores, &cpu_model)?;
    print!("{md}");
    if let Some(dir) = &opts.out_dir {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("cost.md"), &md)?;
        std::fs::write(dir.join("cost.svg"), svg(&rows)?)?;
        println!(
            "\nwrote {} and {}",
            dir.join("cost.md").display(),
            dir.join("cost.svg").display()
        );
    }
    Ok(())
}

fn markdown(rows: &[Row], hourly: f64, cores: f64, cpu: &str) -> anyhow::Result<String> {
    let (x86, source) = prices("x86_64")?;
    let (arm, _) = prices("arm64")?;
    let mut s = String::new();
    s += &format!(
        "Measured on {cores} cores ({cpu}) under cgroup limits standing in for Lambda's; {source}.\n\
         Embedding requests: one sentence each, billed at the warm p50 rounded up to the ms. Tokens: \
         {CHAT_TOKENS}-token answers. Provisioned: one idle environment for 730 h. Break-even: the \
         embedding request rate above which an always-on instance at ${hourly}/h costs less (x86).\n\
         arm64 columns apply arm64 prices to the speeds measured here (x86_64): not an arm64 measurement.\n\
         Rows marked * get less CPU here than on Lambda (this machine has {cores} cores): their speed \
         is a floor.\n\n"
    );
    s += "| memory | vCPU (Lambda) | threads | cold start | warm p50 | sentences/s | chat tok/s \
          | $ per 1M embeddings x86 / arm64 | $ per 1M tokens x86 / arm64 | $ per month provisioned x86 / arm64 \
          | break-even req/s |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        let capped = if r.emulated_vcpu + 1e-9 < r.vcpu {
            "*"
        } else {
            ""
        };
        let tok = |p: &Prices| per_million_tokens(r, p).map_or("-".into(), |c| format!("{c:.2}"));
        let e_x86 = per_million_embeddings(r, &x86);
        s += &format!(
            "| {} MB{capped} | {:.2} | {} | {:.0} ms | {:.2} ms | {:.0} | {} | {:.2} / {:.2} | {} / {} | {:.2} / {:.2} | {:.1} |\n",
            r.memory_mb,
            r.vcpu,
            r.threads,
            r.cold_ms,
            r.warm_p50_ms,
            r.sentences_per_s,
            r.tokens_per_s.map_or("-".into(), |t| format!("{t:.1}")),
            e_x86,
            per_million_embeddings(r, &arm),
            tok(&x86),
            tok(&arm),
            provisioned_month(r, &x86),
            provisioned_month(r, &arm),
            hourly / 3600.0 / (e_x86 / 1e6),
        );
    }
    Ok(s)
}

/// A small bar chart: $ per 1M embeddings (x86) per memory size, warm p50 printed on each bar.
fn svg(rows: &[Row]) -> anyhow::Result<String> {
    let (x86, _) = prices("x86_64")?;
    let costs: Vec<f64> = rows
        .iter()
        .map(|r| per_million_embeddings(r, &x86))
        .collect();
    let max = costs.iter().cloned().fold(0.0, f64::max).max(1e-9);
    let (w, h, left, bottom, top) = (80.0 * rows.len() as f64 + 80.0, 320.0, 60.0, 40.0, 40.0);
    let plot_h = h - bottom - top;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <text x=\"{left}\" y=\"20\" font-size=\"13\">$ per 1M one-sentence embedding requests (x86_64), by Lambda memory size; warm p50 on each bar</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - bottom,
        w - 10.0,
        h - bottom
    );
    for (i, (r, c)) in rows.iter().zip(&costs).enumerate() {
        let bh = c / max * plot_h;
        let x = left + 10.0 + 80.0 * i as f64;
        let y = h - bottom - bh;
        s += &format!(
            "<rect x=\"{x}\" y=\"{y:.1}\" width=\"50\" height=\"{bh:.1}\" fill=\"#4878a8\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">${c:.2}</text>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"white\">{:.1} ms</text>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} MB</text>\n",
            x + 25.0,
            y - 4.0,
            x + 25.0,
            (y + 14.0).min(h - bottom - 2.0),
            r.warm_p50_ms,
            x + 25.0,
            h - bottom + 16.0,
            r.memory_mb
        );
    }
    s += "</svg>\n";
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(memory_mb: u32, warm_p50_ms: f64, tps: Option<f64>) -> Row {
        Row {
            memory_mb,
            vcpu: 1.0,
            emulated_vcpu: 1.0,
            threads: 1,
            cold_ms: 100.0,
            warm_p50_ms,
            sentences_per_s: 100.0,
            tokens_per_s: tps,
        }
    }

    #[test]
    fn costs_follow_the_price_table() {
        let (x86, _) = prices("x86_64").unwrap();
        // 1,024 MB at 2.2 ms billed as 3 ms: 1e6 x 0.003 s x 1 GB x price + $0.20.
        let c = per_million_embeddings(&row(1024, 2.2, None), &x86);
        assert!(
            (c - (3000.0 * x86.duration_gb_s + 0.20)).abs() < 1e-9,
            "{c}"
        );
        // 2,048 MB at 100 tok/s: 10,000 s x 2 GB x price + 15,625 requests.
        let t = per_million_tokens(&row(2048, 1.0, Some(100.0)), &x86).unwrap();
        assert!((t - (20_000.0 * x86.duration_gb_s + 15_625.0 * 0.2e-6)).abs() < 1e-9);
        // One provisioned 2,048 MB environment a month at x86's price.
        let m = provisioned_month(&row(2048, 1.0, None), &x86);
        assert!((m - 2.0 * 730.0 * 3600.0 * x86.provisioned_gb_s).abs() < 1e-9);
        let (arm, _) = prices("arm64").unwrap();
        assert!(arm.duration_gb_s < x86.duration_gb_s);
    }

    #[test]
    fn capped_rows_are_marked_and_break_even_is_the_instance_rate() {
        let mut r = row(4096, 1.0, None);
        r.vcpu = 2.3;
        r.emulated_vcpu = 2.0;
        let md = markdown(&[r], 0.36, 2.0, "test").unwrap();
        let line = md.lines().find(|l| l.starts_with("| 4096 MB*")).expect(&md);
        let (x86, _) = prices("x86_64").unwrap();
        let per_req = per_million_embeddings(&row(4096, 1.0, None), &x86) / 1e6;
        let rate = format!("{:.1} |", 0.36 / 3600.0 / per_req);
        assert!(line.ends_with(&rate), "{line} vs {rate}");
    }
}
