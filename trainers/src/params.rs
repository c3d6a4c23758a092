//! The trainable LoRA variables: one (A, B) pair per targeted site, initialised as PEFT does
//! (A Kaiming-uniform with a = √5, i.e. U(±1/√in); B zero, so training starts from the base model
//! exactly), and the [`Adapter`] views a forward pass takes.

use candle_core::{DType, Device, Tensor, Var};

use pai_model::lora::{peft_key, proj_dims};
use pai_model::{Adapter, LoraConfig, LoraDropout, LoraSite, LoraWeights, ModelConfig};

use crate::error::Result;
use crate::rng::SplitMix;

/// One site's trainable pair.
#[derive(Debug, Clone)]
pub struct SiteParams {
    pub site: LoraSite,
    pub a: Var,
    pub b: Var,
}

/// Every trainable LoRA variable of a run.
#[derive(Debug, Clone)]
pub struct LoraParams {
    config: LoraConfig,
    num_layers: usize,
    sites: Vec<SiteParams>,
}

impl LoraParams {
    /// Fresh pairs for every layer and targeted projection, drawn from `seed`.
    pub fn init(
        model: &ModelConfig,
        config: LoraConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = SplitMix::new(seed ^ 0x4c6f_5241);
        let mut sites = Vec::new();
        for layer in 0..model.num_layers {
            for &proj in &config.target_modules {
                let (fan_in, out) = proj_dims(model, proj);
                let bound = 1.0 / (fan_in as f64).sqrt();
                let a: Vec<f32> = (0..config.r * fan_in)
                    .map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (config.r, fan_in), device)?;
                let b = Tensor::zeros((out, config.r), DType::F32, device)?;
                sites.push(SiteParams {
                    site: LoraSite { layer, proj },
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                });
            }
        }
        Ok(Self {
            config,
            num_layers: model.num_layers,
            sites,
        })
    }

    /// Variables holding a copy of an existing adapter's weights (the `continue` strategy).
    pub fn from_adapter(adapter: &Adapter, num_layers: usize) -> Result<Self> {
        let sites = adapter
            .iter()
            .map(|(site, w)| {
                Ok(SiteParams {
                    site,
                    a: Var::from_tensor(&w.a.to_dtype(DType::F32)?.copy()?)?,
                    b: Var::from_tensor(&w.b.to_dtype(DType::F32)?.copy()?)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config: adapter.config().clone(),
            num_layers,
            sites,
        })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn sites(&self) -> &[SiteParams] {
        &self.sites
    }

    /// Every variable with its PEFT tensor name, A before B, in site order.
    pub fn named_vars(&self) -> impl Iterator<Item = (String, &Var)> {
        self.sites.iter().flat_map(|s| {
            [
                (peft_key(s.site, true), &s.a),
                (peft_key(s.site, false), &s.b),
            ]
        })
    }

    /// Trainable parameters in all.
    pub fn count(&self) -> usize {
        self.sites
            .iter()
            .map(|s| s.a.elem_count() + s.b.elem_count())
            .sum()
    }

    /// The adapter a training forward pass uses: its tensors are the variables, so the loss
    /// differentiates towards them. `dropout_seed` (a training step's) turns on the config's LoRA
    /// dropout, each site drawing its own mask from it.
    pub fn trainable(&self, name: &str, dropout_seed: Option<u64>) -> Adapter {
        self.adapter_with(name, dropout_seed, |v| v.as_tensor().clone())
    }

    /// The same weights detached from the graph: forward passes with it run the fast kernels. With
    /// the step's `dropout_seed` it computes what `trainable` does (the checkpointed step's first
    /// pass); without, it is the adapter as evaluated and saved.
    pub fn frozen(&self, name: &str, dropout_seed: Option<u64>) -> Adapter {
        self.adapter_with(name, dropout_seed, |v| v.as_tensor().detach())
    }

    fn adapter_with(
        &self,
        name: &str,
        dropout_seed: Option<u64>,
        view: impl Fn(&Var) -> Tensor,
    ) -> Adapter {
        let scale = self.config.scale();
        let p = self.config.dropout as f32;
        let weights = self.sites.iter().enumerate().map(|(i, s)| {
            let dropout = dropout_seed.filter(|_| p > 0.0).map(|seed| LoraDropout {
                p,
                seed: SplitMix::new(seed ^ (i as u64).wrapping_mul(0xd6e8_feb8_6659_fd93))
                    .next_u64(),
            });
            (
                s.site,
                LoraWeights {
                    a: view(&s.a),
                    b: view(&s.b),
                    scale,
                    dropout,
                },
            )
        });
        Adapter::new(name, self.config.clone(), self.num_layers, weights)
    }
}
