//! Text generation: prefill the prompt through the KV cache, then decode one token at a time with a
//! [`Sampler`], streaming text as it becomes final. [`Sequence`] is one generation as a state machine
//! (what a batching scheduler steps); [`generate`] drives one to the end. Stops at an end-of-generation token, a stop string
//! (which is never emitted), `max_tokens`, or when the caller's callback says so.

use std::ops::ControlFlow;

use candle_core::Tensor;

use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::lora::AdapterStack;
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams, TokenLogprob};
use crate::tokenizer::{StreamDecoder, Tokenizer};

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
    let mut seq = Sequence::new(model, tokenizer, prompt, opts.clone())?;
    let mut logits = seq.prefill(model, adapters)?;
    loop {
        let step = seq.accept(&logits)?;
        if !step.text.is_empty() && on_text(&step.text).is_break() {
            return Ok(seq.cancel());
        }
        let Some(token) = step.next else {
            break;
        };
        let ids = Tensor::new(&[token], model.device())?.unsqueeze(0)?;
        logits = model.forward_last(&ids, seq.cache_mut(), adapters)?;
    }
    let (generation, tail) = seq.finish()?;
    if !tail.text.is_empty() {
        let _ = on_text(&tail.text);
    }
    Ok(generation)
}

/// What one sampled token did to a [`Sequence`]: the text it released (possibly none: held back for a
/// stop string, or half a character), the log-probabilities of the tokens that text completes (when
/// asked for), and the token to run next (`None`: the sequence is done).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub next: Option<u32>,
}

/// One generation as a state machine, so that a scheduler can step many of them in one batched
/// forward pass: [`Sequence::prefill`] runs the prompt, then each [`Sequence::accept`] samples from
/// the logits of the last position and says which token to run next, until [`Sequence::finish`].
/// The sequence owns its KV cache.
pub struct Sequence<'t> {
    tokenizer: &'t Tokenizer,
    opts: GenerateOptions,
    sampler: Sampler,
    cache: KvCache,
    prompt: Vec<u32>,
    max_tokens: usize,
    history: Vec<u32>,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    /// How many of `logprobs` went out with released text.
    logprobs_released: usize,
    text: String,
    emitted: usize,
    decoder: StreamDecoder<'t>,
    stop_text: StopMatcher,
    finish: Option<FinishReason>,
    /// Prompt positions already in the cache.
    prefilled: usize,
    prefill_seconds: f64,
    decode_started: Option<std::time::Instant>,
}

impl<'t> Sequence<'t> {
    /// Check the prompt and the budget against the context, and set up the cache.
    pub fn new(
        model: &Model,
        tokenizer: &'t Tokenizer,
        prompt: &[u32],
        opts: GenerateOptions,
    ) -> Result<Self> {
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
        Ok(Self {
            tokenizer,
            sampler: Sampler::new(opts.sampling.clone())?,
            stop_text: StopMatcher::new(&opts.stop),
            opts,
            cache: model.new_cache(prompt.len() + max_tokens),
            prompt: prompt.to_vec(),
            max_tokens,
            history: prompt.to_vec(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            logprobs_released: 0,
            text: String::new(),
            emitted: 0,
            decoder: tokenizer.stream_decoder(),
            finish: None,
            prefilled: 0,
            prefill_seconds: 0.0,
            decode_started: None,
        })
    }

    /// Run the prompt through the cache; the logits of its last position ([1, vocab]).
    pub fn prefill(&mut self, model: &Model, adapters: &AdapterStack) -> Result<Tensor> {
        loop {
            if let Some(logits) = self.prefill_chunk(model, adapters, PREFILL_CHUNK)? {
                return Ok(logits);
            }
        }
    }

    /// Run at most `max` more prompt positions through the cache (a scheduler interleaves these
    /// with other sequences' decode steps); the logits of the prompt's last position once the whole
    /// prompt has run, `None` while some of it is left.
    pub fn prefill_chunk(
        &mut self,
        model: &Model,
        adapters: &AdapterStack,
        max: usize,
    ) -> Result<Option<Tensor>> {
        if self.prefilled == self.prompt.len() {
            return Err(ModelError::InvalidRequest {
                field: "prompt",
                reason: "has already run through the cache".into(),
            });
        }
        let started = std::time::Instant::now();
        let end = (self.prefilled + max.max(1)).min(self.prompt.len());
        let ids = Tensor::new(&self.prompt[self.prefilled..end], model.device())?.unsqueeze(0)?;
        let logits = model.forward_last(&ids, &mut self.cache, adapters)?;
        self.prefilled = end;
        self.prefill_seconds += started.elapsed().as_secs_f64();
        if end < self.prompt.len() {
            return Ok(None);
        }
        self.decode_started = Some(std::time::Instant::now());
        Ok(Some(logits))
    }

    /// Prompt positions still to run before the first token can be sampled.
    pub fn prefill_left(&self) -> usize {
        self.prompt.len() - self.prefilled
    }

    /// The cache the next token runs through.
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt.len()
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len()
    }

    /// Sample the next token from the logits of the last position run ([1, vocab] or [vocab]).
    pub fn accept(&mut self, logits: &Tensor) -> Result<Step> {
        let done = Step {
            text: String::new(),
            logprobs: Vec::new(),
            next: None,
        };
        if self.finish.is_some() {
            return Ok(done);
        }
        if self.tokens.len() >= self.max_tokens {
            self.finish = Some(FinishReason::Length);
            return Ok(done);
        }
        let row = logits
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let chosen = self
            .sampler
            .sample(&row, &self.history, self.opts.logprobs.unwrap_or(0));
        let token = chosen.token;
        if !self.opts.ignore_eos && self.tokenizer.is_end_of_generation(token) {
            self.finish = Some(FinishReason::Stop);
            return Ok(done);
        }
        self.tokens.push(token);
        self.history.push(token);
        if self.opts.logprobs.is_some() {
            self.logprobs.push(chosen);
        }
        if let Some(piece) = self.decoder.push(token)? {
            self.text.push_str(&piece);
        }
        // Release what can no longer turn into a stop string; stop at the first one found.
        let (end, stopped) = self.stop_text.check(&self.text, self.emitted);
        if stopped {
            self.text.truncate(end);
        }
        let text = self.text[self.emitted.min(end)..end].to_string();
        self.emitted = self.emitted.max(end);
        if stopped {
            self.finish = Some(FinishReason::Stop);
        } else if self.tokens.len() == self.max_tokens {
            self.finish = Some(FinishReason::Length);
        }
        let logprobs = if text.is_empty() {
            Vec::new()
        } else {
            self.take_logprobs()
        };
        Ok(Step {
            text,
            logprobs,
            next: self.finish.is_none().then_some(token),
        })
    }

    /// The log-probabilities not yet released with text.
    fn take_logprobs(&mut self) -> Vec<TokenLogprob> {
        let out = self.logprobs[self.logprobs_released..].to_vec();
        self.logprobs_released = self.logprobs.len();
        out
    }

    /// The caller stopped listening: what was released so far, finished as cancelled.
    pub fn cancel(mut self) -> Generation {
        self.text.truncate(self.emitted);
        self.into_generation(FinishReason::Cancelled)
    }

    /// The generation, and the text held back for a stop string that never came (cut at one that
    /// did) with its tokens' log-probabilities, which the caller has not been given yet.
    pub fn finish(mut self) -> Result<(Generation, Step)> {
        let mut finish = self.finish.unwrap_or(FinishReason::Length);
        let mut tail = Step {
            text: String::new(),
            logprobs: Vec::new(),
            next: None,
        };
        if !self.stop_text.matched {
            if let Some(piece) = self.decoder.finish()? {
                self.text.push_str(&piece);
            }
            let (end, stopped) = self.stop_text.check(&self.text, self.emitted);
            let end = if stopped {
                finish = FinishReason::Stop;
                end
            } else {
                self.text.len()
            };
            self.text.truncate(end);
            if end > self.emitted {
                tail.text = self.text[self.emitted..].to_string();
                tail.logprobs = self.take_logprobs();
            }
        } else {
            self.text.truncate(self.emitted);
        }
        Ok((self.into_generation(finish), tail))
    }

    fn into_generation(self, finish_reason: FinishReason) -> Generation {
        Generation {
            text: self.text,
            tokens: self.tokens,
            logprobs: self.logprobs,
            finish_reason,
            prompt_tokens: self.prompt.len(),
            prefill_seconds: self.prefill_seconds,
            decode_seconds: self
                .decode_started
                .map_or(0.0, |t| t.elapsed().as_secs_f64()),
        }
    }
}

/// Finds stop strings in generated text and tells how much of it is safe to release.
struct StopMatcher {
    stops: Vec<String>,
    longest: usize,
    matched: bool,
}

impl StopMatcher {
    fn new(stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
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
            .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
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
