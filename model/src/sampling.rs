//! Choosing the next token from logits: repetition penalty, then top-k, top-p and min-p filtering, then
//! temperature, then a seeded draw (or the argmax when the temperature is 0). Log-probabilities are
//! reported under the model's own distribution, before any of these transformations, as OpenAI does.

use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::error::{ModelError, Result};

/// How to pick tokens. The defaults are greedy decoding with no penalty.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to at least p (1 = off).
    pub top_p: f32,
    /// Drop tokens whose probability is below min_p times the most likely one's (0 = off).
    pub min_p: f32,
    /// CTRL-style penalty on tokens seen in the last `repeat_last_n` positions (1 = off).
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    /// OpenAI's penalties on the tokens generated so far (not the prompt's), subtracted from the
    /// logits: `presence_penalty` once for a token that appeared, `frequency_penalty` per time it
    /// did. Both in [-2, 2]; 0 = off.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(ModelError::InvalidRequest { field, reason });
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                format!("must be ≥ 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(field, format!("must be in [-2, 2], got {v}"));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        Ok(())
    }
}

/// A chosen token with its log-probability and, when asked, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token was chosen so far (what the OpenAI penalties count).
    generated: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            generated: std::collections::HashMap::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick a token from `logits` given the tokens so far (`history`, for the penalty); report its
    /// log-probability and the `top_logprobs` most likely tokens.
    pub fn sample(&mut self, logits: &[f32], history: &[u32], top_logprobs: usize) -> TokenLogprob {
        let logprobs = log_softmax(logits);
        let mut scores = logits.to_vec();
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = if *s > 0.0 {
                        *s / p.repetition_penalty
                    } else {
                        *s * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        let token = if p.temperature == 0.0 {
            argmax(&scores)
        } else {
            self.draw(&scores)
        };
        *self.generated.entry(token as u32).or_default() += 1;
        let top = if top_logprobs > 0 {
            top_indices(&logprobs, top_logprobs)
                .into_iter()
                .map(|i| (i as u32, logprobs[i]))
                .collect()
        } else {
            Vec::new()
        };
        TokenLogprob {
            token: token as u32,
            logprob: logprobs[token],
            top,
        }
    }

    fn draw(&mut self, scores: &[f32]) -> usize {
        let p = &self.params;
        // Candidates sorted by score, most likely first.
        let mut cand: Vec<usize> = (0..scores.len())
            .filter(|&i| scores[i].is_finite())
            .collect();
        if cand.is_empty() {
            return argmax(scores);
        }
        cand.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = scores[cand[0]];
        let probs = |cand: &[usize]| -> Vec<f32> {
            let e: Vec<f32> = cand.iter().map(|&i| (scores[i] - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            e.into_iter().map(|x| x / sum).collect()
        };
        if p.top_p < 1.0 {
            let pr = probs(&cand);
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (n, q) in pr.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = n + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let pr = probs(&cand);
            let floor = pr[0] * p.min_p;
            let keep = pr.iter().take_while(|&&q| q >= floor).count();
            cand.truncate(keep.max(1));
        }
        let weights: Vec<f32> = cand
            .iter()
            .map(|&i| ((scores[i] - max) / p.temperature).exp())
            .collect();
        match WeightedIndex::new(&weights) {
            Ok(dist) => cand[dist.sample(&mut self.rng)],
            Err(_) => cand[0],
        }
    }
}

pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let log_sum = sum.ln() as f32 + max;
    logits.iter().map(|&x| x - log_sum).collect()
}

fn top_indices(xs: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(n - 1, |&a, &b| xs[b].total_cmp(&xs[a]));
    idx.truncate(n);
    idx.sort_unstable_by(|&a, &b| xs[b].total_cmp(&xs[a]).then(a.cmp(&b)));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_and_frequency_penalties_count_what_was_generated() {
        let logits = [0.0, 2.0, 1.5];
        let greedy = |presence, frequency| {
            let mut s = Sampler::new(SamplingParams {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..Default::default()
            })
            .unwrap();
            // The prompt (history) does not count; only what this sampler chose.
            (0..4)
                .map(|_| s.sample(&logits, &[1, 1, 1], 0).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(greedy(0.0, 0.0), [1, 1, 1, 1]);
        // Once chosen a token loses 1.0, however often: 2.0 − 1 < 1.5, then 1.0 > 1.5 − 1.
        assert_eq!(greedy(1.0, 0.0), [1, 2, 1, 1]);
        // Per occurrence: 2.0 − 0.3n against 1.5 − 0.3m.
        assert_eq!(greedy(0.0, 0.3), [1, 1, 2, 1]);
        assert!(Sampler::new(SamplingParams {
            frequency_penalty: 2.5,
            ..Default::default()
        })
        .is_err());
    }

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p).unwrap()
    }

    #[test]
    fn greedy_picks_argmax_and_reports_logprobs() {
        let mut s = sampler(SamplingParams::default());
        let t = s.sample(&[0.0, 2.0, 1.0], &[], 2);
        assert_eq!(t.token, 1);
        let want = 2.0 - (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((t.logprob - want).abs() < 1e-5);
        assert_eq!(t.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.0, 2.0, 1.5], &[1], 0).token, 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[], 0).token as usize, argmax(&logits));
        let draw = |seed| {
            let mut s = sampler(SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            });
            (0..20)
                .map(|_| s.sample(&logits, &[], 0).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_and_min_p_restrict_the_support() {
        // probabilities ≈ [0.64, 0.24, 0.09, 0.03]
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        for _ in 0..3 {
            let mut s = sampler(SamplingParams {
                temperature: 1.0,
                top_p: 0.6,
                seed: 3,
                ..Default::default()
            });
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[], 0).token, 0);
            }
        }
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            min_p: 0.3,
            seed: 1,
            ..Default::default()
        });
        let mut seen = [false; 4];
        for _ in 0..300 {
            seen[s.sample(&logits, &[], 0).token as usize] = true;
        }
        assert_eq!(seen, [true, true, false, false]);
    }

    #[test]
    fn invalid_params_are_refused() {
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        })
        .is_err());
    }
}
