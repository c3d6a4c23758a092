//! The weight layout every quantized format pai multiplies is repacked into at load, and the one SIMD
//! kernel that reads it (`q4x8.rs` and `q8_0x8.rs` hold the formats).
//!
//! In the file, a row is a run of blocks (a scale, maybe a minimum, 32 quantized values). A kernel
//! reading one row at a time has to add up the 32 products of each block across the lanes of a
//! register, once per row and token. Here the blocks of eight consecutive rows are stored together
//! so that, unpacked, 32-bit lane r of a register holds four consecutive values of row r. One
//! `vpdpbusd` (or `vpmaddubsw` on AVX2) against four activation bytes broadcast to every lane then
//! advances all eight rows at once, the block's products land summed per row with no horizontal
//! reduction, and the eight scales multiply as one vector. The repacked matrix is read front to back
//! and keeps the file's bytes per block (f16 scales).
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so every format stores its values unsigned (the
//! 4-bit ones are, Q8_0 is offset by 128); what turns a block's exact integer sums into its
//! contribution — the scales, and the minimum or the offset — is the format's
//! [`Interleaved::accumulate`].

/// Rows per interleaved group.
pub const ROWS: usize = 8;

/// A format repacked eight rows at a time: one value of this type is block `b` of eight rows.
pub trait Interleaved: Copy + Sync {
    /// The file's block of one row.
    type FileBlock;
    /// The activation blocks it multiplies.
    type Act: Send + Sync;
    /// Activation rows (a whole number of blocks) into `Act` blocks, as ggml quantizes them.
    fn quantize(x: &[f32], out: &mut Vec<Self::Act>);
    /// Row `r`'s block as the file stores it (scales widened to f32, exactly).
    fn block(&self, r: usize) -> Self::FileBlock;
    /// The portable dot product of a row's blocks with a token's.
    fn dot(w: &[Self::FileBlock], x: &[Self::Act]) -> f32;
    #[cfg(target_arch = "x86_64")]
    fn act_qs(x: &Self::Act) -> &[i8; 32];
    /// The eight registers of this block as `vpdpbusd` takes them (unsigned bytes): register k holds
    /// values 4k..4k+4 of every row, one row per 32-bit lane.
    ///
    /// # Safety
    /// AVX2 must be enabled in the caller.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack(&self) -> [std::arch::x86_64::__m256i; 8];
    /// The eight rows' integer sums Σ u·x of `unpack`'s registers against a block, with AVX2 only
    /// (as `vpdpbusd` would give them).
    ///
    /// # Safety
    /// AVX2 must be enabled in the caller.
    #[cfg(target_arch = "x86_64")]
    unsafe fn sums_avx2(
        w: &[std::arch::x86_64::__m256i; 8],
        x: &Self::Act,
    ) -> std::arch::x86_64::__m256i;
    /// `acc` plus this block's contribution to the eight rows, given their integer sums Σ u·x.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be enabled in the caller.
    #[cfg(target_arch = "x86_64")]
    unsafe fn accumulate(
        &self,
        sums: std::arch::x86_64::__m256i,
        x: &Self::Act,
        acc: std::arch::x86_64::__m256,
    ) -> std::arch::x86_64::__m256;
}

/// Row `row`'s blocks, in the file's layout.
pub fn row_blocks<P: Interleaved>(
    packed: &[P],
    nb: usize,
    row: usize,
    out: &mut Vec<P::FileBlock>,
) {
    out.clear();
    let group = &packed[(row / ROWS) * nb..(row / ROWS + 1) * nb];
    out.extend(group.iter().map(|g| g.block(row % ROWS)));
}

/// `out` [tokens, stride] (its first `rows` columns, a multiple of eight) = the rows in `w` times
/// the `tokens` activation rows in `x`, with the portable dot products.
#[allow(clippy::too_many_arguments)]
pub fn portable<P: Interleaved>(
    w: &[P],
    x: &[P::Act],
    nb: usize,
    rows: usize,
    tokens: usize,
    out: &mut [f32],
    stride: usize,
) {
    let mut wr = Vec::with_capacity(nb);
    for r in 0..rows {
        row_blocks(w, nb, r, &mut wr);
        for (t, xt) in x.chunks_exact(nb).take(tokens).enumerate() {
            out[t * stride + r] = P::dot(&wr, xt);
        }
    }
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
    pub(in super::super) unsafe fn x4(qs: &[i8; 32], k: usize) -> __m256i {
        // SAFETY: k < 8, so the four bytes lie within the block.
        unsafe { _mm256_set1_epi32((qs.as_ptr().add(4 * k) as *const i32).read_unaligned()) }
    }

    /// Integer sums with AVX-512 VNNI (on 256-bit registers through AVX-512VL).
    #[inline(always)]
    unsafe fn sums_vnni(w: &[__m256i; 8], x: &[i8; 32]) -> __m256i {
        // SAFETY: AVX-512 VNNI and VL are enabled by the entry point. Two chains halve the latency;
        // |Σ u·x| ≤ 32·255·127, far inside 32 bits.
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

    /// Eight rows × T tokens: out[t·stride + r].
    #[inline(always)]
    unsafe fn tile<P: Interleaved, const VNNI: bool, const T: usize>(
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
                let wq = wb.unpack();
                for (t, acc) in acc.iter_mut().enumerate() {
                    let xb = x.get_unchecked(t * nb + b);
                    let sums = if VNNI {
                        sums_vnni(&wq, P::act_qs(xb))
                    } else {
                        P::sums_avx2(&wq, xb)
                    };
                    *acc = wb.accumulate(sums, xb, *acc);
                }
            }
            for (t, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(t * stride), *acc);
            }
        }
    }

    macro_rules! entry_point {
        ($name:ident, $vnni:literal, $features:literal) => {
            /// # Safety
            /// The CPU must have the features this function is compiled with.
            #[target_feature(enable = $features)]
            unsafe fn $name<P: Interleaved>(
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
                            unsafe { tile::<P, $vnni, 4>(wg, xt, nb, o, stride) };
                            t += 4;
                        } else {
                            unsafe { tile::<P, $vnni, 1>(wg, xt, nb, o, stride) };
                            t += 1;
                        }
                    }
                }
            }
        };
    }

    entry_point!(groups_avx2, false, "avx2,fma,f16c");
    entry_point!(
        groups_vnni,
        true,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni"
    );

    /// `out` [tokens, stride] (its first groups·8 columns) = the `groups` interleaved row groups in
    /// `w` times the `tokens` activation rows in `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn groups_times_tokens<P: Interleaved>(
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

#[cfg(target_arch = "x86_64")]
pub(super) use simd::x4;
