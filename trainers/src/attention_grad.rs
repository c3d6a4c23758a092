//! Causal grouped-query attention over packed documents, forward and backward, for pai's own training
//! step (`block_grad.rs`). Each (document, key/value head) is one task: its query heads attend only
//! inside the document, so the block-diagonal mask is never built and no work is spent across
//! document boundaries. The forward keeps one log-sum-exp per query and head; the backward rebuilds
//! the probabilities from it (as FlashAttention does) instead of keeping [heads, seq, seq] of them.

use rayon::prelude::*;

use pai_model::kernels::exp_shifted;
use pai_model::kernels::gemm::{matmul, Out, View};

/// The shape of the attention: q [tokens, heads · head_dim], k and v [tokens, kv_heads · head_dim].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// A document: its first token's index in the batch and its length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Doc {
    pub start: usize,
    pub len: usize,
}

/// Tasks: every (document, key/value head).
fn tasks(docs: &[Doc], kv_heads: usize) -> Vec<(Doc, usize)> {
    docs.iter()
        .flat_map(|&d| (0..kv_heads).map(move |g| (d, g)))
        .collect()
}

/// View of head `head` of a [tokens, width] matrix over one document's rows.
fn head_rows(m: &[f32], doc: Doc, width: usize, head: usize, head_dim: usize) -> View<'_> {
    View::rows(
        &m[doc.start * width + head * head_dim..],
        doc.len,
        head_dim,
        width,
    )
}

/// Query rows per block: a block's queries see keys up to its last row only, so the products skip
/// the masked upper triangle (about half of the work) a block at a time.
const QUERY_BLOCK: usize = 64;

/// The query blocks of a document of `n` tokens: (first row, end row).
fn query_blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(QUERY_BLOCK)
        .map(move |r0| (r0, (r0 + QUERY_BLOCK).min(n)))
}

/// Rows `r0..r1` of one head's causal probabilities over keys `0..r1`, into `p` [r1 − r0, r1]
/// (rows `r1` apart; zero right of the diagonal). With `known` the rows' log-sum-exps in `lse`
/// are used (backward); otherwise they are computed and written there.
#[allow(clippy::too_many_arguments)]
fn probabilities(
    p: &mut [f32],
    q: View,
    k: View,
    (r0, r1): (usize, usize),
    scale: f32,
    lse: &mut [f32],
    known: bool,
) {
    let hd = q.cols;
    let qb = View::rows(&q.data[r0 * q.row_stride..], r1 - r0, hd, q.row_stride);
    let kb = View::rows(k.data, r1, hd, k.row_stride);
    matmul(p, r1, qb, kb.t(), Out::Set(scale), false);
    for (i, row) in (r0..r1).zip(p.chunks_mut(r1)) {
        let (seen, future) = row.split_at_mut(i + 1);
        future.fill(0.0);
        if known {
            exp_shifted(seen, lse[i]);
        } else {
            let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum = exp_shifted(seen, max);
            let inv = 1.0 / sum;
            for z in seen.iter_mut() {
                *z *= inv;
            }
            lse[i] = max + sum.ln();
        }
    }
}

/// One task's forward results: the output rows of its query heads [group, len, head_dim] and their
/// log-sum-exps [group, len].
struct Forward {
    out: Vec<f32>,
    lse: Vec<f32>,
}

/// softmax(scale · QKᵀ, causal, per document)·V → out [tokens, heads · head_dim], and the log-sum-exp
/// of every (head, token), [heads, tokens].
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    docs: &[Doc],
    shape: Heads,
) -> (Vec<f32>, Vec<f32>) {
    let tokens = q.len() / shape.q_width();
    let (hd, group) = (shape.head_dim, shape.group());
    let tasks = tasks(docs, shape.kv_heads);
    let results: Vec<Forward> = tasks
        .par_iter()
        .map(|&(doc, g)| {
            let n = doc.len;
            let mut p = vec![0f32; QUERY_BLOCK.min(n) * n];
            let mut out = vec![0f32; group * n * hd];
            let mut lse = vec![0f32; group * n];
            let kh = head_rows(k, doc, shape.kv_width(), g, hd);
            let vh = head_rows(v, doc, shape.kv_width(), g, hd);
            for j in 0..group {
                let qh = head_rows(q, doc, shape.q_width(), g * group + j, hd);
                let lse_j = &mut lse[j * n..(j + 1) * n];
                for (r0, r1) in query_blocks(n) {
                    probabilities(&mut p, qh, kh, (r0, r1), shape.scale(), lse_j, false);
                    let pb = View::rows(&p, r1 - r0, r1, r1);
                    let vb = View::rows(vh.data, r1, hd, vh.row_stride);
                    let o = &mut out[(j * n + r0) * hd..(j * n + r1) * hd];
                    matmul(o, hd, pb, vb, Out::Set(1.0), false);
                }
            }
            Forward { out, lse }
        })
        .collect();
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; shape.heads * tokens];
    for (&(doc, g), r) in tasks.iter().zip(&results) {
        let n = doc.len;
        for j in 0..group {
            let h = g * group + j;
            for i in 0..n {
                let dst = (doc.start + i) * shape.q_width() + h * hd;
                out[dst..dst + hd].copy_from_slice(&r.out[(j * n + i) * hd..(j * n + i + 1) * hd]);
            }
            lse[h * tokens + doc.start..h * tokens + doc.start + n]
                .copy_from_slice(&r.lse[j * n..(j + 1) * n]);
        }
    }
    (out, lse)
}

/// One task's gradients: of its query heads [group, len, head_dim], and of its key and value head
/// [len, head_dim] each.
struct Backward {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// The gradients of q, k and v from that of the output `dout`, given the forward's inputs, its output
/// `out` and log-sum-exps `lse`. Returns (dq, dk, dv) shaped as q, k, v.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    docs: &[Doc],
    shape: Heads,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let tokens = q.len() / shape.q_width();
    let (hd, group, scale) = (shape.head_dim, shape.group(), shape.scale());
    let (qw, kvw) = (shape.q_width(), shape.kv_width());
    let tasks = tasks(docs, shape.kv_heads);
    let results: Vec<Backward> = tasks
        .par_iter()
        .map(|&(doc, g)| {
            let n = doc.len;
            let mut p = vec![0f32; QUERY_BLOCK.min(n) * n];
            let mut dp = vec![0f32; QUERY_BLOCK.min(n) * n];
            let mut result = Backward {
                dq: vec![0f32; group * n * hd],
                dk: vec![0f32; n * hd],
                dv: vec![0f32; n * hd],
            };
            let kh = head_rows(k, doc, kvw, g, hd);
            let vh = head_rows(v, doc, kvw, g, hd);
            for j in 0..group {
                let h = g * group + j;
                let qh = head_rows(q, doc, qw, h, hd);
                let oh = head_rows(out, doc, qw, h, hd);
                let doh = head_rows(dout, doc, qw, h, hd);
                let mut lse_h = lse[h * tokens + doc.start..h * tokens + doc.start + n].to_vec();
                for (r0, r1) in query_blocks(n) {
                    let m = r1 - r0;
                    // 1. The block's probabilities again, from the kept log-sum-exps.
                    probabilities(&mut p, qh, kh, (r0, r1), scale, &mut lse_h, true);
                    let pb = View::rows(&p, m, r1, r1);
                    let dob = View::rows(&doh.data[r0 * qw..], m, hd, qw);
                    let kb = View::rows(kh.data, r1, hd, kvw);
                    let vb = View::rows(vh.data, r1, hd, kvw);
                    // 2. dV[..r1] += Pᵀ·dO.
                    matmul(&mut result.dv, hd, pb.t(), dob, Out::Add(1.0), false);
                    // 3. dP = dO·Vᵀ, then dS = P ∘ (dP − rowsum(dO ∘ O)).
                    matmul(&mut dp, r1, dob, vb.t(), Out::Set(1.0), false);
                    for (i, (dp, p)) in (r0..r1).zip(dp.chunks_mut(r1).zip(p.chunks(r1))) {
                        let o = &oh.data[i * qw..i * qw + hd];
                        let d = &doh.data[i * qw..i * qw + hd];
                        let delta: f32 = o.iter().zip(d).map(|(a, b)| a * b).sum();
                        for (dp, p) in dp[..=i].iter_mut().zip(&p[..=i]) {
                            *dp = p * (*dp - delta);
                        }
                        dp[i + 1..].fill(0.0);
                    }
                    let ds = View::rows(&dp, m, r1, r1);
                    // 4. dQ = scale · dS·K, dK[..r1] += scale · dSᵀ·Q.
                    let dq = &mut result.dq[(j * n + r0) * hd..(j * n + r1) * hd];
                    matmul(dq, hd, ds, kb, Out::Set(scale), false);
                    let qb = View::rows(&qh.data[r0 * qw..], m, hd, qw);
                    matmul(&mut result.dk, hd, ds.t(), qb, Out::Add(scale), false);
                }
            }
            result
        })
        .collect();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    for (&(doc, g), r) in tasks.iter().zip(&results) {
        let n = doc.len;
        for i in 0..n {
            let t = doc.start + i;
            for j in 0..group {
                let dst = t * qw + (g * group + j) * hd;
                dq[dst..dst + hd].copy_from_slice(&r.dq[(j * n + i) * hd..(j * n + i + 1) * hd]);
            }
            let dst = t * kvw + g * hd;
            dk[dst..dst + hd].copy_from_slice(&r.dk[i * hd..(i + 1) * hd]);
            dv[dst..dst + hd].copy_from_slice(&r.dv[i * hd..(i + 1) * hd]);
        }
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var, D};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix::new(seed);
        (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect()
    }

    /// Forward and all three gradients against candle's autograd with an explicit block-diagonal
    /// causal mask: two rows, three documents, grouped heads.
    #[test]
    fn matches_candle_autograd_with_a_block_diagonal_mask() -> candle_core::Result<()> {
        let shape = Heads {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        // The last document spans three query blocks, the last one partial.
        let seq = 150;
        let docs = [
            Doc { start: 0, len: 3 },
            Doc { start: 3, len: 147 },
            Doc {
                start: 150,
                len: 150,
            },
        ];
        let tokens = 2 * seq;
        let (qw, kvw) = (shape.q_width(), shape.kv_width());
        let (q, k, v) = (
            random(tokens * qw, 1),
            random(tokens * kvw, 2),
            random(tokens * kvw, 3),
        );
        let dout = random(tokens * qw, 4);

        let dev = Device::Cpu;
        let heads = |x: &[f32], n: usize| -> candle_core::Result<Var> {
            Var::from_tensor(
                &Tensor::from_vec(x.to_vec(), (2, seq, n, 8), &dev)?
                    .transpose(1, 2)?
                    .contiguous()?,
            )
        };
        let (qv, kv, vv) = (heads(&q, 4)?, heads(&k, 2)?, heads(&v, 2)?);
        let mut mask = vec![f32::NEG_INFINITY; tokens * seq];
        for d in docs {
            for i in 0..d.len {
                let (row, pos) = ((d.start + i) / seq, (d.start + i) % seq);
                let first = d.start % seq;
                for j in first..=pos {
                    mask[(row * seq + pos) * seq + j] = 0.0;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (2, 1, 1, seq, seq), &dev)?;
        let qg = qv.as_tensor().reshape((2, 2, 2 * seq, 8))?;
        let scores = (qg.matmul(&kv.as_tensor().t()?)? / (8f64).sqrt())?
            .reshape((2, 2, 2, seq, seq))?
            .broadcast_add(&mask)?
            .reshape((2, 2, 2 * seq, seq))?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let o = probs
            .matmul(vv.as_tensor())?
            .reshape((2, 4, seq, 8))?
            .transpose(1, 2)?
            .reshape((2, seq, 32))?;
        let grads = (&o * Tensor::from_vec(dout.clone(), (2, seq, 32), &dev)?)?
            .sum_all()?
            .backward()?;
        let flat = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            t.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>()
        };

        let (out, lse) = forward(&q, &k, &v, &docs, shape);
        let close = |a: &[f32], b: &[f32], what: &str| {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!((x - y).abs() < 5e-5, "{what} at {i}: {x} vs {y}");
            }
        };
        close(&out, &o.flatten_all()?.to_vec1::<f32>()?, "output");
        let (dq, dk, dv) = backward(&q, &k, &v, &out, &lse, &dout, &docs, shape);
        let grad = |var: &Var| flat(grads.get(var.as_tensor()).expect("grad"));
        close(&dq, &grad(&qv)?, "dq");
        close(&dk, &grad(&kv)?, "dk");
        close(&dv, &grad(&vv)?, "dv");
        Ok(())
    }
}
