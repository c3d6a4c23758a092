//! The privacy gate: whether a request may leave the machine. It may not when it carries a secret or
//! personal data (pai-datasets' scrubbers, the same ones ingest uses), text of the owner's private
//! notes (recognised through the privacy index ingest builds at `$PAI_HOME/index/private.bin`), or
//! the request's own `private` flag. The router asks the gate before every cloud attempt, fallbacks
//! included, so no path around it exists. Whether a request quotes a source marked shareable (the
//! shareable index, `index/shareable.bin`) decides redact mode `shareable`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use pai_datasets::scrub::{scrub, PiiPolicy};
use pai_datasets::PrivacyIndex;
use serde::Serialize;

use super::config::{PrivacyConfig, Redact};

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
    /// Of the sampled shingles, how many are in the shareable index, and whether they reach the
    /// same minimum (the request quotes a source the owner marked shareable).
    pub shareable_shingles: usize,
    pub shareable_text: bool,
}

impl PrivacyVerdict {
    pub fn may_leave(&self) -> bool {
        !self.flagged && self.secrets.is_empty() && self.pii.is_empty() && !self.private_text
    }

    /// Whether it may leave with its secrets and personal data redacted, in redact mode `mode`:
    /// never when flagged or quoting private notes; in `shareable` only when it quotes a shareable
    /// source.
    pub fn may_leave_redacted(&self, mode: Redact) -> bool {
        let redactable = !self.flagged && !self.private_text;
        match mode {
            Redact::Off => false,
            Redact::Shareable => redactable && self.shareable_text,
            Redact::All => redactable,
        }
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

/// An index file as last read, with its modification time (reread when it changes, so a night's
/// ingest is seen without a restart).
struct WatchedIndex {
    what: &'static str,
    path: Option<PathBuf>,
    loaded: Mutex<(Option<SystemTime>, Arc<PrivacyIndex>)>,
}

impl WatchedIndex {
    fn new(what: &'static str, path: Option<PathBuf>) -> Self {
        let index = Self {
            what,
            path,
            loaded: Mutex::new((None, Arc::new(PrivacyIndex::default()))),
        };
        index.current();
        index
    }

    /// The index, reread when its file changed since the last read.
    fn current(&self) -> Arc<PrivacyIndex> {
        let Some(path) = &self.path else {
            return Arc::new(PrivacyIndex::default());
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut loaded = match self.loaded.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if modified.is_some() && modified != loaded.0 {
            match PrivacyIndex::load(path) {
                Ok(index) => {
                    tracing::info!(path = %path.display(), shingles = index.len(), "{} index loaded", self.what);
                    *loaded = (modified, Arc::new(index));
                }
                // The previous index (if any) stays: a half-read file never empties the gate.
                Err(e) => tracing::warn!(error = %e, "{} index not read", self.what),
            }
        } else if modified.is_none() && loaded.0.is_none() {
            tracing::debug!(path = %path.display(), "no {} index yet (ingest builds it)", self.what);
        }
        loaded.1.clone()
    }
}

pub struct PrivacyGate {
    pii: PiiPolicy,
    min_private_shingles: usize,
    private: WatchedIndex,
    shareable: WatchedIndex,
}

impl PrivacyGate {
    /// A gate that reads the privacy and shareable indexes under `home` (none: no index, the
    /// scrubbers and the flag only).
    pub fn new(config: &PrivacyConfig, home: Option<&Path>) -> Self {
        Self {
            pii: config.pii,
            min_private_shingles: config.min_private_shingles.max(1),
            private: WatchedIndex::new(
                "privacy",
                home.map(PrivacyIndex::path)
                    .filter(|_| config.private_index),
            ),
            shareable: WatchedIndex::new(
                "shareable",
                home.map(PrivacyIndex::shareable_path)
                    .filter(|_| config.redact == Redact::Shareable),
            ),
        }
    }

    /// Which personal data the gate looks for.
    pub fn pii(&self) -> PiiPolicy {
        self.pii
    }

    /// Shingles the loaded index holds (0: no index).
    pub fn index_len(&self) -> usize {
        self.private.current().len()
    }

    /// Shingles the loaded shareable index holds (0: none, or redact mode is not `shareable`).
    pub fn shareable_len(&self) -> usize {
        self.shareable.current().len()
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
        let index = self.private.current();
        let shareable = self.shareable.current();
        for text in texts {
            for (kind, n) in scrub(text, self.pii).redactions {
                let into = if PII_KINDS.contains(&kind.as_str()) {
                    &mut v.pii
                } else {
                    &mut v.secrets
                };
                *into.entry(kind).or_default() += n;
            }
            // The text's sampled shingles are the same whichever index counts them.
            let mut sampled = 0;
            if !index.is_empty() {
                let m = index.check(text);
                sampled = m.sampled;
                v.private_shingles += m.found;
            }
            if !shareable.is_empty() {
                let m = shareable.check(text);
                sampled = m.sampled;
                v.shareable_shingles += m.found;
            }
            v.sampled_shingles += sampled;
        }
        v.private_text = v.private_shingles >= self.min_private_shingles;
        v.shareable_text = v.shareable_shingles >= self.min_private_shingles;
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
        let path = PrivacyIndex::path(dir.path());
        PrivacyIndex::build([NOTE]).save(&path).expect("save");
        let gate = PrivacyGate::new(&PrivacyConfig::default(), Some(dir.path()));
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
        let path = PrivacyIndex::path(dir.path());
        let gate = PrivacyGate::new(&PrivacyConfig::default(), Some(dir.path()));
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

    /// Redact mode `shareable` lets out (redacted) only a request that quotes a shareable source;
    /// `all` any request without private notes or the flag; `off` none.
    #[test]
    fn redact_modes_decide_which_requests_may_leave_redacted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = "Minutes of the supplier call: the pallet counts are confirmed for Thursday,             the pricing sheet is back from finance, and the warehouse opens an hour early.";
        PrivacyIndex::build([shared])
            .save(&PrivacyIndex::shareable_path(dir.path()))
            .expect("save");
        PrivacyIndex::build([NOTE])
            .save(&PrivacyIndex::path(dir.path()))
            .expect("save");
        let email = ["ops", "@", "example-supplier.com"].concat();
        let quoting = format!("Tidy these up and send them to {email}: {shared}");
        let unknown = format!("Write to {email} that the meeting moved.");
        let both = format!("{quoting} Also: {NOTE}");
        let gate = PrivacyGate::new(&PrivacyConfig::default(), Some(dir.path()));
        assert!(gate.shareable_len() > 0);
        let verdict = |text: &str| gate.check([text], false);
        let (q, u, b) = (verdict(&quoting), verdict(&unknown), verdict(&both));
        assert!(q.shareable_text && !u.shareable_text, "{q:?} {u:?}");
        assert!(!q.may_leave() && !u.may_leave());
        assert!(q.may_leave_redacted(Redact::Shareable));
        assert!(!u.may_leave_redacted(Redact::Shareable));
        assert!(
            !b.may_leave_redacted(Redact::Shareable),
            "quotes a private note too"
        );
        assert!(!gate
            .check([quoting.as_str()], true)
            .may_leave_redacted(Redact::All));
        assert!(u.may_leave_redacted(Redact::All));
        assert!(!q.may_leave_redacted(Redact::Off));
        // Only mode `shareable` reads the shareable index.
        let all = PrivacyConfig {
            redact: Redact::All,
            ..Default::default()
        };
        assert_eq!(PrivacyGate::new(&all, Some(dir.path())).shareable_len(), 0);
    }

    #[test]
    fn redact_reads_its_names_and_the_old_booleans() {
        let read = |v: &str| toml::from_str::<PrivacyConfig>(&format!("redact = {v}"));
        assert_eq!(read("false").expect("false").redact, Redact::Off);
        assert_eq!(read("true").expect("true").redact, Redact::All);
        assert_eq!(
            read("\"shareable\"").expect("name").redact,
            Redact::Shareable
        );
        assert_eq!(read("\"off\"").expect("name").redact, Redact::Off);
        let err = read("\"some\"").expect_err("unknown").to_string();
        assert!(err.contains("\"off\", \"shareable\" or \"all\""), "{err}");
    }
}
