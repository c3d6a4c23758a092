//! f32 matrix products over strided views of plain slices, for the dense products of a training step
//! (LoRA, attention, the output projection's backward): transposes are strides, not copies, and a
//! product can add into its destination, so a backward pass accumulates gradients without
//! temporaries. The `gemm` crate (the one candle's CPU matmul runs on) does the work; this file is the
//! one place that calls it, behind bounds checks.

use gemm::Parallelism;

/// A read-only matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix [rows, cols] whose rows are `row_stride` apart (≥ cols for a column slice
    /// of a wider matrix: pass `data` starting at the slice's first column).
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The largest index the view reads, plus one (0 when empty).
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }
}

/// How a product lands in its destination.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Out {
    /// dst = scale · a·b
    Set(f32),
    /// dst += scale · a·b
    Add(f32),
}

/// `dst` (row-major, rows `dst_stride` apart) ← a·b as `into` says; a [m, k], b [k, n]. `parallel`
/// spreads the product over rayon's threads (for the large ones; small products lose to the hand-off).
///
/// # Panics
/// When the shapes disagree or a view reaches past its slice (a bug in the caller, never data).
pub fn matmul(dst: &mut [f32], dst_stride: usize, a: View, b: View, into: Out, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions {k} and {}", b.rows);
    assert!(a.extent() <= a.data.len(), "matmul: lhs view out of bounds");
    assert!(b.extent() <= b.data.len(), "matmul: rhs view out of bounds");
    let dst_extent = if m == 0 || n == 0 {
        0
    } else {
        (m - 1) * dst_stride + n
    };
    assert!(dst_extent <= dst.len(), "matmul: destination out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if let Out::Set(_) = into {
            for row in dst.chunks_mut(dst_stride).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    let (read_dst, beta) = match into {
        Out::Set(s) => (false, s),
        Out::Add(s) => (true, s),
    };
    let parallelism = if parallel {
        Parallelism::Rayon(super::threads())
    } else {
        Parallelism::None
    };
    // SAFETY: every index gemm touches lies inside the views' extents (checked above against the
    // slices' lengths); dst is borrowed mutably and cannot alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            read_dst,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: View, b: View) -> Vec<f32> {
        let mut out = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols)
                    .map(|p| {
                        a.data[i * a.row_stride + p * a.col_stride]
                            * b.data[p * b.row_stride + j * b.col_stride]
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_transposed_and_accumulated_products() {
        let x: Vec<f32> = (0..60).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..48).map(|i| (i as f32 * 0.11).cos()).collect();
        // a: 4 × 3 columns 2.. of a [4, 10] matrix; b: [3, 5] as the transpose of a [5, 8] slice.
        let a = View::rows(&x[2..], 4, 3, 10);
        let b = View::rows(&y, 5, 3, 8).t();
        let want = naive(a, b);
        for parallel in [false, true] {
            let mut dst = vec![1f32; 4 * 7];
            matmul(&mut dst, 7, a, b, Out::Add(2.0), parallel);
            for i in 0..4 {
                for j in 0..5 {
                    let got = dst[i * 7 + j];
                    assert!((got - (1.0 + 2.0 * want[i * 5 + j])).abs() < 1e-5);
                }
                assert_eq!(dst[i * 7 + 5], 1.0, "columns past n untouched");
            }
            matmul(&mut dst, 7, a, b, Out::Set(1.0), parallel);
            assert!((dst[7 + 2] - want[5 + 2]).abs() < 1e-5);
        }
    }
}
