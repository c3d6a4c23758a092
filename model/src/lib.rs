//! pai-model: the transformer runtime pai trains and serves with.
//!
//! It loads llama-family base models (GGUF, quantized or not, or Hugging Face safetensors
//! directories), builds their tokenizer and chat template, and runs them with LoRA adapters riding on
//! every projection: generation with a KV cache and sampling, and perplexity. It knows nothing of HTTP,
//! datasets or registries.

pub mod base;
pub mod batch;
pub mod block;
pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
pub mod lora;
mod lora_save;
pub mod model;
pub mod packed;
pub mod perplexity;
pub mod rope;
pub mod sampling;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use base::{BaseModel, LoadOptions, ModelFormat};
pub use batch::BatchRow;
pub use chat::{ChatTemplate, Message, TrainingTokens};
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use generate::{generate, FinishReason, GenerateOptions, Generation, Sequence, Step};
pub use kv_cache::KvCache;
pub use linear::{BackwardCopyKind, FrozenLinear, LoraLinear, LoraSite, Proj};
pub use lora::{Adapter, AdapterStack, LoraConfig, LoraDropout, LoraWeights};
pub use model::Model;
pub use packed::{Packed, PackedRow};
pub use perplexity::{perplexity, Perplexity};
pub use sampling::{Sampler, SamplingParams, TokenLogprob};
pub use tokenizer::{StreamDecoder, Tokenizer};

pub use candle_core::{Device, Tensor};

/// The device pai computes on: the first CUDA GPU when built with `cuda` and one is present, the Metal
/// GPU when built with `metal`, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    #[cfg(feature = "metal")]
    if let Ok(d) = Device::new_metal(0) {
        return d;
    }
    Device::Cpu
}
