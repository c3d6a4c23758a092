//! The one error type of pai-evals: each variant names the suite, file or item at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}, line {line}: {reason}")]
    BadItem {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("suite {suite:?}: {reason}")]
    BadSuite { suite: String, reason: String },
    #[error(transparent)]
    Model(#[from] pai_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Dataset(#[from] pai_datasets::DatasetError),
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;
