//! The typed model configuration, parsed once at the edge from GGUF metadata or a Hugging Face
//! `config.json`; everything inside pai-model reads these fields, never raw metadata.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The llama-family architectures pai runs. They share one block (pre-norm attention with RoPE and
/// grouped-query heads, SwiGLU MLP, RMSNorm); they differ in a few flags of [`ModelConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM and SmolLM2, TinyLlama and other llama-layout models.
    Llama,
    /// Mistral 7B-style: llama layout with an optional sliding attention window.
    Mistral,
    /// Qwen2 / Qwen2.5: llama layout with biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    /// Map an architecture name, as GGUF `general.architecture` or config.json `model_type` spell it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" | "smollm" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// Shapes and hyper-parameters of a llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// The context length the model was trained for; generation refuses to go past it.
    pub context_length: usize,
    /// Whether the output projection reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    /// Keys older than this many positions are masked (Mistral v0.1); `None` for full attention.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// Output width of the q projection.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Output width of the k and v projections.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The configuration of the model at `path` (a GGUF file's metadata, or a Hugging Face
    /// directory's `config.json`) without reading its weights.
    pub fn read(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let config_path = path.join("config.json");
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| ModelError::io(&config_path, e))?;
            return Self::from_hf_json(&text, &config_path);
        }
        let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|source| ModelError::Gguf {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        Self::from_gguf(&content, path)
    }

    /// Read the configuration from GGUF metadata (`general.architecture` and `{arch}.*` keys).
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let meta = GgufMeta { content, path };
        let arch_name = meta.string("general.architecture")?;
        let architecture = Architecture::from_name(&arch_name).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architecture: arch_name.clone(),
            }
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = meta.usize(&key("embedding_length"))?;
        let num_heads = meta.usize(&key("attention.head_count"))?;
        let num_kv_heads = meta
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => meta
                .opt_usize(&key("rope.dimension_count"))?
                .unwrap_or(hidden_size / num_heads.max(1)),
        };
        let vocab_size = match meta.opt_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => match content.metadata.get("tokenizer.ggml.tokens") {
                Some(v) => v
                    .to_vec()
                    .map_err(|e| meta.bad("tokenizer.ggml.tokens", e.to_string()))?
                    .len(),
                None => meta.tensor_dim("token_embd.weight", 0)?,
            },
        };
        if let Some(scaling) = content.metadata.get(&key("rope.scaling.type")) {
            let kind = scaling.to_string().map(String::as_str).unwrap_or("?");
            if kind != "none" {
                return Err(ModelError::Unsupported {
                    path: path.to_path_buf(),
                    what: format!("rope scaling `{kind}`"),
                    reason: "pai implements plain RoPE only".into(),
                });
            }
        }
        if content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                what: "tensor `rope_freqs.weight` (Llama 3.1 rope scaling)".into(),
                reason: "pai implements plain RoPE only".into(),
            });
        }
        let cfg = Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: meta.usize(&key("feed_forward_length"))?,
            num_layers: meta.usize(&key("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            context_length: meta.usize(&key("context_length"))?,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            sliding_window: meta.opt_usize(&key("attention.sliding_window"))?,
        };
        cfg.validate(path)
    }

    /// Read the configuration from a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            what: "config.json",
            source,
        })?;
        let architecture = Architecture::from_name(&raw.model_type).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architecture: raw.model_type.clone(),
            }
        })?;
        // RoPE: transformers ≥ 5 writes `rope_parameters` {rope_theta, rope_type, …}; older versions
        // `rope_theta` and `rope_scaling`.
        let rope_type = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let scaled = raw.rope_scaling.as_ref().filter(|v| !v.is_null());
        if rope_type != "default" || scaled.is_some() {
            let what = match scaled {
                Some(s) => format!("rope_scaling {s}"),
                None => format!("rope_type `{rope_type}`"),
            };
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                what,
                reason: "pai implements plain RoPE only".into(),
            });
        }
        let rope_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let sliding_window = match architecture {
            Architecture::Qwen2 if !raw.use_sliding_window.unwrap_or(false) => None,
            _ => raw.sliding_window,
        };
        let cfg = Self {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            context_length: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || raw.attention_bias.unwrap_or(false),
            sliding_window,
        };
        cfg.validate(path)
    }

    fn validate(self, path: &Path) -> Result<Self> {
        let bad = |key: &str, reason: String| ModelError::BadMetadata {
            path: path.to_path_buf(),
            key: key.into(),
            reason,
        };
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return Err(bad(
                "attention.head_count_kv",
                format!(
                    "{} query heads cannot be grouped over {} key/value heads",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("{} is not a positive even number", self.head_dim),
            ));
        }
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("context_length", self.context_length),
        ] {
            if v == 0 {
                return Err(bad(key, "must be positive".into()));
            }
        }
        Ok(self)
    }
}

/// The fields of a Hugging Face `config.json` that pai reads.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
}

/// Typed access to GGUF metadata with errors that name the file and key.
pub(crate) struct GgufMeta<'a> {
    pub content: &'a gguf_file::Content,
    pub path: &'a Path,
}

impl GgufMeta<'_> {
    pub fn bad(&self, key: &str, reason: String) -> ModelError {
        ModelError::BadMetadata {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason,
        }
    }

    fn missing(&self, key: &str) -> ModelError {
        ModelError::MissingMetadata {
            path: self.path.to_path_buf(),
            key: key.into(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    pub fn string(&self, key: &str) -> Result<String> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.to_string()
            .cloned()
            .map_err(|e| self.bad(key, e.to_string()))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        use gguf_file::Value as V;
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n: i128 = match v {
            V::U8(x) => (*x).into(),
            V::I8(x) => (*x).into(),
            V::U16(x) => (*x).into(),
            V::I16(x) => (*x).into(),
            V::U32(x) => (*x).into(),
            V::I32(x) => (*x).into(),
            V::U64(x) => (*x).into(),
            V::I64(x) => (*x).into(),
            other => return Err(self.bad(key, format!("expected an integer, found {other:?}"))),
        };
        usize::try_from(n)
            .map(Some)
            .map_err(|_| self.bad(key, format!("{n} is out of range")))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.opt_usize(key)? {
            None => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| self.bad(key, format!("{v} is out of range"))),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.to_bool().map_err(|e| self.bad(key, e.to_string())))
            .transpose()
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        use gguf_file::Value as V;
        match self.get(key) {
            None => Ok(None),
            Some(V::F32(x)) => Ok(Some(f64::from(*x))),
            Some(V::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(self.bad(key, format!("expected a float, found {other:?}"))),
        }
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn string_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v.to_vec().map_err(|e| self.bad(key, e.to_string()))?;
        items
            .iter()
            .map(|x| {
                x.to_string()
                    .cloned()
                    .map_err(|e| self.bad(key, e.to_string()))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn tensor_dim(&self, name: &str, dim: usize) -> Result<usize> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: self.path.to_path_buf(),
                    name: name.into(),
                })?;
        info.shape
            .dims()
            .get(dim)
            .copied()
            .ok_or_else(|| self.bad(name, format!("tensor has no dimension {dim}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""model_type": "llama", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 256"#;

    fn parse(extra: &str) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(&format!("{{{BASE}{extra}}}"), Path::new("config.json"))
    }

    #[test]
    fn rope_theta_in_either_transformers_layout() {
        assert_eq!(parse("").unwrap().rope_theta, 10_000.0);
        assert_eq!(
            parse(r#", "rope_theta": 500000.0"#).unwrap().rope_theta,
            500_000.0
        );
        let v5 = r#", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}"#;
        assert_eq!(parse(v5).unwrap().rope_theta, 100_000.0);
    }

    #[test]
    fn scaled_rope_is_refused_by_name() {
        let v5 = r#", "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}"#;
        let msg = parse(v5).unwrap_err().to_string();
        assert!(
            msg.contains("llama3") && msg.contains("config.json"),
            "{msg}"
        );
        let old = r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#;
        assert!(parse(old).unwrap_err().to_string().contains("linear"));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_no_window_unless_enabled() {
        let q = ModelConfig::from_hf_json(
            &format!(
                "{{{}, \"sliding_window\": 4096}}",
                BASE.replace("llama", "qwen2")
            ),
            Path::new("config.json"),
        )
        .unwrap();
        assert!(q.qkv_bias);
        assert_eq!(q.sliding_window, None);
    }
}
