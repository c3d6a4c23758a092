//! The x86-64 SIMD kernels for row-major formats (Q4_0; Q4_1 and Q8_0 are repacked, see `q4_1x8.rs`
//! and `q8_0x8.rs`): a tile of up to 4 weight rows × 4 tokens at a time.
//!
//! A tile unpacks each weight block once and loads each activation block once, then forms all 16
//! block products from registers, so a prefill pays the nibble unpacking once per four tokens and the
//! loads once per four products. The block product itself is ggml's: eight i32 lanes of four byte
//! products each, scaled by d_w·d_x and fused-added into eight f32 lanes, summed at the end in ggml's
//! order — so every tile size gives bit-identical results to the portable
//! reference in `dot.rs`, and to llama.cpp.
//!
//! Two instruction sets for the byte products: AVX2 (`vpmaddubsw` + `vpmaddwd`) and AVX-512 VNNI
//! (`vpdpbusd`, one instruction, on 256-bit registers through AVX-512VL, which also doubles the
//! registers the tile can live in).

use std::arch::x86_64::*;

use super::blocks::{Q4_0, Q8_0, QK};

/// The byte dot product: per i32 lane, Σ of four unsigned × signed byte products.
pub trait Isa {
    unsafe fn dot_us8(u: __m256i, s: __m256i) -> __m256i;
}

pub struct Avx2;
impl Isa for Avx2 {
    #[inline(always)]
    unsafe fn dot_us8(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: called only inside functions compiled with AVX2 (the `*_avx2` entry points).
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
    }
}

pub struct Vnni;
impl Isa for Vnni {
    #[inline(always)]
    unsafe fn dot_us8(u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: called only inside functions compiled with AVX-512 VNNI and VL.
        unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s) }
    }
}

/// A weight block format and the activation blocks it pairs with.
pub trait WeightBlock: Copy + Sync {
    type Act: Copy + Sync;
    fn d(&self) -> f32;
    fn act_d(x: &Self::Act) -> f32;
    fn act_qs(x: &Self::Act) -> &[i8; QK];
    /// The 32 weight values as bytes, ready for `pair`.
    unsafe fn unpack(&self) -> __m256i;
    /// Per-lane sums of four products of unpacked weights and activation bytes.
    unsafe fn pair<I: Isa>(w: __m256i, x: __m256i) -> __m256i;
}

#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    // SAFETY: reads the 16 bytes of `qs`; AVX2 is enabled in every caller.
    unsafe {
        let tmp = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
        let bytes = _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
        _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
    }
}

/// Signed × signed bytes: the sign moves onto the activations so the weights can go in unsigned.
#[inline(always)]
unsafe fn pair_signed<I: Isa>(w: __m256i, x: __m256i) -> __m256i {
    // SAFETY: AVX2 is enabled in every caller.
    unsafe { I::dot_us8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)) }
}

impl WeightBlock for Q4_0 {
    type Act = Q8_0;
    fn d(&self) -> f32 {
        self.d
    }
    fn act_d(x: &Q8_0) -> f32 {
        x.d
    }
    fn act_qs(x: &Q8_0) -> &[i8; QK] {
        &x.qs
    }
    #[inline(always)]
    unsafe fn unpack(&self) -> __m256i {
        // SAFETY: as `nibbles`.
        unsafe { _mm256_sub_epi8(nibbles(&self.qs), _mm256_set1_epi8(8)) }
    }
    #[inline(always)]
    unsafe fn pair<I: Isa>(w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: as `pair_signed`.
        unsafe { pair_signed::<I>(w, x) }
    }
}

/// ggml's `hsum_float_8`.
#[inline(always)]
pub(super) unsafe fn hsum(acc: __m256) -> f32 {
    // SAFETY: register-only AVX operations.
    unsafe {
        let s = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// out[c·stride + r] = row r of `w` · token c of `x`, for R rows and C tokens (each `nb` blocks long,
/// rows and tokens consecutive in `w` and `x`).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // (r, c) index a register tile; iterators obscure it.
unsafe fn tile<W: WeightBlock, I: Isa, const R: usize, const C: usize>(
    w: &[W],
    x: &[W::Act],
    nb: usize,
    out: &mut [f32],
    stride: usize,
) {
    // SAFETY: indices stay below R·nb in `w`, C·nb in `x` and (C−1)·stride + R in `out` (asserted by
    // the callers' slicing); the SIMD features are enabled by the entry points.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..nb {
            let wb: [&W; R] = std::array::from_fn(|r| w.get_unchecked(r * nb + b));
            let wq: [__m256i; R] = std::array::from_fn(|r| wb[r].unpack());
            for c in 0..C {
                let xb = x.get_unchecked(c * nb + b);
                let xq = _mm256_loadu_si256(W::act_qs(xb).as_ptr() as *const __m256i);
                let xd = W::act_d(xb);
                for r in 0..R {
                    let d = _mm256_set1_ps(wb[r].d() * xd);
                    let p = _mm256_cvtepi32_ps(W::pair::<I>(wq[r], xq));
                    acc[r][c] = _mm256_fmadd_ps(d, p, acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                *out.get_unchecked_mut(c * stride + r) = hsum(acc[r][c]);
            }
        }
    }
}

/// An instruction set for the tiles that this CPU has (only [`Simd::available`] makes one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Simd(Isas);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isas {
    Avx2,
    Avx512Vnni,
}

impl Simd {
    /// The instruction sets this CPU has, best last.
    pub fn available() -> Vec<Self> {
        use std::arch::is_x86_feature_detected as has;
        let mut found = Vec::new();
        if has!("avx2") && has!("fma") && has!("f16c") {
            found.push(Simd(Isas::Avx2));
            if has!("avx512f") && has!("avx512vnni") && has!("avx512vl") && has!("f16c") {
                found.push(Simd(Isas::Avx512Vnni));
            }
        }
        found
    }

    pub fn has_vnni(self) -> bool {
        self.0 == Isas::Avx512Vnni
    }

    pub fn name(self) -> &'static str {
        match self.0 {
            Isas::Avx2 => "avx2",
            Isas::Avx512Vnni => "avx512-vnni",
        }
    }
}

macro_rules! entry_points {
    ($name:ident, $isa:ty, $features:literal) => {
        /// Rows × tokens for one task: `w` holds `rows` consecutive rows of `nb` blocks, `x` `tokens`
        /// consecutive tokens; `out` is [tokens, stride], of which this writes the first `rows` columns.
        ///
        /// # Safety
        /// The CPU must have the features this function is compiled with.
        #[target_feature(enable = $features)]
        unsafe fn $name<W: WeightBlock>(
            w: &[W],
            x: &[W::Act],
            nb: usize,
            rows: usize,
            tokens: usize,
            out: &mut [f32],
            stride: usize,
        ) {
            assert!(rows <= stride && w.len() >= rows * nb && x.len() >= tokens * nb);
            assert!(tokens == 0 || out.len() >= (tokens - 1) * stride + rows);
            let mut r = 0;
            while r < rows {
                let four_rows = rows - r >= 4 && tokens > 1;
                let wr = &w[r * nb..];
                let mut t = 0;
                while t < tokens {
                    let xt = &x[t * nb..];
                    let o = &mut out[t * stride + r..];
                    // SAFETY: the slices hold the rows and tokens this tile reads and writes (checked
                    // by the assertion and the loop bounds); the features are enabled here.
                    unsafe {
                        match (four_rows, tokens - t >= 4) {
                            (true, true) => tile::<W, $isa, 4, 4>(wr, xt, nb, o, stride),
                            (true, false) => tile::<W, $isa, 4, 1>(wr, xt, nb, o, stride),
                            (false, true) => tile::<W, $isa, 1, 4>(wr, xt, nb, o, stride),
                            (false, false) => tile::<W, $isa, 1, 1>(wr, xt, nb, o, stride),
                        }
                    }
                    t += if tokens - t >= 4 { 4 } else { 1 };
                }
                r += if four_rows { 4 } else { 1 };
            }
        }
    };
}

entry_points!(rows_times_tokens_avx2, Avx2, "avx2,fma");
entry_points!(
    rows_times_tokens_vnni,
    Vnni,
    "avx2,fma,avx512f,avx512vl,avx512vnni"
);

/// `out` [tokens, stride] (its first `rows` columns) = the `rows` weight rows in `w` times the `tokens`
/// activation rows in `x`.
#[allow(clippy::too_many_arguments)]
pub fn rows_times_tokens<W: WeightBlock>(
    simd: Simd,
    w: &[W],
    x: &[W::Act],
    nb: usize,
    rows: usize,
    tokens: usize,
    out: &mut [f32],
    stride: usize,
) {
    // SAFETY: a `Simd` is only made by `Simd::available`, which checked this CPU.
    unsafe {
        match simd.0 {
            Isas::Avx2 => rows_times_tokens_avx2(w, x, nb, rows, tokens, out, stride),
            Isas::Avx512Vnni => rows_times_tokens_vnni(w, x, nb, rows, tokens, out, stride),
        }
    }
}
