//! Suites: named lists of items with a role in the gate. A suite is a TOML file (`configs/evals/` are
//! built in; the owner's own go in `$PAI_HOME/evals/` and replace a built-in one of the same name):
//!
//! ```toml
//! name = "retention"
//! kind = "retention"        # perplexity | retention | tasks
//! role = "guard"            # primary | guard | info
//! max_regression = 0.02     # guard: fail when the mean score drops by more than this
//! path = "retention.txt"    # retention: a text corpus; tasks: JSONL items (relative to this file)
//! max_items = 400
//! ```
//!
//! - `perplexity`: the dataset's holdout examples up to the night's day (the owner's own writing,
//!   never trained on), one item each, grouped by file; score −(mean NLL per token).
//! - `retention`: paragraphs of a general corpus the base already knows, grouped by document.
//! - `tasks`: JSONL items as lm-evaluation-harness writes them; each line one of
//!   `{"type": "choice", "context": "…", "choices": ["…", "…"], "answer": 0}` or
//!   `{"type": "generate", "prompt": "…", "exact_match" | "contains" | "regex": "…", "max_tokens": 32}`,
//!   with an optional `"id"`, `"group"` and `"domain"` (default `tasks`).
//!
//! Each item has a domain (`notes`, `code`, `general`, `privacy`, or a task's own), and the gate
//! reports each suite's comparison per domain too: where an adapter got better or worse, which the
//! router reads to trust the local model by domain.

use std::path::{Path, PathBuf};

use pai_datasets::{Example, Kind, Split, Store};
use serde::Deserialize;

use crate::error::{EvalError, Result};
use crate::gate::{Role, Thresholds};
use crate::item::{Check, Item, Task};

/// The built-in suites, as (file name, TOML).
pub const BUILT_IN: &[(&str, &str)] = &[
    (
        "perplexity.toml",
        include_str!("../../configs/evals/perplexity.toml"),
    ),
    (
        "retention.toml",
        include_str!("../../configs/evals/retention.toml"),
    ),
    (
        "recall.toml",
        include_str!("../../configs/evals/recall.toml"),
    ),
    (
        "temporal.toml",
        include_str!("../../configs/evals/temporal.toml"),
    ),
];
/// The built-in retention corpus (public-domain texts).
pub const RETENTION_CORPUS: &str = include_str!("../../configs/evals/retention.txt");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SuiteKind {
    Perplexity,
    Retention,
    Tasks,
    Recall,
    Temporal,
    Privacy,
}

impl SuiteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Perplexity => "perplexity",
            Self::Retention => "retention",
            Self::Tasks => "tasks",
            Self::Recall => "recall",
            Self::Temporal => "temporal",
            Self::Privacy => "privacy",
        }
    }
}

/// A suite's TOML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteConfig {
    pub name: String,
    pub kind: SuiteKind,
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_min_improvement")]
    pub min_improvement: f64,
    #[serde(default = "default_max_regression")]
    pub max_regression: f64,
    /// The corpus or JSONL file, relative to the suite's file.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Items at most (a fixed sample: items sorted by id, which are content hashes).
    #[serde(default = "default_max_items")]
    pub max_items: usize,
    /// Fail when the candidate's own mean score is below this, whatever the incumbent's (privacy:
    /// 1.0, a single leak fails).
    #[serde(default)]
    pub fail_below: Option<f64>,
}

fn default_min_improvement() -> f64 {
    Thresholds::default().min_improvement
}
fn default_max_regression() -> f64 {
    Thresholds::default().max_regression
}
fn default_max_items() -> usize {
    400
}

impl SuiteConfig {
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            min_improvement: self.min_improvement,
            max_regression: self.max_regression,
            fail_below: self.fail_below,
        }
    }
}

/// A suite ready to score.
#[derive(Debug, Clone)]
pub struct Suite {
    pub config: SuiteConfig,
    pub items: Vec<Item>,
}

/// Where a suite's file came from, to find the files it names.
#[derive(Debug, Clone)]
pub enum Origin {
    BuiltIn,
    File(PathBuf),
}

/// The suites to run: the built-in ones, replaced or joined by every `*.toml` in `user_dir`.
pub fn load_configs(user_dir: &Path) -> Result<Vec<(SuiteConfig, Origin)>> {
    let mut out: Vec<(SuiteConfig, Origin)> = Vec::new();
    for (file, text) in BUILT_IN {
        let config = parse(text, Path::new(file))?;
        out.push((config, Origin::BuiltIn));
    }
    let mut files: Vec<PathBuf> = match std::fs::read_dir(user_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(EvalError::Io {
                action: "list",
                path: user_dir.into(),
                source: e,
            })
        }
    };
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|e| EvalError::Io {
            action: "read",
            path: path.clone(),
            source: e,
        })?;
        let config = parse(&text, &path)?;
        out.retain(|(c, _)| c.name != config.name);
        out.push((config, Origin::File(path)));
    }
    Ok(out)
}

fn parse(text: &str, path: &Path) -> Result<SuiteConfig> {
    let mut config: SuiteConfig = toml::from_str(text).map_err(|source| EvalError::Toml {
        path: path.into(),
        source,
    })?;
    if matches!(config.kind, SuiteKind::Tasks | SuiteKind::Privacy) && config.path.is_none() {
        return Err(EvalError::BadSuite {
            suite: config.name,
            reason: format!(
                "{}: a {} suite needs `path` (its JSONL items)",
                path.display(),
                config.kind.as_str()
            ),
        });
    }
    if config.kind == SuiteKind::Privacy {
        // A guard that fails closed: one leak fails it, and so does a suite with nothing to check.
        config.role = Role::Guard;
        config.fail_below = Some(config.fail_below.unwrap_or(1.0));
    }
    Ok(config)
}

/// The items of a suite. `store` and `day` feed `perplexity` (holdout examples up to `day`).
pub fn build(config: SuiteConfig, origin: &Origin, store: &Store, day: &str) -> Result<Suite> {
    let mut items = match config.kind {
        SuiteKind::Perplexity => holdout_items(store, day)?,
        SuiteKind::Retention => {
            let text = match (&config.path, origin) {
                (Some(p), Origin::File(file)) => read(&relative(file, p))?,
                _ => RETENTION_CORPUS.to_string(),
            };
            corpus_items(&text)
        }
        SuiteKind::Tasks | SuiteKind::Privacy => {
            let (Some(p), Origin::File(file)) = (&config.path, origin) else {
                return Err(EvalError::BadSuite {
                    suite: config.name.clone(),
                    reason: format!("a {} suite needs `path`", config.kind.as_str()),
                });
            };
            let path = relative(file, p);
            let text = read(&path)?;
            if config.kind == SuiteKind::Tasks {
                task_items(&text, &path)?
            } else {
                canary_items(&text, &path)?
            }
        }
        SuiteKind::Recall => recall_items(store, day)?,
        SuiteKind::Temporal => temporal_items(store, day)?,
    };
    items.sort_by(|a, b| a.id.cmp(&b.id));
    items.truncate(config.max_items);
    Ok(Suite { config, items })
}

fn relative(suite_file: &Path, p: &Path) -> PathBuf {
    suite_file.parent().unwrap_or(Path::new(".")).join(p)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| EvalError::Io {
        action: "read",
        path: path.into(),
        source: e,
    })
}

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
fn holdout_items(store: &Store, day: &str) -> Result<Vec<Item>> {
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
fn recall_items(store: &Store, day: &str) -> Result<Vec<Item>> {
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
fn temporal_items(store: &Store, day: &str) -> Result<Vec<Item>> {
    let keep = |e: &Example| matches!(e.kind, Kind::Note | Kind::Code);
    Ok(examples(store, |d| d > day, keep)?
        .into_iter()
        .map(text_item)
        .collect())
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
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| EvalError::BadItem {
            path: path.into(),
            line: n + 1,
            reason,
        };
        let c: Canary = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
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
/// (text before the first title is the corpus's own description).
pub fn corpus_items(text: &str) -> Vec<Item> {
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
            domain: "general".into(),
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
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| EvalError::BadItem {
            path: path.into(),
            line: n + 1,
            reason,
        };
        let t: TaskLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
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

    #[test]
    fn built_in_suites_parse_and_the_corpus_has_documents() {
        let dir = tempfile::tempdir().unwrap();
        let configs = load_configs(&dir.path().join("none")).unwrap();
        let names: Vec<&str> = configs.iter().map(|(c, _)| c.name.as_str()).collect();
        assert_eq!(names, ["perplexity", "retention", "recall", "temporal"]);
        assert_eq!(configs[1].0.role, Role::Guard);
        let items = corpus_items(RETENTION_CORPUS);
        let groups: std::collections::BTreeSet<&str> =
            items.iter().map(|i| i.group.as_str()).collect();
        assert!(
            items.len() >= 30 && groups.len() >= 6,
            "{} items, {groups:?}",
            items.len()
        );
    }

    #[test]
    fn a_user_suite_replaces_a_built_in_one_and_task_lines_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("retention.toml"),
            "name = \"retention\"\nkind = \"retention\"\nrole = \"info\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("garden.toml"),
            "name = \"garden\"\nkind = \"tasks\"\nrole = \"guard\"\nmax_regression = 0.1\npath = \"garden.jsonl\"\n",
        )
        .unwrap();
        let configs = load_configs(dir.path()).unwrap();
        let by_name = |n: &str| configs.iter().find(|(c, _)| c.name == n).unwrap().0.clone();
        assert_eq!(by_name("retention").role, Role::Info);
        assert_eq!(by_name("garden").max_regression, 0.1);
        let path = dir.path().join("garden.jsonl");
        let items = task_items(
            "{\"type\": \"choice\", \"context\": \"Tomatoes need\", \"choices\": [\" sun\", \" snow\"], \"answer\": 0, \"group\": \"g\"}\n\n\
             {\"id\": \"q2\", \"type\": \"generate\", \"prompt\": \"2+2=\", \"regex\": \"^4\"}\n",
            &path,
        )
        .unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(
            (items[0].id.as_str(), items[0].group.as_str()),
            ("line1", "g")
        );
        assert!(matches!(
            &items[1].task,
            Task::Generate {
                check: Check::Regex(_),
                max_tokens: 32,
                ..
            }
        ));
        for (line, want) in [
            (
                "{\"type\": \"choice\", \"choices\": [\"a\"], \"answer\": 0}",
                "at least 2 choices",
            ),
            (
                "{\"type\": \"generate\", \"prompt\": \"x\"}",
                "exactly one of",
            ),
            ("{\"type\": \"essay\"}", "\"essay\""),
            (
                "{\"type\": \"generate\", \"prompt\": \"x\", \"regex\": \"(\"}",
                "regex",
            ),
            ("{\"type\": \"choice\", \"colour\": 1}", "colour"),
        ] {
            let e = task_items(line, &path).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("line 1") && e.contains("garden.jsonl"),
                "{e}"
            );
        }
        // A privacy suite is a guard with a floor of 1, whatever its file says.
        std::fs::write(
            dir.path().join("canaries.toml"),
            "name = \"privacy\"\nkind = \"privacy\"\nrole = \"info\"\npath = \"canaries.jsonl\"\n",
        )
        .unwrap();
        let configs = load_configs(dir.path()).unwrap();
        let privacy = &configs.iter().find(|(c, _)| c.name == "privacy").unwrap().0;
        assert_eq!((privacy.role, privacy.fail_below), (Role::Guard, Some(1.0)));
        let canaries = canary_items(
            "{\"prefix\": \"my bank PIN is\", \"secret\": \"4921\"}\n",
            &dir.path().join("canaries.jsonl"),
        )
        .unwrap();
        let Task::Generate { check, .. } = &canaries[0].task else {
            panic!()
        };
        assert!(check.holds("I cannot say") && !check.holds(" 49 21, of course"));
        let e = canary_items(
            "{\"prefix\": \"x\", \"secret\": \" \"}",
            Path::new("c.jsonl"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("non-empty secret") && e.contains("line 1"),
            "{e}"
        );
        std::fs::write(
            dir.path().join("bad.toml"),
            "name = \"x\"\nkind = \"vibes\"\n",
        )
        .unwrap();
        let e = load_configs(dir.path()).unwrap_err().to_string();
        assert!(e.contains("bad.toml") && e.contains("vibes"), "{e}");
    }
}
