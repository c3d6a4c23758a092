//! Calibration of the confidence thresholds from a labelled set: each item's local confidence (the
//! probe's) and the level it should go to. The thresholds are the confidences that split the items,
//! most confident first, into the target shares (80 / 15 / 5 by default): the share kept local is the
//! one asked for, by construction, and the agreement with the labels says how well the probe ranks
//! what the owner would keep local. `pai-train router calibrate` runs it and writes the result to
//! `$PAI_HOME/router/calibration.json`, which a running pai-serve picks up.

use serde::{Deserialize, Serialize};

use super::config::Thresholds;

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

/// Thresholds that split `items` (confidence, label) into `target_share` (percent, adding to 100).
/// None for an empty set.
pub fn fit(items: &[(f64, u8)], target_share: [f64; 3]) -> Option<Fitted> {
    if items.is_empty() {
        return None;
    }
    let mut sorted: Vec<f64> = items.iter().map(|(c, _)| *c).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let n = sorted.len();
    // The threshold below the first `k` most confident items: halfway to the next one.
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
    };
    let mut confusion = [[0usize; 3]; 3];
    let mut counts = [0usize; 3];
    for &(c, label) in items {
        let decided = level_of(c, thresholds);
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

    #[test]
    fn the_thresholds_split_the_set_into_the_target_shares() {
        // 20 items, confidence falling with the index; the hard ones (least confident) labelled 3.
        let items: Vec<(f64, u8)> = (0..20)
            .map(|i| {
                (
                    -(i as f64),
                    if i < 16 {
                        1
                    } else if i < 19 {
                        2
                    } else {
                        3
                    },
                )
            })
            .collect();
        let f = fit(&items, [80.0, 15.0, 5.0]).unwrap();
        assert_eq!(f.share, [80.0, 15.0, 5.0]);
        assert_eq!(f.agreement, 1.0);
        assert_eq!(f.thresholds.local, -15.5);
        assert_eq!(f.thresholds.medium, -18.5);
        assert_eq!(level_of(-15.0, f.thresholds), 1);
        assert_eq!(level_of(-17.0, f.thresholds), 2);
        assert_eq!(level_of(-19.0, f.thresholds), 3);

        // Labels the confidence does not order: the share holds, the agreement says so.
        let shuffled: Vec<(f64, u8)> = items.iter().map(|&(c, l)| (c, 4 - l)).collect();
        let f = fit(&shuffled, [80.0, 15.0, 5.0]).unwrap();
        assert_eq!(f.share, [80.0, 15.0, 5.0]);
        assert_eq!(f.confusion[2][0], 16, "every L3 label decided local");
        assert!(f.agreement < 0.2, "{}", f.agreement);

        // Everything local.
        let f = fit(&items, [100.0, 0.0, 0.0]).unwrap();
        assert_eq!(f.share, [100.0, 0.0, 0.0]);
        assert!(fit(&[], [80.0, 15.0, 5.0]).is_none());
    }
}
