//! Block layouts of the quantized formats pai multiplies itself, and the quantization of activations
//! into 8-bit blocks exactly as ggml's x86 path does it (so the arithmetic matches llama.cpp's).
//!
//! Weight blocks keep their scales as f32 (converted once from the file's f16), so the kernels do no
//! conversion in the inner loop.

use half::f16;

/// Values per block in every format here.
pub const QK: usize = 32;

/// Q4_1 weights: w = d·q + m, q in 0..16; low nibbles hold values 0..16, high nibbles 16..32.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q4_1 {
    pub d: f32,
    pub m: f32,
    pub qs: [u8; 16],
}

/// Q4_0 weights: w = d·(q − 8).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q4_0 {
    pub d: f32,
    pub qs: [u8; 16],
}

/// Q8_0 blocks (weights, and with their sum the activations for Q4_0/Q8_0 weights): x = d·q.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8_0 {
    pub d: f32,
    pub qs: [i8; QK],
}

/// Q8_1 activation blocks (for Q4_1 weights): x = d·q, and s = d·Σq for the weights' minimum.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8_1 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

/// Q8_0 activation blocks with the exact sum of their values (for Q8_0 weights stored offset by 128,
/// `q8_0x8.rs`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8_0WithSum {
    pub block: Q8_0,
    pub sum: i32,
}

impl AsRef<Q8_0> for Q8_0WithSum {
    fn as_ref(&self) -> &Q8_0 {
        &self.block
    }
}

impl AsRef<Q8_0> for Q8_0 {
    fn as_ref(&self) -> &Q8_0 {
        self
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// Parse GGML's on-disk blocks (`block_q4_1`: f16 d, f16 m, 16 bytes).
pub fn parse_q4_1(data: &[u8]) -> Vec<Q4_1> {
    data.chunks_exact(20)
        .map(|b| Q4_1 {
            d: f16_at(b, 0),
            m: f16_at(b, 2),
            qs: array(&b[4..]),
        })
        .collect()
}

/// `block_q4_0`: f16 d, 16 bytes.
pub fn parse_q4_0(data: &[u8]) -> Vec<Q4_0> {
    data.chunks_exact(18)
        .map(|b| Q4_0 {
            d: f16_at(b, 0),
            qs: array(&b[2..]),
        })
        .collect()
}

/// `block_q8_0`: f16 d, 32 signed bytes.
pub fn parse_q8_0(data: &[u8]) -> Vec<Q8_0> {
    data.chunks_exact(34)
        .map(|b| Q8_0 {
            d: f16_at(b, 0),
            qs: array::<QK>(&b[2..]).map(|v| v as i8),
        })
        .collect()
}

/// Scale and quantized values of one activation block, as ggml's AVX path computes them:
/// d = amax / 127 (stored as f16), q = round-half-even(x · 127 / amax). Returns (stored d, q).
fn quantize_block(x: &[f32]) -> (f32, [i8; QK]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just above; `x` is one block (checked inside).
        return unsafe { quantize_block_avx2(x) };
    }
    quantize_block_portable(x)
}

fn quantize_block_portable(x: &[f32]) -> (f32, [i8; QK]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
    }
    (f16::from_f32(amax / 127.0).to_f32(), qs)
}

/// The same, eight values at a time (without it, rounding is a library call per value: a fifth of a
/// prompt's time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(x: &[f32]) -> (f32, [i8; QK]) {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), QK);
    // SAFETY: `x` holds 32 floats (asserted), read as four unaligned loads; `qs` takes one 32-byte store.
    unsafe {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
        let sign = _mm256_set1_ps(-0.0);
        let abs = |v| _mm256_andnot_ps(sign, v);
        let m = _mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        );
        let m = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let q: [__m256i; 4] = std::array::from_fn(|i| {
            let r = _mm256_round_ps(
                _mm256_mul_ps(v[i], id),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            _mm256_cvtps_epi32(r)
        });
        // Narrow to bytes; the packs interleave 128-bit lanes, the permute restores the order.
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut qs = [0i8; QK];
        _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, p);
        (f16::from_f32(amax / 127.0).to_f32(), qs)
    }
}

/// ggml's `quantize_row_q8_0`, each block with its sum.
pub fn quantize_q8_0_with_sum(x: &[f32], out: &mut Vec<Q8_0WithSum>) {
    for block in x.chunks_exact(QK) {
        let (d, qs) = quantize_block(block);
        out.push(Q8_0WithSum {
            block: Q8_0 { d, qs },
            sum: qs.iter().map(|&q| i32::from(q)).sum(),
        });
    }
}

/// ggml's `quantize_row_q8_1`: the block sum s = f16(d·Σq), with d the scale as stored (f16).
/// (Measured: this matches llama.cpp's perplexity on the default model to 0.002%; the f32 scale gave
/// −0.47%, candle's f16(Σq)·f16(d) −0.1%.)
pub fn quantize_q8_1(x: &[f32], out: &mut Vec<Q8_1>) {
    for block in x.chunks_exact(QK) {
        let (d, qs) = quantize_block(block);
        let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        out.push(Q8_1 {
            d,
            s: f16::from_f32(d * sum as f32).to_f32(),
            qs,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_quantization_is_identical_to_the_portable_one() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for scale in [0.0f32, 1e-3, 1.0, 300.0] {
            for _ in 0..200 {
                let mut x: Vec<f32> = (0..QK)
                    .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
                    .collect();
                // Values exactly halfway after scaling, where the rounding mode shows.
                x[3] = x.iter().fold(0f32, |m, v| m.max(v.abs())) * (2.5 / 127.0);
                assert_eq!(quantize_block(&x), quantize_block_portable(&x), "{x:?}");
            }
        }
    }

    #[test]
    fn q8_1_block_sum_is_rounded_once_from_the_stored_scale() {
        let x: Vec<f32> = (0..32).map(|i| 100.0 + i as f32).collect();
        let mut out = Vec::new();
        quantize_q8_1(&x, &mut out);
        let sum: i32 = out[0].qs.iter().map(|&q| i32::from(q)).sum();
        assert!(
            sum > 2048,
            "past f16's exact integers, where rounding the sum itself would differ"
        );
        let d = f16::from_f32(131.0 / 127.0).to_f32();
        assert_eq!(out[0].d, d);
        assert_eq!(out[0].s, f16::from_f32(d * sum as f32).to_f32());
        assert_eq!(out[0].qs[31], 127);
    }

    #[test]
    fn activation_blocks_carry_their_exact_sum() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let mut out = Vec::new();
        quantize_q8_0_with_sum(&x, &mut out);
        assert_eq!(out.len(), 2);
        for b in &out {
            assert_eq!(b.sum, b.block.qs.iter().map(|&q| i32::from(q)).sum::<i32>());
        }
        assert!(out[1].sum > 2048, "past what f16 holds exactly");
    }
}
