//! LoRA deltas on plain slices: `y += scale · (x · Aᵀ) · Bᵀ` for each adapter at a site, over all
//! rows or over the rows of one adapter group in a batched step. This is what serving runs: with
//! candle's ops each site cost a handful of dispatched operations (two products, a scale, an add),
//! which for a decode step of a 135M model took longer than the base's own quantized products. Training
//! keeps candle's path (its inputs carry a gradient), and so does anything this does not take
//! (another device or dtype, dropout).

use std::borrow::Cow;

use candle_core::{Tensor, D};

use super::elementwise::with_f32;
use super::gemm::{matmul, Out, View};
use crate::error::Result;
use crate::lora::LoraWeights;

/// The adapters of one group and the rows (of `x` and `y`) they apply to; `None`: every row.
pub type RowsOf<'a> = (Vec<&'a LoraWeights>, Option<&'a [usize]>);

/// `y` (the base's output for `x`) plus every group's LoRA deltas, or `None` when the tensors or
/// weights are not CPU f32, a weight has dropout, or `x` or a weight carries a gradient.
pub fn add_deltas(x: &Tensor, y: &Tensor, groups: &[RowsOf]) -> Result<Option<Tensor>> {
    if x.track_op() {
        return Ok(None);
    }
    let (in_dim, out_dim) = (x.dim(D::Minus1)?, y.dim(D::Minus1)?);
    let Some(mut out) = with_f32(y, <[f32]>::to_vec) else {
        return Ok(None);
    };
    let rows = out.len() / out_dim.max(1);
    let done = with_f32(x, |xs| {
        groups.iter().all(|(weights, picked)| {
            weights.iter().all(|w| {
                // Dropout, or weights being trained (a gradient wanted through them): candle's path.
                if w.dropout.is_some_and(|d| d.p > 0.0) || w.a.track_op() || w.b.track_op() {
                    return false;
                }
                let r = w.a.dims().first().copied().unwrap_or(0);
                let scale = w.scale as f32;
                with_f32(&w.a, |a| {
                    with_f32(&w.b, |b| {
                        if a.len() != r * in_dim || b.len() != out_dim * r {
                            return false;
                        }
                        add_one(
                            xs,
                            &mut out,
                            a,
                            b,
                            r,
                            (in_dim, out_dim),
                            rows,
                            *picked,
                            scale,
                        );
                        true
                    })
                })
                .flatten()
                .unwrap_or(false)
            })
        })
    });
    if done != Some(true) {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(out, y.shape(), y.device())?))
}

/// One adapter's delta added into `out`, over all rows or the `picked` ones.
#[allow(clippy::too_many_arguments)]
fn add_one(
    xs: &[f32],
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    r: usize,
    (in_dim, out_dim): (usize, usize),
    rows: usize,
    picked: Option<&[usize]>,
    scale: f32,
) {
    // x rows of the group, contiguous.
    let (n, x): (usize, Cow<[f32]>) = match picked {
        None => (rows, Cow::Borrowed(&xs[..rows * in_dim])),
        Some(idx) => (
            idx.len(),
            Cow::Owned(
                idx.iter()
                    .flat_map(|&i| &xs[i * in_dim..(i + 1) * in_dim])
                    .copied()
                    .collect(),
            ),
        ),
    };
    // down = x · Aᵀ: [n, r].
    let mut down = vec![0f32; n * r];
    matmul(
        &mut down,
        r,
        View::rows(&x, n, in_dim, in_dim),
        View::rows(a, r, in_dim, in_dim).t(),
        Out::Set(1.0),
        false,
    );
    let up = View::rows(b, out_dim, r, r).t();
    match picked {
        None => matmul(
            out,
            out_dim,
            View::rows(&down, n, r, r),
            up,
            Out::Add(scale),
            false,
        ),
        Some(idx) => {
            let mut delta = vec![0f32; n * out_dim];
            matmul(
                &mut delta,
                out_dim,
                View::rows(&down, n, r, r),
                up,
                Out::Set(scale),
                false,
            );
            for (k, &i) in idx.iter().enumerate() {
                let dst = &mut out[i * out_dim..(i + 1) * out_dim];
                for (d, s) in dst.iter_mut().zip(&delta[k * out_dim..(k + 1) * out_dim]) {
                    *d += s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn weights(r: usize, i: usize, o: usize, scale: f64) -> LoraWeights {
        let dev = Device::Cpu;
        LoraWeights {
            a: Tensor::randn(0f32, 1.0, (r, i), &dev).unwrap(),
            b: Tensor::randn(0f32, 1.0, (o, r), &dev).unwrap(),
            scale,
            dropout: None,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The slice path equals candle's `y + Σ delta(x)`, over all rows and per group of rows.
    #[test]
    fn deltas_match_candles_ops() {
        let dev = Device::Cpu;
        let (rows, i, o) = (5, 48, 40);
        let x = Tensor::randn(0f32, 1.0, (rows, 1, i), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (rows, 1, o), &dev).unwrap();
        let (p, q) = (weights(4, i, o, 2.0), weights(8, i, o, 0.5));
        let all = add_deltas(&x, &y, &[(vec![&p, &q], None)])
            .unwrap()
            .unwrap();
        let expected = ((&y + p.delta(&x).unwrap()).unwrap() + q.delta(&x).unwrap()).unwrap();
        assert!(max_diff(&all, &expected) < 1e-4);
        // Rows 0, 3 with p; rows 1, 4 with q; row 2 bare.
        let (pr, qr) = ([0usize, 3], [1usize, 4]);
        let grouped = add_deltas(&x, &y, &[(vec![&p], Some(&pr)), (vec![&q], Some(&qr))])
            .unwrap()
            .unwrap();
        for row in 0..rows {
            let xr = x.narrow(0, row, 1).unwrap();
            let yr = y.narrow(0, row, 1).unwrap();
            let want = match row {
                0 | 3 => (&yr + p.delta(&xr).unwrap()).unwrap(),
                1 | 4 => (&yr + q.delta(&xr).unwrap()).unwrap(),
                _ => yr.clone(),
            };
            assert!(
                max_diff(&grouped.narrow(0, row, 1).unwrap(), &want) < 1e-4,
                "row {row}"
            );
        }
    }
}
