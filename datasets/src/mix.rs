//! What a night trains on: the training mix drawn from the stored days.
//!
//! Two shapes, matching the trainer's two nightly strategies (DESIGN.md "Decisions"):
//! - `MixMode::Continue`: the new day whole, plus a replay share of earlier days, so an adapter that
//!   continues from last night's keeps seeing what it learned before (forgetting control);
//! - `MixMode::Cumulative`: every day up to the cut-off, for an adapter trained fresh from the base.
//!
//! Earlier days are drawn recency-weighted: an example `age` days older than the cut-off has weight
//! `2^(-age / half_life_days)`, and examples are drawn without replacement in proportion to weight
//! (Efraimidis–Spirakis keys), until the token target is met. Draws depend only on the seed and the
//! example ids, so the same dataset and seed give the same mix on any machine.
//!
//! Evaluation hygiene lives here too, since this is the only door from the dataset into training:
//! holdout examples never enter a mix, nor do the ids the eval suites use (`exclude`), nor days after
//! the cut-off (the newest day stays a temporal test set for the adapter trained before it).

use std::collections::{BTreeMap, HashSet};

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::error::{DatasetError, Result};
use crate::example::{Example, Split};
use crate::store::Store;

/// How the mix is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixMode {
    Continue,
    Cumulative,
}

/// Mix settings (`[mix]` in pai.toml).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MixSettings {
    /// `continue`: the share of the mix's tokens drawn from earlier days (0 = the new day only).
    pub replay_share: f64,
    /// Days after which an earlier example's weight halves.
    pub half_life_days: f64,
    /// At most this many tokens in the mix (`None`: no cap). Under `continue`, a new day larger than
    /// the budget is itself sampled down.
    pub max_tokens: Option<usize>,
    pub seed: u64,
}

impl Default for MixSettings {
    fn default() -> Self {
        Self {
            replay_share: 0.3,
            half_life_days: 14.0,
            max_tokens: None,
            seed: 0,
        }
    }
}

/// A training mix and what it is made of.
#[derive(Debug, Clone, Default)]
pub struct Mix {
    /// In a deterministic shuffled order.
    pub examples: Vec<Example>,
    /// Tokens from the cut-off day and from earlier days.
    pub new_tokens: usize,
    pub replay_tokens: usize,
    /// Examples taken per day.
    pub by_day: BTreeMap<String, usize>,
    /// Train-split examples left out because an eval suite uses them.
    pub excluded_for_eval: usize,
}

/// Draw the training mix for the night of `day` (the cut-off: later days are never in it).
pub fn training_mix(
    store: &Store,
    day: &str,
    mode: MixMode,
    settings: &MixSettings,
    exclude: &HashSet<String>,
) -> Result<Mix> {
    if !(0.0..1.0).contains(&settings.replay_share) {
        return Err(DatasetError::BadSetting {
            key: "mix.replay_share",
            value: settings.replay_share.to_string(),
            allowed: "at least 0 and below 1",
        });
    }
    if settings.half_life_days.is_nan() || settings.half_life_days <= 0.0 {
        return Err(DatasetError::BadSetting {
            key: "mix.half_life_days",
            value: settings.half_life_days.to_string(),
            allowed: "above 0",
        });
    }
    let cutoff = parse_day(day)?;
    let mut mix = Mix::default();
    let mut new = Vec::new();
    let mut earlier: Vec<(Example, f64)> = Vec::new();
    for d in store.days()? {
        let date = parse_day(&d)?;
        if date > cutoff {
            continue;
        }
        let age = (cutoff - date).num_days() as f64;
        for e in store.read_day(&d)? {
            if e.split != Split::Train {
                continue;
            }
            if exclude.contains(&e.id) {
                mix.excluded_for_eval += 1;
                continue;
            }
            match mode {
                MixMode::Continue if age == 0.0 => new.push(e),
                _ => earlier.push((e, (-age / settings.half_life_days).exp2())),
            }
        }
    }
    let (new, replay) = match mode {
        MixMode::Continue => {
            let new_total: usize = new.iter().map(tokens).sum();
            let new = match settings.max_tokens {
                Some(cap) if new_total > cap => draw(
                    new.into_iter().map(|e| (e, 1.0)).collect(),
                    cap,
                    settings.seed,
                ),
                _ => new,
            };
            let new_tokens: usize = new.iter().map(tokens).sum();
            let share = settings.replay_share;
            let mut target = (new_tokens as f64 * share / (1.0 - share)).round() as usize;
            if let Some(cap) = settings.max_tokens {
                target = target.min(cap.saturating_sub(new_tokens));
            }
            (new, draw(earlier, target, settings.seed))
        }
        MixMode::Cumulative => {
            let target = settings.max_tokens.unwrap_or(usize::MAX);
            let all = draw(earlier, target, settings.seed);
            let (new, old): (Vec<Example>, Vec<Example>) =
                all.into_iter().partition(|e| e.day == day);
            (new, old)
        }
    };
    mix.new_tokens = new.iter().map(tokens).sum();
    mix.replay_tokens = replay.iter().map(tokens).sum();
    mix.examples = new.into_iter().chain(replay).collect();
    for e in &mix.examples {
        *mix.by_day.entry(e.day.clone()).or_default() += 1;
    }
    // A fixed shuffle: by a hash of (seed, id).
    let seed = settings.seed;
    mix.examples
        .sort_by_cached_key(|e| (uniform(seed ^ 0x5348_5546, &e.id).to_bits(), e.id.clone()));
    Ok(mix)
}

fn tokens(e: &Example) -> usize {
    e.n_tokens as usize
}

fn parse_day(day: &str) -> Result<NaiveDate> {
    NaiveDate::parse_from_str(day, "%Y-%m-%d").map_err(|_| DatasetError::BadDay {
        day: day.to_string(),
    })
}

/// Weighted sampling without replacement until `target` tokens: each example's key is
/// `ln(u) / weight` for a uniform `u` fixed by the seed and its id; the largest keys win.
fn draw(pool: Vec<(Example, f64)>, target: usize, seed: u64) -> Vec<Example> {
    let total: usize = pool.iter().map(|(e, _)| tokens(e)).sum();
    if total <= target {
        return pool.into_iter().map(|(e, _)| e).collect();
    }
    let mut keyed: Vec<(f64, Example)> = pool
        .into_iter()
        .filter(|(_, w)| *w > 0.0)
        .map(|(e, w)| (uniform(seed, &e.id).ln() / w, e))
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
    let mut out = Vec::new();
    let mut taken = 0usize;
    for (_, e) in keyed {
        if taken >= target {
            break;
        }
        // Skip what would overshoot unless nothing is taken yet; smaller ones later may fit.
        if taken + tokens(&e) > target && taken > 0 {
            continue;
        }
        taken += tokens(&e);
        out.push(e);
    }
    out
}

/// A uniform number in (0, 1) from the seed and an id.
fn uniform(seed: u64, id: &str) -> f64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((crate::minhash::mix64(h) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::example::{content_id, Kind};

    fn example(day: &str, i: usize, tokens: u32) -> Example {
        let text = format!("{day} example {i}");
        let id = content_id(&text);
        Example {
            split: Split::of(&id, 0.1),
            id,
            day: day.into(),
            source: "notes".into(),
            path: format!("{i}.md"),
            kind: Kind::Note,
            context: String::new(),
            text,
            n_tokens: tokens,
            redactions: 0,
            private: false,
            fim: None,
            minhash: None,
        }
    }

    fn store_with_days(dir: &std::path::Path, days: &[&str], per_day: usize) -> Store {
        let store = Store::open(dir).unwrap();
        for day in days {
            let rows: Vec<Example> = (0..per_day).map(|i| example(day, i, 100)).collect();
            store.write_day(day, &rows).unwrap();
        }
        store
    }

    #[test]
    fn continue_takes_the_new_day_and_a_recency_weighted_replay_share() {
        let dir = tempfile::tempdir().unwrap();
        let days = [
            "2026-10-01",
            "2026-11-01",
            "2026-11-20",
            "2026-11-21",
            "2026-11-22",
        ];
        let store = store_with_days(dir.path(), &days, 200);
        let settings = MixSettings {
            replay_share: 0.25,
            half_life_days: 3.0,
            ..Default::default()
        };
        let mix = training_mix(
            &store,
            "2026-11-21",
            MixMode::Continue,
            &settings,
            &HashSet::new(),
        )
        .unwrap();
        // The cut-off day's train split whole; nothing from after it; no holdout.
        let new_train = store
            .read_day("2026-11-21")
            .unwrap()
            .iter()
            .filter(|e| e.split == Split::Train)
            .count();
        assert_eq!(mix.by_day["2026-11-21"], new_train);
        assert!(!mix.by_day.contains_key("2026-11-22"));
        assert!(mix.examples.iter().all(|e| e.split == Split::Train));
        // A quarter of the tokens replayed, mostly from the day before.
        let share = mix.replay_tokens as f64 / (mix.new_tokens + mix.replay_tokens) as f64;
        assert!((share - 0.25).abs() < 0.01, "{share}");
        let recent = mix.by_day.get("2026-11-20").copied().unwrap_or(0);
        let old = mix.by_day.get("2026-10-01").copied().unwrap_or(0)
            + mix.by_day.get("2026-11-01").copied().unwrap_or(0);
        assert!(recent > 10 * old.max(1), "{:?}", mix.by_day);
        // Same seed, same mix; another seed, another replay.
        let again = training_mix(
            &store,
            "2026-11-21",
            MixMode::Continue,
            &settings,
            &HashSet::new(),
        )
        .unwrap();
        let ids = |m: &Mix| m.examples.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&mix), ids(&again));
        let other = MixSettings {
            seed: 7,
            ..settings
        };
        let other = training_mix(
            &store,
            "2026-11-21",
            MixMode::Continue,
            &other,
            &HashSet::new(),
        )
        .unwrap();
        assert_ne!(ids(&mix), ids(&other));
    }

    #[test]
    fn cumulative_respects_the_budget_and_eval_items_never_enter() {
        let dir = tempfile::tempdir().unwrap();
        let days = ["2026-11-01", "2026-11-15", "2026-11-22"];
        let store = store_with_days(dir.path(), &days, 100);
        let eval_ids: HashSet<String> = store
            .read_day("2026-11-22")
            .unwrap()
            .iter()
            .take(10)
            .map(|e| e.id.clone())
            .collect();
        let unlimited = training_mix(
            &store,
            "2026-11-22",
            MixMode::Cumulative,
            &MixSettings::default(),
            &eval_ids,
        )
        .unwrap();
        let train_total: usize = days
            .iter()
            .flat_map(|d| store.read_day(d).unwrap())
            .filter(|e| e.split == Split::Train)
            .count();
        let excluded = eval_ids
            .iter()
            .filter(|id| unlimited.examples.iter().all(|e| &e.id != *id))
            .count();
        assert_eq!(excluded, 10);
        assert_eq!(
            unlimited.examples.len() + unlimited.excluded_for_eval,
            train_total
        );
        let capped = MixSettings {
            max_tokens: Some(8_000),
            half_life_days: 7.0,
            ..Default::default()
        };
        let mix = training_mix(
            &store,
            "2026-11-22",
            MixMode::Cumulative,
            &capped,
            &eval_ids,
        )
        .unwrap();
        assert_eq!(mix.new_tokens + mix.replay_tokens, 8_000);
        assert!(mix.examples.iter().all(|e| !eval_ids.contains(&e.id)));
        assert!(mix.by_day["2026-11-22"] > mix.by_day.get("2026-11-01").copied().unwrap_or(0));
    }

    #[test]
    fn bad_settings_and_days_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bad = MixSettings {
            replay_share: 1.0,
            ..Default::default()
        };
        let err = training_mix(
            &store,
            "2026-11-22",
            MixMode::Continue,
            &bad,
            &HashSet::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("mix.replay_share"), "{err}");
        let err = training_mix(
            &store,
            "22/11/2026",
            MixMode::Continue,
            &MixSettings::default(),
            &HashSet::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("22/11/2026"), "{err}");
    }
}
