//! pai-datasets: the day's new notes and code become a clean, private, deduplicated dataset.
//!
//! `ingest::run` walks the configured sources (`source`, `walk`), reads only what the change journal
//! (`journal`) says is new or changed, splits notes by heading (`notes`) and code at top-level items
//! (`code`) into examples of a token budget (`example`), reads conversations one a line (`chat`),
//! adds fill-in-the-middle variants of code (`fim`), removes secrets and PII (`scrub`), drops exact and near duplicates (`minhash`), and writes
//! one parquet partition per day (`store`). Examples of deleted or newly excluded files leave the
//! dataset at the next ingest; the privacy index of private text (`privacy_index`) is rebuilt with it.
//! `mix::training_mix` is the one door from the dataset into training: the night's mix, replay
//! recency-weighted, holdout and eval items kept out.

pub mod chat;
pub mod code;
mod error;
pub mod example;
#[cfg(feature = "store")]
mod file_examples;
pub mod fim;
#[cfg(feature = "store")]
mod frame;
#[cfg(feature = "store")]
pub mod ingest;
pub mod journal;
pub mod minhash;
#[cfg(feature = "store")]
pub mod mix;
pub mod notes;
pub mod privacy_index;
pub mod scrub;
pub mod source;
#[cfg(feature = "store")]
pub mod store;
pub mod walk;

pub use chat::{ChatMessage, Conversation};
pub use error::{DatasetError, Result};
pub use example::{Budget, CountTokens, Example, Kind, Split};
pub use fim::{FimMode, FimSettings, FimSpan, FimTokens};
#[cfg(feature = "store")]
pub use ingest::{IngestOptions, IngestSettings, IngestSummary};
#[cfg(feature = "store")]
pub use mix::{training_mix, Mix, MixMode, MixSettings};
pub use privacy_index::{PrivacyIndex, PrivateMatch};
pub use source::{resolve_sources, Privacy, Source, SourceConfig, SourceKind};
#[cfg(feature = "store")]
pub use store::{StatsRow, Store};
