//! Packed training batches: each row holds several documents back to back, as trainers pack them to
//! waste no compute on padding. Positions restart at every document and attention never crosses a
//! document boundary (a block-diagonal causal mask), so a packed document is computed exactly as it
//! would be alone.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::rope::Rope;

/// One row of a packed batch: token ids and the lengths of the documents they form, in order
/// (`doc_lens` sums to `ids.len()`; padding is a document of its own).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackedRow {
    pub ids: Vec<u32>,
    pub doc_lens: Vec<usize>,
}

/// A packed batch ready for [`crate::Model::forward_packed`]: ids [rows, seq], the RoPE angles of every
/// token's position inside its document, and the additive mask [rows, 1, 1, seq, seq].
#[derive(Debug, Clone)]
pub struct Packed {
    pub ids: Tensor,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) mask: Tensor,
}

impl Packed {
    /// The cos and sin of every token's position in its document, [rows, 1, seq, head_dim / 2] (for
    /// trainers that rotate q and k themselves).
    pub fn rope_tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Build the batch; every row must have the same length, and no document may be longer than
    /// `max_positions` (the model's context).
    pub(crate) fn new(
        rows: &[PackedRow],
        rope: &Rope,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let bad = |reason: String| ModelError::InvalidRequest {
            field: "packed batch",
            reason,
        };
        let seq = rows.first().map(|r| r.ids.len()).unwrap_or(0);
        if seq == 0 {
            return Err(bad("has no tokens".into()));
        }
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut positions = Vec::with_capacity(rows.len() * seq);
        let mut mask = vec![f32::NEG_INFINITY; rows.len() * seq * seq];
        for (r, row) in rows.iter().enumerate() {
            if row.ids.len() != seq {
                return Err(bad(format!(
                    "row {r} has {} tokens, row 0 has {seq}",
                    row.ids.len()
                )));
            }
            if row.doc_lens.iter().sum::<usize>() != seq {
                return Err(bad(format!(
                    "row {r}: document lengths {:?} do not sum to its {seq} tokens",
                    row.doc_lens
                )));
            }
            ids.extend_from_slice(&row.ids);
            let mut start = 0;
            for &len in &row.doc_lens {
                if len > max_positions {
                    return Err(ModelError::ContextOverflow {
                        max: max_positions,
                        requested: len,
                        prompt: len,
                        completion: 0,
                    });
                }
                for i in 0..len {
                    positions.push(i as u32);
                    // Query start + i sees keys start ..= start + i.
                    let q = r * seq * seq + (start + i) * seq;
                    mask[q + start..=q + start + i].fill(0.0);
                }
                start += len;
            }
        }
        let b = rows.len();
        let positions = Tensor::from_vec(positions, b * seq, device)?;
        let (cos, sin) = rope.tables_at(&positions)?;
        let half = cos.dim(1)?;
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, seq), device)?,
            cos: cos.reshape((b, 1, seq, half))?,
            sin: sin.reshape((b, 1, seq, half))?,
            mask: Tensor::from_vec(mask, (b, 1, 1, seq, seq), device)?.to_dtype(DType::F32)?,
        })
    }
}
