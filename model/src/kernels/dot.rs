//! Block dot products, each in two versions: a portable one and an AVX2+FMA one chosen at run time.
//! Both follow the structure of ggml's AVX2 kernels (eight lanes of four products, one fused
//! multiply-add per lane and block, the same horizontal sum), so they agree with each other and with
//! llama.cpp to the last bit in the common case.

use super::blocks::{Q4_0, Q4_1, Q8_0, Q8_1, QK};

/// Σ over blocks of w·x for one weight row and one activation row.
pub type DotQ4_1 = fn(&[Q4_1], &[Q8_1]) -> f32;
pub type DotQ4_0 = fn(&[Q4_0], &[Q8_0]) -> f32;
pub type DotQ8_0 = fn(&[Q8_0], &[Q8_0]) -> f32;

/// The dot products this CPU runs fastest.
#[derive(Clone, Copy)]
pub struct Dots {
    pub q4_1: DotQ4_1,
    pub q4_0: DotQ4_0,
    pub q8_0: DotQ8_0,
    pub name: &'static str,
}

pub const PORTABLE: Dots = Dots {
    q4_1: portable::q4_1,
    q4_0: portable::q4_0,
    q8_0: portable::q8_0,
    name: "portable",
};

/// Detected once; `PAI_KERNELS=portable` forces the fallback.
pub fn best() -> Dots {
    static BEST: std::sync::OnceLock<Dots> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        if std::env::var("PAI_KERNELS").is_ok_and(|v| v == "portable") {
            return PORTABLE;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Dots {
                q4_1: avx2::q4_1,
                q4_0: avx2::q4_0,
                q8_0: avx2::q8_0,
                name: "avx2",
            };
        }
        PORTABLE
    })
}

/// Unpacked 4-bit value `j` (0..32) of a block: low nibbles first, then high nibbles.
#[inline(always)]
fn nibble(qs: &[u8; 16], j: usize) -> i32 {
    if j < 16 {
        i32::from(qs[j] & 0x0F)
    } else {
        i32::from(qs[j - 16] >> 4)
    }
}

/// ggml's `hsum_float_8` order.
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[4] + a[0]) + (a[6] + a[2])) + ((a[5] + a[1]) + (a[7] + a[3]))
}

pub mod portable {
    use super::*;

    pub fn q4_1(w: &[Q4_1], x: &[Q8_1]) -> f32 {
        let mut acc = [0f32; 8];
        let mut summs = 0f32;
        for (wb, xb) in w.iter().zip(x) {
            summs = wb.m.mul_add(xb.s, summs);
            let d = wb.d * xb.d;
            for (lane, a) in acc.iter_mut().enumerate() {
                let s: i32 = (lane * 4..lane * 4 + 4)
                    .map(|j| nibble(&wb.qs, j) * i32::from(xb.qs[j]))
                    .sum();
                *a = d.mul_add(s as f32, *a);
            }
        }
        hsum8(&acc) + summs
    }

    pub fn q4_0(w: &[Q4_0], x: &[Q8_0]) -> f32 {
        let mut acc = [0f32; 8];
        for (wb, xb) in w.iter().zip(x) {
            let d = wb.d * xb.d;
            for (lane, a) in acc.iter_mut().enumerate() {
                let s: i32 = (lane * 4..lane * 4 + 4)
                    .map(|j| (nibble(&wb.qs, j) - 8) * i32::from(xb.qs[j]))
                    .sum();
                *a = d.mul_add(s as f32, *a);
            }
        }
        hsum8(&acc)
    }

    pub fn q8_0(w: &[Q8_0], x: &[Q8_0]) -> f32 {
        let mut acc = [0f32; 8];
        for (wb, xb) in w.iter().zip(x) {
            let d = wb.d * xb.d;
            for (lane, a) in acc.iter_mut().enumerate() {
                let s: i32 = (lane * 4..lane * 4 + 4)
                    .map(|j| i32::from(wb.qs[j]) * i32::from(xb.qs[j]))
                    .sum();
                *a = d.mul_add(s as f32, *a);
            }
        }
        hsum8(&acc)
    }

    const _: () = assert!(QK == 32);
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    // SAFETY (all functions here): called only through `best()`, after AVX2 and FMA were detected;
    // every load reads within a block (16 or 32 bytes, unaligned loads).

    #[inline(always)]
    unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
        let tmp = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
        let bytes = _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
        _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
    }

    /// Unsigned × signed bytes, summed four at a time into eight f32 lanes.
    #[inline(always)]
    unsafe fn mul_sum_us8(ax: __m256i, sy: __m256i) -> __m256 {
        let dot = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)))
    }

    /// Signed × signed bytes (sign moved onto y so maddubs can take |x|).
    #[inline(always)]
    unsafe fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256 {
        mul_sum_us8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    #[inline(always)]
    unsafe fn hsum(acc: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4_1_impl(w: &[Q4_1], x: &[Q8_1]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for (wb, xb) in w.iter().zip(x) {
            summs = wb.m.mul_add(xb.s, summs);
            let d = _mm256_set1_ps(wb.d * xb.d);
            let qy = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(d, mul_sum_us8(nibbles(&wb.qs), qy), acc);
        }
        hsum(acc) + summs
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q4_0_impl(w: &[Q4_0], x: &[Q8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (wb, xb) in w.iter().zip(x) {
            let d = _mm256_set1_ps(wb.d * xb.d);
            let qx = _mm256_sub_epi8(nibbles(&wb.qs), _mm256_set1_epi8(8));
            let qy = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(d, mul_sum_i8(qx, qy), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q8_0_impl(w: &[Q8_0], x: &[Q8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (wb, xb) in w.iter().zip(x) {
            let d = _mm256_set1_ps(wb.d * xb.d);
            let qx = _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i);
            let qy = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(d, mul_sum_i8(qx, qy), acc);
        }
        hsum(acc)
    }

    pub fn q4_1(w: &[Q4_1], x: &[Q8_1]) -> f32 {
        // SAFETY: see the module comment.
        unsafe { q4_1_impl(w, x) }
    }

    pub fn q4_0(w: &[Q4_0], x: &[Q8_0]) -> f32 {
        // SAFETY: see the module comment.
        unsafe { q4_0_impl(w, x) }
    }

    pub fn q8_0(w: &[Q8_0], x: &[Q8_0]) -> f32 {
        // SAFETY: see the module comment.
        unsafe { q8_0_impl(w, x) }
    }
}
