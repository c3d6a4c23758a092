//! The privacy gate: whether a request may leave the machine. It may not when it carries a secret or
//! personal data (pai-datasets' scrubbers, the same ones ingest uses), text of the owner's private
//! notes (recognised through the privacy index ingest builds at `$PAI_HOME/index/private.bin`), or
//! the request's own `private` flag. The router asks the gate before every cloud attempt, fallbacks
//! included, so no path around it exists.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use pai_datasets::scrub::{scrub, PiiPolicy};
use pai_datasets::PrivacyIndex;
use serde::Serialize;

use super::config::PrivacyConfig;

/// The kinds of redaction that are personal data (the others are secrets).
const PII_KINDS: [&str; 4] = ["email", "phone", "card", "iban"];

/// What the detectors found in a request (never the text itself).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PrivacyVerdict {
    /// The request asked to stay local (`private: true` or `x-pai-private`).
    pub flagged: bool,
    /// Secret kind → count.
    pub secrets: BTreeMap<String, usize>,
    /// Personal data kind → count.
    pub pii: BTreeMap<String, usize>,
    /// Sampled shingles of the request, and how many of them are in the privacy index.
    pub sampled_shingles: usize,
    pub private_shingles: usize,
    /// Whether `private_shingles` reaches the configured minimum.
    pub private_text: bool,
}

impl PrivacyVerdict {
    pub fn may_leave(&self) -> bool {
        !self.flagged && self.secrets.is_empty() && self.pii.is_empty() && !self.private_text
    }

    /// Whether it may leave with its secrets and personal data redacted (redact mode).
    pub fn may_leave_redacted(&self) -> bool {
        !self.flagged && !self.private_text
    }

    /// Why a request must stay (empty when it may leave).
    pub fn reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.flagged {
            out.push("the request is marked private".to_string());
        }
        let kinds = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, n)| format!("{k} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.secrets.is_empty() {
            out.push(format!("it carries secrets ({})", kinds(&self.secrets)));
        }
        if !self.pii.is_empty() {
            out.push(format!("it carries personal data ({})", kinds(&self.pii)));
        }
        if self.private_text {
            out.push(format!(
                "it quotes the owner's private notes ({} of {} sampled passages)",
                self.private_shingles, self.sampled_shingles
            ));
        }
        out
    }

    /// The detector names that fired (for /metrics).
    pub fn detectors(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.flagged {
            out.push("flag");
        }
        if !self.secrets.is_empty() {
            out.push("secret");
        }
        if !self.pii.is_empty() {
            out.push("pii");
        }
        if self.private_text {
            out.push("private_index");
        }
        out
    }
}

/// The privacy index as last read, with the file's modification time (reread when it changes, so a
/// night's ingest is seen without a restart).
struct LoadedIndex {
    modified: Option<SystemTime>,
    index: Arc<PrivacyIndex>,
}

pub struct PrivacyGate {
    pii: PiiPolicy,
    min_private_shingles: usize,
    index_path: Option<PathBuf>,
    index: Mutex<LoadedIndex>,
}

impl PrivacyGate {
    /// A gate that reads the privacy index at `index_path` (none: no index, the scrubbers and the
    /// flag only).
    pub fn new(config: &PrivacyConfig, index_path: Option<PathBuf>) -> Self {
        let gate = Self {
            pii: config.pii,
            min_private_shingles: config.min_private_shingles.max(1),
            index_path: index_path.filter(|_| config.private_index),
            index: Mutex::new(LoadedIndex {
                modified: None,
                index: Arc::new(PrivacyIndex::default()),
            }),
        };
        gate.current_index();
        gate
    }

    /// The index, reread when its file changed since the last read.
    fn current_index(&self) -> Arc<PrivacyIndex> {
        let Some(path) = &self.index_path else {
            return Arc::new(PrivacyIndex::default());
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut loaded = match self.index.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if modified.is_some() && modified != loaded.modified {
            match PrivacyIndex::load(path) {
                Ok(index) => {
                    tracing::info!(path = %path.display(), shingles = index.len(), "privacy index loaded");
                    loaded.index = Arc::new(index);
                    loaded.modified = modified;
                }
                // The previous index (if any) stays: a half-read file never empties the gate.
                Err(e) => tracing::warn!(error = %e, "privacy index not read"),
            }
        } else if modified.is_none() && loaded.modified.is_none() {
            tracing::debug!(path = %path.display(), "no privacy index yet (ingest builds it)");
        }
        loaded.index.clone()
    }

    /// Which personal data the gate looks for.
    pub fn pii(&self) -> PiiPolicy {
        self.pii
    }

    /// Shingles the loaded index holds (0: no index).
    pub fn index_len(&self) -> usize {
        self.current_index().len()
    }

    /// The verdict on a request whose texts are `texts`.
    pub fn check<'a>(
        &self,
        texts: impl IntoIterator<Item = &'a str>,
        flagged: bool,
    ) -> PrivacyVerdict {
        let mut v = PrivacyVerdict {
            flagged,
            ..Default::default()
        };
        let index = self.current_index();
        for text in texts {
            for (kind, n) in scrub(text, self.pii).redactions {
                let into = if PII_KINDS.contains(&kind.as_str()) {
                    &mut v.pii
                } else {
                    &mut v.secrets
                };
                *into.entry(kind).or_default() += n;
            }
            if !index.is_empty() {
                let m = index.check(text);
                v.sampled_shingles += m.sampled;
                v.private_shingles += m.found;
            }
        }
        v.private_text = v.private_shingles >= self.min_private_shingles;
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOTE: &str = "The spare key for the allotment shed hangs behind the third loose brick \
        on the north wall, and the padlock combination is the year grandmother planted the pear \
        tree, which only the family knows about.";

    #[test]
    fn secrets_personal_data_private_notes_and_the_flag_each_keep_a_request_local() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("private.bin");
        PrivacyIndex::build([NOTE]).save(&path).expect("save");
        let gate = PrivacyGate::new(&PrivacyConfig::default(), Some(path));
        assert!(gate.index_len() > 0);

        let plain = gate.check(["How do I reverse a list in Python?"], false);
        assert!(plain.may_leave(), "{plain:?}");
        assert!(plain.reasons().is_empty());

        let email = [
            "Write to ada.lovelace",
            "@",
            "analytical-engines.co.uk about it",
        ]
        .concat();
        let email = gate.check([email.as_str()], false);
        assert_eq!(email.pii.get("email"), Some(&1));
        assert!(!email.may_leave());

        let key = ["token = ", "ghp_", "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"].concat();
        let secret = gate.check([key.as_str()], false);
        assert!(!secret.secrets.is_empty(), "{secret:?}");
        assert!(!secret.may_leave());

        let quoted = format!("Summarise this for me please: {}", &NOTE[..160]);
        let private = gate.check([quoted.as_str()], false);
        assert!(private.private_text, "{private:?}");
        assert!(private.reasons()[0].contains("private notes"));

        let flagged = gate.check(["hello"], true);
        assert_eq!(flagged.detectors(), ["flag"]);
    }

    #[test]
    fn a_rewritten_index_is_seen_without_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("private.bin");
        let gate = PrivacyGate::new(&PrivacyConfig::default(), Some(path.clone()));
        assert!(gate.check([NOTE], false).may_leave(), "no index yet");
        PrivacyIndex::build([NOTE]).save(&path).expect("save");
        // A modification time the first read cannot have seen.
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(later))
            .expect("touch");
        assert!(!gate.check([NOTE], false).may_leave());
    }
}
