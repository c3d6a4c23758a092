//! The dataset on disk: one parquet file per day, `dataset/day=YYYY-MM-DD/data.parquet`, through polars.
//!
//! Every write goes to a temporary file that is fsynced and renamed into place, so a crash leaves the
//! previous state whole. `dataset/schema.json` holds the schema version; a dataset written by a newer
//! pai is refused rather than misread. Retraction (a deleted or newly excluded note leaving the
//! dataset) rewrites the day files that hold the retracted ids. Pages are LZ4-compressed: about twice
//! as fast to write as zstd's default on text (ingest writes every byte it reads), read by polars,
//! pyarrow and every parquet reader since format 2.9.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::error::{DatasetError, Result};
use crate::example::{Example, Kind, Split};
use crate::fim::{FimMode, FimSpan};
use crate::journal::{sync_dir, write_atomic};
use crate::minhash::Signature;

/// 1: the first; 2: `fim_mode`/`fim_start`/`fim_end` and `minhash` (version 1 files are read as
/// having no FIM examples); 3: `minhash_oph`, one-permutation signatures (`minhash::Signature`). A file
/// without the current signature column has its signatures computed from the text when asked for.
pub const SCHEMA_VERSION: u32 = 3;
/// The column of stored MinHash signatures; named for the scheme, so older ones are never compared.
const MINHASH_COLUMN: &str = "minhash_oph";
const DATA_FILE: &str = "data.parquet";

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

    fn day_file(&self, day: &str) -> PathBuf {
        self.dir.join(format!("day={day}")).join(DATA_FILE)
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
                if entry.path().join(DATA_FILE).is_file() {
                    days.push(day.to_string());
                }
            }
        }
        days.sort();
        Ok(days)
    }

    /// The examples of one day (none if the day has no partition).
    pub fn read_day(&self, day: &str) -> Result<Vec<Example>> {
        let path = self.day_file(day);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let df = read_columns(&path, EXAMPLE_COLUMNS)?;
        from_frame(&df).map_err(|source| DatasetError::Store { path, source })
    }

    /// The MinHash signature of every stored example that has one, except those in `skip`, with its id.
    /// (Files from before schema version 3 have none stored: computed from their text.)
    pub fn signatures(&self, skip: &HashSet<String>) -> Result<Vec<(String, Signature)>> {
        let mut out = Vec::new();
        for day in self.days()? {
            let path = self.day_file(&day);
            let mut df = read_columns(&path, &["id", "kind", MINHASH_COLUMN])?;
            if df.column(MINHASH_COLUMN).is_err() {
                df = read_columns(&path, &["id", "kind", "text"])?;
            }
            let mut collect = || -> PolarsResult<()> {
                let ids = df.column("id")?.str()?;
                let kinds = df.column("kind")?.str()?;
                let stored = match df.column(MINHASH_COLUMN) {
                    Ok(c) => Some(c.binary()?.clone()),
                    Err(_) => None,
                };
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

    /// The texts of the private examples (for the privacy index).
    pub fn private_texts(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for day in self.days()? {
            let path = self.day_file(&day);
            let df = read_columns(&path, &["text", "private"])?;
            let mut collect = || -> PolarsResult<()> {
                let texts = df.column("text")?.str()?;
                let private = df.column("private")?.bool()?;
                for i in 0..df.height() {
                    if private.get(i) == Some(true) {
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

    /// Replace one day's partition with `examples` (removing it when empty), atomically.
    pub fn write_day(&self, day: &str, examples: &[Example]) -> Result<()> {
        self.write_rows(day, &examples.iter().collect::<Vec<_>>())
    }

    fn write_rows(&self, day: &str, examples: &[&Example]) -> Result<()> {
        let path = self.day_file(day);
        if examples.is_empty() {
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| DatasetError::io("remove", &path, e))?;
                if let Some(dir) = path.parent() {
                    let _ = std::fs::remove_dir(dir);
                    sync_dir(&self.dir);
                }
            }
            return Ok(());
        }
        let mut df = to_frame(examples).map_err(|source| DatasetError::Store {
            path: path.clone(),
            source,
        })?;
        let dir = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(dir).map_err(|e| DatasetError::io("create", dir, e))?;
        let tmp = dir.join(format!(".{DATA_FILE}.tmp-{}", std::process::id()));
        let file = std::fs::File::create(&tmp).map_err(|e| DatasetError::io("create", &tmp, e))?;
        ParquetWriter::new(&file)
            .with_compression(ParquetCompression::Lz4Raw)
            .finish(&mut df)
            .map_err(|source| DatasetError::Store {
                path: tmp.clone(),
                source,
            })?;
        file.sync_all()
            .map_err(|e| DatasetError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| DatasetError::io("rename into place", &path, e))?;
        sync_dir(dir);
        Ok(())
    }

    /// Add examples to a day's partition (ids already in it are not added twice).
    pub fn append(&self, day: &str, examples: &[Example]) -> Result<()> {
        if examples.is_empty() {
            return Ok(());
        }
        let old = self.read_day(day)?;
        let mut have: HashSet<&str> = old.iter().map(|e| e.id.as_str()).collect();
        let rows: Vec<&Example> = old
            .iter()
            .chain(examples.iter().filter(|e| have.insert(&e.id)))
            .collect();
        self.write_rows(day, &rows)
    }

    /// Remove the examples with these ids from every day; returns how many rows left.
    pub fn retract(&self, ids: &HashSet<String>) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut removed = 0;
        for day in self.days()? {
            let rows = self.read_day(&day)?;
            let kept: Vec<&Example> = rows.iter().filter(|e| !ids.contains(&e.id)).collect();
            if kept.len() != rows.len() {
                removed += rows.len() - kept.len();
                self.write_rows(&day, &kept)?;
            }
        }
        Ok(removed)
    }

    /// Rows, tokens and redactions by day, source, kind and split, reading only those columns.
    pub fn stats(&self) -> Result<Vec<StatsRow>> {
        let mut groups: BTreeMap<(String, String, String, String), StatsRow> = BTreeMap::new();
        for day in self.days()? {
            let path = self.day_file(&day);
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
        Ok(groups.into_values().collect())
    }

    /// Ids present, with the day each is in (reading only the id column).
    pub fn ids(&self) -> Result<BTreeMap<String, String>> {
        let mut ids = BTreeMap::new();
        for day in self.days()? {
            let path = self.day_file(&day);
            let df = read_columns(&path, &["id"])?;
            let column = df
                .column("id")
                .and_then(|c| c.str().cloned())
                .map_err(|source| DatasetError::Store { path, source })?;
            for id in column.iter().flatten() {
                ids.insert(id.to_string(), day.clone());
            }
        }
        Ok(ids)
    }
}

/// The columns an `Example` is read from.
const EXAMPLE_COLUMNS: &[&str] = &[
    "id",
    "day",
    "source",
    "path",
    "kind",
    "context",
    "text",
    "n_tokens",
    "split",
    "redactions",
    "private",
    "fim_mode",
    "fim_start",
    "fim_end",
    MINHASH_COLUMN,
];

/// Read those of `wanted` that the file has (files of older schema versions lack the newer columns).
fn read_columns(path: &Path, wanted: &[&str]) -> Result<DataFrame> {
    let file = std::fs::File::open(path).map_err(|e| DatasetError::io("open", path, e))?;
    let read = || -> PolarsResult<DataFrame> {
        let mut reader = ParquetReader::new(file);
        let schema = reader.schema()?;
        let present = wanted
            .iter()
            .filter(|c| schema.contains(c))
            .map(|c| c.to_string())
            .collect();
        reader.with_columns(Some(present)).finish()
    };
    read().map_err(|source| DatasetError::Store {
        path: path.to_path_buf(),
        source,
    })
}

fn to_frame(examples: &[&Example]) -> PolarsResult<DataFrame> {
    let s = |name: &str, f: &dyn Fn(&Example) -> &str| -> Column {
        Column::new(
            name.into(),
            examples.iter().map(|e| f(e)).collect::<Vec<&str>>(),
        )
    };
    DataFrame::new_infer_height(vec![
        s("id", &|e| &e.id),
        s("day", &|e| &e.day),
        s("source", &|e| &e.source),
        s("path", &|e| &e.path),
        s("kind", &|e| e.kind.as_str()),
        s("context", &|e| &e.context),
        s("text", &|e| &e.text),
        Column::new(
            "n_tokens".into(),
            examples.iter().map(|e| e.n_tokens).collect::<Vec<u32>>(),
        ),
        s("split", &|e| e.split.as_str()),
        Column::new(
            "redactions".into(),
            examples.iter().map(|e| e.redactions).collect::<Vec<u32>>(),
        ),
        Column::new(
            "private".into(),
            examples.iter().map(|e| e.private).collect::<Vec<bool>>(),
        ),
        s("fim_mode", &|e| e.fim.map_or("", |f| f.mode.as_str())),
        Column::new(
            "fim_start".into(),
            examples
                .iter()
                .map(|e| e.fim.map_or(0, |f| f.start))
                .collect::<Vec<u32>>(),
        ),
        Column::new(
            "fim_end".into(),
            examples
                .iter()
                .map(|e| e.fim.map_or(0, |f| f.end))
                .collect::<Vec<u32>>(),
        ),
        Column::new(MINHASH_COLUMN.into(), signatures(examples)),
    ])
}

/// The stored MinHash signature of each example (empty for FIM examples, which repeat a code example
/// by design, and for texts too short to shingle).
fn signatures(examples: &[&Example]) -> Vec<Vec<u8>> {
    examples
        .iter()
        .map(|e| match e.kind {
            Kind::Fim => Vec::new(),
            _ => e
                .minhash
                .as_deref()
                .map(Signature::to_bytes)
                .or_else(|| Signature::of(&e.text).map(|s| s.to_bytes()))
                .unwrap_or_default(),
        })
        .collect()
}

fn from_frame(df: &DataFrame) -> PolarsResult<Vec<Example>> {
    let s = |n: &str| -> PolarsResult<Vec<String>> {
        Ok(df
            .column(n)?
            .str()?
            .iter()
            .map(|v| v.unwrap_or_default().to_string())
            .collect())
    };
    let u = |n: &str| -> PolarsResult<Vec<u32>> {
        Ok(df
            .column(n)?
            .u32()?
            .iter()
            .map(|v| v.unwrap_or(0))
            .collect())
    };
    let bad = |what: &str, v: &str| {
        PolarsError::ComputeError(format!("unknown {what} {v:?} in the dataset").into())
    };
    let (id, day, source, path) = (s("id")?, s("day")?, s("source")?, s("path")?);
    let (kind, context, text, split) = (s("kind")?, s("context")?, s("text")?, s("split")?);
    let (n_tokens, redactions) = (u("n_tokens")?, u("redactions")?);
    let private: Vec<bool> = df
        .column("private")?
        .bool()?
        .iter()
        .map(|v| v.unwrap_or(false))
        .collect();
    let fim_mode = df.column("fim_mode").ok().map(|c| c.str()).transpose()?;
    let fim_start = df.column("fim_start").ok().map(|c| c.u32()).transpose()?;
    let fim_end = df.column("fim_end").ok().map(|c| c.u32()).transpose()?;
    let minhash = df
        .column(MINHASH_COLUMN)
        .ok()
        .map(|c| c.binary())
        .transpose()?;
    let mut out = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let fim = match (fim_mode, fim_start, fim_end) {
            (Some(m), Some(s), Some(e)) => match m.get(i).unwrap_or_default() {
                "" => None,
                mode => Some(FimSpan {
                    mode: FimMode::parse(mode).ok_or_else(|| bad("FIM mode", mode))?,
                    start: s.get(i).unwrap_or(0),
                    end: e.get(i).unwrap_or(0),
                }),
            },
            _ => None,
        };
        out.push(Example {
            id: id[i].clone(),
            day: day[i].clone(),
            source: source[i].clone(),
            path: path[i].clone(),
            kind: Kind::parse(&kind[i]).ok_or_else(|| bad("kind", &kind[i]))?,
            context: context[i].clone(),
            text: text[i].clone(),
            n_tokens: n_tokens[i],
            split: match split[i].as_str() {
                "train" => Split::Train,
                "holdout" => Split::Holdout,
                other => return Err(bad("split", other)),
            },
            redactions: redactions[i],
            private: private[i],
            fim,
            minhash: minhash
                .and_then(|m| m.get(i))
                .and_then(Signature::from_bytes)
                .map(Box::new),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::example::content_id;

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
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("schema.json"), r#"{"version": 7}"#).unwrap();
        let e = Store::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("newer") && e.contains('7'), "{e}");
    }
}
