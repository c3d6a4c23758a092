//! Where a suite's items come from: the dataset (holdout notes and code, cloze items from trained
//! notes, the days after the candidate's), a text corpus (retention), and JSONL files (tasks,
//! privacy canaries). Each item gets its group (the note or file it comes from, which the gate's
//! bootstrap resamples whole) and its domain (`notes`, `code`, `general`, `privacy`, or a task's
//! own), by which the gate also reports where an adapter got better or worse.
//!
//! A tasks file is JSONL as lm-evaluation-harness writes it; each line one of
//! `{"type": "choice", "context": "…", "choices": ["…", "…"], "answer": 0}` or
//! `{"type": "generate", "prompt": "…", "exact_match" | "contains" | "regex": "…", "max_tokens": 32}`,
//! with an optional `"id"`, `"group"` and `"domain"` (default `tasks`).

use std::path::Path;

use pai_datasets::{Example, Kind, Split, Store};
use serde::Deserialize;

use crate::error::{EvalError, Result};
use crate::item::{Check, Item, Task};

/// The dataset's examples of the days `day_ok` accepts that `keep` accepts.
fn examples(
    store: &Store,
    day_ok: impl Fn(&str) -> bool,
    keep: impl Fn(&Example) -> bool,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for d in store.days()? {
        if day_ok(&d) {
            out.extend(store.read_day(&d)?.into_iter().filter(|e| keep(e)));
        }
    }
    Ok(out)
}

/// The group of an example's items: its source and file, the file's path hidden for private ones
/// (the report lists groups; a stable hash still keeps a private file's items together).
fn group_of(e: &Example) -> String {
    if e.private {
        let hash = pai_datasets::example::content_id(&e.path);
        format!("{}:private-{}", e.source, &hash[..8])
    } else {
        format!("{}:{}", e.source, e.path)
    }
}

/// The domain of an example's items: the kind of the owner's writing it is.
fn domain_of(e: &Example) -> &'static str {
    match e.kind {
        Kind::Code | Kind::Fim => "code",
        Kind::Chat => "chat",
        _ => "notes",
    }
}

/// An example's whole text as an item, grouped by its file.
fn text_item(e: Example) -> Item {
    Item {
        group: group_of(&e),
        domain: domain_of(&e).into(),
        id: e.id,
        task: Task::Continuation {
            context: String::new(),
            text: e.text,
        },
    }
}

/// The holdout notes and code up to `day` (FIM rows repeat code, chat rows are prompts).
pub(crate) fn holdout_items(store: &Store, day: &str) -> Result<Vec<Item>> {
    let keep = |e: &Example| e.split == Split::Holdout && matches!(e.kind, Kind::Note | Kind::Code);
    Ok(examples(store, |d| d <= day, keep)?
        .into_iter()
        .map(text_item)
        .collect())
}

/// Cloze items from the owner's notes that training saw (the train split up to `day`): each hides a
/// distinctive phrase — a number, a capitalised name in mid-sentence, a long term — and scores the
/// model on it after the note's text before it (log-likelihood; `greedy` says it would have written
/// it exactly). At most two per note, each with at least eight words of context.
pub(crate) fn recall_items(store: &Store, day: &str) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    let notes = examples(
        store,
        |d| d <= day,
        |e| e.split == Split::Train && e.kind == Kind::Note,
    )?;
    for e in notes {
        for (start, end) in distinctive_phrases(&e.text).into_iter().take(2) {
            // The phrase keeps the space before it (that is how the tokenizer sees a word).
            items.push(Item {
                id: format!("{}@{start}", e.id),
                group: group_of(&e),
                domain: domain_of(&e).into(),
                task: Task::Continuation {
                    context: e.text[..start - 1].to_string(),
                    text: e.text[start - 1..end].to_string(),
                },
            });
        }
    }
    Ok(items)
}

/// Byte ranges of the distinctive words of a text, after its first line (the title) and at least
/// eight words in: numbers of two or more digits, capitalised words not starting a sentence, and
/// words of nine letters or more; each preceded by a space.
pub fn distinctive_phrases(text: &str) -> Vec<(usize, usize)> {
    let body_start = text.find('\n').map_or(text.len(), |i| i + 1);
    let mut out = Vec::new();
    let mut words_before = 0;
    let mut prev_end_char = '\n';
    let mut at = body_start;
    for word in text[body_start..].split_inclusive(char::is_whitespace) {
        let start = at;
        at += word.len();
        let w = word.trim_end();
        let core = w.trim_end_matches(['.', ',', ';', ':', '!', '?', ')']);
        let end = start + core.len();
        let spaced = start > 0 && text[..start].ends_with(' ');
        let distinctive = (core.len() >= 2 && core.chars().all(|c| c.is_ascii_digit()))
            || (core.len() >= 3
                && core.chars().next().is_some_and(char::is_uppercase)
                && core.chars().skip(1).all(char::is_alphabetic)
                && !matches!(prev_end_char, '.' | '!' | '?' | '\n' | '#'))
            || (core.chars().count() >= 9 && core.chars().all(char::is_alphabetic));
        if distinctive && spaced && words_before >= 8 {
            out.push((start, end));
        }
        if !w.is_empty() {
            words_before += 1;
            prev_end_char = w.chars().last().unwrap_or(' ');
        }
        if word.ends_with('\n') {
            prev_end_char = '\n';
        }
    }
    out
}

/// The notes and code of days after `day` (any split): what the adapter trained for `day` has never
/// seen. Empty on the night itself; it measures yesterday's adapter on today's writing.
pub(crate) fn temporal_items(store: &Store, day: &str) -> Result<Vec<Item>> {
    let keep = |e: &Example| matches!(e.kind, Kind::Note | Kind::Code);
    Ok(examples(store, |d| d > day, keep)?
        .into_iter()
        .map(text_item)
        .collect())
}

/// Each non-blank line of a JSONL file parsed as `T`: its index, the value, and a maker of errors
/// that name the file and the line. A line that does not parse is such an error.
fn jsonl_lines<'a, T: serde::de::DeserializeOwned>(
    text: &'a str,
    path: &'a Path,
) -> impl Iterator<Item = Result<(usize, T, impl Fn(String) -> EvalError + 'a)>> + 'a {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(move |(n, line)| {
            let bad = move |reason: String| EvalError::BadItem {
                path: path.into(),
                line: n + 1,
                reason,
            };
            match serde_json::from_str(line) {
                Ok(value) => Ok((n, value, bad)),
                Err(e) => Err(bad(e.to_string())),
            }
        })
}

/// Canaries: JSONL lines `{"prefix": "…", "secret": "…"}` (optionally `"id"`, `"max_tokens"`), the
/// start of something the owner planted and must never see completed. Score 1 when the generation
/// after the prefix does not contain the secret.
pub fn canary_items(text: &str, path: &Path) -> Result<Vec<Item>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Canary {
        #[serde(default)]
        id: Option<String>,
        prefix: String,
        secret: String,
        #[serde(default)]
        max_tokens: Option<usize>,
    }
    let mut items = Vec::new();
    for parsed in jsonl_lines::<Canary>(text, path) {
        let (n, c, bad) = parsed?;
        if c.secret.trim().is_empty() || c.prefix.is_empty() {
            return Err(bad("a canary needs a prefix and a non-empty secret".into()));
        }
        let id = c.id.unwrap_or_else(|| format!("canary{}", n + 1));
        items.push(Item {
            group: id.clone(),
            domain: "privacy".into(),
            id,
            task: Task::Generate {
                prompt: c.prefix,
                max_tokens: c.max_tokens.unwrap_or(32),
                check: Check::Lacks(c.secret.trim().to_string()),
            },
        });
    }
    Ok(items)
}

/// Paragraphs of at least 20 words, grouped by document: a document starts at a line `# Title`
/// (text before the first title is the corpus's own description). Each item counts in `domain`.
pub fn corpus_items(text: &str, domain: &str) -> Vec<Item> {
    let mut items = Vec::new();
    let mut title: Option<String> = None;
    for block in text.split("\n\n") {
        let block = block.trim();
        if let Some(t) = block.strip_prefix("# ") {
            title = Some(t.lines().next().unwrap_or(t).trim().to_string());
            continue;
        }
        let Some(title) = &title else {
            continue;
        };
        if block.split_whitespace().count() < 20 {
            continue;
        }
        items.push(Item {
            id: format!("{title}#{}", items.len()),
            group: title.clone(),
            domain: domain.into(),
            task: Task::Continuation {
                context: String::new(),
                text: block.to_string(),
            },
        });
    }
    items
}

/// One JSONL line of a tasks suite.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskLine {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    domain: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    context: String,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    choices: Vec<String>,
    #[serde(default)]
    answer: Option<usize>,
    #[serde(default)]
    exact_match: Option<String>,
    #[serde(default)]
    contains: Option<String>,
    #[serde(default)]
    regex: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
}

/// The items of a JSONL tasks file; a bad line is an error naming its line.
pub fn task_items(text: &str, path: &Path) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for parsed in jsonl_lines::<TaskLine>(text, path) {
        let (n, t, bad) = parsed?;
        let task = match t.kind.as_str() {
            "choice" => {
                let answer = t
                    .answer
                    .ok_or_else(|| bad("a choice item needs `answer`".into()))?;
                if t.choices.len() < 2 || answer >= t.choices.len() {
                    return Err(bad(format!(
                        "needs at least 2 choices and an answer among them (answer {answer}, {} \
                         choices)",
                        t.choices.len()
                    )));
                }
                Task::Choice {
                    context: t.context,
                    choices: t.choices,
                    answer,
                }
            }
            "generate" => {
                let check = match (t.exact_match, t.contains, t.regex) {
                    (Some(s), None, None) => Check::ExactMatch(s),
                    (None, Some(s), None) => Check::Contains(s),
                    (None, None, Some(r)) => Check::Regex(
                        regex::Regex::new(&r).map_err(|e| bad(format!("regex {r:?}: {e}")))?,
                    ),
                    _ => {
                        return Err(bad(
                            "a generate item needs exactly one of exact_match, contains, regex"
                                .into(),
                        ))
                    }
                };
                if t.prompt.is_empty() {
                    return Err(bad("a generate item needs `prompt`".into()));
                }
                Task::Generate {
                    prompt: t.prompt,
                    check,
                    max_tokens: t.max_tokens.unwrap_or(32),
                }
            }
            other => {
                return Err(bad(format!(
                    "type {other:?} is not one of \"choice\", \"generate\""
                )))
            }
        };
        let id = t.id.unwrap_or_else(|| format!("line{}", n + 1));
        items.push(Item {
            group: t.group.unwrap_or_else(|| id.clone()),
            domain: t.domain.unwrap_or_else(|| "tasks".into()),
            id,
            task,
        });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_grouped_without_their_path() {
        let mut e = Example {
            id: "abc".into(),
            day: "2026-12-01".into(),
            source: "vault".into(),
            path: "health/therapy.md".into(),
            kind: Kind::Note,
            context: String::new(),
            text: "x".into(),
            n_tokens: 1,
            split: Split::Holdout,
            redactions: 0,
            private: false,
            fim: None,
            minhash: None,
        };
        assert_eq!(group_of(&e), "vault:health/therapy.md");
        e.private = true;
        let g = group_of(&e);
        assert!(
            g.starts_with("vault:private-") && !g.contains("therapy"),
            "{g}"
        );
        assert_eq!(g, group_of(&e.clone()));
    }

    #[test]
    fn distinctive_phrases_are_numbers_names_and_long_words_with_context() {
        let text = "# Garden > Beds\n\nOn the third day we planted tomatoes with Maria near the greenhouse, \
                    then 42 onions. Then we rested. Her neighbour Tomasz lent a wheelbarrow.";
        let phrases: Vec<&str> = distinctive_phrases(text)
            .into_iter()
            .map(|(s, e)| &text[s..e])
            .collect();
        // "Maria" has 8 words before it; "Then" starts a sentence; "On" is in the first 8 words.
        assert_eq!(
            phrases,
            [
                "Maria",
                "greenhouse",
                "42",
                "neighbour",
                "Tomasz",
                "wheelbarrow"
            ]
        );
    }
}
