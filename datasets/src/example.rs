//! One row of the dataset, and how notes' sections and code's items become rows of a useful size.
//!
//! Sizes are counted in the model's own tokens. Short pieces merge with their neighbours (a two-line
//! section teaches little alone), long ones split at paragraph boundaries, then at lines, so no example
//! exceeds the budget the trainer's sequence length allows.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What an example is, which decides how the trainer formats it and where its loss goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Note,
    Code,
    Fim,
    Chat,
    Text,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Note => "note",
            Kind::Code => "code",
            Kind::Fim => "fim",
            Kind::Chat => "chat",
            Kind::Text => "text",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "note" => Kind::Note,
            "code" => Kind::Code,
            "fim" => Kind::Fim,
            "chat" => Kind::Chat,
            "text" => Kind::Text,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Holdout,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Holdout => "holdout",
        }
    }

    /// Deterministic by content: the same text is in the same split on every day, forever.
    pub fn of(id: &str, holdout_fraction: f64) -> Self {
        let bucket = u64::from_str_radix(&id[..id.len().min(12)], 16).unwrap_or(0) % 1_000_000;
        if (bucket as f64) < holdout_fraction * 1_000_000.0 {
            Split::Holdout
        } else {
            Split::Train
        }
    }
}

/// One training example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// sha256 of `text`, hex: the same text anywhere is the same example.
    pub id: String,
    /// The day it was first ingested, YYYY-MM-DD.
    pub day: String,
    pub source: String,
    /// Relative to the source root.
    pub path: String,
    pub kind: Kind,
    /// What the text is about: heading path and tags for a note, path and language for code.
    pub context: String,
    pub text: String,
    pub n_tokens: u32,
    pub split: Split,
    /// Secrets and PII replaced in `text`, in all.
    pub redactions: u32,
    /// From a private source or note: never quoted to a cloud model (see the privacy index).
    pub private: bool,
    /// For a `fim` example: the order and where the middle lies in `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fim: Option<crate::fim::FimSpan>,
    /// The MinHash signature of `text`, made once where the example is made (on every core) and
    /// stored with it; `None` for FIM examples and texts too short to shingle. Boxed: an ingest holds
    /// every new example at once, and 512 bytes inline would double their size.
    #[serde(skip)]
    pub minhash: Option<Box<crate::minhash::Signature>>,
}

/// sha256 hex of a text.
pub fn content_id(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Lowercase hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// Example size limits, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    /// Pieces shorter than this merge with the next one.
    pub min_tokens: usize,
    /// No example is longer than this.
    pub max_tokens: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            min_tokens: 48,
            max_tokens: 1024,
        }
    }
}

/// Token counts in the model's tokens. Examples are joins of pieces already counted (paragraphs,
/// sections, code items, a context line), so a join's count is asked for from its parts' counts.
pub trait CountTokens: Sync {
    fn count(&self, text: &str) -> usize;

    /// Tokens in `a + sep + b`, given the counts of `a` and `b`. By default, by counting the join.
    fn count_join(&self, a: &str, a_tokens: usize, sep: &str, b: &str, b_tokens: usize) -> usize {
        let _ = (a_tokens, b_tokens);
        self.count(&[a, sep, b].concat())
    }
}

/// The model's tokenizer, whose joins cost only the words around the seam (`Tokenizer::count_join`).
impl CountTokens for pai_model::Tokenizer {
    fn count(&self, text: &str) -> usize {
        pai_model::Tokenizer::count(self, text).unwrap_or(0)
    }

    fn count_join(&self, a: &str, a_tokens: usize, sep: &str, b: &str, b_tokens: usize) -> usize {
        pai_model::Tokenizer::count_join(self, a, a_tokens, sep, b, b_tokens).unwrap_or(0)
    }
}

/// Merge short pieces and split long ones so that every result is within the budget (as far as a
/// single line allows; a line longer than the budget is cut by characters). Pieces lose their
/// leading and trailing blank lines and join with a blank line. Each result comes with its exact
/// token count (from its parts' counts), so callers need not count again.
pub fn pack(pieces: &[String], budget: Budget, counter: &dyn CountTokens) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    let mut pending = String::new();
    let mut pending_tokens = 0;
    for piece in pieces {
        let piece = piece.trim_matches('\n');
        let t = counter.count(piece);
        if t > budget.max_tokens {
            if !pending.is_empty() {
                out.push((std::mem::take(&mut pending), pending_tokens));
                pending_tokens = 0;
            }
            out.extend(split_long(piece, budget.max_tokens, counter));
            continue;
        }
        if !pending.is_empty() && pending_tokens + t > budget.max_tokens {
            out.push((std::mem::take(&mut pending), pending_tokens));
            pending_tokens = 0;
        }
        if pending.is_empty() {
            pending.push_str(piece);
            pending_tokens = t;
        } else {
            pending_tokens = counter.count_join(&pending, pending_tokens, "\n\n", piece, t);
            pending.push_str("\n\n");
            pending.push_str(piece);
        }
        if pending_tokens >= budget.min_tokens {
            out.push((std::mem::take(&mut pending), pending_tokens));
            pending_tokens = 0;
        }
    }
    if !pending.is_empty() {
        // A short tail joins the previous example when it fits there.
        match out.last_mut() {
            Some((last, n)) if *n + pending_tokens <= budget.max_tokens => {
                *n = counter.count_join(last, *n, "\n\n", &pending, pending_tokens);
                last.push_str("\n\n");
                last.push_str(&pending);
            }
            _ => out.push((pending, pending_tokens)),
        }
    }
    out
}

/// Split at blank lines, then at lines, then at spaces, then by characters, each part within `max`
/// tokens, with its token count (as `pack`'s).
fn split_long(text: &str, max: usize, counter: &dyn CountTokens) -> Vec<(String, usize)> {
    let (units, sep): (Vec<&str>, &str) = if text.contains("\n\n") {
        (
            text.split("\n\n")
                .filter(|p| !p.trim().is_empty())
                .collect(),
            "\n\n",
        )
    } else if text.trim().contains('\n') {
        (text.lines().collect(), "\n")
    } else if text.trim().contains(' ') {
        (text.split(' ').filter(|w| !w.is_empty()).collect(), " ")
    } else {
        // One enormous word: cut by characters, in proportion to the token count.
        let chars: Vec<char> = text.chars().collect();
        let per = (chars.len() * max / counter.count(text).max(1)).max(1);
        return chars
            .chunks(per)
            .map(|c| {
                let part: String = c.iter().collect();
                let n = counter.count(&part);
                (part, n)
            })
            .collect();
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut cur_t = 0;
    for u in units {
        let t = counter.count(u);
        if t > max {
            if !cur.is_empty() {
                out.push((std::mem::take(&mut cur), cur_t));
                cur_t = 0;
            }
            out.extend(split_long(u, max, counter));
            continue;
        }
        if !cur.is_empty() && cur_t + t > max {
            out.push((std::mem::take(&mut cur), cur_t));
            cur_t = 0;
        }
        if cur.is_empty() {
            cur.push_str(u);
            cur_t = t;
        } else {
            cur_t = counter.count_join(&cur, cur_t, sep, u, t);
            cur.push_str(sep);
            cur.push_str(u);
        }
    }
    if !cur.is_empty() {
        out.push((cur, cur_t));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    /// Counts words; joins by counting the join.
    pub(crate) struct Words;

    impl CountTokens for Words {
        fn count(&self, text: &str) -> usize {
            words(text)
        }
    }

    #[test]
    fn packing_merges_short_and_splits_long_within_budget() {
        let budget = Budget {
            min_tokens: 5,
            max_tokens: 12,
        };
        let long = (0..30)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let long_paras = "a b c d e f g\n\nh i j k l m n\n\no p q".to_string();
        let pieces = vec![
            "one two".into(),
            "three four five six".into(),
            long_paras,
            long,
            "tail".into(),
        ];
        let out = pack(&pieces, budget, &Words);
        assert!(out.iter().all(|(e, _)| words(e) <= 12), "{out:#?}");
        assert_eq!(out[0].0, "one two\n\nthree four five six");
        // Counts come along.
        assert!(out.iter().all(|(e, n)| words(e) == *n), "{out:#?}");
        let out: Vec<String> = out.into_iter().map(|(e, _)| e).collect();
        // Nothing lost.
        let total: usize = pieces.iter().map(|p| words(p)).sum();
        assert_eq!(out.iter().map(|e| words(e)).sum::<usize>(), total);
    }

    #[test]
    fn ids_are_sha256_hex() {
        assert_eq!(
            content_id(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(hex(&[0, 9, 10, 255]), "00090aff");
    }

    #[test]
    fn split_is_stable_and_near_the_fraction() {
        let ids: Vec<String> = (0..20_000).map(|i| content_id(&i.to_string())).collect();
        let held = ids
            .iter()
            .filter(|id| Split::of(id, 0.05) == Split::Holdout)
            .count();
        assert!((800..1200).contains(&held), "{held}");
        assert!(ids
            .iter()
            .all(|id| Split::of(id, 0.05) == Split::of(id, 0.05)));
    }
}
