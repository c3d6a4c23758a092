//! pai-pipeline's errors: each names the file, key, value or run at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid TOML: {source}", path.display())]
    Toml {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A table of the configuration that does not read as its type (an unknown key, a wrong type).
    #[error("[{section}] (from {origin}): {source}")]
    Section {
        section: String,
        origin: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value that reads but is not allowed.
    #[error("{key} = {value} (from {origin}): {allowed}")]
    Invalid {
        key: String,
        value: String,
        allowed: String,
        origin: String,
    },
    #[error("cannot write the configuration as TOML: {source}")]
    Serialize {
        #[source]
        source: toml::ser::Error,
    },
    #[error("{} is not a run state pai can read: {source}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("another nightly run holds {} (pid {pid}); it started {started}", path.display())]
    Locked {
        path: PathBuf,
        pid: u32,
        started: String,
    },
    #[error("{} already exists; pass --force to overwrite it", path.display())]
    Exists { path: PathBuf },
}

impl PipelineError {
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

pub type Result<T> = std::result::Result<T, PipelineError>;
