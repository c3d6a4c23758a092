//! The one error type of pai-datasets. Bad input files are not errors (they are skipped and counted,
//! see `walk::SkipReason`); these are the failures that stop an ingest: the store, the journal, the
//! configuration.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
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
    #[cfg(feature = "store")]
    #[error("{path}: parquet store error: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: polars::error::PolarsError,
    },
    #[error(
        "{path}: the dataset was written by a newer pai (schema version {found}, this pai reads up \
         to {supported}); upgrade pai"
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "source name {name:?} belongs to {was} (in its change journal), not {now}: give one of them \
         another name (`name = ...` in its [[sources]] entry)"
    )]
    SourceNameTaken {
        name: String,
        was: PathBuf,
        now: PathBuf,
    },
    #[error("{path}: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("source {index}: {field} = {value:?} is invalid: {reason}")]
    BadSource {
        index: usize,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("source {path}: pattern {pattern:?} is not a valid glob: {source}")]
    BadGlob {
        path: PathBuf,
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("source {path} does not exist or is not a directory")]
    MissingSource { path: PathBuf },
    #[error("{count} sources are named {name:?}; give each a distinct `name`")]
    DuplicateSourceName { count: usize, name: String },
    #[error("{key} = {value} is invalid: must be {allowed}")]
    BadSetting {
        key: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("day {day:?} is not a date in the form YYYY-MM-DD")]
    BadDay { day: String },
    #[error("tokenizer: {source}")]
    Tokenizer {
        #[source]
        source: pai_model::ModelError,
    },
}

impl DatasetError {
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

pub type Result<T, E = DatasetError> = std::result::Result<T, E>;
