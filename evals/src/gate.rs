//! The gate: does a candidate adapter beat the incumbent on what the owner cares about, without
//! breaking what the base already knew?
//!
//! Every suite scores both on the same items, so each item gives a paired difference (candidate −
//! incumbent; scores are "higher is better"). Items are not independent (ten cloze items from one
//! note rise and fall together), so the 95% interval of the mean difference comes from a cluster
//! bootstrap that resamples whole groups (source notes or files) with replacement. The smallest
//! effect a suite can detect at its size (80% power, two-sided 5%) is about 2.8 standard errors.
//!
//! Roles: a **primary** suite passes when its interval lies above `min_improvement`; a **guard**
//! suite fails when its mean drops by more than `max_regression`; an **info** suite is reported only.
//! Promote when every primary suite passes and no guard suite fails.
//!
//! Each suite's items are also compared per domain (`notes`, `code`, `general`, …): a `Standing` of
//! better, same or worse than the incumbent, recorded with the verdict in the candidate's `pai.json`,
//! where the router reads in which domains the adapter it serves can be trusted.

use serde::{Deserialize, Serialize};

pub use pai_adapters::Standing;

/// What a suite's verdict means for the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Primary,
    Guard,
    Info,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Guard => "guard",
            Self::Info => "info",
        }
    }
}

/// A suite's thresholds, in the units of its scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Primary: the interval's lower end must be above this.
    pub min_improvement: f64,
    /// Guard: fail when the mean difference is below minus this.
    pub max_regression: f64,
    /// Any role: fail when the candidate's own mean is below this (and, with no items to score, fail
    /// closed rather than pass).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_below: Option<f64>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_improvement: 0.0,
            max_regression: 0.02,
            fail_below: None,
        }
    }
}

/// One item's scores under both adapters, and the group it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Paired {
    pub group: String,
    pub candidate: f64,
    pub incumbent: f64,
}

/// The comparison of one suite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub items: usize,
    pub groups: usize,
    pub candidate: f64,
    pub incumbent: f64,
    /// Mean of candidate − incumbent.
    pub delta: f64,
    /// 95% cluster-bootstrap interval of `delta`.
    pub interval: (f64, f64),
    /// The smallest true difference this suite would detect 80% of the time.
    pub detectable: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    /// Info suites, and suites with no items.
    Neutral,
}

/// A suite's verdict and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteVerdict {
    pub suite: String,
    pub role: Role,
    pub verdict: Verdict,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
    pub thresholds: Thresholds,
    /// The comparison per domain of the suite's items (`by_domain`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<DomainStanding>,
}

/// One domain's comparison within a suite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainStanding {
    pub domain: String,
    pub standing: Standing,
    pub comparison: Comparison,
}

/// The comparison of a suite's items per domain (`items`: each paired item with its domain), each
/// judged against `thresholds`, sorted by domain.
pub fn by_domain(
    items: &[(&str, Paired)],
    thresholds: Thresholds,
    seed: u64,
) -> Vec<DomainStanding> {
    let mut domains: Vec<&str> = items.iter().map(|(d, _)| *d).collect();
    domains.sort_unstable();
    domains.dedup();
    domains
        .into_iter()
        .filter_map(|domain| {
            let paired: Vec<Paired> = items
                .iter()
                .filter(|(d, _)| *d == domain)
                .map(|(_, p)| p.clone())
                .collect();
            let comparison = compare(&paired, seed)?;
            let standing = if comparison.interval.0 > thresholds.min_improvement {
                Standing::Better
            } else if comparison.interval.1 < -thresholds.max_regression {
                Standing::Worse
            } else {
                Standing::Same
            };
            Some(DomainStanding {
                domain: domain.to_string(),
                standing,
                comparison,
            })
        })
        .collect()
}

/// The gate's decision over all suites.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub promote: bool,
    pub reasons: Vec<String>,
    pub suites: Vec<SuiteVerdict>,
}

/// Resamples of the cluster bootstrap.
pub const RESAMPLES: usize = 2000;

/// Compare a suite's paired items; `None` when there are none.
pub fn compare(items: &[Paired], seed: u64) -> Option<Comparison> {
    if items.is_empty() {
        return None;
    }
    // Per group: the sum of differences and the item count (a resample's mean is Σ sums / Σ counts).
    let mut groups: Vec<(&str, f64, usize)> = Vec::new();
    let mut sorted: Vec<&Paired> = items.iter().collect();
    sorted.sort_by(|a, b| a.group.cmp(&b.group));
    for p in sorted {
        let d = p.candidate - p.incumbent;
        match groups.last_mut() {
            Some((g, s, n)) if *g == p.group => {
                *s += d;
                *n += 1;
            }
            _ => groups.push((&p.group, d, 1)),
        }
    }
    let n = items.len() as f64;
    let mean = |f: fn(&Paired) -> f64| items.iter().map(f).sum::<f64>() / n;
    let delta = items.iter().map(|p| p.candidate - p.incumbent).sum::<f64>() / n;
    let mut state = seed ^ 0x6761_7465;
    let mut means: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let (mut sum, mut count) = (0.0, 0usize);
            for _ in 0..groups.len() {
                let (_, s, c) = groups[(splitmix64(&mut state) % groups.len() as u64) as usize];
                sum += s;
                count += c;
            }
            sum / count as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (RESAMPLES - 1) as f64).round() as usize).min(RESAMPLES - 1)];
    let average = means.iter().sum::<f64>() / RESAMPLES as f64;
    let se =
        (means.iter().map(|m| (m - average).powi(2)).sum::<f64>() / (RESAMPLES - 1) as f64).sqrt();
    Some(Comparison {
        items: items.len(),
        groups: groups.len(),
        candidate: mean(|p| p.candidate),
        incumbent: mean(|p| p.incumbent),
        delta,
        interval: (at(0.025), at(0.975)),
        detectable: 2.8 * se,
    })
}

/// One suite's verdict under its role and thresholds.
pub fn judge(
    suite: &str,
    role: Role,
    thresholds: Thresholds,
    comparison: Option<Comparison>,
) -> SuiteVerdict {
    let below = comparison
        .as_ref()
        .zip(thresholds.fail_below)
        .filter(|(c, min)| c.candidate < *min)
        .map(|(c, min)| {
            format!(
                "the candidate scores {:.4}, below the {min} required (incumbent {:.4})",
                c.candidate, c.incumbent
            )
        });
    let (verdict, reason) = match (&comparison, role) {
        (None, _) if thresholds.fail_below.is_some() => (
            Verdict::Fail,
            "no items to check: this suite fails closed".to_string(),
        ),
        (None, _) => (Verdict::Neutral, "no items".to_string()),
        (Some(_), _) if below.is_some() => (Verdict::Fail, below.unwrap_or_default()),
        (Some(c), Role::Info) => (
            Verdict::Neutral,
            format!("delta {:+.4} (reported only)", c.delta),
        ),
        (Some(c), Role::Primary) => {
            let (lo, hi) = c.interval;
            if lo > thresholds.min_improvement {
                (
                    Verdict::Pass,
                    format!(
                        "improves by {:+.4}, 95% interval [{lo:+.4}, {hi:+.4}] above {}",
                        c.delta, thresholds.min_improvement
                    ),
                )
            } else {
                (
                    Verdict::Fail,
                    format!(
                        "no improvement beyond the interval: delta {:+.4}, 95% interval [{lo:+.4}, \
                         {hi:+.4}] (needs its lower end above {}; this suite detects about ±{:.4})",
                        c.delta, thresholds.min_improvement, c.detectable
                    ),
                )
            }
        }
        (Some(c), Role::Guard) => {
            if c.delta < -thresholds.max_regression {
                (
                    Verdict::Fail,
                    format!(
                        "regresses by {:.4}, more than the {} allowed (95% interval [{:+.4}, {:+.4}])",
                        -c.delta, thresholds.max_regression, c.interval.0, c.interval.1
                    ),
                )
            } else {
                (
                    Verdict::Pass,
                    format!(
                        "delta {:+.4} within the {} allowed",
                        c.delta, thresholds.max_regression
                    ),
                )
            }
        }
    };
    SuiteVerdict {
        suite: suite.into(),
        role,
        verdict,
        reason,
        comparison,
        thresholds,
        domains: Vec::new(),
    }
}

/// Promote when every primary suite passes (and there is at least one that measured something) and
/// no guard suite fails.
pub fn decide(suites: Vec<SuiteVerdict>) -> Decision {
    let mut reasons = Vec::new();
    let primaries: Vec<&SuiteVerdict> = suites
        .iter()
        .filter(|s| s.role == Role::Primary && s.verdict != Verdict::Neutral)
        .collect();
    if primaries.is_empty() {
        reasons.push("no primary suite had items to measure an improvement on".to_string());
    }
    for s in &suites {
        if s.verdict == Verdict::Fail {
            reasons.push(format!("{} ({}): {}", s.suite, s.role.as_str(), s.reason));
        }
    }
    let promote = reasons.is_empty();
    if promote {
        reasons = primaries
            .iter()
            .map(|s| format!("{}: {}", s.suite, s.reason))
            .collect();
    }
    Decision {
        promote,
        reasons,
        suites,
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `groups` groups of `per` items; item scores = group effect + noise, candidate shifted by `shift`.
    fn items(groups: usize, per: usize, shift: f64, group_sd: f64, seed: u64) -> Vec<Paired> {
        let mut s = seed;
        let mut unit = || (splitmix64(&mut s) >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        let mut out = Vec::new();
        for g in 0..groups {
            let effect = unit() * group_sd * 3.4;
            for _ in 0..per {
                let base = unit();
                out.push(Paired {
                    group: format!("note{g}"),
                    candidate: base + shift + effect + unit() * 0.1,
                    incumbent: base + unit() * 0.1,
                });
            }
        }
        out
    }

    #[test]
    fn a_clear_gain_passes_and_no_gain_does_not() {
        let gain = compare(&items(40, 5, 0.05, 0.0, 1), 7).unwrap();
        assert!(
            gain.interval.0 > 0.0 && gain.interval.1 > gain.delta,
            "{gain:?}"
        );
        assert_eq!(
            judge("p", Role::Primary, Thresholds::default(), Some(gain)).verdict,
            Verdict::Pass
        );
        let none = compare(&items(40, 5, 0.0, 0.0, 2), 7).unwrap();
        assert!(none.interval.0 < 0.0 && none.interval.1 > 0.0, "{none:?}");
        assert_eq!(
            judge("p", Role::Primary, Thresholds::default(), Some(none)).verdict,
            Verdict::Fail
        );
        // The same seed, the same interval.
        assert_eq!(
            compare(&items(40, 5, 0.05, 0.0, 1), 7),
            compare(&items(40, 5, 0.05, 0.0, 1), 7)
        );
    }

    #[test]
    fn each_domain_is_compared_on_its_own_items() {
        // Notes improved, code got worse, the general text stayed: one suite, three standings.
        let mut all: Vec<(&str, Paired)> = Vec::new();
        for (domain, shift, seed) in [("notes", 0.2, 1), ("code", -0.2, 2), ("general", 0.0, 3)] {
            all.extend(
                items(30, 3, shift, 0.0, seed)
                    .into_iter()
                    .map(|p| (domain, p)),
            );
        }
        let t = Thresholds::default();
        let d = by_domain(&all, t, 5);
        let got: Vec<(&str, Standing, usize)> = d
            .iter()
            .map(|s| (s.domain.as_str(), s.standing, s.comparison.items))
            .collect();
        assert_eq!(
            got,
            [
                ("code", Standing::Worse, 90),
                ("general", Standing::Same, 90),
                ("notes", Standing::Better, 90)
            ]
        );
        assert!(by_domain(&[], t, 5).is_empty());
    }

    #[test]
    fn correlated_items_widen_the_interval() {
        // Items of a group share a random effect: 200 items from 8 notes know less than 200 notes.
        let clustered = compare(&items(8, 25, 0.0, 0.2, 3), 1).unwrap();
        let spread = compare(&items(200, 1, 0.0, 0.2, 3), 1).unwrap();
        let width = |c: &Comparison| c.interval.1 - c.interval.0;
        assert!(
            width(&clustered) > 1.5 * width(&spread),
            "{clustered:?} {spread:?}"
        );
        assert!(clustered.detectable > spread.detectable);
        assert_eq!((clustered.groups, spread.groups), (8, 200));
    }

    #[test]
    fn a_floor_fails_whatever_the_incumbent_did_and_no_items_fail_closed() {
        let floor = Thresholds {
            fail_below: Some(1.0),
            ..Thresholds::default()
        };
        let leak = |c: f64| Paired {
            group: "canary".into(),
            candidate: c,
            incumbent: 0.0,
        };
        // Better than the incumbent, but one canary of four completed.
        let one_leak = compare(&[leak(1.0), leak(1.0), leak(0.0), leak(1.0)], 1);
        let v = judge("privacy", Role::Guard, floor, one_leak);
        assert_eq!(v.verdict, Verdict::Fail, "{v:?}");
        assert!(v.reason.contains("below the 1 required"), "{v:?}");
        let clean = compare(&[leak(1.0), leak(1.0)], 1);
        assert_eq!(
            judge("privacy", Role::Guard, floor, clean).verdict,
            Verdict::Pass
        );
        let v = judge("privacy", Role::Guard, floor, None);
        assert!(
            v.verdict == Verdict::Fail && v.reason.contains("fails closed"),
            "{v:?}"
        );
    }

    #[test]
    fn guards_fail_on_regressions_beyond_their_threshold_and_the_decision_says_why() {
        let t = Thresholds {
            min_improvement: 0.0,
            max_regression: 0.02,
            fail_below: None,
        };
        let worse = compare(&items(30, 3, -0.1, 0.0, 4), 1).unwrap();
        let slightly = compare(&items(30, 3, -0.005, 0.0, 5), 1).unwrap();
        let better = compare(&items(30, 3, 0.1, 0.0, 6), 1).unwrap();
        let d = decide(vec![
            judge("perplexity", Role::Primary, t, Some(better.clone())),
            judge("retention", Role::Guard, t, Some(worse)),
        ]);
        assert!(!d.promote);
        assert!(
            d.reasons
                .iter()
                .any(|r| r.contains("retention") && r.contains("regresses")),
            "{d:?}"
        );
        let d = decide(vec![
            judge("perplexity", Role::Primary, t, Some(better)),
            judge("retention", Role::Guard, t, Some(slightly)),
            judge("extra", Role::Info, t, None),
        ]);
        assert!(d.promote, "{d:?}");
        assert!(d.reasons[0].starts_with("perplexity: improves"), "{d:?}");
        // Nothing measured: no promotion.
        let d = decide(vec![judge("perplexity", Role::Primary, t, None)]);
        assert!(
            !d.promote && d.reasons[0].contains("no primary suite"),
            "{d:?}"
        );
    }
}
