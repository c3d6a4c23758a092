//! The loop: it learns, it stops and resumes to the same weights, it refuses bad settings up front,
//! and what it writes (metrics, the PEFT directory) reads back.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::GgmlDType;
use pai_datasets::{Conversation, Example, Kind, Split};
use pai_model::testing::TinySpec;
use pai_model::{Adapter, AdapterStack, BaseModel};
use pai_trainers::{
    eval_rows, fit_to_rows, holdout_loss, train, DocEncoder, Packer, RetentionGuard, StopReason,
    TrainConfig, TrainDoc, TrainJob,
};

use crate::{max_abs_diff, tiny};

/// A small corpus of repeated patterns the random model cannot predict before training.
fn corpus() -> Vec<TrainDoc> {
    (0..24u32)
        .map(|d| TrainDoc::plain((0..20).map(|i| 10 + (d % 4) * 30 + (i * 3) % 17).collect()))
        .collect()
}

fn config() -> TrainConfig {
    TrainConfig {
        // Dropout on, so resuming also has to redraw the same masks.
        dropout: 0.05,
        r: 8,
        alpha: 16.0,
        learning_rate: 5e-3,
        warmup_steps: 2,
        seq_len: 32,
        batch_tokens: 64,
        max_steps: Some(12),
        eval_every: 4,
        eval_tokens: 256,
        checkpoint_every: 5,
        ..Default::default()
    }
}

fn job<'a>(
    base: &'a BaseModel,
    cfg: &'a TrainConfig,
    docs: &'a [TrainDoc],
    run_dir: &'a std::path::Path,
    resume: bool,
    stop: &'a AtomicBool,
) -> TrainJob<'a> {
    TrainJob {
        model: &base.model,
        config: cfg,
        train: docs,
        holdout: docs,
        retention: Vec::new(),
        init: None,
        base_name: Some("tiny".into()),
        run_dir,
        resume,
        stop,
        pad: 0,
    }
}

fn weights(adapter: &Adapter) -> Vec<candle_core::Tensor> {
    adapter
        .iter()
        .flat_map(|(_, w)| [w.a.clone(), w.b.clone()])
        .collect()
}

#[test]
fn training_lowers_the_loss_and_writes_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = tiny(&dir.path().join("m"), GgmlDType::Q8_0, TinySpec::default());
    let docs = corpus();
    let cfg = TrainConfig {
        max_steps: Some(40),
        eval_every: 10,
        ..config()
    };
    let stop = AtomicBool::new(false);
    let run = dir.path().join("run");
    let mut seen = 0;
    let out = train(&job(&base, &cfg, &docs, &run, false, &stop), &mut |_| {
        seen += 1
    })
    .expect("train");
    assert_eq!(out.stop, StopReason::Finished);
    assert_eq!((out.steps, seen), (40, 40));
    let (before, after) = (
        out.initial_holdout.expect("holdout"),
        out.best_holdout.expect("best"),
    );
    assert!(after < 0.5 * before, "holdout loss {before} → {after}");
    // The shipped adapter is the best one and gives that loss.
    let rows = eval_rows(&docs, cfg.seq_len, cfg.eval_tokens, 0).expect("rows");
    let l = holdout_loss(&base.model, Some(&out.adapter), &rows)
        .expect("loss")
        .expect("some");
    assert!((l - after).abs() < 1e-4, "{l} vs {after}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 41, "the base's holdout line and one a step");
    assert!(lines[40]["holdout_loss"].as_f64().is_some());
    assert!(lines[5]["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0));

    // Saved as PEFT and loaded back, it computes the same.
    let peft = dir.path().join("peft");
    std::fs::create_dir_all(&peft).expect("mkdir");
    out.adapter.save_peft(&peft).expect("save");
    let loaded = base.load_adapter(&peft).expect("load");
    let ids = candle_core::Tensor::new(&[[5u32, 17, 33, 40]], base.model.device()).expect("ids");
    let run_with = |a: &Adapter| {
        let list = [a];
        let mut cache = base.model.new_cache(8);
        base.model
            .forward(&ids, &mut cache, &AdapterStack::new(&list))
            .expect("forward")
    };
    assert!(max_abs_diff(&run_with(&out.adapter), &run_with(&loaded)) < 1e-5);
}

#[test]
fn a_stopped_run_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = tiny(&dir.path().join("m"), GgmlDType::Q8_0, TinySpec::default());
    let docs = corpus();
    let cfg = config();

    let never = AtomicBool::new(false);
    let straight = train(
        &job(&base, &cfg, &docs, &dir.path().join("a"), false, &never),
        &mut |_| {},
    )
    .expect("uninterrupted");

    // Stopped after step 7 (between checkpoints at 5 and 10), then resumed.
    let stop = AtomicBool::new(false);
    let run = dir.path().join("b");
    let first = train(&job(&base, &cfg, &docs, &run, false, &stop), &mut |m| {
        if m.step == 7 {
            stop.store(true, Ordering::Relaxed);
        }
    })
    .expect("first part");
    assert_eq!((first.stop, first.steps), (StopReason::Interrupted, 7));
    let resumed_at = std::cell::Cell::new(0);
    let second = train(&job(&base, &cfg, &docs, &run, true, &never), &mut |m| {
        if resumed_at.get() == 0 {
            resumed_at.set(m.step);
        }
    })
    .expect("resumed");
    assert_eq!(resumed_at.get(), 8, "the resumed run starts after the stop");
    assert_eq!(second.steps, 12);
    for (a, b) in weights(&straight.adapter)
        .iter()
        .zip(weights(&second.adapter))
    {
        assert_eq!(max_abs_diff(a, &b), 0.0, "resumed weights differ");
    }
    assert_eq!(straight.best_holdout, second.best_holdout);
    // The metrics hold each step once.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 13);

    // A changed configuration is refused.
    let other = TrainConfig {
        learning_rate: 1e-3,
        ..cfg.clone()
    };
    let err = train(&job(&base, &other, &docs, &run, true, &never), &mut |_| {})
        .expect_err("config changed");
    assert!(
        err.to_string().contains("different [train] configuration"),
        "{err}"
    );
}

#[test]
fn bad_settings_fail_before_any_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = tiny(&dir.path().join("m"), GgmlDType::Q8_0, TinySpec::default());
    let docs = corpus();
    let stop = AtomicBool::new(false);
    let run = dir.path().join("run");
    let cases = [
        (TrainConfig { r: 0, ..config() }, "train.r = 0"),
        (
            TrainConfig {
                seq_len: 4096,
                batch_tokens: 4096,
                ..config()
            },
            "train.seq_len = 4096",
        ),
        (
            TrainConfig {
                target_modules: vec!["qkv".into()],
                ..config()
            },
            "`qkv` is not a projection",
        ),
    ];
    for (cfg, want) in cases {
        let err = train(&job(&base, &cfg, &docs, &run, false, &stop), &mut |_| {})
            .expect_err(want)
            .to_string();
        assert!(err.contains(want), "{err}");
    }
    let err = train(&job(&base, &config(), &[], &run, false, &stop), &mut |_| {})
        .expect_err("empty")
        .to_string();
    assert!(err.contains("nothing to train on"), "{err}");
    assert!(!run.join("metrics.jsonl").exists(), "no work was done");
}

/// A capped evaluation samples the whole holdout (every day, every source), not its first documents,
/// and is the same every time.
#[test]
fn capped_evaluation_samples_the_whole_holdout() {
    let docs: Vec<TrainDoc> = (0..40u32)
        .map(|d| TrainDoc::plain(vec![if d < 20 { 1 } else { 2 }; 8]))
        .collect();
    let rows = eval_rows(&docs, 16, 64, 0).expect("rows");
    assert_eq!(rows.len(), 4);
    let ids: Vec<u32> = rows.iter().flat_map(|r| r.row.ids.clone()).collect();
    assert!(ids.contains(&1) && ids.contains(&2), "{ids:?}");
    assert_eq!(rows, eval_rows(&docs, 16, 64, 0).expect("rows"));
}

/// A run stopped by its time budget before any scheduled holdout evaluation still ships the weights
/// it reached (judged on the holdout at the stop), not the all-zero adapter it started from. Time
/// spent between steps (here 300 ms in the observer after each) must not end the run behind the
/// last step's back, before it was judged: whenever the budget runs out, the last step is evaluated.
#[test]
fn a_time_budget_stop_ships_the_weights_it_reached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = tiny(&dir.path().join("m"), GgmlDType::Q8_0, TinySpec::default());
    let docs = corpus();
    let cfg = TrainConfig {
        max_steps: Some(1_000_000),
        eval_every: 1_000_000,
        checkpoint_every: 1_000_000,
        time_budget_s: Some(2),
        ..config()
    };
    let stop = AtomicBool::new(false);
    let run = dir.path().join("run");
    let between_steps = std::time::Duration::from_millis(300);
    let out = train(&job(&base, &cfg, &docs, &run, false, &stop), &mut |_| {
        std::thread::sleep(between_steps)
    })
    .expect("train");
    assert_eq!(out.stop, StopReason::TimeBudget);
    assert!(out.steps > 0);
    assert_eq!(out.best_step, out.steps, "{out:?}");
    let (before, best) = (
        out.initial_holdout.expect("holdout"),
        out.best_holdout.expect("best"),
    );
    assert!(best < before, "{before} → {best}");
    let b_norm: f32 = out
        .adapter
        .iter()
        .map(|(_, w)| {
            w.b.sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f32>())
                .unwrap_or(0.0)
        })
        .sum();
    assert!(b_norm > 0.0, "the shipped adapter is not the initial one");
}

/// With retention guards (here: text the corpus does not teach, split in two guards as pai-train
/// hands in the gate's prose and code suites), a checkpoint that raises either guard's loss past
/// its limit is never shipped, however good its holdout loss; with generous bounds the same run
/// ships its best holdout. Each limit is measured against its guard's reference: against an
/// incumbent that already forgot, the same strict limits let that much through.
#[test]
fn a_checkpoint_that_forgets_a_guards_text_is_not_shipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = tiny(&dir.path().join("m"), GgmlDType::Q8_0, TinySpec::default());
    let docs = corpus();
    // Text the base model knows: its own greedy continuations, which training on the corpus can only
    // make less likely.
    let retention: Vec<TrainDoc> = (0..6u32)
        .map(|d| {
            let mut ids = vec![150 + d * 13];
            let mut cache = base.model.new_cache(32);
            for _ in 0..23 {
                let last = ids.last().copied().unwrap_or(0);
                let t = candle_core::Tensor::new(&[[last]], base.model.device()).expect("ids");
                let logits = base
                    .model
                    .forward_last(&t, &mut cache, &AdapterStack::new(&[]))
                    .expect("forward");
                let next = logits
                    .argmax(candle_core::D::Minus1)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<u32>())
                    .expect("argmax")[0];
                ids.push(next);
            }
            TrainDoc::plain(ids)
        })
        .collect();
    let stop = AtomicBool::new(false);
    // The guards' scores: each text's loss (pai-train hands in the eval gate's scorer).
    let (prose, code) = retention.split_at(2);
    let prose_rows = eval_rows(prose, 32, 1 << 20, 0).expect("prose rows");
    let code_rows = eval_rows(code, 32, 1 << 20, 0).expect("code rows");
    let prose_score = |adapter: Option<&Adapter>| -> Result<f64, pai_trainers::BoxError> {
        Ok(holdout_loss(&base.model, adapter, &prose_rows)?.expect("counted tokens"))
    };
    let code_score = |adapter: Option<&Adapter>| -> Result<f64, pai_trainers::BoxError> {
        Ok(holdout_loss(&base.model, adapter, &code_rows)?.expect("counted tokens"))
    };
    let run_with = |prose_rise: f64, code_rise: f64, reference: Option<&Adapter>, name: &str| {
        let cfg = TrainConfig {
            max_steps: Some(24),
            eval_every: 4,
            learning_rate: 2e-2,
            ..config()
        };
        let run = dir.path().join(name);
        let job = TrainJob {
            retention: vec![
                RetentionGuard {
                    name: "retention".into(),
                    score: &prose_score,
                    reference,
                    max_rise: prose_rise,
                },
                RetentionGuard {
                    name: "retention-code".into(),
                    score: &code_score,
                    reference,
                    max_rise: code_rise,
                },
            ],
            ..job(&base, &cfg, &docs, &run, false, &stop)
        };
        let out = train(&job, &mut |_| {}).expect("train");
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
        let code_losses: Vec<f64> = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["retention_loss"]["retention"].is_f64())
            .filter_map(|v| v["retention_loss"]["retention-code"].as_f64())
            .collect();
        (out, code_losses)
    };

    let (loose, losses) = run_with(100.0, 100.0, None, "loose");
    let base_r = loose.reference_retention["retention-code"];
    assert_eq!(losses.len(), 6, "both guards' losses at every evaluation");
    // The case the guard exists for: the best holdout checkpoint forgot.
    let loose_r = loose.best_retention["retention-code"];
    assert!(
        loose_r > base_r,
        "best checkpoint's code retention {loose_r} vs base {base_r}: {losses:?}"
    );

    // Strict on the code guard only: whatever ships has a code loss at or below the base's, and the
    // checkpoints that forgot were passed over, whatever the loose prose guard says.
    let (strict, _) = run_with(100.0, 0.0, None, "strict");
    match (
        strict.best_retention.get("retention-code"),
        strict.best_holdout,
    ) {
        (Some(&r), Some(_)) => assert!(r <= base_r + 1e-9, "{r} vs base {base_r}"),
        (None, None) => {} // every checkpoint forgot: the starting weights ship
        other => panic!("best retention and holdout disagree: {other:?}"),
    }
    assert_ne!(
        strict.best_step, loose.best_step,
        "the strict run shipped the checkpoint the code guard should have refused"
    );

    // Against the loose run's adapter as the incumbent, each reference is its loss there, and
    // strict limits now let the loose run's best checkpoint through (a hair above 0 for rounding).
    let (against, _) = run_with(1e-6, 1e-6, Some(&loose.adapter), "against-incumbent");
    for (name, reference) in &against.reference_retention {
        let loose_loss = loose.best_retention[name];
        assert!(
            (reference - loose_loss).abs() < 1e-4,
            "{name}: the reference is the incumbent's loss: {reference} vs {loose_loss}"
        );
    }
    assert_eq!(against.reference_retention.len(), 2);
    assert_eq!(against.best_step, loose.best_step);
}

#[test]
fn a_conversation_trains_only_its_replies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = tiny(dir.path(), GgmlDType::F32, TinySpec::default());
    let conversation = Conversation::parse(
        r#"{"messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer kept as context", "weight": 0},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "the answer to learn"}]}"#,
    )
    .expect("conversation");
    let example = Example {
        id: "c1".into(),
        day: "2026-12-02".into(),
        source: "chats".into(),
        path: "a.jsonl".into(),
        kind: Kind::Chat,
        context: "a.jsonl:1".into(),
        text: conversation.to_text(),
        n_tokens: 40,
        split: Split::Train,
        redactions: 0,
        private: false,
        fim: None,
        minhash: None,
    };
    let encoder = DocEncoder::new(&base.tokenizer, base.chat_template().ok());
    let doc = encoder.encode(&example).expect("encode");
    // Packed, the counted targets are exactly the second reply and the markup closing its turn.
    let docs = [doc.clone()];
    let mut packer = Packer::new(&docs, doc.ids.len() + 4, 0, false, 0).expect("packer");
    let row = packer.next_row(true).expect("row");
    let learnt: Vec<u32> = row
        .targets
        .iter()
        .zip(&row.weights)
        .filter(|(_, w)| **w != 0.0)
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(
        base.tokenizer.decode(&learnt, false).expect("decode"),
        "the answer to learn<|im_end|>\n"
    );
    // Cut to a row that ends inside the reply, what remains of it still trains.
    let cut = fit_to_rows(&docs, doc.completion_start + 3);
    assert_eq!(cut.len(), 1);
    assert_eq!(
        (1..cut[0].ids.len()).filter(|&k| cut[0].counts(k)).count(),
        3
    );
    // A row that ends before the reply trains nothing from this conversation.
    assert!(fit_to_rows(&docs, doc.completion_start).is_empty());
    // A model without a chat template cannot render it: an error naming the example.
    let err = DocEncoder::new(&base.tokenizer, None)
        .encode(&example)
        .expect_err("no template");
    assert!(
        err.to_string().contains("c1") && err.to_string().contains("chat template"),
        "{err}"
    );
}
