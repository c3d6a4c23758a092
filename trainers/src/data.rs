//! From dataset examples to packed token rows. Each example becomes a [`TrainDoc`] (tokens, and which
//! of them the loss covers: every token of notes and code, only the middle of FIM examples, only the
//! assistant replies of a conversation, rendered with the model's own chat template); a [`Packer`] lays shuffled documents back to back into rows of `seq_len` tokens, cutting a
//! document that reaches the end of a row and continuing it in the next (positions restart, attention
//! never crosses a document: see `pai_model::packed`). The packer's position is a small [`Cursor`], so a
//! resumed run reads exactly the rows an uninterrupted one would.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use pai_datasets::fim::{self, Piece};
use pai_datasets::{Conversation, Example, FimTokens, Kind};
use pai_model::{ChatTemplate, Message, PackedRow, Tokenizer};

use crate::error::{Result, TrainError};
use crate::rng::SplitMix;

/// One training document: tokens, and which of them the loss covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainDoc {
    pub ids: Vec<u32>,
    /// The first token the loss covers: 0 for a plain document (all of it), else the end of a prompt
    /// that must stay in view of what follows.
    pub completion_start: usize,
    /// Ranges after `completion_start` the loss skips: a conversation's later user turns and the
    /// markup between replies. Empty for other documents.
    pub skipped: Vec<Range<usize>>,
}

impl TrainDoc {
    /// A document the loss covers whole.
    pub fn plain(ids: Vec<u32>) -> Self {
        Self {
            ids,
            completion_start: 0,
            skipped: Vec::new(),
        }
    }

    /// Whether predicting token `k` counts in the loss.
    pub fn counts(&self, k: usize) -> bool {
        k >= self.completion_start && !self.skipped.iter().any(|r| r.contains(&k))
    }
}

/// How examples become token sequences for one model.
#[derive(Debug, Clone)]
pub struct DocEncoder<'a> {
    tokenizer: &'a Tokenizer,
    /// The model's chat template, which renders conversations (none: chat examples are an error).
    chat: Option<&'a ChatTemplate>,
    fim: FimTokens,
    /// Whether the FIM markers are control tokens of the model (else they are learnt as text).
    fim_are_tokens: bool,
    /// Opens each document when the model's tokenizer adds one to prompts.
    bos: Option<u32>,
    /// Closes each document: `<|endoftext|>` where the vocabulary has it (an instruct model's eos
    /// ends a chat turn, not a document), else the model's eos.
    end: Option<u32>,
}

impl<'a> DocEncoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer, chat: Option<&'a ChatTemplate>) -> Self {
        let own = FimTokens::from_vocab(|t| tokenizer.token_id(t).is_some());
        Self {
            tokenizer,
            chat,
            fim_are_tokens: own.is_some(),
            fim: own.unwrap_or_else(FimTokens::sentinels),
            bos: tokenizer.bos().filter(|_| tokenizer.adds_bos()),
            end: tokenizer.token_id("<|endoftext|>").or(tokenizer.eos()),
        }
    }

    /// The document of one example: context and text for notes and code (user text, never parsed for
    /// control tokens), the FIM prompt then its middle for FIM examples; an end-of-text token closes
    /// each, so the model learns where documents end. A conversation is rendered by the model's chat
    /// template, which closes its own turns.
    pub fn encode(&self, e: &Example) -> Result<TrainDoc> {
        if e.kind == Kind::Chat {
            return self.encode_chat(e);
        }
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        let completion_start = match (e.kind, e.fim) {
            (Kind::Fim, Some(span)) => {
                let (prompt, middle) = fim::render(&e.text, span, &self.fim);
                for piece in prompt {
                    match piece {
                        Piece::Marker(m) => {
                            ids.extend(self.tokenizer.encode(m, self.fim_are_tokens)?)
                        }
                        Piece::Text(t) => ids.extend(self.tokenizer.encode(t, false)?),
                    }
                }
                let start = ids.len();
                ids.extend(self.tokenizer.encode(middle, false)?);
                start
            }
            _ => {
                if !e.context.is_empty() {
                    ids.extend(self.tokenizer.encode(&e.context, false)?);
                    ids.extend(self.tokenizer.encode("\n\n", false)?);
                }
                ids.extend(self.tokenizer.encode(&e.text, false)?);
                0
            }
        };
        ids.extend(self.end);
        Ok(TrainDoc {
            ids,
            completion_start,
            skipped: Vec::new(),
        })
    }

    /// A conversation: the loss on its trained assistant replies (each with the markup that closes
    /// its turn), nothing else.
    fn encode_chat(&self, e: &Example) -> Result<TrainDoc> {
        let chat_error = |reason: String| TrainError::Chat {
            example: e.id.clone(),
            at: format!("{}/{}", e.source, e.context),
            reason,
        };
        let template = self.chat.ok_or_else(|| {
            chat_error(
                "the model has no chat template to render conversations with; use a model that \
                 has one, or leave the chat source out"
                    .into(),
            )
        })?;
        let conversation = Conversation::parse(&e.text).map_err(chat_error)?;
        let messages: Vec<Message> = conversation
            .messages
            .iter()
            .map(|m| Message::new(m.role.clone(), m.content.clone()))
            .collect();
        let trained: Vec<bool> = conversation.messages.iter().map(|m| m.trained()).collect();
        let t = template.encode_for_training(self.tokenizer, &messages, &trained)?;
        let (Some(first), Some(last)) = (t.trained.first(), t.trained.last()) else {
            return Err(chat_error("the template left no reply to learn".into()));
        };
        let mut skipped: Vec<Range<usize>> =
            t.trained.windows(2).map(|w| w[0].end..w[1].start).collect();
        skipped.push(last.end..t.ids.len());
        skipped.retain(|r| !r.is_empty());
        Ok(TrainDoc {
            completion_start: first.start,
            ids: t.ids,
            skipped,
        })
    }

    pub fn encode_all(&self, examples: &[Example]) -> Result<Vec<TrainDoc>> {
        let docs: Vec<TrainDoc> = examples
            .iter()
            .map(|e| self.encode(e))
            .collect::<Result<_>>()?;
        Ok(docs.into_iter().filter(|d| d.ids.len() >= 2).collect())
    }
}

/// Documents as rows of `seq_len` can train on them. A document with a prompt (FIM, a conversation)
/// must keep its prompt in view of its completion, and a row's continuation of a cut document restarts
/// with no context: so a prompted document longer than a row is cut to the row (a conversation loses
/// its later turns), and one that leaves no trained token inside the row is dropped (it would train
/// nothing). Plain documents are kept whole (their later parts still teach, from the start of the row
/// they land in).
pub fn fit_to_rows(docs: &[TrainDoc], seq_len: usize) -> Vec<TrainDoc> {
    docs.iter()
        .filter(|d| {
            let end = seq_len.min(d.ids.len());
            d.completion_start == 0 || (d.completion_start.max(1)..end).any(|k| d.counts(k))
        })
        .map(|d| match d.completion_start {
            0 => d.clone(),
            _ => {
                let end = d.ids.len().min(seq_len);
                TrainDoc {
                    ids: d.ids[..end].to_vec(),
                    completion_start: d.completion_start,
                    skipped: d
                        .skipped
                        .iter()
                        .filter(|r| r.start < end)
                        .map(|r| r.start..r.end.min(end))
                        .collect(),
                }
            }
        })
        .collect()
}

/// Where a packer is: the epoch, the next document in that epoch's order, and how many of its tokens
/// earlier rows took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub doc: usize,
    pub offset: usize,
}

/// A packed row with its loss targets: `targets[i]` is the token after position i in its document and
/// `weights[i]` whether it counts (before normalisation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub row: PackedRow,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Row {
    /// Positions whose loss counts.
    pub fn counted(&self) -> usize {
        self.weights.iter().filter(|w| **w != 0.0).count()
    }
}

/// Lays documents into rows of `seq_len` tokens, in a shuffled order per epoch (or in order).
#[derive(Debug, Clone)]
pub struct Packer<'a> {
    docs: &'a [TrainDoc],
    seq_len: usize,
    seed: u64,
    shuffle: bool,
    order: Vec<usize>,
    cursor: Cursor,
    pad: u32,
}

impl<'a> Packer<'a> {
    pub fn new(
        docs: &'a [TrainDoc],
        seq_len: usize,
        seed: u64,
        shuffle: bool,
        pad: u32,
    ) -> Result<Self> {
        if docs.is_empty() {
            return Err(TrainError::EmptyDataset {
                reason: "no example has two tokens or more".into(),
            });
        }
        let mut packer = Self {
            docs,
            seq_len,
            seed,
            shuffle,
            order: Vec::new(),
            cursor: Cursor::default(),
            pad,
        };
        packer.order = packer.order_of(0);
        Ok(packer)
    }

    /// Continue from a saved cursor.
    pub fn seek(&mut self, cursor: Cursor) {
        if cursor.epoch != self.cursor.epoch {
            self.order = self.order_of(cursor.epoch);
        }
        self.cursor = cursor;
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Epochs done, with the fraction of the current one.
    pub fn epochs(&self) -> f64 {
        self.cursor.epoch as f64 + self.cursor.doc as f64 / self.docs.len() as f64
    }

    /// Tokens in one pass over the documents.
    pub fn tokens_per_epoch(&self) -> usize {
        self.docs.iter().map(|d| d.ids.len()).sum()
    }

    /// Document order of an epoch: a Fisher–Yates shuffle seeded by (seed, epoch).
    fn order_of(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.docs.len()).collect();
        if self.shuffle {
            let mut rng = SplitMix::new(self.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
        }
        order
    }

    /// The next row; documents wrap into the next epoch when one ends, unless `once` (then the row
    /// ends padded, and `None` comes once nothing is left).
    pub fn next_row(&mut self, once: bool) -> Option<Row> {
        let mut row = Row::default();
        while row.row.ids.len() < self.seq_len {
            if self.cursor.doc >= self.docs.len() {
                if once {
                    break;
                }
                self.seek(Cursor {
                    epoch: self.cursor.epoch + 1,
                    doc: 0,
                    offset: 0,
                });
            }
            let doc = &self.docs[self.order[self.cursor.doc]];
            let space = self.seq_len - row.row.ids.len();
            let take = (doc.ids.len() - self.cursor.offset).min(space);
            let start = self.cursor.offset;
            row.row.ids.extend_from_slice(&doc.ids[start..start + take]);
            row.row.doc_lens.push(take);
            for k in start + 1..start + take {
                row.targets.push(doc.ids[k]);
                row.weights.push(if doc.counts(k) { 1.0 } else { 0.0 });
            }
            // The segment's last token: its successor is in the next row or nowhere.
            row.targets.push(0);
            row.weights.push(0.0);
            if start + take == doc.ids.len() {
                self.cursor.doc += 1;
                self.cursor.offset = 0;
            } else {
                self.cursor.offset += take;
            }
        }
        if row.row.ids.is_empty() {
            return None;
        }
        let pad = self.seq_len - row.row.ids.len();
        if pad > 0 {
            row.row.ids.extend(std::iter::repeat_n(self.pad, pad));
            row.row.doc_lens.push(pad);
            row.targets.extend(std::iter::repeat_n(0, pad));
            row.weights.extend(std::iter::repeat_n(0.0, pad));
        }
        Some(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(ids: &[u32], completion_start: usize) -> TrainDoc {
        TrainDoc {
            ids: ids.to_vec(),
            completion_start,
            skipped: Vec::new(),
        }
    }

    #[test]
    fn rows_cut_documents_and_mask_prompts() -> Result<()> {
        let docs = [doc(&[1, 2, 3, 4, 5], 0), doc(&[10, 11, 12, 13], 2)];
        let mut p = Packer::new(&docs, 4, 0, false, 0)?;
        let r = p.next_row(false).expect("row");
        assert_eq!(r.row.ids, vec![1, 2, 3, 4]);
        assert_eq!(r.row.doc_lens, vec![4]);
        assert_eq!(r.targets, vec![2, 3, 4, 0]);
        assert_eq!(r.weights, vec![1.0, 1.0, 1.0, 0.0]);
        let r = p.next_row(false).expect("row");
        assert_eq!(r.row.ids, vec![5, 10, 11, 12]);
        assert_eq!(r.row.doc_lens, vec![1, 3]);
        // 11 and 12 are prompt (completion starts at index 2 = token 12): only 12→? counts... the
        // target 12 (index 2) counts, the target 11 (index 1) does not.
        assert_eq!(r.targets, vec![0, 11, 12, 0]);
        assert_eq!(r.weights, vec![0.0, 0.0, 1.0, 0.0]);
        let cursor = p.cursor();
        let r = p.next_row(false).expect("row");
        assert_eq!(r.row.ids, vec![13, 1, 2, 3]);
        assert_eq!(p.cursor().epoch, 1);
        // Seeking back replays the same row.
        p.seek(cursor);
        assert_eq!(p.next_row(false).expect("row"), r);
        // Once: the last row is padded, then nothing.
        let mut once = Packer::new(&docs, 4, 0, false, 99)?;
        once.next_row(true);
        once.next_row(true);
        let last = once.next_row(true).expect("last");
        assert_eq!(last.row.ids, vec![13, 99, 99, 99]);
        assert_eq!(last.row.doc_lens, vec![1, 3]);
        assert_eq!(last.counted(), 0);
        assert!(once.next_row(true).is_none());
        Ok(())
    }

    #[test]
    fn prompted_documents_fit_their_rows() {
        let docs = [
            doc(&[1; 10], 0), // plain: kept whole
            doc(&[2; 10], 3), // prompt 3, cut to 6 tokens
            doc(&[3; 10], 6), // the prompt fills the row: nothing to learn, dropped
            doc(&[4; 4], 2),  // fits
        ];
        let fitted = fit_to_rows(&docs, 6);
        assert_eq!(fitted.len(), 3);
        assert_eq!(fitted[0].ids.len(), 10);
        assert_eq!((fitted[1].ids.len(), fitted[1].completion_start), (6, 3));
        assert_eq!(fitted[2], docs[3]);
    }

    #[test]
    fn shuffles_differ_by_epoch_and_repeat_by_seed() -> Result<()> {
        let docs: Vec<TrainDoc> = (0..50).map(|i| doc(&[i, i + 1], 0)).collect();
        let a = Packer::new(&docs, 2, 7, true, 0)?;
        let b = Packer::new(&docs, 2, 7, true, 0)?;
        assert_eq!(a.order_of(0), b.order_of(0));
        assert_ne!(a.order_of(0), a.order_of(1));
        assert_ne!(a.order_of(0), (0..50).collect::<Vec<_>>());
        Ok(())
    }
}
