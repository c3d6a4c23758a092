//! The change journal: what each source's files held at the last ingest, so the next one reads only
//! what changed and knows which examples each file contributed.
//!
//! One JSON file per source in `$PAI_HOME/journal/`, written atomically. Per file: size and mtime (a
//! cheap first check: unchanged files are not even read), the content hash (an edit that changes
//! nothing, or a move, is recognised), and the ids of the examples the file produced (an edit adds only
//! its new sections, and retracts the ones it removed). Deletions are recorded with their day.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DatasetError, Result};

const JOURNAL_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    pub mtime_ns: u128,
    /// sha256 of the file's bytes.
    pub hash: String,
    /// Ids of the examples this file contributes to the dataset now.
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deletion {
    pub day: String,
    pub path: String,
    pub hash: String,
}

/// One source's journal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    #[serde(default)]
    pub version: u32,
    /// The source's root directory when the journal was written (two sources of one name are refused).
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Relative path → what it held at the last ingest.
    pub files: BTreeMap<String, FileEntry>,
    /// Files that disappeared (not moved), most recent last.
    #[serde(default)]
    pub deleted: Vec<Deletion>,
}

impl Journal {
    pub fn path(home: &Path, source: &str) -> PathBuf {
        home.join("journal").join(format!("{source}.json"))
    }

    /// The journal of a source, or an empty one if it has none yet.
    pub fn load(home: &Path, source: &str) -> Result<Self> {
        let path = Self::path(home, source);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(DatasetError::io("read", &path, e)),
        };
        let journal: Journal =
            serde_json::from_str(&text).map_err(|source| DatasetError::Json {
                path: path.clone(),
                what: "the change journal",
                source,
            })?;
        if journal.version > JOURNAL_VERSION {
            return Err(DatasetError::NewerSchema {
                path,
                found: journal.version,
                supported: JOURNAL_VERSION,
            });
        }
        Ok(journal)
    }

    pub fn save(&self, home: &Path, source: &str) -> Result<()> {
        let mut j = self.clone();
        j.version = JOURNAL_VERSION;
        let bytes = serde_json::to_vec(&j).map_err(|e| DatasetError::Json {
            path: Self::path(home, source),
            what: "the change journal",
            source: e,
        })?;
        write_atomic(&Self::path(home, source), &bytes)
    }
}

/// Write a file so that a reader sees the old content or the new, never a part: a temporary file in
/// the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| DatasetError::io("create", dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| DatasetError::io("create", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| DatasetError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DatasetError::io("rename into place", path, e))?;
    sync_dir(dir);
    Ok(())
}

/// fsync a directory so a rename in it survives a power loss (a no-op where directories cannot be
/// opened, as on Windows).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_a_newer_version() {
        let home = tempfile::tempdir().unwrap();
        let mut j = Journal::default();
        j.files.insert(
            "a.md".into(),
            FileEntry {
                size: 3,
                mtime_ns: 1 << 100,
                hash: "h".into(),
                examples: vec!["e1".into()],
            },
        );
        j.save(home.path(), "notes").unwrap();
        let back = Journal::load(home.path(), "notes").unwrap();
        assert_eq!(back.files, j.files);
        assert_eq!(
            Journal::load(home.path(), "other").unwrap(),
            Journal::default()
        );
        std::fs::write(
            Journal::path(home.path(), "notes"),
            r#"{"version": 99, "files": {}}"#,
        )
        .unwrap();
        let e = Journal::load(home.path(), "notes").unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
    }
}
