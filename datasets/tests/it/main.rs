//! pai-datasets end to end: ingest runs on real files in temporary homes.

mod ingest;
mod secrets;
