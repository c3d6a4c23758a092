//! A base model as a user names it: one GGUF file or one Hugging Face directory, giving the weights,
//! the tokenizer and the chat template together, plus the fingerprint adapters are checked against.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use sha2::{Digest, Sha256};

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::lora::Adapter;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    HuggingFace,
}

/// How to load a base model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Expand quantized weights to dense f32 at load (4–8× the memory; exact f32 arithmetic, as
    /// transformers runs a GGUF).
    pub dequantize: bool,
}

/// Weights, tokenizer and chat template of one base model.
#[derive(Debug)]
pub struct BaseModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    path: PathBuf,
    name: String,
    format: ModelFormat,
    sha256: OnceLock<String>,
}

impl BaseModel {
    /// Load a GGUF file or a Hugging Face model directory onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with(path, device, LoadOptions::default())
    }

    pub fn load_with(path: &Path, device: &Device, options: LoadOptions) -> Result<Self> {
        if path.is_dir() {
            Self::load_hf_dir(path, device)
        } else {
            Self::load_gguf(path, device, options)
        }
    }

    fn load_gguf(path: &Path, device: &Device, options: LoadOptions) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|source| ModelError::Gguf {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let config = ModelConfig::from_gguf(&content, path)?;
        let tokenizer = Tokenizer::from_gguf(&content, path)?;
        let template = match content.metadata.get("tokenizer.chat_template") {
            Some(v) => Some(
                v.to_string()
                    .cloned()
                    .map_err(|e| ModelError::BadMetadata {
                        path: path.to_path_buf(),
                        key: "tokenizer.chat_template".into(),
                        reason: e.to_string(),
                    })?,
            ),
            None => None,
        };
        let name = match content.metadata.get("general.name").map(|v| v.to_string()) {
            Some(Ok(n)) => n.clone(),
            _ => file_stem(path),
        };
        let mut weights = WeightSource::gguf(path, content, file, options.dequantize);
        let model = Model::load(config, &mut weights, device)?;
        Self::assemble(model, tokenizer, template, path, name, ModelFormat::Gguf)
    }

    fn load_hf_dir(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let config = ModelConfig::from_hf_json(&text, &config_path)?;
        let tokenizer = Tokenizer::from_hf_dir(dir)?;
        let template = hf_chat_template(dir)?;
        let mut weights = WeightSource::safetensors_dir(dir)?;
        let model = Model::load(config, &mut weights, device)?;
        Self::assemble(
            model,
            tokenizer,
            template,
            dir,
            file_stem(dir),
            ModelFormat::HuggingFace,
        )
    }

    fn assemble(
        model: Model,
        tokenizer: Tokenizer,
        template: Option<String>,
        path: &Path,
        name: String,
        format: ModelFormat,
    ) -> Result<Self> {
        let chat_template = template
            .map(|t| ChatTemplate::new(&t, tokenizer.bos_text(), tokenizer.eos_text()))
            .transpose()?;
        tracing::info!(
            model = %path.display(),
            architecture = model.config().architecture.name(),
            layers = model.config().num_layers,
            "loaded base model"
        );
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            path: path.to_path_buf(),
            name,
            format,
            sha256: OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model's own name (GGUF `general.name`, else the file or directory name).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn format(&self) -> ModelFormat {
        self.format
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.chat_template
            .as_ref()
            .ok_or(ModelError::NoChatTemplate)
    }

    /// sha256 of the model file (of the safetensors files in name order for a directory), computed
    /// once, on first use.
    pub fn sha256(&self) -> Result<&str> {
        if let Some(s) = self.sha256.get() {
            return Ok(s);
        }
        let files: Vec<PathBuf> = match self.format {
            ModelFormat::Gguf => vec![self.path.clone()],
            ModelFormat::HuggingFace => {
                let mut f: Vec<PathBuf> = std::fs::read_dir(&self.path)
                    .map_err(|e| ModelError::io(&self.path, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                f.sort();
                f
            }
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for path in files {
            let mut file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            loop {
                let n = file.read(&mut buf).map_err(|e| ModelError::io(&path, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
        let hex: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(self.sha256.get_or_init(|| hex))
    }

    /// Load a PEFT adapter directory for this base, refusing one whose shapes, keys or recorded base
    /// fingerprint do not match.
    pub fn load_adapter(&self, dir: &Path) -> Result<Adapter> {
        let base_sha = if dir.join("pai.json").is_file() {
            Some(self.sha256()?)
        } else {
            None
        };
        Adapter::load_peft(dir, self.config(), base_sha, self.model.device())
    }
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The chat template of a Hugging Face directory: `chat_template.jinja`, or `chat_template` in
/// `tokenizer_config.json` (a string, or a list of named templates of which "default" is used).
fn hf_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| ModelError::io(&jinja, e));
    }
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        what: "tokenizer_config.json",
        source,
    })?;
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| items.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_owned),
        _ => None,
    })
}
