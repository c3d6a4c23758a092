//! Q4_1 and Q4_0 weights in the eight-row layout (`interleaved.rs`).
//!
//! In the file a block is an f16 scale (and for Q4_1 an f16 minimum) and 32 nibbles, low nibbles
//! holding values 0..16, high nibbles 16..32. Repacked, `qs[j]` holds bytes 4j..4j+4 of each row's
//! 16, so that masking out the low (high) nibbles of register j gives values 4j..4j+4 (16+4j..) of
//! every row, one row per lane. The nibbles are unsigned as they are; what differs between the two
//! formats is the accumulation: Q4_1 adds its minimum times the activation block's sum as ggml does
//! (`s`, f16), Q4_0 takes 8·Σq_x out of the integer sums (its values are nibble − 8), exactly.

use half::f16;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::blocks::{self, Q8_0WithSum, Q4_0, Q4_1, Q8_1};
use super::dot;
use super::interleaved::{Interleaved, ROWS};

/// `qs[j]` holds bytes 4j..4j+4 of each row's 16 (row r at 4r..4r+4): the low nibbles are values
/// 4j..4j+4 of the block, the high nibbles values 16+4j..16+4j+4.
pub type Nibbles8 = [[u8; 32]; 4];

/// Block `b` of eight consecutive Q4_1 rows.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q4_1x8 {
    pub d: [f16; ROWS],
    pub m: [f16; ROWS],
    pub qs: Nibbles8,
}

/// Block `b` of eight consecutive Q4_0 rows.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q4_0x8 {
    pub d: [f16; ROWS],
    pub qs: Nibbles8,
}

/// A file block of 32 nibbles, and the eight-row block that interleaves it.
pub trait Nibbles: Copy {
    type Packed: Interleaved<FileBlock = Self>;
    fn qs(&self) -> &[u8; 16];
    /// A group block of all-zero rows.
    fn empty() -> Self::Packed;
    /// Row `r`'s scales into `packed` (its nibbles are placed by [`pack`]).
    fn put(&self, packed: &mut Self::Packed, r: usize);
    fn packed_qs(packed: &mut Self::Packed) -> &mut Nibbles8;
}

impl Nibbles for Q4_1 {
    type Packed = Q4_1x8;
    fn qs(&self) -> &[u8; 16] {
        &self.qs
    }
    fn empty() -> Q4_1x8 {
        Q4_1x8 {
            d: [f16::ZERO; ROWS],
            m: [f16::ZERO; ROWS],
            qs: [[0; 32]; 4],
        }
    }
    fn put(&self, packed: &mut Q4_1x8, r: usize) {
        packed.d[r] = f16::from_f32(self.d);
        packed.m[r] = f16::from_f32(self.m);
    }
    fn packed_qs(packed: &mut Q4_1x8) -> &mut Nibbles8 {
        &mut packed.qs
    }
}

impl Nibbles for Q4_0 {
    type Packed = Q4_0x8;
    fn qs(&self) -> &[u8; 16] {
        &self.qs
    }
    fn empty() -> Q4_0x8 {
        // Nibbles of 8 are zero weights.
        Q4_0x8 {
            d: [f16::ZERO; ROWS],
            qs: [[0x88; 32]; 4],
        }
    }
    fn put(&self, packed: &mut Q4_0x8, r: usize) {
        packed.d[r] = f16::from_f32(self.d);
    }
    fn packed_qs(packed: &mut Q4_0x8) -> &mut Nibbles8 {
        &mut packed.qs
    }
}

fn row_nibbles(qs: &Nibbles8, r: usize) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (j, q) in qs.iter().enumerate() {
        out[4 * j..4 * j + 4].copy_from_slice(&q[4 * r..4 * r + 4]);
    }
    out
}

/// Blocks of a matrix [rows, nb blocks] (the file's layout), repacked as [groups, nb] eight-row
/// blocks; rows past `rows` (up to a multiple of eight) are zero and compute zero.
pub fn pack<B: Nibbles>(blocks: &[B], rows: usize, nb: usize) -> Vec<B::Packed> {
    let groups = rows.div_ceil(ROWS);
    let mut out = Vec::with_capacity(groups * nb);
    for g in 0..groups {
        for b in 0..nb {
            let mut packed = B::empty();
            for r in 0..ROWS {
                let row = g * ROWS + r;
                if row >= rows {
                    break;
                }
                let src = &blocks[row * nb + b];
                src.put(&mut packed, r);
                for (j, q) in B::packed_qs(&mut packed).iter_mut().enumerate() {
                    q[4 * r..4 * r + 4].copy_from_slice(&src.qs()[4 * j..4 * j + 4]);
                }
            }
            out.push(packed);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::super::interleaved::x4;
    use super::*;

    /// The eight registers of an interleaved block: register k holds values 4k..4k+4 of every row.
    #[inline(always)]
    pub(super) unsafe fn unpack(qs: &Nibbles8) -> [__m256i; 8] {
        // SAFETY: reads the block's four 32-byte rows; AVX2 is enabled by the callers.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let raw: [__m256i; 4] =
                std::array::from_fn(|j| _mm256_loadu_si256(qs[j].as_ptr() as *const __m256i));
            std::array::from_fn(|k| {
                if k < 4 {
                    _mm256_and_si256(raw[k], low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(raw[k - 4], 4), low)
                }
            })
        }
    }

    /// Σ nibble·x per row with AVX2.
    #[inline(always)]
    pub(super) unsafe fn sums_avx2(w: &[__m256i; 8], x: &[i8; 32]) -> __m256i {
        // SAFETY: AVX2 is enabled by the callers. Each i16 holds two products of a nibble (≤ 15) and
        // an activation byte (|q| ≤ 127), so eight of them sum to at most 30480 and cannot saturate.
        unsafe {
            let p: [__m256i; 8] = std::array::from_fn(|k| _mm256_maddubs_epi16(w[k], x4(x, k)));
            let s = _mm256_add_epi16(
                _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])),
                _mm256_add_epi16(_mm256_add_epi16(p[4], p[5]), _mm256_add_epi16(p[6], p[7])),
            );
            _mm256_madd_epi16(s, _mm256_set1_epi16(1))
        }
    }

    /// The eight rows' f16 scales as f32.
    #[inline(always)]
    pub(super) unsafe fn scales(d: &[f16; ROWS]) -> __m256 {
        // SAFETY: reads 16 bytes; F16C is enabled by the callers.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i)) }
    }
}

impl Interleaved for Q4_1x8 {
    type FileBlock = Q4_1;
    type Act = Q8_1;
    fn quantize(x: &[f32], out: &mut Vec<Q8_1>) {
        blocks::quantize_q8_1(x, out)
    }
    fn block(&self, r: usize) -> Q4_1 {
        Q4_1 {
            d: self.d[r].to_f32(),
            m: self.m[r].to_f32(),
            qs: row_nibbles(&self.qs, r),
        }
    }
    fn dot(w: &[Q4_1], x: &[Q8_1]) -> f32 {
        dot::q4_1(w, x)
    }
    #[cfg(target_arch = "x86_64")]
    fn act_qs(x: &Q8_1) -> &[i8; 32] {
        &x.qs
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> [__m256i; 8] {
        // SAFETY: as `simd::unpack`.
        unsafe { simd::unpack(&self.qs) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn sums_avx2(w: &[__m256i; 8], x: &Q8_1) -> __m256i {
        // SAFETY: as `simd::sums_avx2`.
        unsafe { simd::sums_avx2(w, &x.qs) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn accumulate(&self, sums: __m256i, x: &Q8_1, acc: __m256) -> __m256 {
        // SAFETY: register work and the scale loads; AVX2, FMA and F16C are enabled by the caller.
        unsafe {
            let d = simd::scales(&self.d);
            let m = simd::scales(&self.m);
            let acc = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(sums),
                _mm256_mul_ps(d, _mm256_set1_ps(x.d)),
                acc,
            );
            _mm256_fmadd_ps(m, _mm256_set1_ps(x.s), acc)
        }
    }
}

impl Interleaved for Q4_0x8 {
    type FileBlock = Q4_0;
    type Act = Q8_0WithSum;
    fn quantize(x: &[f32], out: &mut Vec<Q8_0WithSum>) {
        blocks::quantize_q8_0_with_sum(x, out)
    }
    fn block(&self, r: usize) -> Q4_0 {
        Q4_0 {
            d: self.d[r].to_f32(),
            qs: row_nibbles(&self.qs, r),
        }
    }
    fn dot(w: &[Q4_0], x: &[Q8_0WithSum]) -> f32 {
        dot::q4_0(w, x)
    }
    #[cfg(target_arch = "x86_64")]
    fn act_qs(x: &Q8_0WithSum) -> &[i8; 32] {
        &x.block.qs
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> [__m256i; 8] {
        // SAFETY: as `simd::unpack`.
        unsafe { simd::unpack(&self.qs) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn sums_avx2(w: &[__m256i; 8], x: &Q8_0WithSum) -> __m256i {
        // SAFETY: as `simd::sums_avx2`.
        unsafe { simd::sums_avx2(w, &x.block.qs) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn accumulate(&self, sums: __m256i, x: &Q8_0WithSum, acc: __m256) -> __m256 {
        // SAFETY: as above. Σ (q − 8)·x = Σ q·x − 8·Σx, in integers.
        unsafe {
            let sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(x.sum << 3));
            _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(sums),
                _mm256_mul_ps(simd::scales(&self.d), _mm256_set1_ps(x.block.d)),
                acc,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::interleaved::row_blocks;

    fn round_trip<B: Nibbles + std::fmt::Debug>(
        make: impl Fn(usize) -> B,
        same: impl Fn(&B, &B) -> bool,
        zero: impl Fn(&B) -> bool,
    ) {
        let (rows, nb) = (11, 3);
        let blocks: Vec<B> = (0..rows * nb).map(make).collect();
        let packed = pack(&blocks, rows, nb);
        assert_eq!(packed.len(), 2 * nb);
        let mut row = Vec::new();
        for r in 0..rows {
            row_blocks(&packed, nb, r, &mut row);
            for (b, got) in row.iter().enumerate() {
                assert!(same(got, &blocks[r * nb + b]), "row {r} block {b}: {got:?}");
            }
        }
        row_blocks(&packed, nb, 15, &mut row);
        assert!(row.iter().all(zero), "padding rows: {row:?}");
    }

    #[test]
    fn packing_keeps_every_block_and_pads_with_zero_rows() {
        round_trip(
            |i| Q4_1 {
                d: f16::from_f32(i as f32 * 0.5).to_f32(),
                m: f16::from_f32(-(i as f32)).to_f32(),
                qs: std::array::from_fn(|j| (i * 16 + j) as u8),
            },
            |a, b| (a.d, a.m, a.qs) == (b.d, b.m, b.qs),
            |b| b.d == 0.0 && b.m == 0.0 && b.qs == [0; 16],
        );
        round_trip(
            |i| Q4_0 {
                d: f16::from_f32(i as f32 * 0.5).to_f32(),
                qs: std::array::from_fn(|j| (i * 16 + j) as u8),
            },
            |a, b| (a.d, a.qs) == (b.d, b.qs),
            |b| b.d == 0.0 && b.qs == [0x88; 16],
        );
    }
}
