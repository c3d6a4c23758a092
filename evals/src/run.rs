//! Running the suites: the candidate and the incumbent (and the bare base, when the incumbent is
//! not already the base) score the same items with the same prompts, and the gate compares them.

use serde::{Deserialize, Serialize};

use pai_model::{AdapterStack, Model, Tokenizer};

use crate::error::Result;
use crate::gate::{compare, decide, judge, Decision, Paired, Role};
use crate::item::ItemResult;
use crate::score::Scorer;
use crate::suite::{Suite, SuiteKind};

/// What is compared: labels for the report, and the adapters each contender scores with.
pub struct Contenders<'a> {
    pub candidate: (&'a str, AdapterStack<'a>),
    pub incumbent: (&'a str, AdapterStack<'a>),
    /// `None` when the incumbent is the bare base.
    pub base: Option<AdapterStack<'a>>,
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

/// Everything an eval run found: per-item results and the gate's decision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub candidate: String,
    pub incumbent: String,
    pub suites: Vec<SuiteResults>,
    pub decision: Decision,
}

/// Score every suite and decide. `row_tokens` bounds one scoring pass (see `Scorer`); `seed` makes
/// the bootstrap repeatable. `on_suite(name, items)` is called before each suite is scored.
pub fn evaluate(
    model: &Model,
    tokenizer: &Tokenizer,
    suites: &[Suite],
    contenders: Contenders<'_>,
    row_tokens: usize,
    seed: u64,
    mut on_suite: impl FnMut(&str, usize),
) -> Result<EvalReport> {
    let score = |adapters: AdapterStack<'_>, suite: &Suite| -> Result<Vec<ItemResult>> {
        Scorer {
            model,
            tokenizer,
            adapters,
            row_tokens,
        }
        .score(&suite.items)
    };
    let mut results = Vec::new();
    let mut verdicts = Vec::new();
    for suite in suites {
        on_suite(&suite.config.name, suite.items.len());
        let candidate = score(contenders.candidate.1, suite)?;
        let incumbent = score(contenders.incumbent.1, suite)?;
        let base = match contenders.base {
            Some(stack) => score(stack, suite)?,
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
        verdicts.push(judge(
            &config.name,
            config.role,
            config.thresholds(),
            compare(&paired, seed),
        ));
        results.push(SuiteResults {
            name: config.name.clone(),
            kind: match config.kind {
                SuiteKind::Perplexity => "perplexity",
                SuiteKind::Retention => "retention",
                SuiteKind::Tasks => "tasks",
            }
            .into(),
            role: config.role,
            description: config.description.clone(),
            candidate,
            incumbent,
            base,
        });
    }
    Ok(EvalReport {
        candidate: contenders.candidate.0.into(),
        incumbent: contenders.incumbent.0.into(),
        suites: results,
        decision: decide(verdicts),
    })
}
