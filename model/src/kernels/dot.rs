//! The portable block dot products: the reference the SIMD kernels (`q4x8.rs`, `q8_0x8.rs`) are
//! tested against, and the kernels on CPUs without them. They follow the structure of ggml's AVX2
//! kernels (eight lanes of four products, one fused multiply-add per lane and block, the same
//! horizontal sum), so they agree with llama.cpp to the last bit in the common case.

use super::blocks::{Q4_0, Q4_1, Q8_0, Q8_1, QK};

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

pub fn q4_0<X: AsRef<Q8_0>>(w: &[Q4_0], x: &[X]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, xb) in w.iter().zip(x) {
        let xb = xb.as_ref();
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

pub fn q8_0<X: AsRef<Q8_0>>(w: &[Q8_0], x: &[X]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, xb) in w.iter().zip(x) {
        let xb = xb.as_ref();
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
