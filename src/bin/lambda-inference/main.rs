//! `lambda-inference`: the local face of the function. `invoke` runs the very handler the
//! function runs, in process, and prints exactly what Lambda would return; `convert` turns a
//! Hugging Face folder into a GGUF; `bench` measures cold start, latency and throughput.

mod bench;
mod cold_start;
mod convert;
mod cost;
mod serve;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use convert::{ConvertOptions, OutDType};
use lambda_inference::{app, config::Config, events};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the function's handler on an event file (events/*.json) and prints the response.
    Invoke { event: PathBuf },
    /// Serves the model over local HTTP (OpenAI routes; `stream: true` as server-sent events).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        /// The request head must arrive within this many ms of the connection (else 408, or a
        /// plain close if nothing came); each read of the body must progress within it.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
        read_timeout_ms: u64,
        /// The whole request body must arrive within this many ms of the head (else 408).
        #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
        body_timeout_ms: u64,
        /// Connections open at once; more wait in the listen backlog.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
        max_connections: u64,
    },
    /// Converts a Hugging Face BERT or XLM-RoBERTa folder (config.json, tokenizer.json, and
    /// model.safetensors, safetensors shards with their index, or pytorch_model.bin) to GGUF.
    Convert {
        /// Storage type of the weight matrices.
        #[arg(long, value_enum, default_value = "q8_0")]
        dtype: OutDType,
        /// `general.name` to record (default: from config.json or the folder).
        #[arg(long)]
        name: Option<String>,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
        input_dir: PathBuf,
        output: PathBuf,
    },
    /// Measures cold start, warm latency, throughput and memory; prints figures.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Sentence embeddings on a BERT GGUF (default: the q8_0 MiniLM).
    Embeddings {
        #[arg(long, default_value = "models/all-MiniLM-L6-v2.q8_0.gguf")]
        model: PathBuf,
        /// Fresh processes spawned for the cold-start figure.
        #[arg(long, default_value_t = 7)]
        cold_runs: usize,
        /// Warm requests timed for p50/p95 [default: the workload's timed_calls].
        #[arg(long)]
        warm_iters: Option<usize>,
        /// The workload: sentences, batch size, passes and call counts, in the JSON format of the
        /// anchors kit's workload.json [default: built in, the same as that file].
        #[arg(long, value_name = "FILE")]
        workload: Option<PathBuf>,
    },
    /// Cold start with the model in S3: a moto server on loopback, the real bootstrap under the
    /// Lambda Runtime Interface Emulator, spawn -> first embedding; and fetch throughput against
    /// one plain GET of the same object. Needs moto_server and scripts/fetch-tools.
    ColdStart {
        #[arg(long, default_value = "models/all-MiniLM-L6-v2.q8_0.gguf")]
        model: PathBuf,
        /// Fresh emulator + bootstrap spawns.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Interleaved repetitions of each fetch variant.
        #[arg(long, default_value_t = 5)]
        fetch_reps: usize,
        /// Only the fetch figures (for models this build cannot serve, such as llama GGUFs).
        #[arg(long)]
        fetch_only: bool,
    },
    /// Chat generation on a llama GGUF (default: SmolLM2-135M-Instruct Q4_1): load, spawn ->
    /// first token, prefill and decode tok/s, CPU per token, peak RSS.
    Generate {
        #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
        model: PathBuf,
        /// Fresh processes spawned for the first-token figure.
        #[arg(long, default_value_t = 5)]
        cold_runs: usize,
        /// Prefill + decode runs, median reported [default: the workload's runs].
        #[arg(long)]
        runs: Option<usize>,
        /// The workload: first-token chat, prefill chat, decode steps and runs, in the JSON format
        /// of the anchors kit's workload.json [default: built in, the same as that file].
        #[arg(long, value_name = "FILE")]
        workload: Option<PathBuf>,
    },
    /// Cost per Lambda memory size: each size's memory limit and CPU share (cgroup v1, needs
    /// root), cold start, warm latency, sentences/s, tokens/s, then $ per 1M embeddings, per 1M
    /// tokens, per provisioned month and the break-even against an always-on instance.
    Cost {
        #[arg(long, default_value = "models/all-MiniLM-L6-v2.q8_0.gguf")]
        model: PathBuf,
        /// The chat model for tokens/s ("none" skips it).
        #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
        chat_model: String,
        /// Lambda memory sizes in MB.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "512,1024,1769,2048,3008,4096,6144,8192,10240"
        )]
        sizes: Vec<u32>,
        /// Fresh processes per size for the cold-start figure (median).
        #[arg(long, default_value_t = 3)]
        cold_runs: usize,
        /// Warm one-sentence requests per size (median).
        #[arg(long, default_value_t = 100)]
        warm_iters: usize,
        /// Hourly price of the always-on instance to compare with (pass yours; the default is an
        /// example, not a quote).
        #[arg(long, default_value_t = 0.10)]
        instance_hourly: f64,
        /// Where cost.md and cost.svg go.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// One measurement process of `bench cost` (run inside the size's cgroups).
    #[command(hide = true)]
    CostProbe {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 100)]
        warm_iters: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    app::init_tracing();
    match cli.cmd {
        Cmd::Invoke { event } => {
            let config = Config::from_env()?;
            app::configure(&config);
            let raw =
                std::fs::read(&event).with_context(|| format!("reading {}", event.display()))?;
            let event: serde_json::Value = serde_json::from_slice(&raw)
                .with_context(|| format!("{} is not JSON", event.display()))?;
            let app =
                app::App::init(&config).map_err(|e| anyhow::anyhow!("{}: {e}", e.error_type()))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let out = rt.block_on(events::handle(&app.service, event));
            println!("{}", serde_json::to_string(&out)?);
        }
        Cmd::Serve {
            addr,
            read_timeout_ms,
            body_timeout_ms,
            max_connections,
        } => {
            let config = Config::from_env()?;
            app::configure(&config);
            let app =
                app::App::init(&config).map_err(|e| anyhow::anyhow!("{}: {e}", e.error_type()))?;
            // Several executor threads: a slow streaming client must not hold up the others.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let opts = serve::Options {
                addr,
                read_timeout: std::time::Duration::from_millis(read_timeout_ms),
                body_timeout: std::time::Duration::from_millis(body_timeout_ms),
                max_connections: max_connections as usize,
            };
            rt.block_on(serve::serve(std::sync::Arc::new(app), opts))?;
        }
        Cmd::Convert {
            dtype,
            name,
            quiet,
            input_dir,
            output,
        } => {
            let report = convert::convert(&ConvertOptions {
                input_dir,
                output,
                dtype,
                progress: !quiet,
                name,
            })?;
            eprintln!(
                "wrote {} ({} tensors, {:.1} MB)",
                report.output.display(),
                report.tensors,
                report.bytes as f64 / 1e6
            );
            for f in &report.fallbacks {
                eprintln!("  fallback: {f}");
            }
        }
        Cmd::Bench {
            what:
                BenchWhat::Embeddings {
                    model,
                    cold_runs,
                    warm_iters,
                    workload,
                },
        } => bench::embeddings(&bench::Options {
            model,
            cold_runs,
            warm_iters,
            workload,
        })?,
        Cmd::Bench {
            what:
                BenchWhat::ColdStart {
                    model,
                    runs,
                    fetch_reps,
                    fetch_only,
                },
        } => cold_start::run(&cold_start::Options {
            model,
            runs,
            fetch_reps,
            fetch_only,
        })?,
        Cmd::Bench {
            what:
                BenchWhat::Generate {
                    model,
                    cold_runs,
                    runs,
                    workload,
                },
        } => bench::generate(&bench::GenerateOptions {
            model,
            cold_runs,
            runs,
            workload,
        })?,
        Cmd::Bench {
            what:
                BenchWhat::Cost {
                    model,
                    chat_model,
                    sizes,
                    cold_runs,
                    warm_iters,
                    instance_hourly,
                    out_dir,
                },
        } => cost::run(&cost::Options {
            embed_model: model,
            chat_model: (chat_model != "none").then(|| PathBuf::from(chat_model)),
            sizes,
            cold_runs,
            warm_iters,
            instance_hourly,
            out_dir,
        })?,
        Cmd::Bench {
            what:
                BenchWhat::CostProbe {
                    kind,
                    model,
                    warm_iters,
                },
        } => cost::probe(&kind, &model, warm_iters)?,
    }
    Ok(())
}
