//! Tiny random llama-family models for tests (feature `test-util`). One set of random weights is
//! written both as a GGUF file, in the layout llama.cpp's converter produces (q/k rows permuted for
//! interleaved RoPE, F32 or quantized blocks), and as a Hugging Face directory, so tests can check that
//! both load to the same model, and other crates get a model that loads in milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::Architecture;
use crate::error::{ModelError, Result};
use crate::linear::Proj;
use crate::lora::proj_dims;
use crate::tokenizer::Tokenizer;
use crate::weights::permute_rows;

/// SmolLM2's chat template, which the tiny model carries too.
pub const SMOLLM_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [(&str, &str); 12] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġt", "he"),
    ("Ġ", "s"),
    ("r", "e"),
    ("a", "t"),
    ("Ġ", "Ġ"),
    ("ĠĠ", "ĠĠ"),
];

/// Shape of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub architecture: Architecture,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub context: usize,
    pub tied: bool,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            architecture: Architecture::Llama,
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            context: 256,
            tied: true,
            seed: 42,
        }
    }
}

/// Random weights in Hugging Face naming and row order, plus a byte-level BPE vocabulary.
pub struct TinyModel {
    pub spec: TinySpec,
    pub tensors: BTreeMap<String, Tensor>,
    tokens: Vec<String>,
}

/// GPT-2's byte-to-unicode table: the printable stand-in for each byte.
pub fn byte_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in printable.into_iter().zip(chars) {
        table[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    table
}

impl TinyModel {
    pub fn new(spec: TinySpec) -> Result<Self> {
        let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        tokens.extend(byte_to_unicode().into_iter().map(String::from));
        for (a, b) in MERGES {
            tokens.push(format!("{a}{b}"));
        }
        let vocab = tokens.len();
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let dev = Device::Cpu;
        let mut random = |shape: &[usize], scale: f32, offset: f32| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
                .collect();
            Ok(Tensor::from_vec(data, shape, &dev)?)
        };
        let h = spec.hidden;
        let cfg = Self::config_of(&spec, vocab);
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "model.embed_tokens.weight".into(),
            random(&[vocab, h], 1.0, 0.0)?,
        );
        tensors.insert("model.norm.weight".into(), random(&[h], 0.2, 1.0)?);
        if !spec.tied {
            tensors.insert("lm_head.weight".into(), random(&[vocab, h], 0.3, 0.0)?);
        }
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}");
            tensors.insert(
                format!("{p}.input_layernorm.weight"),
                random(&[h], 0.2, 1.0)?,
            );
            tensors.insert(
                format!("{p}.post_attention_layernorm.weight"),
                random(&[h], 0.2, 1.0)?,
            );
            for proj in Proj::ALL {
                let (i, o) = proj_dims(&cfg, proj);
                let scale = 1.0 / (i as f32).sqrt() * 1.7;
                let name = format!("{p}.{}.{}", proj.hf_parent(), proj.peft_name());
                tensors.insert(format!("{name}.weight"), random(&[o, i], scale, 0.0)?);
                if cfg.qkv_bias && matches!(proj, Proj::Q | Proj::K | Proj::V) {
                    tensors.insert(format!("{name}.bias"), random(&[o], 0.5, 0.0)?);
                }
            }
        }
        Ok(Self {
            spec,
            tensors,
            tokens,
        })
    }

    fn config_of(spec: &TinySpec, vocab: usize) -> crate::ModelConfig {
        crate::ModelConfig {
            architecture: spec.architecture,
            vocab_size: vocab,
            hidden_size: spec.hidden,
            intermediate_size: spec.intermediate,
            num_layers: spec.layers,
            num_heads: spec.heads,
            num_kv_heads: spec.kv_heads,
            head_dim: spec.hidden / spec.heads,
            rms_norm_eps: f64::from(1e-5f32),
            rope_theta: 100_000.0,
            context_length: spec.context,
            tie_word_embeddings: spec.tied,
            qkv_bias: spec.architecture == Architecture::Qwen2,
            sliding_window: None,
        }
    }

    /// The configuration this model loads with.
    pub fn config(&self) -> crate::ModelConfig {
        Self::config_of(&self.spec, self.tokens.len())
    }

    fn arch_name(&self) -> &'static str {
        match self.spec.architecture {
            Architecture::Qwen2 => "qwen2",
            _ => "llama",
        }
    }

    fn gguf_bytes(&self, dtype: GgmlDType) -> Result<Vec<u8>> {
        use gguf_file::Value as V;
        let arch = self.arch_name();
        let s = &self.spec;
        let mut meta: Vec<(String, V)> = vec![
            ("general.architecture".into(), V::String(arch.into())),
            ("general.name".into(), V::String("tiny-random".into())),
            (format!("{arch}.block_count"), V::U32(s.layers as u32)),
            (format!("{arch}.context_length"), V::U32(s.context as u32)),
            (format!("{arch}.embedding_length"), V::U32(s.hidden as u32)),
            (
                format!("{arch}.feed_forward_length"),
                V::U32(s.intermediate as u32),
            ),
            (
                format!("{arch}.attention.head_count"),
                V::U32(s.heads as u32),
            ),
            (
                format!("{arch}.attention.head_count_kv"),
                V::U32(s.kv_heads as u32),
            ),
            (format!("{arch}.rope.freq_base"), V::F32(100_000.0)),
            (
                format!("{arch}.attention.layer_norm_rms_epsilon"),
                V::F32(1e-5),
            ),
            ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), V::String("smollm".into())),
            (
                "tokenizer.ggml.tokens".into(),
                V::Array(self.tokens.iter().cloned().map(V::String).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                V::Array(
                    (0..self.tokens.len())
                        .map(|i| V::I32(if i < SPECIALS.len() { 3 } else { 1 }))
                        .collect(),
                ),
            ),
            (
                "tokenizer.ggml.merges".into(),
                V::Array(
                    MERGES
                        .iter()
                        .map(|(a, b)| V::String(format!("{a} {b}")))
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
            ("tokenizer.ggml.unknown_token_id".into(), V::U32(0)),
            ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
            (
                "tokenizer.chat_template".into(),
                V::String(SMOLLM_CHAT_TEMPLATE.into()),
            ),
        ];
        meta.sort_by(|a, b| a.0.cmp(&b.0));

        let permute = arch == "llama";
        let mut qtensors: Vec<(String, QTensor)> = Vec::new();
        for (hf_name, t) in &self.tensors {
            let gguf_name = gguf_name_of(hf_name);
            let t = match (permute, hf_name.as_str()) {
                (true, n) if n.ends_with("q_proj.weight") || n.ends_with("q_proj.bias") => {
                    permute_for_gguf(t, s.heads)?
                }
                (true, n) if n.ends_with("k_proj.weight") || n.ends_with("k_proj.bias") => {
                    permute_for_gguf(t, s.kv_heads)?
                }
                _ => t.clone(),
            };
            let dt = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
            qtensors.push((gguf_name, QTensor::quantize(&t, dt)?));
        }
        let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut out = Cursor::new(Vec::new());
        gguf_file::write(&mut out, &meta_refs, &tensor_refs)?;
        Ok(out.into_inner())
    }

    /// Write the model as a GGUF file with weight tensors of `dtype` (norms and biases stay F32).
    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) -> Result<PathBuf> {
        let bytes = self.gguf_bytes(dtype)?;
        std::fs::write(path, bytes).map_err(|e| ModelError::io(path, e))?;
        Ok(path.to_path_buf())
    }

    /// Write the model as a Hugging Face directory (config.json, tokenizer.json,
    /// tokenizer_config.json, model.safetensors).
    pub fn write_hf_dir(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let cfg = self.config();
        let config = serde_json::json!({
            "architectures": [if self.spec.architecture == Architecture::Qwen2 { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": self.arch_name(),
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "rms_norm_eps": cfg.rms_norm_eps,
            // transformers ≥ 5 layout.
            "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
            "max_position_embeddings": cfg.context_length,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "torch_dtype": "float32",
        });
        write_json(&dir.join("config.json"), &config)?;
        let tok_config = serde_json::json!({
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "add_bos_token": false,
            "chat_template": SMOLLM_CHAT_TEMPLATE,
        });
        write_json(&dir.join("tokenizer_config.json"), &tok_config)?;
        // The tokenizer is the one the GGUF metadata describes, saved in tokenizer.json form.
        let bytes = self.gguf_bytes(GgmlDType::F32)?;
        let content = gguf_file::Content::read(&mut Cursor::new(&bytes))?;
        let tokenizer = Tokenizer::from_gguf(&content, dir)?;
        let json =
            tokenizer
                .inner()
                .to_string(true)
                .map_err(|source| ModelError::TokenizerLib {
                    origin: dir.display().to_string(),
                    source,
                })?;
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json).map_err(|e| ModelError::io(&path, e))?;
        let tensors: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        Ok(dir.to_path_buf())
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        what: "generated JSON",
        source,
    })?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

fn permute_for_gguf(t: &Tensor, heads: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    let order = permute_rows(rows, heads);
    Ok(t.index_select(&Tensor::new(order.as_slice(), t.device())?, 0)?)
}

fn gguf_name_of(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap_or(hf);
    let (layer, rest) = rest.split_once('.').unwrap_or(("0", rest));
    let stem = match rest {
        "input_layernorm.weight" => "attn_norm.weight".to_string(),
        "post_attention_layernorm.weight" => "ffn_norm.weight".to_string(),
        other => {
            let mut parts = other.split('.');
            let _parent = parts.next();
            let proj = parts.next().and_then(Proj::from_peft_name);
            let suffix = parts.next().unwrap_or("weight");
            match proj {
                Some(p) => format!("{}.{suffix}", p.gguf_name()),
                None => other.to_string(),
            }
        }
    };
    format!("blk.{layer}.{stem}")
}
