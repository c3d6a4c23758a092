//! Q4_1 and Q4_0 weights repacked at load, eight rows interleaved, and the SIMD kernel that reads them.
//!
//! In the file, a Q4_1 row is a run of blocks (f16 scale, f16 minimum, 32 nibbles; Q4_0 has no
//! minimum and an offset of 8 instead). A kernel reading one
//! row at a time has to add up the 32 products of each block across the lanes of a register, once per
//! row and token. Here the blocks of eight consecutive rows are stored together so that, after unpacking
//! the nibbles, 32-bit lane r of a register holds four consecutive values of row r. One `vpdpbusd` (or
//! `vpmaddubsw` on AVX2) against four activation bytes broadcast to every lane then advances all eight
//! rows at once, the block's products land summed per row with no horizontal reduction, and the eight
//! scales multiply as one vector. The repacked matrix is read front to back, and keeps the file's 20
//! (Q4_1) or 18 (Q4_0) bytes per block (f16 scales).
//!
//! The two formats differ only in what turns a block's exact per-row integer sums Σ q_w·q_x into its
//! contribution ([`Nibbles8::accumulate`]): Q4_1 adds its minimum times the activation block's sum as
//! ggml does (`s`, f16), Q4_0 takes 8·Σq_x out of the integer sums before its one scaling, exactly.

use half::f16;

use super::blocks::{Q8_0WithSum, Q4_0, Q4_1, Q8_1};

/// Rows per interleaved group.
pub const ROWS: usize = 8;

/// `qs[j]` holds bytes 4j..4j+4 of each row's 16 (row r at 4r..4r+4): the low nibbles are values
/// 4j..4j+4 of the block, the high nibbles values 16+4j..16+4j+4.
pub type Interleaved = [[u8; 32]; 4];

/// Block `b` of eight consecutive Q4_1 rows.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q4_1x8 {
    pub d: [f16; ROWS],
    pub m: [f16; ROWS],
    pub qs: Interleaved,
}

/// Block `b` of eight consecutive Q4_0 rows.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q4_0x8 {
    pub d: [f16; ROWS],
    pub qs: Interleaved,
}

/// A file block of 32 nibbles, and the eight-row block that interleaves it.
pub trait Nibbles: Copy {
    type Packed: Copy;
    fn qs(&self) -> &[u8; 16];
    /// A group block of all-zero rows.
    fn empty() -> Self::Packed;
    /// Row `r`'s scales into `packed` (its nibbles are placed by [`pack`]).
    fn put(&self, packed: &mut Self::Packed, r: usize);
    fn packed_qs(packed: &mut Self::Packed) -> &mut Interleaved;
    /// Row `r`'s block back as the file stores it (scales widened to f32, exactly).
    fn get(packed: &Self::Packed, r: usize) -> Self;
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
    fn packed_qs(packed: &mut Q4_1x8) -> &mut Interleaved {
        &mut packed.qs
    }
    fn get(packed: &Q4_1x8, r: usize) -> Q4_1 {
        Q4_1 {
            d: packed.d[r].to_f32(),
            m: packed.m[r].to_f32(),
            qs: row_nibbles(&packed.qs, r),
        }
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
    fn packed_qs(packed: &mut Q4_0x8) -> &mut Interleaved {
        &mut packed.qs
    }
    fn get(packed: &Q4_0x8, r: usize) -> Q4_0 {
        Q4_0 {
            d: packed.d[r].to_f32(),
            qs: row_nibbles(&packed.qs, r),
        }
    }
}

fn row_nibbles(qs: &Interleaved, r: usize) -> [u8; 16] {
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

/// Row `row`'s blocks, in the file's layout.
pub fn row_blocks<B: Nibbles>(packed: &[B::Packed], nb: usize, row: usize, out: &mut Vec<B>) {
    out.clear();
    let group = &packed[(row / ROWS) * nb..(row / ROWS + 1) * nb];
    out.extend(group.iter().map(|g| B::get(g, row % ROWS)));
}

#[cfg(target_arch = "x86_64")]
pub use simd::groups_times_tokens;

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::super::isa::Simd;
    use super::*;

    /// An eight-row block the kernel multiplies, and the activation blocks it pairs with.
    pub trait Nibbles8: Copy + Sync {
        type Act: Sync;
        fn qs(&self) -> &Interleaved;
        fn act_qs(x: &Self::Act) -> &[i8; 32];
        /// `acc` plus this block's contribution to the eight rows, given their exact integer sums
        /// Σ q_w·q_x (nibbles as stored, 0..16) against activation block `x`.
        unsafe fn accumulate(&self, sums: __m256i, x: &Self::Act, acc: __m256) -> __m256;
    }

    impl Nibbles8 for Q4_1x8 {
        type Act = Q8_1;
        fn qs(&self) -> &Interleaved {
            &self.qs
        }
        fn act_qs(x: &Q8_1) -> &[i8; 32] {
            &x.qs
        }
        #[inline(always)]
        unsafe fn accumulate(&self, sums: __m256i, x: &Q8_1, acc: __m256) -> __m256 {
            // SAFETY: reads the block's 16-byte scale arrays; F16C and FMA are enabled by the entry
            // points.
            unsafe {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(self.d.as_ptr() as *const __m128i));
                let m = _mm256_cvtph_ps(_mm_loadu_si128(self.m.as_ptr() as *const __m128i));
                let acc = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(sums),
                    _mm256_mul_ps(d, _mm256_set1_ps(x.d)),
                    acc,
                );
                _mm256_fmadd_ps(m, _mm256_set1_ps(x.s), acc)
            }
        }
    }

    impl Nibbles8 for Q4_0x8 {
        type Act = Q8_0WithSum;
        fn qs(&self) -> &Interleaved {
            &self.qs
        }
        fn act_qs(x: &Q8_0WithSum) -> &[i8; 32] {
            &x.block.qs
        }
        #[inline(always)]
        unsafe fn accumulate(&self, sums: __m256i, x: &Q8_0WithSum, acc: __m256) -> __m256 {
            // SAFETY: as above. Σ (q − 8)·x = Σ q·x − 8·Σx, in integers.
            unsafe {
                let d = _mm256_cvtph_ps(_mm_loadu_si128(self.d.as_ptr() as *const __m128i));
                let sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(x.sum << 3));
                _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(sums),
                    _mm256_mul_ps(d, _mm256_set1_ps(x.block.d)),
                    acc,
                )
            }
        }
    }

    /// The eight unpacked registers of one interleaved block: register k holds values 4k..4k+4 of every
    /// row (one row per 32-bit lane).
    #[inline(always)]
    unsafe fn unpack(qs: &Interleaved) -> [__m256i; 8] {
        // SAFETY: reads the block's four 32-byte rows; AVX2 is enabled by the entry points.
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

    /// Activation bytes 4k..4k+4 of a block, broadcast to every lane.
    #[inline(always)]
    unsafe fn x4(qs: &[i8; 32], k: usize) -> __m256i {
        // SAFETY: k < 8, so the four bytes lie within the block.
        unsafe { _mm256_set1_epi32((qs.as_ptr().add(4 * k) as *const i32).read_unaligned()) }
    }

    /// Exact per-row integer sums Σ w·x of one block, for the eight rows.
    trait BlockSum {
        unsafe fn sums(w: &[__m256i; 8], x: &[i8; 32]) -> __m256i;
    }

    struct Avx2;
    impl BlockSum for Avx2 {
        #[inline(always)]
        unsafe fn sums(w: &[__m256i; 8], x: &[i8; 32]) -> __m256i {
            // SAFETY: AVX2 is enabled by the entry point. Each i16 holds two products of a nibble
            // (≤ 15) and an activation byte (|q| ≤ 127), so eight of them sum to at most 30480 and
            // cannot saturate.
            unsafe {
                let p: [__m256i; 8] = std::array::from_fn(|k| _mm256_maddubs_epi16(w[k], x4(x, k)));
                let s = _mm256_add_epi16(
                    _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])),
                    _mm256_add_epi16(_mm256_add_epi16(p[4], p[5]), _mm256_add_epi16(p[6], p[7])),
                );
                _mm256_madd_epi16(s, _mm256_set1_epi16(1))
            }
        }
    }

    struct Vnni;
    impl BlockSum for Vnni {
        #[inline(always)]
        unsafe fn sums(w: &[__m256i; 8], x: &[i8; 32]) -> __m256i {
            // SAFETY: AVX-512 VNNI and VL are enabled by the entry point. Two chains halve the latency.
            unsafe {
                let mut a = _mm256_setzero_si256();
                let mut b = _mm256_setzero_si256();
                for k in (0..8).step_by(2) {
                    a = _mm256_dpbusd_epi32(a, w[k], x4(x, k));
                    b = _mm256_dpbusd_epi32(b, w[k + 1], x4(x, k + 1));
                }
                _mm256_add_epi32(a, b)
            }
        }
    }

    /// Eight rows × T tokens: out[t·stride + r].
    #[inline(always)]
    unsafe fn tile<P: Nibbles8, S: BlockSum, const T: usize>(
        w: &[P],
        x: &[P::Act],
        nb: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: indices stay below nb in `w`, T·nb in `x`, (T−1)·stride + 8 in `out` (checked by the
        // caller's slicing); the features are enabled by the entry points.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                let wb = w.get_unchecked(b);
                let wq = unpack(wb.qs());
                for (t, acc) in acc.iter_mut().enumerate() {
                    let xb = x.get_unchecked(t * nb + b);
                    *acc = wb.accumulate(S::sums(&wq, P::act_qs(xb)), xb, *acc);
                }
            }
            for (t, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(t * stride), *acc);
            }
        }
    }

    macro_rules! entry_point {
        ($name:ident, $sum:ty, $features:literal) => {
            /// # Safety
            /// The CPU must have the features this function is compiled with.
            #[target_feature(enable = $features)]
            unsafe fn $name<P: Nibbles8>(
                w: &[P],
                x: &[P::Act],
                nb: usize,
                groups: usize,
                tokens: usize,
                out: &mut [f32],
                stride: usize,
            ) {
                assert!(
                    groups * ROWS <= stride && w.len() >= groups * nb && x.len() >= tokens * nb
                );
                assert!(tokens == 0 || out.len() >= (tokens - 1) * stride + groups * ROWS);
                for g in 0..groups {
                    let wg = &w[g * nb..];
                    let mut t = 0;
                    while t < tokens {
                        let o = &mut out[t * stride + g * ROWS..];
                        let xt = &x[t * nb..];
                        // SAFETY: the slices hold this tile's blocks and outputs (assertion and loop
                        // bounds); the features are enabled here.
                        if tokens - t >= 4 {
                            unsafe { tile::<P, $sum, 4>(wg, xt, nb, o, stride) };
                            t += 4;
                        } else {
                            unsafe { tile::<P, $sum, 1>(wg, xt, nb, o, stride) };
                            t += 1;
                        }
                    }
                }
            }
        };
    }

    entry_point!(groups_avx2, Avx2, "avx2,fma,f16c");
    entry_point!(
        groups_vnni,
        Vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni"
    );

    /// `out` [tokens, stride] (its first groups·8 columns) = the `groups` interleaved row groups in
    /// `w` times the `tokens` activation rows in `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn groups_times_tokens<P: Nibbles8>(
        simd: Simd,
        w: &[P],
        x: &[P::Act],
        nb: usize,
        groups: usize,
        tokens: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: a `Simd` is only made by `Simd::available`, which checked this CPU (F16C comes
        // with every CPU that has AVX2 and FMA; `Simd::available` checks it too).
        unsafe {
            if simd.has_vnni() {
                groups_vnni(w, x, nb, groups, tokens, out, stride)
            } else {
                groups_avx2(w, x, nb, groups, tokens, out, stride)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
