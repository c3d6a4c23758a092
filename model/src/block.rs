//! The transformer block shared by every llama-family architecture: RMSNorm, grouped-query attention
//! with RoPE and a KV cache, and the SwiGLU MLP. Each projection is a [`LoraLinear`], so adapters ride
//! on all seven without a second model tree.
//!
//! One forward serves inference and training: pai's fast kernels (which carry no gradient) run when the
//! input carries none, and differentiable candle ops run when it does (a trainer's LoRA variables are
//! upstream). Training batches are packed ([`Packed`]): positions restart and attention stays inside
//! each document, so they go through [`Block::forward_packed`] instead of a KV cache.

use candle_core::{Module, Tensor, D};

use crate::batch::{BatchRow, RowGroups};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::{self, AttentionSpec};
use crate::kv_cache::KvCache;
use crate::linear::LoraLinear;
use crate::lora::AdapterStack;
use crate::packed::Packed;
use crate::rope::Rope;

/// Root-mean-square norm with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f32 {
        self.eps
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            return Ok(candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)?);
        }
        if let Some(y) = kernels::rms_norm(x, &self.weight, self.eps)? {
            return Ok(y);
        }
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

/// Grouped-query self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q: LoraLinear,
    pub k: LoraLinear,
    pub v: LoraLinear,
    pub o: LoraLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

impl Attention {
    pub fn new(
        cfg: &ModelConfig,
        q: LoraLinear,
        k: LoraLinear,
        v: LoraLinear,
        o: LoraLinear,
    ) -> Self {
        Self {
            q,
            k,
            v,
            o,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            sliding_window: cfg.sliding_window,
        }
    }

    /// x: [batch, seq, hidden]; `mask` [seq, seq + cached] of 0/-inf, or None when seq is 1 and there is
    /// no window to apply.
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        rope: &Rope,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
        adapters: &AdapterStack,
    ) -> Result<Tensor> {
        let offset = cache.len();

        // 1. Project and split into heads: [b, heads, t, hd].
        let (q, k, v) = self.project(x, adapters)?;

        // 2. Rotate q and k by their absolute positions.
        let q = rope.apply(&q, offset)?;
        let k = rope.apply(&k, offset)?;

        // 3. Append to the cache; attend over every cached position.
        let (k, v) = cache.append(layer, &k, &v.contiguous()?)?;
        let spec = self.spec(offset);
        let out = match kernels::attention(&q, &k, &v, spec)? {
            Some(out) => out,
            None => Self::attend_with_candle(&q, &k, &v, mask, spec)?,
        };
        self.o.forward(&out, adapters)
    }

    /// Attention over packed rows with no cache (training): positions and the block-diagonal causal
    /// mask come from `packed`.
    pub fn forward_packed(
        &self,
        x: &Tensor,
        rope: &Rope,
        packed: &Packed,
        adapters: &AdapterStack,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x, adapters)?;
        let q = rope.apply_at(&q, &packed.cos, &packed.sin)?;
        let k = rope.apply_at(&k, &packed.cos, &packed.sin)?;
        let out = Self::attend_with_candle(
            &q,
            &k.contiguous()?,
            &v.contiguous()?,
            Some(&packed.mask),
            self.spec(0),
        )?;
        self.o.forward(&out, adapters)
    }

    /// q, k, v of x [b, t, hidden], split into heads: [b, heads, t, head_dim].
    fn project(&self, x: &Tensor, adapters: &AdapterStack) -> Result<(Tensor, Tensor, Tensor)> {
        self.project_with(x, |linear, x| linear.forward(x, adapters))
    }

    /// q, k and v split into heads ([b, heads, t, hd]), each projection made by `proj`.
    fn project_with(
        &self,
        x: &Tensor,
        proj: impl Fn(&LoraLinear, &Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?)
        };
        Ok((
            heads(proj(&self.q, x)?, self.num_heads)?,
            heads(proj(&self.k, x)?, self.num_kv_heads)?,
            heads(proj(&self.v, x)?, self.num_kv_heads)?,
        ))
    }

    /// One decode step of many sequences (x: [rows, 1, hidden]; see [`crate::batch`]): projections
    /// over every row at once, then rotation, cache and attention per row at its own position.
    pub fn forward_batch(
        &self,
        x: &Tensor,
        layer: usize,
        rope: &Rope,
        rows: &mut [BatchRow],
        groups: &RowGroups,
    ) -> Result<Tensor> {
        // 1. Project every row.
        let (q, k, v) = self.project_with(x, |linear, x| linear.forward_grouped(x, groups))?;

        // 2. Rotate each row at its own position, all rows in one op.
        let positions: Vec<u32> = rows.iter().map(|r| r.cache.len() as u32).collect();
        let positions = Tensor::new(positions.as_slice(), x.device())?;
        let (q, k) = (
            rope.apply_rows(&q, &positions)?,
            rope.apply_rows(&k, &positions)?,
        );

        // 3. Each row over its own cache.
        let mut outs = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter_mut().enumerate() {
            let offset = row.cache.len();
            let q = q.narrow(0, i, 1)?;
            let k = k.narrow(0, i, 1)?;
            let v = v.narrow(0, i, 1)?.contiguous()?;
            let (k, v) = row.cache.append(layer, &k, &v)?;
            let spec = self.spec(offset);
            let out = match kernels::attention(&q, &k, &v, spec)? {
                Some(out) => out,
                None => {
                    let mask = attention_mask(1, offset, self.sliding_window, q.device())?;
                    Self::attend_with_candle(&q, &k, &v, mask.as_ref(), spec)?
                }
            };
            outs.push(out);
        }
        self.o.forward_grouped(&Tensor::cat(&outs, 0)?, groups)
    }

    fn spec(&self, offset: usize) -> AttentionSpec {
        AttentionSpec {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            offset,
            window: self.sliding_window,
        }
    }

    /// Steps 4–6 with candle's ops, for devices and dtypes the CPU kernel does not take, and for
    /// training (differentiable). `mask` broadcasts to [b, kv_heads, group, t, total]: [t, total] for
    /// a cache, [b, 1, 1, t, t] for packed rows.
    fn attend_with_candle(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        spec: AttentionSpec,
    ) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let total = k.dim(2)?;
        // 4. Group the query heads that share a key/value head: [b, nkv, rep * t, hd].
        let nkv = spec.kv_heads;
        let rep = nh / nkv;
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;

        // 5. Causal (and sliding-window) mask, then softmax over keys.
        let scores = match mask {
            Some(m) => scores
                .reshape((b, nkv, rep, t, total))?
                .broadcast_add(m)?
                .reshape((b, nkv, rep * t, total))?,
            None => scores,
        };
        let probs = if scores.track_op() {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };

        // 6. Weighted sum of values, heads merged back: [b, t, nh * hd].
        let out = probs.matmul(v)?.reshape((b, nh, t, hd))?;
        Ok(out.transpose(1, 2)?.reshape((b, t, nh * hd))?)
    }
}

/// The SwiGLU feed-forward network: down(silu(gate(x)) · up(x)).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: LoraLinear,
    pub up: LoraLinear,
    pub down: LoraLinear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, adapters: &AdapterStack) -> Result<Tensor> {
        self.forward_with(x, |linear, x| linear.forward(x, adapters))
    }

    /// SwiGLU with each projection made by `proj`.
    fn forward_with(
        &self,
        x: &Tensor,
        proj: impl Fn(&LoraLinear, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let gate = proj(&self.gate, x)?;
        let up = proj(&self.up, x)?;
        let fast = if gate.track_op() || up.track_op() {
            None
        } else {
            kernels::silu_mul(&gate, &up)?
        };
        let h = match fast {
            Some(h) => h,
            None => (candle_nn::Activation::Silu.forward(&gate)? * up)?,
        };
        proj(&self.down, &h)
    }
}

/// One pre-norm transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub mlp_norm: RmsNorm,
    pub mlp: Mlp,
}

impl Block {
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        rope: &Rope,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
        adapters: &AdapterStack,
    ) -> Result<Tensor> {
        let h = self.attn.forward(
            &self.attn_norm.forward(x)?,
            layer,
            rope,
            cache,
            mask,
            adapters,
        )?;
        let x = residual(x, &h)?;
        let h = self.mlp.forward(&self.mlp_norm.forward(&x)?, adapters)?;
        residual(&x, &h)
    }

    /// One decode step of many sequences (see [`crate::batch`]).
    pub fn forward_batch(
        &self,
        x: &Tensor,
        layer: usize,
        rope: &Rope,
        rows: &mut [BatchRow],
        groups: &RowGroups,
    ) -> Result<Tensor> {
        let h = self
            .attn
            .forward_batch(&self.attn_norm.forward(x)?, layer, rope, rows, groups)?;
        let x = residual(x, &h)?;
        let h = self
            .mlp
            .forward_with(&self.mlp_norm.forward(&x)?, |linear, x| {
                linear.forward_grouped(x, groups)
            })?;
        residual(&x, &h)
    }

    /// The block over packed rows (training; see [`Attention::forward_packed`]).
    pub fn forward_packed(
        &self,
        x: &Tensor,
        rope: &Rope,
        packed: &Packed,
        adapters: &AdapterStack,
    ) -> Result<Tensor> {
        let h = self
            .attn
            .forward_packed(&self.attn_norm.forward(x)?, rope, packed, adapters)?;
        let x = residual(x, &h)?;
        let h = self.mlp.forward(&self.mlp_norm.forward(&x)?, adapters)?;
        residual(&x, &h)
    }
}

/// x + h, on pai's kernels where they take the tensors (and no gradient is needed).
fn residual(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    if x.track_op() || h.track_op() {
        return Ok((x + h)?);
    }
    match kernels::add(x, h)? {
        Some(y) => Ok(y),
        None => Ok((x + h)?),
    }
}

/// The additive attention mask for `seq` new positions after `offset` cached ones: 0 where a query may
/// look, -inf where the key is in its future or (with a window) too far in its past. `None` when
/// nothing needs masking (one new position, no window in reach).
pub fn attention_mask(
    seq: usize,
    offset: usize,
    window: Option<usize>,
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    let total = offset + seq;
    let window_bites = window.is_some_and(|w| total > w);
    if seq == 1 && !window_bites {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(seq * total);
    for i in 0..seq {
        let pos = offset + i;
        for j in 0..total {
            let future = j > pos;
            let too_old = window.is_some_and(|w| pos >= w && j <= pos - w);
            data.push(if future || too_old {
                f32::NEG_INFINITY
            } else {
                0.0
            });
        }
    }
    Ok(Some(Tensor::from_vec(data, (seq, total), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// The CPU kernel (f16 cache) against candle's ops (f32), with grouped heads, a batch of two, a cache offset and a
    /// sliding window that bites.
    #[test]
    fn cpu_attention_kernel_matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (b, nh, nkv) = (2, 6, 2);
        // Head sizes below, at and past the kernel's 64-column register block; key counts below and
        // past its 8-key score block.
        let cases = [
            (0, 7, None, 16),
            (5, 1, None, 64),
            (9, 4, Some(6), 16),
            (0, 33, Some(8), 80),
            (20, 3, None, 64),
            (2, 19, None, 136),
        ];
        for ((offset, seq, window, hd), dtype) in cases
            .into_iter()
            .flat_map(|c| [(c, DType::F32), (c, DType::F16)])
        {
            let total = offset + seq;
            let q = Tensor::randn(0f32, 1.0, (b, nh, seq, hd), &dev)?;
            // A cache buffer larger than what is used, viewed through `narrow` as the cache returns it.
            let cache = |_| -> Result<Tensor> {
                Ok(Tensor::randn(0f32, 1.0, (b, nkv, total + 3, hd), &dev)?
                    .to_dtype(dtype)?
                    .narrow(2, 0, total)?)
            };
            let (k, v) = (cache(0)?, cache(1)?);
            let spec = AttentionSpec {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                offset,
                window,
            };
            let mask = attention_mask(seq, offset, window, &dev)?;
            // With an f16 cache the kernel rounds q to f16 as llama.cpp does; candle gets the same
            // values in f32.
            let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
            let q16 = f32_of(&q.to_dtype(dtype)?)?;
            let want = Attention::attend_with_candle(
                &q16,
                &f32_of(&k)?,
                &f32_of(&v)?,
                mask.as_ref(),
                spec,
            )?;
            let got = kernels::attention(&q, &k, &v, spec)?.expect("f32 on the CPU");
            assert_eq!(got.dims(), want.dims());
            let diff = (got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            // With f16 the kernel also rounds the probabilities (relative error 2⁻¹¹ each).
            let tolerance = if dtype == DType::F16 { 2e-3 } else { 1e-5 };
            assert!(
                diff < tolerance,
                "{dtype:?} offset {offset} seq {seq} window {window:?} head_dim {hd}: {diff}"
            );
        }
        Ok(())
    }
}
