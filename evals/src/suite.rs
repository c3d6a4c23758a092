//! Suites: named lists of items with a role in the gate. A suite is a TOML file (`configs/evals/` are
//! built in; the owner's own go in `$PAI_HOME/evals/` and replace a built-in one of the same name):
//!
//! ```toml
//! name = "retention"
//! kind = "retention"        # perplexity | retention | tasks
//! role = "guard"            # primary | guard | info
//! max_regression = 0.02     # guard: fail when the mean score drops by more than this
//! path = "retention.txt"    # retention: a text corpus; tasks: JSONL items (relative to this file)
//! domain = "general"        # retention: the domain its items count in (`general`, `code`, …)
//! max_items = 400
//! ```
//!
//! - `perplexity`: the dataset's holdout examples up to the night's day (the owner's own writing,
//!   never trained on), one item each, grouped by file; score −(mean NLL per token).
//! - `retention`: paragraphs of a general corpus the base already knows, grouped by document. Two
//!   are built in and both guard the gate: `retention` (English prose) and `retention-code`
//!   (everyday code in common languages: a code corpus forgets code faster than prose).
//! - `tasks`: JSONL items as lm-evaluation-harness writes them (`sources::task_items`).
//!
//! Where each kind's items come from — the dataset, a corpus, a JSONL file — is `sources`.

use std::path::{Path, PathBuf};

use pai_datasets::Store;
use serde::Deserialize;

use crate::error::{EvalError, Result};
use crate::gate::{Role, Thresholds};
use crate::item::Item;
use crate::sources::{
    canary_items, corpus_items, holdout_items, recall_items, task_items, temporal_items,
};

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
        "retention-code.toml",
        include_str!("../../configs/evals/retention-code.toml"),
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
/// The built-in retention corpus (public-domain texts): a retention suite without `path`.
pub const RETENTION_CORPUS: &str = include_str!("../../configs/evals/retention.txt");
/// The built-in code retention corpus (everyday code written for pai).
pub const RETENTION_CODE_CORPUS: &str = include_str!("../../configs/evals/retention-code.txt");

/// The files a built-in suite's `path` can name, as (file name, text).
const BUILT_IN_FILES: &[(&str, &str)] = &[
    ("retention.txt", RETENTION_CORPUS),
    ("retention-code.txt", RETENTION_CODE_CORPUS),
];

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
    /// Retention: the domain its items count in for the per-domain standings (`general` when
    /// absent; `code` for a code corpus, so the router learns where forgetting happened).
    #[serde(default)]
    pub domain: Option<String>,
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
                (Some(p), Origin::BuiltIn) => BUILT_IN_FILES
                    .iter()
                    .find(|(name, _)| Path::new(name) == p)
                    .map(|(_, text)| text.to_string())
                    .ok_or_else(|| EvalError::BadSuite {
                        suite: config.name.clone(),
                        reason: format!("no built-in corpus {}", p.display()),
                    })?,
                (None, _) => RETENTION_CORPUS.to_string(),
            };
            corpus_items(&text, config.domain.as_deref().unwrap_or("general"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::{Check, Task};

    #[test]
    fn built_in_suites_parse_and_the_corpus_has_documents() {
        let dir = tempfile::tempdir().unwrap();
        let configs = load_configs(&dir.path().join("none")).unwrap();
        let names: Vec<&str> = configs.iter().map(|(c, _)| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "perplexity",
                "retention",
                "retention-code",
                "recall",
                "temporal"
            ]
        );
        let store = Store::open(&dir.path().join("dataset")).unwrap();
        for (config, origin) in &configs[1..3] {
            assert_eq!(config.role, Role::Guard);
            let suite = build(config.clone(), origin, &store, "2026-01-01").unwrap();
            let groups: std::collections::BTreeSet<&str> =
                suite.items.iter().map(|i| i.group.as_str()).collect();
            assert!(
                suite.items.len() >= 30 && groups.len() >= 6,
                "{}: {} items, {groups:?}",
                config.name,
                suite.items.len()
            );
            let domain = if config.name == "retention" {
                "general"
            } else {
                "code"
            };
            assert!(
                suite.items.iter().all(|i| i.domain == domain),
                "{}",
                config.name
            );
        }
        // The code corpus's items are whole functions, not the lines between blank ones.
        let code = build(configs[2].0.clone(), &configs[2].1, &store, "2026-01-01").unwrap();
        assert!(code.items.iter().any(|i| matches!(&i.task,
            Task::Continuation { text, .. } if text.starts_with("def binary_search")
                && text.ends_with("return -1"))));
    }

    #[test]
    fn a_built_in_suite_names_only_built_in_corpora() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("dataset")).unwrap();
        let config = parse(
            "name = \"r\"\nkind = \"retention\"\npath = \"elsewhere.txt\"\n",
            Path::new("r.toml"),
        )
        .unwrap();
        let err = build(config, &Origin::BuiltIn, &store, "2026-01-01").unwrap_err();
        assert!(err.to_string().contains("elsewhere.txt"), "{err}");
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
