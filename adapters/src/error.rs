//! The one error type of pai-adapters: each variant names the adapter, version or file at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot parse {what}: {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "adapter name {name:?} is not allowed: use letters, digits, '-', '_' and '.', starting with a \
         letter or digit (at most 64 characters)"
    )]
    BadName { name: String },
    #[error("{value:?} is not an adapter version: versions are v1, v2, …")]
    BadVersion { value: String },
    #[error("no adapter named {name:?} in {root} (adapters there: {known})")]
    UnknownAdapter {
        name: String,
        root: PathBuf,
        known: String,
    },
    #[error("adapter {name:?} has no version {version} (versions: {known})")]
    UnknownVersion {
        name: String,
        version: String,
        known: String,
    },
    #[error("adapter {name:?} has no current version yet: promote one first")]
    NoCurrent { name: String },
    #[error("{dir} is not a PEFT LoRA adapter: {reason}")]
    NotAnAdapter { dir: PathBuf, reason: String },
    #[error(
        "{path}: sha256 is {found}, but pai.json recorded {expected} when the adapter was added: the \
         file changed or is damaged; refusing to load it"
    )]
    Tampered {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("adapter {name:?} {version}: {reason}")]
    Refused {
        name: String,
        version: String,
        reason: String,
    },
    #[error(
        "the adapter registry {path} is locked by another pai process{holder}; waited {waited_s:.0} s"
    )]
    Locked {
        path: PathBuf,
        holder: String,
        waited_s: f64,
    },
}

impl AdapterError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = AdapterError> = std::result::Result<T, E>;
