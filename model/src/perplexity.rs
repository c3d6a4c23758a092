//! Perplexity of a text under the model: the mean negative log-likelihood of each token given the ones
//! before it. Texts longer than the window are scored with overlapping windows (each token scored once,
//! with at least half a window of context), as Hugging Face's perplexity guide does.

use candle_core::{DType, Tensor, D};

use crate::error::{ModelError, Result};
use crate::lora::AdapterStack;
use crate::model::Model;

/// Positions per forward pass inside a window (bounds the logits held in memory).
const CHUNK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// Tokens whose probability was scored (all but the first).
    pub tokens_scored: usize,
    /// Mean cross-entropy in nats per token.
    pub mean_nll: f64,
    pub perplexity: f64,
}

/// Score `ids` with windows of at most `window` tokens. `on_progress(done, total)` is called as
/// positions are processed.
pub fn perplexity(
    model: &Model,
    adapters: &AdapterStack,
    ids: &[u32],
    window: usize,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if ids.len() < 2 {
        return Err(ModelError::InvalidRequest {
            field: "text",
            reason: format!("has {} token(s); at least 2 are needed", ids.len()),
        });
    }
    let window = window.clamp(2, model.config().context_length);
    let stride = if ids.len() <= window {
        window
    } else {
        window / 2
    };
    let device = model.device();
    let mut total_nll = 0f64;
    let mut scored = 0usize;
    // Tokens before `scored_until` have been scored already.
    let mut scored_until = 1usize;
    let mut start = 0usize;
    let mut processed = 0usize;
    let total_work = {
        let mut w = 0;
        let mut s = 0;
        loop {
            let end = (s + window).min(ids.len());
            w += end - s;
            if end == ids.len() {
                break w;
            }
            s += stride;
        }
    };
    loop {
        let end = (start + window).min(ids.len());
        let mut cache = model.new_cache(end - start);
        let mut pos = start;
        while pos < end {
            let chunk_end = (pos + CHUNK).min(end);
            let input = Tensor::new(&ids[pos..chunk_end], device)?.unsqueeze(0)?;
            let logits = model.forward(&input, &mut cache, adapters)?.squeeze(0)?;
            // Position p predicts token p + 1; score targets in [max(scored_until, pos + 1), chunk_end].
            let first_target = scored_until.max(pos + 1);
            let last_target = chunk_end.min(ids.len() - 1);
            if first_target <= last_target {
                let rows =
                    logits.narrow(0, first_target - 1 - pos, last_target + 1 - first_target)?;
                let logp = candle_nn::ops::log_softmax(&rows.to_dtype(DType::F32)?, D::Minus1)?;
                let targets =
                    Tensor::new(&ids[first_target..=last_target], device)?.unsqueeze(1)?;
                let picked = logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?;
                total_nll -= picked.iter().map(|&x| f64::from(x)).sum::<f64>();
                scored += picked.len();
                scored_until = last_target + 1;
            }
            processed += chunk_end - pos;
            on_progress(processed, total_work);
            pos = chunk_end;
        }
        if end == ids.len() {
            break;
        }
        start += stride;
    }
    let mean_nll = total_nll / scored as f64;
    Ok(Perplexity {
        tokens_scored: scored,
        mean_nll,
        perplexity: mean_nll.exp(),
    })
}
