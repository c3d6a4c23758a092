//! The egress ledger: one JSON line for every request the router sent off the machine
//! (`$PAI_HOME/router/egress.jsonl`): when, to which tier and deployment, what came of it, what the
//! privacy detectors said, its cost, and the sha256 and size of the bytes sent — never the text. The
//! owner reads it with `pai-train egress`; the day's spend is summed from it when the server starts, so
//! the daily budget survives a restart.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::privacy::PrivacyVerdict;

/// One request sent to a cloud deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EgressRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub tier_level: u8,
    pub deployment: String,
    /// `ok`, or why the attempt failed (`connect`, `timeout`, `429`, `5xx`, `4xx`, `stream`).
    pub outcome: String,
    /// Detectors' counts (all zero for anything that left).
    pub secrets: usize,
    pub pii: usize,
    pub private_shingles: usize,
    pub flagged: bool,
    /// Values replaced by placeholders before it left (redact mode).
    #[serde(default)]
    pub redacted: usize,
    /// sha256 of the request body sent, and its length.
    pub sha256: String,
    pub bytes: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

impl EgressRecord {
    pub fn new(level: u8, deployment: &str, body: &[u8], verdict: &PrivacyVerdict) -> Self {
        use sha2::Digest;
        Self {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            tier_level: level,
            deployment: deployment.to_string(),
            outcome: String::new(),
            secrets: verdict.secrets.values().sum(),
            pii: verdict.pii.values().sum(),
            private_shingles: verdict.private_shingles,
            flagged: verdict.flagged,
            redacted: 0,
            sha256: format!("{:x}", sha2::Sha256::digest(body)),
            bytes: body.len(),
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.0,
        }
    }
}

pub struct EgressLedger {
    path: PathBuf,
    lock: Mutex<()>,
}

impl EgressLedger {
    pub fn path(home: &Path) -> PathBuf {
        home.join("router").join("egress.jsonl")
    }

    pub fn open(path: PathBuf) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Self {
            path,
            lock: Mutex::new(()),
        })
    }

    /// Append one record (a whole line in one write, under a lock).
    pub fn append(&self, record: &EgressRecord) {
        let _held = self.lock.lock();
        let line = match serde_json::to_string(record) {
            Ok(l) => l + "\n",
            Err(e) => return tracing::error!(error = %e, "egress record not written"),
        };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, "egress ledger not written");
        }
    }

    /// Every record in the file at `path` (lines that do not parse are skipped).
    pub fn read(path: &Path) -> std::io::Result<Vec<EgressRecord>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// US dollars spent on `day` (`YYYY-MM-DD`, UTC) by the records in the file.
    pub fn spent_on(&self, day: &str) -> f64 {
        Self::read(&self.path)
            .unwrap_or_default()
            .iter()
            .filter(|r| r.time.starts_with(day))
            .map(|r| r.cost_usd)
            .sum()
    }
}
