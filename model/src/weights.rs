//! Where a model's tensors come from: a GGUF file (quantized blocks kept as they are) or a Hugging Face
//! directory of safetensors (dense). Both are read through one typed interface keyed by what a tensor
//! *is* (layer, projection), so the model code never sees a file's naming scheme.
//!
//! GGUF files of the llama architecture store the q and k projection rows of each head permuted for
//! interleaved RoPE (llama.cpp's converter swaps each head's rows from [2, hd/2] to [hd/2, 2]). The
//! loader moves those rows back, block for block, without dequantizing: afterwards every model is in
//! Hugging Face order.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{ggml_file, gguf_file, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::linear::{FrozenLinear, Proj};

/// The non-projection tensors of a model.
#[derive(Debug, Clone, Copy)]
pub enum Named {
    Embedding,
    OutputNorm,
    Output,
    AttnNorm(usize),
    MlpNorm(usize),
}

pub(crate) enum WeightSource {
    Gguf {
        path: PathBuf,
        content: gguf_file::Content,
        file: File,
        /// Expand quantized projections to dense f32.
        dequantize: bool,
    },
    Safetensors {
        dir: PathBuf,
        tensors: MmapedSafetensors,
    },
}

impl WeightSource {
    pub fn gguf(path: &Path, content: gguf_file::Content, file: File, dequantize: bool) -> Self {
        Self::Gguf {
            path: path.to_path_buf(),
            content,
            file,
            dequantize,
        }
    }

    /// Memory-map every `*.safetensors` file of a Hugging Face model directory.
    pub fn safetensors_dir(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::MissingFile {
                path: dir.to_path_buf(),
                what: "*.safetensors",
            });
        }
        // SAFETY: the files are mapped read-only; pai never writes to a base model while it is loaded.
        let tensors =
            unsafe { MmapedSafetensors::multi(&files) }.map_err(|source| ModelError::Tensor {
                path: dir.to_path_buf(),
                name: "*".into(),
                source: Box::new(source),
            })?;
        Ok(Self::Safetensors {
            dir: dir.to_path_buf(),
            tensors,
        })
    }

    fn path(&self) -> &Path {
        match self {
            Self::Gguf { path, .. } => path,
            Self::Safetensors { dir, .. } => dir,
        }
    }

    fn name_of(&self, what: Named) -> String {
        let gguf = matches!(self, Self::Gguf { .. });
        match (what, gguf) {
            (Named::Embedding, true) => "token_embd.weight".into(),
            (Named::Embedding, false) => "model.embed_tokens.weight".into(),
            (Named::OutputNorm, true) => "output_norm.weight".into(),
            (Named::OutputNorm, false) => "model.norm.weight".into(),
            (Named::Output, true) => "output.weight".into(),
            (Named::Output, false) => "lm_head.weight".into(),
            (Named::AttnNorm(i), true) => format!("blk.{i}.attn_norm.weight"),
            (Named::AttnNorm(i), false) => format!("model.layers.{i}.input_layernorm.weight"),
            (Named::MlpNorm(i), true) => format!("blk.{i}.ffn_norm.weight"),
            (Named::MlpNorm(i), false) => {
                format!("model.layers.{i}.post_attention_layernorm.weight")
            }
        }
    }

    fn proj_name(&self, layer: usize, proj: Proj, suffix: &str) -> String {
        match self {
            Self::Gguf { .. } => format!("blk.{layer}.{}.{suffix}", proj.gguf_name()),
            Self::Safetensors { .. } => format!(
                "model.layers.{layer}.{}.{}.{suffix}",
                proj.hf_parent(),
                proj.peft_name()
            ),
        }
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Self::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            Self::Safetensors { tensors, .. } => tensors.get(name).is_ok(),
        }
    }

    fn tensor_err(&self, name: &str, source: candle_core::Error) -> ModelError {
        ModelError::Tensor {
            path: self.path().to_path_buf(),
            name: name.into(),
            source: Box::new(source),
        }
    }

    fn check_shape(&self, name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
        if actual != expected {
            return Err(ModelError::TensorShape {
                path: self.path().to_path_buf(),
                name: name.into(),
                expected: expected.to_vec(),
                actual: actual.to_vec(),
            });
        }
        Ok(())
    }

    /// A GGUF tensor as stored (quantized or not), on the CPU.
    fn gguf_qtensor(&mut self, name: &str) -> Result<QTensor> {
        let Self::Gguf {
            path,
            content,
            file,
            ..
        } = self
        else {
            unreachable!("gguf_qtensor on a safetensors source")
        };
        if !content.tensor_infos.contains_key(name) {
            return Err(ModelError::MissingTensor {
                path: path.clone(),
                name: name.into(),
            });
        }
        content
            .tensor(file, name, &Device::Cpu)
            .map_err(|source| ModelError::Tensor {
                path: path.clone(),
                name: name.into(),
                source: Box::new(source),
            })
    }

    /// A dense f32 tensor (norm weights, biases, embeddings), checked against `shape`.
    pub fn dense(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = match self {
            Self::Gguf { .. } => {
                let q = self.gguf_qtensor(name)?;
                q.dequantize(device)
                    .map_err(|source| self.tensor_err(name, source))?
            }
            Self::Safetensors { dir, tensors } => {
                if tensors.get(name).is_err() {
                    return Err(ModelError::MissingTensor {
                        path: dir.clone(),
                        name: name.into(),
                    });
                }
                tensors
                    .load(name, device)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|source| ModelError::Tensor {
                        path: dir.clone(),
                        name: name.into(),
                        source: Box::new(source),
                    })?
            }
        };
        self.check_shape(name, t.dims(), shape)?;
        Ok(t)
    }

    pub fn named(&mut self, what: Named, shape: &[usize], device: &Device) -> Result<Tensor> {
        let name = self.name_of(what);
        self.dense(&name, shape, device)
    }

    /// The token embedding [vocab, hidden]. A tied model may store the shared matrix under the output
    /// projection's name only (safetensors' `save_model` keeps one name per shared tensor).
    pub fn embedding(&mut self, cfg: &ModelConfig, device: &Device) -> Result<Tensor> {
        let shape = [cfg.vocab_size, cfg.hidden_size];
        let name = self.embedding_name(cfg);
        self.dense(&name, &shape, device)
    }

    /// The token embedding kept as the file stores it (GGUF only; `None` for safetensors), for models
    /// that look rows up in the quantized matrix instead of holding a dense f32 copy.
    pub fn embedding_quantized(
        &mut self,
        cfg: &ModelConfig,
        device: &Device,
    ) -> Result<Option<FrozenLinear>> {
        if !matches!(self, Self::Gguf { .. }) {
            return Ok(None);
        }
        let name = self.embedding_name(cfg);
        let q = self.gguf_qtensor(&name)?;
        self.check_shape(&name, q.shape().dims(), &[cfg.vocab_size, cfg.hidden_size])?;
        let q = move_qtensor(q, device).map_err(|source| self.tensor_err(&name, source))?;
        self.frozen(q, None, &name, device).map(Some)
    }

    /// Whether the embedding and the output projection are one tensor in the file.
    pub fn embedding_is_output(&self, cfg: &ModelConfig) -> bool {
        self.embedding_name(cfg) == self.output_name(cfg)
    }

    /// The output projection's tensor name: the embedding's when tied (or when there is no output
    /// tensor at all), under whichever name the shared matrix is stored.
    fn output_name(&self, cfg: &ModelConfig) -> String {
        let own = self.name_of(Named::Output);
        let embedding = self.name_of(Named::Embedding);
        if (cfg.tie_word_embeddings && self.has(&embedding)) || !self.has(&own) {
            embedding
        } else {
            own
        }
    }

    /// The embedding's tensor name (the output's when tied and stored only under that name).
    fn embedding_name(&self, cfg: &ModelConfig) -> String {
        let own = self.name_of(Named::Embedding);
        let output = self.name_of(Named::Output);
        if !self.has(&own) && cfg.tie_word_embeddings && self.has(&output) {
            output
        } else {
            own
        }
    }

    /// A projection's base weight and bias, in Hugging Face row order.
    pub fn projection(
        &mut self,
        cfg: &ModelConfig,
        layer: usize,
        proj: Proj,
        device: &Device,
    ) -> Result<FrozenLinear> {
        let (in_dim, out_dim) = crate::lora::proj_dims(cfg, proj);
        let name = self.proj_name(layer, proj, "weight");
        let bias_name = self.proj_name(layer, proj, "bias");
        // llama.cpp permutes q/k rows for interleaved RoPE in the llama architecture only.
        let is_gguf = matches!(self, Self::Gguf { .. });
        let permuted_heads = match proj {
            _ if !is_gguf || cfg.architecture == Architecture::Qwen2 => None,
            Proj::Q => Some(cfg.num_heads),
            Proj::K => Some(cfg.num_kv_heads),
            _ => None,
        };
        let bias = if self.has(&bias_name) {
            let b = self.dense(&bias_name, &[out_dim], device)?;
            Some(match permuted_heads {
                Some(h) => {
                    let rows = unpermute_rows(out_dim, h);
                    b.index_select(&Tensor::new(rows.as_slice(), device)?, 0)?
                }
                None => b,
            })
        } else {
            None
        };
        match self {
            Self::Gguf { .. } => {
                let q = self.gguf_qtensor(&name)?;
                self.check_shape(&name, q.shape().dims(), &[out_dim, in_dim])?;
                let q = match permuted_heads {
                    Some(h) => permute_qtensor_rows(&q, &unpermute_rows(out_dim, h), device)
                        .map_err(|source| self.tensor_err(&name, source))?,
                    None => {
                        move_qtensor(q, device).map_err(|source| self.tensor_err(&name, source))?
                    }
                };
                self.frozen(q, bias, &name, device)
            }
            Self::Safetensors { .. } => {
                let w = self.dense(&name, &[out_dim, in_dim], device)?;
                FrozenLinear::from_dense(w, bias)
            }
        }
    }

    /// A GGUF weight as a frozen linear: kept quantized, or expanded when asked to dequantize.
    fn frozen(
        &self,
        q: QTensor,
        bias: Option<Tensor>,
        name: &str,
        device: &Device,
    ) -> Result<FrozenLinear> {
        match self {
            Self::Gguf {
                dequantize: true, ..
            } => {
                let w = q
                    .dequantize(device)
                    .map_err(|source| self.tensor_err(name, source))?;
                FrozenLinear::from_dense(w, bias)
            }
            _ => FrozenLinear::from_qtensor(Arc::new(q), bias),
        }
    }

    /// The output projection: its own tensor, or the (quantized) token embedding when tied.
    pub fn output(&mut self, cfg: &ModelConfig, device: &Device) -> Result<FrozenLinear> {
        let name = self.output_name(cfg);
        let shape = [cfg.vocab_size, cfg.hidden_size];
        match self {
            Self::Gguf { .. } => {
                let q = self.gguf_qtensor(&name)?;
                self.check_shape(&name, q.shape().dims(), &shape)?;
                let q = move_qtensor(q, device).map_err(|source| self.tensor_err(&name, source))?;
                self.frozen(q, None, &name, device)
            }
            Self::Safetensors { .. } => {
                let w = self.dense(&name, &shape, device)?;
                FrozenLinear::from_dense(w, None)
            }
        }
    }
}

/// For each Hugging Face row, the GGUF row it is stored in: GGUF keeps row `h·hd + 2j + s` where
/// Hugging Face has `h·hd + s·hd/2 + j` (s ∈ {0, 1}, j < hd/2).
pub fn unpermute_rows(rows: usize, heads: usize) -> Vec<u32> {
    let hd = rows / heads;
    let half = hd / 2;
    (0..rows)
        .map(|r| {
            let (h, within) = (r / hd, r % hd);
            let (s, j) = (within / half, within % half);
            (h * hd + 2 * j + s) as u32
        })
        .collect()
}

/// The inverse of [`unpermute_rows`]: for each GGUF row, the Hugging Face row it holds.
pub fn permute_rows(rows: usize, heads: usize) -> Vec<u32> {
    let src = unpermute_rows(rows, heads);
    let mut inv = vec![0u32; rows];
    for (hf, &gguf) in src.iter().enumerate() {
        inv[gguf as usize] = hf as u32;
    }
    inv
}

/// Reorder the rows of a [rows, cols] quantized tensor: row `i` of the result is row `order[i]` of `q`.
/// Quantization blocks never straddle rows, so this moves bytes and changes no value.
fn permute_qtensor_rows(
    q: &QTensor,
    order: &[u32],
    device: &Device,
) -> candle_core::Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(rows * row_bytes);
    for &src in order {
        let start = src as usize * row_bytes;
        out.extend_from_slice(&data[start..start + row_bytes]);
    }
    ggml_file::qtensor_from_ggml(dtype, &out, vec![rows, cols], device)
}

fn move_qtensor(q: QTensor, device: &Device) -> candle_core::Result<QTensor> {
    if device.is_cpu() {
        return Ok(q);
    }
    let dims = q.shape().dims().to_vec();
    ggml_file::qtensor_from_ggml(q.dtype(), &q.data()?, dims, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2): gguf[h, j, s] = hf[h, s, j].
        let (heads, hd) = (3, 8);
        let rows = heads * hd;
        let mut gguf_holds = vec![0usize; rows];
        for h in 0..heads {
            for j in 0..hd / 2 {
                for s in 0..2 {
                    gguf_holds[h * hd + j * 2 + s] = h * hd + s * hd / 2 + j;
                }
            }
        }
        let un = unpermute_rows(rows, heads);
        for (hf_row, &g) in un.iter().enumerate() {
            assert_eq!(gguf_holds[g as usize], hf_row);
        }
        let p = permute_rows(rows, heads);
        for (g, &hf) in p.iter().enumerate() {
            assert_eq!(gguf_holds[g], hf as usize);
        }
    }
}
