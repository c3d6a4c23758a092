//! The training loop: packed micro-batches through the frozen quantized base with trainable LoRA
//! pairs, weighted cross-entropy, gradient accumulation and clipping, AdamW on a warm-up + cosine
//! schedule, holdout loss with early stopping, metrics as JSON lines, and checkpoints (every N steps,
//! on a stop request, at a time budget) from which `resume` continues to the same result.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use pai_model::{Adapter, AdapterStack, BackwardCopyKind, Model};

use crate::checkpoint::{Checkpoint, RunState};
use crate::config::TrainConfig;
use crate::data::{fit_to_rows, Packer, Row, TrainDoc};
use crate::error::{BoxError, Result, TrainError};
use crate::optim::{clip_grad_norm, learning_rate, AdamW, Grads};
use crate::params::LoraParams;
use crate::step::{head_loss, loss_and_grads};

/// What a run trains on and where it keeps its state.
pub struct TrainJob<'a> {
    pub model: &'a Model,
    pub config: &'a TrainConfig,
    pub train: &'a [TrainDoc],
    pub holdout: &'a [TrainDoc],
    /// General text and code the base model already knows, measured at every evaluation as the
    /// eval gate's retention guards measure them; no checkpoint any of them would fail is shipped.
    /// Empty: no guard.
    pub retention: Vec<RetentionGuard<'a>>,
    /// The adapter to continue from (`continue` strategy); `None` starts fresh from the base.
    pub init: Option<&'a Adapter>,
    /// Recorded as `base_model_name_or_path`.
    pub base_name: Option<String>,
    /// `checkpoint/` and `metrics.jsonl` live here.
    pub run_dir: &'a Path,
    /// Continue from the run's checkpoint (an error if it has none or its config differs).
    pub resume: bool,
    /// Set (e.g. by Ctrl-C) to stop at the next step boundary with a checkpoint.
    pub stop: &'a AtomicBool,
    /// The token that pads the last rows of an evaluation.
    pub pad: u32,
}

/// A retention loss: general text the base knows, scored under an adapter (`None`: the base alone).
pub type RetentionScore<'a> = dyn Fn(Option<&Adapter>) -> std::result::Result<f64, BoxError> + 'a;

/// The eval gate's retention guard, as training applies it. `score` is the gate's own measurement
/// (pai-train hands in its retention suite scored by pai-evals' scorer, on the forward the gate
/// uses), so a checkpoint the trainer keeps is one the guard passes: on the default model the
/// training forward's f32 activations and serving's int8 ones differ by up to 0.07 nats on a
/// paragraph, and by 0.007 on the suite's mean, a third of the guard's limit.
pub struct RetentionGuard<'a> {
    /// The guard suite's name (`retention`, `retention-code`): the key of its losses in metrics.
    pub name: String,
    /// The loss under an adapter, in nats per token (the gate's: each item's mean, averaged).
    pub score: &'a RetentionScore<'a>,
    /// What a checkpoint is compared with: the incumbent the gate will compare the candidate with,
    /// or `None` for the base.
    pub reference: Option<&'a Adapter>,
    /// The most a checkpoint's loss may exceed the reference's, in nats per token: the guard suite's
    /// `max_regression` (`train.max_retention_rise` overrides it).
    pub max_rise: f64,
}

/// Retention losses by guard name, in nats per token.
pub type RetentionLosses = BTreeMap<String, f64>;

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Finished,
    EarlyStopped,
    TimeBudget,
    Interrupted,
}

/// One line of `metrics.jsonl`, and what the progress display shows.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Loss-counted tokens so far, and tokens (all positions) per second over this step.
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub epoch: f64,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holdout_loss: Option<f64>,
    /// Loss on each guard's retention text, measured with the holdout.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub retention_loss: RetentionLosses,
}

/// The result of a run.
#[derive(Debug)]
pub struct TrainOutcome {
    /// The adapter at the best holdout loss (the last one when there is no holdout).
    pub adapter: Adapter,
    pub best_step: usize,
    pub steps: usize,
    pub total_steps: usize,
    pub stop: StopReason,
    pub initial_holdout: Option<f64>,
    pub best_holdout: Option<f64>,
    /// Each retention guard's loss (mean over items of each one's mean loss per token) under the
    /// reference (incumbent or base), and under the shipped adapter.
    pub reference_retention: RetentionLosses,
    pub best_retention: RetentionLosses,
    pub final_loss: Option<f64>,
    pub tokens: usize,
    pub elapsed_s: f64,
    pub trainable_params: usize,
}

/// Mean weighted loss of fixed holdout rows under `adapter` (no gradient).
pub fn holdout_loss(model: &Model, adapter: Option<&Adapter>, rows: &[Row]) -> Result<Option<f64>> {
    let counted: usize = rows.iter().map(Row::counted).sum();
    if counted == 0 {
        return Ok(None);
    }
    let list: Vec<&Adapter> = adapter.into_iter().collect();
    let stack = AdapterStack::new(&list);
    let mut total = 0f64;
    for row in rows {
        let loss = batch_loss(
            model,
            std::slice::from_ref(row),
            &stack,
            1.0 / counted as f32,
        )?;
        total += f64::from(loss.to_scalar::<f32>()?);
    }
    Ok(Some(total))
}

/// Σ weighted token losses of `rows`, each weight multiplied by `norm`.
fn batch_loss(model: &Model, rows: &[Row], adapters: &AdapterStack, norm: f32) -> Result<Tensor> {
    let packed_rows: Vec<_> = rows.iter().map(|r| r.row.clone()).collect();
    let packed = model.pack(&packed_rows)?;
    head_loss(model, &model.forward_packed(&packed, adapters)?, rows, norm)
}

/// Fixed evaluation rows: up to `tokens` of the holdout documents, drawn in a fixed shuffled order so
/// that a capped evaluation samples every day and source rather than the first ones.
pub fn eval_rows(docs: &[TrainDoc], seq_len: usize, tokens: usize, pad: u32) -> Result<Vec<Row>> {
    if docs.is_empty() || tokens == 0 {
        return Ok(Vec::new());
    }
    let docs = fit_to_rows(docs, seq_len);
    if docs.is_empty() {
        return Ok(Vec::new());
    }
    const EVAL_ORDER_SEED: u64 = 0x6576_616c;
    let mut packer = Packer::new(&docs, seq_len, EVAL_ORDER_SEED, true, pad)?;
    let mut rows = Vec::new();
    while rows.len() * seq_len < tokens {
        match packer.next_row(true) {
            Some(r) => rows.push(r),
            None => break,
        }
    }
    Ok(rows)
}

fn snapshot(params: &LoraParams) -> Result<HashMap<String, Tensor>> {
    params
        .named_vars()
        .map(|(k, v)| Ok((k, v.as_tensor().detach().copy()?)))
        .collect()
}

fn restore(params: &LoraParams, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    for (key, var) in params.named_vars() {
        let t = tensors.get(&key).ok_or_else(|| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("has no tensor `{key}`"),
        })?;
        if t.dims() != var.dims() {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("`{key}` has shape {:?}, the run {:?}", t.dims(), var.dims()),
            });
        }
        var.set(t)?;
    }
    Ok(())
}

fn append_metrics(path: &Path, line: &impl Serialize) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TrainError::io(path, e))?;
    let text = serde_json::to_string(line).map_err(|source| TrainError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    writeln!(f, "{text}").map_err(|e| TrainError::io(path, e))
}

/// Keep only the metric lines up to `step` (a resumed run rewrites what came after its checkpoint).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(path, kept).map_err(|e| TrainError::io(path, e))
}

/// Train; `observe` sees every step's metrics (a progress bar, a log).
pub fn train(job: &TrainJob, observe: &mut dyn FnMut(&StepMetrics)) -> Result<TrainOutcome> {
    let cfg = job.config;
    let model = job.model;
    cfg.validate(model.config())?;
    if job.train.is_empty() {
        return Err(TrainError::EmptyDataset {
            reason: "the training mix has no example".into(),
        });
    }
    fs::create_dir_all(job.run_dir).map_err(|e| TrainError::io(job.run_dir, e))?;
    let metrics_path = job.run_dir.join("metrics.jsonl");
    let device = model.device().clone();

    // 1. Parameters, optimizer, data, from the checkpoint when resuming.
    let params = match job.init {
        Some(adapter) => LoraParams::from_adapter(adapter, model.config().num_layers)?,
        None => LoraParams::init(
            model.config(),
            cfg.lora(job.base_name.clone())?,
            cfg.seed,
            &device,
        )?,
    };
    let vars: Vec<_> = params.named_vars().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(vars.clone(), cfg)?;
    let train_docs = fit_to_rows(job.train, cfg.seq_len);
    if train_docs.is_empty() {
        return Err(TrainError::EmptyDataset {
            reason: format!(
                "every example's prompt fills a row of train.seq_len = {} tokens",
                cfg.seq_len
            ),
        });
    }
    let mut packer = Packer::new(&train_docs, cfg.seq_len, cfg.seed, true, job.pad)?;
    let step_tokens = cfg.rows() * cfg.seq_len * cfg.grad_accum;
    let total_steps = cfg.max_steps.unwrap_or_else(|| {
        ((cfg.epochs * packer.tokens_per_epoch() as f64) / step_tokens as f64)
            .ceil()
            .max(1.0) as usize
    });
    let mut state = RunState {
        step: 0,
        total_steps,
        cursor: packer.cursor(),
        tokens: 0,
        elapsed_s: 0.0,
        best_holdout: None,
        best_retention_losses: RetentionLosses::new(),
        best_step: 0,
        evals_without_improvement: 0,
        config: cfg.clone(),
    };
    let mut best = snapshot(&params)?;
    if job.resume {
        let ckpt =
            Checkpoint::load(job.run_dir, &device)?.ok_or_else(|| TrainError::Checkpoint {
                path: job.run_dir.join("checkpoint"),
                reason: "there is no checkpoint to resume from".into(),
            })?;
        if ckpt.state.config != *cfg {
            return Err(TrainError::Checkpoint {
                path: job.run_dir.join("checkpoint"),
                reason: "was made with a different [train] configuration; resume with the same one"
                    .into(),
            });
        }
        let path = job.run_dir.join("checkpoint");
        restore(&params, &ckpt.params, &path)?;
        for (i, (key, _)) in params.named_vars().enumerate() {
            let get = |prefix: &str| {
                ckpt.moments
                    .get(&format!("{prefix}.{key}"))
                    .cloned()
                    .ok_or_else(|| TrainError::Checkpoint {
                        path: path.clone(),
                        reason: format!("has no optimizer moment `{prefix}.{key}`"),
                    })
            };
            opt.m[i] = get("m")?;
            opt.v[i] = get("v")?;
        }
        opt.t = ckpt.adam_t;
        best = ckpt.best;
        state = ckpt.state;
        packer.seek(state.cursor);
        truncate_metrics(&metrics_path, state.step)?;
        tracing::info!(step = state.step, "resumed from checkpoint");
    }

    // 2. Training copies of the base weights, as the memory budget allows. On a CPU with a bf16 engine
    // (AMX or AVX-512 BF16), bf16 tiles of W and Wᵀ for every projection (forward and backward
    // products both run on them); otherwise the output projection's in f32 first (int8 cannot carry
    // its gradient), then the blocks' as int8 Wᵀ.
    let mut budget = cfg.backward_cache_mib * 1024 * 1024;
    let linears: Vec<_> = model.frozen_linears().collect();
    let engine = pai_model::kernels::bf16::engine().filter(|_| model.device().is_cpu());
    tracing::debug!(
        engine = engine.map_or("int8", |e| e.name()),
        "frozen products"
    );
    let tiles = engine.is_some();
    for (i, linear) in linears.iter().rev().enumerate() {
        let kind = if tiles {
            BackwardCopyKind::Bf16Tiles
        } else if i == 0 {
            BackwardCopyKind::Dense
        } else {
            BackwardCopyKind::Int8
        };
        let bytes = linear.keep_backward_copy(Some(kind));
        if bytes <= budget {
            budget -= bytes;
        } else {
            linear.keep_backward_copy(None);
        }
    }
    {
        use rayon::prelude::*;
        linears
            .par_iter()
            .try_for_each(|l| l.prepare_backward_copy())?;
    }

    // 3. The holdout rows, and the base's (or the starting adapter's) loss on them.
    let eval = eval_rows(job.holdout, cfg.seq_len, cfg.eval_tokens, job.pad)?;
    let initial_holdout = holdout_loss(model, Some(&params.frozen("eval", None)), &eval)?;
    // The retention guards' reference scores: what a checkpoint's forgetting is measured against.
    let guard_loss = |guard: &RetentionGuard, adapter: Option<&Adapter>| -> Result<f64> {
        (guard.score)(adapter).map_err(|source| TrainError::Retention {
            guard: guard.name.clone(),
            source,
        })
    };
    let mut reference_retention = RetentionLosses::new();
    for guard in &job.retention {
        reference_retention.insert(guard.name.clone(), guard_loss(guard, guard.reference)?);
    }
    if !job.resume {
        if let Some(l) = initial_holdout {
            append_metrics(
                &metrics_path,
                &serde_json::json!({"step": 0, "holdout_loss": l}),
            )?;
        }
    }

    let checkpoint =
        |state: &RunState, opt: &AdamW, best: &HashMap<String, Tensor>| -> Result<()> {
            let mut moments = HashMap::new();
            for (i, (key, _)) in params.named_vars().enumerate() {
                moments.insert(format!("m.{key}"), opt.m[i].clone());
                moments.insert(format!("v.{key}"), opt.v[i].clone());
            }
            Checkpoint {
                state: state.clone(),
                params: snapshot(&params)?,
                moments,
                adam_t: opt.t,
                best: best.clone(),
            }
            .save(job.run_dir)
        };

    // 4. The steps.
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut stop = StopReason::Finished;
    let mut last_loss = None;
    while state.step < total_steps {
        if job.stop.load(Ordering::Relaxed) {
            stop = StopReason::Interrupted;
            break;
        }
        // The budget is judged on the clock as the last step left it (as `out_of_time` below is), not
        // the live one: else time spent between steps (metrics, a checkpoint) could stop the run
        // here, after a step that was never evaluated. Only a resumed run whose budget was already
        // spent stops at this check.
        if cfg
            .time_budget_s
            .is_some_and(|budget| state.elapsed_s >= budget as f64)
        {
            stop = StopReason::TimeBudget;
            break;
        }
        let step_started = Instant::now();
        let micro: Vec<Vec<Row>> = (0..cfg.grad_accum)
            .map(|_| {
                (0..cfg.rows())
                    .filter_map(|_| packer.next_row(false))
                    .collect()
            })
            .collect();
        let counted: usize = micro.iter().flatten().map(Row::counted).sum();
        let lr = learning_rate(
            cfg,
            state.step,
            total_steps,
            elapsed_before + started.elapsed().as_secs_f64(),
        );
        let mut loss_sum = 0f64;
        let mut grad_norm = 0.0;
        if counted > 0 {
            let mut grads = Grads::new();
            for (i, rows) in micro.iter().enumerate() {
                // Dropout masks are a function of (seed, step, micro-batch): a resumed run draws
                // what an uninterrupted one did.
                let dropout_seed = cfg.seed
                    ^ ((state.step as u64) << 20 | i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                loss_sum += loss_and_grads(
                    model,
                    rows,
                    &params,
                    1.0 / counted as f32,
                    Some(dropout_seed),
                    &mut grads,
                )?;
            }
            if !loss_sum.is_finite() {
                return Err(TrainError::NonFinite {
                    step: state.step,
                    value: loss_sum as f32,
                });
            }
            grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
            opt.step(&grads, lr)?;
        }
        state.step += 1;
        state.tokens += counted;
        state.cursor = packer.cursor();
        state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        last_loss = Some(loss_sum);
        let mut metrics = StepMetrics {
            step: state.step,
            total_steps,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens: state.tokens,
            tokens_per_s: step_tokens as f64 / step_started.elapsed().as_secs_f64(),
            epoch: packer.epochs(),
            elapsed_s: state.elapsed_s,
            holdout_loss: None,
            retention_loss: RetentionLosses::new(),
        };

        // Holdout loss, the best adapter so far, early stopping. A step that uses up the time budget
        // is the last: the weights it reached are judged on the holdout like a final step's (else
        // the best could be the all-zero adapter the run started from).
        let out_of_time = cfg
            .time_budget_s
            .is_some_and(|budget| state.elapsed_s >= budget as f64);
        let last = state.step == total_steps || out_of_time;
        if !eval.is_empty()
            && ((cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every)) || last)
        {
            let adapter = params.frozen("eval", None);
            let l = holdout_loss(model, Some(&adapter), &eval)?.unwrap_or(f64::NAN);
            metrics.holdout_loss = Some(l);
            let mut forgets = false;
            for guard in &job.retention {
                let r = guard_loss(guard, Some(&adapter))?;
                metrics.retention_loss.insert(guard.name.clone(), r);
                let rise = r - reference_retention[&guard.name];
                let max_rise = cfg.max_retention_rise.unwrap_or(guard.max_rise);
                if rise > max_rise {
                    forgets = true;
                    tracing::info!(
                        step = state.step,
                        guard = %guard.name,
                        rise,
                        max_rise,
                        "checkpoint forgets too much of the guard's text; not kept"
                    );
                }
            }
            if !forgets && state.best_holdout.is_none_or(|b| l < b) {
                state.best_holdout = Some(l);
                state.best_retention_losses = metrics.retention_loss.clone();
                state.best_step = state.step;
                state.evals_without_improvement = 0;
                best = snapshot(&params)?;
            } else {
                state.evals_without_improvement += 1;
            }
        } else if eval.is_empty() {
            best = snapshot(&params)?;
            state.best_step = state.step;
        }
        append_metrics(&metrics_path, &metrics)?;
        observe(&metrics);
        if cfg.early_stopping_patience > 0
            && state.evals_without_improvement >= cfg.early_stopping_patience
        {
            stop = StopReason::EarlyStopped;
            checkpoint(&state, &opt, &best)?;
            break;
        }
        if state.step.is_multiple_of(cfg.checkpoint_every) || last {
            checkpoint(&state, &opt, &best)?;
        }
        if out_of_time && state.step < total_steps {
            stop = StopReason::TimeBudget;
            break;
        }
    }
    if !eval.is_empty() && state.best_holdout.is_none() && !job.retention.is_empty() {
        tracing::warn!(
            "every checkpoint forgot more of a retention guard's text than allowed: shipping the \
             weights the run started from"
        );
    }
    if matches!(stop, StopReason::Interrupted | StopReason::TimeBudget) {
        checkpoint(&state, &opt, &best)?;
    }
    for linear in model.frozen_linears() {
        linear.keep_backward_copy(None);
    }

    // 5. The adapter to ship: the best holdout loss seen.
    let out = LoraParams::from_adapter(&params.frozen("best", None), model.config().num_layers)?;
    restore(&out, &best, &job.run_dir.join("checkpoint"))?;
    Ok(TrainOutcome {
        adapter: out.frozen("adapter", None),
        best_step: state.best_step,
        steps: state.step,
        total_steps,
        stop,
        initial_holdout,
        best_holdout: state.best_holdout,
        reference_retention,
        best_retention: state.best_retention_losses,
        final_loss: last_loss,
        tokens: state.tokens,
        elapsed_s: state.elapsed_s,
        trainable_params: params.count(),
    })
}
