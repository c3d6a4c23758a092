//! The router: for a request with `"model": "auto"`, which tier answers — L1 the local model with the
//! owner's adapter, L2 a cloud medium model, L3 a cloud large one — and where it goes when that tier
//! fails. The rules, in order (each decision carries the reasons that made it):
//! 1. the privacy gate (`privacy`): secrets, personal data, the owner's private text or a `private`
//!    flag keep a request local, whatever else it asks, and no fallback sends it out;
//! 2. the day's cloud budget spent: local;
//! 3. a tier the request names (`tier`: `local`, a level `L2`/`L3`, or a deployment's name);
//!    no cloud tier configured: local;
//! 4. a prompt longer than the local model's context: L2;
//! 5. the score against the calibrated thresholds (`pai-train router calibrate`): the local model's
//!    confidence (the prompt's mean log-likelihood under base + adapter, less a length term), the
//!    request's kind (`kind`), and where the served adapter stands in that kind's domain as its
//!    eval gates found; uncalibrated, local.
//!
//! The plan puts the chosen tier first, then the other cloud tiers, then the local model (for a cloud
//! choice). The HTTP side is in `dispatch`, sending to a deployment in `cloud`, one deployment's
//! manners in `upstream`, the ledger of what left in `ledger`.

pub mod calibrate;
mod cloud;
pub mod config;
pub mod dispatch;
pub mod kind;
pub mod ledger;
pub mod privacy;
pub mod probe;
pub mod redact;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pai_adapters::{Registry, Standing, Standings, Version};
use serde::Serialize;

pub use config::{PrivacyConfig, Redact, RouterConfig, Thresholds, TierConfig};
pub use ledger::{EgressLedger, EgressRecord};
pub use privacy::{PrivacyGate, PrivacyVerdict};
use upstream::Deployment;

/// What goes wrong setting the router up.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{key} = {value} is invalid: must be {allowed}")]
    BadConfig {
        key: String,
        value: String,
        allowed: String,
    },
    #[error("cannot build the HTTP client for the cloud tiers: {source}")]
    Client {
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a router calibration: {source}")]
    Calibration {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Where a request may be answered, in the order of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Local,
    /// An index into the configured tiers.
    Cloud(usize),
}

/// The router's choice for one request, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// 1 local, 2 cloud medium, 3 cloud large.
    pub level: u8,
    /// `local` or the name of the first deployment of the plan.
    pub tier: String,
    pub reasons: Vec<String>,
    /// A short label of the rule that decided (`private`, `asked`, `no_cloud`, `budget`, `context`,
    /// `confidence`, `uncalibrated`): /metrics counts by it.
    pub rule: &'static str,
    pub egress_allowed: bool,
    /// It may leave only with its secrets and personal data redacted (redact mode).
    pub redact: bool,
    /// The request's kind, its domain, and the served adapter's standing there.
    pub kind: kind::RequestKind,
    pub domain: &'static str,
    pub standing: Standing,
    /// The probe's measurement, when it ran, and the score the thresholds were compared with.
    pub probe: Option<probe::Probe>,
    pub score: Option<f64>,
    pub prompt_tokens: usize,
    pub privacy: PrivacyVerdict,
    /// Where it goes, in order: the first answers unless it fails.
    #[serde(skip)]
    pub plan: Vec<Target>,
}

/// What the router needs to know of a request.
#[derive(Debug, Clone)]
pub struct RouteInput {
    /// The `tier` the request names, if any.
    pub tier: Option<String>,
    pub prompt_tokens: usize,
    /// The local model's context length.
    pub local_context: usize,
    pub kind: kind::RequestKind,
    /// The L1 adapter's standing against the base in the kind's domain.
    pub standing: Standing,
}

impl Default for RouteInput {
    fn default() -> Self {
        Self {
            tier: None,
            prompt_tokens: 0,
            local_context: 0,
            kind: kind::RequestKind::Question,
            standing: Standing::Same,
        }
    }
}

/// `$PAI_HOME/router/calibration.json`: what `pai-train router calibrate` found.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Calibration {
    pub thresholds: Thresholds,
    /// Shares (percent) at L1, L2, L3 on the labelled set, and the agreement with its labels.
    pub share: [f64; 3],
    pub agreement: f64,
    /// The agreement on items left out of the fit (leave-one-out).
    pub held_out_agreement: f64,
    pub labelled: usize,
    /// The local model the confidences were measured under.
    pub local_model: String,
    pub time: String,
}

impl Calibration {
    pub fn path(home: &Path) -> PathBuf {
        home.join("router").join("calibration.json")
    }

    pub fn read(path: &Path) -> Result<Option<Self>, RouterError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| {
                RouterError::Calibration {
                    path: path.to_path_buf(),
                    source,
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RouterError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// Cloud spend of the current UTC day.
#[derive(Debug, Default)]
struct Spend {
    day: String,
    usd: f64,
}

pub struct Router {
    pub config: RouterConfig,
    /// The configured tiers' deployments, in the configured order.
    deployments: Vec<Deployment>,
    pub gate: PrivacyGate,
    client: reqwest::Client,
    ledger: Option<EgressLedger>,
    spend: Mutex<Spend>,
    /// The calibration file, reread when it changes (thresholds in the config win over it).
    calibration: Mutex<CalibrationFile>,
    /// Where escalations are saved as chat examples (with `learn_from_escalations` and a home).
    escalations: Option<PathBuf>,
    /// The L1 adapter's standings, for the version they were read for.
    standings: Mutex<Option<(String, Version, Standings)>>,
}

/// Where the router saves escalations as chat examples, under `home` (one file a day).
pub fn escalations_dir(home: &Path) -> PathBuf {
    home.join("escalations")
}

/// `calibration.json` as last read.
#[derive(Debug, Default)]
struct CalibrationFile {
    path: Option<PathBuf>,
    modified: Option<std::time::SystemTime>,
    thresholds: Option<Thresholds>,
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

impl Router {
    /// A router over `config`; with `home`, the privacy index, the calibration and the egress
    /// ledger under it.
    pub fn new(config: RouterConfig, home: Option<&Path>) -> Result<Self, RouterError> {
        if let Some((key, value, allowed)) = config.problems().into_iter().next() {
            return Err(RouterError::BadConfig {
                key,
                value,
                allowed,
            });
        }
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|source| RouterError::Client { source })?;
        let gate = PrivacyGate::new(&config.privacy, home);
        let calibration = CalibrationFile {
            path: home.map(Calibration::path),
            ..Default::default()
        };
        if let Some(path) = &calibration.path {
            // A damaged calibration is an error at start (later, a bad rewrite keeps the last one).
            Calibration::read(path)?;
        }
        let ledger = match home.filter(|_| config.ledger) {
            Some(home) => {
                let path = EgressLedger::path(home);
                Some(
                    EgressLedger::open(path.clone()).map_err(|source| RouterError::Io {
                        action: "create the egress ledger",
                        path,
                        source,
                    })?,
                )
            }
            None => None,
        };
        let day = today();
        let usd = ledger.as_ref().map_or(0.0, |l| l.spent_on(&day));
        let escalations = home
            .filter(|_| config.learn_from_escalations)
            .map(escalations_dir);
        Ok(Self {
            deployments: config.tiers.iter().cloned().map(Deployment::new).collect(),
            config,
            gate,
            client,
            ledger,
            spend: Mutex::new(Spend { day, usd }),
            calibration: Mutex::new(calibration),
            escalations,
            standings: Mutex::new(None),
        })
    }

    /// No cloud tier: every request is answered locally (what a server without `[router]` does).
    pub fn local_only() -> Self {
        let config = RouterConfig::default();
        Self {
            deployments: Vec::new(),
            gate: PrivacyGate::new(&config.privacy, None),
            client: reqwest::Client::new(),
            ledger: None,
            spend: Mutex::new(Spend::default()),
            calibration: Mutex::new(CalibrationFile::default()),
            escalations: None,
            standings: Mutex::new(None),
            config,
        }
    }

    /// Where the current version of adapter `name` stands against the base per domain, as its
    /// gates found (`Registry::standings`), read again when the current version changes. Empty
    /// without a registry or a current version.
    pub fn standings(&self, registry: Option<&Registry>, name: &str) -> Standings {
        let Some(version) = registry.and_then(|r| r.current(name).ok().flatten()) else {
            return Standings::new();
        };
        let mut cached = match self.standings.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        match &*cached {
            Some((n, v, s)) if n == name && *v == version => s.clone(),
            _ => {
                let s = registry
                    .map(|r| r.standings(name, version))
                    .unwrap_or_default();
                tracing::info!(adapter = %name, %version, standings = ?s, "router read the adapter's gate standings");
                *cached = Some((name.to_string(), version, s.clone()));
                s
            }
        }
    }

    /// The thresholds in force: the config's, else the calibration's (reread when
    /// `pai-train router calibrate` rewrites it, so no restart is needed).
    pub fn thresholds(&self) -> Option<Thresholds> {
        if let Some(t) = &self.config.thresholds {
            return Some(t.clone());
        }
        let mut c = match self.calibration.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let path = c.path.clone()?;
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified != c.modified {
            c.modified = modified;
            match Calibration::read(&path) {
                Ok(read) => {
                    c.thresholds = read.map(|r| r.thresholds);
                    tracing::info!(thresholds = ?c.thresholds, "router calibration read");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "router calibration not read; the last one stays")
                }
            }
        }
        c.thresholds.clone()
    }

    pub fn deployment(&self, i: usize) -> &Deployment {
        &self.deployments[i]
    }

    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub(crate) fn ledger(&self) -> Option<&EgressLedger> {
        self.ledger.as_ref()
    }

    /// US dollars spent on the cloud tiers today (UTC).
    pub fn spent_today(&self) -> f64 {
        let mut s = match self.spend.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let day = today();
        if s.day != day {
            *s = Spend { day, usd: 0.0 };
        }
        s.usd
    }

    pub(crate) fn add_spend(&self, usd: f64) {
        self.spent_today();
        if let Ok(mut s) = self.spend.lock() {
            s.usd += usd;
        }
    }

    fn budget_spent(&self) -> bool {
        self.config
            .daily_budget_usd
            .is_some_and(|b| self.spent_today() >= b)
    }

    /// What `/health` says of the router: each deployment's breaker, the day's spend, the thresholds.
    pub fn status(&self) -> serde_json::Value {
        let now = std::time::Instant::now();
        let tiers: Vec<serde_json::Value> = self
            .deployments
            .iter()
            .map(|d| {
                let (state, cooling) = d.state(now);
                serde_json::json!({
                    "name": d.config.name, "level": d.config.level, "breaker": state,
                    "cooling_s": cooling,
                })
            })
            .collect();
        serde_json::json!({
            "local_model": self.config.local_model,
            "tiers": tiers,
            "spent_today_usd": self.spent_today(),
            "daily_budget_usd": self.config.daily_budget_usd,
            "thresholds": self.thresholds(),
            "privacy_index_shingles": self.gate.index_len(),
            "redact": self.config.privacy.redact,
            "shareable_index_shingles": self.gate.shareable_len(),
            "learn_from_escalations": self.config.learn_from_escalations,
        })
    }

    /// (deployment, whether its breaker lets requests through) for /metrics.
    pub fn deployments_up(&self) -> Vec<(String, bool)> {
        let now = std::time::Instant::now();
        self.deployments
            .iter()
            .map(|d| (d.config.name.clone(), d.state(now).0 != "open"))
            .collect()
    }

    /// Whether the decision for this request depends on the local confidence probe (so the caller
    /// runs it only when it matters).
    pub fn needs_probe(&self, input: &RouteInput, privacy: &PrivacyVerdict) -> bool {
        self.config.probe
            && self.thresholds().is_some()
            && privacy.may_leave()
            && input.tier.is_none()
            && !self.deployments.is_empty()
            && input.prompt_tokens < input.local_context
            && !self.budget_spent()
    }

    /// The decision for a request (`confidence`: the probe's result, when it ran).
    pub fn decide(
        &self,
        input: &RouteInput,
        privacy: PrivacyVerdict,
        probe: Option<probe::Probe>,
    ) -> Decision {
        let mut d = Decision {
            level: 1,
            tier: "local".into(),
            reasons: Vec::new(),
            rule: "uncalibrated",
            egress_allowed: privacy.may_leave(),
            redact: false,
            kind: input.kind,
            domain: input.kind.domain(),
            standing: input.standing,
            probe,
            score: None,
            prompt_tokens: input.prompt_tokens,
            privacy,
            plan: Vec::new(),
        };
        if !d.egress_allowed
            && d.privacy.may_leave_redacted(self.config.privacy.redact)
            && !self.deployments.is_empty()
        {
            d.egress_allowed = true;
            d.redact = true;
            d.reasons.push(format!(
                "{}: redacted before it leaves (redact mode {})",
                d.privacy.reasons().join("; "),
                self.config.privacy.redact.as_str()
            ));
        }
        // The day's spend, read once for the rule and the plan.
        let spent = self.spent_today();
        let budget_spent = self.config.daily_budget_usd.is_some_and(|b| spent >= b);
        // A named deployment goes first in its level's order.
        let mut first: Option<usize> = None;
        if !d.egress_allowed {
            d.reasons = d.privacy.reasons();
            d.reasons
                .push("private requests are answered only on this machine".into());
            d.rule = "private";
        } else if !self.deployments.is_empty() && budget_spent {
            d.rule = "budget";
            d.reasons.push(format!(
                "today's cloud budget of ${:.2} is spent (${spent:.4})",
                self.config.daily_budget_usd.unwrap_or(0.0),
            ));
        } else if let Some(tier) = input.tier.as_deref() {
            d.rule = "asked";
            match self.asked(tier) {
                Some((level, named)) => {
                    d.level = level;
                    first = named;
                    d.reasons.push(format!("the request asked for {tier}"));
                }
                None => d.reasons.push(format!(
                    "the request asked for {tier}, which is not configured; answered locally"
                )),
            }
        } else if self.deployments.is_empty() {
            d.rule = "no_cloud";
            d.reasons.push("no cloud tier is configured".into());
        } else if input.prompt_tokens >= input.local_context {
            d.rule = "context";
            d.level = 2;
            d.reasons.push(format!(
                "the prompt's {} tokens do not fit the local model's context of {}",
                input.prompt_tokens, input.local_context
            ));
        } else {
            match (self.thresholds(), probe) {
                (Some(t), Some(p)) => {
                    d.rule = "confidence";
                    let signals = probe::Signals {
                        probe: p,
                        kind: input.kind,
                        standing: input.standing,
                    };
                    let score = signals.score(&t);
                    d.score = Some(score);
                    d.level = calibrate::level_of(score, &t);
                    d.reasons.push(format!(
                        "local confidence {:.3} over {} tokens, a {} request ({} offset {:+.2}; \
                         the adapter stands {} against the base in {}, {:+.2}), scores {score:.3} \
                         against thresholds {:.3} (local) and {:.3} (medium)",
                        p.mean_loglik,
                        p.tokens,
                        input.kind.as_str(),
                        input.kind.as_str(),
                        t.kind_offset(input.kind.as_str()),
                        input.standing.as_str(),
                        input.kind.domain(),
                        t.gate_weight * input.standing.sign(),
                        t.local,
                        t.medium
                    ));
                }
                (Some(_), None) => {
                    d.rule = "confidence";
                    d.reasons
                        .push("the confidence probe is off: local first".into());
                }
                (None, _) => d
                    .reasons
                    .push("not calibrated (pai-train router calibrate): local first".into()),
            }
        }
        d.plan = self.plan(d.level, first, d.egress_allowed && !budget_spent);
        if let Some(Target::Cloud(i)) = d.plan.first() {
            d.tier = self.deployments[*i].config.name.clone();
        } else if d.level > 1 {
            // Asked for a level with no deployment (or none left): local answers.
            d.level = 1;
        }
        d
    }

    /// The level and (for a deployment's name) the deployment a request's `tier` names.
    fn asked(&self, tier: &str) -> Option<(u8, Option<usize>)> {
        let level = match tier.to_ascii_lowercase().as_str() {
            "local" | "l1" | "1" => return Some((1, None)),
            "l2" | "2" | "medium" => 2,
            "l3" | "3" | "large" => 3,
            _ => {
                let i = self
                    .deployments
                    .iter()
                    .position(|d| d.config.name == tier)?;
                return Some((self.deployments[i].config.level, Some(i)));
            }
        };
        self.config.level(level).next().map(|_| (level, None))
    }

    /// The order in which targets are tried: the chosen level (its named deployment first), the
    /// other cloud levels, and the local model last for a cloud choice (first for a local one).
    fn plan(&self, level: u8, first: Option<usize>, egress: bool) -> Vec<Target> {
        if !egress {
            return vec![Target::Local];
        }
        let of_level = |l: u8| -> Vec<Target> {
            let mut v: Vec<usize> = (0..self.deployments.len())
                .filter(|&i| self.deployments[i].config.level == l)
                .collect();
            if let Some(f) = first.filter(|f| v.contains(f)) {
                v.retain(|&i| i != f);
                v.insert(0, f);
            }
            v.into_iter().map(Target::Cloud).collect()
        };
        match level {
            1 => [vec![Target::Local], of_level(2), of_level(3)].concat(),
            2 => [of_level(2), of_level(3), vec![Target::Local]].concat(),
            _ => [of_level(3), of_level(2), vec![Target::Local]].concat(),
        }
    }

    /// Save a cloud tier's answer to an escalated request as a chat example: the request's messages
    /// and the answer, one line of `escalations/<day>.jsonl` (OpenAI's fine-tuning format, what a
    /// chat source holds).
    pub(crate) fn save_escalation(&self, messages: &[(String, String)], answer: &str) {
        let Some(dir) = &self.escalations else {
            return;
        };
        if answer.trim().is_empty() {
            return;
        }
        let mut all: Vec<serde_json::Value> = messages
            .iter()
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
            .collect();
        all.push(serde_json::json!({"role": "assistant", "content": answer}));
        let line = serde_json::json!({ "messages": all }).to_string() + "\n";
        let path = dir.join(format!("{}.jsonl", today()));
        let written = std::fs::create_dir_all(dir).and_then(|()| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?
                .write_all(line.as_bytes())
        });
        match written {
            Ok(()) => tracing::info!(path = %path.display(), "escalation saved for training"),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "escalation not saved"),
        }
    }

    /// The cost of a cloud answer.
    pub fn cost(&self, deployment: usize, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        let c = &self.deployments[deployment].config;
        (prompt_tokens as f64 * c.price_input_per_m
            + completion_tokens as f64 * c.price_output_per_m)
            / 1e6
    }
}
