//! An adapter's `pai.json`: where the adapter came from (base fingerprint, dataset, training run,
//! parent), what the registry recorded when it was added (name, version, the sha256 of every file),
//! and later what the gate decided. Parsed once here; everything else reads these fields.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{AdapterError, Result};

pub const META_FILE: &str = "pai.json";

/// The contents of `pai.json`. Fields pai does not know (written by a newer pai, or by hand) are kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base: BaseFingerprint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetInfo>,
    /// The training run and its configuration, as the trainer wrote them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Value>,
    /// The trainer's metrics (losses, steps, tokens, time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
    /// The adapter these weights started from (`continue`): `name@vN` for a registered one, else
    /// the directory it was read from. None for an adapter trained fresh from the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// When the adapter was made (RFC 3339).
    #[serde(default)]
    pub created: String,
    /// Filled in by `Registry::add`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryRecord>,
    /// The gate's decision and its reasons, per suite (written by the evals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<serde_json::Value>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Which base an adapter belongs to: the sha256 of the model file is what counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseFingerprint {
    #[serde(default)]
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// The data an adapter was trained on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// The night's day (YYYY-MM-DD): later days were not seen.
    #[serde(default)]
    pub day: String,
    /// Every day the mix drew from.
    #[serde(default)]
    pub days: Vec<String>,
    /// A hash of the ids of the examples trained on.
    #[serde(default)]
    pub hash: String,
    #[serde(default)]
    pub examples: u64,
    #[serde(default)]
    pub new_tokens: u64,
    #[serde(default)]
    pub replay_tokens: u64,
    #[serde(default)]
    pub holdout_examples: u64,
}

/// What the registry recorded when it took the adapter in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryRecord {
    pub name: String,
    pub version: String,
    /// When it was added (RFC 3339).
    pub added: String,
    /// sha256 of every file of the adapter but `pai.json`, checked on every load.
    pub files: BTreeMap<String, String>,
    /// The directory an imported adapter came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_from: Option<PathBuf>,
}

impl AdapterMeta {
    /// `dir/pai.json`; an adapter directory without one (made by PEFT in Python) reads as empty.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(META_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| AdapterError::Json {
                path,
                what: "the adapter's pai.json",
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(AdapterError::io("read", path, e)),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_a_round_trip_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            AdapterMeta::read(dir.path()).unwrap(),
            AdapterMeta::default()
        );
        std::fs::write(
            dir.path().join(META_FILE),
            r#"{"base": {"sha256": "ab", "name": "m"}, "dataset": {"day": "2026-12-01", "days": ["2026-12-01"]},
                "created": "2026-12-02T01:00:00+00:00", "future_field": {"x": 1}}"#,
        )
        .unwrap();
        let meta = AdapterMeta::read(dir.path()).unwrap();
        assert_eq!(meta.base.sha256, "ab");
        assert_eq!(meta.dataset.as_ref().unwrap().days, ["2026-12-01"]);
        let again: AdapterMeta = serde_json::from_slice(&meta.to_json()).unwrap();
        assert_eq!(again, meta);
        assert_eq!(again.other["future_field"]["x"], 1);
        std::fs::write(dir.path().join(META_FILE), "{").unwrap();
        let e = AdapterMeta::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("pai.json"), "{e}");
    }
}
