//! pai-evals: does a candidate adapter deserve to be served?
//!
//! Suites (`suite`) are lists of items (`item`, drawn by `sources`): the owner's holdout writing, a general corpus the
//! base knows, the owner's own task files. The scorer (`score`) runs them on the served quantized
//! base with an adapter stack, continuations packed side by side in one pass per row. `run::evaluate`
//! scores the candidate and the incumbent on the same items, and the gate (`gate`) compares them item
//! by item with a cluster bootstrap by source file and decides: every primary suite improved beyond
//! its interval, no guard suite regressed beyond its threshold.

pub mod cache;
mod error;
pub mod gate;
pub mod item;
pub mod report;
pub mod run;
pub mod score;
pub mod sources;
pub mod suite;

pub use cache::ScoreCache;
pub use error::{EvalError, Result};
pub use gate::{Decision, DomainStanding, Role, Standing, SuiteVerdict, Thresholds, Verdict};
pub use item::{Check, Item, ItemResult, Task};
pub use run::{evaluate, samples, Contender, Contenders, EvalReport, Sample, Scoring};
pub use score::{Scorer, DEFAULT_ROW_TOKENS};
pub use suite::{load_configs, Suite, SuiteConfig, SuiteKind};
