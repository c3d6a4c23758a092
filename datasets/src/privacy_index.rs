//! The privacy index: what lets the router recognise the owner's private text inside a request without
//! keeping that text anywhere but the dataset.
//!
//! It holds 64-bit hashes of 8-word shingles (lowercased words, punctuation and layout ignored, as in
//! `minhash`) of every private example, keeping only the shingles whose hash is 0 modulo 4 (content-defined
//! sampling: the same shingle is kept or dropped wherever it occurs, so a request quoting a private
//! passage samples the same shingles). A quoted passage of 40 words carries ~8 sampled shingles; the index
//! costs 2 bytes per private word. It is rebuilt from the dataset after an ingest that added or removed
//! anything private, so a note deleted or made public leaves it at the next ingest.
//!
//! The same structure, built from the examples of sources marked `shareable`, is the shareable index
//! (`index/shareable.bin`, with the names of the sources it was built from in
//! `index/shareable-sources.json`): a request that quotes one of those may leave redacted.
//!
//! File: `$PAI_HOME/index/private.bin`: the magic `PAIPRIV2` (1 was the FNV word hashes), shingle
//! words (u32), sampling modulus (u32), count (u64), then the sorted hashes (u64), all little-endian;
//! written atomically. Ingest rebuilds a file in another format or with other settings.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{DatasetError, Result};
use crate::journal::write_atomic;
use crate::minhash::{shingles, word_hashes};

const MAGIC: &[u8; 8] = b"PAIPRIV2";
pub const SHINGLE_WORDS: usize = 8;
pub const SAMPLE_MODULUS: u64 = 4;

/// How much of a text the index recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrivateMatch {
    /// Sampled shingles of the text.
    pub sampled: usize,
    /// Of those, how many are in the index.
    pub found: usize,
}

impl PrivateMatch {
    /// Share of the text's sampled shingles that are private (0 when it has none).
    pub fn share(&self) -> f64 {
        if self.sampled == 0 {
            0.0
        } else {
            self.found as f64 / self.sampled as f64
        }
    }
}

/// The sorted sampled shingle hashes of the private examples.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrivacyIndex {
    hashes: Vec<u64>,
}

fn sampled(text: &str) -> impl Iterator<Item = u64> {
    let words = word_hashes(text);
    let hashes: Vec<u64> = if words.len() < SHINGLE_WORDS {
        Vec::new()
    } else {
        shingles(&words, SHINGLE_WORDS)
            .filter(|h| h % SAMPLE_MODULUS == 0)
            .collect()
    };
    hashes.into_iter()
}

fn shareable_sources_path(home: &Path) -> PathBuf {
    home.join("index").join("shareable-sources.json")
}

impl PrivacyIndex {
    pub fn path(home: &Path) -> PathBuf {
        home.join("index").join("private.bin")
    }

    /// The shareable index: the same shingles of shareable sources' examples.
    pub fn shareable_path(home: &Path) -> PathBuf {
        home.join("index").join("shareable.bin")
    }

    /// The sources the shareable index was last built from (none before the first build).
    pub fn shareable_sources(home: &Path) -> Result<BTreeSet<String>> {
        let path = shareable_sources_path(home);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| DatasetError::BadIndex {
                path,
                reason: format!(
                    "not a JSON list of source names ({e}); the next ingest rewrites it"
                ),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(e) => Err(DatasetError::io("read", &path, e)),
        }
    }

    /// Record the sources the shareable index was built from (after the index is written).
    pub fn save_shareable_sources(home: &Path, names: &BTreeSet<String>) -> Result<()> {
        let bytes = serde_json::to_vec(names).map_err(|e| DatasetError::BadIndex {
            path: shareable_sources_path(home),
            reason: e.to_string(),
        })?;
        write_atomic(&shareable_sources_path(home), &bytes)
    }

    pub fn build<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut hashes: Vec<u64> = texts.into_iter().flat_map(sampled).collect();
        hashes.sort_unstable();
        hashes.dedup();
        Self { hashes }
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// How many of the text's sampled shingles are private.
    pub fn check(&self, text: &str) -> PrivateMatch {
        let mut m = PrivateMatch::default();
        for h in sampled(text) {
            m.sampled += 1;
            m.found += usize::from(self.hashes.binary_search(&h).is_ok());
        }
        m
    }

    /// Whether the file at `path` is an index in this format with these settings (its header only).
    pub fn is_current(path: &Path) -> bool {
        let mut header = [0u8; 16];
        std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut header))
            .is_ok_and(|()| header[..8] == *MAGIC && header[8..16] == Self::settings())
    }

    fn settings() -> [u8; 8] {
        let mut s = [0u8; 8];
        s[..4].copy_from_slice(&(SHINGLE_WORDS as u32).to_le_bytes());
        s[4..].copy_from_slice(&(SAMPLE_MODULUS as u32).to_le_bytes());
        s
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::with_capacity(24 + 8 * self.hashes.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&Self::settings());
        bytes.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        for h in &self.hashes {
            bytes.extend_from_slice(&h.to_le_bytes());
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| DatasetError::io("create", dir, e))?;
        }
        write_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DatasetError::io("read", path, e))?;
        let bad = |reason: &str| DatasetError::BadIndex {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if bytes.len() < 24 || &bytes[..8] != MAGIC {
            return Err(bad(
                "not a pai privacy index of this version (no PAIPRIV2 header); the next ingest \
                 rebuilds it",
            ));
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        if u32_at(8) as usize != SHINGLE_WORDS || u64::from(u32_at(12)) != SAMPLE_MODULUS {
            return Err(bad(
                "written with other shingle settings; the next ingest rebuilds it",
            ));
        }
        let mut count = [0u8; 8];
        count.copy_from_slice(&bytes[16..24]);
        let count = u64::from_le_bytes(count) as usize;
        if bytes.len() != 24 + 8 * count {
            return Err(bad("truncated"));
        }
        let hashes: Vec<u64> = bytes[24..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        if hashes.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("hashes out of order"));
        }
        Ok(Self { hashes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = "My sister Ana is moving to Porto in March and has not told our \
        parents yet; she asked me to keep it quiet until the contract with the new clinic is signed \
        and the flat on Rua das Flores is confirmed by the landlord next week.";

    #[test]
    fn a_quoted_private_passage_is_recognised_and_ordinary_text_is_not() {
        let index = PrivacyIndex::build([PRIVATE, "a second private note with too few words"]);
        assert!(!index.is_empty());
        let quoted =
            "Can you rewrite this more politely: \"she asked me to keep it quiet until the \
            contract with the new clinic is signed and the flat on Rua das Flores is confirmed\"";
        let m = index.check(quoted);
        assert!(m.found >= 2 && m.share() > 0.3, "{m:?}");
        // Case, punctuation and line breaks do not hide it.
        let m = index.check(&PRIVATE.to_uppercase().replace(' ', "\n"));
        assert_eq!(m.found, m.sampled);
        let other = index.check(
            "Write a Python function that reads a CSV file and returns the rows where the \
             second column is larger than the mean of that column, with tests.",
        );
        assert_eq!(other.found, 0, "{other:?}");
        assert_eq!(index.check("too short").share(), 0.0);
    }

    #[test]
    fn saves_and_loads_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index/private.bin");
        let index = PrivacyIndex::build([PRIVATE]);
        index.save(&path).unwrap();
        assert_eq!(PrivacyIndex::load(&path).unwrap(), index);
        assert!(PrivacyIndex::is_current(&path));
        let mut old = std::fs::read(&path).unwrap();
        old[7] = b'1';
        std::fs::write(&path, &old).unwrap();
        assert!(!PrivacyIndex::is_current(&path));
        assert!(PrivacyIndex::load(&path).is_err());
        index.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = PrivacyIndex::load(&path).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("private.bin"), "{e}");
        std::fs::write(&path, b"hello").unwrap();
        assert!(PrivacyIndex::load(&path).is_err());
        // No text in the file.
        index.save(&path).unwrap();
        let raw = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).to_lowercase();
        assert!(!raw.contains("porto") && !raw.contains("clinic"));
    }
}
