//! One decode step for many sequences at once: what continuous batching runs. Each row brings its
//! next token, its own KV cache and its own adapters. The projections run once over all rows, so every
//! weight is read once per step instead of once per sequence (what makes a step of N rows much cheaper
//! than N steps); RoPE, the cache append and attention run per row, at the row's own position over
//! its own cache; and each distinct adapter stack adds its LoRA deltas to its own rows only (as
//! S-LoRA and Punica do), so requests for different adapters share a step.

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::lora::AdapterStack;

/// One sequence's part in a batched decode step.
pub struct BatchRow<'r> {
    /// The token to run (the last one sampled).
    pub token: u32,
    pub cache: &'r mut KvCache,
    pub adapters: AdapterStack<'r>,
}

/// The rows of a step grouped by the adapter stack they use.
pub struct RowGroups<'a> {
    groups: Vec<RowGroup<'a>>,
}

/// Rows that use the same adapters.
pub struct RowGroup<'a> {
    pub adapters: AdapterStack<'a>,
    /// Row indices, and the same as a u32 tensor on the rows' device.
    pub rows: Vec<usize>,
    pub index: Tensor,
}

impl<'a> RowGroups<'a> {
    /// Rows with the same adapters (the same `Adapter`s in the same order) form one group.
    pub fn of(rows: &[BatchRow<'a>], device: &Device) -> Result<Self> {
        let mut members: Vec<(AdapterStack<'a>, Vec<u32>)> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            match members.iter_mut().find(|(a, _)| a.same_as(&row.adapters)) {
                Some((_, m)) => m.push(i as u32),
                None => members.push((row.adapters, vec![i as u32])),
            }
        }
        if rows.is_empty() {
            return Err(ModelError::InvalidRequest {
                field: "rows",
                reason: "a batched step needs at least one row".into(),
            });
        }
        let groups = members
            .into_iter()
            .map(|(adapters, m)| {
                Ok(RowGroup {
                    adapters,
                    index: Tensor::new(m.as_slice(), device)?,
                    rows: m.into_iter().map(|i| i as usize).collect(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { groups })
    }

    /// The one adapter stack every row uses, if they all use the same.
    pub fn single(&self) -> Option<&AdapterStack<'a>> {
        match self.groups.as_slice() {
            [g] => Some(&g.adapters),
            _ => None,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &RowGroup<'a>> {
        self.groups.iter()
    }
}
