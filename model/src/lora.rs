//! LoRA adapters: their weights, the PEFT directory format they load from (writing them out is
//! `lora_save`), and the stack of adapters a
//! forward pass applies. The base model never owns adapter weights: a forward pass is handed the stack
//! it should use, so a server can keep many adapters resident and pick one per request, and a trainer
//! can pass adapters whose tensors are trainable variables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::linear::{LoraSite, Proj};

/// How the delta is scaled: `alpha / r` (LoRA) or `alpha / √r` (rsLoRA).
pub fn lora_scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// The low-rank pair of one site: `delta(x) = scale · (dropout(x)·Aᵀ)·Bᵀ`, A [r, in], B [out, r].
#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Training only: dropout on the LoRA branch's input, as PEFT's `lora_dropout`.
    pub dropout: Option<LoraDropout>,
}

/// Dropout with a mask drawn from a seed, so that a step computed twice (activation checkpointing) or
/// after a resume drops the same inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraDropout {
    pub p: f32,
    pub seed: u64,
}

impl LoraDropout {
    /// `n` mask values in row-major order: 0 with probability p, else 1/(1 − p).
    pub fn mask_values(&self, n: usize) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let keep = 1.0 / (1.0 - self.p);
        (0..n)
            .map(|_| {
                if rng.random::<f32>() < self.p {
                    0.0
                } else {
                    keep
                }
            })
            .collect()
    }

    /// The mask in `shape`.
    fn mask(&self, shape: &candle_core::Shape, device: &Device) -> Result<Tensor> {
        let values = self.mask_values(shape.elem_count());
        Ok(Tensor::from_vec(values, shape, device)?)
    }
}

impl LoraWeights {
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let x = if x.dtype() == self.a.dtype() {
            x.clone()
        } else {
            x.to_dtype(self.a.dtype())?
        };
        let x = match self.dropout {
            Some(d) if d.p > 0.0 => (&x * d.mask(x.shape(), x.device())?.to_dtype(x.dtype())?)?,
            _ => x,
        };
        let down = x.broadcast_matmul(&self.a.t()?)?;
        let up = down.broadcast_matmul(&self.b.t()?)?;
        Ok((up * self.scale)?)
    }
}

/// The training hyper-parameters an adapter was made with, as `adapter_config.json` records them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub dropout: f64,
    pub target_modules: Vec<Proj>,
    /// Layers the adapter covers; `None` means every layer.
    pub layers: Option<Vec<usize>>,
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        lora_scale(self.alpha, self.r, self.use_rslora)
    }
}

/// A LoRA adapter: one [`LoraWeights`] per covered site.
#[derive(Debug, Clone)]
pub struct Adapter {
    name: String,
    config: LoraConfig,
    num_layers: usize,
    /// Indexed by `layer * 7 + proj`.
    sites: Vec<Option<LoraWeights>>,
}

fn slot(site: LoraSite) -> usize {
    site.layer * Proj::ALL.len() + site.proj as usize
}

impl Adapter {
    /// Build an adapter from weights already in memory (a trainer's variables, a test's known values).
    pub fn new(
        name: impl Into<String>,
        config: LoraConfig,
        num_layers: usize,
        weights: impl IntoIterator<Item = (LoraSite, LoraWeights)>,
    ) -> Self {
        let mut sites = vec![None; num_layers * Proj::ALL.len()];
        for (site, w) in weights {
            if site.layer < num_layers {
                sites[slot(site)] = Some(w);
            }
        }
        Self {
            name: name.into(),
            config,
            num_layers,
            sites,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn get(&self, site: LoraSite) -> Option<&LoraWeights> {
        if site.layer >= self.num_layers {
            return None;
        }
        self.sites[slot(site)].as_ref()
    }

    /// Every site with weights, in layer then projection order.
    pub fn iter(&self) -> impl Iterator<Item = (LoraSite, &LoraWeights)> {
        self.sites.iter().enumerate().filter_map(|(i, w)| {
            w.as_ref().map(|w| {
                let site = LoraSite {
                    layer: i / Proj::ALL.len(),
                    proj: Proj::ALL[i % Proj::ALL.len()],
                };
                (site, w)
            })
        })
    }

    /// Load a PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`) for a model of
    /// shape `model`, checking every key and shape. `base_sha256`, when given, is the fingerprint of the
    /// loaded base; an adapter whose `pai.json` names another base is refused.
    pub fn load_peft(
        dir: &Path,
        model: &ModelConfig,
        base_sha256: Option<&str>,
        device: &Device,
    ) -> Result<Self> {
        let err = |reason: String| ModelError::Adapter {
            path: dir.to_path_buf(),
            reason,
        };
        if !dir.is_dir() {
            return Err(err("is not a directory".into()));
        }
        let config_path = dir.join("adapter_config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let config = parse_peft_config(&text, &config_path, model)?;

        if let Some(actual) = base_sha256 {
            if let Some(expected) = recorded_base_sha256(dir)? {
                if !expected.eq_ignore_ascii_case(actual) {
                    return Err(ModelError::AdapterBaseMismatch {
                        path: dir.to_path_buf(),
                        expected: format!("sha256 {expected}"),
                        actual: format!("sha256 {actual}"),
                    });
                }
            }
        }

        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.is_file() {
            let reason = if dir.join("adapter_model.bin").is_file() {
                "has adapter_model.bin (a pickle); pai reads only adapter_model.safetensors \
                 (save with safe_serialization=True)"
            } else {
                "has no adapter_model.safetensors"
            };
            return Err(err(reason.into()));
        }
        let tensors = candle_core::safetensors::load(&weights_path, device).map_err(|source| {
            ModelError::Tensor {
                path: weights_path.clone(),
                name: "*".into(),
                source: Box::new(source),
            }
        })?;

        let mut found: BTreeMap<LoraSite, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, tensor) in tensors {
            let (site, is_a) = parse_peft_key(&key).ok_or_else(|| {
                err(format!(
                    "tensor `{key}` is not a LoRA weight of a llama projection \
                     (expected base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_<A|B>.weight)"
                ))
            })?;
            if site.layer >= model.num_layers {
                return Err(err(format!(
                    "tensor `{key}` is for layer {}, but the model has {} layers",
                    site.layer, model.num_layers
                )));
            }
            if !config.target_modules.contains(&site.proj) {
                return Err(err(format!(
                    "tensor `{key}` is for {}, which adapter_config.json's target_modules does not list",
                    site.proj
                )));
            }
            let entry = found.entry(site).or_default();
            if is_a {
                entry.0 = Some(tensor);
            } else {
                entry.1 = Some(tensor);
            }
        }

        let layers: Vec<usize> = match &config.layers {
            Some(l) => l.clone(),
            None => (0..model.num_layers).collect(),
        };
        let mut weights = Vec::new();
        for &layer in &layers {
            for &proj in &config.target_modules {
                let site = LoraSite { layer, proj };
                let (a, b) = found.remove(&site).unwrap_or((None, None));
                let (in_dim, out_dim) = proj_dims(model, proj);
                let a = check_tensor(dir, &peft_key(site, true), a, &[config.r, in_dim])?;
                let b = check_tensor(dir, &peft_key(site, false), b, &[out_dim, config.r])?;
                weights.push((
                    site,
                    LoraWeights {
                        a,
                        b,
                        scale: config.scale(),
                        dropout: None,
                    },
                ));
            }
        }
        if let Some((site, _)) = found.into_iter().next() {
            return Err(err(format!(
                "tensor `{}` is for layer {}, which adapter_config.json's layers_to_transform leaves out",
                peft_key(site, true),
                site.layer
            )));
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        tracing::debug!(adapter = %name, sites = weights.len(), r = config.r, "loaded PEFT adapter");
        Ok(Self::new(name, config, model.num_layers, weights))
    }
}

/// The PEFT tensor name of one side of a site's pair.
pub fn peft_key(site: LoraSite, a: bool) -> String {
    format!(
        "base_model.model.model.layers.{}.{}.{}.lora_{}.weight",
        site.layer,
        site.proj.hf_parent(),
        site.proj.peft_name(),
        if a { "A" } else { "B" }
    )
}

/// [in, out] of a projection in a model of this shape.
pub fn proj_dims(model: &ModelConfig, proj: Proj) -> (usize, usize) {
    let (h, q, kv, ff) = (
        model.hidden_size,
        model.q_dim(),
        model.kv_dim(),
        model.intermediate_size,
    );
    match proj {
        Proj::Q => (h, q),
        Proj::K | Proj::V => (h, kv),
        Proj::O => (q, h),
        Proj::Gate | Proj::Up => (h, ff),
        Proj::Down => (ff, h),
    }
}

fn check_tensor(dir: &Path, key: &str, t: Option<Tensor>, expected: &[usize]) -> Result<Tensor> {
    let t = t.ok_or_else(|| ModelError::AdapterMissingKey {
        path: dir.to_path_buf(),
        key: key.into(),
    })?;
    if t.dims() != expected {
        return Err(ModelError::AdapterShape {
            path: dir.to_path_buf(),
            key: key.into(),
            expected: expected.to_vec(),
            actual: t.dims().to_vec(),
        });
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// `base_model.model.model.layers.{i}.{parent}.{proj}.lora_{A|B}[.{adapter_name}].weight`.
fn parse_peft_key(key: &str) -> Option<(LoraSite, bool)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let mut parts = rest.split('.');
    let layer: usize = parts.next()?.parse().ok()?;
    let parent = parts.next()?;
    let proj = Proj::from_peft_name(parts.next()?)?;
    if parent != proj.hf_parent() {
        return None;
    }
    let is_a = match parts.next()? {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    let tail: Vec<&str> = parts.collect();
    match tail.as_slice() {
        ["weight"] | [_, "weight"] => Some((LoraSite { layer, proj }, is_a)),
        _ => None,
    }
}

/// The fields of PEFT's `adapter_config.json` that matter to applying the adapter.
#[derive(Debug, Deserialize)]
struct PeftConfigFile {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    lora_dropout: f64,
    bias: Option<String>,
    target_modules: Option<serde_json::Value>,
    layers_to_transform: Option<serde_json::Value>,
    base_model_name_or_path: Option<String>,
    modules_to_save: Option<serde_json::Value>,
    rank_pattern: Option<serde_json::Value>,
    alpha_pattern: Option<serde_json::Value>,
}

fn parse_peft_config(text: &str, path: &Path, model: &ModelConfig) -> Result<LoraConfig> {
    let raw: PeftConfigFile = serde_json::from_str(text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        what: "adapter_config.json",
        source,
    })?;
    let bad = |field: &str, reason: String| ModelError::Adapter {
        path: path.to_path_buf(),
        reason: format!("field `{field}`: {reason}"),
    };
    let non_empty = |v: &Option<serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Object(m)) => !m.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    match raw.peft_type.as_deref() {
        Some("LORA") | None => {}
        Some(other) => return Err(bad("peft_type", format!("`{other}` is not LORA"))),
    }
    if raw.r == 0 {
        return Err(bad("r", "must be positive".into()));
    }
    if raw.use_dora {
        return Err(bad("use_dora", "DoRA adapters are not supported".into()));
    }
    if let Some(b) = raw.bias.as_deref().filter(|b| *b != "none") {
        return Err(bad(
            "bias",
            format!("`{b}` is not supported, only \"none\""),
        ));
    }
    for (field, value) in [
        ("modules_to_save", &raw.modules_to_save),
        ("rank_pattern", &raw.rank_pattern),
        ("alpha_pattern", &raw.alpha_pattern),
    ] {
        if non_empty(value) {
            return Err(bad(
                field,
                "must be empty; pai applies one rank and alpha to every module".into(),
            ));
        }
    }
    let names: Vec<String> = match &raw.target_modules {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad("target_modules", format!("{v} is not a string")))
            })
            .collect::<Result<_>>()?,
        Some(serde_json::Value::String(s)) if Proj::from_peft_name(s).is_some() => vec![s.clone()],
        Some(serde_json::Value::String(s)) => {
            return Err(bad(
                "target_modules",
                format!("the pattern `{s}` is not supported; list the module names"),
            ))
        }
        _ => {
            return Err(bad(
                "target_modules",
                "must list the adapted modules".into(),
            ))
        }
    };
    let mut target_modules = Vec::new();
    for n in &names {
        let p = Proj::from_peft_name(n).ok_or_else(|| {
            bad(
                "target_modules",
                format!("`{n}` is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
            )
        })?;
        if !target_modules.contains(&p) {
            target_modules.push(p);
        }
    }
    target_modules.sort();
    let layers = match &raw.layers_to_transform {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => Some(vec![n.as_u64().unwrap_or(u64::MAX) as usize]),
        Some(serde_json::Value::Array(items)) => Some(
            items
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("layers_to_transform", "must list layer numbers".into()))?,
        ),
        Some(v) => {
            return Err(bad(
                "layers_to_transform",
                format!("{v} is not a layer list"),
            ))
        }
    };
    if let Some(bad_layer) = layers.iter().flatten().find(|&&l| l >= model.num_layers) {
        return Err(bad(
            "layers_to_transform",
            format!(
                "layer {bad_layer} does not exist; the model has {} layers",
                model.num_layers
            ),
        ));
    }
    Ok(LoraConfig {
        r: raw.r,
        alpha: raw.lora_alpha,
        use_rslora: raw.use_rslora,
        dropout: raw.lora_dropout,
        target_modules,
        layers,
        base_model_name_or_path: raw.base_model_name_or_path,
    })
}

/// The base fingerprint an adapter's `pai.json` records (`{"base": {"sha256": …}}`), if any.
fn recorded_base_sha256(dir: &Path) -> Result<Option<String>> {
    let path: PathBuf = dir.join("pai.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        what: "pai.json",
        source,
    })?;
    Ok(v.pointer("/base/sha256")
        .and_then(|s| s.as_str())
        .map(str::to_owned))
}

/// The adapters one forward pass applies, summed, in order. Empty means the bare base model.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdapterStack<'a> {
    adapters: &'a [&'a Adapter],
}

impl<'a> AdapterStack<'a> {
    pub const NONE: AdapterStack<'static> = AdapterStack { adapters: &[] };

    pub fn new(adapters: &'a [&'a Adapter]) -> Self {
        Self { adapters }
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    pub fn weights_at(&self, site: LoraSite) -> impl Iterator<Item = &'a LoraWeights> + 'a {
        self.adapters.iter().filter_map(move |a| a.get(site))
    }

    /// Whether both stacks apply the same adapters (the same objects, in the same order).
    pub fn same_as(&self, other: &AdapterStack) -> bool {
        self.adapters.len() == other.adapters.len()
            && self
                .adapters
                .iter()
                .zip(other.adapters)
                .all(|(a, b)| std::ptr::eq(*a, *b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peft_keys_with_and_without_adapter_name() {
        let (site, a) =
            parse_peft_key("base_model.model.model.layers.12.self_attn.k_proj.lora_A.weight")
                .unwrap();
        assert_eq!((site.layer, site.proj, a), (12, Proj::K, true));
        let (site, a) =
            parse_peft_key("base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight")
                .unwrap();
        assert_eq!((site.layer, site.proj, a), (3, Proj::Down, false));
        assert!(parse_peft_key(
            "base_model.model.model.layers.3.self_attn.down_proj.lora_B.weight"
        )
        .is_none());
        assert!(parse_peft_key("base_model.model.lm_head.lora_A.weight").is_none());
        assert_eq!(
            peft_key(
                LoraSite {
                    layer: 12,
                    proj: Proj::K
                },
                true
            ),
            "base_model.model.model.layers.12.self_attn.k_proj.lora_A.weight"
        );
    }

    #[test]
    fn rslora_scale() {
        assert_eq!(lora_scale(16.0, 8, false), 2.0);
        assert!((lora_scale(16.0, 16, true) - 4.0).abs() < 1e-12);
    }
}
