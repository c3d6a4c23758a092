//! Writing adapters out: the PEFT directory (what PEFT, vLLM and llama.cpp's converter read) and
//! llama.cpp's own LoRA GGUF (what `llama-cli --lora` and llama-cpp-python's `lora_path` read).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::linear::Proj;
use crate::lora::{peft_key, Adapter};

impl Adapter {
    /// Write the adapter as a PEFT LoRA directory: `adapter_config.json` and
    /// `adapter_model.safetensors` (f32, metadata `format: pt`), in Hugging Face row order, which PEFT,
    /// vLLM and llama.cpp's converter read. The directory must exist; files in it are overwritten.
    pub fn save_peft(&self, dir: &Path) -> Result<()> {
        let c = self.config();
        let mut modules: Vec<&str> = c.target_modules.iter().map(|p| p.peft_name()).collect();
        modules.sort_unstable();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": c.r,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "use_rslora": c.use_rslora,
            "use_dora": false,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "target_modules": modules,
            "layers_to_transform": c.layers,
            "base_model_name_or_path": c.base_model_name_or_path,
            "inference_mode": true,
        });
        let config_path = dir.join("adapter_config.json");
        let text = serde_json::to_string_pretty(&config).map_err(|source| ModelError::Json {
            path: config_path.clone(),
            what: "adapter_config.json",
            source,
        })?;
        std::fs::write(&config_path, text).map_err(|e| ModelError::io(&config_path, e))?;

        let weights_path = dir.join("adapter_model.safetensors");
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (site, w) in self.iter() {
            for (is_a, t) in [(true, &w.a), (false, &w.b)] {
                let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
                tensors.push((peft_key(site, is_a), t.dims().to_vec(), bytes));
            }
        }
        let views = tensors
            .iter()
            .map(|(k, shape, bytes)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map(|v| (k.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| ModelError::Adapter {
                path: weights_path.clone(),
                reason: format!("cannot lay out the tensors: {e}"),
            })?;
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(metadata), &weights_path).map_err(|e| {
            ModelError::Adapter {
                path: weights_path.clone(),
                reason: format!("cannot write: {e}"),
            }
        })?;
        Ok(())
    }
}

impl Adapter {
    /// Write the adapter as llama.cpp's LoRA GGUF (what `convert_lora_to_gguf.py` makes, for
    /// `llama-cli --lora` and llama-cpp-python's `lora_path`): metadata `general.type = adapter`,
    /// `adapter.type = lora`, `adapter.lora.alpha`; f32 tensors `blk.N.<proj>.weight.lora_a` [r, in] and
    /// `.lora_b` [out, r]; q/k `lora_b` rows in GGUF order for the architectures whose GGUF permutes
    /// them (llama, mistral), the inverse of what loading undoes.
    pub fn save_gguf(&self, path: &Path, model: &ModelConfig) -> Result<()> {
        use candle_core::quantized::gguf_file::Value;
        use candle_core::quantized::{GgmlDType, QTensor};
        let c = self.config();
        if c.use_rslora {
            return Err(ModelError::Adapter {
                path: path.to_path_buf(),
                reason: "llama.cpp's LoRA GGUF has no rsLoRA scaling; export an adapter trained \
                         without use_rslora (or scale alpha by √r yourself)"
                    .into(),
            });
        }
        let permuted = model.architecture != crate::Architecture::Qwen2;
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        for (site, w) in self.iter() {
            let stem = format!("blk.{}.{}.weight", site.layer, site.proj.gguf_name());
            let heads = match site.proj {
                Proj::Q if permuted => Some(model.num_heads),
                Proj::K if permuted => Some(model.num_kv_heads),
                _ => None,
            };
            let b = match heads {
                Some(h) => {
                    let order = crate::weights::permute_rows(w.b.dim(0)?, h);
                    w.b.index_select(&Tensor::new(order.as_slice(), w.b.device())?, 0)?
                }
                None => w.b.clone(),
            };
            let f32_cpu = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
            tensors.push((
                format!("{stem}.lora_a"),
                QTensor::quantize(&f32_cpu(&w.a)?, GgmlDType::F32)?,
            ));
            tensors.push((
                format!("{stem}.lora_b"),
                QTensor::quantize(&f32_cpu(&b)?, GgmlDType::F32)?,
            ));
        }
        let metadata = [
            (
                "general.architecture",
                Value::String(model.architecture.name().into()),
            ),
            ("general.type", Value::String("adapter".into())),
            ("adapter.type", Value::String("lora".into())),
            ("adapter.lora.alpha", Value::F32(c.alpha as f32)),
        ];
        let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let mut file = std::fs::File::create(path).map_err(|e| ModelError::io(path, e))?;
        candle_core::quantized::gguf_file::write(&mut file, &meta, &refs).map_err(|source| {
            ModelError::Gguf {
                path: path.to_path_buf(),
                source: Box::new(source),
            }
        })?;
        file.sync_all().map_err(|e| ModelError::io(path, e))
    }
}
