//! Running the suites: the candidate and the incumbent (and the bare base, when the incumbent is
//! not already the base) score the same items with the same prompts, and the gate compares them.

use serde::{Deserialize, Serialize};

use pai_model::{AdapterStack, Model, Tokenizer};

use crate::cache::{item_key, ScoreCache};
use crate::error::{EvalError, Result};
use crate::gate::{by_domain, compare, decide, judge, Decision, Paired, Role};
use crate::item::{Item, ItemResult};
use crate::score::Scorer;
use crate::suite::Suite;

/// Who scores: a label for the report, the adapters, and the key its scores are kept under between
/// runs (`cache`; `None`: never kept).
#[derive(Clone, Copy)]
pub struct Contender<'a> {
    pub label: &'a str,
    pub adapters: AdapterStack<'a>,
    pub key: Option<&'a str>,
}

/// What is compared.
pub struct Contenders<'a> {
    pub candidate: Contender<'a>,
    pub incumbent: Contender<'a>,
    /// `None` when the incumbent is the bare base.
    pub base: Option<Contender<'a>>,
}

/// How items are scored.
#[derive(Clone, Copy)]
pub struct Scoring<'a> {
    /// Longest row of one pass (see `Scorer`).
    pub row_tokens: usize,
    /// Pack rows (see `Scorer::pack`); packed scores are never cached.
    pub pack: bool,
    /// Makes the bootstrap repeatable.
    pub seed: u64,
    pub cache: Option<&'a ScoreCache>,
}

/// One suite's per-item results for every contender.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuiteResults {
    pub name: String,
    pub kind: String,
    pub role: Role,
    pub description: String,
    pub candidate: Vec<ItemResult>,
    pub incumbent: Vec<ItemResult>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub base: Vec<ItemResult>,
}

/// A prompt both adapters continued, for the report to set side by side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub id: String,
    pub prompt: String,
    pub incumbent: String,
    pub candidate: String,
}

/// Everything an eval run found: per-item results, sample generations and the gate's decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub candidate: String,
    pub incumbent: String,
    pub suites: Vec<SuiteResults>,
    #[serde(default)]
    pub samples: Vec<Sample>,
    pub decision: Decision,
}

/// Greedy continuations of each `(id, prompt)` by the incumbent and the candidate (`max_tokens`
/// each), for the report.
pub fn samples(
    model: &Model,
    tokenizer: &Tokenizer,
    contenders: &Contenders<'_>,
    prompts: &[(String, String)],
    max_tokens: usize,
) -> Result<Vec<Sample>> {
    let generate = |adapters: AdapterStack<'_>, prompt: &str| -> Result<String> {
        let item = Item {
            id: String::new(),
            group: String::new(),
            domain: String::new(),
            task: crate::item::Task::Generate {
                prompt: prompt.into(),
                check: crate::item::Check::Contains(String::new()),
                max_tokens,
            },
        };
        let scorer = Scorer {
            model,
            tokenizer,
            adapters,
            row_tokens: 512,
            pack: false,
        };
        match scorer
            .score(std::slice::from_ref(&item))?
            .pop()
            .map(|r| r.detail)
        {
            Some(crate::item::Detail::Generate { text }) => Ok(text),
            _ => Ok(String::new()),
        }
    };
    prompts
        .iter()
        .map(|(id, prompt)| {
            Ok(Sample {
                id: id.clone(),
                prompt: prompt.clone(),
                incumbent: generate(contenders.incumbent.adapters, prompt)?,
                candidate: generate(contenders.candidate.adapters, prompt)?,
            })
        })
        .collect()
}

/// Score every suite and decide. `on_suite(name, items)` is called before each suite is scored.
pub fn evaluate(
    model: &Model,
    tokenizer: &Tokenizer,
    suites: &[Suite],
    contenders: Contenders<'_>,
    scoring: Scoring<'_>,
    mut on_suite: impl FnMut(&str, usize),
) -> Result<EvalReport> {
    // Each item's result: kept ones where the cache has them, the rest scored (and kept).
    let score = |who: Contender<'_>, suite: &Suite| -> Result<Vec<ItemResult>> {
        let scorer = Scorer {
            model,
            tokenizer,
            adapters: who.adapters,
            row_tokens: scoring.row_tokens,
            pack: scoring.pack,
        };
        let (Some(cache), Some(key), false) = (scoring.cache, who.key, scoring.pack) else {
            return scorer.score(&suite.items);
        };
        let kept = cache.load(key);
        let keys: Vec<String> = suite.items.iter().map(item_key).collect();
        let missing: Vec<Item> = suite
            .items
            .iter()
            .zip(&keys)
            .filter(|(_, k)| !kept.contains_key(*k))
            .map(|(i, _)| i.clone())
            .collect();
        let fresh = scorer.score(&missing)?;
        let fresh_keys: Vec<String> = missing.iter().map(item_key).collect();
        cache.append(
            key,
            &fresh_keys
                .iter()
                .cloned()
                .zip(fresh.iter().cloned())
                .collect::<Vec<_>>(),
        )?;
        let mut fresh: std::collections::HashMap<String, ItemResult> =
            fresh_keys.into_iter().zip(fresh).collect();
        keys.iter()
            .zip(&suite.items)
            .map(|(k, item)| {
                fresh
                    .remove(k)
                    .or_else(|| kept.get(k).cloned())
                    .ok_or_else(|| EvalError::BadSuite {
                        suite: suite.config.name.clone(),
                        reason: format!("no score for item {:?}", item.id),
                    })
            })
            .collect()
    };
    let mut results = Vec::new();
    let mut verdicts = Vec::new();
    for suite in suites {
        on_suite(&suite.config.name, suite.items.len());
        let candidate = score(contenders.candidate, suite)?;
        let incumbent = score(contenders.incumbent, suite)?;
        let base = match contenders.base {
            Some(who) => score(who, suite)?,
            None => Vec::new(),
        };
        let paired: Vec<Paired> = candidate
            .iter()
            .zip(&incumbent)
            .map(|(c, i)| Paired {
                group: c.group.clone(),
                candidate: c.score,
                incumbent: i.score,
            })
            .collect();
        let config = &suite.config;
        let mut verdict = judge(
            &config.name,
            config.role,
            config.thresholds(),
            compare(&paired, scoring.seed),
        );
        let with_domains: Vec<(&str, Paired)> = suite
            .items
            .iter()
            .map(|i| i.domain.as_str())
            .zip(paired)
            .collect();
        verdict.domains = by_domain(&with_domains, config.thresholds(), scoring.seed);
        verdicts.push(verdict);
        results.push(SuiteResults {
            name: config.name.clone(),
            kind: config.kind.as_str().into(),
            role: config.role,
            description: config.description.clone(),
            candidate,
            incumbent,
            base,
        });
    }
    Ok(EvalReport {
        candidate: contenders.candidate.label.into(),
        incumbent: contenders.incumbent.label.into(),
        suites: results,
        samples: Vec::new(),
        decision: decide(verdicts),
    })
}
