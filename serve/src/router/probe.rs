//! The local confidence probe: how familiar a request is to the local model, as the mean
//! log-likelihood per token (nats; 0 is certain, more negative is more surprising) of the request's
//! text under the base with the L1 adapter, and how long the text is. Text the owner's adapter has
//! learned, or everyday text the base knows, scores high; unfamiliar jargon and unusual material
//! score low. Length matters as much: a short question is surprising per token (little context)
//! yet easy, and long, dense requests are where a small model falls short, so the score the
//! thresholds apply to is `mean_loglik - length_weight * ln(tokens)`, with the weight calibrated
//! along with the thresholds (`pai-train router calibrate`, which measures the same way).
//!
//! Beside the probe, two signals no cloud router has: the request's kind (`kind`), with an offset
//! per kind the calibration fits, and the served adapter's standing in the kind's domain — better,
//! the same or worse than the base, as its eval gates found (`pai_adapters::standing`) — weighted by
//! `gate_weight`. `Signals::score` adds them up.

use pai_adapters::Standing;
use pai_model::{Adapter, AdapterStack, BaseModel};
use serde::Serialize;

use super::config::Thresholds;
use super::kind::RequestKind;

/// What the probe measured on a request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Probe {
    /// Mean log-likelihood per token of the (last `probe_tokens` of the) text.
    pub mean_loglik: f64,
    /// Tokens of the whole text.
    pub tokens: usize,
}

/// Everything the score of a request is made of.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Signals {
    pub probe: Probe,
    pub kind: RequestKind,
    /// The served adapter's standing against the base in the kind's domain (`same` when unknown).
    pub standing: Standing,
}

impl Signals {
    /// The score `t` is compared against: higher stays more local.
    pub fn score(&self, t: &Thresholds) -> f64 {
        self.probe.mean_loglik - t.length_weight * (self.probe.tokens.max(1) as f64).ln()
            + t.kind_offset(self.kind.as_str())
            + t.gate_weight * self.standing.sign()
    }
}

/// The text the probe scores for a chat request: its messages' contents, in order.
pub fn probe_text<'a>(contents: impl IntoIterator<Item = &'a str>) -> String {
    contents.into_iter().collect::<Vec<_>>().join("\n\n")
}

/// The probe of `text`: the mean log-likelihood per token of its last `max_tokens` tokens under
/// `base` with `adapter`, and its length. None for a text of fewer than two tokens, or when the
/// model fails.
pub fn probe(
    base: &BaseModel,
    adapter: Option<&Adapter>,
    text: &str,
    max_tokens: usize,
) -> Option<Probe> {
    let all = base.tokenizer.encode(text, false).ok()?;
    let ids = &all[all.len().saturating_sub(max_tokens)..];
    if ids.len() < 2 {
        return None;
    }
    let stack: Vec<&Adapter> = adapter.into_iter().collect();
    let stack = AdapterStack::new(&stack);
    match pai_model::perplexity::perplexity(&base.model, &stack, ids, max_tokens, |_, _| {}) {
        Ok(p) => Some(Probe {
            mean_loglik: -p.mean_nll,
            tokens: all.len(),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "confidence probe failed");
            None
        }
    }
}
