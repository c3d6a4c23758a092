//! Q8_0 weights in the eight-row layout (`interleaved.rs`). The default model's Q8_0 matrix is its
//! tied embedding, which is also the LM head: 49,152 rows, the largest product of a prompt and of
//! every scored position in an evaluation; a trainer's int8 copies of Wᵀ are Q8_0 too.
//!
//! Repacked, `qs[k]` holds values 4k..4k+4 of each row's block (row r at bytes 4r..4r+4), stored
//! offset by 128 (as unsigned bytes, q + 128) for `vpdpbusd`; each activation block carries its exact
//! integer sum Σq, so a block's products are Σ(q_w + 128)·q_x − 128·Σq_x, exact in 32-bit integers,
//! before its one scaling by d_w·d_x. The result equals ggml's up to the order of the f32 additions
//! (each block's exact integer sum is scaled whole, where ggml scales eight partial sums), ~1e-7
//! relative.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::f16;

use super::blocks::{self, Q8_0WithSum, Q8_0, QK};
use super::dot;
use super::interleaved::{Interleaved, ROWS};

/// Block `b` of eight consecutive rows.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8_0x8 {
    pub d: [f16; ROWS],
    /// `qs[k]` holds values 4k..4k+4 of each row's block (row r at bytes 4r..4r+4), plus 128.
    pub qs: [[u8; 32]; 8],
}

/// Blocks of a Q8_0 matrix [rows, nb blocks] (the file's layout), repacked as [groups, nb] of
/// [`Q8_0x8`]; rows past `rows` (up to a multiple of eight) are zero and compute zero.
pub fn pack(blocks: &[Q8_0], rows: usize, nb: usize) -> Vec<Q8_0x8> {
    let groups = rows.div_ceil(ROWS);
    let mut out = Vec::with_capacity(groups * nb);
    for g in 0..groups {
        for b in 0..nb {
            let mut packed = Q8_0x8 {
                d: [f16::ZERO; ROWS],
                qs: [[128; 32]; 8],
            };
            for r in 0..ROWS {
                let row = g * ROWS + r;
                if row >= rows {
                    break;
                }
                let src = &blocks[row * nb + b];
                packed.d[r] = f16::from_f32(src.d);
                for (k, q) in packed.qs.iter_mut().enumerate() {
                    for (i, v) in src.qs[4 * k..4 * k + 4].iter().enumerate() {
                        q[4 * r + i] = (i16::from(*v) + 128) as u8;
                    }
                }
            }
            out.push(packed);
        }
    }
    out
}

impl Interleaved for Q8_0x8 {
    type FileBlock = Q8_0;
    type Act = Q8_0WithSum;
    fn quantize(x: &[f32], out: &mut Vec<Q8_0WithSum>) {
        blocks::quantize_q8_0_with_sum(x, out)
    }
    fn block(&self, r: usize) -> Q8_0 {
        let mut qs = [0i8; QK];
        for (k, q) in self.qs.iter().enumerate() {
            for i in 0..4 {
                qs[4 * k + i] = (i16::from(q[4 * r + i]) - 128) as i8;
            }
        }
        Q8_0 {
            d: self.d[r].to_f32(),
            qs,
        }
    }
    fn dot(w: &[Q8_0], x: &[Q8_0WithSum]) -> f32 {
        dot::q8_0(w, x)
    }
    #[cfg(target_arch = "x86_64")]
    fn act_qs(x: &Q8_0WithSum) -> &[i8; 32] {
        &x.block.qs
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> [__m256i; 8] {
        // SAFETY: reads the block's eight 32-byte rows; AVX2 is enabled by the caller.
        unsafe {
            std::array::from_fn(|k| _mm256_loadu_si256(self.qs[k].as_ptr() as *const __m256i))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn sums_avx2(w: &[__m256i; 8], x: &Q8_0WithSum) -> __m256i {
        // SAFETY: AVX2 is enabled by the caller. `vpmaddubsw` would saturate on q + 128 (two
        // products reach 2·255·127), so the weights are made signed again (flipping the top bit undoes
        // the offset) and their signs moved onto the activations: a pair is then at most
        // 2·128·127 = 32512, and each pair sum widens to 32 bits at once. Adding 128·Σx back gives
        // the sums `vpdpbusd` would.
        unsafe {
            let one = _mm256_set1_epi16(1);
            let mut acc = _mm256_set1_epi32(x.sum << 7);
            for (k, stored) in w.iter().enumerate() {
                let wk = _mm256_xor_si256(*stored, _mm256_set1_epi8(-128));
                let xk = super::interleaved::x4(&x.block.qs, k);
                let p = _mm256_maddubs_epi16(_mm256_sign_epi8(wk, wk), _mm256_sign_epi8(xk, wk));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, one));
            }
            acc
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn accumulate(&self, sums: __m256i, x: &Q8_0WithSum, acc: __m256) -> __m256 {
        // SAFETY: register work and the scale load; AVX2, FMA and F16C are enabled by the caller.
        unsafe {
            let sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(x.sum << 7));
            let d = _mm256_cvtph_ps(_mm_loadu_si128(self.d.as_ptr() as *const __m128i));
            _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(sums),
                _mm256_mul_ps(d, _mm256_set1_ps(x.block.d)),
                acc,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::interleaved::row_blocks;
    use super::*;

    #[test]
    fn packing_keeps_every_block_and_pads_with_zero_rows() {
        let (rows, nb) = (11, 3);
        let blocks: Vec<Q8_0> = (0..rows * nb)
            .map(|i| Q8_0 {
                d: f16::from_f32(i as f32 * 0.5).to_f32(),
                // Every byte value, −128 and 127 among them.
                qs: std::array::from_fn(|j| ((i * 32 + j) % 256) as u8 as i8),
            })
            .collect();
        let packed = pack(&blocks, rows, nb);
        assert_eq!(packed.len(), 2 * nb);
        let mut row = Vec::new();
        for r in 0..rows {
            row_blocks(&packed, nb, r, &mut row);
            for (b, got) in row.iter().enumerate() {
                let want = blocks[r * nb + b];
                assert_eq!((got.d, got.qs), (want.d, want.qs), "row {r} block {b}");
            }
        }
        row_blocks(&packed, nb, 15, &mut row);
        assert!(row.iter().all(|b| b.d == 0.0 && b.qs == [0; QK]));
    }
}
