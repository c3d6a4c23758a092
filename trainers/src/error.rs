//! The one error type of pai-trainers: bad settings named by key, data problems, checkpoint files at
//! fault, and the model and dataset errors underneath.

use std::path::{Path, PathBuf};

/// Everything that can stop training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("train.{key} = {value} is not allowed: {allowed}")]
    BadConfig {
        key: &'static str,
        value: String,
        allowed: String,
    },
    #[error("nothing to train on: {reason}")]
    EmptyDataset { reason: String },
    #[error("chat example {example} ({at}): {reason}")]
    Chat {
        example: String,
        at: String,
        reason: String,
    },
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot parse: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("scoring the retention guard {guard}'s text: {source}")]
    Retention {
        guard: String,
        #[source]
        source: BoxError,
    },
    #[error("the loss became {value} at step {step}; lower train.learning_rate or check the data")]
    NonFinite { step: usize, value: f32 },
    #[error(transparent)]
    Model(#[from] pai_model::ModelError),
    #[error(transparent)]
    Dataset(#[from] pai_datasets::DatasetError),
    #[error(transparent)]
    Candle(#[from] Box<candle_core::Error>),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Candle(Box::new(e))
    }
}

impl TrainError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An error from outside the crate (the retention guard's scorer).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
