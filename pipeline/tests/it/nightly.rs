//! The nightly run's bookkeeping: stages in order, outcomes, resume after a kill or a failure at any
//! stage, the lock, and abandoned runs.

use std::path::{Path, PathBuf};

use pai_pipeline::nightly::{runs, STATE_FILE};
use pai_pipeline::{
    run_nightly, Evaluated, Ingested, NightlyOptions, Outcome, PipelineError, RunState, Stage,
    Stages, Trained,
};

/// Stages that do nothing but say what they were asked; `kill_at` panics inside a stage (what a
/// SIGKILL leaves behind: no record of it, no error), `fail_at` returns an error.
#[derive(Default)]
struct Recorder {
    calls: Vec<String>,
    untrained: usize,
    pass: bool,
    kill_at: Option<Stage>,
    fail_at: Option<Stage>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            untrained: 10_000,
            pass: true,
            ..Default::default()
        }
    }

    fn enter(&mut self, stage: Stage, what: String) -> Result<(), String> {
        self.calls.push(what);
        if self.kill_at == Some(stage) {
            panic!("killed in {}", stage.as_str());
        }
        if self.fail_at == Some(stage) {
            return Err(format!("{} broke", stage.as_str()));
        }
        Ok(())
    }
}

impl Stages for Recorder {
    type Error = String;
    fn ingest(&mut self, _: &RunState) -> Result<Ingested, String> {
        self.enter(Stage::Ingest, "ingest".into())?;
        Ok(Ingested {
            new_examples: 3,
            untrained_tokens: self.untrained,
        })
    }
    fn train(&mut self, _: &RunState, train_run: &str) -> Result<Trained, String> {
        self.enter(Stage::Train, format!("train {train_run}"))?;
        Ok(Trained {
            run: train_run.into(),
            version: "v1".into(),
            stop: "completed".into(),
            steps: 5,
            best_step: Some(5),
        })
    }
    fn eval(&mut self, _: &RunState, t: &Trained) -> Result<Evaluated, String> {
        self.enter(Stage::Eval, format!("eval {}", t.version))?;
        Ok(Evaluated {
            run: "eval-1".into(),
            incumbent: "base".into(),
            pass: self.pass,
            reasons: vec![if self.pass { "better" } else { "worse" }.into()],
        })
    }
    fn promote(&mut self, _: &RunState, t: &Trained, _: &Evaluated) -> Result<(), String> {
        self.enter(Stage::Gate, format!("promote {}", t.version))
    }
    fn report(&mut self, _: &RunState) -> Result<PathBuf, String> {
        self.enter(Stage::Report, "report".into())?;
        Ok(PathBuf::from("reports/index.html"))
    }
}

fn opts(runs: &Path, day: &str) -> NightlyOptions {
    NightlyOptions {
        runs_dir: runs.to_path_buf(),
        day: day.into(),
        adapter: "personal".into(),
        min_new_tokens: 2000,
        promote: true,
    }
}

fn night(o: &NightlyOptions, r: &mut Recorder) -> RunState {
    run_nightly(o, r, |_, _, _| {})
        .expect("the run records itself")
        .unwrap_or_else(|f| panic!("{} failed: {}", f.stage.as_str(), f.message))
}

#[test]
fn a_night_runs_every_stage_in_order_and_records_each() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), "2026-12-02");
    let mut r = Recorder::new();
    let state = night(&o, &mut r);
    let train_run = format!("{}-train", state.id);
    assert_eq!(
        r.calls,
        [
            "ingest".to_string(),
            format!("train {train_run}"),
            "eval v1".into(),
            "promote v1".into(),
            "report".into()
        ]
    );
    assert_eq!(
        state.outcome,
        Some(Outcome::Promoted {
            version: "v1".into()
        })
    );
    assert!(state.finished.is_some());
    let on_disk = RunState::read(&dir.path().join(&state.id).join(STATE_FILE)).unwrap();
    assert_eq!(on_disk, state);
    assert_eq!(
        on_disk.stages.iter().map(|s| s.stage).collect::<Vec<_>>(),
        Stage::ALL.to_vec()
    );
    let trained: Trained = on_disk.result(Stage::Train).unwrap();
    assert_eq!(trained.run, train_run);
    assert!(!dir.path().join(&state.id).join("state.tmp").exists());
}

#[test]
fn nothing_new_or_too_little_trains_nothing_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Recorder {
        untrained: 0,
        ..Recorder::new()
    };
    let state = night(&opts(dir.path(), "2026-12-02"), &mut r);
    assert_eq!(state.outcome, Some(Outcome::NothingNew));
    assert_eq!(r.calls, ["ingest", "report"]);

    let mut r = Recorder {
        untrained: 500,
        ..Recorder::new()
    };
    let state = night(&opts(dir.path(), "2026-12-03"), &mut r);
    assert_eq!(
        state.outcome,
        Some(Outcome::NotEnoughData {
            tokens: 500,
            needed: 2000
        })
    );
    assert!(state.outcome.unwrap().describe().contains("min_new_tokens"));
    assert_eq!(r.calls, ["ingest", "report"]);
}

#[test]
fn a_rejected_candidate_is_not_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Recorder {
        pass: false,
        ..Recorder::new()
    };
    let state = night(&opts(dir.path(), "2026-12-02"), &mut r);
    assert!(
        matches!(state.outcome, Some(Outcome::Rejected { ref version, .. }) if version == "v1")
    );
    assert!(
        !r.calls.iter().any(|c| c.starts_with("promote")),
        "{:?}",
        r.calls
    );
    let mut o = opts(dir.path(), "2026-12-03");
    o.promote = false;
    let state = night(&o, &mut Recorder::new());
    assert_eq!(
        state.outcome,
        Some(Outcome::Passed {
            version: "v1".into()
        })
    );
}

/// Killed inside each stage in turn (the state has no record of it), the next invocation takes the
/// same run up at that stage: the stages before are not run again, the training run id is the same.
#[test]
fn a_run_killed_in_any_stage_is_taken_up_where_it_stopped() {
    for (i, stage) in Stage::ALL.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path(), "2026-12-02");
        let mut killed = Recorder {
            kill_at: Some(stage),
            ..Recorder::new()
        };
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = run_nightly(&o, &mut killed, |_, _, _| {});
        }));
        assert!(panicked.is_err());
        let left = runs(dir.path()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(
            left[0].stages.len(),
            i,
            "{stage:?}: stages finished before the kill"
        );
        assert!(left[0].finished.is_none());
        assert_eq!(
            left[0].outcome.is_some(),
            i == 4,
            "the outcome is known once the gate ran"
        );

        let mut again = Recorder::new();
        let state = night(&o, &mut again);
        assert_eq!(state.id, left[0].id, "the same run");
        assert_eq!(state.resumed, 1);
        assert_eq!(
            again.calls.len(),
            5 - i,
            "{stage:?}: only the stages from the killed one on: {:?}",
            again.calls
        );
        let train_run = format!("{}-train", state.id);
        if i <= 1 {
            assert!(again.calls.contains(&format!("train {train_run}")));
        }
        assert_eq!(
            state.outcome,
            Some(Outcome::Promoted {
                version: "v1".into()
            })
        );
        assert_eq!(runs(dir.path()).unwrap().len(), 1);
    }
}

#[test]
fn a_failed_stage_is_recorded_and_retried_by_the_next_invocation() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(dir.path(), "2026-12-02");
    let mut broken = Recorder {
        fail_at: Some(Stage::Eval),
        ..Recorder::new()
    };
    let failed = run_nightly(&o, &mut broken, |_, _, _| {})
        .unwrap()
        .unwrap_err();
    assert_eq!(failed.stage, Stage::Eval);
    assert_eq!(failed.state.error.as_deref(), Some("eval: eval broke"));
    let state = night(&o, &mut Recorder::new());
    assert_eq!(state.id, failed.state.id);
    assert_eq!(state.error, None);
    assert!(state.outcome.is_some());
}

#[test]
fn a_second_run_while_one_holds_the_lock_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _held = pai_pipeline::lock::NightlyLock::acquire(&dir.path().join("nightly.lock")).unwrap();
    let e = run_nightly(
        &opts(dir.path(), "2026-12-02"),
        &mut Recorder::new(),
        |_, _, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, PipelineError::Locked { .. }), "{e}");
}

#[test]
fn an_unfinished_run_for_another_day_is_abandoned_not_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let mut killed = Recorder {
        kill_at: Some(Stage::Train),
        ..Recorder::new()
    };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = run_nightly(&opts(dir.path(), "2026-12-01"), &mut killed, |_, _, _| {});
    }));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let state = night(&opts(dir.path(), "2026-12-02"), &mut Recorder::new());
    let all = runs(dir.path()).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        all[0].outcome,
        Some(Outcome::Abandoned {
            by: state.id.clone()
        })
    );
    assert_eq!(state.resumed, 0);
}
