//! Causal self-attention on the CPU, straight out of the KV cache's buffers.
//!
//! Through candle, each layer of a decode step cost a batched matmul for the scores, a mask, a softmax and
//! a second matmul, each allocating its result (and candle's matmul re-reads `/proc/cpuinfo` on every
//! call). Here each query row is one pass: scores against the cached keys it may see (causal, and the
//! sliding window when the model has one), a softmax in place, and the weighted sum of values, with the
//! work split over the kernel pool by (sequence, head, query rows). Nothing is allocated per key or per
//! layer beyond one scratch row per task and the output.
//!
//! The cache holds keys and values as f32 (exact, for dense f32 models and the comparisons with
//! transformers) or f16 (half the memory; what quantized models use, as llama.cpp does by default). With
//! f16 the arithmetic rounds as llama.cpp's does: the query is rounded to f16 for q·k and the
//! probabilities to f16 for the weighted sum of values; everything accumulates in f32.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::f16;

use super::pool;
use crate::error::Result;

/// Which keys each query sees, and the shapes involved.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions cached before this call's first query.
    pub offset: usize,
    /// Keys further back than this from the query are masked out.
    pub window: Option<usize>,
}

/// softmax(q·kᵀ/√d, causal) · v for q [batch, heads, seq, head_dim] (queries at positions `offset..`)
/// (f32) and k, v [batch, kv_heads, offset + seq, head_dim] (both f32 or both f16, possibly views of a
/// larger cache buffer). Returns [batch, seq, heads · head_dim], or `None` when the tensors are not on the
/// CPU with those dtypes (the caller then uses candle's ops).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: AttentionSpec,
) -> Result<Option<Tensor>> {
    let on_cpu = |t: &Tensor| matches!(t.device(), Device::Cpu);
    if !(on_cpu(q) && on_cpu(k) && on_cpu(v) && q.dtype() == DType::F32) {
        return Ok(None);
    }
    let (batch, heads, seq, hd) = q.dims4()?;
    let total = k.dim(2)?;
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(qd)) = &*qs else {
        return Ok(None);
    };
    let rows = |l: &candle_core::Layout| -> Option<(usize, [usize; 3])> {
        let s = l.stride();
        (s.len() == 4 && s[3] == 1).then(|| (l.start_offset(), [s[0], s[1], s[2]]))
    };
    let Some(qv) = rows(ql) else {
        return Ok(None);
    };
    let (Some(kl), Some(vl)) = (rows(kl), rows(vl)) else {
        return Ok(None);
    };
    let qv = View::new(qd, qv);
    let mut out = vec![0f32; batch * heads * seq * hd];
    match (&*ks, &*vs) {
        (Storage::Cpu(CpuStorage::F16(kd)), Storage::Cpu(CpuStorage::F16(vd))) => {
            let (kv, vv) = (View::new(kd, kl), View::new(vd, vl));
            run(&qv, &kv, &vv, &mut out, batch, seq, total, spec);
        }
        (Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) => {
            let (kv, vv) = (View::new(kd, kl), View::new(vd, vl));
            run(&qv, &kv, &vv, &mut out, batch, seq, total, spec);
        }
        _ => return Ok(None),
    }
    drop((qs, ks, vs));
    Ok(Some(Tensor::from_vec(
        out,
        (batch, seq, heads * hd),
        &Device::Cpu,
    )?))
}

/// A strided [batch, heads, positions, head_dim] view with contiguous rows.
struct View<'a, T> {
    data: &'a [T],
    strides: [usize; 3],
}

impl<'a, T> View<'a, T> {
    fn new(data: &'a [T], (start, strides): (usize, [usize; 3])) -> Self {
        Self {
            data: &data[start..],
            strides,
        }
    }

    fn row(&self, b: usize, h: usize, p: usize, hd: usize) -> &[T] {
        let at = b * self.strides[0] + h * self.strides[1] + p * self.strides[2];
        &self.data[at..at + hd]
    }
}

/// Fill `out` ([batch, seq, heads, head_dim]), split over the pool by (batch, head, block of queries).
#[allow(clippy::too_many_arguments)]
fn run<T: CacheElem>(
    q: &View<f32>,
    k: &View<T>,
    v: &View<T>,
    out: &mut [f32],
    batch: usize,
    seq: usize,
    total: usize,
    spec: AttentionSpec,
) {
    let (heads, hd) = (spec.heads, spec.head_dim);
    let rep = heads / spec.kv_heads;
    // Enough tasks to balance (later queries see more keys), few enough to be worth handing out.
    let per_head = (4 * pool().threads()).div_ceil(batch * heads);
    let queries_per_task = seq.div_ceil(per_head).max(1);
    let blocks = seq.div_ceil(queries_per_task);
    let piece = queries_per_task * hd;
    let simd = simd_available();
    // Results go to [batch, heads, blocks, queries_per_task, hd] (the last block of a head padded), so
    // each task owns one piece; they are moved into `out`'s order below.
    let mut by_head = vec![0f32; batch * heads * blocks * piece];
    let task = |i: usize, dst: &mut [f32]| {
        let (bh, block) = (i / blocks, i % blocks);
        let (b, h) = (bh / heads, bh % heads);
        let first = block * queries_per_task;
        let mut scores = vec![0f32; total];
        let mut q_rounded = vec![0f32; hd];
        for (n, o) in dst.chunks_exact_mut(hd).enumerate().take(seq - first) {
            let pos = spec.offset + first + n;
            let lo = spec.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            for (r, &x) in q_rounded.iter_mut().zip(q.row(b, h, first + n, hd)) {
                *r = T::round(x);
            }
            let row = QueryRow {
                q: &q_rounded,
                k,
                v,
                b,
                kv_head: h / rep,
                keys: lo..pos + 1,
            };
            row.attend(&mut scores[..pos + 1 - lo], o, simd);
        }
    };
    let work = batch * heads * seq * total * hd;
    if work < 1 << 15 {
        // Too little to hand out (a short decode step).
        for (i, dst) in by_head.chunks_mut(piece).enumerate() {
            task(i, dst);
        }
    } else {
        pool().for_each_piece(&mut by_head, piece, task);
    }
    for b in 0..batch {
        for h in 0..heads {
            for t in 0..seq {
                let src = (((b * heads + h) * blocks) * queries_per_task + t) * hd;
                let dst = ((b * seq + t) * heads + h) * hd;
                out[dst..dst + hd].copy_from_slice(&by_head[src..src + hd]);
            }
        }
    }
}

/// Whether the AVX2 path may run: the kernels are not forced portable and the CPU has AVX2, FMA, F16C.
pub(super) fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd_selected()
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// An element of the KV cache.
trait CacheElem: Copy + Sync {
    /// A value as the arithmetic sees it next to this cache (f16 rounding for an f16 cache).
    fn round(x: f32) -> f32;
    fn to_f32(self) -> f32;
    /// Eight elements from `p` as f32.
    ///
    /// # Safety
    /// `p..p + 8` must be readable, and the CPU must have AVX and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// `round` on eight lanes.
    ///
    /// # Safety
    /// The CPU must have AVX and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn round8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256;
}

impl CacheElem for f32 {
    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn round8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
        x
    }
}

impl CacheElem for f16 {
    #[inline(always)]
    fn round(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn round8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract.
        unsafe { _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x)) }
    }
}

/// One query (already rounded as the cache's type wants) against the keys it may see.
struct QueryRow<'a, T> {
    q: &'a [f32],
    k: &'a View<'a, T>,
    v: &'a View<'a, T>,
    b: usize,
    kv_head: usize,
    keys: std::ops::Range<usize>,
}

impl<T: CacheElem> QueryRow<'_, T> {
    fn attend(&self, scores: &mut [f32], out: &mut [f32], simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd && self.q.len().is_multiple_of(8) {
            // SAFETY: `simd` is set only when this CPU has AVX2, FMA and F16C; rows are a multiple of 8.
            unsafe { self.attend_avx2(scores, out) };
            return;
        }
        let _ = simd;
        self.attend_portable(scores, out);
    }

    fn attend_portable(&self, scores: &mut [f32], out: &mut [f32]) {
        let hd = self.q.len();
        let scale = 1.0 / (hd as f32).sqrt();
        // 1. Scores, and their maximum.
        let mut max = f32::NEG_INFINITY;
        for (s, j) in scores.iter_mut().zip(self.keys.clone()) {
            let k = self.k.row(self.b, self.kv_head, j, hd);
            let mut acc = [0f32; 8];
            for (i, (&q, k)) in self.q.iter().zip(k).enumerate() {
                acc[i % 8] += q * k.to_f32();
            }
            *s = acc.iter().sum::<f32>() * scale;
            max = max.max(*s);
        }
        // 2. Probabilities (rounded as the cache's type wants).
        let sum = softmax_numerators(scores, max);
        // 3. Weighted sum of values.
        out.fill(0.0);
        let inv = 1.0 / sum;
        for (&p, j) in scores.iter().zip(self.keys.clone()) {
            let p = T::round(p * inv);
            for (o, v) in out.iter_mut().zip(self.v.row(self.b, self.kv_head, j, hd)) {
                *o += p * v.to_f32();
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn attend_avx2(&self, scores: &mut [f32], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let hd = self.q.len();
        let n = scores.len();
        let scale = _mm256_set1_ps(1.0 / (hd as f32).sqrt());
        let key = |j: usize| {
            self.k
                .row(self.b, self.kv_head, self.keys.start + j, hd)
                .as_ptr()
        };
        let value = |j: usize| {
            self.v
                .row(self.b, self.kv_head, self.keys.start + j, hd)
                .as_ptr()
        };
        let q = self.q.as_ptr();
        // 1. Scores, eight keys at a time: eight accumulators, then one transposing reduction.
        let mut j = 0;
        while j + 8 <= n {
            let keys: [*const T; 8] = std::array::from_fn(|m| key(j + m));
            let mut acc = [_mm256_setzero_ps(); 8];
            for i in (0..hd).step_by(8) {
                let qv = _mm256_loadu_ps(q.add(i));
                for (a, k) in acc.iter_mut().zip(keys) {
                    *a = _mm256_fmadd_ps(qv, T::load8(k.add(i)), *a);
                }
            }
            let s = _mm256_mul_ps(sum8(&acc), scale);
            _mm256_storeu_ps(scores.as_mut_ptr().add(j), s);
            j += 8;
        }
        for (m, s) in scores.iter_mut().enumerate().skip(j) {
            let k = key(m);
            let mut acc = _mm256_setzero_ps();
            for i in (0..hd).step_by(8) {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), T::load8(k.add(i)), acc);
            }
            *s = _mm256_cvtss_f32(_mm256_mul_ps(_mm256_set1_ps(super::isa::hsum(acc)), scale));
        }
        // 2. Probabilities, rounded as the cache's type wants.
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let maxv = _mm256_set1_ps(max);
        let mut sumv = _mm256_setzero_ps();
        let mut j = 0;
        while j + 8 <= n {
            let p = scores.as_mut_ptr().add(j);
            let e = super::elementwise::exp8(_mm256_sub_ps(_mm256_loadu_ps(p), maxv));
            sumv = _mm256_add_ps(sumv, e);
            _mm256_storeu_ps(p, e);
            j += 8;
        }
        let mut sum = super::isa::hsum(sumv);
        for s in &mut scores[j..] {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = _mm256_set1_ps(1.0 / sum);
        let mut j = 0;
        while j + 8 <= n {
            let p = scores.as_mut_ptr().add(j);
            _mm256_storeu_ps(p, T::round8(_mm256_mul_ps(_mm256_loadu_ps(p), inv)));
            j += 8;
        }
        for s in &mut scores[j..] {
            *s = T::round(*s * (1.0 / sum));
        }
        // 3. Weighted sum of values, 64 output columns at a time held in registers.
        for c in (0..hd).step_by(64) {
            let width = (hd - c).min(64) / 8;
            let mut acc = [_mm256_setzero_ps(); 8];
            if width == 8 {
                for (j, &p) in scores.iter().enumerate() {
                    let (p, v) = (_mm256_set1_ps(p), value(j).add(c));
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(p, T::load8(v.add(8 * r)), *a);
                    }
                }
            } else {
                for (j, &p) in scores.iter().enumerate() {
                    let (p, v) = (_mm256_set1_ps(p), value(j).add(c));
                    for (r, a) in acc.iter_mut().enumerate().take(width) {
                        *a = _mm256_fmadd_ps(p, T::load8(v.add(8 * r)), *a);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(width) {
                _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * r), *a);
            }
        }
    }
}

/// The eight horizontal sums of `acc`, in order, as one vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn sum8(acc: &[std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // Pairwise adds: after two rounds each 128-bit half holds four partial sums; the two halves of
    // inputs 0-3 and 4-7 are then brought together.
    let a = _mm256_hadd_ps(
        _mm256_hadd_ps(acc[0], acc[1]),
        _mm256_hadd_ps(acc[2], acc[3]),
    );
    let b = _mm256_hadd_ps(
        _mm256_hadd_ps(acc[4], acc[5]),
        _mm256_hadd_ps(acc[6], acc[7]),
    );
    // a = [s0l s1l s2l s3l | s0h s1h s2h s3h], likewise b for 4-7.
    let lo = _mm256_permute2f128_ps(a, b, 0x20);
    let hi = _mm256_permute2f128_ps(a, b, 0x31);
    _mm256_add_ps(lo, hi)
}

/// Replace each score by exp(score − max); returns their sum.
#[inline(always)]
fn softmax_numerators(scores: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn eight_horizontal_sums_come_out_in_order() {
        if !simd_available() {
            return;
        }
        let rows: Vec<[f32; 8]> = (0..8)
            .map(|r| std::array::from_fn(|i| (r * 8 + i) as f32 * 0.5 - r as f32))
            .collect();
        let mut got = [0f32; 8];
        // SAFETY: simd_available() checked AVX2.
        unsafe {
            use std::arch::x86_64::*;
            let acc: [__m256; 8] = std::array::from_fn(|r| _mm256_loadu_ps(rows[r].as_ptr()));
            _mm256_storeu_ps(got.as_mut_ptr(), sum8(&acc));
        }
        for (r, row) in rows.iter().enumerate() {
            assert_eq!(got[r], row.iter().sum::<f32>());
        }
    }
}
