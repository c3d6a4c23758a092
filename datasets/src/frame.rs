//! Dataset rows as polars frames and back, and column-projected parquet reads: the schema of a
//! part file in one place (`store.rs` decides which files hold what).

use std::path::Path;

use polars::prelude::*;

use crate::error::{DatasetError, Result};
use crate::example::{Example, Kind, Split};
use crate::fim::{FimMode, FimSpan};
use crate::minhash::Signature;

/// The column of stored MinHash signatures, named for the word and shingle hashing that made them (schema
/// version 5), so signatures hashed otherwise (the columns `minhash_oph` of version 3 and
/// `minhash_oph16` of version 4) are never compared with new ones: their texts are signed again.
pub(crate) const MINHASH_COLUMN: &str = "minhash_lane16";

/// The stored signatures of a frame read with `MINHASH_COLUMN` asked for, `None` for a file from
/// before it.
pub(crate) fn stored_signatures(df: &DataFrame) -> PolarsResult<Option<BinaryChunked>> {
    match df.column(MINHASH_COLUMN) {
        Ok(c) => Ok(Some(c.binary()?.clone())),
        Err(_) => Ok(None),
    }
}

/// The columns an `Example` is read from.
pub(crate) const EXAMPLE_COLUMNS: &[&str] = &[
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
pub(crate) fn read_columns(path: &Path, wanted: &[&str]) -> Result<DataFrame> {
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

pub(crate) fn to_frame(examples: &[&Example]) -> PolarsResult<DataFrame> {
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

pub(crate) fn from_frame(df: &DataFrame) -> PolarsResult<Vec<Example>> {
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
    let minhash = stored_signatures(df)?;
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
                .as_ref()
                .and_then(|m| m.get(i))
                .and_then(Signature::from_bytes)
                .map(Box::new),
        });
    }
    Ok(out)
}
