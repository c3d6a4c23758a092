//! What kind of request it is, read from its last user message: a routing signal beside the local
//! model's confidence. Kinds differ in how well a small local model does them at the same confidence
//! (rewriting a text it is given is easy, proving a theorem is not), so the calibration fits an
//! offset per kind; and each kind belongs to a domain (`notes`, `code`, `general`) in which the gate
//! recorded where the served adapter stands (`pai_adapters::standing`).
//!
//! The reading is by cues a person would use — a code fence or a language's name, an opening verb
//! ("rewrite", "prove", "draft"), the owner speaking of their own things — not by a model, so it costs
//! microseconds and says why.

use serde::Serialize;

/// A request's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestKind {
    /// Small talk: greetings, thanks, "say that again".
    Chat,
    /// Do something to a text the request gives: rewrite, fix, shorten, summarise, translate.
    Rewrite,
    /// Write something new: a note, a message, a post, ideas.
    Writing,
    /// About code: it carries code, or asks about a language, a tool or an implementation.
    Code,
    /// Reasoning at length: prove, derive, compare, design, analyse, walk through.
    Reasoning,
    /// A question about the owner's own things ("my", "I", "our"): what their notes know.
    Personal,
    /// Any other question or request.
    Question,
}

impl RequestKind {
    pub const ALL: [RequestKind; 7] = [
        RequestKind::Chat,
        RequestKind::Rewrite,
        RequestKind::Writing,
        RequestKind::Code,
        RequestKind::Reasoning,
        RequestKind::Personal,
        RequestKind::Question,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Chat => "chat",
            RequestKind::Rewrite => "rewrite",
            RequestKind::Writing => "writing",
            RequestKind::Code => "code",
            RequestKind::Reasoning => "reasoning",
            RequestKind::Personal => "personal",
            RequestKind::Question => "question",
        }
    }

    /// The gate's domain this kind of request falls in.
    pub fn domain(self) -> &'static str {
        match self {
            RequestKind::Code => "code",
            RequestKind::Personal => "notes",
            _ => "general",
        }
    }

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|&k| k == self).unwrap_or(0)
    }
}

/// Opening words of a request to transform a text it gives.
const REWRITE_OPENINGS: &[&str] = &[
    "rewrite",
    "reword",
    "rephrase",
    "paraphrase",
    "fix",
    "correct",
    "proofread",
    "shorten",
    "make this",
    "make it",
    "turn this",
    "turn these",
    "convert this",
    "summarise",
    "summarize",
    "sum up",
    "give me the gist",
    "tl;dr",
    "translate",
    "format this",
    "simplify",
];

/// Words that start a request for new writing.
const WRITING_OPENINGS: &[&str] = &[
    "write a",
    "write an",
    "write me",
    "write two",
    "write three",
    "draft",
    "compose",
    "give me three",
    "give me five",
    "give me some",
    "suggest a title",
    "suggest three",
    "come up with",
];

/// Words that ask for reasoning at length.
const REASONING_CUES: &[&str] = &[
    "prove",
    "proof",
    "derive",
    "derivation",
    "walk me through",
    "step by step",
    "compare",
    "trade-off",
    "tradeoff",
    "trade off",
    "design a",
    "design an",
    "architect",
    "survey",
    "analyse",
    "analyze",
    "analysis",
    "discuss",
    "critique",
    "evaluate",
    "justify",
    "in depth",
    "formal",
    "theorem",
    "why does",
    "where intuition",
    "what guarantees",
];

/// Words that name programming languages, tools or code work.
const CODE_WORDS: &[&str] = &[
    "python",
    "rust",
    "javascript",
    "typescript",
    "java",
    "kotlin",
    "scala",
    "golang",
    "c++",
    "haskell",
    "ruby",
    "php",
    "swift",
    "bash",
    "shell",
    "zsh",
    "powershell",
    "sql",
    "regex",
    "git",
    "docker",
    "kubernetes",
    "compile",
    "compiler",
    "function",
    "method",
    "struct",
    "class",
    "variable",
    "loop",
    "recursion",
    "recursive",
    "array",
    "tuple",
    "dictionary",
    "hashmap",
    "implement",
    "refactor",
    "debug",
    "stack trace",
    "segfault",
    "api",
    "json",
    "yaml",
    "cli",
    "script",
    "async",
    "asyncio",
    "thread",
    "mutex",
    "parser",
    "lru",
    "unit test",
    "npm",
    "cargo",
    "pip",
    "library",
    "crate",
    "syntax",
];

/// Small talk, whole or at the start.
const CHAT_OPENINGS: &[&str] = &[
    "hi",
    "hello",
    "hey",
    "good morning",
    "good evening",
    "good night",
    "thanks",
    "thank you",
    "cheers",
    "ok",
    "okay",
    "great",
    "nice",
    "can you say that again",
    "say that again",
    "again",
    "sorry",
    "bye",
];

/// The kind of a request whose last user message is `text`.
pub fn classify(text: &str) -> RequestKind {
    let lower = text.trim().to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '+' || c == '-' || c == ';'))
        .filter(|w| !w.is_empty())
        .collect();
    let starts = |openings: &[&str]| {
        openings.iter().any(|o| {
            lower.starts_with(o)
                && lower[o.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !c.is_alphanumeric())
        })
    };
    let has_phrase = |p: &str| {
        if p.contains(' ') || !p.chars().all(char::is_alphanumeric) {
            lower.contains(p)
        } else {
            words.contains(&p)
        }
    };
    let carries_code =
        text.contains("```") || text.lines().filter(|l| looks_like_code(l)).count() >= 2;
    if carries_code {
        return RequestKind::Code;
    }
    if starts(REWRITE_OPENINGS) {
        return RequestKind::Rewrite;
    }
    if REASONING_CUES.iter().any(|c| has_phrase(c)) {
        return RequestKind::Reasoning;
    }
    if CODE_WORDS.iter().any(|c| has_phrase(c)) {
        return RequestKind::Code;
    }
    if starts(WRITING_OPENINGS) {
        return RequestKind::Writing;
    }
    if words.len() <= 8 && starts(CHAT_OPENINGS) {
        return RequestKind::Chat;
    }
    let own = ["i", "my", "me", "i'm", "i've", "our", "we", "mine"];
    // The owner asking of their own things, not asking for something for themselves ("suggest a
    // workout I can do").
    let asks = words.first().is_some_and(|w| {
        matches!(
            *w,
            "what"
                | "when"
                | "where"
                | "which"
                | "who"
                | "how"
                | "did"
                | "do"
                | "does"
                | "is"
                | "was"
                | "remind"
                | "have"
                | "has"
        )
    });
    if asks && words.iter().any(|w| own.contains(w)) {
        return RequestKind::Personal;
    }
    RequestKind::Question
}

/// A line that reads as code rather than prose: ends in `;`, `{` or `}`, or starts as a definition.
fn looks_like_code(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty()
        && (t.ends_with(';')
            || t.ends_with('{')
            || t.ends_with('}')
            || [
                "def ", "fn ", "class ", "import ", "#include", "let ", "const ", "return ",
            ]
            .iter()
            .any(|p| t.starts_with(p)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use RequestKind::*;

    #[test]
    fn requests_are_read_by_their_cues() {
        let cases = [
            ("Hello there!", Chat),
            ("thanks a lot", Chat),
            (
                "Reword this so it sounds friendlier: the meeting is cancelled.",
                Rewrite,
            ),
            ("Translate to French: where is the station?", Rewrite),
            ("Summarize the following paragraph: the cat sat.", Rewrite),
            ("Draft an email asking for a day off.", Writing),
            ("Write a haiku about rain.", Writing),
            ("How do I sort a dictionary by value in Python?", Code),
            ("Why does this fail?\n```\nlet x: u8 = 300;\n```", Code),
            ("fn main() {\n    println!(\"hi\");\n}", Code),
            ("Prove that the square root of 2 is irrational.", Reasoning),
            (
                "Compare B-trees and LSM trees for write-heavy workloads.",
                Reasoning,
            ),
            ("When did I last service the boiler?", Personal),
            ("What did we decide about the kitchen tiles?", Personal),
            ("What is the tallest mountain in Africa?", Question),
            (
                "Suggest a stretching routine I can do at my desk.",
                Question,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(classify(text), want, "{text}");
        }
        assert_eq!(Code.domain(), "code");
        assert_eq!(Personal.domain(), "notes");
        assert_eq!(Rewrite.domain(), "general");
        assert!(RequestKind::ALL
            .iter()
            .enumerate()
            .all(|(i, k)| k.index() == i));
    }
}
