//! Calibration of the thresholds from a labelled set: each item's probe (the local model's mean
//! log-likelihood of it, and its length) and the level it should go to. For each candidate length
//! weight, the thresholds are the scores that split the items, highest first, into the target
//! shares (80 / 15 / 5 by default), so the share kept local is the one asked for by construction;
//! the weight kept is the one whose split agrees best with the labels. `pai-train router calibrate`
//! runs it and writes the result to `$PAI_HOME/router/calibration.json`, which a running pai-serve
//! picks up.

use serde::{Deserialize, Serialize};

use super::config::Thresholds;
use super::probe::Probe;

/// The length weights tried (0 leaves the mean log-likelihood alone).
const LENGTH_WEIGHTS: [f64; 15] = [
    0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0,
];

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

/// The level a confidence goes to under `t`.
pub fn level_of(confidence: f64, t: Thresholds) -> u8 {
    if confidence >= t.local {
        1
    } else if confidence >= t.medium {
        2
    } else {
        3
    }
}

/// Thresholds (and length weight) that split `items` (probe, label) into `target_share` (percent,
/// adding to 100) and agree best with the labels. None for an empty set.
pub fn fit(items: &[(Probe, u8)], target_share: [f64; 3]) -> Option<Fitted> {
    let mut best: Option<Fitted> = None;
    for weight in LENGTH_WEIGHTS {
        let fitted = fit_weight(items, target_share, weight)?;
        // Strictly better only: among equals the smallest weight stays.
        if best.as_ref().is_none_or(|b| fitted.agreement > b.agreement) {
            best = Some(fitted);
        }
    }
    best
}

/// The agreement on items the fit has not seen: each item decided by the thresholds fitted to all
/// the others (leave-one-out), the honest figure for a small labelled set.
pub fn held_out_agreement(items: &[(Probe, u8)], target_share: [f64; 3]) -> Option<f64> {
    if items.len() < 2 {
        return None;
    }
    let mut agreed = 0usize;
    for i in 0..items.len() {
        let others: Vec<(Probe, u8)> = items
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, x)| *x)
            .collect();
        let t = fit(&others, target_share)?.thresholds;
        let (p, label) = items[i];
        agreed += usize::from(level_of(p.score(&t), t) == label);
    }
    Some(agreed as f64 / items.len() as f64)
}

/// The split for one length weight.
fn fit_weight(items: &[(Probe, u8)], target_share: [f64; 3], weight: f64) -> Option<Fitted> {
    if items.is_empty() {
        return None;
    }
    let unweighted = Thresholds {
        local: 0.0,
        medium: 0.0,
        length_weight: weight,
    };
    let scores: Vec<f64> = items.iter().map(|(p, _)| p.score(&unweighted)).collect();
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
        length_weight: weight,
    };
    let mut confusion = [[0usize; 3]; 3];
    let mut counts = [0usize; 3];
    for (&score, &(_, label)) in scores.iter().zip(items) {
        let decided = level_of(score, thresholds);
        counts[usize::from(decided - 1)] += 1;
        confusion[usize::from(label.clamp(1, 3) - 1)][usize::from(decided - 1)] += 1;
    }
    let agreed: usize = (0..3).map(|i| confusion[i][i]).sum();
    Some(Fitted {
        thresholds,
        share: counts.map(|c| 100.0 * c as f64 / n as f64),
        agreement: agreed as f64 / n as f64,
        confusion,
    })
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

    fn probe(mean_loglik: f64, tokens: usize) -> Probe {
        Probe {
            mean_loglik,
            tokens,
        }
    }

    #[test]
    fn the_thresholds_split_the_set_into_the_target_shares() {
        // 20 one-token items, confidence falling with the index; the least confident labelled 3.
        let items: Vec<(Probe, u8)> = (0..20).map(|i| (probe(-(i as f64), 1), label(i))).collect();
        let f = fit(&items, [80.0, 15.0, 5.0]).unwrap();
        assert_eq!(f.share, [80.0, 15.0, 5.0]);
        assert_eq!(f.agreement, 1.0);
        assert_eq!(f.thresholds.length_weight, 0.0, "length says nothing here");
        assert_eq!(f.thresholds.local, -15.5);
        assert_eq!(f.thresholds.medium, -18.5);
        assert_eq!(level_of(-15.0, f.thresholds), 1);
        assert_eq!(level_of(-17.0, f.thresholds), 2);
        assert_eq!(level_of(-19.0, f.thresholds), 3);

        // Labels the confidence does not order: the share holds, the agreement says so.
        let shuffled: Vec<(Probe, u8)> = items.iter().map(|&(p, l)| (p, 4 - l)).collect();
        let f = fit(&shuffled, [80.0, 15.0, 5.0]).unwrap();
        assert_eq!(f.share, [80.0, 15.0, 5.0]);
        assert_eq!(f.confusion[2][0], 16, "every L3 label decided local");
        assert!(f.agreement < 0.2, "{}", f.agreement);

        // Labels that follow length, the confidence nearly the same for all: a length weight is
        // found that orders them.
        let by_length: Vec<(Probe, u8)> = (0..20)
            .map(|i| (probe(-3.0 + 0.01 * (i % 3) as f64, 5 + 10 * i), label(i)))
            .collect();
        let f = fit(&by_length, [80.0, 15.0, 5.0]).unwrap();
        assert!(f.thresholds.length_weight > 0.0);
        assert_eq!(f.agreement, 1.0);

        // Left out, an item at a boundary can land on the other side (the shares are of 19 items).
        let held_out = held_out_agreement(&by_length, [80.0, 15.0, 5.0]).unwrap();
        assert!((0.85..=1.0).contains(&held_out), "{held_out}");
        let held_out = held_out_agreement(&shuffled, [80.0, 15.0, 5.0]).unwrap();
        assert!(held_out < 0.5, "{held_out}");

        // Everything local.
        let f = fit(&items, [100.0, 0.0, 0.0]).unwrap();
        assert_eq!(f.share, [100.0, 0.0, 0.0]);
        assert!(fit(&[], [80.0, 15.0, 5.0]).is_none());
    }
}
