//! `pai-train train`: the command-line edge of pai-trainers. Reads `[train]` and `[mix]` from pai.toml
//! (flags override), draws the night's mix from the dataset (`fresh`: every day recency-weighted;
//! `continue`: the day plus a replay share, starting from an incumbent adapter), trains with a progress
//! bar and Ctrl-C checkpointing, and writes the adapter as a PEFT directory with its `pai.json`, added
//! to the registry as the next version of its name (not served until promoted), or to `--out`.
//! `--resume` continues a stopped run from its checkpoint with the job it recorded.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use pai_datasets::{training_mix, MixMode, Split, Store};
use pai_trainers::{DocEncoder, Strategy, TrainConfig, TrainJob, TrainOutcome};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Flags that override `[train]`.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub strategy: Option<Strategy>,
    pub targets: Option<Vec<String>>,
    pub r: Option<usize>,
    pub alpha: Option<f64>,
    pub learning_rate: Option<f64>,
    pub max_steps: Option<usize>,
    pub epochs: Option<f64>,
    pub seq_len: Option<usize>,
    pub batch_tokens: Option<usize>,
    pub grad_accum: Option<usize>,
    pub seed: Option<u64>,
    pub time_budget_s: Option<u64>,
}

impl Overrides {
    fn apply(&self, c: &mut TrainConfig) {
        macro_rules! set {
            ($($f:ident),*) => { $(if let Some(v) = self.$f.clone() { c.$f = v; })* };
        }
        set!(
            strategy,
            r,
            alpha,
            learning_rate,
            epochs,
            seq_len,
            batch_tokens,
            grad_accum,
            seed
        );
        if let Some(t) = &self.targets {
            c.target_modules = t.clone();
        }
        if self.max_steps.is_some() {
            c.max_steps = self.max_steps;
        }
        if self.time_budget_s.is_some() {
            c.time_budget_s = self.time_budget_s;
        }
    }
}

pub struct TrainArgs {
    pub day: Option<String>,
    pub model: Option<PathBuf>,
    /// The incumbent adapter `continue` starts from: a registered one (`name`, its current version,
    /// or `name@vN`) or a PEFT directory.
    pub from: Option<String>,
    /// The registry name the adapter is added under.
    pub name: String,
    /// A directory to write the adapter to instead of the registry.
    pub out: Option<PathBuf>,
    pub resume: Option<Option<String>>,
    /// The run's id, chosen by the caller (the nightly run): a run with this id that already exists is
    /// taken up again (resumed from its checkpoint, or found registered and returned as it is).
    pub run_id: Option<String>,
    pub overrides: Overrides,
    pub json: bool,
}

/// What a training run made.
pub struct TrainResult {
    pub run_id: String,
    pub run_dir: PathBuf,
    /// The adapter directory (absent when the run was interrupted before its end).
    pub out: PathBuf,
    /// The registry name and version it was added as.
    pub registered: Option<(String, pai_adapters::Version)>,
    pub stop: pai_trainers::StopReason,
    pub steps: usize,
    pub metrics: serde_json::Value,
}

/// What a run was asked to do, kept in `runs/<id>/job.json` so `--resume` rebuilds the same job.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JobFile {
    day: String,
    model: PathBuf,
    /// The directory of the adapter `continue` starts from.
    from: Option<PathBuf>,
    /// How `from` was named (`personal@v2`, or the directory): the new adapter's parent.
    #[serde(default)]
    parent: Option<String>,
    out: PathBuf,
    /// The registry name the adapter is added under (none with `--out`).
    #[serde(default)]
    register: Option<String>,
    config: TrainConfig,
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    Ok(pai_pipeline::nightly::write_atomic(
        path,
        &serde_json::to_vec_pretty(value)?,
    )?)
}

/// Whether a run stopped before its last step (its checkpoint says so).
fn unfinished(run_dir: &Path) -> bool {
    let state = run_dir.join("checkpoint").join("state.json");
    std::fs::read_to_string(state)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| Some(v.get("step")?.as_u64()? < v.get("total_steps")?.as_u64()?))
        .unwrap_or(false)
}

/// The newest stopped run, for `--resume` without an id.
fn latest_resumable(runs: &Path) -> anyhow::Result<String> {
    let mut ids: Vec<String> = std::fs::read_dir(runs)
        .with_context(|| format!("no runs in {}", runs.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| unfinished(&e.path()))
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    ids.sort();
    ids.pop()
        .with_context(|| format!("no stopped run to resume in {}", runs.display()))
}

/// `pai-train train`: train, then say what came of it.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let json = args.json;
    let r = run(args)?;
    if matches!(r.stop, pai_trainers::StopReason::Interrupted) {
        println!(
            "stopped at step {}; checkpoint in {}. Continue with: pai-train train --resume {}",
            r.steps,
            r.run_dir.join("checkpoint").display(),
            r.run_id
        );
        return Ok(());
    }
    if json {
        let (name, version) = r
            .registered
            .as_ref()
            .map(|(n, v)| (Some(n.clone()), Some(v.to_string())))
            .unwrap_or_default();
        println!(
            "{}",
            serde_json::json!({
                "run": r.run_id,
                "adapter": r.out,
                "name": name,
                "version": version,
                "metrics": r.metrics,
            })
        );
    } else {
        print_summary(&r);
        if let Some((name, version)) = &r.registered {
            println!(
                "registered as {name}@{version} (not served until promoted: pai-train promote \
                 {name}@{version})"
            );
        }
    }
    Ok(())
}

/// The registered version a finished run `run_id` was added as, if it got that far.
fn registered_by(
    home: &Path,
    name: &str,
    run_id: &str,
) -> anyhow::Result<Option<pai_adapters::Version>> {
    let registry = pai_adapters::Registry::new(home);
    let Ok(versions) = registry.versions(name) else {
        return Ok(None);
    };
    for v in versions.into_iter().rev() {
        let meta = registry.meta(name, v)?;
        if meta.training.as_ref().and_then(|t| t["run"].as_str()) == Some(run_id) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// Train an adapter as `args` say (or take a stopped run up again) and register it.
pub fn run(args: TrainArgs) -> anyhow::Result<TrainResult> {
    crate::keep_freed_memory();
    let home = crate::pai_home();
    let runs = home.join("runs");
    let file_config = crate::ingest::read_config(&home)?;

    // 1. The job: a new one from pai.toml and flags, or the one a stopped run recorded.
    let fixed = args
        .run_id
        .as_ref()
        .filter(|id| runs.join(id).join("job.json").is_file());
    let (run_id, job, resume) = match (&args.resume, fixed) {
        (None, Some(id)) => {
            let path = runs.join(id).join("job.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let job: JobFile = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a job file", path.display()))?;
            if let Some(name) = &job.register {
                if let Some(v) = registered_by(&home, name, id)? {
                    let metrics = pai_adapters::Registry::new(&home)
                        .meta(name, v)?
                        .metrics
                        .unwrap_or_default();
                    return Ok(TrainResult {
                        run_id: id.clone(),
                        run_dir: runs.join(id),
                        out: job.out.clone(),
                        registered: Some((name.clone(), v)),
                        stop: serde_json::from_value(metrics["stop"].clone())
                            .unwrap_or(pai_trainers::StopReason::Finished),
                        steps: metrics["steps"].as_u64().unwrap_or(0) as usize,
                        metrics,
                    });
                }
            }
            // Killed before its first checkpoint: it starts over, on the job it recorded.
            let resume = runs.join(id).join("checkpoint").exists();
            (id.clone(), job, resume)
        }
        (Some(id), _) => {
            let id = match id {
                Some(id) => id.clone(),
                None => latest_resumable(&runs)?,
            };
            let path = runs.join(&id).join("job.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("run {id} has no {}", path.display()))?;
            let job: JobFile = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a job file", path.display()))?;
            (id, job, true)
        }
        (None, None) => {
            let mut config = file_config.train.clone();
            args.overrides.apply(&mut config);
            let day = match &args.day {
                Some(d) => {
                    chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
                        .with_context(|| format!("--day {d:?} is not a date like 2026-11-22"))?;
                    d.clone()
                }
                None => crate::ingest::today(),
            };
            let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S").to_string();
            std::fs::create_dir_all(&runs)
                .with_context(|| format!("creating {}", runs.display()))?;
            // Claimed by creating its directory, so two runs started in the same second differ.
            let id = match &args.run_id {
                Some(id) => {
                    std::fs::create_dir_all(runs.join(id))
                        .with_context(|| format!("creating {}", runs.join(id).display()))?;
                    id.clone()
                }
                None => (1..1000)
                    .map(|n| match n {
                        1 => stamp.clone(),
                        n => format!("{stamp}-{n}"),
                    })
                    .find(|id| std::fs::create_dir(runs.join(id)).is_ok())
                    .with_context(|| {
                        format!("cannot create a run directory in {}", runs.display())
                    })?,
            };
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| runs.join(&id).join("adapter"));
            let register = match &args.out {
                Some(_) => None,
                None => {
                    pai_adapters::check_name(&args.name)?;
                    Some(args.name.clone())
                }
            };
            let (from, parent) = match &args.from {
                Some(spec) => {
                    let (dir, parent) = crate::adapters::locate(&home, spec)?;
                    (Some(dir), Some(parent))
                }
                None => (None, None),
            };
            let job = JobFile {
                day,
                model: crate::resolve_model(args.model.clone())?,
                from,
                parent,
                out,
                register,
                config,
            };
            (id, job, false)
        }
    };
    let run_dir = runs.join(&run_id);
    let cfg = &job.config;
    anyhow::ensure!(
        cfg.strategy == Strategy::Fresh || job.from.is_some(),
        "train.strategy = continue needs the incumbent adapter: pass --from NAME[@vN] or --from DIR"
    );

    // 2. The model, checked against the config before anything is read.
    let (base, from) = crate::load_model(
        Some(job.model.clone()),
        job.from.as_slice(),
        pai_model::LoadOptions::default(),
    )?;
    cfg.validate(base.model.config())?;

    // 3. The mix and the holdout.
    let store = Store::open(&home.join("dataset"))?;
    let mode = match cfg.strategy {
        Strategy::Fresh => MixMode::Cumulative,
        Strategy::Continue => MixMode::Continue,
    };
    let mix = training_mix(&store, &job.day, mode, &file_config.mix, &HashSet::new())?;
    anyhow::ensure!(
        !mix.examples.is_empty(),
        "nothing to train on for {}: the dataset in {} has no train-split example up to that day \
         (run `pai-train ingest` first)",
        job.day,
        store.dir().display()
    );
    let mut holdout = Vec::new();
    for d in store.days()? {
        if d <= job.day {
            holdout.extend(
                store
                    .read_day(&d)?
                    .into_iter()
                    .filter(|e| e.split == Split::Holdout),
            );
        }
    }
    let encoder = DocEncoder::new(&base.tokenizer, base.chat_template().ok());
    let train_docs = encoder.encode_all(&mix.examples)?;
    let holdout_docs = encoder.encode_all(&holdout)?;
    // General text and code the base knows, measured as the gate's retention guards measure them
    // (their items, scorer and limits) against what the gate will compare the candidate with (the
    // name's incumbent), so that no checkpoint a guard would fail is shipped.
    let guards = retention_guards(&home, &store, &job.day)?;
    let guard_scores: Vec<_> = guards
        .iter()
        .map(|g| {
            let items = &g.items;
            let base = &base;
            move |adapter: Option<&pai_model::Adapter>| gate_loss(base, items, adapter)
        })
        .collect();
    // The incumbent: most often (`continue`) the very adapter training starts from, loaded once.
    let mut incumbent_loaded = None;
    let mut incumbent = None;
    if let Some(name) = &job.register {
        if let Some(v) = pai_adapters::Registry::new(&home).current(name)? {
            let (dir, _) = crate::adapters::locate(&home, &format!("{name}@{v}"))?;
            if job.from.as_ref() == Some(&dir) {
                incumbent = from.first();
            } else {
                let adapter = base
                    .load_adapter(&dir)
                    .with_context(|| format!("loading the incumbent {name}@{v}"))?;
                incumbent = Some(&*incumbent_loaded.insert(adapter));
            }
        }
    }
    let dataset_hash = {
        let mut ids: Vec<&str> = mix.examples.iter().map(|e| e.id.as_str()).collect();
        ids.sort_unstable();
        let mut h = Sha256::new();
        for id in ids {
            h.update(id.as_bytes());
            h.update(b"\n");
        }
        format!("{:x}", h.finalize())
    };
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    if !resume {
        write_json(&run_dir.join("job.json"), &job)?;
    }

    // 4. Train, with Ctrl-C (and SIGTERM) stopping at a checkpoint.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::Relaxed) {
                std::process::exit(130);
            }
            eprintln!("\nstopping at the end of this step (Ctrl-C again to quit now)…");
        });
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} train [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let pad = base.tokenizer.eos().unwrap_or(0);
    let outcome = pai_trainers::train(
        &TrainJob {
            model: &base.model,
            config: cfg,
            train: &train_docs,
            holdout: &holdout_docs,
            retention: guards
                .iter()
                .zip(&guard_scores)
                .map(|(g, score)| pai_trainers::RetentionGuard {
                    name: g.config.name.clone(),
                    score,
                    reference: incumbent,
                    max_rise: g.config.max_regression,
                })
                .collect(),
            init: from.first(),
            base_name: Some(base.name().to_string()),
            run_dir: &run_dir,
            resume,
            stop: &stop,
            pad,
        },
        &mut |m| {
            bar.set_length(m.total_steps as u64);
            bar.set_position(m.step as u64);
            let holdout = m
                .holdout_loss
                .map(|l| format!("  holdout {l:.3}"))
                .unwrap_or_default();
            bar.set_message(format!(
                "loss {:.3}{holdout}  {:.0} tok/s",
                m.loss, m.tokens_per_s
            ));
        },
    )?;
    bar.finish_and_clear();
    if matches!(outcome.stop, pai_trainers::StopReason::Interrupted) {
        return Ok(TrainResult {
            run_id,
            out: job.out.clone(),
            registered: None,
            stop: outcome.stop,
            steps: outcome.steps,
            metrics: metrics_json(&outcome),
            run_dir,
        });
    }

    // 5. The adapter directory, written beside its place and renamed in; then registered.
    let meta = pai_adapters::AdapterMeta {
        base: pai_adapters::BaseFingerprint {
            sha256: base.sha256()?.to_string(),
            name: Some(base.name().to_string()),
            path: Some(base.path().to_path_buf()),
        },
        dataset: Some(pai_adapters::DatasetInfo {
            day: job.day.clone(),
            days: mix.by_day.keys().cloned().collect(),
            hash: dataset_hash,
            examples: mix.examples.len() as u64,
            new_tokens: mix.new_tokens as u64,
            replay_tokens: mix.replay_tokens as u64,
            holdout_examples: holdout.len() as u64,
        }),
        training: Some(serde_json::json!({
            "run": run_id,
            "strategy": cfg.strategy,
            "config": cfg,
        })),
        metrics: Some(metrics_json(&outcome)),
        parent: job
            .parent
            .clone()
            .or_else(|| job.from.as_ref().map(|p| p.display().to_string())),
        created: chrono::Local::now().to_rfc3339(),
        ..Default::default()
    };
    let out = &job.out;
    let tmp = out.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("clearing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    outcome.adapter.save_peft(&tmp)?;
    std::fs::write(tmp.join(pai_adapters::meta::META_FILE), meta.to_json())
        .with_context(|| format!("writing {}", tmp.join("pai.json").display()))?;
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("replacing {}", out.display()))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    let registered = match &job.register {
        Some(name) => {
            let version = pai_adapters::Registry::new(&home).add(name, out, meta)?;
            Some((name.clone(), version))
        }
        None => None,
    };

    Ok(TrainResult {
        run_id,
        run_dir,
        out: out.clone(),
        registered,
        stop: outcome.stop,
        steps: outcome.steps,
        metrics: metrics_json(&outcome),
    })
}

/// The gate's retention guards: every `retention` suite whose role is guard, built in (prose and
/// code) or the owner's. Empty when no retention suite guards the gate.
fn retention_guards(
    home: &Path,
    store: &Store,
    day: &str,
) -> anyhow::Result<Vec<pai_evals::suite::Suite>> {
    use pai_evals::suite::{build, load_configs, SuiteKind};
    let mut guards = Vec::new();
    for (config, origin) in load_configs(&home.join("evals"))? {
        if config.kind == SuiteKind::Retention && config.role == pai_evals::Role::Guard {
            guards.push(build(config, &origin, store, day)?);
        }
    }
    Ok(guards)
}

/// The mean loss per token of `items` under `adapter` as the eval gate scores them (the same scorer,
/// forward and row length: on CPU the serving forward, whose int8 activations move a paragraph's
/// loss by up to 0.07 nats from the training forward's).
fn gate_loss(
    base: &pai_model::BaseModel,
    items: &[pai_evals::Item],
    adapter: Option<&pai_model::Adapter>,
) -> Result<f64, pai_trainers::BoxError> {
    let list: Vec<&pai_model::Adapter> = adapter.into_iter().collect();
    let scorer = pai_evals::Scorer {
        model: &base.model,
        tokenizer: &base.tokenizer,
        adapters: pai_model::AdapterStack::new(&list),
        row_tokens: pai_evals::DEFAULT_ROW_TOKENS,
        pack: pai_evals::Scorer::packs_by_default(&base.model),
    };
    let results = scorer.score(items)?;
    let n = results.len().max(1) as f64;
    Ok(-results.iter().map(|r| r.score).sum::<f64>() / n)
}

fn metrics_json(o: &TrainOutcome) -> serde_json::Value {
    serde_json::json!({
        "stop": o.stop,
        "steps": o.steps,
        "total_steps": o.total_steps,
        "best_step": o.best_step,
        "initial_holdout_loss": o.initial_holdout,
        "best_holdout_loss": o.best_holdout,
        "reference_retention_loss": o.reference_retention,
        "best_retention_loss": o.best_retention,
        "final_train_loss": o.final_loss,
        "tokens": o.tokens,
        "elapsed_s": o.elapsed_s,
        "trainable_params": o.trainable_params,
    })
}

fn print_summary(r: &TrainResult) {
    let m = &r.metrics;
    let holdout = match (
        m["initial_holdout_loss"].as_f64(),
        m["best_holdout_loss"].as_f64(),
    ) {
        (Some(a), Some(b)) => format!(
            "holdout loss {a:.3} → {b:.3} (perplexity {:.1} → {:.1}, {:+.1}%)",
            a.exp(),
            b.exp(),
            100.0 * (b.exp() / a.exp() - 1.0)
        ),
        _ => "no holdout examples to measure on".into(),
    };
    println!(
        "trained {} steps ({:?}) on {} tokens in {:.0}s; {holdout}; best at step {}",
        r.steps,
        r.stop,
        m["tokens"],
        m["elapsed_s"].as_f64().unwrap_or(0.0),
        m["best_step"]
    );
    println!("adapter: {}", r.out.display());
    println!("metrics: {}", r.run_dir.join("metrics.jsonl").display());
}
