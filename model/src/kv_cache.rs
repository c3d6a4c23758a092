//! The key/value cache: one preallocated buffer per layer that new positions are written into, so a
//! decode step costs no concatenation and no reallocation (the buffer grows by doubling only when a
//! sequence outruns the capacity it was created with).

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;

#[derive(Debug)]
struct LayerCache {
    /// [batch, kv_heads, capacity, head_dim]
    k: Tensor,
    v: Tensor,
}

/// Keys and values of every layer for the positions seen so far.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    len: usize,
    capacity: usize,
    max_capacity: usize,
    dtype: DType,
    device: Device,
}

impl KvCache {
    /// A cache that holds up to `capacity` positions before it has to grow (up to the model's context).
    pub fn new(cfg: &ModelConfig, capacity: usize, dtype: DType, device: &Device) -> Self {
        Self {
            layers: (0..cfg.num_layers).map(|_| None).collect(),
            len: 0,
            capacity: capacity.clamp(1, cfg.context_length),
            max_capacity: cfg.context_length,
            dtype,
            device: device.clone(),
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write this layer's new keys/values ([batch, kv_heads, seq, head_dim]) after the cached positions
    /// and return views of all positions so far. Call for every layer, then [`KvCache::advance`].
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (batch, heads, seq, head_dim) = k.dims4()?;
        let needed = self.len + seq;
        if needed > self.capacity {
            self.grow(needed)?;
        }
        let capacity = self.capacity;
        let entry = &mut self.layers[layer];
        let reuse = matches!(entry, Some(c) if c.k.dims4()? == (batch, heads, capacity, head_dim));
        if !reuse {
            let shape = (batch, heads, capacity, head_dim);
            *entry = Some(LayerCache {
                k: Tensor::zeros(shape, self.dtype, &self.device)?,
                v: Tensor::zeros(shape, self.dtype, &self.device)?,
            });
        }
        let Some(cache) = entry.as_ref() else {
            unreachable!("layer cache allocated above")
        };
        cache
            .k
            .slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 2, self.len)?;
        cache
            .v
            .slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 2, self.len)?;
        Ok((cache.k.narrow(2, 0, needed)?, cache.v.narrow(2, 0, needed)?))
    }

    /// Mark `seq` more positions as cached, once every layer has appended them.
    pub fn advance(&mut self, seq: usize) {
        self.len += seq;
    }

    fn grow(&mut self, needed: usize) -> Result<()> {
        let new_capacity = (self.capacity * 2)
            .max(needed)
            .min(self.max_capacity.max(needed));
        for entry in self.layers.iter_mut() {
            if let Some(c) = entry.take() {
                let (b, h, _, d) = c.k.dims4()?;
                let k = Tensor::zeros((b, h, new_capacity, d), self.dtype, &self.device)?;
                let v = Tensor::zeros((b, h, new_capacity, d), self.dtype, &self.device)?;
                if self.len > 0 {
                    k.slice_set(&c.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    v.slice_set(&c.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                *entry = Some(LayerCache { k, v });
            }
        }
        self.capacity = new_capacity;
        Ok(())
    }
}
