//! The training loss: token cross-entropy with a weight per position (0 for prompt tokens, padding and
//! the last token of a document; the weights of a step sum to 1), fused into one op on the CPU so the
//! [tokens, vocab] logits are read twice and never copied (candle's log-softmax makes four copies of
//! them); other devices compose candle's ops.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

use crate::error::Result;

/// Σₙ wₙ·(logsumexp(zₙ) − zₙ[tₙ]) over logits z [N, vocab]: a scalar that differentiates towards z.
pub fn weighted_cross_entropy(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if targets.len() != n || weights.len() != n {
        return Err(candle_core::Error::Msg(format!(
            "cross-entropy: {n} logit rows, {} targets, {} weights",
            targets.len(),
            weights.len()
        ))
        .into());
    }
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        let op = CrossEntropy {
            targets: targets.into(),
            weights: weights.into(),
            lse: Arc::new(Mutex::new(Vec::new())),
        };
        return Ok(logits.apply_op1(op)?);
    }
    let device = logits.device();
    let log_probs = candle_core::Tensor::log_sum_exp(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let t = Tensor::from_slice(targets, (n, 1), device)?;
    let picked = logits.to_dtype(DType::F32)?.gather(&t, 1)?.squeeze(1)?;
    let w = Tensor::from_slice(weights, n, device)?;
    Ok(((log_probs - picked)? * w)?.sum_all()?)
}

/// Σₙ wₙ·(logsumexp(zₙ) − zₙ[tₙ]) over row-major logits z [N, vocab], with ∂/∂z written over the
/// logits (rows of weight 0 become 0): pai's own training step needs no graph around it. One
/// exponential per logit: each row's exp(z − max) is kept and rescaled by its sum.
pub fn cross_entropy_with_grad(
    logits: &mut [f32],
    vocab: usize,
    targets: &[u32],
    weights: &[f32],
) -> Result<f64> {
    use rayon::prelude::*;
    let n = targets.len();
    if logits.len() != n * vocab || weights.len() != n {
        return Err(candle_core::Error::Msg(format!(
            "cross-entropy: {} logits for {n} targets of a {vocab}-token vocabulary, {} weights",
            logits.len(),
            weights.len()
        ))
        .into());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(candle_core::Error::Msg(format!(
            "cross-entropy: target {t} outside the vocabulary ({vocab})"
        ))
        .into());
    }
    Ok(logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(weights.par_iter())
        .map(|((row, &t), &w)| {
            if w == 0.0 {
                row.fill(0.0);
                return 0.0;
            }
            let t = t as usize;
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let picked = row[t];
            let sum = pai_model::kernels::exp_shifted(row, max);
            let scale = w / sum;
            for z in row.iter_mut() {
                *z *= scale;
            }
            row[t] -= w;
            f64::from(w) * f64::from(max + sum.ln() - picked)
        })
        .sum())
}

struct CrossEntropy {
    targets: Arc<[u32]>,
    weights: Arc<[f32]>,
    /// logsumexp of each row, kept from the forward for the backward.
    lse: Arc<Mutex<Vec<f32>>>,
}

/// The rows of a contiguous [N, V] f32 CPU tensor.
fn rows<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("cross-entropy: logits not contiguous".into()))?;
    let data = match s {
        CpuStorage::F32(v) => &v[start..end],
        _ => candle_core::bail!("cross-entropy: logits must be f32"),
    };
    let (_, v) = l.shape().dims2()?;
    Ok((data, v))
}

/// Run `f` over row ranges on the available cores.
fn parallel_rows(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n.max(1));
    let chunk = n.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for start in (0..n).step_by(chunk) {
            let f = &f;
            s.spawn(move || f(start..(start + chunk).min(n)));
        }
    });
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&z| (z - max).exp()).sum();
    max + sum.ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "pai-weighted-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, v) = rows(s, l)?;
        let n = self.targets.len();
        let lse: Vec<Mutex<f32>> = (0..n).map(|_| Mutex::new(0.0)).collect();
        parallel_rows(n, |range| {
            for i in range {
                if self.weights[i] != 0.0 {
                    let value = log_sum_exp(&data[i * v..(i + 1) * v]);
                    if let Ok(mut slot) = lse[i].lock() {
                        *slot = value;
                    }
                }
            }
        });
        let lse: Vec<f32> = lse
            .into_iter()
            .map(|m| m.into_inner().unwrap_or(0.0))
            .collect();
        let mut loss = 0f64;
        for i in 0..n {
            let w = self.weights[i];
            if w != 0.0 {
                let target = self.targets[i] as usize;
                if target >= v {
                    candle_core::bail!(
                        "cross-entropy: target {target} outside the vocabulary ({v})"
                    );
                }
                loss += f64::from(w) * f64::from(lse[i] - data[i * v + target]);
            }
        }
        if let Ok(mut kept) = self.lse.lock() {
            *kept = lse;
        }
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let lse = self.lse.lock().map(|l| l.clone()).unwrap_or_default();
        let op = CrossEntropyGrad {
            targets: self.targets.clone(),
            weights: self.weights.clone(),
            lse,
            g: g.first().copied().unwrap_or(0.0),
        };
        Ok(Some(logits.apply_op1_no_bwd(&op)?))
    }
}

/// ∂loss/∂z = g·wₙ·(softmax(zₙ) − onehot(tₙ)).
struct CrossEntropyGrad {
    targets: Arc<[u32]>,
    weights: Arc<[f32]>,
    lse: Vec<f32>,
    g: f32,
}

impl CustomOp1 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "pai-weighted-cross-entropy-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, v) = rows(s, l)?;
        let n = self.targets.len();
        if self.lse.len() != n {
            candle_core::bail!("cross-entropy backward before its forward");
        }
        let mut out = vec![0f32; n * v];
        let chunks: Vec<Mutex<&mut [f32]>> = out.chunks_mut(v).map(Mutex::new).collect();
        parallel_rows(n, |range| {
            for i in range {
                let w = self.weights[i] * self.g;
                if w == 0.0 {
                    continue;
                }
                let Ok(mut row) = chunks[i].lock() else {
                    continue;
                };
                let z = &data[i * v..(i + 1) * v];
                for (o, &zi) in row.iter_mut().zip(z) {
                    *o = w * (zi - self.lse[i]).exp();
                }
                row[self.targets[i] as usize] -= w;
            }
        });
        drop(chunks);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused op against candle's composed ops: value and gradient.
    #[test]
    fn fused_matches_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let z = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (6, 11), &dev)?))?;
        let targets = [3u32, 0, 10, 5, 5, 1];
        let weights = [0.25f32, 0.0, 0.25, 0.1, 0.4, 0.0];
        let fused = weighted_cross_entropy(z.as_tensor(), &targets, &weights)?;
        let g_fused = fused.backward()?.get(z.as_tensor()).expect("grad").clone();

        let lp = candle_core::Tensor::log_sum_exp(z.as_tensor(), D::Minus1)?;
        let picked = z
            .as_tensor()
            .gather(&Tensor::new(&targets, &dev)?.unsqueeze(1)?, 1)?
            .squeeze(1)?;
        let composed = ((lp - picked)? * Tensor::new(&weights, &dev)?)?.sum_all()?;
        let g_composed = composed
            .backward()?
            .get(z.as_tensor())
            .expect("grad")
            .clone();

        let (a, b) = (fused.to_scalar::<f32>()?, composed.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let diff = (&g_fused - g_composed)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");

        // The graph-free version: same value, same gradient.
        let mut z2 = z.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let value = cross_entropy_with_grad(&mut z2, 11, &targets, &weights)?;
        assert!((value as f32 - b).abs() < 1e-5, "{value} vs {b}");
        let g = g_fused.flatten_all()?.to_vec1::<f32>()?;
        for (x, y) in z2.iter().zip(&g) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
        Ok(())
    }
}
