//! `pai-train nightly`: one night of the loop, through `pai_pipeline::run_nightly`, with pai's commands
//! as its stages — ingest the sources, train the `[nightly] adapter` (`fresh` from the base, or
//! `continue` from the current version), evaluate the candidate against the current version (or the
//! base when there is none yet), promote it when the gate passes, write the report — and the manners
//! a job on someone's own machine should have: a lower priority, a thread count, mains power only
//! when asked, a training time budget. Ends with a one-screen summary and an exit code a cron job can
//! act on (`Exit`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use pai_adapters::Registry;
use pai_datasets::Store;
use pai_pipeline::{
    run_nightly, Config, Evaluated, Ingested, NightlyOptions, Outcome, RunState, Stage, Stages,
    Trained,
};

/// How a nightly invocation ended, as its process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The night ended: a candidate promoted (or passed), or nothing (enough) to learn.
    Done = 0,
    /// The configuration or the arguments are wrong.
    Usage = 2,
    /// The candidate failed the gate; the served version is unchanged.
    Rejected = 3,
    /// Another nightly run holds the lock.
    Busy = 4,
    /// A stage failed or was interrupted; the next invocation resumes the run.
    Failed = 5,
    /// On battery with `[nightly] only_on_ac`: nothing was done.
    OnBattery = 6,
    /// The machine stayed busy past `[nightly] idle_wait_min`: nothing was done.
    NotIdle = 7,
}

pub struct NightlyArgs {
    pub sources: Vec<String>,
    pub day: Option<String>,
    pub model: Option<PathBuf>,
}

/// Run one night; what to exit with.
pub fn nightly(args: NightlyArgs) -> anyhow::Result<Exit> {
    let home = crate::pai_home();
    let loaded = match pai_pipeline::LoadedConfig::load(&home, None) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pai-train nightly: {e}");
            return Ok(Exit::Usage);
        }
    };
    if let Some(problem) = loaded.check(None).into_iter().next() {
        eprintln!("pai-train nightly: {problem}");
        return Ok(Exit::Usage);
    }
    let config = loaded.config;
    let settings = &config.nightly;
    let day = match args.day {
        Some(d) => {
            chrono::NaiveDate::parse_from_str(&d, "%Y-%m-%d")
                .with_context(|| format!("--day {d:?} is not a date like 2026-11-22"))?;
            d
        }
        None => crate::ingest::today(),
    };

    // 1. Manners.
    if settings.only_on_ac && on_battery() == Some(true) {
        println!("on battery power and [nightly] only_on_ac is set: nothing done tonight");
        return Ok(Exit::OnBattery);
    }
    if settings.idle_max_load > 0.0 {
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs(settings.idle_wait_min * 60);
        while let Some(load) = load_per_core().filter(|&l| l > settings.idle_max_load) {
            if std::time::Instant::now() >= deadline {
                println!(
                    "the machine is busy (load {load:.2} per core, [nightly] idle_max_load {}) and \
                     stayed so for {} min: nothing done tonight",
                    settings.idle_max_load, settings.idle_wait_min
                );
                return Ok(Exit::NotIdle);
            }
            eprintln!(
                "waiting for the machine to be idle (load {load:.2} per core > {})",
                settings.idle_max_load
            );
            std::thread::sleep(std::time::Duration::from_secs(30));
        }
    }
    if settings.nice > 0 {
        // SAFETY: nice(2) only changes this process's scheduling priority.
        let r = unsafe { libc::nice(settings.nice) };
        if r == -1 {
            tracing::warn!(nice = settings.nice, "cannot lower the priority");
        }
    }
    if settings.threads > 0 && std::env::var_os("PAI_NUM_THREADS").is_none() {
        // Read by the kernels' pool when it first starts, which is later than this.
        std::env::set_var("PAI_NUM_THREADS", settings.threads.to_string());
    }

    // 2. The stages.
    let model = crate::resolve_model(args.model.or_else(|| config.model.clone()))?;
    let opts = NightlyOptions {
        runs_dir: home.join("runs"),
        day: day.clone(),
        adapter: settings.adapter.clone(),
        min_new_tokens: settings.min_new_tokens,
        promote: settings.promote,
    };
    // What the router sent out and saved ([router] learn_from_escalations) is learned tonight.
    let mut extra_sources = args.sources;
    let escalations = pai_serve::router::escalations_dir(&home);
    if config.router.learn_from_escalations && escalations.is_dir() {
        extra_sources.push(format!("{}:chat", escalations.display()));
    }
    let mut stages = PaiStages {
        home: home.clone(),
        config,
        model,
        extra_sources,
    };
    let started = std::time::Instant::now();
    let ran = run_nightly(&opts, &mut stages, |state, stage, phase| {
        if phase == "start" {
            let again = if state.resumed > 0 && state.stages.is_empty() {
                " (taken up again)"
            } else {
                ""
            };
            eprintln!("[{}] {}{again}", state.id, stage.as_str());
        }
    });
    let ran = match ran {
        Ok(r) => r,
        Err(e @ pai_pipeline::PipelineError::Locked { .. }) => {
            eprintln!("pai-train nightly: {e}");
            return Ok(Exit::Busy);
        }
        Err(e) => return Err(e.into()),
    };
    match ran {
        Ok(state) => {
            print_summary(&home, &state, started.elapsed());
            Ok(match state.outcome {
                Some(Outcome::Rejected { .. }) => Exit::Rejected,
                _ => Exit::Done,
            })
        }
        Err(failed) => {
            eprintln!(
                "pai-train nightly: run {} stopped in {}: {}\nrun `pai-train nightly` again to take it up where it stopped",
                failed.state.id,
                failed.stage.as_str(),
                failed.message
            );
            Ok(Exit::Failed)
        }
    }
}

/// pai's commands as the night's stages.
struct PaiStages {
    home: PathBuf,
    config: Config,
    model: PathBuf,
    extra_sources: Vec<String>,
}

impl PaiStages {
    /// The day the current adapter's dataset went up to (none: no adapter yet).
    fn trained_through(&self, adapter: &str) -> anyhow::Result<Option<String>> {
        let registry = Registry::new(&self.home);
        let Ok(Some(v)) = registry.current(adapter) else {
            return Ok(None);
        };
        Ok(registry.meta(adapter, v)?.dataset.map(|d| d.day))
    }
}

impl Stages for PaiStages {
    type Error = String;

    fn ingest(&mut self, run: &RunState) -> Result<Ingested, String> {
        let go = || -> anyhow::Result<Ingested> {
            let started = std::time::Instant::now();
            let summary = crate::ingest::ingest_day(
                &self.home,
                &self.extra_sources,
                &run.day,
                Some(self.model.clone()),
                false,
                false,
            )?;
            crate::ingest::print_summary(&summary, &run.day, started.elapsed());
            // What tonight can learn from: train-split tokens of the days after the current
            // adapter's dataset, up to tonight's.
            let after = self.trained_through(&run.adapter)?;
            let store = Store::open(&self.home.join("dataset"))?;
            let untrained = store
                .stats()?
                .iter()
                .filter(|r| r.split == "train" && r.day.as_str() <= run.day.as_str())
                .filter(|r| after.as_deref().is_none_or(|a| r.day.as_str() > a))
                .map(|r| r.tokens as usize)
                .sum();
            Ok(Ingested {
                new_examples: summary.examples_added.values().sum(),
                untrained_tokens: untrained,
            })
        };
        go().map_err(|e| format!("{e:#}"))
    }

    fn train(&mut self, run: &RunState, train_run: &str) -> Result<Trained, String> {
        let go = || -> anyhow::Result<Trained> {
            let strategy = self.config.train.strategy;
            let from = match strategy {
                pai_trainers::Strategy::Continue => Registry::new(&self.home)
                    .current(&run.adapter)
                    .ok()
                    .flatten()
                    .map(|v| format!("{}@{v}", run.adapter)),
                pai_trainers::Strategy::Fresh => None,
            };
            let mut overrides = crate::train::Overrides::default();
            if from.is_none() && strategy == pai_trainers::Strategy::Continue {
                // The first night has nothing to continue from.
                overrides.strategy = Some(pai_trainers::Strategy::Fresh);
            }
            if self.config.train.time_budget_s.is_none() {
                overrides.time_budget_s = Some(self.config.nightly.time_budget_min * 60);
            }
            let r = crate::train::run(crate::train::TrainArgs {
                day: Some(run.day.clone()),
                model: Some(self.model.clone()),
                from,
                name: run.adapter.clone(),
                out: None,
                resume: None,
                run_id: Some(train_run.to_string()),
                overrides,
                json: true,
            })?;
            anyhow::ensure!(
                !matches!(r.stop, pai_trainers::StopReason::Interrupted),
                "training was interrupted at step {} (checkpoint kept)",
                r.steps
            );
            let (_, version) = r
                .registered
                .context("the trained adapter was not registered")?;
            Ok(Trained {
                run: r.run_id,
                version: version.to_string(),
                stop: serde_json::to_value(r.stop)?
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                steps: r.steps,
                best_step: r.metrics["best_step"].as_u64().map(|s| s as usize),
            })
        };
        go().map_err(|e| format!("{e:#}"))
    }

    fn eval(&mut self, run: &RunState, trained: &Trained) -> Result<Evaluated, String> {
        let go = || -> anyhow::Result<Evaluated> {
            let r = crate::evals::run(crate::evals::EvalArgs {
                candidate: Some(format!("{}@{}", run.adapter, trained.version)),
                incumbent: None,
                name: run.adapter.clone(),
                day: Some(run.day.clone()),
                suites: Vec::new(),
                model: Some(self.model.clone()),
                row_tokens: pai_evals::DEFAULT_ROW_TOKENS,
                promote: false,
                json: true,
            })?;
            Ok(Evaluated {
                run: r.run_id,
                incumbent: r.report.incumbent.clone(),
                pass: r.report.decision.promote,
                reasons: r.report.decision.reasons.clone(),
            })
        };
        go().map_err(|e| format!("{e:#}"))
    }

    fn promote(
        &mut self,
        run: &RunState,
        trained: &Trained,
        evaluated: &Evaluated,
    ) -> Result<(), String> {
        let go = || -> anyhow::Result<()> {
            let registry = Registry::new(&self.home);
            let version: pai_adapters::Version = trained.version.parse()?;
            if registry.current(&run.adapter)? == Some(version) {
                return Ok(());
            }
            let reason = format!("nightly {}: gate: {}", run.id, evaluated.reasons.join("; "));
            registry.promote(&run.adapter, version, &reason)?;
            mark_promoted(&self.home, &evaluated.run)?;
            Ok(())
        };
        go().map_err(|e| format!("{e:#}"))
    }

    fn report(&mut self, run: &RunState) -> Result<PathBuf, String> {
        let go = || -> anyhow::Result<PathBuf> {
            match run.result::<Evaluated>(Stage::Eval) {
                Some(e) => crate::report::write_reports(&self.home, Some(&e.run)),
                // No candidate tonight: the index (and the newest page) as they are, if any.
                None => match crate::report::write_reports(&self.home, None) {
                    Ok(_) => Ok(self.home.join("reports").join("index.html")),
                    Err(_) => Ok(PathBuf::new()),
                },
            }
        };
        go().map_err(|e| format!("{e:#}"))
    }
}

/// The eval run's record says its candidate was promoted (the report shows it).
fn mark_promoted(home: &Path, eval_run: &str) -> anyhow::Result<()> {
    let path = home.join("runs").join(eval_run).join("eval.json");
    let mut run: crate::report::EvalRun = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not an eval run", path.display()))?;
    run.promoted = true;
    pai_pipeline::nightly::write_atomic(&path, &serde_json::to_vec_pretty(&run)?)?;
    Ok(())
}

/// Whether the machine runs on battery, where Linux says (`None`: it does not say, or has no
/// battery).
/// The one-minute load average per core, where the system says (Linux: /proc/loadavg).
fn load_per_core() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let one: f64 = text.split_whitespace().next()?.parse().ok()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(one / cores as f64)
}

/// Whether the machine runs on battery, where Linux says (`/sys/class/power_supply`).
fn on_battery() -> Option<bool> {
    on_battery_in(Path::new("/sys/class/power_supply"))
}

/// On battery when a mains supply is there and none is online; with no mains supply listed (some
/// laptops list only their battery), when a battery is discharging. None when nothing says.
fn on_battery_in(supplies: &Path) -> Option<bool> {
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let (mut mains, mut discharging) = (None, None);
    for s in std::fs::read_dir(supplies).ok()?.flatten() {
        match read(s.path().join("type")).as_str() {
            "Mains" => {
                let on = read(s.path().join("online")) == "1";
                mains = Some(mains.unwrap_or(false) || on);
            }
            "Battery" => {
                let d = read(s.path().join("status")) == "Discharging";
                discharging = Some(discharging.unwrap_or(false) || d);
            }
            _ => {}
        }
    }
    mains.map(|on| !on).or(discharging)
}

/// The one-screen summary of a night.
fn print_summary(home: &Path, state: &RunState, took: std::time::Duration) {
    let outcome = state
        .outcome
        .as_ref()
        .map_or("finished".into(), Outcome::describe);
    println!(
        "night {} ({}, {}): {outcome}",
        state.day,
        state.id,
        fmt_duration(took)
    );
    for r in &state.stages {
        let what = match r.stage {
            Stage::Ingest => r
                .result
                .get("untrained_tokens")
                .map(|t| {
                    format!(
                        "{} new examples, {t} tokens to learn from",
                        r.result["new_examples"]
                    )
                })
                .unwrap_or_default(),
            Stage::Train => format!(
                "{}@{} ({} steps, {}{})",
                state.adapter,
                r.result["version"].as_str().unwrap_or("?"),
                r.result["steps"],
                r.result["stop"].as_str().unwrap_or("?"),
                if r.result["best_step"].as_u64() == Some(0) {
                    "; every checkpoint forgot past a retention guard: it is the weights \
                     training started from"
                } else {
                    ""
                }
            ),
            Stage::Eval => format!(
                "against {}: {}",
                r.result["incumbent"].as_str().unwrap_or("?"),
                if r.result["pass"].as_bool() == Some(true) {
                    "passes"
                } else {
                    "fails"
                }
            ),
            Stage::Gate => state
                .outcome
                .as_ref()
                .map_or(String::new(), Outcome::describe),
            Stage::Report => r.result["page"].as_str().unwrap_or_default().to_string(),
        };
        println!(
            "  {:<7} {:>7}  {what}",
            r.stage.as_str(),
            fmt_duration(std::time::Duration::from_secs_f64(r.seconds))
        );
    }
    if matches!(state.outcome, Some(Outcome::Promoted { .. })) {
        println!(
            "serving: a running pai-serve picks it up (or start one: pai-serve serve); ask it with \
             any OpenAI client for \"model\": \"{}\"",
            state.adapter
        );
    }
    println!(
        "state: {}",
        home.join("runs")
            .join(&state.id)
            .join("state.json")
            .display()
    );
}

fn fmt_duration(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supply(root: &Path, name: &str, files: &[(&str, &str)]) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (f, v) in files {
            std::fs::write(dir.join(f), format!("{v}\n")).unwrap();
        }
    }

    #[test]
    fn battery_power_is_read_from_the_power_supplies() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(on_battery_in(&root.join("absent")), None);
        assert_eq!(on_battery_in(root), None, "nothing listed");
        // A laptop: mains unplugged, battery discharging.
        supply(
            root,
            "BAT0",
            &[("type", "Battery"), ("status", "Discharging")],
        );
        assert_eq!(
            on_battery_in(root),
            Some(true),
            "only a battery, discharging"
        );
        supply(root, "AC", &[("type", "Mains"), ("online", "0")]);
        supply(
            root,
            "ucsi-source-psy-1",
            &[("type", "USB"), ("online", "1")],
        );
        assert_eq!(on_battery_in(root), Some(true));
        // Plugged in (the battery may still say discharging for a moment: mains decides).
        supply(root, "AC", &[("type", "Mains"), ("online", "1")]);
        assert_eq!(on_battery_in(root), Some(false));
        // A second mains supply offline changes nothing.
        supply(root, "ADP2", &[("type", "Mains"), ("online", "0")]);
        assert_eq!(on_battery_in(root), Some(false));
        // A desktop: no supplies at all says nothing; a charged battery alone is not on battery.
        let desk = tempfile::tempdir().unwrap();
        supply(
            desk.path(),
            "BAT1",
            &[("type", "Battery"), ("status", "Full")],
        );
        assert_eq!(on_battery_in(desk.path()), Some(false));
    }
}
