//! The elementwise pieces of a transformer block with their backward passes, written out on plain
//! row-major slices for pai's own training step (`block_grad.rs`): RMSNorm, rotate-half RoPE and
//! SiLU(gate)·up. Each backward is the derivative of its forward, checked against candle's autograd in
//! the tests below.

use rayon::prelude::*;

/// Rows per parallel piece: enough work to pay for the hand-off.
fn rows_per_piece(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

/// y = x / rms(x) · w over rows of `w.len()` columns; returns y and each row's 1 / rms.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let mut y = vec![0f32; x.len()];
    let mut rstd = vec![0f32; x.len() / h];
    let piece = rows_per_piece(h);
    y.par_chunks_mut(h * piece)
        .zip(rstd.par_chunks_mut(piece))
        .zip(x.par_chunks(h * piece))
        .for_each(|((y, rstd), x)| {
            for ((y, r), x) in y.chunks_mut(h).zip(rstd.iter_mut()).zip(x.chunks(h)) {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * *r * w;
                }
            }
        });
    (y, rstd)
}

/// gx += ∂(x / rms(x) · w)/∂x · gy: r·(gy∘w) − x·r³·mean(gy∘w∘x), per row.
pub(crate) fn rms_norm_backward(x: &[f32], w: &[f32], rstd: &[f32], gy: &[f32], gx: &mut [f32]) {
    let h = w.len();
    let piece = rows_per_piece(h);
    gx.par_chunks_mut(h * piece)
        .zip(x.par_chunks(h * piece))
        .zip(gy.par_chunks(h * piece))
        .zip(rstd.par_chunks(piece))
        .for_each(|(((gx, x), gy), rstd)| {
            for (((gx, x), gy), &r) in gx
                .chunks_mut(h)
                .zip(x.chunks(h))
                .zip(gy.chunks(h))
                .zip(rstd)
            {
                let dot: f32 = gy.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
                let c = r * r * r * dot / h as f32;
                for (((gx, x), gy), w) in gx.iter_mut().zip(x).zip(gy).zip(w) {
                    *gx += r * gy * w - x * c;
                }
            }
        });
}

/// Rotate every head of x [tokens, heads · head_dim] in place by its token's angles (`cos`, `sin`
/// [tokens, head_dim / 2]), rotate-half layout; `inverse` applies the transposed rotation (the
/// backward pass: a rotation's gradient is the gradient rotated back).
pub(crate) fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], inverse: bool) {
    let half = head_dim / 2;
    let width = x.len() / (cos.len() / half).max(1);
    let sign = if inverse { -1.0 } else { 1.0 };
    let piece = rows_per_piece(width);
    x.par_chunks_mut(width * piece)
        .zip(cos.par_chunks(half * piece))
        .zip(sin.par_chunks(half * piece))
        .for_each(|((x, cos), sin)| {
            for ((row, c), s) in x
                .chunks_mut(width)
                .zip(cos.chunks(half))
                .zip(sin.chunks(half))
            {
                for head in row.chunks_mut(head_dim) {
                    let (x1, x2) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (x1[i], x2[i]);
                        let s = sign * s[i];
                        x1[i] = a * c[i] - b * s;
                        x2[i] = b * c[i] + a * s;
                    }
                }
            }
        });
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// h = silu(gate) · up.
pub(crate) fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut h = vec![0f32; gate.len()];
    h.par_chunks_mut(16_384)
        .zip(gate.par_chunks(16_384))
        .zip(up.par_chunks(16_384))
        .for_each(|((h, g), u)| {
            for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                *h = g * sigmoid(g) * u;
            }
        });
    h
}

/// The gradients of gate and up from that of h = silu(gate) · up, written over `gate` and `up`
/// (which the caller no longer needs): ∂gate = gh·up·σ(g)·(1 + g·(1 − σ(g))), ∂up = gh·silu(g).
pub(crate) fn silu_mul_backward(gate: &mut [f32], up: &mut [f32], gh: &[f32]) {
    gate.par_chunks_mut(16_384)
        .zip(up.par_chunks_mut(16_384))
        .zip(gh.par_chunks(16_384))
        .for_each(|((g, u), gh)| {
            for ((g, u), &gh) in g.iter_mut().zip(u.iter_mut()).zip(gh) {
                let s = sigmoid(*g);
                let dg = gh * *u * s * (1.0 + *g * (1.0 - s));
                *u = gh * *g * s;
                *g = dg;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix::new(seed);
        (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "at {i}: {x} vs {y}");
        }
    }

    #[test]
    fn rms_norm_and_its_gradient_match_candle() -> candle_core::Result<()> {
        let (n, h) = (37, 24);
        let (x, w, gy) = (random(n * h, 1), random(h, 2), random(n * h, 3));
        let dev = Device::Cpu;
        let xv = Var::from_vec(x.clone(), (n, h), &dev)?;
        let wt = Tensor::from_vec(w.clone(), h, &dev)?;
        let y = candle_nn::ops::rms_norm_slow(xv.as_tensor(), &wt, 1e-5)?;
        let gyt = Tensor::from_vec(gy.clone(), (n, h), &dev)?;
        let grads = (&y * &gyt)?.sum_all()?.backward()?;
        let want_gx = grads.get(xv.as_tensor()).expect("grad").flatten_all()?;

        let (got_y, rstd) = rms_norm(&x, &w, 1e-5);
        close(&got_y, &y.flatten_all()?.to_vec1()?, 1e-5);
        let mut gx = vec![0.5f32; n * h];
        rms_norm_backward(&x, &w, &rstd, &gy, &mut gx);
        let want: Vec<f32> = want_gx.to_vec1::<f32>()?.iter().map(|g| g + 0.5).collect();
        close(&gx, &want, 1e-4);
        Ok(())
    }

    #[test]
    fn rope_inverse_undoes_it_and_matches_the_model() -> pai_model::Result<()> {
        let (tokens, heads, hd) = (5, 3, 8);
        let dev = Device::Cpu;
        let table = pai_model::rope::Rope::new(hd, 10_000.0, 16, &dev)?;
        let positions = Tensor::new(&[0u32, 3, 1, 7, 2], &dev)?;
        let (cos, sin) = table.tables_at(&positions)?;
        let (cos, sin) = (
            cos.flatten_all()?.to_vec1::<f32>()?,
            sin.flatten_all()?.to_vec1::<f32>()?,
        );
        let x = random(tokens * heads * hd, 4);
        let mut y = x.clone();
        rope(&mut y, hd, &cos, &sin, false);
        // The model's own RoPE on [1, heads, tokens, hd].
        let xt = Tensor::from_vec(x.clone(), (1, tokens, heads, hd), &dev)?.transpose(1, 2)?;
        let c = Tensor::from_vec(cos.clone(), (1, 1, tokens, hd / 2), &dev)?;
        let s = Tensor::from_vec(sin.clone(), (1, 1, tokens, hd / 2), &dev)?;
        let want = table
            .apply_at(&xt, &c, &s)?
            .transpose(1, 2)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        close(&y, &want, 1e-6);
        rope(&mut y, hd, &cos, &sin, true);
        close(&y, &x, 1e-6);
        Ok(())
    }

    #[test]
    fn silu_mul_gradient_matches_candle() -> candle_core::Result<()> {
        let n = 40_000;
        let (g, u, gh) = (random(n, 5), random(n, 6), random(n, 7));
        let dev = Device::Cpu;
        let gv = Var::from_vec(g.clone(), n, &dev)?;
        let uv = Var::from_vec(u.clone(), n, &dev)?;
        let h = (candle_nn::ops::silu(gv.as_tensor())? * uv.as_tensor())?;
        let grads = (&h * Tensor::from_vec(gh.clone(), n, &dev)?)?
            .sum_all()?
            .backward()?;
        close(&silu_mul(&g, &u), &h.to_vec1()?, 1e-5);
        let (mut dg, mut du) = (g.clone(), u.clone());
        silu_mul_backward(&mut dg, &mut du, &gh);
        close(&dg, &grads.get(gv.as_tensor()).expect("g").to_vec1()?, 1e-5);
        close(&du, &grads.get(uv.as_tensor()).expect("u").to_vec1()?, 1e-5);
        Ok(())
    }
}
