//! Scores kept between runs. Tonight's incumbent was last night's candidate, and the bare base is
//! the same every night, so most of an eval's work was already done: results are kept per contender
//! (a key naming the base, the adapter weights and the scoring settings) and per item (a hash of its
//! id, group and task), in `$PAI_HOME/evals/cache/<key>.jsonl`, and only items never scored by that
//! contender are scored. Only exact reuse: packed scoring, whose numbers depend on the row an item
//! shares, is never cached.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{EvalError, Result};
use crate::item::{Item, ItemResult, Task};

pub struct ScoreCache {
    dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    item: String,
    result: ItemResult,
}

impl ScoreCache {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, contender: &str) -> PathBuf {
        self.dir.join(format!("{contender}.jsonl"))
    }

    /// The results kept for `contender`, by item key (a damaged line is skipped: it is scored again).
    pub fn load(&self, contender: &str) -> HashMap<String, ItemResult> {
        let Ok(text) = std::fs::read_to_string(self.path(contender)) else {
            return HashMap::new();
        };
        text.lines()
            .filter_map(|l| serde_json::from_str::<Line>(l).ok())
            .map(|l| (l.item, l.result))
            .collect()
    }

    /// Keep new results for `contender`.
    pub fn append(&self, contender: &str, results: &[(String, ItemResult)]) -> Result<()> {
        if results.is_empty() {
            return Ok(());
        }
        let io = |action, path: &Path, e| EvalError::Io {
            action,
            path: path.into(),
            source: e,
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| io("create", &self.dir, e))?;
        let path = self.path(contender);
        let mut out = Vec::new();
        for (item, result) in results {
            let line = Line {
                item: item.clone(),
                result: result.clone(),
            };
            out.extend(serde_json::to_vec(&line).unwrap_or_default());
            out.push(b'\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io("open", &path, e))?;
        f.write_all(&out).map_err(|e| io("append to", &path, e))
    }
}

/// sha256 hex of the parts, each length-prefixed.
pub fn key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// An item's key: everything that decides its score.
pub fn item_key(item: &Item) -> String {
    let task = match &item.task {
        Task::Continuation { context, text } => format!("continuation\0{context}\0{text}"),
        Task::Choice {
            context,
            choices,
            answer,
        } => format!("choice\0{context}\0{}\0{answer}", choices.join("\0")),
        Task::Generate {
            prompt,
            check,
            max_tokens,
        } => format!("generate\0{prompt}\0{check:?}\0{max_tokens}"),
    };
    key(&[&item.id, &item.group, &task])
}
