//! The dataset on disk: parquet files per day, `dataset/day=YYYY-MM-DD/part-NNNNN.parquet`, through
//! polars (a day written before parts existed has one `data.parquet`, read as its first part).
//!
//! An append adds new parts and never rewrites old ones, so `pai-train watch` ingesting a few notes
//! late in the day costs those notes, not the day so far; the new rows are cut into one part per
//! core, encoded side by side. Every part goes to a temporary file that is fsynced and renamed into
//! place, so a crash leaves whole parts only; rows a crash left without a journal entry are found
//! again by the next ingest and dropped as exact duplicates. `dataset/schema.json` holds the schema
//! version; a dataset written by a newer pai is refused rather than misread. Retraction (a deleted or
//! newly excluded note leaving the dataset) rewrites the parts that hold the retracted ids. Pages are
//! LZ4-compressed: about twice as fast to write as zstd's default on text (ingest writes every byte it
//! reads), read by polars, pyarrow and every parquet reader since format 2.9.

use std::collections::{BTreeMap, BTreeSet};

use hashbrown::HashSet;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::error::{DatasetError, Result};
use crate::example::{Example, Kind};
use crate::frame::{
    from_frame, read_columns, stored_signatures, to_frame, EXAMPLE_COLUMNS, MINHASH_COLUMN,
};
use crate::journal::{sync_dir, write_atomic};
use crate::minhash::Signature;

/// 1: the first; 2: `fim_mode`/`fim_start`/`fim_end` and `minhash` (version 1 files are read as
/// having no FIM examples); 3: `minhash_oph`, one-permutation signatures (`minhash::Signature`);
/// 4: `minhash_oph16`, the same in 16 bits a bin; 5: `minhash_lane16`, the same with faster word and
/// shingle hashes. A file without the current signature column has its signatures computed from the
/// text when asked for.
/// Opening an older dataset records the current version, since what is written next is in it.
pub const SCHEMA_VERSION: u32 = 5;
/// Text a part holds at most, in bytes (a large append is cut into at least one part per core).
const PART_BYTES: usize = 256 << 20;
/// Rows below which an append is one part (fewer, larger files for the many small appends of a day).
const MIN_PART_ROWS: usize = 1000;
/// Parts a day may hold before its small ones (under `SMALL_PART_BYTES` on disk) are merged.
const MAX_PARTS: usize = 16;
const SMALL_PART_BYTES: u64 = 8 << 20;

/// One group of `Store::stats`: examples of one day, source, kind and split.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsRow {
    pub day: String,
    pub source: String,
    pub kind: String,
    pub split: String,
    pub examples: u64,
    pub tokens: u64,
    pub redactions: u64,
    /// Examples from notes or sources marked private.
    pub private: u64,
}

/// The dataset directory of a pai home.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Open (creating if need be) the dataset under `dir`, checking its schema version.
    pub fn open(dir: &Path) -> Result<Self> {
        let schema = dir.join("schema.json");
        match std::fs::read_to_string(&schema) {
            Ok(text) => {
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|source| DatasetError::Json {
                        path: schema.clone(),
                        what: "the dataset schema",
                        source,
                    })?;
                let found = v.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
                if found > SCHEMA_VERSION {
                    return Err(DatasetError::NewerSchema {
                        path: schema,
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                if found < SCHEMA_VERSION {
                    write_atomic(
                        &schema,
                        format!("{{\"version\": {SCHEMA_VERSION}}}\n").as_bytes(),
                    )?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_atomic(
                    &schema,
                    format!("{{\"version\": {SCHEMA_VERSION}}}\n").as_bytes(),
                )?;
            }
            Err(e) => return Err(DatasetError::io("read", &schema, e)),
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn day_dir(&self, day: &str) -> PathBuf {
        self.dir.join(format!("day={day}"))
    }

    /// The parquet files of one day, in the order they were written (none if the day has none).
    fn parts(&self, day: &str) -> Result<Vec<PathBuf>> {
        let dir = self.day_dir(day);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(DatasetError::io("list", &dir, e)),
        };
        let mut parts: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.') && n.ends_with(".parquet"))
            })
            .collect();
        // `data.parquet` (before parts) sorts before `part-…`; part numbers are zero-padded.
        parts.sort();
        Ok(parts)
    }

    /// The days that have a partition, oldest first.
    pub fn days(&self) -> Result<Vec<String>> {
        let mut days = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(days),
            Err(e) => return Err(DatasetError::io("list", &self.dir, e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(day) = name.strip_prefix("day=") {
                if !self.parts(day)?.is_empty() {
                    days.push(day.to_string());
                }
            }
        }
        days.sort();
        Ok(days)
    }

    /// Every part of every day, oldest first.
    fn all_parts(&self) -> Result<Vec<PathBuf>> {
        let mut all = Vec::new();
        for day in self.days()? {
            all.extend(self.parts(&day)?);
        }
        Ok(all)
    }

    /// The examples of one day (none if the day has no partition).
    pub fn read_day(&self, day: &str) -> Result<Vec<Example>> {
        let mut out = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        for path in self.parts(day)? {
            let df = read_columns(&path, EXAMPLE_COLUMNS)?;
            let rows = from_frame(&df).map_err(|source| DatasetError::Store { path, source })?;
            // A compaction cut short by a crash can leave a row in two parts: the first counts.
            out.extend(rows.into_iter().filter(|e| seen.insert(e.id.clone())));
        }
        Ok(out)
    }

    /// The MinHash signature of every stored example that has one, except those in `skip`, with its id.
    /// (Files from before schema version 5 have none stored: computed from their text.)
    pub fn signatures(&self, skip: &HashSet<String>) -> Result<Vec<(String, Signature)>> {
        let mut out = Vec::new();
        for path in self.all_parts()? {
            let mut df = read_columns(&path, &["id", "kind", MINHASH_COLUMN])?;
            if stored_signatures(&df).ok().flatten().is_none() {
                df = read_columns(&path, &["id", "kind", "text"])?;
            }
            let mut collect = || -> PolarsResult<()> {
                let ids = df.column("id")?.str()?;
                let kinds = df.column("kind")?.str()?;
                let stored = stored_signatures(&df)?;
                let texts = match df.column("text") {
                    Ok(c) => Some(c.str()?.clone()),
                    Err(_) => None,
                };
                for i in 0..df.height() {
                    let id = ids.get(i).unwrap_or_default();
                    if skip.contains(id) || kinds.get(i) == Some(Kind::Fim.as_str()) {
                        continue;
                    }
                    let signature = match &stored {
                        Some(b) => b.get(i).and_then(Signature::from_bytes),
                        None => texts
                            .as_ref()
                            .and_then(|t| t.get(i))
                            .and_then(Signature::of),
                    };
                    if let Some(sig) = signature {
                        out.push((id.to_string(), sig));
                    }
                }
                Ok(())
            };
            collect().map_err(|source| DatasetError::Store { path, source })?;
        }
        Ok(out)
    }

    /// The texts of private examples (the privacy index).
    pub fn private_texts(&self) -> Result<Vec<String>> {
        self.texts_where(|_, private| private)
    }

    /// The texts of `sources`' examples that are not private (the shareable index).
    pub fn shareable_texts(&self, sources: &BTreeSet<String>) -> Result<Vec<String>> {
        if sources.is_empty() {
            return Ok(Vec::new());
        }
        self.texts_where(|source, private| !private && sources.contains(source))
    }

    /// The texts of the examples `keep(source, private)` accepts, over every part.
    fn texts_where(&self, keep: impl Fn(&str, bool) -> bool) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for path in self.all_parts()? {
            let df = read_columns(&path, &["text", "source", "private"])?;
            let mut collect = || -> PolarsResult<()> {
                let texts = df.column("text")?.str()?;
                let sources = df.column("source")?.str()?;
                let private = df.column("private")?.bool()?;
                for i in 0..df.height() {
                    if keep(
                        sources.get(i).unwrap_or_default(),
                        private.get(i) == Some(true),
                    ) {
                        out.push(texts.get(i).unwrap_or_default().to_string());
                    }
                }
                Ok(())
            };
            collect().map_err(|source| DatasetError::Store { path, source })?;
        }
        Ok(out)
    }

    /// Every example, oldest day first.
    pub fn read_all(&self) -> Result<Vec<Example>> {
        let mut all = Vec::new();
        for day in self.days()? {
            all.extend(self.read_day(&day)?);
        }
        Ok(all)
    }

    /// Replace one day's partition with `examples` (tests build datasets this way; ingest appends).
    #[cfg(test)]
    pub(crate) fn write_day(&self, day: &str, examples: &[Example]) -> Result<()> {
        for part in self.parts(day)? {
            std::fs::remove_file(&part).map_err(|e| DatasetError::io("remove", &part, e))?;
        }
        self.append(day, examples)
    }

    /// Add examples to a day as new parts (ids already in the day are not added twice).
    pub fn append(&self, day: &str, examples: &[Example]) -> Result<()> {
        let mut have: HashSet<String> = HashSet::new();
        for part in self.parts(day)? {
            have.extend(read_ids(&part)?);
        }
        let mut seen: HashSet<&str> = HashSet::new();
        let rows: Vec<&Example> = examples
            .iter()
            .filter(|e| !have.contains(&e.id) && seen.insert(&e.id))
            .collect();
        self.add_rows(day, &rows)
    }

    /// Add examples the caller knows are in no part of the day yet (ingest dedups against the whole
    /// dataset before it writes) as new parts, without reading the day's ids.
    pub fn append_new(&self, day: &str, examples: &[Example]) -> Result<()> {
        self.add_rows(day, &examples.iter().collect::<Vec<_>>())
    }

    /// New parts for `rows`, then the day's small parts merged if there are too many.
    fn add_rows(&self, day: &str, rows: &[&Example]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.write_parts(day, rows)?;
        self.compact(day)
    }

    /// Write rows as new parts of a day, numbered after the last.
    fn write_parts(&self, day: &str, rows: &[&Example]) -> Result<()> {
        let dir = self.day_dir(day);
        std::fs::create_dir_all(&dir).map_err(|e| DatasetError::io("create", &dir, e))?;
        let first = self
            .parts(day)?
            .iter()
            .filter_map(|p| part_number(p))
            .max()
            .map_or(0, |n| n + 1);
        let chunks = cut_into_parts(rows);
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let workers: Vec<_> = chunks
                .iter()
                .enumerate()
                .map(|(k, chunk)| {
                    let path = dir.join(format!("part-{:05}.parquet", first + k));
                    scope.spawn(move || write_part(&path, chunk))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        sync_dir(&dir);
        sync_dir(&self.dir);
        results.into_iter().collect()
    }

    /// Merge a day's small parts once it has more than `MAX_PARTS` (every `watch` ingest adds one or
    /// two): their rows are written as new parts, then the small ones removed. A crash in between
    /// leaves rows in two parts; reads keep the first, and the next compaction drops the copies.
    fn compact(&self, day: &str) -> Result<()> {
        let parts = self.parts(day)?;
        if parts.len() <= MAX_PARTS {
            return Ok(());
        }
        let (small, large): (Vec<PathBuf>, Vec<PathBuf>) = parts
            .into_iter()
            .partition(|p| std::fs::metadata(p).is_ok_and(|m| m.len() < SMALL_PART_BYTES));
        if small.len() < 2 {
            return Ok(());
        }
        let mut have: HashSet<String> = HashSet::new();
        for part in &large {
            have.extend(read_ids(part)?);
        }
        let mut rows = Vec::new();
        for part in &small {
            let df = read_columns(part, EXAMPLE_COLUMNS)?;
            let read = from_frame(&df).map_err(|source| DatasetError::Store {
                path: part.clone(),
                source,
            })?;
            rows.extend(read.into_iter().filter(|e| have.insert(e.id.clone())));
        }
        tracing::debug!(
            day,
            parts = small.len(),
            rows = rows.len(),
            "merging small parts"
        );
        self.write_parts(day, &rows.iter().collect::<Vec<_>>())?;
        for part in &small {
            std::fs::remove_file(part).map_err(|e| DatasetError::io("remove", part, e))?;
        }
        sync_dir(&self.day_dir(day));
        Ok(())
    }

    /// Remove the examples with these ids from every day; returns how many rows left.
    pub fn retract(&self, ids: &HashSet<String>) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut removed = 0;
        for day in self.days()? {
            let dir = self.day_dir(&day);
            for part in self.parts(&day)? {
                if !read_ids(&part)?.iter().any(|id| ids.contains(id)) {
                    continue;
                }
                let df = read_columns(&part, EXAMPLE_COLUMNS)?;
                let rows = from_frame(&df).map_err(|source| DatasetError::Store {
                    path: part.clone(),
                    source,
                })?;
                let kept: Vec<&Example> = rows.iter().filter(|e| !ids.contains(&e.id)).collect();
                removed += rows.len() - kept.len();
                if kept.is_empty() {
                    std::fs::remove_file(&part)
                        .map_err(|e| DatasetError::io("remove", &part, e))?;
                } else {
                    write_part(&part, &kept)?;
                }
            }
            if self.parts(&day)?.is_empty() {
                let _ = std::fs::remove_dir(&dir);
            }
            sync_dir(&dir);
        }
        sync_dir(&self.dir);
        Ok(removed)
    }

    /// Rows, tokens and redactions by day, source, kind and split, reading only those columns.
    pub fn stats(&self) -> Result<Vec<StatsRow>> {
        let mut groups: BTreeMap<(String, String, String, String), StatsRow> = BTreeMap::new();
        for day in self.days()? {
            for path in self.parts(&day)? {
                let columns = [
                    "source",
                    "kind",
                    "split",
                    "n_tokens",
                    "redactions",
                    "private",
                ];
                let df = read_columns(&path, &columns)?;
                let mut add = || -> PolarsResult<()> {
                    let (source, kind, split) = (
                        df.column("source")?.str()?,
                        df.column("kind")?.str()?,
                        df.column("split")?.str()?,
                    );
                    let (tokens, redactions) = (
                        df.column("n_tokens")?.u32()?,
                        df.column("redactions")?.u32()?,
                    );
                    let private = df.column("private")?.bool()?;
                    for i in 0..df.height() {
                        let text = |c: &StringChunked| c.get(i).unwrap_or_default().to_string();
                        let key = (day.clone(), text(source), text(kind), text(split));
                        let row = groups.entry(key.clone()).or_insert_with(|| StatsRow {
                            day: key.0,
                            source: key.1,
                            kind: key.2,
                            split: key.3,
                            ..StatsRow::default()
                        });
                        row.examples += 1;
                        row.tokens += u64::from(tokens.get(i).unwrap_or(0));
                        row.redactions += u64::from(redactions.get(i).unwrap_or(0));
                        row.private += u64::from(private.get(i).unwrap_or(false));
                    }
                    Ok(())
                };
                add().map_err(|source| DatasetError::Store { path, source })?;
            }
        }
        Ok(groups.into_values().collect())
    }

    /// Ids present, with the day each is in (reading only the id column).
    pub fn ids(&self) -> Result<BTreeMap<String, String>> {
        let mut ids = BTreeMap::new();
        for day in self.days()? {
            for path in self.parts(&day)? {
                for id in read_ids(&path)? {
                    ids.insert(id, day.clone());
                }
            }
        }
        Ok(ids)
    }
}

/// Write `examples` to the part file `path` (replacing it if there): a temporary file beside it,
/// fsynced, renamed into place. The caller syncs the directory.
fn write_part(path: &Path, examples: &[&Example]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("part");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut df = to_frame(examples).map_err(|source| DatasetError::Store {
        path: path.to_path_buf(),
        source,
    })?;
    let file = std::fs::File::create(&tmp).map_err(|e| DatasetError::io("create", &tmp, e))?;
    // One part a thread: polars' own column parallelism would only contend with the other parts.
    ParquetWriter::new(&file)
        .with_compression(ParquetCompression::Lz4Raw)
        .set_parallel(false)
        .finish(&mut df)
        .map_err(|source| DatasetError::Store {
            path: tmp.clone(),
            source,
        })?;
    file.sync_all()
        .map_err(|e| DatasetError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DatasetError::io("rename into place", path, e))
}

/// Cut an append's rows into parts: about one per core, encoded side by side (more when a part would
/// pass `PART_BYTES` of text, one for a small append), of equal row counts (encoding cost goes with
/// rows more than bytes). FIM rows go to parts of their own: each repeats its code row's text, and a
/// text column with repeats makes polars dictionary-encode it, a hash of every text (half the write
/// time of a mixed part).
fn cut_into_parts<'a>(rows: &'a [&'a Example]) -> Vec<Vec<&'a Example>> {
    let (plain, fim): (Vec<&Example>, Vec<&Example>) =
        rows.iter().partition(|e| e.kind != Kind::Fim);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = Vec::new();
    for group in [plain, fim] {
        if group.is_empty() {
            continue;
        }
        let bytes: usize = group.iter().map(|e| e.text.len() + e.context.len()).sum();
        let share = (cores * group.len()).div_ceil(rows.len());
        let count = bytes
            .div_ceil(PART_BYTES)
            .max(share)
            .min(group.len().div_ceil(MIN_PART_ROWS))
            .max(1);
        out.extend(
            group
                .chunks(group.len().div_ceil(count))
                .map(<[&Example]>::to_vec),
        );
    }
    out
}

/// The number of a `part-NNNNN.parquet` file.
fn part_number(path: &Path) -> Option<usize> {
    path.file_name()?
        .to_str()?
        .strip_prefix("part-")?
        .strip_suffix(".parquet")?
        .parse()
        .ok()
}

/// The ids in one part file (reading only that column).
fn read_ids(path: &Path) -> Result<Vec<String>> {
    let df = read_columns(path, &["id"])?;
    let column = df
        .column("id")
        .and_then(|c| c.str().cloned())
        .map_err(|source| DatasetError::Store {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(column.iter().flatten().map(str::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::example::{content_id, Split};

    fn example(text: &str, day: &str) -> Example {
        let id = content_id(text);
        Example {
            split: Split::of(&id, 0.05),
            id,
            day: day.into(),
            source: "notes".into(),
            path: "a.md".into(),
            kind: Kind::Note,
            context: "A > B".into(),
            text: text.into(),
            n_tokens: 3,
            redactions: 1,
            private: true,
            fim: None,
            minhash: Signature::of(text).map(Box::new),
        }
    }

    #[test]
    fn days_round_trip_append_retract_and_stats() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = example("alpha", "2026-01-01");
        let b = example("beta", "2026-01-02");
        store
            .append("2026-01-01", std::slice::from_ref(&a))
            .unwrap();
        store.append("2026-01-02", &[b.clone(), b.clone()]).unwrap();
        assert_eq!(store.days().unwrap(), ["2026-01-01", "2026-01-02"]);
        assert_eq!(store.read_all().unwrap(), vec![a.clone(), b.clone()]);
        let stats = store.stats().unwrap();
        assert_eq!(stats.len(), 2);
        assert_eq!(
            (stats[0].day.as_str(), stats[0].examples),
            ("2026-01-01", 1)
        );
        assert_eq!(stats[1].tokens, u64::from(b.n_tokens));
        let gone = store.retract(&HashSet::from([a.id.clone()])).unwrap();
        assert_eq!(gone, 1);
        assert_eq!(store.days().unwrap(), ["2026-01-02"]);
    }

    #[test]
    fn appends_add_parts_and_retraction_rewrites_only_the_parts_it_touches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let day = "2026-01-03";
        let first: Vec<Example> = (0..2500).map(|i| example(&format!("a{i}"), day)).collect();
        store.append(day, &first).unwrap();
        let after_first = store.parts(day).unwrap();
        assert!(!after_first.is_empty());
        // A later append the same day writes new parts after the old ones and leaves those alone.
        let mtimes: Vec<_> = after_first
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().modified().unwrap())
            .collect();
        let second = vec![example("late", day), first[0].clone()];
        store.append(day, &second).unwrap();
        let parts = store.parts(day).unwrap();
        assert_eq!(parts.len(), after_first.len() + 1);
        for (p, t) in after_first.iter().zip(&mtimes) {
            assert_eq!(std::fs::metadata(p).unwrap().modified().unwrap(), *t);
        }
        let read = store.read_day(day).unwrap();
        assert_eq!(read.len(), 2501, "the repeated id is not added twice");
        assert_eq!(read[..2500], first[..]);
        assert_eq!(read[2500].text, "late");
        // Retracting the late example removes its part; the others stay as they were.
        let gone = store
            .retract(&HashSet::from([read[2500].id.clone()]))
            .unwrap();
        assert_eq!(gone, 1);
        assert_eq!(store.parts(day).unwrap(), after_first);
        // A day written before parts (one data.parquet) reads as its first part.
        let legacy = store.day_dir("2026-01-04").join("data.parquet");
        std::fs::create_dir_all(legacy.parent().unwrap()).unwrap();
        write_part(&legacy, &[&example("old", "2026-01-04")]).unwrap();
        store
            .append("2026-01-04", &[example("new", "2026-01-04")])
            .unwrap();
        let texts: Vec<String> = store
            .read_day("2026-01-04")
            .unwrap()
            .into_iter()
            .map(|e| e.text)
            .collect();
        assert_eq!(texts, ["old", "new"]);
    }

    #[test]
    fn many_small_appends_are_merged_and_a_row_left_twice_reads_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let day = "2026-01-05";
        let mut all = Vec::new();
        for batch in 0..30 {
            let rows: Vec<Example> = (0..3)
                .map(|i| example(&format!("b{batch} r{i}"), day))
                .collect();
            store.append_new(day, &rows).unwrap();
            all.extend(rows);
        }
        let parts = store.parts(day).unwrap();
        assert!(parts.len() <= MAX_PARTS, "{} parts", parts.len());
        let ids = |rows: &[Example]| {
            let mut v: Vec<String> = rows.iter().map(|e| e.id.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(ids(&store.read_day(day).unwrap()), ids(&all));
        // What a compaction cut short by a crash leaves: the same rows in a second part.
        let again: Vec<&Example> = all[..5].iter().collect();
        write_part(&store.day_dir(day).join("part-99999.parquet"), &again).unwrap();
        assert_eq!(ids(&store.read_day(day).unwrap()), ids(&all));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("schema.json"), r#"{"version": 7}"#).unwrap();
        let e = Store::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("newer") && e.contains('7'), "{e}");
    }
}
