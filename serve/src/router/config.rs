//! `[router]` of pai.toml: the cloud tiers, the rules that choose between them and the local model,
//! the fallback manners (retries, backoff, circuit breaker), the daily budget and the privacy gate's
//! settings. Parsed once by pai-pipeline's layered config; checked here (`RouterConfig::problems`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How the router decides and where it may send requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// What answers L1: an adapter name (its current version), or `base`. When the name has no
    /// current version yet, the bare base answers.
    pub local_model: String,
    /// Cloud deployments. Entries with the same `level` are one tier's deployments, tried in order.
    pub tiers: Vec<TierConfig>,
    /// The shares of requests (percent) at L1, L2, L3 that `pai-train router calibrate` aims for.
    pub target_share: [f64; 3],
    /// Confidence thresholds (absent: what `pai-train router calibrate` wrote, else all local).
    pub thresholds: Option<Thresholds>,
    /// Run the local confidence probe (the prompt's mean log-likelihood under the L1 model).
    pub probe: bool,
    /// The probe scores at most this many of the prompt's last tokens.
    pub probe_tokens: usize,
    /// Nats added to the score of a request in a domain where the served adapter's gates found it
    /// better than the base (taken away where worse): what `pai-train router calibrate` fits the
    /// thresholds with. One labelled set under one adapter cannot tell it from the kind offsets,
    /// so it is set, not fitted.
    pub gate_weight: f64,
    /// US dollars the cloud tiers may cost per day (UTC); past it, cloud tiers are skipped.
    pub daily_budget_usd: Option<f64>,
    /// Retries of one deployment (after its first attempt) on connection errors, timeouts, 429, 5xx.
    pub retries: u32,
    /// First backoff, doubled each retry, with full jitter, at most `max_backoff_ms`.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// A Retry-After longer than this skips the deployment (cooling it down for that long).
    pub max_retry_after_s: u64,
    /// Failed requests in a row that open a deployment's circuit breaker.
    pub breaker_failures: u32,
    /// Seconds an open breaker keeps a deployment out before one probe request is let through.
    pub cooldown_s: u64,
    /// Keep the egress ledger (`$PAI_HOME/router/egress.jsonl`): what left, when, where, a hash.
    pub ledger: bool,
    /// Opt-in: save what a cloud tier answered to a request the router did not trust the local model
    /// with as a chat example (`$PAI_HOME/escalations/<day>.jsonl`), which the next night ingests, so
    /// tomorrow's adapter learns what today's had to send out. Private requests never leave, so none
    /// is ever saved.
    pub learn_from_escalations: bool,
    pub privacy: PrivacyConfig,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            local_model: "personal".into(),
            tiers: Vec::new(),
            target_share: [80.0, 15.0, 5.0],
            thresholds: None,
            probe: true,
            probe_tokens: 256,
            gate_weight: 0.5,
            daily_budget_usd: None,
            retries: 2,
            backoff_ms: 250,
            max_backoff_ms: 4000,
            max_retry_after_s: 10,
            breaker_failures: 3,
            cooldown_s: 30,
            ledger: true,
            learn_from_escalations: false,
            privacy: PrivacyConfig::default(),
        }
    }
}

/// The score (`probe::Signals::score`: the prompt's mean log-likelihood per token in nats, less
/// `length_weight` × ln(its tokens), plus its kind's offset and `gate_weight` × the served adapter's
/// standing in the request's domain; higher is more familiar) at or above which a request stays at a
/// level.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// At or above: L1 answers.
    pub local: f64,
    /// At or above (and below `local`): L2; below: L3.
    pub medium: f64,
    /// How much a longer prompt lowers the score.
    #[serde(default)]
    pub length_weight: f64,
    /// Added to the score of a request of a kind (`chat`, `rewrite`, `writing`, `code`,
    /// `reasoning`, `personal`, `question`); absent kinds add 0.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kind_offsets: BTreeMap<String, f64>,
    /// Added per unit of the served adapter's standing in the request's domain: +1 where its gates
    /// found it better than the base, −1 where worse.
    #[serde(default)]
    pub gate_weight: f64,
}

impl Thresholds {
    /// The offset of `kind`.
    pub fn kind_offset(&self, kind: &str) -> f64 {
        self.kind_offsets.get(kind).copied().unwrap_or(0.0)
    }
}

/// One deployment of a cloud tier: an OpenAI-compatible endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Unique among the tiers; a request may ask for it by name.
    pub name: String,
    /// 2 (medium) or 3 (large); L1 is the local model and has no entry.
    pub level: u8,
    /// Up to `/v1`: requests go to `{base_url}/chat/completions`.
    pub base_url: String,
    /// The model name sent to the endpoint.
    pub model: String,
    /// The environment variable holding the API key (none: no Authorization header).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Seconds for a whole answer (for a stream: until its first token).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// US dollars per million prompt and completion tokens.
    #[serde(default)]
    pub price_input_per_m: f64,
    #[serde(default)]
    pub price_output_per_m: f64,
}

fn default_timeout_s() -> u64 {
    60
}

/// What keeps a request on the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Which kinds of personal data keep a request local (secrets always do).
    pub pii: pai_datasets::scrub::PiiPolicy,
    /// Recognise the owner's private notes through the privacy index that ingest builds.
    pub private_index: bool,
    /// Sampled 8-word shingles of the request found in the index that make it private.
    pub min_private_shingles: usize,
    /// Which requests whose only private content is secrets or personal data may leave with them
    /// replaced by placeholders, restored in the answer. Private notes and flagged requests still
    /// stay.
    pub redact: Redact,
}

/// Redact mode: which requests carrying secrets or personal data may leave with placeholders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Redact {
    /// None: such a request stays local.
    Off,
    /// Those that quote a source the owner marked `privacy = "shareable"` (recognised through the
    /// shareable index ingest builds); with no such source, none.
    #[default]
    Shareable,
    /// Every one.
    All,
}

impl Redact {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Shareable => "shareable",
            Self::All => "all",
        }
    }
}

/// `off`, `shareable` or `all`; `false` and `true` (what `redact` was before it had a middle) read
/// as `off` and `all`.
impl<'de> Deserialize<'de> for Redact {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(false) => Ok(Self::Off),
            Raw::Bool(true) => Ok(Self::All),
            Raw::Name(n) => match n.as_str() {
                "off" => Ok(Self::Off),
                "shareable" => Ok(Self::Shareable),
                "all" => Ok(Self::All),
                other => Err(serde::de::Error::custom(format!(
                    "redact = {other:?}: use \"off\", \"shareable\" or \"all\""
                ))),
            },
        }
    }
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            pii: Default::default(),
            private_index: true,
            min_private_shingles: 1,
            redact: Redact::Shareable,
        }
    }
}

impl RouterConfig {
    /// Every problem with the configuration, as (key, value, what is allowed).
    pub fn problems(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let mut bad =
            |key: String, value: String, allowed: &str| out.push((key, value, allowed.to_string()));
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.tiers.iter().enumerate() {
            let key = |field: &str| format!("router.tiers[{i}].{field}");
            if !(2..=3).contains(&t.level) {
                bad(
                    key("level"),
                    t.level.to_string(),
                    "2 (cloud medium) or 3 (cloud large); the local model is L1",
                );
            }
            if matches!(t.name.as_str(), "" | "local" | "auto") || !names.insert(t.name.clone()) {
                bad(
                    key("name"),
                    format!("{:?}", t.name),
                    "a name no other tier has (not empty, local or auto)",
                );
            }
            if !(t.base_url.starts_with("http://") || t.base_url.starts_with("https://")) {
                bad(
                    key("base_url"),
                    format!("{:?}", t.base_url),
                    "an http:// or https:// URL up to /v1",
                );
            }
            if t.model.is_empty() {
                bad(key("model"), "\"\"".into(), "the endpoint's model name");
            }
            if t.timeout_s == 0 {
                bad(key("timeout_s"), "0".into(), "at least 1 second");
            }
            if [t.price_input_per_m, t.price_output_per_m]
                .iter()
                .any(|p| p.is_nan() || *p < 0.0)
            {
                bad(
                    key("price_input_per_m"),
                    format!("{} / {}", t.price_input_per_m, t.price_output_per_m),
                    "prices of 0 or more",
                );
            }
        }
        let sum: f64 = self.target_share.iter().sum();
        if self.target_share.iter().any(|s| s.is_nan() || *s < 0.0) || (sum - 100.0).abs() > 0.5 {
            bad(
                "router.target_share".into(),
                format!("{:?}", self.target_share),
                "three shares of 0 or more that add up to 100",
            );
        }
        if let Some(t) = &self.thresholds {
            if !(t.local.is_finite()
                && t.medium.is_finite()
                && t.medium <= t.local
                && t.length_weight.is_finite()
                && t.length_weight >= 0.0
                && t.gate_weight.is_finite())
            {
                bad(
                    "router.thresholds".into(),
                    format!(
                        "local {} medium {} length_weight {}",
                        t.local, t.medium, t.length_weight
                    ),
                    "finite numbers with medium at most local, length_weight 0 or more",
                );
            }
        }
        if let Some(t) = &self.thresholds {
            let kinds = super::kind::RequestKind::ALL.map(|k| k.as_str());
            for (kind, offset) in &t.kind_offsets {
                if !kinds.contains(&kind.as_str()) || !offset.is_finite() {
                    bad(
                        format!("router.thresholds.kind_offsets.{kind}"),
                        offset.to_string(),
                        &format!("a finite offset for one of {}", kinds.join(", ")),
                    );
                }
            }
        }
        if !self.gate_weight.is_finite() {
            bad(
                "router.gate_weight".into(),
                self.gate_weight.to_string(),
                "a finite number of nats",
            );
        }
        if self.probe_tokens < 2 {
            bad(
                "router.probe_tokens".into(),
                self.probe_tokens.to_string(),
                "at least 2",
            );
        }
        if self.daily_budget_usd.is_some_and(|b| b.is_nan() || b < 0.0) {
            bad(
                "router.daily_budget_usd".into(),
                format!("{:?}", self.daily_budget_usd),
                "0 or more US dollars",
            );
        }
        if self.breaker_failures == 0 {
            bad("router.breaker_failures".into(), "0".into(), "at least 1");
        }
        if self.backoff_ms > self.max_backoff_ms {
            bad(
                "router.backoff_ms".into(),
                self.backoff_ms.to_string(),
                "at most router.max_backoff_ms",
            );
        }
        out
    }

    /// The deployments of `level`, in the configured order.
    pub fn level(&self, level: u8) -> impl Iterator<Item = &TierConfig> {
        self.tiers.iter().filter(move |t| t.level == level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_s_tier_shape_parses_and_bad_values_are_named() {
        let c: RouterConfig = toml::from_str(
            r#"
            [[tiers]]
            name = "cloud-medium"
            level = 2
            base_url = "http://127.0.0.1:9000/v1"
            model = "some-model"
            api_key_env = "CLOUD_MEDIUM_KEY"
            timeout_s = 30
            "#,
        )
        .expect("parses");
        assert_eq!(c.tiers[0].level, 2);
        assert_eq!(c.tiers[0].timeout_s, 30);
        assert!(c.problems().is_empty(), "{:?}", c.problems());

        let mut bad = c.clone();
        bad.tiers.push(TierConfig {
            level: 1,
            base_url: "ftp://x".into(),
            ..c.tiers[0].clone()
        });
        bad.target_share = [90.0, 15.0, 5.0];
        let keys: Vec<String> = bad.problems().into_iter().map(|p| p.0).collect();
        assert_eq!(
            keys,
            [
                "router.tiers[1].level",
                "router.tiers[1].name",
                "router.tiers[1].base_url",
                "router.target_share"
            ]
        );
    }
}
