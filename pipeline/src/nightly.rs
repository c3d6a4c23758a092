//! The nightly run: ingest, train, eval, gate (promote or reject), report, in that order. Each stage's
//! result is recorded in `runs/<id>/state.json` (written to a temporary file, synced and renamed in, so
//! that what is read is always a whole state) as soon as the stage ends. A run that is killed at any
//! point leaves a state without an outcome; the next invocation takes the same run up again from the
//! first stage that had not finished, so a night's work is never done twice and never half-counted.
//! A lock keeps two runs from overlapping.
//!
//! The stages themselves are pai's commands (`Stages`, implemented by the `pai` binaries' library);
//! this module decides what runs, records it, and says how the night ended.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};
use crate::lock::NightlyLock;

/// The stages, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Ingest,
    Train,
    Eval,
    Gate,
    Report,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Ingest,
        Stage::Train,
        Stage::Eval,
        Stage::Gate,
        Stage::Report,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Ingest => "ingest",
            Stage::Train => "train",
            Stage::Eval => "eval",
            Stage::Gate => "gate",
            Stage::Report => "report",
        }
    }
}

/// What the ingest stage found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ingested {
    /// Examples this ingest added.
    pub new_examples: usize,
    /// Train-split tokens the current adapter has not been trained on (days after its dataset's day,
    /// or all of them when there is no adapter yet): what tonight would learn from.
    pub untrained_tokens: usize,
}

/// What the training stage made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Trained {
    /// The training run's id (`runs/<id>/`).
    pub run: String,
    /// The candidate's registered version (`v3`).
    pub version: String,
    /// Why training stopped (`completed`, `time_budget`, `early_stopping`, …).
    pub stop: String,
    pub steps: usize,
    /// The step whose weights were kept (0: none beat the start within the retention guard, so the
    /// candidate is the weights training started from). Absent in runs recorded before it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_step: Option<usize>,
}

/// What the evaluation decided.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluated {
    /// The eval run's id (`runs/<id>/eval.json`).
    pub run: String,
    /// What the candidate was compared with (`personal@v2`, or `base`).
    pub incumbent: String,
    /// The gate's verdict.
    pub pass: bool,
    pub reasons: Vec<String>,
}

/// How a night ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The candidate passed the gate and is now served.
    Promoted { version: String },
    /// The candidate passed the gate; `[nightly] promote = false` kept it back.
    Passed { version: String },
    /// The candidate failed the gate; the served version is unchanged.
    Rejected {
        version: String,
        reasons: Vec<String>,
    },
    /// Nothing new since the current adapter was trained.
    NothingNew,
    /// Something new, but less than `min_new_tokens`.
    NotEnoughData { tokens: usize, needed: usize },
    /// Superseded: a later run for another day started while this one was unfinished.
    Abandoned { by: String },
}

impl Outcome {
    /// One line for the summary and `history`.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Promoted { version } => format!("promoted {version}"),
            Outcome::Passed { version } => {
                format!("{version} passed the gate (not promoted: [nightly] promote = false)")
            }
            Outcome::Rejected { version, reasons } => {
                format!("rejected {version}: {}", reasons.join("; "))
            }
            Outcome::NothingNew => "nothing new to learn".into(),
            Outcome::NotEnoughData { tokens, needed } => format!(
                "not enough new data: {tokens} new tokens, {needed} needed ([nightly] min_new_tokens)"
            ),
            Outcome::Abandoned { by } => format!("abandoned (run {by} started for another day)"),
        }
    }
}

/// One finished stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: Stage,
    pub started: String,
    pub seconds: f64,
    /// The stage's result (`Ingested`, `Trained`, `Evaluated`, the report page…) as JSON.
    pub result: serde_json::Value,
}

/// `runs/<id>/state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub id: String,
    /// The day ingested and trained up to.
    pub day: String,
    pub adapter: String,
    pub started: String,
    #[serde(default)]
    pub finished: Option<String>,
    /// Times a later invocation took this run up again after it stopped.
    #[serde(default)]
    pub resumed: u32,
    pub stages: Vec<StageRecord>,
    #[serde(default)]
    pub outcome: Option<Outcome>,
    /// The last stage failure (the run stays unfinished, to be resumed).
    #[serde(default)]
    pub error: Option<String>,
}

impl RunState {
    pub fn record(&self, stage: Stage) -> Option<&StageRecord> {
        self.stages.iter().find(|r| r.stage == stage)
    }

    /// A finished stage's result, typed.
    pub fn result<T: serde::de::DeserializeOwned>(&self, stage: Stage) -> Option<T> {
        self.record(stage)
            .and_then(|r| serde_json::from_value(r.result.clone()).ok())
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io("read", path, e))?;
        serde_json::from_str(&text).map_err(|source| PipelineError::State {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Written whole or not at all: a temporary file, synced, renamed over the old state.
    pub fn write(&self, runs: &Path) -> Result<()> {
        let dir = runs.join(&self.id);
        std::fs::create_dir_all(&dir).map_err(|e| PipelineError::io("create", &dir, e))?;
        let text = serde_json::to_vec_pretty(self).map_err(|source| PipelineError::State {
            path: dir.join(STATE_FILE),
            source,
        })?;
        write_atomic(&dir.join(STATE_FILE), &text)
    }
}

pub const STATE_FILE: &str = "state.json";

/// Write `bytes` to `path` so that a reader sees the old contents or the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| PipelineError::io("create", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| PipelineError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| PipelineError::io("rename into place", path, e))?;
    if let Some(dir) = path.parent() {
        // The rename itself survives a power loss once the directory is synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Every nightly run recorded under `runs/`, oldest first.
pub fn runs(runs_dir: &Path) -> Result<Vec<RunState>> {
    let entries = match std::fs::read_dir(runs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(PipelineError::io("read", runs_dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_nightly = name.to_str().is_some_and(|n| n.starts_with("nightly-"));
        let state = entry.path().join(STATE_FILE);
        if is_nightly && state.is_file() {
            match RunState::read(&state) {
                Ok(s) => out.push(s),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable run state"),
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The work of each stage; pai's commands behind it. An error leaves the run to be resumed.
pub trait Stages {
    type Error: std::fmt::Display;
    fn ingest(&mut self, run: &RunState) -> std::result::Result<Ingested, Self::Error>;
    /// `train_run` is the same id every time this night's training is taken up again, so that a
    /// stopped training resumes from its checkpoint, and one that had finished is found, not redone.
    fn train(
        &mut self,
        run: &RunState,
        train_run: &str,
    ) -> std::result::Result<Trained, Self::Error>;
    fn eval(
        &mut self,
        run: &RunState,
        trained: &Trained,
    ) -> std::result::Result<Evaluated, Self::Error>;
    /// Serve the candidate (called only when it passed and promotion is on); idempotent.
    fn promote(
        &mut self,
        run: &RunState,
        trained: &Trained,
        evaluated: &Evaluated,
    ) -> std::result::Result<(), Self::Error>;
    /// Write the report pages; their path.
    fn report(&mut self, run: &RunState) -> std::result::Result<PathBuf, Self::Error>;
}

/// What a nightly invocation is asked to do.
#[derive(Debug, Clone)]
pub struct NightlyOptions {
    pub runs_dir: PathBuf,
    pub day: String,
    pub adapter: String,
    pub min_new_tokens: usize,
    pub promote: bool,
}

/// A stage failed; the state says which, and the next invocation resumes there.
#[derive(Debug)]
pub struct StageFailed {
    pub state: RunState,
    pub stage: Stage,
    pub message: String,
}

/// Run (or resume) tonight's run to its end. `Ok(Ok(state))`: the night ended (its `outcome` says
/// how); `Ok(Err(failed))`: a stage failed and the run waits to be resumed; `Err`: the run could not
/// start or record itself (the lock is held, the state cannot be written).
pub fn run_nightly<S: Stages>(
    opts: &NightlyOptions,
    stages: &mut S,
    mut progress: impl FnMut(&RunState, Stage, &str),
) -> Result<std::result::Result<RunState, StageFailed>> {
    let _lock = NightlyLock::acquire(&opts.runs_dir.join("nightly.lock"))?;
    let mut state = take_up_or_start(opts)?;
    state.write(&opts.runs_dir)?;

    for stage in Stage::ALL {
        if state.outcome.is_some() && stage != Stage::Report {
            continue;
        }
        if state.record(stage).is_some() {
            continue;
        }
        progress(&state, stage, "start");
        let started = chrono::Local::now();
        let clock = std::time::Instant::now();
        let result: std::result::Result<serde_json::Value, String> =
            run_stage(opts, &mut state, stages, stage);
        match result {
            Ok(value) => {
                state.stages.push(StageRecord {
                    stage,
                    started: started.to_rfc3339(),
                    seconds: clock.elapsed().as_secs_f64(),
                    result: value,
                });
                state.error = None;
                state.write(&opts.runs_dir)?;
                progress(&state, stage, "done");
            }
            Err(message) => {
                state.error = Some(format!("{}: {message}", stage.as_str()));
                state.write(&opts.runs_dir)?;
                return Ok(Err(StageFailed {
                    state,
                    stage,
                    message,
                }));
            }
        }
    }
    state.finished = Some(chrono::Local::now().to_rfc3339());
    state.write(&opts.runs_dir)?;
    Ok(Ok(state))
}

/// One stage's work and what it means for the outcome.
fn run_stage<S: Stages>(
    opts: &NightlyOptions,
    state: &mut RunState,
    stages: &mut S,
    stage: Stage,
) -> std::result::Result<serde_json::Value, String> {
    match stage {
        Stage::Ingest => {
            let ingested = stages.ingest(state).map_err(|e| e.to_string())?;
            if ingested.untrained_tokens == 0 {
                state.outcome = Some(Outcome::NothingNew);
            } else if ingested.untrained_tokens < opts.min_new_tokens {
                state.outcome = Some(Outcome::NotEnoughData {
                    tokens: ingested.untrained_tokens,
                    needed: opts.min_new_tokens,
                });
            }
            Ok(to_json(&ingested))
        }
        Stage::Train => {
            let train_run = format!("{}-train", state.id);
            let trained = stages.train(state, &train_run).map_err(|e| e.to_string())?;
            Ok(to_json(&trained))
        }
        Stage::Eval => {
            let trained: Trained = state
                .result(Stage::Train)
                .ok_or("the training stage recorded no candidate")?;
            let evaluated = stages.eval(state, &trained).map_err(|e| e.to_string())?;
            Ok(to_json(&evaluated))
        }
        Stage::Gate => {
            let trained: Trained = state
                .result(Stage::Train)
                .ok_or("the training stage recorded no candidate")?;
            let evaluated: Evaluated = state
                .result(Stage::Eval)
                .ok_or("the eval stage recorded no decision")?;
            let version = trained.version.clone();
            let outcome = if !evaluated.pass {
                Outcome::Rejected {
                    version,
                    reasons: evaluated.reasons.clone(),
                }
            } else if opts.promote {
                stages
                    .promote(state, &trained, &evaluated)
                    .map_err(|e| e.to_string())?;
                Outcome::Promoted { version }
            } else {
                Outcome::Passed { version }
            };
            let value = to_json(&outcome);
            state.outcome = Some(outcome);
            Ok(value)
        }
        Stage::Report => {
            let page = stages.report(state).map_err(|e| e.to_string())?;
            Ok(serde_json::json!({ "page": page }))
        }
    }
}

/// The unfinished run for tonight's day, taken up again; else a new run (an unfinished run for
/// another day is marked abandoned: its day's data is in the dataset and the new run learns from it).
fn take_up_or_start(opts: &NightlyOptions) -> Result<RunState> {
    let now = chrono::Local::now();
    let id = format!("nightly-{}", now.format("%Y%m%d-%H%M%S"));
    for mut old in runs(&opts.runs_dir)?.into_iter().rev() {
        if old.finished.is_some() {
            continue;
        }
        if old.day == opts.day && old.adapter == opts.adapter {
            old.resumed += 1;
            tracing::info!(run = %old.id, "taking up an unfinished run");
            return Ok(old);
        }
        // Its report may be all that is missing: its outcome stands.
        old.outcome
            .get_or_insert(Outcome::Abandoned { by: id.clone() });
        old.finished = Some(now.to_rfc3339());
        old.write(&opts.runs_dir)?;
    }
    // Claimed by creating its directory, so two runs started in the same second differ.
    let mut chosen = id.clone();
    for n in 2..1000 {
        if !opts.runs_dir.join(&chosen).exists() {
            break;
        }
        chosen = format!("{id}-{n}");
    }
    Ok(RunState {
        id: chosen,
        day: opts.day.clone(),
        adapter: opts.adapter.clone(),
        started: now.to_rfc3339(),
        finished: None,
        resumed: 0,
        stages: Vec::new(),
        outcome: None,
        error: None,
    })
}

/// A stage result as JSON (these types always serialize).
fn to_json(value: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}
