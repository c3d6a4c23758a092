//! The GPT-2 pre-tokenizer for ASCII text, by hand: what `Tokenizer::count` runs on a word it has not
//! seen before, instead of the tokenizers crate's `Digits` + `ByteLevel` (a backtracking regex, a
//! `NormalizedString` per piece and alignment bookkeeping), which cost about 6 µs a word and made the
//! misses most of an ingest's first counting pass.
//!
//! The rules are the regex's, alternative by alternative, for ASCII only (the caller takes the
//! library's path for any other word):
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, leftmost first, after
//! `Digits` has split numbers off (each digit alone, or runs of digits) as pieces of their own. Each
//! piece is then mapped to GPT-2's byte-level alphabet, which is what the BPE model's vocabulary is
//! written in. `reference::fast_token_count_equals_encode_length` checks the result against `encode`.

/// How a tokenizer's `Digits` pre-tokenizer (if any) splits numbers before the regex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DigitSplit {
    /// No `Digits` step: numbers go to the regex (` ?\p{N}+`).
    None,
    /// Every digit is a piece of its own.
    Individual,
    /// Each run of digits is one piece.
    Runs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(b: u8) -> Class {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' => Class::Letter,
        b'0'..=b'9' => Class::Number,
        // `\s` (Unicode White_Space) within ASCII: tab, newline, vertical tab, form feed, return, space.
        b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' => Class::Space,
        _ => Class::Other,
    }
}

/// Call `piece` with each pre-token of `word` (ASCII) in order.
pub(crate) fn pretokens(word: &[u8], digits: DigitSplit, mut piece: impl FnMut(&[u8])) {
    debug_assert!(word.is_ascii());
    if digits == DigitSplit::None {
        return regex_pieces(word, &mut piece);
    }
    let mut start = 0;
    let mut i = 0;
    while i < word.len() {
        if !word[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        if start < i {
            regex_pieces(&word[start..i], &mut piece);
        }
        let mut end = i + 1;
        if digits == DigitSplit::Runs {
            while end < word.len() && word[end].is_ascii_digit() {
                end += 1;
            }
        }
        piece(&word[i..end]);
        i = end;
        start = end;
    }
    if start < word.len() {
        regex_pieces(&word[start..], &mut piece);
    }
}

/// The regex's matches over one segment (it sees each `Digits` piece alone: its end is the text's end).
fn regex_pieces(s: &[u8], piece: &mut impl FnMut(&[u8])) {
    let run_of = |from: usize, c: Class| {
        let mut end = from;
        while end < s.len() && class(s[end]) == c {
            end += 1;
        }
        end
    };
    let mut i = 0;
    while i < s.len() {
        let end = if s[i] == b'\'' && contraction_len(&s[i + 1..]) > 0 {
            i + 1 + contraction_len(&s[i + 1..])
        } else {
            match class(s[i]) {
                // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+` with the space taken.
                Class::Space
                    if s[i] == b' ' && s.get(i + 1).is_some_and(|&b| class(b) != Class::Space) =>
                {
                    run_of(i + 1, class(s[i + 1]))
                }
                Class::Space => {
                    let end = run_of(i, Class::Space);
                    if end == s.len() || end - i == 1 {
                        // `\s+(?!\S)` to the end, or `\s+` for a lone space before a non-space.
                        end
                    } else {
                        // `\s+(?!\S)` backs off one so the last space goes with what follows.
                        end - 1
                    }
                }
                c => run_of(i, c),
            }
        };
        piece(&s[i..end]);
        i = end;
    }
}

/// Length of the contraction (`s`, `t`, `re`, `ve`, `m`, `ll`, `d`) at the start of `rest`, after an
/// apostrophe; 0 when there is none.
fn contraction_len(rest: &[u8]) -> usize {
    match rest {
        [b's' | b't' | b'm' | b'd', ..] => 1,
        [b'r', b'e', ..] | [b'v', b'e', ..] | [b'l', b'l', ..] => 2,
        _ => 0,
    }
}

/// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes map to
/// U+0100 onwards in byte order.
pub(crate) fn byte_level_char(b: u8) -> char {
    const fn table() -> [char; 256] {
        let mut out = ['\0'; 256];
        let mut next = 256u32;
        let mut b = 0usize;
        while b < 256 {
            let printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
            let code = if printable {
                b as u32
            } else {
                next += 1;
                next - 1
            };
            out[b] = match char::from_u32(code) {
                Some(c) => c,
                None => '\0',
            };
            b += 1;
        }
        out
    }
    const TABLE: [char; 256] = table();
    TABLE[b as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(word: &str, digits: DigitSplit) -> Vec<String> {
        let mut out = Vec::new();
        pretokens(word.as_bytes(), digits, |p| {
            out.push(String::from_utf8(p.to_vec()).unwrap())
        });
        out
    }

    #[test]
    fn pieces_follow_the_regex() {
        let none = DigitSplit::None;
        assert_eq!(split(" main()", none), [" main", "()"]);
        assert_eq!(split("don't", none), ["don", "'t"]);
        assert_eq!(split(")'s", none), [")'", "s"]);
        assert_eq!(split(" 'quoted'", none), [" '", "quoted", "'"]);
        assert_eq!(split("we'll've", none), ["we", "'ll", "'ve"]);
        assert_eq!(split("x1y22", none), ["x", "1", "y", "22"]);
        assert_eq!(split(" 12ab", none), [" 12", "ab"]);
        assert_eq!(split("\n}", none), ["\n", "}"]);
        assert_eq!(split("\n   ", none), ["\n   "]);
        assert_eq!(split("  x", none), [" ", " x"]);
        assert_eq!(split("\t\tend", none), ["\t", "\t", "end"]);
        assert_eq!(split(" 'S", none), [" '", "S"]);
    }

    #[test]
    fn digits_are_split_off_first() {
        assert_eq!(
            split(" 12ab3", DigitSplit::Individual),
            [" ", "1", "2", "ab", "3"]
        );
        assert_eq!(split(" 12ab3", DigitSplit::Runs), [" ", "12", "ab", "3"]);
        assert_eq!(split("\n    1", DigitSplit::Individual), ["\n    ", "1"]);
    }

    #[test]
    fn the_byte_level_alphabet_is_gpt2s() {
        assert_eq!(byte_level_char(b'a'), 'a');
        assert_eq!(byte_level_char(b' '), '\u{120}');
        assert_eq!(byte_level_char(b'\n'), '\u{10a}');
        assert_eq!(byte_level_char(b'\t'), '\u{109}');
        assert_eq!(byte_level_char(0), '\u{100}');
        assert_eq!(byte_level_char(0xad), '\u{143}');
        assert_eq!(byte_level_char(0xff), '\u{ff}');
    }
}
