//! Fill-in-the-middle examples: a code example cut into prefix, middle and suffix, so the model learns to
//! complete code with what follows in view (what an editor asks of it).
//!
//! The dataset stores the cut, not a formatted string: `FimSpan` (mode and the middle's byte range in the
//! text). Whoever turns an example into tokens (the trainer, the evals) renders it with the model's own
//! FIM tokens (`FimTokens::from_vocab`), or with pai's documented sentinels when the model has none, and
//! encodes the user text apart from the sentinels so code containing `<fim_prefix>` forges nothing.
//!
//! Both orders of the FIM paper (Bavarian et al., 2022) and StarCoder:
//! - PSM: `<pre>` prefix `<suf>` suffix `<mid>` ‖ middle
//! - SPM: `<pre>` `<suf>` suffix `<mid>` prefix ‖ middle
//!
//! (‖ marks where the completion starts: the loss is on the middle only.) The cut points are drawn at
//! character boundaries from a generator seeded by the code example's id, so the same code gives the same
//! FIM example on every run.

use serde::{Deserialize, Serialize};

use crate::example::{content_id, Example, Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FimMode {
    Psm,
    Spm,
}

impl FimMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FimMode::Psm => "psm",
            FimMode::Spm => "spm",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "psm" => Some(FimMode::Psm),
            "spm" => Some(FimMode::Spm),
            _ => None,
        }
    }
}

/// Where the middle of a FIM example lies in its text, in bytes (at character boundaries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FimSpan {
    pub mode: FimMode,
    pub start: u32,
    pub end: u32,
}

/// The `fim` part of `[ingest]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FimSettings {
    /// Share of code examples that also give a FIM example (0 turns FIM off).
    pub rate: f64,
    /// Share of those in SPM order; the rest are PSM.
    pub spm_rate: f64,
}

impl Default for FimSettings {
    fn default() -> Self {
        // StarCoder's rates.
        Self {
            rate: 0.5,
            spm_rate: 0.5,
        }
    }
}

/// The three FIM markers of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FimTokens {
    pub prefix: String,
    pub suffix: String,
    pub middle: String,
}

/// Marker families in use, tried in this order against a vocabulary.
const FAMILIES: &[[&str; 3]] = &[
    ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"], // StarCoder, SmolLM, Granite
    ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"], // Qwen2.5-Coder
    ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"], // DeepSeek-Coder
    ["<PRE>", "<SUF>", "<MID>"],                      // Code Llama
    ["<|fim▁begin|>", "<|fim▁hole|>", "<|fim▁end|>"],
];

impl FimTokens {
    /// pai's sentinels for a model without FIM tokens: StarCoder's spelling, which such a model's
    /// tokenizer encodes as ordinary text (so the markers are learnt, as for any new format).
    pub fn sentinels() -> Self {
        Self::from_family(&FAMILIES[0])
    }

    fn from_family(f: &[&str; 3]) -> Self {
        Self {
            prefix: f[0].into(),
            suffix: f[1].into(),
            middle: f[2].into(),
        }
    }

    /// The model's own FIM tokens when its vocabulary has a known family (`is_token` says whether a
    /// string is one token), else `None`.
    pub fn from_vocab(is_token: impl Fn(&str) -> bool) -> Option<Self> {
        FAMILIES
            .iter()
            .find(|f| f.iter().all(|t| is_token(t)))
            .map(Self::from_family)
    }
}

/// A FIM example rendered: the prompt pieces in order (`Marker`s are control tokens, `Text` is user text)
/// and the completion (the middle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    Marker(&'a str),
    Text(&'a str),
}

pub fn render<'a>(
    text: &'a str,
    span: FimSpan,
    tokens: &'a FimTokens,
) -> (Vec<Piece<'a>>, &'a str) {
    let (start, end) = (span.start as usize, span.end as usize);
    let (prefix, middle, suffix) = (&text[..start], &text[start..end], &text[end..]);
    let (p, s, m) = (
        Piece::Marker(&tokens.prefix),
        Piece::Marker(&tokens.suffix),
        Piece::Marker(&tokens.middle),
    );
    let prompt = match span.mode {
        FimMode::Psm => vec![p, Piece::Text(prefix), s, Piece::Text(suffix), m],
        FimMode::Spm => vec![p, s, Piece::Text(suffix), m, Piece::Text(prefix)],
    };
    (prompt, middle)
}

/// A small deterministic generator (splitmix64) seeded from an example id.
struct Draw(u64);

impl Draw {
    fn new(id: &str) -> Self {
        Self(u64::from_str_radix(&id[..id.len().min(16)], 16).unwrap_or(0) ^ 0x4649_4d00)
    }

    fn next(&mut self) -> u64 {
        crate::minhash::splitmix64(&mut self.0)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The FIM example made from a code example, when its draw falls under `settings.rate` and the text is
/// long enough to cut. It keeps the code example's split, so a holdout text never trains as FIM.
pub fn fim_example(code: &Example, settings: FimSettings, extra_tokens: u32) -> Option<Example> {
    let mut draw = Draw::new(&code.id);
    if code.kind != Kind::Code || draw.unit() >= settings.rate {
        return None;
    }
    // Cut points are character boundaries, the end included: the k-th is byte k in ASCII text (most
    // code), found by walking the characters otherwise.
    let text = code.text.as_str();
    let n = text.chars().count() + 1;
    if n < 16 {
        return None;
    }
    let ascii = text.is_ascii();
    let boundary = |k: usize| -> u32 {
        let byte = if ascii {
            k
        } else {
            text.char_indices().nth(k).map_or(text.len(), |(i, _)| i)
        };
        byte as u32
    };
    let (a, b) = (draw.next() % n as u64, draw.next() % n as u64);
    let (mut start, mut end) = (a.min(b) as usize, a.max(b) as usize);
    if start == end {
        // An empty middle teaches nothing; take one character.
        if end + 1 < n {
            end += 1;
        } else {
            start -= 1;
        }
    }
    let mode = if draw.unit() < settings.spm_rate {
        FimMode::Spm
    } else {
        FimMode::Psm
    };
    let span = FimSpan {
        mode,
        start: boundary(start),
        end: boundary(end),
    };
    Some(Example {
        id: content_id(&format!(
            "fim\0{}\0{}\0{}\0{}",
            mode.as_str(),
            span.start,
            span.end,
            code.text
        )),
        kind: Kind::Fim,
        n_tokens: code.n_tokens + extra_tokens,
        fim: Some(span),
        minhash: None,
        ..code.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::example::Split;

    fn code(text: &str) -> Example {
        Example {
            id: content_id(text),
            day: "2026-11-22".into(),
            source: "src".into(),
            path: "lib.rs".into(),
            kind: Kind::Code,
            context: "lib.rs (Rust)".into(),
            text: text.into(),
            n_tokens: 20,
            split: Split::Holdout,
            redactions: 0,
            private: false,
            fim: None,
            minhash: None,
        }
    }

    #[test]
    fn cuts_are_deterministic_at_char_boundaries_and_rates_hold() {
        let settings = FimSettings::default();
        let (mut made, mut spm) = (0, 0);
        for i in 0..2000 {
            let e = code(&format!(
                "fn f{i}() -> &'static str {{ \"héllo wörld → {i}\" }}\n"
            ));
            let Some(f) = fim_example(&e, settings, 3) else {
                continue;
            };
            made += 1;
            spm += usize::from(f.fim.unwrap().mode == FimMode::Spm);
            assert_eq!(fim_example(&e, settings, 3), Some(f.clone()));
            let span = f.fim.unwrap();
            assert!(span.start < span.end);
            assert!(e.text.is_char_boundary(span.start as usize));
            assert!(e.text.is_char_boundary(span.end as usize));
            assert_eq!(
                (f.split, f.kind, f.n_tokens),
                (Split::Holdout, Kind::Fim, 23)
            );
            assert_ne!(f.id, e.id);
        }
        assert!((850..1150).contains(&made), "{made}");
        assert!(made * 4 / 10 < spm && spm < made * 6 / 10, "{spm}/{made}");
        let off = FimSettings {
            rate: 0.0,
            ..settings
        };
        assert!(fim_example(&code("fn main() { println!(\"hi\"); }"), off, 3).is_none());
    }

    #[test]
    fn renders_psm_and_spm_with_the_models_markers() {
        let text = "abcdefghij";
        let tokens = FimTokens::from_vocab(|t| t.starts_with("<|fim")).unwrap();
        assert_eq!(tokens.prefix, "<|fim_prefix|>");
        let span = |mode| FimSpan {
            mode,
            start: 3,
            end: 6,
        };
        let (prompt, middle) = render(text, span(FimMode::Psm), &tokens);
        assert_eq!(middle, "def");
        assert_eq!(
            prompt,
            [
                Piece::Marker("<|fim_prefix|>"),
                Piece::Text("abc"),
                Piece::Marker("<|fim_suffix|>"),
                Piece::Text("ghij"),
                Piece::Marker("<|fim_middle|>"),
            ]
        );
        let (prompt, _) = render(text, span(FimMode::Spm), &tokens);
        assert_eq!(prompt[1], Piece::Marker("<|fim_suffix|>"));
        assert_eq!(prompt[4], Piece::Text("abc"));
        assert_eq!(FimTokens::from_vocab(|_| false), None);
        assert_eq!(FimTokens::sentinels().middle, "<fim_middle>");
    }
}
