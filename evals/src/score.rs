//! Scoring items on the served base with an adapter stack. Continuations (and every choice of a
//! multiple-choice item) are scored either one sequence per pass through the serving forward (on CPU:
//! pai's int8 kernels, the exact path `pai-serve` answers with; 582 vs 437 tokens/s packed on the
//! default model, BENCHMARKS.md), or packed side by side into rows of up to `row_tokens` tokens, each
//! sequence computed as if alone (`pai_model::Packed`), which is what batching devices want.
//! Logits are computed only where a token is scored. Generations run one at a time, greedy.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor, D};
use pai_model::{generate, AdapterStack, GenerateOptions, Model, PackedRow, Tokenizer};

use crate::error::Result;
use crate::item::{Detail, Item, ItemResult, Task};

/// The longest row `pai-train eval` and the nightly gate score in one pass, by default: a longer
/// sequence keeps its first this many tokens.
pub const DEFAULT_ROW_TOKENS: usize = 512;

/// A model, its tokenizer and the adapters to score with.
pub struct Scorer<'a> {
    pub model: &'a Model,
    pub tokenizer: &'a Tokenizer,
    pub adapters: AdapterStack<'a>,
    /// Longest row scored in one pass, within the model's context (longer sequences keep their
    /// first tokens).
    pub row_tokens: usize,
    /// Pack sequences into rows (else one sequence per pass). `Scorer::packs_by_default` says which
    /// is faster on a device.
    pub pack: bool,
}

/// A sequence's scored tokens: Σ log p, how many, and whether each was the likeliest token (greedy
/// decoding would have produced exactly them: lm-evaluation-harness's `is_greedy`).
#[derive(Debug, Clone, Copy, Default)]
struct Loglik {
    sum: f64,
    tokens: usize,
    greedy: bool,
}

/// One sequence to score: ids, and the index of the first position whose token is scored.
struct Sequence {
    ids: Vec<u32>,
    first_scored: usize,
}

impl Scorer<'_> {
    /// Packing pays on accelerators; on CPU the serving forward's int8 kernels are faster.
    pub fn packs_by_default(model: &Model) -> bool {
        !model.device().is_cpu()
    }

    /// Every item's result, in order.
    pub fn score(&self, items: &[Item]) -> Result<Vec<ItemResult>> {
        // 1. The sequences of every continuation and choice, with who they belong to.
        let mut sequences = Vec::new();
        let mut owners: Vec<(usize, usize)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match &item.task {
                Task::Continuation { context, text } => {
                    sequences.push(self.sequence(context, text)?);
                    owners.push((i, 0));
                }
                Task::Choice {
                    context, choices, ..
                } => {
                    for (c, choice) in choices.iter().enumerate() {
                        sequences.push(self.sequence(context, choice)?);
                        owners.push((i, c));
                    }
                }
                Task::Generate { .. } => {}
            }
        }
        // 2. Their log-likelihoods, packed into rows.
        let logliks = self.loglikelihoods(&sequences)?;
        let mut per_item: Vec<Vec<Loglik>> = vec![Vec::new(); items.len()];
        for ((item, _), ll) in owners.into_iter().zip(logliks) {
            per_item[item].push(ll);
        }
        // 3. Results; generations now.
        items
            .iter()
            .zip(per_item)
            .map(|(item, lls)| {
                let (score, detail) = match &item.task {
                    Task::Continuation { .. } => {
                        let ll = lls.first().copied().unwrap_or_default();
                        let nll = if ll.tokens == 0 {
                            0.0
                        } else {
                            -ll.sum / ll.tokens as f64
                        };
                        (
                            -nll,
                            Detail::Continuation {
                                tokens: ll.tokens,
                                nll,
                                greedy: ll.greedy,
                            },
                        )
                    }
                    Task::Choice { answer, .. } => {
                        let logliks: Vec<f64> = lls.iter().map(|ll| ll.sum).collect();
                        let chosen = logliks
                            .iter()
                            .enumerate()
                            .max_by(|a, b| a.1.total_cmp(b.1))
                            .map_or(0, |(c, _)| c);
                        (
                            f64::from(u8::from(chosen == *answer)),
                            Detail::Choice { chosen, logliks },
                        )
                    }
                    Task::Generate {
                        prompt,
                        check,
                        max_tokens,
                    } => {
                        let text = self.generate(prompt, *max_tokens)?;
                        (
                            f64::from(u8::from(check.holds(&text))),
                            Detail::Generate { text },
                        )
                    }
                };
                Ok(ItemResult {
                    id: item.id.clone(),
                    group: item.group.clone(),
                    score,
                    detail,
                })
            })
            .collect()
    }

    /// BOS (when the model wants one), the context's tokens, then the text's, encoded apart as
    /// lm-evaluation-harness does, so a choice's tokens are the same whatever the context.
    fn sequence(&self, context: &str, text: &str) -> Result<Sequence> {
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (self.tokenizer.adds_bos(), self.tokenizer.bos()) {
            ids.push(bos);
        }
        if !context.is_empty() {
            ids.extend(self.tokenizer.encode(context, false)?);
        }
        // The first token has nothing before it to be predicted from.
        let first_scored = ids.len().max(1);
        ids.extend(self.tokenizer.encode(text, false)?);
        ids.truncate(self.row_limit());
        Ok(Sequence { ids, first_scored })
    }

    /// The longest row: `row_tokens`, within the model's context.
    fn row_limit(&self) -> usize {
        self.row_tokens
            .min(self.model.config().context_length)
            .max(2)
    }

    /// The log-likelihood of each sequence's scored tokens.
    fn loglikelihoods(&self, sequences: &[Sequence]) -> Result<Vec<Loglik>> {
        if !self.pack {
            return sequences
                .iter()
                .map(|s| self.loglikelihood_alone(s))
                .collect();
        }
        let mut out = vec![Loglik::default(); sequences.len()];
        // Longest first, each into the first row with room (rows are at most `row_tokens`).
        let mut order: Vec<usize> = (0..sequences.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].ids.len()));
        let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in order {
            let len = sequences[i].ids.len();
            match rows
                .iter_mut()
                .find(|(used, _)| used + len <= self.row_tokens)
            {
                Some((used, members)) => {
                    *used += len;
                    members.push(i);
                }
                None => rows.push((len, vec![i])),
            }
        }
        for (_, members) in rows {
            let mut row = PackedRow::default();
            let mut targets = Vec::new();
            for &i in &members {
                let s = &sequences[i];
                row.ids.extend(&s.ids);
                row.doc_lens.push(s.ids.len());
                // Position p predicts token p + 1 of its own sequence; the last predicts nothing.
                targets.extend(s.ids.iter().skip(1).copied());
                targets.push(0);
            }
            let (logp, best) = self.token_logprobs(&row, &targets)?;
            let mut at = 0;
            for &i in &members {
                let s = &sequences[i];
                let range = at + s.first_scored - 1..at + s.ids.len() - 1;
                out[i] = Loglik {
                    sum: logp[range.clone()].iter().map(|&x| f64::from(x)).sum(),
                    tokens: range.len(),
                    greedy: best[range.clone()] == targets[range],
                };
                at += s.ids.len();
            }
        }
        Ok(out)
    }

    /// One sequence through the serving forward (a fresh cache), logits only where scored.
    fn loglikelihood_alone(&self, s: &Sequence) -> Result<Loglik> {
        let mut cache = self.model.new_cache(s.ids.len());
        let input = Tensor::new(s.ids.as_slice(), self.model.device())?.unsqueeze(0)?;
        let hidden = self
            .model
            .forward_hidden(&input, &mut cache, &self.adapters)?
            .squeeze(0)?;
        let n = s.ids.len() - s.first_scored;
        let logits = self
            .model
            .logits(&hidden.narrow(0, s.first_scored - 1, n)?)?;
        let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let wanted = &s.ids[s.first_scored..];
        let targets = Tensor::new(wanted, logp.device())?.unsqueeze(1)?;
        let picked = logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?;
        let best = logp.argmax(D::Minus1)?.to_vec1::<u32>()?;
        Ok(Loglik {
            sum: picked.iter().map(|&x| f64::from(x)).sum(),
            tokens: n,
            greedy: best == wanted,
        })
    }

    /// log p(target[p] | row[..=p]) at every position of one packed row, and the likeliest token.
    fn token_logprobs(&self, row: &PackedRow, targets: &[u32]) -> Result<(Vec<f32>, Vec<u32>)> {
        let packed = self.model.pack(std::slice::from_ref(row))?;
        let hidden = self.model.forward_packed(&packed, &self.adapters)?;
        let (_, seq, h) = hidden.dims3()?;
        let logits = self.model.logits(&hidden.reshape((seq, h))?)?;
        let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let best = logp.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let targets = Tensor::new(targets, logp.device())?.unsqueeze(1)?;
        Ok((
            logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?,
            best,
        ))
    }

    fn generate(&self, prompt: &str, max_tokens: usize) -> Result<String> {
        let ids = self.tokenizer.encode_prompt(prompt, false)?;
        let opts = GenerateOptions {
            max_tokens: Some(max_tokens),
            ..GenerateOptions::default()
        };
        let out = generate(
            self.model,
            self.tokenizer,
            &self.adapters,
            &ids,
            &opts,
            |_| ControlFlow::Continue(()),
        )?;
        Ok(out.text)
    }
}
