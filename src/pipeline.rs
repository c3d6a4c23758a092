//! The command-line edge of pai-pipeline apart from the nightly run itself (`nightly.rs`):
//! `pai-train config show|check`, `init`, `status`, `history` and `schedule`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::Context;
use pai_adapters::Registry;
use pai_pipeline::nightly::runs;
use pai_pipeline::schedule::{run_scheduler, Schedule, ScheduleState, SystemClock};
use pai_pipeline::{LoadedConfig, Outcome, RunState};

/// An explicitly named configuration file must be there (the default one may be absent).
fn named_file(file: Option<&Path>) -> anyhow::Result<()> {
    match file {
        Some(f) if !f.is_file() => anyhow::bail!("--file {}: no such file", f.display()),
        _ => Ok(()),
    }
}

/// `pai-train config show`: the effective configuration and where each value came from.
pub fn config_show(file: Option<&Path>) -> anyhow::Result<()> {
    named_file(file)?;
    let loaded = LoadedConfig::load(&crate::pai_home(), file)?;
    print!("{}", loaded.show()?);
    Ok(())
}

/// `pai-train config check`: every problem at once; an error when there is one.
pub fn config_check(file: Option<&Path>) -> anyhow::Result<()> {
    named_file(file)?;
    let home = crate::pai_home();
    let loaded = LoadedConfig::load(&home, file)?;
    // [train] is checked against the model when it is there to read.
    let model = crate::resolve_model(loaded.config.model.clone())
        .ok()
        .and_then(|p| pai_model::ModelConfig::read(&p).ok());
    let problems = loaded.check(model.as_ref());
    if problems.is_empty() {
        let exists = if loaded.file.is_file() {
            ""
        } else {
            " (not there: defaults only)"
        };
        println!("{}{exists}: ok", loaded.file.display());
        if model.is_none() {
            println!("  [train] not checked against a model: the model is not installed (scripts/fetch-model.sh)");
        }
        return Ok(());
    }
    for p in &problems {
        eprintln!("{p}");
    }
    anyhow::bail!(
        "{} problem(s) in the configuration ({})",
        problems.len(),
        loaded.file.display()
    )
}

/// `pai-train init`: write a commented `pai.toml` (every default, and the sources given); asks for
/// sources only when run in a terminal with none given.
pub fn init(sources: &[String], force: bool) -> anyhow::Result<()> {
    let home = crate::pai_home();
    let path = home.join("pai.toml");
    if path.exists() && !force {
        return Err(pai_pipeline::PipelineError::Exists { path }.into());
    }
    let mut sources: Vec<pai_datasets::SourceConfig> = sources
        .iter()
        .map(|s| pai_datasets::SourceConfig::from_arg(s))
        .collect::<Result<_, _>>()?;
    if sources.is_empty() && std::io::stdin().is_terminal() {
        for (kind, question) in [
            ("notes", "A folder of notes to learn from (empty: none)"),
            ("code", "A folder of code to learn from (empty: none)"),
        ] {
            print!("{question}: ");
            std::io::stdout().flush()?;
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            let dir = line.trim();
            if !dir.is_empty() {
                sources.push(pai_datasets::SourceConfig::from_arg(&format!(
                    "{dir}:{kind}"
                ))?);
            }
        }
    }
    // Absolute paths, so that the file means the same from wherever pai runs.
    for s in &mut sources {
        s.path = std::fs::canonicalize(&s.path)
            .with_context(|| format!("source {} is not a folder here", s.path.display()))?;
    }
    pai_datasets::resolve_sources(&sources)?;
    let text = pai_pipeline::config::init_text(&sources)?;
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    pai_pipeline::nightly::write_atomic(&path, text.as_bytes())?;
    println!("wrote {}", path.display());
    if sources.is_empty() {
        println!("add a [[sources]] table (or pass --source DIR to `pai-train nightly`) to have something to learn from");
    }
    Ok(())
}

/// `pai-train status`: the current adapter of each name, the last nightly runs, the next scheduled.
pub fn status(json: bool) -> anyhow::Result<()> {
    let home = crate::pai_home();
    let loaded = LoadedConfig::load(&home, None)?;
    let registry = Registry::new(&home);
    let mut adapters = Vec::new();
    for name in registry.names().unwrap_or_default() {
        let current = registry.current(&name).ok().flatten();
        let versions = registry.versions(&name).unwrap_or_default().len();
        let day = current
            .and_then(|v| registry.meta(&name, v).ok())
            .and_then(|m| m.dataset.map(|d| d.day));
        adapters.push((name, current, versions, day));
    }
    let all = runs(&home.join("runs"))?;
    let last: Vec<&RunState> = all.iter().rev().take(5).collect();
    let next = Schedule::parse(&loaded.config.schedule.cron)
        .ok()
        .and_then(|s| s.next_after(chrono::Local::now()));
    let scheduler = ScheduleState::read(&home.join("runs"));
    let router = crate::router::status(&home, &loaded.config.router);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "home": home,
                "adapters": adapters.iter().map(|(n, c, k, d)| serde_json::json!({
                    "name": n, "current": c.map(|v| v.to_string()), "versions": k, "trained_through": d,
                })).collect::<Vec<_>>(),
                "runs": last,
                "next_scheduled": next.map(|t| t.to_rfc3339()),
                "scheduler": scheduler,
                "router": router,
            })
        );
        return Ok(());
    }
    println!("home: {}", home.display());
    if adapters.is_empty() {
        println!("adapters: none yet (the first nightly run trains one)");
    }
    for (name, current, versions, day) in &adapters {
        let serving = current.map_or("none promoted".to_string(), |v| format!("serving {v}"));
        let day = day
            .as_ref()
            .map(|d| format!(", trained through {d}"))
            .unwrap_or_default();
        println!("adapter {name}: {serving} ({versions} versions{day})");
    }
    if last.is_empty() {
        println!("nightly runs: none yet (pai-train nightly)");
    }
    for r in last {
        println!("  {}", run_line(r));
    }
    match next {
        Some(t) => println!(
            "next scheduled run: {} ([schedule] cron = {:?}; runs when `pai-train schedule` or your crontab does)",
            t.format("%Y-%m-%d %H:%M"),
            loaded.config.schedule.cron
        ),
        None => println!("next scheduled run: none ([schedule] cron names no future time)"),
    }
    if let Some(t) = scheduler.last_fire {
        println!(
            "scheduler: last fired {}{}",
            t.format("%Y-%m-%d %H:%M"),
            scheduler
                .last_exit
                .map(|c| format!(", exit code {c}"))
                .unwrap_or_default()
        );
    }
    for line in crate::router::status_lines(&router) {
        println!("{line}");
    }
    Ok(())
}

/// One line of a run for `status` and `history`.
fn run_line(r: &RunState) -> String {
    let how = match (&r.outcome, &r.error) {
        (Some(o), _) => o.describe(),
        (None, Some(e)) => format!("stopped in {e} (resumes on the next run)"),
        (None, None) => match r.stages.last() {
            Some(s) => format!("running or killed after {}", s.stage.as_str()),
            None => "running or killed in ingest".into(),
        },
    };
    let seconds: f64 = r.stages.iter().map(|s| s.seconds).sum();
    format!("{}  day {}  {:>6.0}s  {how}", r.id, r.day, seconds)
}

/// `pai-train history`: every nightly run, newest first.
pub fn history(limit: usize, json: bool) -> anyhow::Result<()> {
    let home = crate::pai_home();
    let all = runs(&home.join("runs"))?;
    let shown: Vec<&RunState> = all.iter().rev().take(limit).collect();
    if json {
        println!("{}", serde_json::to_string(&shown)?);
        return Ok(());
    }
    if shown.is_empty() {
        println!("no nightly runs yet");
    }
    for r in shown {
        println!("{}", run_line(r));
    }
    let promoted = all
        .iter()
        .filter(|r| matches!(r.outcome, Some(Outcome::Promoted { .. })))
        .count();
    if !all.is_empty() {
        println!("{} runs, {promoted} promoted", all.len());
    }
    Ok(())
}

/// `pai-train schedule`: run the nightly loop at `[schedule] cron` in the foreground, or print the
/// entry for crontab or systemd.
pub fn schedule(print_crontab: bool, print_systemd: bool) -> anyhow::Result<()> {
    let home = crate::pai_home();
    let loaded = LoadedConfig::load(&home, None)?;
    let s = &loaded.config.schedule;
    let schedule = Schedule::parse(&s.cron)?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    if print_crontab {
        println!("{}", schedule.crontab_line(&exe, &home));
        return Ok(());
    }
    if print_systemd {
        print!("{}", schedule.systemd_service(&exe, &home));
        return Ok(());
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, std::sync::atomic::Ordering::Relaxed));
    }
    eprintln!(
        "pai-train schedule: nightly runs at {:?} (local time); Ctrl-C to stop",
        s.cron
    );
    run_scheduler(
        &schedule,
        &home.join("runs"),
        s.catch_up,
        &SystemClock,
        || !stop.load(std::sync::atomic::Ordering::Relaxed),
        |_| {
            // A child process: a crash in a run never takes the scheduler down.
            match std::process::Command::new(&exe).arg("nightly").status() {
                Ok(status) => status.code().unwrap_or(-1),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the nightly run");
                    -1
                }
            }
        },
        |line| {
            eprintln!(
                "{} {line}",
                chrono::Local::now().format("%Y-%m-%d %H:%M:%S")
            );
            tracing::info!("{line}");
        },
    )?;
    Ok(())
}
