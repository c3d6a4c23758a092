//! `pai-train`: build, train and judge adapters, and run the nightly loop. `pai-train perplexity` (the
//! yardstick the evals use), `ingest`, `watch`, `dataset stats|mix`, `train`, `eval`, `report`, the
//! registry's commands, `nightly`, `config show|check`, `init`, `status`, `history` and `schedule`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pai_model::{perplexity, AdapterStack};

#[derive(Parser)]
#[command(
    name = "pai-train",
    version,
    about = "Train and evaluate pai's LoRA adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mean token cross-entropy and perplexity of a text under the model (and adapters).
    Perplexity(PerplexityArgs),
    /// Turn the day's new and changed notes and code into dataset examples.
    Ingest(IngestArgs),
    /// Keep the dataset current as files change: ingest each source a few seconds after its changes
    /// settle, so the nightly run has little left to read.
    Watch {
        /// A source on top of pai.toml's [[sources]]: DIR, DIR:notes, DIR:code or DIR:chat.
        #[arg(long = "source", value_name = "DIR[:notes|code|chat]")]
        sources: Vec<String>,
        /// The model whose tokenizer counts tokens (the default model when not given).
        #[arg(long, env = "PAI_MODEL")]
        model: Option<PathBuf>,
        /// Seconds without changes before an ingest runs.
        #[arg(long, default_value_t = 5.0)]
        debounce: f64,
        /// Stop after this many ingests (by default, run until interrupted).
        #[arg(long)]
        max_runs: Option<usize>,
    },
    /// Train a LoRA adapter on the night's mix ([train] and [mix] in pai.toml; flags override).
    Train(Box<TrainArgs>),
    /// Every position's logits for a text, bare and with the adapters, as JSON (for checks against
    /// other tools: benches/compare/peft_check.py).
    Logits {
        #[command(flatten)]
        model: pai::ModelArgs,
        /// The text (user text: never parsed for control tokens).
        #[arg(long)]
        text: String,
    },
    /// The adapter registry: list, show, gc, import.
    Adapters {
        #[command(subcommand)]
        command: AdaptersCommand,
    },
    /// Score a candidate adapter against the incumbent on the eval suites, and decide (the gate).
    Eval(EvalArgs),
    /// Write the HTML report of an eval run (the newest by default) and the index of all runs, to
    /// $PAI_HOME/reports/.
    Report {
        run: Option<String>,
        /// Open it in the browser.
        #[arg(long)]
        open: bool,
    },
    /// Serve a registered version: NAME (its newest version) or NAME@vN. pai-serve follows.
    Promote {
        #[arg(value_name = "NAME[@vN]")]
        adapter: String,
        /// Why, for the history.
        #[arg(long, default_value = "promoted by hand")]
        reason: String,
    },
    /// Serve the version the current one replaced, or the one named with --to.
    Rollback {
        name: String,
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
    },
    /// Write an adapter in another format: `gguf` is llama.cpp's LoRA GGUF (`--lora` in llama.cpp,
    /// `lora_path` in llama-cpp-python).
    Export {
        /// The adapter (a PEFT directory).
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long, value_enum, default_value_t = ExportFormat::Gguf)]
        format: ExportFormat,
        /// The file to write (default: adapter.gguf inside the adapter directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The base model the adapter belongs to (the default model when not given).
        #[arg(long, env = "PAI_MODEL")]
        model: Option<PathBuf>,
    },
    /// The dataset: `stats` (rows and tokens by day, source, kind and split), `mix` (what training reads).
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// One night of the loop: ingest, train, eval, gate (promote or reject), report. A run killed at
    /// any stage is taken up where it stopped by the next invocation. Exit codes: 0 done (promoted,
    /// or nothing enough to learn), 2 bad configuration, 3 candidate rejected, 4 another run holds
    /// the lock, 5 a stage failed (run again to resume), 6 on battery with only_on_ac, 7 the machine
    /// stayed busy ([nightly] idle_max_load).
    Nightly {
        /// A source on top of pai.toml's [[sources]]: DIR, DIR:notes, DIR:code or DIR:chat.
        #[arg(long = "source", value_name = "DIR[:KIND]")]
        sources: Vec<String>,
        /// The day to ingest as and train up to (default: today).
        #[arg(long, value_name = "YYYY-MM-DD")]
        day: Option<String>,
        /// GGUF file or Hugging Face directory (default: pai.toml's `model`, else the default model).
        #[arg(long, env = "PAI_MODEL")]
        model: Option<PathBuf>,
    },
    /// The configuration: `show` prints the effective values and where each came from (defaults,
    /// pai.toml, PAI_* variables); `check` checks them.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Write a commented $PAI_HOME/pai.toml with every default (and the sources given).
    Init {
        /// A folder to learn from: DIR, DIR:notes, DIR:code or DIR:chat (asked for when run in a
        /// terminal without any).
        #[arg(long = "source", value_name = "DIR[:KIND]")]
        sources: Vec<String>,
        /// Overwrite an existing pai.toml.
        #[arg(long)]
        force: bool,
    },
    /// The current adapter of each name, the last nightly runs, and the next scheduled one.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Every nightly run, newest first.
    History {
        /// Show at most this many.
        #[arg(long, default_value_t = 30)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Run `nightly` at [schedule] cron in the foreground (catching up one missed run after a sleep
    /// or shutdown), or print the entry for crontab or a systemd user service.
    Schedule {
        #[arg(long, conflicts_with = "print_systemd")]
        print_crontab: bool,
        #[arg(long)]
        print_systemd: bool,
    },
    /// pai-serve's router (`"model": "auto"`): `calibrate` sets its confidence thresholds.
    Router {
        #[command(subcommand)]
        command: RouterCommand,
    },
    /// What the router sent off this machine: when, where, the outcome, the cost, and a hash of the
    /// bytes sent (never the text).
    Egress {
        /// Only this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        day: Option<String>,
        /// One JSON record a line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RouterCommand {
    /// Measure the local model's confidence on a labelled set of requests and set the thresholds
    /// that keep the target shares ([router] target_share) local / medium / large; report the
    /// shares and the agreement with the labels. Written to $PAI_HOME/router/calibration.json.
    Calibrate {
        /// JSON lines of {"messages": [...], "level": 1|2|3, "kind": "..."} (default: the set that
        /// ships with pai, configs/router/labelled.jsonl).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// GGUF file or Hugging Face directory (default: pai.toml's `model`, else the default model).
        #[arg(long, env = "PAI_MODEL")]
        model: Option<PathBuf>,
        /// The local model to measure under: an adapter name or `base` (default: [router]
        /// local_model).
        #[arg(long)]
        local_model: Option<String>,
        /// Report only; write nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// The effective configuration, each value with where it came from.
    Show {
        /// Read this file instead of $PAI_HOME/pai.toml.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Check every value (ranges, the cron expression, sources, [train] against the model).
    Check {
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Args)]
struct EvalArgs {
    /// The candidate: NAME@vN, NAME (its newest version), or a PEFT directory (default: the newest
    /// version of --name).
    #[arg(long, value_name = "NAME[@vN]|DIR")]
    candidate: Option<String>,
    /// What it must beat: NAME (its current version), NAME@vN, a directory, or `base` (default: the
    /// current version of the candidate's name, else the base).
    #[arg(long, value_name = "NAME[@vN]|DIR|base")]
    incumbent: Option<String>,
    #[arg(long, default_value = "personal")]
    name: String,
    /// The night's day: holdout examples up to it (default: the day the candidate was trained for).
    #[arg(long)]
    day: Option<String>,
    /// Only these suites (default: all; built in: perplexity, retention, retention-code, recall,
    /// temporal).
    #[arg(long = "suite")]
    suites: Vec<String>,
    /// The base model (the default model when not given).
    #[arg(long, env = "PAI_MODEL")]
    model: Option<PathBuf>,
    /// Longest row of tokens scored in one pass.
    #[arg(long, default_value_t = pai_evals::DEFAULT_ROW_TOKENS)]
    row_tokens: usize,
    /// Serve the candidate when the gate passes it.
    #[arg(long)]
    promote: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum AdaptersCommand {
    /// Every adapter name with its versions and the one served.
    List {
        #[arg(long)]
        json: bool,
    },
    /// NAME: its versions and history; NAME@vN: that version's pai.json.
    Show {
        #[arg(value_name = "NAME[@vN]")]
        adapter: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove old versions: all but the newest N, never the current one, the one it replaced or its
    /// parent.
    Gc {
        /// One adapter (all of them when not given).
        name: Option<String>,
        #[arg(long)]
        keep: usize,
    },
    /// Register an adapter made elsewhere (a PEFT directory), after loading it onto the base.
    Import {
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// The base model (the default model when not given).
        #[arg(long, env = "PAI_MODEL")]
        model: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Rows, tokens and redactions by day, source, kind and split.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// The training mix for a night: that day's train split plus a recency-weighted replay of
    /// earlier days (`continue`), or every day recency-weighted (`cumulative`); [mix] in pai.toml.
    Mix {
        /// The night's day (YYYY-MM-DD; today by default); later days are left out.
        #[arg(long)]
        day: Option<String>,
        #[arg(long, value_enum, default_value_t = MixModeArg::Continue)]
        mode: MixModeArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MixModeArg {
    Continue,
    Cumulative,
}

#[derive(Args)]
struct TrainArgs {
    /// The night's day (YYYY-MM-DD; today by default): the mix holds it and earlier days.
    #[arg(long)]
    day: Option<String>,
    /// The base model (the default model when not given).
    #[arg(long, env = "PAI_MODEL")]
    model: Option<PathBuf>,
    /// fresh: a new adapter from the base on every day, recency-weighted; continue: from --from on
    /// the day plus a replay share.
    #[arg(long, value_enum)]
    strategy: Option<StrategyArg>,
    /// The adapter `continue` starts from: NAME (its current version), NAME@vN, or a PEFT directory.
    #[arg(long, value_name = "NAME[@vN]|DIR")]
    from: Option<String>,
    /// The registry name the adapter is added under, as its next version (not served until promoted).
    #[arg(long, default_value = "personal")]
    name: String,
    /// Write the adapter to this directory instead of the registry.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue a stopped run from its checkpoint (the newest stopped run when no id is given).
    #[arg(long, value_name = "RUN")]
    resume: Option<Option<String>>,
    /// Projections to adapt, comma-separated (q,k,v,o,gate,up,down).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    #[arg(long)]
    r: Option<usize>,
    #[arg(long)]
    alpha: Option<f64>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long)]
    batch_tokens: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop at a checkpoint after this many seconds and write the adapter so far.
    #[arg(long)]
    time_budget: Option<u64>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    Gguf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StrategyArg {
    Fresh,
    Continue,
}

#[derive(Args)]
struct IngestArgs {
    /// A source for this run on top of pai.toml's [[sources]]: DIR, DIR:notes, DIR:code or DIR:chat.
    #[arg(long = "source", value_name = "DIR[:notes|code|chat]")]
    sources: Vec<String>,
    /// The day the new examples belong to (YYYY-MM-DD; today by default).
    #[arg(long)]
    day: Option<String>,
    /// Read and count, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// The model whose tokenizer counts tokens (the default model when not given).
    #[arg(long, env = "PAI_MODEL")]
    model: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    /// The text file to score.
    #[arg(long)]
    file: PathBuf,
    #[command(flatten)]
    model: pai::ModelArgs,
    /// Longest window of tokens scored in one pass; longer texts use half-overlapping windows.
    #[arg(long, default_value_t = 2048)]
    window: usize,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

/// mimalloc: ingest allocates and frees a string per piece of every file; glibc's malloc spends a fifth of an ingest
/// in malloc/free and in zeroing pages it handed back to the kernel (benches/ingest.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    pai::setup_allocator();
    pai::init_logging();
    match Cli::parse().command {
        Command::Perplexity(args) => run_perplexity(args),
        Command::Ingest(a) => pai::ingest::ingest(pai::ingest::IngestArgs {
            sources: a.sources,
            day: a.day,
            dry_run: a.dry_run,
            model: a.model,
            json: a.json,
        }),
        Command::Watch {
            sources,
            model,
            debounce,
            max_runs,
        } => {
            anyhow::ensure!(
                debounce.is_finite() && debounce >= 0.0,
                "--debounce {debounce} must be a number of seconds, 0 or more"
            );
            pai::watch::watch(pai::watch::WatchArgs {
                sources,
                model,
                debounce: std::time::Duration::from_secs_f64(debounce),
                max_runs,
            })
        }
        Command::Train(a) => pai::train::train(pai::train::TrainArgs {
            day: a.day,
            model: a.model,
            from: a.from,
            name: a.name,
            out: a.out,
            resume: a.resume,
            run_id: None,
            overrides: pai::train::Overrides {
                strategy: a.strategy.map(|s| match s {
                    StrategyArg::Fresh => pai_trainers::Strategy::Fresh,
                    StrategyArg::Continue => pai_trainers::Strategy::Continue,
                }),
                targets: a.targets,
                r: a.r,
                alpha: a.alpha,
                learning_rate: a.lr,
                max_steps: a.max_steps,
                epochs: a.epochs,
                seq_len: a.seq_len,
                batch_tokens: a.batch_tokens,
                grad_accum: a.grad_accum,
                seed: a.seed,
                time_budget_s: a.time_budget,
            },
            json: a.json,
        }),
        Command::Logits { model, text } => {
            let (base, adapters) = model.load()?;
            let ids = base.tokenizer.encode(&text, false)?;
            anyhow::ensure!(!ids.is_empty(), "--text is empty");
            let input =
                candle_core::Tensor::new(ids.as_slice(), base.model.device())?.unsqueeze(0)?;
            let logits_with = |stack: &AdapterStack| -> anyhow::Result<Vec<Vec<f32>>> {
                let mut cache = base.model.new_cache(ids.len());
                Ok(base
                    .model
                    .forward(&input, &mut cache, stack)?
                    .squeeze(0)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec2::<f32>()?)
            };
            let refs: Vec<&pai_model::Adapter> = adapters.iter().collect();
            let out = serde_json::json!({
                "ids": ids,
                "base": logits_with(&AdapterStack::NONE)?,
                "adapted": logits_with(&AdapterStack::new(&refs))?,
            });
            println!("{out}");
            Ok(())
        }
        Command::Export {
            adapter,
            format: ExportFormat::Gguf,
            out,
            model,
        } => {
            let (base, adapters) = pai::load_model(
                model,
                std::slice::from_ref(&adapter),
                pai_model::LoadOptions::default(),
            )?;
            let out = out.unwrap_or_else(|| adapter.join("adapter.gguf"));
            let loaded = adapters.first().context("the adapter did not load")?;
            loaded
                .save_gguf(&out, base.model.config())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Adapters { command } => match command {
            AdaptersCommand::List { json } => pai::adapters::list(json),
            AdaptersCommand::Show { adapter, json } => pai::adapters::show(&adapter, json),
            AdaptersCommand::Gc { name, keep } => pai::adapters::gc(name.as_deref(), keep),
            AdaptersCommand::Import { dir, name, model } => {
                pai::adapters::import(&dir, &name, model)
            }
        },
        Command::Eval(a) => pai::evals::eval(pai::evals::EvalArgs {
            candidate: a.candidate,
            incumbent: a.incumbent,
            name: a.name,
            day: a.day,
            suites: a.suites,
            model: a.model,
            row_tokens: a.row_tokens,
            promote: a.promote,
            json: a.json,
        }),
        Command::Report { run, open } => pai::report::report(run.as_deref(), open),
        Command::Promote { adapter, reason } => pai::adapters::promote(&adapter, &reason),
        Command::Rollback { name, to } => pai::adapters::rollback(&name, to.as_deref()),
        Command::Dataset { command } => match command {
            DatasetCommand::Stats { json } => pai::ingest::dataset_stats(json),
            DatasetCommand::Mix { day, mode, json } => pai::ingest::dataset_mix(
                day,
                match mode {
                    MixModeArg::Continue => pai_datasets::MixMode::Continue,
                    MixModeArg::Cumulative => pai_datasets::MixMode::Cumulative,
                },
                json,
            ),
        },
        Command::Nightly {
            sources,
            day,
            model,
        } => {
            let exit = pai::nightly::nightly(pai::nightly::NightlyArgs {
                sources,
                day,
                model,
            })?;
            if exit != pai::nightly::Exit::Done {
                std::process::exit(exit as i32);
            }
            Ok(())
        }
        Command::Config { command } => match command {
            ConfigCommand::Show { file } => pai::pipeline::config_show(file.as_deref()),
            ConfigCommand::Check { file } => pai::pipeline::config_check(file.as_deref()),
        },
        Command::Init { sources, force } => pai::pipeline::init(&sources, force),
        Command::Status { json } => pai::pipeline::status(json),
        Command::History { limit, json } => pai::pipeline::history(limit, json),
        Command::Router {
            command:
                RouterCommand::Calibrate {
                    labels,
                    model,
                    local_model,
                    dry_run,
                    json,
                },
        } => pai::router::calibrate(pai::router::CalibrateArgs {
            labels,
            model,
            local_model,
            dry_run,
            json,
        }),
        Command::Egress { day, json } => pai::router::egress(day.as_deref(), json),
        Command::Schedule {
            print_crontab,
            print_systemd,
        } => pai::pipeline::schedule(print_crontab, print_systemd),
    }
}

fn run_perplexity(args: PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let (base, adapters) = args.model.load()?;
    let adapter_refs: Vec<&pai_model::Adapter> = adapters.iter().collect();
    let ids = base
        .tokenizer
        .encode_prompt(&text, false)
        .with_context(|| format!("tokenizing {}", args.file.display()))?;
    let bar = ProgressBar::new(ids.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} scoring [{bar:40}] {pos}/{len} tokens ({per_sec}, {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let result = perplexity(
        &base.model,
        &AdapterStack::new(&adapter_refs),
        &ids,
        args.window,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .with_context(|| format!("scoring {}", args.file.display()))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "file": args.file,
                "model": base.path(),
                "adapters": args.model.adapter,
                "tokens": ids.len(),
                "tokens_scored": result.tokens_scored,
                "mean_nll": result.mean_nll,
                "perplexity": result.perplexity,
                "seconds": seconds,
            })
        );
    } else {
        println!(
            "{}: {} tokens, {} scored, mean NLL {:.4} nats/token, perplexity {:.4} ({:.1}s)",
            args.file.display(),
            ids.len(),
            result.tokens_scored,
            result.mean_nll,
            result.perplexity,
            seconds
        );
    }
    Ok(())
}
