//! The elementwise steps of a block on the CPU: RMSNorm, SwiGLU's silu(gate)·up, and the residual add.
//!
//! candle runs these on its own spin-barrier thread pool once a tensor passes 64K elements (every
//! prefill): its workers spin between ops, which showed as 5% of prefill time, and the pool stalls when
//! another process holds a core — the failure this crate's pool exists to avoid. Here they run on pai's
//! pool (`pool.rs`), split by rows, and silu uses a vectorised exp. Each function answers `None` for
//! tensors it does not take (not f32, not on the CPU, not contiguous), and the caller uses candle's op.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use super::pool;
use crate::error::Result;

/// Below this many elements an op runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// Calls `f` with a CPU f32 tensor's contiguous data, or answers `None`.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !matches!(t.device(), Device::Cpu) || t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    Some(f(&data[start..end]))
}

/// `out[i] = f(i, …)` over rows of `row_len` elements, on the pool when the output is large.
fn fill_rows(len: usize, row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; len];
    if len < PARALLEL_MIN || row_len == 0 {
        for (r, row) in out.chunks_mut(row_len.max(1)).enumerate() {
            f(r, row);
        }
        return out;
    }
    // Whole rows per piece, about 16K elements each: enough pieces to balance, few enough to be cheap.
    let rows_per_piece = (PARALLEL_MIN / 4).div_ceil(row_len).max(1);
    pool().for_each_piece(&mut out, rows_per_piece * row_len, |piece, dst| {
        for (r, row) in dst.chunks_mut(row_len).enumerate() {
            f(piece * rows_per_piece + r, row);
        }
    });
    out
}

/// x / rms(x) · weight over the last dimension, as candle_nn's `rms_norm`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Option<Tensor>> {
    let hidden = x.dim(candle_core::D::Minus1)?;
    let out = with_f32(x, |x| {
        with_f32(weight, |w| {
            (w.len() == hidden).then(|| {
                fill_rows(x.len(), hidden, |r, out| {
                    let row = &x[r * hidden..(r + 1) * hidden];
                    let scale = 1.0 / (sum_of_squares(row) / hidden as f32 + eps).sqrt();
                    for ((o, &v), &w) in out.iter_mut().zip(row).zip(w) {
                        *o = v * scale * w;
                    }
                })
            })
        })
    });
    let Some(Some(Some(out))) = out else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(out, x.shape(), &Device::Cpu)?))
}

/// Σ v², in eight interleaved partial sums (which the compiler vectorises).
fn sum_of_squares(row: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// silu(gate) · up, elementwise: the middle of a SwiGLU MLP.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if gate.shape() != up.shape() {
        return Ok(None);
    }
    let row_len = gate.dim(candle_core::D::Minus1)?;
    let simd = super::attention::simd_available();
    let out = with_f32(gate, |g| {
        with_f32(up, |u| {
            fill_rows(g.len(), row_len, |r, out| {
                let span = r * row_len..(r + 1) * row_len;
                silu_mul_row(&g[span.clone()], &u[span], out, simd);
            })
        })
    });
    let Some(Some(out)) = out else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(out, gate.shape(), &Device::Cpu)?))
}

fn silu_mul_row(g: &[f32], u: &[f32], out: &mut [f32], simd: bool) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is set only when the CPU has AVX2 and FMA.
        done = unsafe { silu_mul_avx2(g, u, out) };
    }
    let _ = simd;
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u).skip(done) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// The leading multiple of eight of `silu_mul_row`; returns how many elements it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = out.len().min(g.len()).min(u.len()) / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 <= n, within all three slices.
        unsafe {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let uv = _mm256_loadu_ps(u.as_ptr().add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(silu, uv));
        }
    }
    n
}

/// a + b for two tensors of the same shape (the residual connections).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if a.shape() != b.shape() {
        return Ok(None);
    }
    let row_len = a.dim(candle_core::D::Minus1)?;
    let out = with_f32(a, |x| {
        with_f32(b, |y| {
            fill_rows(x.len(), row_len, |r, out| {
                let span = r * row_len..(r + 1) * row_len;
                for ((o, &x), &y) in out.iter_mut().zip(&x[span.clone()]).zip(&y[span]) {
                    *o = x + y;
                }
            })
        })
    });
    let Some(Some(out)) = out else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(out, a.shape(), &Device::Cpu)?))
}

/// e^x for eight lanes, within 2 ulp of `f32::exp` for −87.3 ≤ x ≤ 88; 0 below (where e^x is no longer
/// a normal f32), e^88 above. Range reduction to r = x − n·ln 2 with |r| ≤ ln 2 / 2 (ln 2 split in two
/// parts for exactness), a degree-6 polynomial for e^r (Cephes' coefficients), and 2^n put into the
/// exponent bits.
///
/// Replace each x by exp(x − shift) and return their sum (a softmax's numerators), with the vectorised
/// exp where the CPU has AVX2 and FMA (within 2 ulp of libm; 0 below f32's normal range).
pub fn exp_shifted(xs: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::attention::simd_available() {
        // SAFETY: AVX2 and FMA checked just above.
        return unsafe { exp_shifted_avx2(xs, shift) };
    }
    let mut sum = 0f32;
    for x in xs.iter_mut() {
        *x = (*x - shift).exp();
        sum += *x;
    }
    sum
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(xs: &mut [f32], shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let shiftv = _mm256_set1_ps(shift);
    let mut sumv = _mm256_setzero_ps();
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), shiftv));
        sumv = _mm256_add_ps(sumv, e);
        _mm256_storeu_ps(c.as_mut_ptr(), e);
    }
    let mut sum = super::isa::hsum(sumv);
    for x in chunks.into_remainder() {
        *x = (*x - shift).exp();
        sum += *x;
    }
    sum
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3), _CMP_LT_OQ);
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_andnot_ps(underflow, _mm256_mul_ps(e, _mm256_castsi256_ps(two_n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_exp_is_within_two_ulp_of_libm_and_zero_below_the_normal_range() {
        if !super::super::attention::simd_available() {
            return;
        }
        let xs: Vec<f32> = (-20_000..20_000)
            .map(|i| i as f32 * 0.0044)
            .chain([
                0.0,
                -1e-30,
                -87.0,
                -87.29,
                -87.4,
                -100.0,
                -1e30,
                f32::NEG_INFINITY,
            ])
            .collect();
        for x in xs.chunks(8) {
            let mut lanes = [0f32; 8];
            lanes[..x.len()].copy_from_slice(x);
            let mut got = [0f32; 8];
            // SAFETY: simd_available() checked AVX2 and FMA.
            unsafe {
                use std::arch::x86_64::*;
                _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(lanes.as_ptr())));
            }
            for (&x, &g) in lanes.iter().zip(&got) {
                let want = x.exp();
                if x < -87.3 {
                    assert_eq!(g, 0.0, "exp({x})");
                } else {
                    let ulps = (g.to_bits() as i64 - want.to_bits() as i64).abs();
                    assert!(ulps <= 2, "exp({x}) = {g}, libm {want} ({ulps} ulp)");
                }
            }
        }
    }

    /// Each op against candle's, small (calling thread) and large (the pool), with odd row lengths.
    #[test]
    fn ops_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for shape in [(3, 5, 37), (1, 600, 576), (2, 1, 8)] {
            let a = Tensor::randn(0f32, 2.0, shape, &dev)?;
            let b = Tensor::randn(0f32, 2.0, shape, &dev)?;
            let w = Tensor::randn(1f32, 0.2, shape.2, &dev)?;
            let close = |got: Option<Tensor>, want: Tensor, tol: f32| -> Result<()> {
                let got = got.expect("f32 contiguous on the CPU");
                assert_eq!(got.dims(), want.dims());
                let diff = (got - &want)?.abs()?.flatten_all()?.max(0)?;
                let diff = diff.to_scalar::<f32>()?;
                assert!(diff <= tol, "{shape:?}: {diff}");
                Ok(())
            };
            close(
                rms_norm(&a, &w, 1e-5)?,
                candle_nn::ops::rms_norm(&a, &w, 1e-5)?,
                1e-5,
            )?;
            close(silu_mul(&a, &b)?, (candle_nn::ops::silu(&a)? * &b)?, 1e-5)?;
            close(add(&a, &b)?, (&a + &b)?, 0.0)?;
        }
        // What it does not take, it leaves to candle.
        let t = Tensor::randn(0f32, 1.0, (4, 6), &dev)?;
        assert!(add(&t.t()?, &t.t()?)?.is_none());
        assert!(silu_mul(&t, &t.to_dtype(DType::F16)?)?.is_none());
        Ok(())
    }
}
