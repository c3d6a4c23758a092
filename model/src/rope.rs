//! Rotary position embedding, in the Hugging Face ("rotate half") layout for every architecture.
//! GGUF files of the llama architecture store q/k rows permuted for the interleaved variant; the loader
//! undoes that permutation (see `weights.rs`), so one RoPE serves every model and PEFT adapters apply
//! without reordering.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Precomputed cos/sin tables, [max_positions, head_dim / 2].
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, max_positions: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }

    /// Rotate x: [batch, heads, seq, head_dim] whose first position is `offset`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, seq)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, offset, seq)?.to_dtype(x.dtype())?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }

    /// Rotate one token per row, each at its own position: x [rows, heads, 1, head_dim], positions
    /// [rows] (u32). One fused op for a batched decode step.
    pub fn apply_rows(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let (cos, sin) = self.tables_at(positions)?;
        let half = cos.dim(1)?;
        let cos = cos.reshape((rows, 1, half))?.to_dtype(x.dtype())?;
        let sin = sin.reshape((rows, 1, half))?.to_dtype(x.dtype())?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }

    /// cos and sin [n, head_dim / 2] of the given positions [n] (u32).
    pub fn tables_at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// Rotate x: [batch, heads, seq, head_dim] by per-token angles `cos`/`sin` [batch, 1, seq,
    /// head_dim / 2] (from [`Rope::tables_at`]), with differentiable ops: the rotate-half formula
    /// written out, since candle's fused RoPE has no backward.
    pub fn apply_at(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.dim(3)? / 2;
        let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
        let cos = cos.to_dtype(x.dtype())?;
        let sin = sin.to_dtype(x.dtype())?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[r1, r2], 3)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rotate_half_formula() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(4, 10_000.0, 8, &dev)?;
        let x = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6., 7., 8.], (1, 1, 2, 4), &dev)?;
        let y = rope.apply(&x, 3)?.flatten_all()?.to_vec1::<f32>()?;
        // position p, pair (i, i + 2) rotated by angle p * theta^(-2i/4).
        let mut want = vec![];
        for (p, row) in [(3.0f64, [1., 2., 3., 4.]), (4.0, [5., 6., 7., 8.])] {
            let a0 = p;
            let a1 = p * 10_000f64.powf(-0.5);
            let (c0, s0, c1, s1) = (a0.cos(), a0.sin(), a1.cos(), a1.sin());
            want.extend([
                row[0] * c0 - row[2] * s0,
                row[1] * c1 - row[3] * s1,
                row[2] * c0 + row[0] * s0,
                row[3] * c1 + row[1] * s1,
            ]);
        }
        for (g, w) in y.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{y:?} vs {want:?}");
        }
        Ok(())
    }

    #[test]
    fn per_token_positions_match_the_offset_form() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 10_000.0, 16, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &dev)?;
        let want = rope.apply(&x, 5)?;
        let positions = Tensor::new(&[5u32, 6, 7], &dev)?;
        let (cos, sin) = rope.tables_at(&positions)?;
        let got = rope.apply_at(&x, &cos.reshape((1, 1, 3, 4))?, &sin.reshape((1, 1, 3, 4))?)?;
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
