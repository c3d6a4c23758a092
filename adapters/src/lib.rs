//! pai-adapters: the adapter registry.
//!
//! Training adds each candidate as a new version of an adapter name (`Registry::add`); the gate
//! promotes a winner (`promote`), which atomically replaces that name's `CURRENT` pointer, and
//! `pai-serve` follows the pointer. `rollback` moves the pointer back; `gc` removes old versions but
//! never the current one, the one it replaced or its parent. Every version keeps its `pai.json`
//! (`meta`): base fingerprint, dataset, training run, lineage, the sha256 of each file (checked on
//! every load by `verify`) and, later, the gate's decision, from which `standing` reads where the
//! adapter stands against the base per domain. Writers take one lock (`lock`).
//! A leaf crate: it knows files, not models.

mod error;
mod lock;
pub mod meta;
pub mod registry;
pub mod standing;

pub use error::{AdapterError, Result};
pub use lock::RegistryLock;
pub use meta::{AdapterMeta, BaseFingerprint, DatasetInfo, RegistryRecord};
pub use registry::{
    check_name, check_peft_dir, sha256_file, Action, AdapterSummary, Event, Registry, Verified,
    Version, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
};
pub use standing::{Standing, Standings};
