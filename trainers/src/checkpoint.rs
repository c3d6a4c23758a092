//! Checkpoints: everything a run needs to continue to the same result as if it had never stopped —
//! the LoRA variables, AdamW's moments and step count, the data cursor, the early-stopping state and the
//! best adapter so far. A checkpoint is a directory written beside the live one and swapped in by
//! rename, so a crash mid-write leaves the previous checkpoint whole.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::Cursor;
use crate::error::{Result, TrainError};
use crate::trainer::RetentionLosses;

/// The small part of a checkpoint (`state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    pub cursor: Cursor,
    /// Loss-counted tokens trained on so far.
    pub tokens: usize,
    pub elapsed_s: f64,
    pub best_holdout: Option<f64>,
    /// The retention losses of the best checkpoint, by guard (empty when the job has none).
    #[serde(default)]
    pub best_retention_losses: RetentionLosses,
    pub best_step: usize,
    pub evals_without_improvement: usize,
    pub config: TrainConfig,
}

/// What a checkpoint holds.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub state: RunState,
    /// LoRA variables by PEFT name.
    pub params: HashMap<String, Tensor>,
    /// AdamW moments by PEFT name (`m.` and `v.` prefixes) and its update count.
    pub moments: HashMap<String, Tensor>,
    pub adam_t: usize,
    /// The variables at the best holdout loss so far.
    pub best: HashMap<String, Tensor>,
}

const LIVE: &str = "checkpoint";
const NEXT: &str = "checkpoint.next";
const OLD: &str = "checkpoint.old";

fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path)?;
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(path, e))
}

impl Checkpoint {
    /// Write into `run_dir/checkpoint/`, atomically replacing the previous one.
    pub fn save(&self, run_dir: &Path) -> Result<()> {
        let next = run_dir.join(NEXT);
        if next.exists() {
            fs::remove_dir_all(&next).map_err(|e| TrainError::io(&next, e))?;
        }
        fs::create_dir_all(&next).map_err(|e| TrainError::io(&next, e))?;
        save_tensors(&self.params, &next.join("adapter.safetensors"))?;
        let mut moments = self.moments.clone();
        moments.insert(
            "adam_t".into(),
            Tensor::new(&[self.adam_t as u32], &Device::Cpu)?,
        );
        save_tensors(&moments, &next.join("optimizer.safetensors"))?;
        save_tensors(&self.best, &next.join("best.safetensors"))?;
        let state_path = next.join("state.json");
        let text =
            serde_json::to_string_pretty(&self.state).map_err(|source| TrainError::Json {
                path: state_path.clone(),
                source,
            })?;
        fs::write(&state_path, text).map_err(|e| TrainError::io(&state_path, e))?;
        fs::File::open(&state_path)
            .and_then(|f| f.sync_all())
            .map_err(|e| TrainError::io(&state_path, e))?;

        let (live, old) = (run_dir.join(LIVE), run_dir.join(OLD));
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        if live.exists() {
            fs::rename(&live, &old).map_err(|e| TrainError::io(&live, e))?;
        }
        fs::rename(&next, &live).map_err(|e| TrainError::io(&next, e))?;
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        if let Ok(d) = fs::File::open(run_dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The newest whole checkpoint of a run, if it has one.
    pub fn load(run_dir: &Path, device: &Device) -> Result<Option<Self>> {
        let dir: PathBuf = [LIVE, OLD]
            .iter()
            .map(|d| run_dir.join(d))
            .find(|d| d.join("state.json").is_file())
            .unwrap_or_else(|| run_dir.join(LIVE));
        let state_path = dir.join("state.json");
        if !state_path.is_file() {
            return Ok(None);
        }
        let text = fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
        let state: RunState = serde_json::from_str(&text).map_err(|source| TrainError::Json {
            path: state_path.clone(),
            source,
        })?;
        let load = |name: &str| -> Result<HashMap<String, Tensor>> {
            let path = dir.join(name);
            candle_core::safetensors::load(&path, device).map_err(|e| TrainError::Checkpoint {
                path: path.clone(),
                reason: e.to_string(),
            })
        };
        let params = load("adapter.safetensors")?;
        let mut moments = load("optimizer.safetensors")?;
        let adam_t = moments
            .remove("adam_t")
            .and_then(|t| t.to_vec1::<u32>().ok())
            .and_then(|v| v.first().copied())
            .ok_or_else(|| TrainError::Checkpoint {
                path: dir.join("optimizer.safetensors"),
                reason: "has no adam_t".into(),
            })? as usize;
        let best = load("best.safetensors")?;
        Ok(Some(Self {
            state,
            params,
            moments,
            adam_t,
            best,
        }))
    }
}
