//! AdamW with decoupled weight decay (as `torch.optim.AdamW`), its learning-rate schedule (linear
//! warm-up, then cosine decay) and global-norm gradient clipping. The moments are plain tensors so a
//! checkpoint can save and restore them exactly.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// The gradients of the optimizer's variables, in its order (`None`: the graph did not reach it).
pub type Grads = Vec<Option<Tensor>>;

use crate::config::TrainConfig;
use crate::error::Result;

/// The learning rate at optimizer step `step` (0-based) of `total`, `elapsed_s` seconds into the run.
/// Past the warm-up, the cosine decay follows whichever horizon is nearer: the steps (`step / total`)
/// or, with a time budget, the clock (`elapsed_s / budget`). A run the budget cuts short then still
/// anneals to the floor by its end, instead of stopping at its peak rate.
pub fn learning_rate(cfg: &TrainConfig, step: usize, total: usize, elapsed_s: f64) -> f64 {
    let peak = cfg.learning_rate;
    if step < cfg.warmup_steps {
        return peak * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1);
    let by_steps = (step - cfg.warmup_steps) as f64 / span as f64;
    let by_time = cfg
        .time_budget_s
        .map_or(0.0, |budget| elapsed_s / budget.max(1) as f64);
    let progress = by_steps.max(by_time).min(1.0);
    let floor = peak * cfg.min_lr_ratio;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// AdamW over a fixed list of variables.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<Var>,
    /// First and second moments, one pair per variable.
    pub(crate) m: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    /// Updates applied so far (bias correction).
    pub(crate) t: usize,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, cfg: &TrainConfig) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            vars,
            t: 0,
            betas: cfg.betas,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        })
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// One update with learning rate `lr` (a variable with no gradient still decays and moves by its
    /// momentum).
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        self.t += 1;
        let [b1, b2] = self.betas;
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let p = var.as_tensor();
            let g = match grads.get(i).and_then(Option::as_ref) {
                Some(g) => g.clone(),
                None => p.zeros_like()?,
            };
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&m / c1)?;
            let v_hat = (&v / c2)?;
            let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
            let decayed = (p.detach() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// The global L2 norm of `grads`; when above `max_norm` (> 0) every gradient is scaled down to it.
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

/// Add the gradients `store` holds for `vars` into `into` (gradient accumulation); the rest of the
/// store (every activation's gradient) is dropped with it.
pub fn accumulate(into: &mut Grads, store: GradStore, vars: &[Var]) -> Result<()> {
    into.resize(vars.len(), None);
    for (slot, var) in into.iter_mut().zip(vars) {
        if let Some(g) = store.get(var.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let cfg = TrainConfig {
            learning_rate: 1.0,
            warmup_steps: 4,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        let lr = |s| learning_rate(&cfg, s, 14, 1e9);
        assert!((lr(0) - 0.25).abs() < 1e-12);
        assert!((lr(3) - 1.0).abs() < 1e-12);
        assert!((lr(4) - 1.0).abs() < 1e-12);
        assert!((lr(9) - 0.55).abs() < 1e-12);
        assert!((lr(14) - 0.1).abs() < 1e-12);
        assert!(lr(5) > lr(6));
    }

    /// With a time budget the decay follows the clock when the clock is ahead of the steps: halfway
    /// through the budget is halfway down the cosine, the budget's end is the floor, and a budget
    /// far from spent leaves the step schedule alone.
    #[test]
    fn a_time_budget_anneals_by_the_clock() {
        let cfg = TrainConfig {
            learning_rate: 1.0,
            warmup_steps: 4,
            min_lr_ratio: 0.1,
            time_budget_s: Some(100),
            ..Default::default()
        };
        let lr = |step, elapsed| learning_rate(&cfg, step, 1004, elapsed);
        assert!((lr(2, 90.0) - 0.75).abs() < 1e-12, "warm-up is by steps");
        assert!((lr(5, 50.0) - 0.55).abs() < 1e-12);
        assert!((lr(5, 100.0) - 0.1).abs() < 1e-12);
        assert!((lr(5, 250.0) - 0.1).abs() < 1e-12);
        assert!(
            (lr(504, 1.0) - 0.55).abs() < 1e-12,
            "steps ahead of the clock"
        );
        assert!(lr(5, 10.0) > lr(5, 20.0));
    }

    /// torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5) on p = [1, -2] with
    /// gradients [0.5, 0.25] then [-1, 2] gives p = [0.7960, -1.7160] (computed by hand from torch's
    /// update rule: p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + eps)).
    #[test]
    fn matches_torch_adamw() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let p = Var::new(&[1f32, -2.0], &dev)?;
        let cfg = TrainConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![p.clone()], &cfg)?;
        for g in [[0.5f32, 0.25], [-1.0, 2.0]] {
            opt.step(&vec![Some(Tensor::new(&g, &dev)?)], 0.1)?;
        }
        // By hand: step 1: p = [1·0.95 − 0.1, −2·0.95 − 0.1] = [0.85, −2.0];
        // step 2: m = [0.9·0.05 − 0.1, 0.9·0.025 + 0.2] = [−0.055, 0.2225], m̂ = m / 0.19;
        // v = [0.999·0.00025 + 0.001, 0.999·0.0000625 + 0.004] , v̂ = v / 0.001999.
        let want: Vec<f32> = {
            let m = [-0.055f64, 0.2225];
            let v = [0.999 * 0.00025 + 0.001, 0.999 * 0.0000625 + 0.004];
            let p1 = [0.85f64, -2.0];
            (0..2)
                .map(|i| {
                    let mh = m[i] / 0.19;
                    let vh = v[i] / (1.0 - 0.999f64.powi(2));
                    (p1[i] * 0.95 - 0.1 * mh / (vh.sqrt() + 1e-8)) as f32
                })
                .collect()
        };
        let got = p.as_tensor().to_vec1::<f32>()?;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        Ok(())
    }
}
