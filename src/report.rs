//! `pai-train report`: the HTML pages of eval runs (pai-evals' `report` renders them), written to
//! `$PAI_HOME/reports/<run>.html` with an `index.html` of every run. Each page is rebuilt from what
//! the run stored (`runs/<run>/eval.json`), the runs before it (the history chart) and the candidate's
//! training metrics (`runs/<training run>/metrics.jsonl`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use pai_evals::report::{render, render_index, HistoryPoint, IndexEntry, Page, TrainingPoint};
use pai_evals::EvalReport;
use serde::{Deserialize, Serialize};

/// What `pai-train eval` stores in `runs/<run>/eval.json`: the report and how the run ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRun {
    pub run: String,
    pub created: String,
    pub promoted: bool,
    /// The training run that made the candidate (its metrics.jsonl), when known.
    #[serde(default)]
    pub training_run: Option<String>,
    #[serde(flatten)]
    pub report: EvalReport,
}

/// Every stored eval run, oldest first.
pub fn eval_runs(home: &Path) -> anyhow::Result<Vec<EvalRun>> {
    let runs = home.join("runs");
    let mut ids: Vec<String> = match std::fs::read_dir(&runs) {
        Ok(e) => e
            .filter_map(|e| e.ok()?.file_name().to_str().map(String::from))
            .filter(|n| n.starts_with("eval-"))
            .collect(),
        Err(_) => Vec::new(),
    };
    ids.sort();
    let mut out = Vec::new();
    for id in ids {
        let path = runs.join(&id).join("eval.json");
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let run: EvalRun = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not an eval run", path.display()))?;
        out.push(run);
    }
    Ok(out)
}

/// Write the page of `run` (the newest when `None`) and the index; returns the page's path.
pub fn write_reports(home: &Path, run: Option<&str>) -> anyhow::Result<PathBuf> {
    let runs = eval_runs(home)?;
    let at = match run {
        Some(id) => runs
            .iter()
            .position(|r| r.run == id)
            .with_context(|| format!("no eval run {id:?} in {}", home.join("runs").display()))?,
        None => runs
            .len()
            .checked_sub(1)
            .context("no eval runs yet: run `pai-train eval` first")?,
    };
    let this = &runs[at];
    let history: Vec<HistoryPoint> = runs[..=at]
        .iter()
        .map(|r| HistoryPoint {
            run: r.run.clone(),
            candidate: r.report.candidate.clone(),
            promoted: r.promoted,
            scores: r
                .report
                .suites
                .iter()
                .filter(|s| !s.candidate.is_empty())
                .map(|s| {
                    let mean =
                        s.candidate.iter().map(|i| i.score).sum::<f64>() / s.candidate.len() as f64;
                    (s.name.clone(), mean)
                })
                .collect(),
        })
        .collect();
    let training: Vec<TrainingPoint> = this
        .training_run
        .as_ref()
        .and_then(|t| std::fs::read_to_string(home.join("runs").join(t).join("metrics.jsonl")).ok())
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default();
    let dir = home.join("reports");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let page = render(&Page {
        run: &this.run,
        created: &this.created,
        report: &this.report,
        promoted: this.promoted,
        history: &history,
        training: &training,
    });
    let path = dir.join(format!("{}.html", this.run));
    pai_pipeline::nightly::write_atomic(&path, page.as_bytes())?;
    let index: Vec<IndexEntry> = runs
        .iter()
        .rev()
        .map(|r| IndexEntry {
            run: r.run.clone(),
            candidate: r.report.candidate.clone(),
            incumbent: r.report.incumbent.clone(),
            promote: r.report.decision.promote,
            promoted: r.promoted,
        })
        .collect();
    pai_pipeline::nightly::write_atomic(&dir.join("index.html"), render_index(&index).as_bytes())?;
    Ok(path)
}

/// `pai-train report [RUN] [--open]`.
pub fn report(run: Option<&str>, open: bool) -> anyhow::Result<()> {
    let path = write_reports(&crate::pai_home(), run)?;
    println!("{}", path.display());
    if open {
        let opener = if cfg!(target_os = "macos") {
            "open"
        } else {
            "xdg-open"
        };
        std::process::Command::new(opener)
            .arg(&path)
            .spawn()
            .with_context(|| format!("starting {opener} to open {}", path.display()))?;
    }
    Ok(())
}
