//! Counting tokens fast, exactly: what ingest does to every byte of the owner's notes and code.
//!
//! A full `encode` builds offsets, normalized strings and an `Encoding` per call, and runs the
//! pre-tokenizer's regex over everything: about 2 MB/s per core. But for byte-level BPE with the GPT-2
//! style split (GPT-2, SmolLM, StarCoder: no normalizer, `ByteLevel` with its regex, optionally after
//! `Digits`), every place where whitespace follows a non-whitespace character is a pre-token boundary
//! (none of the regex's alternatives crosses from a non-space into a space), and BPE never merges across
//! pre-tokens. So the count of a text is the sum of the counts of its "words" (see `words`: at most one
//! whitespace character and the non-whitespace run after it, or a run of whitespace alone), and words
//! repeat (Zipf), so a cache of word counts answers most of them without tokenizing. A miss goes
//! straight to the BPE model (`count_word`): an ASCII word is pre-tokenized by `gpt2_split`, any other
//! by the tokenizer's own pre-tokenizer; `encode` (about 9 µs a word, most of it the pre-tokenizer's
//! regex and bookkeeping) only for a word that holds an added token.
//!
//! Other tokenizers (SentencePiece, llama3/qwen2 splits, whose punctuation can absorb newlines) are
//! counted by `encode` as before: `WordCounts::for_tokenizer` returns `None` for them.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::{DefaultHashBuilder, HashTable};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;

use super::gpt2_split::{byte_level_char, pretokens, DigitSplit};
use tokenizers::{Model, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

/// Entries a thread keeps in each of its two tables for one tokenizer before it starts that table
/// over (~24 MiB at most).
const CAPACITY: usize = 256 * 1024;
/// Tokenizers a thread keeps caches for at once (the oldest is dropped).
const TOKENIZERS_PER_THREAD: usize = 4;

/// Word → token count caches for one tokenizer, one per thread (no locking on the hot path: ingest
/// counts every word of every file several times). `id` tells this tokenizer's caches apart.
pub(crate) struct WordCounts {
    id: u64,
    /// The non-special added tokens of the plain encoder: `encode` cuts them out before the
    /// pre-tokenizer, so a word that contains one is counted by `encode`.
    added: Vec<String>,
    digits: DigitSplit,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Words of up to `SHORT` bytes (nearly all of them) are kept inline as their bytes and length in
/// one `u128`, so a lookup compares two integers instead of following a pointer to compare strings;
/// longer ones keep their text.
struct ThreadCache {
    id: u64,
    hasher: DefaultHashBuilder,
    short: HashTable<(u128, u32)>,
    long: HashTable<(Box<str>, u32)>,
}

const SHORT: usize = 15;

/// The inline key of a word of at most `SHORT` bytes starting at `at` in `bytes`: its bytes
/// (little-endian, zero above) and its length in the top byte.
#[inline]
fn short_key(bytes: &[u8], at: usize, len: usize) -> u128 {
    let word = if at + 16 <= bytes.len() {
        let mut lane = [0u8; 16];
        lane.copy_from_slice(&bytes[at..at + 16]);
        u128::from_le_bytes(lane) & u128::MAX.checked_shr(128 - 8 * len as u32).unwrap_or(0)
    } else {
        let mut lane = [0u8; 16];
        lane[..len].copy_from_slice(&bytes[at..at + len]);
        u128::from_le_bytes(lane)
    };
    word | (len as u128) << 120
}

/// A hash of an inline key: the two halves' folded product (as foldhash does), good in its high bits
/// (hashbrown's tags) and low ones (its buckets).
#[inline]
fn short_hash(key: u128) -> u64 {
    let (lo, hi) = (key as u64, (key >> 64) as u64);
    let product = u128::from(lo ^ 0x243F_6A88_85A3_08D3) * u128::from(hi ^ 0x1319_8A2E_0370_7344);
    (product as u64) ^ (product >> 64) as u64
}

thread_local! {
    static CACHES: RefCell<Vec<ThreadCache>> = const { RefCell::new(Vec::new()) };
}

/// How the `Digits` steps before the byte-level split cut numbers.
fn digit_split(pre: &PreTokenizerWrapper) -> DigitSplit {
    let PreTokenizerWrapper::Sequence(seq) = pre else {
        return DigitSplit::None;
    };
    let digits = seq.as_ref().iter().filter_map(|p| match p {
        PreTokenizerWrapper::Digits(d) => Some(d.individual_digits),
        _ => None,
    });
    digits.fold(DigitSplit::None, |split, individual| {
        if individual || split == DigitSplit::Individual {
            DigitSplit::Individual
        } else {
            DigitSplit::Runs
        }
    })
}

/// Whether this pre-tokenizer only ever splits as the GPT-2 regex does (optionally digits first).
fn gpt2_style(pre: &PreTokenizerWrapper) -> bool {
    let byte_level = |p: &PreTokenizerWrapper| matches!(p, PreTokenizerWrapper::ByteLevel(b) if b.use_regex && !b.add_prefix_space);
    match pre {
        PreTokenizerWrapper::Sequence(seq) => {
            let parts = seq.as_ref();
            parts.last().is_some_and(byte_level)
                && parts[..parts.len() - 1]
                    .iter()
                    .all(|p| matches!(p, PreTokenizerWrapper::Digits(_)))
        }
        other => byte_level(other),
    }
}

impl WordCounts {
    /// A cache for `plain` (the encoder without control tokens) when counting by words is exact for
    /// it, else `None`.
    pub(crate) fn for_tokenizer(plain: &tokenizers::Tokenizer) -> Option<Self> {
        let additive = plain.get_normalizer().is_none()
            && plain.get_pre_tokenizer().is_some_and(gpt2_style)
            // An added token with whitespace inside could span two words.
            && plain
                .get_added_tokens_decoder()
                .values()
                .all(|t| !t.content.chars().any(char::is_whitespace));
        additive.then(|| Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            added: plain
                .get_added_tokens_decoder()
                .values()
                .map(|t| t.content.clone())
                .filter(|c| !c.is_empty())
                .collect(),
            digits: plain
                .get_pre_tokenizer()
                .map_or(DigitSplit::None, digit_split),
        })
    }

    /// Tokens `plain.encode(word, false)` gives, by its pre-tokenizer and model alone (`None` when
    /// the word holds an added token, or the tokenizer fails: the caller then encodes).
    pub(crate) fn count_word(&self, plain: &tokenizers::Tokenizer, word: &str) -> Option<usize> {
        if self.added.iter().any(|a| word.contains(a.as_str())) {
            return None;
        }
        let model = plain.get_model();
        if word.is_ascii() {
            let (mut n, mut failed) = (0, false);
            let mut mapped = String::with_capacity(word.len() * 2);
            pretokens(word.as_bytes(), self.digits, |piece| {
                mapped.clear();
                mapped.extend(piece.iter().map(|&b| byte_level_char(b)));
                match model.tokenize(&mapped) {
                    Ok(tokens) => n += tokens.len(),
                    Err(_) => failed = true,
                }
            });
            return (!failed).then_some(n);
        }
        let mut pieces = PreTokenizedString::from(word);
        plain.get_pre_tokenizer()?.pre_tokenize(&mut pieces).ok()?;
        let mut n = 0;
        for (piece, _, _) in pieces.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            n += model.tokenize(piece).ok()?.len();
        }
        Some(n)
    }

    /// Tokens in `text`, counting each word not seen before with `count_word`.
    pub(crate) fn count(
        &self,
        text: &str,
        count_word: impl Fn(&str) -> Option<usize>,
    ) -> Option<usize> {
        CACHES.with_borrow_mut(|caches| {
            let at = match caches.iter().position(|c| c.id == self.id) {
                Some(at) => at,
                None => {
                    if caches.len() >= TOKENIZERS_PER_THREAD {
                        caches.remove(0);
                    }
                    caches.push(ThreadCache {
                        id: self.id,
                        hasher: DefaultHashBuilder::default(),
                        short: HashTable::new(),
                        long: HashTable::new(),
                    });
                    caches.len() - 1
                }
            };
            let ThreadCache {
                hasher,
                short,
                long,
                ..
            } = &mut caches[at];
            let bytes = text.as_bytes();
            let mut total = 0usize;
            for word in words(text) {
                let n = if word.len() <= SHORT {
                    let start = word.as_ptr() as usize - text.as_ptr() as usize;
                    let key = short_key(bytes, start, word.len());
                    let hash = short_hash(key);
                    match short.find(hash, |&(k, _)| k == key) {
                        Some(&(_, n)) => n as usize,
                        None => {
                            let n = count_word(word)?;
                            if short.len() >= CAPACITY {
                                short.clear();
                            }
                            short.insert_unique(hash, (key, n as u32), |&(k, _)| short_hash(k));
                            n
                        }
                    }
                } else {
                    let hash = hasher.hash_one(word);
                    match long.find(hash, |(w, _)| **w == *word) {
                        Some(&(_, n)) => n as usize,
                        None => {
                            let n = count_word(word)?;
                            if long.len() >= CAPACITY {
                                long.clear();
                            }
                            long.insert_unique(hash, (word.into(), n as u32), |(w, _)| {
                                hasher.hash_one(&**w)
                            });
                            n
                        }
                    }
                };
                total += n;
            }
            Some(total)
        })
    }
}

/// Where `a + sep + b` may be counted in three pieces, given the counts of `a` and `b`: `a` from its
/// last seam on, and `b` up to its first. A seam is a whitespace character right after a
/// non-whitespace one: `words` always cuts there and looks no further back than the last one, so the
/// words of a text are the words of its pieces between seams, whatever surrounds them. The join then
/// counts `a[..tail] + (a[tail..] + sep + b[..head]) + b[head..]`, and the outer pieces' counts are
/// those of `a` and `b` less their counted inner ends.
pub(crate) fn seams(a: &str, b: &str) -> (usize, usize) {
    let is_seam = |text: &str, (i, c): (usize, char)| {
        c.is_whitespace()
            && text[..i]
                .chars()
                .next_back()
                .is_some_and(|p| !p.is_whitespace())
    };
    let tail = a
        .char_indices()
        .rev()
        .find(|&ic| is_seam(a, ic))
        .map_or(0, |(i, _)| i);
    let head = b
        .char_indices()
        .find(|&ic| is_seam(b, ic))
        .map_or(b.len(), |(i, _)| i);
    (tail, head)
}

/// The text cut at pre-token boundaries that do not depend on the regex's choices: before every
/// whitespace character that follows a non-whitespace one, and before the last character of a run of
/// two or more whitespace characters that a non-digit follows (the regex's `\s+(?!\S)` leaves that
/// character to the word after it; a digit is split off first by `Digits`, leaving the run whole).
/// So `"\n    let x"` is `"\n   "`, `" let"`, `" x"`: pieces that repeat across files whatever the
/// indentation.
fn words(text: &str) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= bytes.len() {
            return None;
        }
        // The whitespace run at the start of this word, and where its last character begins.
        let mut i = start;
        let mut last_ws = None;
        while i < bytes.len() {
            let (c, len) = char_at(text, i);
            if !c.is_whitespace() {
                break;
            }
            last_ws = Some(i);
            i += len;
        }
        let ws_end = i;
        // Then the non-whitespace run after it.
        while i < bytes.len() {
            let (c, len) = char_at(text, i);
            if c.is_whitespace() {
                break;
            }
            i += len;
        }
        let mut end = i;
        if let Some(last) = last_ws {
            if last > start && ws_end < bytes.len() && !char_at(text, ws_end).0.is_numeric() {
                end = last;
            }
        }
        let word = &text[start..end];
        start = end;
        Some(word)
    })
}

/// The character at byte `i` (a char boundary) and its length, ASCII first.
#[inline]
fn char_at(text: &str, i: usize) -> (char, usize) {
    let b = text.as_bytes()[i];
    if b < 0x80 {
        (char::from(b), 1)
    } else {
        let c = text[i..].chars().next().unwrap_or('\0');
        (c, c.len_utf8())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_keep_their_leading_whitespace_and_lose_nothing() {
        let text = "  fn main() {\n    let x = 1;\n}\n\n\tdone \u{a0}é ";
        let w: Vec<&str> = words(text).collect();
        assert_eq!(w.concat(), text);
        assert_eq!(
            w,
            [
                " ", " fn", " main()", " {", "\n   ", " let", " x", " =", " 1;", "\n}", "\n\n",
                "\tdone", " ", "\u{a0}é", " "
            ]
        );
        assert_eq!(words("").count(), 0);
        // A digit after a whitespace run keeps the run whole (Digits splits it off first).
        assert_eq!(words("x\n    1").collect::<Vec<_>>(), ["x", "\n    1"]);
        assert_eq!(words("\n\n").collect::<Vec<_>>(), ["\n\n"]);
    }
}
