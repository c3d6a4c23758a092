//! Q8_0 weights repacked at load, eight rows interleaved, and the SIMD kernel that reads them. The
//! default model's Q8_0 matrix is its tied embedding, which is also the LM head: 49,152 rows, the
//! largest product of a prompt and of every scored position in an evaluation.
//!
//! The layout is `q4x8.rs`'s: the blocks of eight consecutive rows stored together so that 32-bit
//! lane r of a register holds four consecutive values of row r. One `vpdpbusd` against four
//! activation bytes broadcast to every lane then advances all eight rows, the block's products land
//! summed per row with no horizontal reduction, and the eight scales multiply as one vector. (A
//! row-major kernel spends a sign fix-up, a conversion, a scalar scale product, its broadcast and a
//! fused add on every 32 products; here those are paid once per eight rows.)
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the weights are stored offset by 128 (as
//! unsigned bytes, q + 128) and each activation block carries its exact integer sum Σq: a block's
//! products are then Σ(q_w + 128)·q_x − 128·Σq_x, exact in 32-bit integers, before its one scaling by
//! d_w·d_x. The result equals ggml's up to the order of the f32 additions (each block's exact integer
//! sum is scaled whole, where ggml scales eight partial sums), ~1e-7 relative. The repacked matrix
//! keeps the file's 34 bytes per block (f16 scales).

use half::f16;

use super::blocks::{Q8_0WithSum, Q8_0, QK};

/// Rows per interleaved group.
pub const ROWS: usize = 8;

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

impl Q8_0x8 {
    /// Row `r`'s block as the file stores it (the scale widened to f32, exactly).
    pub fn block(&self, r: usize) -> Q8_0 {
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
}

/// Row `row`'s blocks, in the file's layout.
pub fn row_blocks(packed: &[Q8_0x8], nb: usize, row: usize, out: &mut Vec<Q8_0>) {
    out.clear();
    let group = &packed[(row / ROWS) * nb..(row / ROWS + 1) * nb];
    out.extend(group.iter().map(|g| g.block(row % ROWS)));
}

#[cfg(target_arch = "x86_64")]
pub use simd::groups_times_tokens;

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::super::isa::Simd;
    use super::*;

    /// Activation bytes 4k..4k+4 of a block, broadcast to every lane.
    #[inline(always)]
    unsafe fn x4(x: &Q8_0WithSum, k: usize) -> __m256i {
        // SAFETY: k < 8, so the four bytes lie within the block.
        unsafe {
            _mm256_set1_epi32((x.block.qs.as_ptr().add(4 * k) as *const i32).read_unaligned())
        }
    }

    /// Exact per-row integer sums Σ q_w·q_x of one block, for the eight rows.
    trait BlockSum {
        /// The block's eight registers as this instruction set multiplies them.
        unsafe fn prepare(stored: [__m256i; 8]) -> [__m256i; 8];
        unsafe fn sums(w: &[__m256i; 8], x: &Q8_0WithSum) -> __m256i;
    }

    struct Avx2;
    impl BlockSum for Avx2 {
        #[inline(always)]
        unsafe fn prepare(stored: [__m256i; 8]) -> [__m256i; 8] {
            // SAFETY: AVX2 is enabled by the entry point. Flipping the top bit undoes the offset of
            // 128: the bytes become the signed weights again.
            unsafe { stored.map(|s| _mm256_xor_si256(s, _mm256_set1_epi8(-128))) }
        }

        #[inline(always)]
        unsafe fn sums(w: &[__m256i; 8], x: &Q8_0WithSum) -> __m256i {
            // SAFETY: AVX2 is enabled by the entry point. `vpmaddubsw` takes unsigned × signed bytes,
            // so the weights' signs move onto the activations; a pair of products is at most
            // 2·128·127 = 32512 and cannot saturate, and each pair sum widens to 32 bits at once.
            unsafe {
                let one = _mm256_set1_epi16(1);
                let mut acc = _mm256_setzero_si256();
                for (k, wk) in w.iter().enumerate() {
                    let p = _mm256_maddubs_epi16(
                        _mm256_sign_epi8(*wk, *wk),
                        _mm256_sign_epi8(x4(x, k), *wk),
                    );
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, one));
                }
                acc
            }
        }
    }

    struct Vnni;
    impl BlockSum for Vnni {
        #[inline(always)]
        unsafe fn prepare(stored: [__m256i; 8]) -> [__m256i; 8] {
            stored
        }

        #[inline(always)]
        unsafe fn sums(w: &[__m256i; 8], x: &Q8_0WithSum) -> __m256i {
            // SAFETY: AVX-512 VNNI and VL are enabled by the entry point. Two chains halve the
            // latency; |Σ (q_w + 128)·q_x| ≤ 32·255·127, far inside 32 bits.
            unsafe {
                let mut a = _mm256_setzero_si256();
                let mut b = _mm256_setzero_si256();
                for k in (0..8).step_by(2) {
                    a = _mm256_dpbusd_epi32(a, w[k], x4(x, k));
                    b = _mm256_dpbusd_epi32(b, w[k + 1], x4(x, k + 1));
                }
                _mm256_sub_epi32(_mm256_add_epi32(a, b), _mm256_set1_epi32(x.sum << 7))
            }
        }
    }

    /// Eight rows × T tokens: out[t·stride + r].
    #[inline(always)]
    unsafe fn tile<S: BlockSum, const T: usize>(
        w: &[Q8_0x8],
        x: &[Q8_0WithSum],
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
                let wq = S::prepare(std::array::from_fn(|k| {
                    _mm256_loadu_si256(wb.qs[k].as_ptr() as *const __m256i)
                }));
                let d = _mm256_cvtph_ps(_mm_loadu_si128(wb.d.as_ptr() as *const __m128i));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let xb = x.get_unchecked(t * nb + b);
                    let sums = _mm256_cvtepi32_ps(S::sums(&wq, xb));
                    *acc =
                        _mm256_fmadd_ps(sums, _mm256_mul_ps(d, _mm256_set1_ps(xb.block.d)), *acc);
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
            unsafe fn $name(
                w: &[Q8_0x8],
                x: &[Q8_0WithSum],
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
                            unsafe { tile::<$sum, 4>(wg, xt, nb, o, stride) };
                            t += 4;
                        } else {
                            unsafe { tile::<$sum, 1>(wg, xt, nb, o, stride) };
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
    pub fn groups_times_tokens(
        simd: Simd,
        w: &[Q8_0x8],
        x: &[Q8_0WithSum],
        nb: usize,
        groups: usize,
        tokens: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: a `Simd` is only made by `Simd::available`, which checked this CPU (F16C included).
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
