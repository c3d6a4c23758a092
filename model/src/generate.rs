//! Text generation: prefill the prompt through the KV cache, then decode one token at a time with a
//! [`Sampler`], streaming text as it becomes final. Stops at an end-of-generation token, a stop string
//! (which is never emitted), `max_tokens`, or when the caller's callback says so.

use std::ops::ControlFlow;

use candle_core::Tensor;

use crate::error::{ModelError, Result};
use crate::lora::AdapterStack;
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams, TokenLogprob};
use crate::tokenizer::Tokenizer;

/// Prompt positions run through the model per forward pass during prefill (bounds attention memory).
const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Tokens to generate at most; `None` = until the context is full.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Strings that end generation; the text stops just before the first one found.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens (for benchmarks).
    pub ignore_eos: bool,
    /// Report this many most-likely alternatives for each token (`None` = no log-probabilities).
    pub logprobs: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: Some(256),
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The callback asked to stop.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    /// One entry a generated token when `logprobs` was asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt and on the generated tokens.
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Generate a continuation of `prompt`. `on_text` receives each piece of text as soon as it is final
/// (never part of a stop string), and may return `ControlFlow::Break` to stop.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    adapters: &AdapterStack,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    let ctx = model.config().context_length;
    if prompt.is_empty() {
        return Err(ModelError::InvalidRequest {
            field: "prompt",
            reason: "is empty".into(),
        });
    }
    let vocab = model.config().vocab_size as u32;
    if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
        return Err(ModelError::InvalidRequest {
            field: "prompt",
            reason: format!("token id {bad} is outside the vocabulary (size {vocab})"),
        });
    }
    let max_tokens = opts.max_tokens.unwrap_or(ctx.saturating_sub(prompt.len()));
    if prompt.len() + max_tokens > ctx || prompt.len() >= ctx {
        return Err(ModelError::ContextOverflow {
            max: ctx,
            requested: prompt.len() + max_tokens,
            prompt: prompt.len(),
            completion: max_tokens,
        });
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let device = model.device();
    let mut cache = model.new_cache(prompt.len() + max_tokens);

    // 1. Prefill: run the prompt, keep the logits of its last position.
    let started = std::time::Instant::now();
    let mut logits = None;
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        let ids = Tensor::new(chunk, device)?.unsqueeze(0)?;
        logits = Some(model.forward_last(&ids, &mut cache, adapters)?);
    }
    let Some(mut logits) = logits else {
        unreachable!("the prompt is not empty")
    };
    let prefill_seconds = started.elapsed().as_secs_f64();

    // 2. Decode.
    let started = std::time::Instant::now();
    let mut history = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut logprobs = Vec::new();
    let mut text = String::new();
    let mut emitted = 0;
    let mut decoder = tokenizer.stream_decoder();
    let mut stop_text = StopMatcher::new(&opts.stop);
    let mut finish = FinishReason::Length;
    while tokens.len() < max_tokens {
        let row = logits
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let chosen = sampler.sample(&row, &history, opts.logprobs.unwrap_or(0));
        let token = chosen.token;
        if !opts.ignore_eos && tokenizer.is_end_of_generation(token) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(token);
        history.push(token);
        if opts.logprobs.is_some() {
            logprobs.push(chosen);
        }
        if let Some(piece) = decoder.push(token)? {
            text.push_str(&piece);
        }
        // Release what can no longer turn into a stop string; stop at the first one found.
        let (end, stopped) = stop_text.check(&text, emitted);
        if stopped {
            text.truncate(end);
        }
        if end > emitted {
            let flow = on_text(&text[emitted..end]);
            emitted = end;
            if flow.is_break() {
                finish = FinishReason::Cancelled;
                break;
            }
        }
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
        if tokens.len() == max_tokens {
            break;
        }
        let ids = Tensor::new(&[token], device)?.unsqueeze(0)?;
        logits = model.forward_last(&ids, &mut cache, adapters)?;
    }
    // 3. Release the text held back for a stop string that never came (cut at one that did).
    if finish != FinishReason::Cancelled && !stop_text.matched {
        if let Some(piece) = decoder.finish()? {
            text.push_str(&piece);
        }
        let (end, stopped) = stop_text.check(&text, emitted);
        let end = if stopped {
            finish = FinishReason::Stop;
            end
        } else {
            text.len()
        };
        text.truncate(end);
        if end > emitted {
            let _ = on_text(&text[emitted..]);
        }
    } else {
        text.truncate(emitted);
    }
    Ok(Generation {
        text,
        tokens,
        logprobs,
        finish_reason: finish,
        prompt_tokens: prompt.len(),
        prefill_seconds,
        decode_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Finds stop strings in generated text and tells how much of it is safe to release.
struct StopMatcher<'a> {
    stops: Vec<&'a str>,
    longest: usize,
    matched: bool,
}

impl<'a> StopMatcher<'a> {
    fn new(stops: &'a [String]) -> Self {
        let stops: Vec<&str> = stops
            .iter()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        Self {
            stops,
            longest,
            matched: false,
        }
    }

    /// (end of releasable text, whether a stop string was found there).
    fn check(&mut self, text: &str, emitted: usize) -> (usize, bool) {
        if self.stops.is_empty() {
            return (text.len(), false);
        }
        // A stop string may start up to `longest - 1` bytes before the unreleased text.
        let mut from = emitted.saturating_sub(self.longest);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let first = self
            .stops
            .iter()
            .filter_map(|s| text[from..].find(s).map(|i| from + i))
            .min();
        if let Some(at) = first {
            self.matched = true;
            return (at, true);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for n in (1..s.len().min(text.len() + 1)).rev() {
                if text.is_char_boundary(text.len() - n)
                    && s.as_bytes().starts_with(&text.as_bytes()[text.len() - n..])
                {
                    hold = hold.max(n);
                    break;
                }
            }
        }
        (text.len() - hold, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_back_prefixes_and_cuts_at_stop() {
        let stops = vec!["\nUser:".to_string(), "END".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.check("Hello", 0), (5, false));
        assert_eq!(m.check("Hello\nUs", 5), (5, false));
        assert_eq!(m.check("Hello\nUser: hi", 5), (5, true));
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.check("abcEN", 0), (3, false));
        assert_eq!(m.check("abcENX", 3), (6, false));
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.check("héllo END", 0), ("héllo ".len(), true));
    }
}
