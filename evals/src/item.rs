//! Eval items: what a suite asks of a model, and what one model answered. Every suite is a list of
//! items scored "higher is better", so two adapters compare item by item (`gate`).

use serde::{Deserialize, Serialize};

/// One question to a model, in a group of items that are not independent of each other (the note or
/// file they come from), which the gate's bootstrap resamples together.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub group: String,
    /// What the item measures, so the gate can say where an adapter is better or worse: `notes` or
    /// `code` (the owner's writing, by kind), `general` (retention's text), `privacy` (canaries), a
    /// tasks line's `domain` (default `tasks`). The router trusts the local model by it.
    pub domain: String,
    pub task: Task,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// The mean log-likelihood per token of `text` after `context` (perplexity, retention, and the
    /// log-likelihood side of recall). Score: −(mean negative log-likelihood), in nats.
    Continuation { context: String, text: String },
    /// Multiple choice by log-likelihood, as lm-evaluation-harness does: the choice whose tokens are
    /// most likely after `context` is the answer. Score: 1 when it is `answer`, else 0.
    Choice {
        context: String,
        choices: Vec<String>,
        answer: usize,
    },
    /// Greedy generation from `prompt`, checked. Score: 1 when the check holds, else 0.
    Generate {
        prompt: String,
        check: Check,
        max_tokens: usize,
    },
}

/// How a generation is checked (the text is trimmed first).
#[derive(Debug, Clone)]
pub enum Check {
    ExactMatch(String),
    Contains(String),
    Regex(regex::Regex),
    /// The generation must not contain this (a privacy canary's secret), compared without case or
    /// whitespace, so a reformatted leak still counts.
    Lacks(String),
}

impl PartialEq for Check {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::ExactMatch(a), Self::ExactMatch(b))
            | (Self::Contains(a), Self::Contains(b))
            | (Self::Lacks(a), Self::Lacks(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Check {
    pub fn holds(&self, generated: &str) -> bool {
        let text = generated.trim();
        match self {
            Self::ExactMatch(want) => text == want.trim(),
            Self::Contains(want) => text.contains(want.as_str()),
            Self::Regex(re) => re.is_match(text),
            Self::Lacks(secret) => {
                let squash = |s: &str| -> String {
                    s.chars()
                        .filter(|c| !c.is_whitespace())
                        .flat_map(char::to_lowercase)
                        .collect()
                };
                !squash(generated).contains(&squash(secret))
            }
        }
    }
}

/// What one model did with one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    pub group: String,
    /// Higher is better (see `Task`).
    pub score: f64,
    /// Tokens scored (continuations), the chosen index (choices), or the text generated.
    #[serde(flatten)]
    pub detail: Detail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Detail {
    /// `greedy`: every scored token was the model's likeliest (it would have generated the text).
    Continuation {
        tokens: usize,
        nll: f64,
        #[serde(default)]
        greedy: bool,
    },
    Choice {
        chosen: usize,
        logliks: Vec<f64>,
    },
    Generate {
        text: String,
    },
}
