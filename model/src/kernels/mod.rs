//! pai's own CPU matrix multiply for quantized weights (Q4_0, Q4_1, Q8_0), replacing candle's where it
//! is slow: candle has no SIMD dot product for Q4_1, the format the default model ships in.
//!
//! y = x·Wᵀ: each activation row is quantized to 8-bit blocks once (as llama.cpp does), then every
//! output row is a sum of block dot products: on x86-64 by the kernel that reads the weights repacked
//! at load eight rows at a time (`interleaved.rs`, the formats in `q4x8.rs` and `q8_0x8.rs`; AVX2 or
//! AVX-512 VNNI, `isa.rs`), elsewhere by the portable ones (`dot.rs`). Work is split by output rows
//! over pai's own pool (`pool.rs`; `PAI_NUM_THREADS`, default: the cores available); a task computes its
//! rows for every token, so each weight block is read from memory once per call and reused across the
//! tokens of a prefill while it is in cache.

mod amx;
mod attention;
pub mod bf16;
mod blocks;
mod dot;
mod elementwise;
pub mod gemm;
mod interleaved;
#[cfg(target_arch = "x86_64")]
mod isa;
pub mod lora;
mod pool;
mod q4x8;
mod q8_0x8;

use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use blocks::{Q4_0, Q4_1, QK};
use interleaved::Interleaved;
use pool::Pool;
use q4x8::{Q4_0x8, Q4_1x8};
use q8_0x8::Q8_0x8;

pub use attention::{attention, AttentionSpec};
pub use elementwise::{add, exp_shifted, rms_norm, silu_mul};

#[derive(Debug)]
enum Blocks {
    // Each repacked eight rows at a time (`q4x8.rs`, `q8_0x8.rs`); rows padded to a multiple of eight.
    Q4_1(Vec<Q4_1x8>),
    Q4_0(Vec<Q4_0x8>),
    Q8_0(Vec<Q8_0x8>),
}

/// A quantized weight matrix [rows, cols] that pai multiplies itself.
#[derive(Debug)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

/// Which kernels multiply: the portable reference, or SIMD tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Simd(isa::Simd),
}

impl Kernels {
    /// Every choice this CPU can run, portable first and the best last.
    fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut all = vec![Kernels::Portable];
        #[cfg(target_arch = "x86_64")]
        all.extend(isa::Simd::available().into_iter().map(Kernels::Simd));
        all
    }

    /// The best this CPU has, unless `PAI_KERNELS` names another (`portable`, `avx2`, `avx512-vnni`).
    fn selected() -> Self {
        static SELECTED: OnceLock<Kernels> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let all = Self::available();
            let wanted = std::env::var("PAI_KERNELS").ok();
            match wanted.and_then(|w| all.iter().copied().find(|k| k.name() == w)) {
                Some(k) => k,
                None => all.last().copied().unwrap_or(Kernels::Portable),
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kernels::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernels::Simd(s) => s.name(),
        }
    }
}

/// The name of the kernels in use ("avx512-vnni", "avx2" or "portable").
pub fn kernel_name() -> &'static str {
    Kernels::selected().name()
}

/// Whether SIMD kernels are in use (the attention kernel follows the matmul's choice).
fn simd_selected() -> bool {
    Kernels::selected() != Kernels::Portable
}

/// Threads the kernels run on.
pub fn threads() -> usize {
    pool().threads()
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::env::var("PAI_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        Pool::new(n)
    })
}

impl QuantMatrix {
    /// Take a GGUF tensor's blocks; `None` for formats or shapes pai leaves to candle.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Ok((rows, cols)) = q.shape().dims2() else {
            return Ok(None);
        };
        if cols % QK != 0 {
            return Ok(None);
        }
        let data = q.data()?;
        let blocks = match q.dtype() {
            GgmlDType::Q4_1 => {
                Blocks::Q4_1(q4x8::pack(&blocks::parse_q4_1(&data), rows, cols / QK))
            }
            GgmlDType::Q4_0 => {
                Blocks::Q4_0(q4x8::pack(&blocks::parse_q4_0(&data), rows, cols / QK))
            }
            GgmlDType::Q8_0 => {
                Blocks::Q8_0(q8_0x8::pack(&blocks::parse_q8_0(&data), rows, cols / QK))
            }
            _ => return Ok(None),
        };
        Ok(Some(Self { rows, cols, blocks }))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The weights as a dense f32 tensor [rows, cols].
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut w = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            self.row(r, &mut w)?;
        }
        Ok(Tensor::from_vec(w, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// Rows `ids`, dequantized: [ids, cols] (an embedding lookup).
    pub fn rows_tensor(&self, ids: &[u32]) -> Result<Tensor> {
        let mut data = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            self.row(id as usize, &mut data)?;
        }
        Ok(Tensor::from_vec(
            data,
            (ids.len(), self.cols),
            &Device::Cpu,
        )?)
    }

    /// Append row `r`, dequantized, to `out`.
    pub fn row(&self, r: usize, out: &mut Vec<f32>) -> Result<()> {
        if r >= self.rows {
            return Err(ModelError::RowOutOfRange {
                row: r,
                rows: self.rows,
            });
        }
        let nb = self.cols / QK;
        match &self.blocks {
            Blocks::Q4_1(packed) => {
                let mut row: Vec<Q4_1> = Vec::with_capacity(nb);
                interleaved::row_blocks(packed, nb, r, &mut row);
                for b in &row {
                    out.extend(b.qs.iter().map(|&q| b.d * f32::from(q & 0x0F) + b.m));
                    out.extend(b.qs.iter().map(|&q| b.d * f32::from(q >> 4) + b.m));
                }
            }
            Blocks::Q4_0(packed) => {
                let mut row: Vec<Q4_0> = Vec::with_capacity(nb);
                interleaved::row_blocks(packed, nb, r, &mut row);
                for b in &row {
                    out.extend(b.qs.iter().map(|&q| b.d * (f32::from(q & 0x0F) - 8.0)));
                    out.extend(b.qs.iter().map(|&q| b.d * (f32::from(q >> 4) - 8.0)));
                }
            }
            Blocks::Q8_0(packed) => {
                let mut row = Vec::with_capacity(nb);
                interleaved::row_blocks(packed, nb, r, &mut row);
                for b in &row {
                    out.extend(b.qs.iter().map(|&q| b.d * f32::from(q)));
                }
            }
        }
        Ok(())
    }

    /// y = x·Wᵀ for x [.., cols] → [.., rows], on the CPU.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        self.matmul_with(x, Kernels::selected())
    }

    /// y = x·Wᵀ for row-major x [tokens, cols] given as a slice: [tokens, rows].
    pub fn matmul_rows(&self, xs: &[f32]) -> Vec<f32> {
        self.product_rows(xs, Kernels::selected())
    }

    fn matmul_with(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let xs = x
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let out = self.product_rows(&xs, kernels);
        if let Some(last) = out_dims.last_mut() {
            *last = self.rows;
        }
        Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
    }

    fn product_rows(&self, xs: &[f32], kernels: Kernels) -> Vec<f32> {
        match &self.blocks {
            Blocks::Q4_1(w) => self.interleaved_product(xs, w, kernels),
            Blocks::Q4_0(w) => self.interleaved_product(xs, w, kernels),
            Blocks::Q8_0(w) => self.interleaved_product(xs, w, kernels),
        }
    }

    /// `product` for a format repacked eight rows at a time.
    fn interleaved_product<P: Interleaved>(
        &self,
        xs: &[f32],
        w: &[P],
        kernels: Kernels,
    ) -> Vec<f32> {
        let nb = self.cols / QK;
        self.product(
            xs,
            interleaved::ROWS,
            P::quantize,
            |first, rows, xq, tokens, out, stride| {
                let w = &w[first / interleaved::ROWS * nb..];
                match kernels {
                    Kernels::Portable => {
                        interleaved::portable(w, xq, nb, rows, tokens, out, stride)
                    }
                    #[cfg(target_arch = "x86_64")]
                    Kernels::Simd(simd) => {
                        let groups = rows / interleaved::ROWS;
                        interleaved::groups_times_tokens(
                            simd, w, xq, nb, groups, tokens, out, stride,
                        )
                    }
                }
            },
        )
    }

    /// y = x·Wᵀ as [tokens, rows], split over the pool: a decode step (one token) by rows, a prompt by
    /// tokens (each task quantizes its own tokens and runs them against every row, so the output comes
    /// out in place and the weights are read from cache). `kernel(first_row, rows, xq, tokens, out,
    /// stride)` writes rows `first_row..first_row + rows` (a multiple of `group`) of `tokens` tokens
    /// into `out` [tokens, stride], relative to its first row.
    fn product<X: Send + Sync>(
        &self,
        xs: &[f32],
        group: usize,
        quantize: fn(&[f32], &mut Vec<X>),
        kernel: impl Fn(usize, usize, &[X], usize, &mut [f32], usize) + Sync,
    ) -> Vec<f32> {
        let nb = self.cols / QK;
        let tokens = xs.len() / self.cols;
        let padded = self.rows.next_multiple_of(group);
        let threads = pool().threads();
        let mut out = vec![0f32; tokens * padded];
        if tokens == 1 {
            let mut xq = Vec::with_capacity(nb);
            quantize(xs, &mut xq);
            let rows_per_task = rows_per_task(padded, nb, threads, group);
            pool().for_each_piece(&mut out, rows_per_task, |i, piece| {
                kernel(i * rows_per_task, piece.len(), &xq, 1, piece, padded)
            });
        } else {
            let tokens_per_task = tokens.div_ceil(threads * 4).next_multiple_of(4);
            pool().for_each_piece(&mut out, tokens_per_task * padded, |i, piece| {
                let first = i * tokens_per_task * self.cols;
                let n = piece.len() / padded;
                let mut xq = Vec::with_capacity(n * nb);
                quantize(&xs[first..first + n * self.cols], &mut xq);
                kernel(0, padded, &xq, n, piece, padded)
            });
        }
        if padded != self.rows {
            // Drop the padding rows' columns.
            for t in 0..tokens {
                out.copy_within(t * padded..t * padded + self.rows, t * self.rows);
            }
            out.truncate(tokens * self.rows);
        }
        out
    }
}

/// Rows per pool task, a multiple of `group` (and of 4, the tiles' height, where there are enough
/// rows): enough block products that a task outweighs handing it over (~a microsecond), and enough
/// tasks that a descheduled thread's share can be picked up by the others. `rows` is a multiple of
/// `group`.
fn rows_per_task(rows: usize, blocks_per_row: usize, threads: usize, group: usize) -> usize {
    const MIN_BLOCKS_PER_TASK: usize = 1024;
    let by_size = MIN_BLOCKS_PER_TASK.div_ceil(blocks_per_row.max(1));
    let by_count = rows.div_ceil(threads * 4);
    let n = by_size.max(by_count);
    let n = if n >= 4 { n.next_multiple_of(4) } else { n };
    n.next_multiple_of(group).clamp(group, rows.max(group))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut StdRng, rows: usize, cols: usize, scale: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn kernels_agree_with_the_portable_fallback_and_with_dequantized_matmul() {
        let mut rng = StdRng::seed_from_u64(5);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q8_0] {
            // The default model's shapes (576 wide; 192, 576, 1536 and 49152 rows), odd row counts.
            for (rows, cols) in [
                (192, 576),
                (576, 576),
                (1536, 576),
                (576, 1536),
                (49152, 576),
                (37, 64),
                (3, 576),
            ] {
                let w = random(&mut rng, rows, cols, 0.5);
                let q = QTensor::quantize(&w, dtype).unwrap();
                let m = QuantMatrix::from_qtensor(&q).unwrap().expect("supported");
                // Same dequantized weights as candle.
                let ours = m.dequantize().unwrap();
                let candle = q.dequantize(&Device::Cpu).unwrap();
                assert_eq!(
                    max_abs(&(&ours - &candle).unwrap()),
                    0.0,
                    "{dtype:?} dequantize"
                );
                for tokens in [1, 4, 9] {
                    let x = random(&mut rng, tokens, cols, 2.0).unsqueeze(0).unwrap();
                    let fast = m.matmul(&x).unwrap();
                    let portable = m.matmul_with(&x, Kernels::Portable).unwrap();
                    let scale = max_abs(&portable);
                    for kernels in Kernels::available() {
                        let simd = m.matmul_with(&x, kernels).unwrap();
                        let d = max_abs(&(&simd - &portable).unwrap());
                        assert!(
                            d <= 1e-6 * scale,
                            "{dtype:?} {rows}x{cols}, {tokens} tokens: {} vs portable differ by {d}",
                            kernels.name()
                        );
                    }
                    let exact = x.broadcast_matmul(&candle.t().unwrap()).unwrap();
                    let e = max_abs(&(&fast - &exact).unwrap());
                    assert!(
                        e < 0.02 * max_abs(&exact),
                        "{dtype:?} {rows}x{cols}: {e} from the f32 product"
                    );
                    assert_eq!(fast.dims(), &[1, tokens, rows]);
                }
            }
        }
    }

    #[test]
    fn unsupported_formats_are_left_to_candle() {
        let w = Tensor::zeros((4, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q6K).unwrap();
        assert!(QuantMatrix::from_qtensor(&q).unwrap().is_none());
    }
}
