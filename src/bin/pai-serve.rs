//! `pai-serve`: serve the base model and its adapters: `pai-serve serve` (the OpenAI-compatible HTTP
//! API, pai-serve's `routes`), `pai-serve chat` (a terminal chat), `pai-serve bench`.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pai_model::{generate, AdapterStack, GenerateOptions, Message, SamplingParams};

#[derive(Parser)]
#[command(
    name = "pai-serve",
    version,
    about = "Serve pai's base model and adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API: the base model and the registry's adapters, chosen per
    /// request by `model`.
    Serve(ServeArgs),
    /// Chat with the model in the terminal (a REPL, or one reply with --prompt), streaming tokens.
    Chat(ChatArgs),
    /// Measure prefill and decode speed and peak memory, as llama-bench does.
    Bench(BenchArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (default: [serve] host in pai.toml, 127.0.0.1: nothing leaves the
    /// machine unless asked).
    #[arg(long)]
    host: Option<String>,
    /// Port (default: [serve] port, 8080).
    #[arg(long)]
    port: Option<u16>,
    /// GGUF file or Hugging Face directory (default: pai.toml's `model`, else the model
    /// scripts/fetch-model.sh installs).
    #[arg(long, env = "PAI_MODEL")]
    model: Option<PathBuf>,
    /// The configuration file whose [serve] table gives the defaults (default: $PAI_HOME/pai.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Require `Authorization: Bearer KEY` on every route (repeat for several keys; or
    /// PAI_SERVE_API_KEYS, comma-separated).
    #[arg(
        long = "api-key",
        env = "PAI_SERVE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// Adapter versions kept loaded at most (least recently used evicted; reloaded when asked for).
    /// Default: [serve] max_adapters, 16.
    #[arg(long)]
    max_adapters: Option<usize>,
    /// Memory adapter weights may take, in MiB (least recently used evicted past it). Default:
    /// [serve] max_adapter_mib, 1024.
    #[arg(long)]
    max_adapter_mib: Option<usize>,
    /// Sequences decoded together in one batched step (continuous batching). Default: [serve]
    /// max_batch, 8.
    #[arg(long)]
    max_batch: Option<usize>,
    /// Requests that may wait for a place in the batch; more are answered 503 at once. Default:
    /// [serve] max_queue, 64.
    #[arg(long)]
    max_queue: Option<usize>,
    /// Prompt tokens a new request prefills per step while other streams decode: smaller keeps the
    /// running streams smoother, larger gives the newcomer its first token sooner. Default: [serve]
    /// prefill_chunk, 128.
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Allow POST /v1/load_lora_adapter for adapter directories inside DIR (and nowhere else: symlinks
    /// out of it are refused). Default: [serve] adapter_root; off when neither is given.
    #[arg(long, value_name = "DIR")]
    adapter_root: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    /// GGUF file or Hugging Face directory (default: the model scripts/fetch-model.sh installs).
    #[arg(long, env = "PAI_MODEL")]
    model: Option<PathBuf>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens generated for the decode measurement (after a 16-token prompt).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Threads for the CPU kernels (default: the cores available; also PAI_NUM_THREADS).
    #[arg(long)]
    threads: Option<usize>,
    /// Repetitions after one warm-up.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also measure decode with this many sequences advancing together (batched steps).
    #[arg(long)]
    batch: Option<usize>,
    /// Adapters (PEFT directories) for the batched measurement, given to its rows in turn.
    #[arg(long = "adapter", value_name = "DIR")]
    adapters: Vec<PathBuf>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: pai::ModelArgs,
    /// Answer this one message and exit.
    #[arg(long)]
    prompt: Option<String>,
    /// System message (otherwise the chat template's default, if it has one).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.1)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print prompt and generation speed after each reply.
    #[arg(long)]
    stats: bool,
}

fn main() -> anyhow::Result<()> {
    pai::init_logging();
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Chat(args) => chat(args),
        Command::Bench(args) => bench(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Flags over [serve] of pai.toml (itself over the defaults and under PAI_SERVE_* variables).
    if let Some(f) = args.config.as_ref().filter(|f| !f.is_file()) {
        anyhow::bail!("--config {}: no such file", f.display());
    }
    let loaded = pai_pipeline::LoadedConfig::load(&pai::pai_home(), args.config.as_deref())?;
    if let Some(problem) = loaded.check(None).into_iter().find(|p| {
        matches!(p, pai_pipeline::PipelineError::Invalid { key, .. }
            if key.starts_with("serve.") || key.starts_with("router."))
    }) {
        anyhow::bail!("{problem}");
    }
    let c = loaded.config.serve;
    let host = args.host.unwrap_or(c.host);
    let port = args.port.unwrap_or(c.port);
    let addr: std::net::SocketAddr = format!("{host}:{port}")
        .parse()
        .with_context(|| format!("host {host:?} and port {port} do not make an address"))?;
    let (base, _) = pai::load_model(
        args.model.or(loaded.config.model),
        &[],
        pai_model::LoadOptions::default(),
    )?;
    let registry = pai_adapters::Registry::new(&pai::pai_home());
    let adapters: Vec<String> = registry
        .list()?
        .into_iter()
        .filter_map(|a| a.current.map(|v| format!("{}@{v}", a.name)))
        .collect();
    eprintln!(
        "pai-serve: model {}; adapters: {}",
        base.path().display(),
        if adapters.is_empty() {
            format!("none yet in {}", registry.root().display())
        } else {
            adapters.join(", ")
        }
    );
    let mut state = pai_serve::ServeState::new(base, Some(registry));
    state.reports_dir = Some(pai::pai_home().join("reports"));
    state.max_resident = args.max_adapters.unwrap_or(c.max_adapters);
    anyhow::ensure!(state.max_resident > 0, "--max-adapters must be at least 1");
    state.max_resident_bytes = args.max_adapter_mib.unwrap_or(c.max_adapter_mib) << 20;
    state.max_batch = args.max_batch.unwrap_or(c.max_batch);
    anyhow::ensure!(state.max_batch > 0, "--max-batch must be at least 1");
    state.max_queue = args.max_queue.unwrap_or(c.max_queue);
    state.prefill_chunk = args.prefill_chunk.unwrap_or(c.prefill_chunk);
    anyhow::ensure!(
        state.prefill_chunk > 0,
        "--prefill-chunk must be at least 1"
    );
    if let Some(root) = args.adapter_root.or(c.adapter_root) {
        anyhow::ensure!(
            root.is_dir(),
            "--adapter-root {} is not a directory",
            root.display()
        );
        eprintln!(
            "pai-serve: adapters may be loaded by path from {}",
            root.display()
        );
        state.adapter_root = Some(root);
    }
    state.api_keys = args
        .api_keys
        .into_iter()
        .filter(|k| !k.is_empty())
        .collect();
    if !state.api_keys.is_empty() {
        eprintln!(
            "pai-serve: API keys required ({} configured)",
            state.api_keys.len()
        );
    }
    let home = pai::pai_home();
    let router = loaded.config.router;
    let tiers: Vec<String> = router
        .tiers
        .iter()
        .map(|t| format!("{} (L{})", t.name, t.level))
        .collect();
    state.router = pai_serve::router::Router::new(router, Some(&home))?;
    eprintln!(
        "pai-serve: \"model\": \"auto\" routes {}; privacy index: {} shingles; thresholds: {}",
        if tiers.is_empty() {
            "everything to the local model (no [[router.tiers]])".to_string()
        } else {
            format!("between the local model and {}", tiers.join(", "))
        },
        state.router.gate.index_len(),
        state.router.thresholds().map_or_else(
            || "none (pai-train router calibrate)".to_string(),
            |t| format!("local >= {:.3}, medium >= {:.3}", t.local, t.medium)
        ),
    );
    let state = std::sync::Arc::new(state);
    pai_serve::run(addr, state).with_context(|| format!("serving on {addr}"))
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(n) = args.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        // Read once when the kernels' pool starts, which is after this point.
        std::env::set_var("PAI_NUM_THREADS", n.to_string());
    }
    anyhow::ensure!(
        args.prompt_tokens > 0 && args.gen_tokens > 1,
        "--prompt-tokens must be ≥ 1 and --gen-tokens ≥ 2"
    );
    let (base, adapters) = pai::load_model(
        args.model,
        &args.adapters,
        pai_model::LoadOptions::default(),
    )?;
    if let Some(rows) = args.batch {
        anyhow::ensure!(rows > 0, "--batch must be at least 1");
        let phase = pai::bench::batched(&base, &adapters, rows, args.gen_tokens, args.reps.max(1))?;
        let s = phase.summary();
        println!(
            "batched decode, {rows} sequences, {} adapters: {:.1} tok/s median ({:.1} .. {:.1}){}",
            adapters.len(),
            s.median,
            s.min,
            s.max,
            if s.contended { ", contended" } else { "" }
        );
        return Ok(());
    }
    let report = pai::bench::run(&base, args.prompt_tokens, args.gen_tokens, args.reps.max(1))?;
    if args.json {
        println!("{}", report.to_json(&base));
        return Ok(());
    }
    println!(
        "{} ({} kernels, {} threads)",
        base.path().display(),
        pai_model::kernels::kernel_name(),
        pai_model::kernels::threads()
    );
    for (name, phase, n) in [
        ("prefill", &report.prefill, report.prompt_tokens),
        ("decode", &report.decode, report.gen_tokens),
    ] {
        let s = phase.summary();
        let which = if s.contended {
            format!(
                "all {} repetitions contended, other processes using up to {:.2} cores",
                s.used, s.max_others_cores
            )
        } else {
            format!(
                "{} of {} repetitions uncontended",
                s.used,
                phase.tokens_per_second.len()
            )
        };
        println!(
            "{name:8} {n:5} tokens  {:8.1} tok/s median  ({:.1} .. {:.1}, {which})",
            s.median, s.min, s.max
        );
    }
    if let Some(rss) = report.peak_rss_bytes {
        println!("peak RSS {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
    }
    Ok(())
}

fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let (base, adapters) = args.model.load()?;
    let adapter_refs: Vec<&pai_model::Adapter> = adapters.iter().collect();
    let stack = AdapterStack::new(&adapter_refs);
    let template = base.chat_template()?;
    let mut opts = GenerateOptions {
        max_tokens: Some(args.max_tokens),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            min_p: args.min_p,
            repetition_penalty: args.repeat_penalty,
            seed: args.seed,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut history: Vec<Message> = args.system.iter().map(Message::system).collect();
    let interactive = args.prompt.is_none();
    if interactive {
        eprintln!(
            "pai chat with {}{}. /reset clears the conversation, /exit or Ctrl-D quits.",
            base.name(),
            if adapters.is_empty() {
                String::new()
            } else {
                format!(
                    " + {}",
                    adapters
                        .iter()
                        .map(|a| a.name())
                        .collect::<Vec<_>>()
                        .join(" + ")
                )
            }
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut turn = 0u64;
    loop {
        let user = match &args.prompt {
            Some(p) => p.clone(),
            None => {
                eprint!("> ");
                std::io::stderr().flush().ok();
                match lines.next() {
                    Some(line) => line.context("reading standard input")?,
                    None => break,
                }
            }
        };
        match user.trim() {
            "" if interactive => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == "system");
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message::user(user));
        let max_context = base.config().context_length;
        opts.sampling.seed = args.seed.wrapping_add(turn);
        let mut out = std::io::stdout();
        let result = template
            .encode(&base.tokenizer, &history, true)
            .and_then(|prompt| {
                opts.max_tokens = Some(
                    args.max_tokens
                        .min(max_context.saturating_sub(prompt.len() + 1)),
                );
                generate(
                    &base.model,
                    &base.tokenizer,
                    &stack,
                    &prompt,
                    &opts,
                    |piece| {
                        let _ = out.write_all(piece.as_bytes());
                        let _ = out.flush();
                        ControlFlow::Continue(())
                    },
                )
            });
        let reply = match result {
            Ok(reply) => reply,
            // In the REPL a failed turn is reported and dropped; the conversation goes on.
            Err(e) if interactive => {
                history.pop();
                eprintln!("error: {e}");
                if matches!(e, pai_model::ModelError::ContextOverflow { .. }) {
                    eprintln!(
                        "(the conversation no longer fits the model's context: /reset starts over)"
                    );
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        println!();
        if args.stats {
            eprintln!(
                "[{} prompt tokens in {:.2}s ({:.1} tok/s), {} generated in {:.2}s ({:.1} tok/s), {}]",
                reply.prompt_tokens,
                reply.prefill_seconds,
                reply.prompt_tokens as f64 / reply.prefill_seconds.max(1e-9),
                reply.tokens.len(),
                reply.decode_seconds,
                reply.tokens.len() as f64 / reply.decode_seconds.max(1e-9),
                reply.finish_reason.as_str()
            );
        }
        history.push(Message::assistant(reply.text));
        turn += 1;
        if !interactive {
            break;
        }
    }
    Ok(())
}
