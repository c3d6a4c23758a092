//! Where an adapter can be trusted. The gate compares each candidate with its incumbent per domain
//! (`notes`, `code`, `general`, …) and records a standing — better, same or worse — in the
//! candidate's `pai.json`. Against the base is what a reader wants to know, and the incumbent was
//! itself gated against its own incumbent, so `Registry::standings` follows that chain back to the
//! base. The router trusts the local model more in domains where it stands better.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::AdapterMeta;
use crate::registry::{Registry, Version};

/// How a candidate stands against an incumbent in one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    /// The interval lies above the suite's `min_improvement`.
    Better,
    /// Neither better nor worse beyond the interval and the allowed regression.
    Same,
    /// The interval lies below minus the suite's `max_regression`.
    Worse,
}

impl Standing {
    /// The standing against the base of an adapter that stands `self` against an incumbent which
    /// stood `earlier` against the base: the same as a better incumbent is better, better than a
    /// worse one says nothing.
    pub fn then(self, earlier: Standing) -> Standing {
        use Standing::*;
        match (earlier, self) {
            (Same, s) | (s, Same) => s,
            (Better, Better) => Better,
            (Worse, Worse) => Worse,
            (Better, Worse) | (Worse, Better) => Same,
        }
    }

    /// One domain's standing from two suites that both measure it: worse when either says worse (a
    /// guard's forgetting is not outweighed), else better when either says better (a guard that
    /// merely held, like general code the base knew, does not cancel the owner's own code
    /// improving), else the same.
    pub fn alongside(self, other: Standing) -> Standing {
        use Standing::*;
        match (self, other) {
            (Worse, _) | (_, Worse) => Worse,
            (Better, _) | (_, Better) => Better,
            (Same, Same) => Same,
        }
    }

    /// +1, 0 or −1.
    pub fn sign(self) -> f64 {
        match self {
            Standing::Better => 1.0,
            Standing::Same => 0.0,
            Standing::Worse => -1.0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Better => "better",
            Standing::Same => "same",
            Standing::Worse => "worse",
        }
    }
}

/// Standing per domain.
pub type Standings = BTreeMap<String, Standing>;

/// The parts of a gate record (`pai.json`'s `gate`) that standings are read from.
#[derive(Deserialize)]
struct GateRecord {
    incumbent: String,
    decision: GateDecision,
}

#[derive(Deserialize)]
struct GateDecision {
    suites: Vec<GateSuite>,
}

#[derive(Deserialize)]
struct GateSuite {
    role: String,
    #[serde(default)]
    domains: Vec<GateDomain>,
}

#[derive(Deserialize)]
struct GateDomain {
    domain: String,
    standing: Standing,
}

impl AdapterMeta {
    /// The incumbent this adapter was gated against (`base` or `name@vN`) and its standing against
    /// it per domain, from the suites that decide (primary and guard; a domain in several is
    /// combined by `Standing::alongside`). None when it was never gated, or gated before domains
    /// were recorded.
    pub fn gate_standings(&self) -> Option<(String, Standings)> {
        let record: GateRecord = serde_json::from_value(self.gate.clone()?).ok()?;
        let mut standings = Standings::new();
        let deciding = record
            .decision
            .suites
            .into_iter()
            .filter(|s| s.role == "primary" || s.role == "guard");
        for d in deciding.flat_map(|s| s.domains) {
            let combined = match standings.get(&d.domain) {
                Some(&s) => s.alongside(d.standing),
                None => d.standing,
            };
            standings.insert(d.domain, combined);
        }
        (!standings.is_empty()).then_some((record.incumbent, standings))
    }
}

impl Registry {
    /// The standing of `name@version` against the base per domain, along the chain of gates that
    /// promoted it (each incumbent's own standing composed with the next). Empty for a version never
    /// gated; a chain that leaves the registry (an incumbent given as a directory) ends there.
    pub fn standings(&self, name: &str, version: Version) -> Standings {
        let mut total = Standings::new();
        let mut at = Some((name.to_string(), version));
        // Each link is an older version; the bound only guards against a hand-edited cycle.
        for _ in 0..64 {
            let Some((name, version)) = at.take() else {
                break;
            };
            let Some((incumbent, own)) = self
                .meta(&name, version)
                .ok()
                .and_then(|m| m.gate_standings())
            else {
                break;
            };
            // `total` is the newer versions' standing against this one: compose it with this
            // one's standing against its incumbent.
            for (domain, earlier) in own {
                let later = total.get(&domain).copied().unwrap_or(Standing::Same);
                total.insert(domain, later.then(earlier));
            }
            at = incumbent
                .split_once('@')
                .and_then(|(n, v)| Some((n.to_string(), v.parse::<Version>().ok()?)));
        }
        total
    }
}
