//! The registry: every version of every adapter the owner has, and which one is served.
//!
//! ```text
//! $PAI_HOME/adapters/
//!   .lock                       one writer at a time (lock.rs)
//!   <name>/
//!     CURRENT                   the served version ("v3\n"), replaced by an atomic rename
//!     history.jsonl             every add, promote, rollback and removal, appended
//!     v1/ v2/ v3/               PEFT directories (adapter_config.json, adapter_model.safetensors)
//!                               with their pai.json (meta.rs)
//! ```
//!
//! Versions are numbered in the order they are added and never reused (the history remembers the
//! highest, so a version removed by `gc` keeps its number). Adding never moves CURRENT; only
//! `promote` and `rollback` do. Every load goes through `verify`, which checks each file against the
//! sha256 recorded when the adapter was added.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{AdapterError, Result};
use crate::lock::RegistryLock;
use crate::meta::{AdapterMeta, RegistryRecord, META_FILE};

const CURRENT: &str = "CURRENT";
const HISTORY: &str = "history.jsonl";
const LOCK: &str = ".lock";
/// The files of a PEFT LoRA adapter that must be there.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// An adapter version: `v1`, `v2`, … in the order they were added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u32);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl std::str::FromStr for Version {
    type Err = AdapterError;

    /// `v3` or `3`.
    fn from_str(s: &str) -> Result<Self> {
        let digits = s.strip_prefix('v').unwrap_or(s);
        match digits.parse::<u32>() {
            Ok(n) if n > 0 && !digits.starts_with('+') => Ok(Self(n)),
            _ => Err(AdapterError::BadVersion { value: s.into() }),
        }
    }
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339.
    pub time: String,
    pub action: Action,
    pub version: Version,
    /// CURRENT before a promote or rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Version>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Added,
    Imported,
    Promoted,
    RolledBack,
    Removed,
}

/// A version whose files match what was recorded when it was added.
#[derive(Debug, Clone)]
pub struct Verified {
    pub name: String,
    pub version: Version,
    pub dir: PathBuf,
    pub meta: AdapterMeta,
}

/// One adapter name with its versions, for listings.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub current: Option<Version>,
    pub versions: Vec<Version>,
}

/// The registry under `$PAI_HOME/adapters`.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
    wait: Duration,
}

impl Registry {
    /// The registry of a pai home (`home/adapters`), created on first write.
    pub fn new(home: &Path) -> Self {
        Self {
            root: home.join("adapters"),
            wait: Duration::from_secs(60),
        }
    }

    /// How long a writer waits for another to finish before failing (60 s by default).
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, name: &str, version: Version) -> PathBuf {
        self.root.join(name).join(version.to_string())
    }

    /// The file whose replacement switches what is served (pai-serve watches it).
    pub fn current_file(&self, name: &str) -> PathBuf {
        self.root.join(name).join(CURRENT)
    }

    fn lock(&self) -> Result<RegistryLock> {
        RegistryLock::acquire(&self.root.join(LOCK), self.wait)
    }

    /// Adapter names, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(AdapterError::io("list", &self.root, e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every name with its versions and current one.
    pub fn list(&self) -> Result<Vec<AdapterSummary>> {
        self.names()?
            .into_iter()
            .map(|name| {
                Ok(AdapterSummary {
                    current: self.current(&name)?,
                    versions: self.versions(&name)?,
                    name,
                })
            })
            .collect()
    }

    /// The versions of `name` on disk, oldest first.
    pub fn versions(&self, name: &str) -> Result<Vec<Version>> {
        check_name(name)?;
        let dir = self.root.join(name);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AdapterError::UnknownAdapter {
                    name: name.into(),
                    root: self.root.clone(),
                    known: self.names()?.join(", "),
                })
            }
            Err(e) => return Err(AdapterError::io("list", &dir, e)),
        };
        let mut versions: Vec<Version> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        versions.sort();
        Ok(versions)
    }

    /// The served version of `name`, if one was promoted.
    pub fn current(&self, name: &str) -> Result<Option<Version>> {
        check_name(name)?;
        let path = self.current_file(name);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.trim().parse()?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AdapterError::io("read", path, e)),
        }
    }

    /// `name` (its current version) or `name@vN`.
    pub fn resolve(&self, spec: &str) -> Result<(String, Version)> {
        let (name, version) = match spec.split_once('@') {
            Some((n, v)) => (n, Some(v.parse::<Version>()?)),
            None => (spec, None),
        };
        let versions = self.versions(name)?;
        let version = match version {
            Some(v) => v,
            None => self
                .current(name)?
                .ok_or_else(|| AdapterError::NoCurrent { name: name.into() })?,
        };
        if !versions.contains(&version) {
            return Err(unknown_version(name, version, &versions));
        }
        Ok((name.to_string(), version))
    }

    /// The version's `pai.json` (not verified: see `verify`).
    pub fn meta(&self, name: &str, version: Version) -> Result<AdapterMeta> {
        let dir = self.dir(name, version);
        if !dir.is_dir() {
            return Err(unknown_version(name, version, &self.versions(name)?));
        }
        AdapterMeta::read(&dir)
    }

    /// The version, with every file checked against the sha256 recorded when it was added.
    pub fn verify(&self, name: &str, version: Version) -> Result<Verified> {
        let meta = self.meta(name, version)?;
        let dir = self.dir(name, version);
        let record = meta
            .registry
            .as_ref()
            .ok_or_else(|| AdapterError::Refused {
                name: name.into(),
                version: version.to_string(),
                reason: format!(
                    "{} has no registry record (file digests)",
                    dir.join(META_FILE).display()
                ),
            })?;
        for (file, expected) in &record.files {
            let path = dir.join(file);
            let found = sha256_file(&path)?;
            if &found != expected {
                return Err(AdapterError::Tampered {
                    path,
                    expected: expected.clone(),
                    found,
                });
            }
        }
        for required in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
            if !record.files.contains_key(required) {
                return Err(AdapterError::Refused {
                    name: name.into(),
                    version: version.to_string(),
                    reason: format!("no digest recorded for {required}"),
                });
            }
        }
        Ok(Verified {
            name: name.into(),
            version,
            dir,
            meta,
        })
    }

    /// Take a PEFT LoRA directory in as the next version of `name` (created if new), with `meta` as
    /// its `pai.json` plus the registry's record. CURRENT does not move. The files are copied into a
    /// hidden directory and renamed into place, so a crash leaves no half version.
    pub fn add(&self, name: &str, src: &Path, meta: AdapterMeta) -> Result<Version> {
        self.take_in(name, src, meta, Action::Added)
    }

    /// `add` for an adapter made elsewhere (PEFT in Python): the caller has checked that it fits the
    /// base `meta.base` names; the history says it was imported.
    pub fn import(&self, name: &str, src: &Path, meta: AdapterMeta) -> Result<Version> {
        self.take_in(name, src, meta, Action::Imported)
    }

    fn take_in(
        &self,
        name: &str,
        src: &Path,
        mut meta: AdapterMeta,
        action: Action,
    ) -> Result<Version> {
        check_name(name)?;
        check_peft_dir(src)?;
        let _lock = self.lock()?;
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| AdapterError::io("create", &dir, e))?;
        let highest = self
            .versions(name)?
            .into_iter()
            .chain(self.history(name)?.into_iter().map(|e| e.version))
            .max()
            .map_or(0, |v| v.0);
        let version = Version(highest + 1);
        let staging = dir.join(format!(".adding-{version}-{}", std::process::id()));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .map_err(|e| AdapterError::io("clear", &staging, e))?;
        }
        std::fs::create_dir_all(&staging).map_err(|e| AdapterError::io("create", &staging, e))?;
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(src).map_err(|e| AdapterError::io("list", src, e))? {
            let entry = entry.map_err(|e| AdapterError::io("list", src, e))?;
            let file_name = entry.file_name();
            let Some(file) = file_name.to_str() else {
                continue;
            };
            if file == META_FILE || !entry.path().is_file() {
                continue;
            }
            let to = staging.join(file);
            std::fs::copy(entry.path(), &to)
                .map_err(|e| AdapterError::io("copy", entry.path(), e))?;
            sync_file(&to)?;
            files.insert(file.to_string(), sha256_file(&to)?);
        }
        meta.registry = Some(RegistryRecord {
            name: name.into(),
            version: version.to_string(),
            added: now(),
            files,
            imported_from: (action == Action::Imported).then(|| src.to_path_buf()),
        });
        write_file_synced(&staging.join(META_FILE), &meta.to_json())?;
        let target = self.dir(name, version);
        std::fs::rename(&staging, &target)
            .map_err(|e| AdapterError::io("rename into", &target, e))?;
        sync_dir(&dir);
        self.append_history(name, action, version, None, "")?;
        tracing::info!(adapter = name, %version, "adapter added");
        Ok(version)
    }

    /// Record the gate's decision about `version` in its `pai.json` (replaced atomically; the file is
    /// not among the digests, so the version stays verified).
    pub fn record_gate(&self, name: &str, version: Version, gate: serde_json::Value) -> Result<()> {
        let _lock = self.lock()?;
        let mut meta = self.meta(name, version)?;
        meta.gate = Some(gate);
        let dir = self.dir(name, version);
        let tmp = dir.join(format!(".{META_FILE}.tmp-{}", std::process::id()));
        write_file_synced(&tmp, &meta.to_json())?;
        let path = dir.join(META_FILE);
        std::fs::rename(&tmp, &path).map_err(|e| AdapterError::io("rename into", &path, e))?;
        sync_dir(&dir);
        Ok(())
    }

    /// Serve `version` of `name`: verified, then CURRENT replaced atomically. Returns the version it
    /// replaced.
    pub fn promote(&self, name: &str, version: Version, reason: &str) -> Result<Option<Version>> {
        let _lock = self.lock()?;
        self.verify(name, version)?;
        let previous = self.current(name)?;
        self.set_current(name, version)?;
        self.append_history(name, Action::Promoted, version, previous, reason)?;
        tracing::info!(adapter = name, %version, ?previous, "adapter promoted");
        Ok(previous)
    }

    /// Serve `to`, or else the version the current one replaced when it was promoted. Returns
    /// (the version served before, the version served now).
    pub fn rollback(&self, name: &str, to: Option<Version>) -> Result<(Version, Version)> {
        let _lock = self.lock()?;
        let current = self
            .current(name)?
            .ok_or_else(|| AdapterError::NoCurrent { name: name.into() })?;
        let to = match to {
            Some(v) => v,
            None => self
                .replaced_by(name, current)?
                .ok_or_else(|| AdapterError::Refused {
                    name: name.into(),
                    version: current.to_string(),
                    reason: "it replaced no earlier version: nothing to roll back to (name one \
                             with --to)"
                        .into(),
                })?,
        };
        if to == current {
            return Err(AdapterError::Refused {
                name: name.into(),
                version: to.to_string(),
                reason: "it is already the current version".into(),
            });
        }
        self.verify(name, to)?;
        self.set_current(name, to)?;
        self.append_history(name, Action::RolledBack, to, Some(current), "")?;
        tracing::info!(adapter = name, from = %current, %to, "adapter rolled back");
        Ok((current, to))
    }

    /// Remove all but the newest `keep` versions of `name`, never the current one, the one it
    /// replaced (the rollback target) or its parent. Returns the versions removed.
    pub fn gc(&self, name: &str, keep: usize) -> Result<Vec<Version>> {
        let _lock = self.lock()?;
        let versions = self.versions(name)?;
        let mut kept: Vec<Version> = versions.iter().rev().take(keep).copied().collect();
        if let Some(current) = self.current(name)? {
            kept.push(current);
            kept.extend(self.replaced_by(name, current)?);
            let parent = self.meta(name, current)?.parent;
            if let Some((n, v)) = parent.as_deref().and_then(|p| p.split_once('@')) {
                if n == name {
                    kept.extend(v.parse::<Version>().ok());
                }
            }
        }
        let mut removed = Vec::new();
        for v in versions {
            if kept.contains(&v) {
                continue;
            }
            let dir = self.dir(name, v);
            // Renamed out of the way first, so a crash never leaves a half-deleted version that
            // looks whole.
            let doomed = self.root.join(name).join(format!(".removing-{v}"));
            std::fs::rename(&dir, &doomed).map_err(|e| AdapterError::io("move aside", &dir, e))?;
            std::fs::remove_dir_all(&doomed).map_err(|e| AdapterError::io("remove", &doomed, e))?;
            self.append_history(name, Action::Removed, v, None, "gc")?;
            removed.push(v);
        }
        Ok(removed)
    }

    /// What happened to `name`, oldest first.
    pub fn history(&self, name: &str) -> Result<Vec<Event>> {
        check_name(name)?;
        let path = self.root.join(name).join(HISTORY);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(AdapterError::io("read", path, e)),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|source| AdapterError::Json {
                    path: path.clone(),
                    what: "a history line",
                    source,
                })
            })
            .collect()
    }

    /// The version that was current when `version` was last promoted.
    fn replaced_by(&self, name: &str, version: Version) -> Result<Option<Version>> {
        Ok(self
            .history(name)?
            .into_iter()
            .rev()
            .find(|e| e.action == Action::Promoted && e.version == version)
            .and_then(|e| e.previous))
    }

    fn set_current(&self, name: &str, version: Version) -> Result<()> {
        let path = self.current_file(name);
        let tmp = self
            .root
            .join(name)
            .join(format!(".CURRENT.tmp-{}", std::process::id()));
        write_file_synced(&tmp, format!("{version}\n").as_bytes())?;
        std::fs::rename(&tmp, &path).map_err(|e| AdapterError::io("rename into", &path, e))?;
        sync_dir(&self.root.join(name));
        Ok(())
    }

    fn append_history(
        &self,
        name: &str,
        action: Action,
        version: Version,
        previous: Option<Version>,
        reason: &str,
    ) -> Result<()> {
        let event = Event {
            time: now(),
            action,
            version,
            previous,
            reason: reason.into(),
        };
        let path = self.root.join(name).join(HISTORY);
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| AdapterError::io("open", &path, e))?;
        f.write_all(&line)
            .and_then(|()| f.sync_all())
            .map_err(|e| AdapterError::io("append to", &path, e))
    }
}

/// Names become directory names and appear in request `model` fields (`base::name`, `name@v3`).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(AdapterError::BadName { name: name.into() })
    }
}

/// A PEFT LoRA directory: `adapter_config.json` saying LORA with a positive rank, and the weights.
pub fn check_peft_dir(dir: &Path) -> Result<()> {
    #[derive(Deserialize)]
    struct PeftConfig {
        peft_type: Option<String>,
        r: Option<u64>,
    }
    let bad = |reason: String| AdapterError::NotAnAdapter {
        dir: dir.to_path_buf(),
        reason,
    };
    let config_path = dir.join(ADAPTER_CONFIG);
    let bytes =
        std::fs::read(&config_path).map_err(|e| bad(format!("no {ADAPTER_CONFIG} ({e})")))?;
    let config: PeftConfig =
        serde_json::from_slice(&bytes).map_err(|source| AdapterError::Json {
            path: config_path,
            what: "the adapter config",
            source,
        })?;
    if config.peft_type.as_deref() != Some("LORA") {
        return Err(bad(format!(
            "peft_type is {:?}, not \"LORA\"",
            config.peft_type.unwrap_or_default()
        )));
    }
    if config.r.unwrap_or(0) == 0 {
        return Err(bad("r (the rank) is missing or 0".into()));
    }
    if !dir.join(ADAPTER_WEIGHTS).is_file() {
        return Err(bad(format!("no {ADAPTER_WEIGHTS}")));
    }
    Ok(())
}

fn unknown_version(name: &str, version: Version, versions: &[Version]) -> AdapterError {
    AdapterError::UnknownVersion {
        name: name.into(),
        version: version.to_string(),
        known: versions
            .iter()
            .map(Version::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// sha256 hex of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| AdapterError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| AdapterError::io("read", path, e))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| AdapterError::io("create", path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| AdapterError::io("write", path, e))
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| AdapterError::io("sync", path, e))
}

/// fsync a directory so a rename in it survives a power loss (a no-op where directories cannot be
/// opened).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Now, RFC 3339 in UTC (seconds).
fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339_utc(secs)
}

/// Seconds since 1970 as `YYYY-MM-DDTHH:MM:SSZ` (the civil-from-days algorithm of Howard Hinnant).
fn rfc3339_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_names_and_times_parse_and_print() {
        assert_eq!("v12".parse::<Version>().unwrap(), Version(12));
        assert_eq!("3".parse::<Version>().unwrap().to_string(), "v3");
        for bad in ["v0", "v", "x3", "v-1", "v+2", ""] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
        for ok in ["personal", "notes-2", "a.b_c"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "../x", "a/b", ".hidden", "a b", "a..b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_796_170_332), "2026-12-02T00:12:12Z");
    }
}
