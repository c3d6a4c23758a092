//! The local confidence probe: how familiar a request is to the local model, as the mean
//! log-likelihood per token (nats; 0 is certain, more negative is more surprising) of the request's
//! text under the base with the L1 adapter. Text the owner's adapter has learned, or everyday text
//! the base knows, scores high; unfamiliar jargon, other languages and unusual material score low.
//! The router compares it with the calibrated thresholds; `pai-train router calibrate` measures it
//! the same way on a labelled set.

use pai_model::{Adapter, AdapterStack, BaseModel};

/// The text the probe scores for a chat request: its messages' contents, in order.
pub fn probe_text<'a>(contents: impl IntoIterator<Item = &'a str>) -> String {
    contents.into_iter().collect::<Vec<_>>().join("\n\n")
}

/// The mean log-likelihood per token of the last `max_tokens` tokens of `text`, under `base` with
/// `adapter`. None for a text of fewer than two tokens, or when the model fails.
pub fn confidence(
    base: &BaseModel,
    adapter: Option<&Adapter>,
    text: &str,
    max_tokens: usize,
) -> Option<f64> {
    let ids = base.tokenizer.encode(text, false).ok()?;
    let ids = &ids[ids.len().saturating_sub(max_tokens)..];
    if ids.len() < 2 {
        return None;
    }
    let stack: Vec<&Adapter> = adapter.into_iter().collect();
    let stack = AdapterStack::new(&stack);
    match pai_model::perplexity::perplexity(&base.model, &stack, ids, max_tokens, |_, _| {}) {
        Ok(p) => Some(-p.mean_nll),
        Err(e) => {
            tracing::warn!(error = %e, "confidence probe failed");
            None
        }
    }
}
