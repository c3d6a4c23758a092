//! The llama-family transformer: token embedding, a stack of [`Block`]s, the final norm and the output
//! projection. Loading reads a GGUF file or a Hugging Face directory through [`WeightSource`].

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::batch::{BatchRow, RowGroups};
use crate::block::{attention_mask, Attention, Block, Mlp, RmsNorm};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::QuantMatrix;
use crate::kv_cache::KvCache;
use crate::linear::{FrozenLinear, LoraLinear, LoraSite, Proj};
use crate::lora::AdapterStack;
use crate::packed::{Packed, PackedRow};
use crate::rope::Rope;
use crate::weights::{Named, WeightSource};

/// The token embedding: rows looked up in the quantized matrix (shared with the output projection when
/// tied), or a dense f32 table.
#[derive(Debug, Clone)]
enum Embedding {
    Quantized(Arc<QuantMatrix>),
    Dense(Tensor),
}

/// A loaded transformer. Immutable after loading: adapters and caches are passed to each call.
#[derive(Debug, Clone)]
pub struct Model {
    config: ModelConfig,
    embedding: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    output: FrozenLinear,
    rope: Rope,
    device: Device,
}

impl Model {
    pub(crate) fn load(
        cfg: ModelConfig,
        weights: &mut WeightSource,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        // 1. The output projection, and the embedding, kept quantized where pai's kernels hold it (a
        // dense copy of the default model's embedding is 113 MB, more than the rest of the model).
        let output = weights.output(&cfg, device)?;
        let quantized = if weights.embedding_is_output(&cfg) {
            Some(output.clone())
        } else {
            weights.embedding_quantized(&cfg, device)?
        };
        let embedding = match quantized.as_ref().and_then(|e| e.quant_matrix()) {
            Some(m) => Embedding::Quantized(Arc::clone(m)),
            None => Embedding::Dense(weights.embedding(&cfg, device)?),
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for layer in 0..cfg.num_layers {
            let mut proj = |p: Proj| -> Result<LoraLinear> {
                let base = weights.projection(&cfg, layer, p, device)?;
                Ok(LoraLinear::new(base, LoraSite { layer, proj: p }))
            };
            let attn = Attention::new(
                &cfg,
                proj(Proj::Q)?,
                proj(Proj::K)?,
                proj(Proj::V)?,
                proj(Proj::O)?,
            );
            let mlp = Mlp {
                gate: proj(Proj::Gate)?,
                up: proj(Proj::Up)?,
                down: proj(Proj::Down)?,
            };
            let norm = |w: &mut WeightSource, n: Named| -> Result<RmsNorm> {
                Ok(RmsNorm::new(w.named(n, &[h], device)?, cfg.rms_norm_eps))
            };
            blocks.push(Block {
                attn_norm: norm(weights, Named::AttnNorm(layer))?,
                attn,
                mlp_norm: norm(weights, Named::MlpNorm(layer))?,
                mlp,
            });
        }
        let norm = RmsNorm::new(
            weights.named(Named::OutputNorm, &[h], device)?,
            cfg.rms_norm_eps,
        );
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.context_length, device)?;
        Ok(Self {
            config: cfg,
            embedding,
            blocks,
            norm,
            output,
            rope,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// A fresh KV cache for sequences of up to `capacity` positions (it grows if needed). Quantized
    /// models on the CPU keep f16 keys and values, as llama.cpp does by default (half the memory; the
    /// weights' own rounding dwarfs the cache's); dense models keep f32, so they compute exactly what
    /// transformers does.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let quantized = self
            .blocks
            .first()
            .is_some_and(|b| b.attn.q.base().is_quantized());
        let dtype = match self.device {
            Device::Cpu if quantized => DType::F16,
            _ => DType::F32,
        };
        KvCache::new(&self.config, capacity, dtype, &self.device)
    }

    /// Run `ids` ([batch, seq] u32) after the positions already in `cache` and return the final hidden
    /// states [batch, seq, hidden]. The cache advances by `seq`.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        adapters: &AdapterStack,
    ) -> Result<Tensor> {
        let seq = ids.dim(1)?;
        let offset = cache.len();
        // 1. Embed.
        let mut x = self.embed(ids)?;
        // 2. One mask for every layer.
        let mask = attention_mask(seq, offset, self.config.sliding_window, &self.device)?;
        // 3. The blocks.
        for (layer, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, layer, &self.rope, cache, mask.as_ref(), adapters)?;
        }
        cache.advance(seq);
        // 4. Final norm.
        self.norm.forward(&x)
    }

    /// A packed training batch for this model (positions and masks per document).
    pub fn pack(&self, rows: &[PackedRow]) -> Result<Packed> {
        Packed::new(rows, &self.rope, self.config.context_length, &self.device)
    }

    /// Final hidden states [rows, seq, hidden] of a packed batch, with no cache. Differentiable towards
    /// the adapters' weights when they are trainable variables (the base stays frozen).
    pub fn forward_packed(&self, packed: &Packed, adapters: &AdapterStack) -> Result<Tensor> {
        let mut x = self.embed_packed(packed)?;
        for layer in 0..self.blocks.len() {
            x = self.block_packed(layer, &x, packed, adapters)?;
        }
        self.final_norm(&x)
    }

    /// Step 1 of [`Model::forward_packed`]: the token embeddings [rows, seq, hidden].
    pub fn embed_packed(&self, packed: &Packed) -> Result<Tensor> {
        self.embed(&packed.ids)
    }

    /// Token embeddings of a flat list of ids: [ids, hidden].
    pub fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        let embedded = match &self.embedding {
            Embedding::Quantized(m) => m.rows_tensor(ids)?,
            Embedding::Dense(table) => {
                table.embedding(&Tensor::from_slice(ids, ids.len(), &self.device)?)?
            }
        };
        Ok(embedded)
    }

    /// Token embeddings of ids [batch, seq] (u32): [batch, seq, hidden].
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let embedded = match &self.embedding {
            Embedding::Quantized(m) => m.rows_tensor(&flat.to_vec1::<u32>()?)?,
            Embedding::Dense(table) => table.embedding(&flat)?,
        };
        Ok(embedded.reshape((batch, seq, self.config.hidden_size))?)
    }

    /// Step 2: block `layer` over packed rows (attention kept inside each document). Trainers call
    /// it layer by layer to recompute one block's graph at a time in the backward pass.
    pub fn block_packed(
        &self,
        layer: usize,
        x: &Tensor,
        packed: &Packed,
        adapters: &AdapterStack,
    ) -> Result<Tensor> {
        let block = self
            .blocks
            .get(layer)
            .ok_or_else(|| crate::ModelError::InvalidRequest {
                field: "layer",
                reason: format!("{layer} is past the model's {} layers", self.blocks.len()),
            })?;
        block.forward_packed(x, &self.rope, packed, adapters)
    }

    /// Step 3: the final norm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// The final norm's layer (for trainers that differentiate it themselves).
    pub fn output_norm(&self) -> &RmsNorm {
        &self.norm
    }

    /// The output projection (hidden → vocabulary logits).
    pub fn output(&self) -> &FrozenLinear {
        &self.output
    }

    /// Every frozen projection, the output one last (for memory policies such as
    /// [`crate::FrozenLinear::keep_backward_copy`]).
    pub fn frozen_linears(&self) -> impl Iterator<Item = &FrozenLinear> {
        self.blocks
            .iter()
            .flat_map(|b| {
                [
                    &b.attn.q,
                    &b.attn.k,
                    &b.attn.v,
                    &b.attn.o,
                    &b.mlp.gate,
                    &b.mlp.up,
                    &b.mlp.down,
                ]
            })
            .map(|l| l.base())
            .chain(std::iter::once(&self.output))
    }

    /// Logits [.., vocab] of hidden states [.., hidden].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.output.forward(hidden)
    }

    /// Logits of every position: [batch, seq, vocab].
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        adapters: &AdapterStack,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, cache, adapters)?;
        self.logits(&hidden)
    }

    /// One decode step of many sequences, each with its own token, cache and adapters (continuous
    /// batching; see [`crate::batch`]): logits [rows, vocab]. Every row's cache advances by one.
    pub fn decode_batch(&self, rows: &mut [BatchRow]) -> Result<Tensor> {
        let groups = RowGroups::of(rows, &self.device)?;
        // 1. Embed: [rows, 1, hidden].
        let ids: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let mut x = self.embed(&Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(1)?)?;
        // 2. The blocks.
        for (layer, block) in self.blocks.iter().enumerate() {
            x = block.forward_batch(&x, layer, &self.rope, rows, &groups)?;
        }
        for row in rows.iter_mut() {
            row.cache.advance(1);
        }
        // 3. Final norm and the logits of each row.
        self.logits(&self.norm.forward(&x)?.squeeze(1)?)
    }

    /// Logits of the last position only: [batch, vocab]. What a decode step needs.
    pub fn forward_last(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        adapters: &AdapterStack,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, cache, adapters)?;
        let seq = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, seq - 1, 1)?.squeeze(1)?)
    }
}
