//! `[train]` of pai.toml: every training hyper-parameter, with PEFT's and the HF Trainer's defaults
//! where they have one, parsed once and checked against the model before any work starts.

use serde::{Deserialize, Serialize};

use pai_model::{LoraConfig, ModelConfig, Proj};

use crate::error::{Result, TrainError};

/// How a night's adapter starts (DESIGN.md "Decisions").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// A new adapter from the base, on the cumulative dataset sampled by recency.
    Fresh,
    /// Start from the incumbent adapter, on the new day plus a replay share.
    Continue,
}

/// The training configuration (`[train]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub strategy: Strategy,
    /// Projections that get LoRA pairs: q, k, v, o, gate, up, down (or their `*_proj` names).
    pub target_modules: Vec<String>,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub learning_rate: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// Linear warm-up steps, then cosine decay to `min_lr_ratio · learning_rate`.
    pub warmup_steps: usize,
    pub min_lr_ratio: f64,
    /// Tokens per micro-batch (rows of `seq_len` tokens).
    pub batch_tokens: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (0 turns clipping off).
    pub max_grad_norm: f64,
    /// Optimizer steps; when absent, `epochs` passes over the mix.
    pub max_steps: Option<usize>,
    pub epochs: f64,
    pub seed: u64,
    /// Holdout loss every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Tokens of holdout text each evaluation reads (the same ones every time).
    pub eval_tokens: usize,
    /// Stop after this many evaluations without a better holdout loss (0: never).
    pub early_stopping_patience: usize,
    /// The most a checkpoint may raise the loss on general text the base model knew, in nats per
    /// token, measured as the eval gate's retention guard measures it (the mean over its items,
    /// against the incumbent); ≈ the relative rise in perplexity, 0.02 ≈ 2%. A checkpoint past it
    /// is never the one shipped, however good its holdout loss, and counts as no improvement for
    /// early stopping. Absent: the guard suite's own `max_regression`, so that training ships
    /// nothing the gate fails; a huge value (1e9) turns the guard off.
    pub max_retention_rise: Option<f64>,
    pub checkpoint_every: usize,
    /// Stop at a checkpoint after this many seconds (the run still writes its adapter); the
    /// learning-rate decay reaches its floor by then (`optim::learning_rate`).
    pub time_budget_s: Option<u64>,
    /// Memory for the training copies of quantized base weights (MiB): on CPUs with a bf16 engine
    /// (AMX, AVX-512 BF16), W and Wᵀ in bf16 tiles (~540 MB for a 135M model); elsewhere Wᵀ in Q8_0
    /// (~143 MB) and the output projection in f32. What does not fit runs on the int8 kernels and is
    /// dequantized at every backward.
    pub backward_cache_mib: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::Fresh,
            target_modules: ["q", "k", "v", "o"].map(String::from).to_vec(),
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            learning_rate: 2e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 10,
            min_lr_ratio: 0.0,
            batch_tokens: 1024,
            seq_len: 256,
            grad_accum: 1,
            max_grad_norm: 1.0,
            max_steps: None,
            epochs: 1.0,
            seed: 0,
            eval_every: 50,
            eval_tokens: 8192,
            early_stopping_patience: 0,
            max_retention_rise: None,
            checkpoint_every: 50,
            time_budget_s: None,
            backward_cache_mib: 1024,
        }
    }
}

impl TrainConfig {
    /// Rows of `seq_len` tokens in one micro-batch.
    pub fn rows(&self) -> usize {
        (self.batch_tokens / self.seq_len).max(1)
    }

    /// The projections `target_modules` names, in model order.
    pub fn targets(&self) -> Result<Vec<Proj>> {
        let mut out = Vec::new();
        for name in &self.target_modules {
            let short = name.strip_suffix("_proj").unwrap_or(name);
            let proj = Proj::ALL
                .into_iter()
                .find(|p| p.peft_name().strip_suffix("_proj") == Some(short))
                .ok_or_else(|| TrainError::BadConfig {
                    key: "target_modules",
                    value: format!("{:?}", self.target_modules),
                    allowed: format!(
                        "`{name}` is not a projection; use q, k, v, o, gate, up, down (lm_head and \
                         embeddings are never trained)"
                    ),
                })?;
            if !out.contains(&proj) {
                out.push(proj);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The adapter's LoRA settings.
    pub fn lora(&self, base_name: Option<String>) -> Result<LoraConfig> {
        Ok(LoraConfig {
            r: self.r,
            alpha: self.alpha,
            use_rslora: self.use_rslora,
            dropout: self.dropout,
            target_modules: self.targets()?,
            layers: None,
            base_model_name_or_path: base_name,
        })
    }

    /// Every setting checked against each other and the model, before any work starts.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        let bad = |key: &'static str, value: String, allowed: &str| {
            Err(TrainError::BadConfig {
                key,
                value,
                allowed: allowed.to_string(),
            })
        };
        if self.target_modules.is_empty() {
            return bad(
                "target_modules",
                "[]".into(),
                "name at least one projection",
            );
        }
        self.targets()?;
        if self.r == 0 {
            return bad("r", "0".into(), "the rank must be at least 1");
        }
        let smallest = model.kv_dim().min(model.hidden_size);
        if self.r > smallest {
            return bad(
                "r",
                self.r.to_string(),
                &format!("at most {smallest}, the smallest dimension of a projection"),
            );
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad("alpha", self.alpha.to_string(), "above 0");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(
                "dropout",
                self.dropout.to_string(),
                "at least 0 and below 1",
            );
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate", self.learning_rate.to_string(), "above 0");
        }
        if !self.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            return bad(
                "betas",
                format!("{:?}", self.betas),
                "each at least 0 and below 1",
            );
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad("eps", self.eps.to_string(), "above 0");
        }
        if let Some(rise) = self.max_retention_rise {
            if !(rise.is_finite() && rise >= 0.0) {
                return bad(
                    "max_retention_rise",
                    rise.to_string(),
                    "finite nats per token, 0 or more (0.02 ≈ 2% perplexity; 1e9 turns the guard off)",
                );
            }
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad("weight_decay", self.weight_decay.to_string(), "0 or more");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(
                "min_lr_ratio",
                self.min_lr_ratio.to_string(),
                "between 0 and 1",
            );
        }
        if self.seq_len < 2 {
            return bad("seq_len", self.seq_len.to_string(), "at least 2 tokens");
        }
        if self.seq_len > model.context_length {
            return bad(
                "seq_len",
                self.seq_len.to_string(),
                &format!(
                    "at most the model's context, {} tokens",
                    model.context_length
                ),
            );
        }
        if self.batch_tokens < self.seq_len {
            return bad(
                "batch_tokens",
                self.batch_tokens.to_string(),
                &format!("at least seq_len ({})", self.seq_len),
            );
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "0".into(), "at least 1");
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm < 0.0 {
            return bad(
                "max_grad_norm",
                self.max_grad_norm.to_string(),
                "0 (off) or more",
            );
        }
        if self.max_steps == Some(0) {
            return bad(
                "max_steps",
                "0".into(),
                "at least 1 (or leave it out and set epochs)",
            );
        }
        if self.max_steps.is_none() && !(self.epochs.is_finite() && self.epochs > 0.0) {
            return bad("epochs", self.epochs.to_string(), "above 0");
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every", "0".into(), "at least 1 step");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelConfig {
        pai_model::testing::TinyModel::new(Default::default())
            .map(|t| t.config())
            .expect("tiny model")
    }

    #[test]
    fn names_the_key_at_fault() {
        let m = model();
        let cases: Vec<(TrainConfig, &str)> = vec![
            (
                TrainConfig {
                    r: 0,
                    ..Default::default()
                },
                "train.r = 0",
            ),
            (
                TrainConfig {
                    target_modules: vec!["q".into(), "lm_head".into()],
                    ..Default::default()
                },
                "`lm_head` is not a projection",
            ),
            (
                TrainConfig {
                    seq_len: 100_000,
                    ..Default::default()
                },
                "train.seq_len = 100000",
            ),
            (
                TrainConfig {
                    learning_rate: 0.0,
                    ..Default::default()
                },
                "train.learning_rate",
            ),
            (
                TrainConfig {
                    dropout: 1.0,
                    ..Default::default()
                },
                "train.dropout",
            ),
            (
                TrainConfig {
                    max_steps: Some(0),
                    ..Default::default()
                },
                "train.max_steps",
            ),
        ];
        for (cfg, want) in cases {
            let err = cfg.validate(&m).expect_err(want).to_string();
            assert!(err.contains(want), "{err} should contain {want}");
        }
        let ok = TrainConfig {
            target_modules: vec!["q_proj".into(), "down".into(), "q".into()],
            seq_len: 64,
            batch_tokens: 128,
            ..Default::default()
        };
        ok.validate(&m).expect("valid");
        assert_eq!(ok.targets().expect("targets"), vec![Proj::Q, Proj::Down]);
        assert_eq!(ok.rows(), 2);
    }
}
