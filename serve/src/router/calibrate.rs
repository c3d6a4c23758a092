//! Calibration of the thresholds from a labelled set: each item's signals (the local model's mean
//! log-likelihood of it, its length, its kind, the served adapter's standing in its domain) and the
//! level it should go to. For each candidate length weight and set of kind offsets, the thresholds
//! are the scores that split the items, highest first, into the target shares (80 / 15 / 5 by
//! default), so the share kept local is the one asked for by construction; the weight and offsets
//! kept are those whose split agrees best with the labels (offsets by coordinate search on a grid,
//! the smallest among equals, only for kinds with enough items to say something). `pai-train router
//! calibrate` runs it and writes the result to `$PAI_HOME/router/calibration.json`, which a running
//! pai-serve picks up.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::config::Thresholds;
use super::kind::RequestKind;
use super::probe::Signals;

/// The length weights tried (0 leaves the mean log-likelihood alone).
const LENGTH_WEIGHTS: [f64; 15] = [
    0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0,
];

/// The kind offsets tried (nats), smallest magnitude first so that ties keep the smaller.
const KIND_OFFSETS: [f64; 9] = [0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 2.0, -2.0];

/// A kind gets an offset only with at least this many labelled items.
const MIN_KIND_ITEMS: usize = 4;

/// Items an offset must decide better to be kept (less overfits a small set: one odd item would
/// buy an offset that misleads on the next).
const MIN_KIND_GAIN: f64 = 2.0 - 1e-9;

/// Rounds of the coordinate search over the kinds.
const ROUNDS: usize = 2;

/// One labelled request of the calibration set (`configs/router/labelled.jsonl`, one a line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelledRequest {
    /// The chat messages, as a request sends them.
    pub messages: Vec<LabelledMessage>,
    /// Where it should be answered: 1 local, 2 cloud medium, 3 cloud large.
    pub level: u8,
    /// What kind of task it is (reported per kind).
    #[serde(default)]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelledMessage {
    pub role: String,
    pub content: String,
}

/// What a calibration found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fitted {
    pub thresholds: Thresholds,
    /// Shares (percent) of the items at L1, L2, L3 under the thresholds.
    pub share: [f64; 3],
    /// Share (0–1) of the items decided at their label's level.
    pub agreement: f64,
    /// `confusion[label - 1][decided - 1]`: items.
    pub confusion: [[usize; 3]; 3],
}

/// The level a score goes to under `t`.
pub fn level_of(score: f64, t: &Thresholds) -> u8 {
    if score >= t.local {
        1
    } else if score >= t.medium {
        2
    } else {
        3
    }
}

/// Thresholds (length weight and, with `kinds`, kind offsets) that split `items` (signals, label)
/// into `target_share` (percent, adding to 100) and agree best with the labels, the adapter's
/// standing weighted by `gate_weight`. None for an empty set.
fn fit(
    items: &[(Signals, u8)],
    target_share: [f64; 3],
    gate_weight: f64,
    kinds: bool,
) -> Option<Fitted> {
    if items.is_empty() {
        return None;
    }
    let mut counts = [0usize; RequestKind::ALL.len()];
    for (s, _) in items {
        counts[s.kind.index()] += 1;
    }
    let fitted_kinds: Vec<RequestKind> = RequestKind::ALL
        .into_iter()
        .filter(|k| kinds && counts[k.index()] >= MIN_KIND_ITEMS)
        .collect();
    let mut best: Option<Fitted> = None;
    for weight in LENGTH_WEIGHTS {
        let mut t = Thresholds {
            local: 0.0,
            medium: 0.0,
            length_weight: weight,
            kind_offsets: BTreeMap::new(),
            gate_weight,
        };
        let mut here = split(items, target_share, &t);
        for _ in 0..ROUNDS {
            for kind in &fitted_kinds {
                for offset in KIND_OFFSETS {
                    let mut tried = t.clone();
                    tried.kind_offsets.insert(kind.as_str().into(), offset);
                    let f = split(items, target_share, &tried);
                    // An offset must be worth two items: one is what a single odd item buys.
                    if f.agreement >= here.agreement + MIN_KIND_GAIN / items.len() as f64 {
                        t = tried;
                        here = f;
                    }
                }
            }
        }
        // Strictly better only: among equals the smallest weight stays.
        if best.as_ref().is_none_or(|b| here.agreement > b.agreement) {
            best = Some(here);
        }
    }
    best.map(|mut f| {
        f.thresholds.kind_offsets.retain(|_, o| *o != 0.0);
        f
    })
}

/// The agreement on items the fit has not seen: each item decided by the thresholds fitted to all
/// the others (leave-one-out), the honest figure for a small labelled set.
fn held_out_agreement(
    items: &[(Signals, u8)],
    target_share: [f64; 3],
    gate_weight: f64,
    kinds: bool,
) -> Option<f64> {
    if items.len() < 2 {
        return None;
    }
    let mut agreed = 0usize;
    for i in 0..items.len() {
        let others: Vec<(Signals, u8)> = items
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, x)| *x)
            .collect();
        let t = fit(&others, target_share, gate_weight, kinds)?.thresholds;
        let (s, label) = items[i];
        agreed += usize::from(level_of(s.score(&t), &t) == label);
    }
    Some(agreed as f64 / items.len() as f64)
}

/// A calibration with the kind offsets kept only when they decide better on requests left out of
/// the fit: on a small labelled set an offset can fit a few odd items and mislead on the next.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chosen {
    pub fitted: Fitted,
    /// Leave-one-out agreement of what was chosen.
    pub held_out: f64,
    pub kinds_kept: bool,
    /// (agreement, leave-one-out agreement) with kind offsets, and without.
    pub with_kinds: (f64, f64),
    pub without_kinds: (f64, f64),
}

/// Fit with and without kind offsets and keep the one that agrees better with labels it has not
/// seen (without, on a tie). None for fewer than two items.
pub fn choose(items: &[(Signals, u8)], target_share: [f64; 3], gate_weight: f64) -> Option<Chosen> {
    let with = fit(items, target_share, gate_weight, true)?;
    let with_held = held_out_agreement(items, target_share, gate_weight, true)?;
    let without = fit(items, target_share, gate_weight, false)?;
    let without_held = held_out_agreement(items, target_share, gate_weight, false)?;
    let kinds_kept = with_held > without_held && !with.thresholds.kind_offsets.is_empty();
    Some(Chosen {
        with_kinds: (with.agreement, with_held),
        without_kinds: (without.agreement, without_held),
        fitted: if kinds_kept { with } else { without },
        held_out: if kinds_kept { with_held } else { without_held },
        kinds_kept,
    })
}

/// The split of `items` by the scores under `t` (its weights and offsets; the thresholds are
/// placed here).
fn split(items: &[(Signals, u8)], target_share: [f64; 3], t: &Thresholds) -> Fitted {
    let scores: Vec<f64> = items.iter().map(|(s, _)| s.score(t)).collect();
    let mut sorted = scores.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let n = sorted.len();
    // The threshold below the first `k` highest scores: halfway to the next one.
    let cut = |k: usize| -> f64 {
        match k {
            0 => sorted[0] + 1.0,
            k if k >= n => sorted[n - 1] - 1.0,
            k => (sorted[k - 1] + sorted[k]) / 2.0,
        }
    };
    let k1 = (n as f64 * target_share[0] / 100.0).round() as usize;
    let k2 = (n as f64 * (target_share[0] + target_share[1]) / 100.0).round() as usize;
    let thresholds = Thresholds {
        local: cut(k1),
        medium: cut(k2.max(k1)).min(cut(k1)),
        ..t.clone()
    };
    let mut confusion = [[0usize; 3]; 3];
    let mut counts = [0usize; 3];
    for (&score, &(_, label)) in scores.iter().zip(items) {
        let decided = level_of(score, &thresholds);
        counts[usize::from(decided - 1)] += 1;
        confusion[usize::from(label.clamp(1, 3) - 1)][usize::from(decided - 1)] += 1;
    }
    let agreed: usize = (0..3).map(|i| confusion[i][i]).sum();
    Fitted {
        thresholds,
        share: counts.map(|c| 100.0 * c as f64 / n as f64),
        agreement: agreed as f64 / n as f64,
        confusion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(i: usize) -> u8 {
        match i {
            0..16 => 1,
            16..19 => 2,
            _ => 3,
        }
    }

    fn probe(mean_loglik: f64, tokens: usize) -> Signals {
        of_kind(mean_loglik, tokens, RequestKind::Question)
    }

    fn of_kind(mean_loglik: f64, tokens: usize, kind: RequestKind) -> Signals {
        Signals {
            probe: super::super::probe::Probe {
                mean_loglik,
                tokens,
            },
            kind,
            standing: pai_adapters::Standing::Same,
        }
    }

    #[test]
    fn the_thresholds_split_the_set_into_the_target_shares() {
        // 20 one-token items, confidence falling with the index; the least confident labelled 3.
        let items: Vec<(Signals, u8)> =
            (0..20).map(|i| (probe(-(i as f64), 1), label(i))).collect();
        let f = fit(&items, [80.0, 15.0, 5.0], 0.5, true).unwrap();
        assert_eq!(f.share, [80.0, 15.0, 5.0]);
        assert_eq!(f.agreement, 1.0);
        assert_eq!(f.thresholds.length_weight, 0.0, "length says nothing here");
        assert_eq!(f.thresholds.local, -15.5);
        assert_eq!(f.thresholds.medium, -18.5);
        assert_eq!(level_of(-15.0, &f.thresholds), 1);
        assert_eq!(level_of(-17.0, &f.thresholds), 2);
        assert_eq!(level_of(-19.0, &f.thresholds), 3);

        // Labels the confidence does not order: the share holds, the agreement says so.
        let shuffled: Vec<(Signals, u8)> = items.iter().map(|&(p, l)| (p, 4 - l)).collect();
        let f = fit(&shuffled, [80.0, 15.0, 5.0], 0.5, true).unwrap();
        assert_eq!(f.share, [80.0, 15.0, 5.0]);
        assert_eq!(f.confusion[2][0], 16, "every L3 label decided local");
        assert!(f.agreement < 0.2, "{}", f.agreement);

        // Labels that follow length, the confidence nearly the same for all: a length weight is
        // found that orders them.
        let by_length: Vec<(Signals, u8)> = (0..20)
            .map(|i| (probe(-3.0 + 0.01 * (i % 3) as f64, 5 + 10 * i), label(i)))
            .collect();
        let f = fit(&by_length, [80.0, 15.0, 5.0], 0.5, true).unwrap();
        assert!(f.thresholds.length_weight > 0.0);
        assert_eq!(f.agreement, 1.0);

        // Left out, an item at a boundary can land on the other side (the shares are of 19 items).
        let held_out = held_out_agreement(&by_length, [80.0, 15.0, 5.0], 0.5, true).unwrap();
        assert!((0.85..=1.0).contains(&held_out), "{held_out}");
        let held_out = held_out_agreement(&shuffled, [80.0, 15.0, 5.0], 0.5, true).unwrap();
        assert!(held_out < 0.5, "{held_out}");

        // Everything local.
        let f = fit(&items, [100.0, 0.0, 0.0], 0.5, true).unwrap();
        assert_eq!(f.share, [100.0, 0.0, 0.0]);
        assert!(fit(&[], [80.0, 15.0, 5.0], 0.5, true).is_none());
    }

    #[test]
    fn a_kind_the_probe_misjudges_gets_an_offset() {
        // Rewrites of a given text look unfamiliar (low log-likelihood) yet are easy: labelled L1.
        // Without an offset for them, they would take the L2/L3 places of the hard questions.
        let mut items: Vec<(Signals, u8)> = (0..16)
            .map(|i| (probe(-2.0 - 0.1 * i as f64, 10), 1))
            .collect();
        items.extend((0..3).map(|i| (probe(-4.0 - 0.1 * i as f64, 10), 2)));
        items.push((probe(-5.0, 10), 3));
        for (i, item) in items.iter_mut().take(5).enumerate() {
            *item = (of_kind(-4.5 - 0.1 * i as f64, 10, RequestKind::Rewrite), 1);
        }
        let f = fit(&items, [80.0, 15.0, 5.0], 0.5, true).unwrap();
        assert_eq!(f.agreement, 1.0, "{f:?}");
        assert!(f.thresholds.kind_offset("rewrite") >= 1.0, "{f:?}");
        assert_eq!(f.thresholds.kind_offset("question"), 0.0, "{f:?}");
        // A kind with too few items to say anything gets none.
        items.truncate(18);
        items.push((of_kind(-4.6, 10, RequestKind::Chat), 1));
        items.push((of_kind(-4.7, 10, RequestKind::Chat), 1));
        let f = fit(&items, [80.0, 15.0, 5.0], 0.5, true).unwrap();
        assert_eq!(f.thresholds.kind_offset("chat"), 0.0, "{f:?}");
    }
}
