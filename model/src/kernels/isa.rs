//! Which x86-64 SIMD instruction set the quantized kernels run on (AVX2, or AVX-512 VNNI on 256-bit
//! registers through AVX-512VL, which also doubles the registers a kernel's tile can live in), and
//! the horizontal sum they share.

use std::arch::x86_64::*;

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

/// An instruction set for the kernels that this CPU has (only [`Simd::available`] makes one).
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
