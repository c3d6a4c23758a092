//! bf16 products for training's frozen weights (x·Wᵀ forward, gy·W backward). A training step spends
//! most of its time in these products; in bf16 (8 bits of mantissa, an exponent per value, f32 sums)
//! they carry gradients the int8 kernels cannot (the output projection's), and CPUs with bf16
//! instructions run them several times faster than int8 block products.
//!
//! The weight is packed once ([`Bf16Tiles`]) in AMX's B-tile layout: for each 16 output columns and 32
//! k, 16 rows of k pairs × 16 columns (1 KiB; 2 bytes a weight). That layout is also the one AVX-512
//! BF16 wants: one 64-byte row of a tile holds 16 columns' (k, k + 1) pairs, which one `vdpbf16ps`
//! multiplies by a broadcast pair of x and adds into 16 f32 sums. So one packing, two engines
//! ([`engine`]): AMX tiles where the CPU and OS allow them (`amx.rs`), AVX-512 BF16 otherwise (AMD
//! Zen 4 and later, Intel Cooper Lake). The activations are rounded to bf16 per call. The inference
//! path never comes here: it keeps llama.cpp's exact int8 arithmetic.

use std::sync::OnceLock;

use super::{amx, pool};

/// k values a tile row pairs up, and k per tile.
pub(super) const K_STEP: usize = 32;
/// Output columns per tile (and rows per AMX tile).
pub(super) const COLS: usize = 16;
/// Output rows a task computes, and the multiple both dimensions must be of.
pub(super) const BLOCK: usize = 32;

/// The instructions the bf16 products run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Intel AMX tiles: one `tdpbf16ps` is 8,192 multiply-adds.
    Amx,
    /// AVX-512 BF16: one `vdpbf16ps` is 32 multiply-adds.
    Avx512Bf16,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Amx => "amx-bf16",
            Engine::Avx512Bf16 => "avx512-bf16",
        }
    }
}

impl Engine {
    /// Every engine this CPU (and OS) has, fastest first.
    fn detected() -> Vec<Engine> {
        let mut found = Vec::new();
        if amx::available() {
            found.push(Engine::Amx);
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
        {
            found.push(Engine::Avx512Bf16);
        }
        found
    }
}

/// The fastest bf16 engine this process may use, decided once; `None` where the CPU has neither (or
/// `PAI_NO_BF16` is set): a trainer then keeps int8 copies instead. `PAI_NO_AMX` leaves AMX out only.
pub fn engine() -> Option<Engine> {
    static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
    *ENGINE.get_or_init(|| {
        if std::env::var_os("PAI_NO_BF16").is_some() {
            return None;
        }
        Engine::detected().first().copied()
    })
}

/// f32 → bf16, rounding to nearest even (NaN stays NaN).
pub(super) fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

fn from_bf16(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// A weight W [n, k] packed as the B operand of x·Wᵀ: for each block of 16 output columns and 32
/// k, one tile of 16 rows (pairs of k) × 16 columns × 2.
#[derive(Debug)]
pub struct Bf16Tiles {
    n: usize,
    k: usize,
    tiles: Vec<u16>,
}

impl Bf16Tiles {
    /// Whether a [n, k] weight can be packed (both multiples of 32).
    pub fn fits(n: usize, k: usize) -> bool {
        n.is_multiple_of(BLOCK) && k.is_multiple_of(K_STEP) && n > 0 && k > 0
    }

    /// Pack row-major W [n, k] (f32). `None` when the shape does not fit.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if !Self::fits(n, k) || w.len() != n * k {
            return None;
        }
        let kb = k / K_STEP;
        let mut tiles = vec![0u16; n * k];
        for nb in 0..n / COLS {
            for b in 0..kb {
                let tile = &mut tiles[(nb * kb + b) * COLS * K_STEP..][..COLS * K_STEP];
                for pair in 0..K_STEP / 2 {
                    for j in 0..COLS {
                        let row = &w[(nb * COLS + j) * k + b * K_STEP + 2 * pair..];
                        tile[pair * 2 * COLS + 2 * j] = bf16(row[0]);
                        tile[pair * 2 * COLS + 2 * j + 1] = bf16(row[1]);
                    }
                }
            }
        }
        Some(Self { n, k, tiles })
    }

    pub fn bytes(&self) -> usize {
        self.tiles.len() * 2
    }

    /// y [m, n] = x [m, k] · Wᵀ for row-major x (f32), with bf16 products and f32 sums, on
    /// [`engine`] (or a portable loop, slowly, where there is none).
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        self.matmul_on(engine(), x)
    }

    /// [`Bf16Tiles::matmul`] on the given engine (`None`: the portable loop). Only engines from
    /// [`Engine::detected`] may be given.
    fn matmul_on(&self, engine: Option<Engine>, x: &[f32]) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let m = x.len() / k;
        let m_pad = m.next_multiple_of(BLOCK);
        // 1. The activations in bf16, padded with zero rows to whole blocks.
        let mut xb = vec![0u16; m_pad * k];
        pool().for_each_piece(&mut xb[..m * k], 64 * k, |i, piece| {
            let src = &x[i * 64 * k..];
            for (d, s) in piece.iter_mut().zip(src) {
                *d = bf16(*s);
            }
        });
        // 2. Each task: 32 rows of the output, every column.
        let mut y = vec![0f32; m_pad * n];
        pool().for_each_piece(&mut y, BLOCK * n, |i, out| {
            let a = &xb[i * BLOCK * k..(i + 1) * BLOCK * k];
            match engine {
                // SAFETY: the engine was detected on this CPU; `a` holds 32 rows of k bf16, `out` 32
                // rows of n f32 and `tiles` every (column block, k block) of W, as each requires.
                Some(Engine::Amx) => unsafe { amx::block_rows(a, &self.tiles, out, n, k) },
                Some(Engine::Avx512Bf16) => unsafe {
                    avx512::block_rows(a, &self.tiles, out, n, k)
                },
                None => portable_block_rows(a, &self.tiles, out, n, k),
            }
        });
        y.truncate(m * n);
        y
    }
}

/// out [32, n] = a [32, k] · Wᵀ from the packed tiles, one product at a time.
fn portable_block_rows(a: &[u16], tiles: &[u16], out: &mut [f32], n: usize, k: usize) {
    let kb = k / K_STEP;
    for (r, row) in out.chunks_mut(n).take(BLOCK).enumerate() {
        let x = &a[r * k..(r + 1) * k];
        for (c, y) in row.iter_mut().enumerate() {
            let (nb, j) = (c / COLS, c % COLS);
            let mut sum = 0f32;
            for b in 0..kb {
                let tile = &tiles[(nb * kb + b) * COLS * K_STEP..];
                for p in 0..K_STEP / 2 {
                    let w = &tile[p * 2 * COLS + 2 * j..];
                    let xk = &x[b * K_STEP + 2 * p..];
                    sum += from_bf16(xk[0]) * from_bf16(w[0]) + from_bf16(xk[1]) * from_bf16(w[1]);
                }
            }
            *y = sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512 BF16: a register block of MR rows × NB·16 columns, each step one k pair — NB tile
    //! rows loaded, MR pairs of x broadcast, MR·NB `vdpbf16ps` into f32 sums.

    use std::arch::x86_64::*;

    use super::{BLOCK, COLS, K_STEP};

    /// Rows of a register block: 32 / 8 per task, and 8 × 3 sums in 24 of the 32 registers.
    const MR: usize = 8;

    /// out [32, n] = a [32, k] · Wᵀ.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; `a` must hold 32 × k bf16, `out` 32 × n f32 and
    /// `tiles` the packed W of [n, k] (n and k multiples of 32).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn block_rows(a: &[u16], tiles: &[u16], out: &mut [f32], n: usize, k: usize) {
        assert!(a.len() >= BLOCK * k && out.len() >= BLOCK * n && tiles.len() >= n * k);
        assert!(n.is_multiple_of(BLOCK) && k.is_multiple_of(K_STEP));
        let blocks = n / COLS;
        let mut nb = 0;
        while nb < blocks {
            let left = blocks - nb;
            for r in (0..BLOCK).step_by(MR) {
                // SAFETY: rows r..r+8 of `a` and `out`, column blocks nb..nb+NB of `tiles` and `out`:
                // inside the slices (asserted above: nb + NB ≤ n / 16, r + 8 ≤ 32).
                unsafe {
                    match left {
                        3.. => panel::<3>(a, tiles, out, n, k, r, nb),
                        2 => panel::<2>(a, tiles, out, n, k, r, nb),
                        _ => panel::<1>(a, tiles, out, n, k, r, nb),
                    }
                }
            }
            nb += left.min(3);
        }
    }

    /// Rows r..r+MR × column blocks nb..nb+NB.
    #[inline(always)]
    unsafe fn panel<const NB: usize>(
        a: &[u16],
        tiles: &[u16],
        out: &mut [f32],
        n: usize,
        k: usize,
        r: usize,
        nb: usize,
    ) {
        let kb = k / K_STEP;
        let tile_len = COLS * K_STEP;
        // SAFETY: every pointer below stays inside the caller's slices (see `block_rows`); loads and
        // stores are unaligned; the features are enabled by `block_rows`.
        unsafe {
            let x = a.as_ptr().add(r * k);
            let mut acc = [[_mm512_setzero_ps(); NB]; MR];
            for b in 0..kb {
                let bt: [*const u16; NB] =
                    std::array::from_fn(|j| tiles.as_ptr().add(((nb + j) * kb + b) * tile_len));
                let xb = x.add(b * K_STEP);
                for p in 0..K_STEP / 2 {
                    let w: [__m512bh; NB] = std::array::from_fn(|j| {
                        std::mem::transmute(_mm512_loadu_si512(bt[j].add(p * 2 * COLS).cast()))
                    });
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let pair = std::ptr::read_unaligned(xb.add(i * k + 2 * p).cast::<i32>());
                        let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                        for (acc, w) in acc.iter_mut().zip(&w) {
                            *acc = _mm512_dpbf16_ps(*acc, xv, *w);
                        }
                    }
                }
            }
            let y = out.as_mut_ptr().add(r * n + nb * COLS);
            for (i, acc) in acc.iter().enumerate() {
                for (j, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(y.add(i * n + j * COLS), *acc);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub(super) unsafe fn block_rows(_: &[u16], _: &[u16], _: &mut [f32], _: usize, _: usize) {
        unreachable!("AVX-512 is x86-64 only; engine() is None elsewhere")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3F80);
        // 1 + 2⁻⁸ is halfway between two bf16 values: ties to the even one (1.0).
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3F82);
        assert!(from_bf16(bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(bf16(-2.5)), -2.5);
    }

    fn operands(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
        let w = (0..n * k)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.07)
            .collect();
        let x = (0..m * k)
            .map(|i| ((i * 5 % 17) as f32 - 8.0) * 0.13)
            .collect();
        (w, x)
    }

    /// The products in f64 of the bf16-rounded operands.
    fn rounded_product(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let r = |v: f32| f64::from(from_bf16(bf16(v)));
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| r(x[i * k + p]) * r(w[j * k + p])).sum();
            }
        }
        y
    }

    fn check(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((f64::from(*g) - w).abs() < 1e-3, "{what} [{i}]: {g} vs {w}");
        }
    }

    /// On each engine this CPU has, and the portable loop, against the rounded product, with a row
    /// count that is not a whole block and column counts that take every register-block width
    /// (n / 16 = 4, 6, 8).
    #[test]
    fn every_engine_matches_the_rounded_product() {
        let engines: Vec<Option<Engine>> = Engine::detected()
            .into_iter()
            .map(Some)
            .chain([None])
            .collect();
        for (m, n, k) in [(37, 64, 96), (32, 96, 64), (70, 128, 160)] {
            let (w, x) = operands(m, n, k);
            let tiles = Bf16Tiles::pack(&w, n, k).expect("fits");
            let want = rounded_product(&w, &x, m, n, k);
            for engine in &engines {
                let name = engine.map_or("portable", |e| e.name());
                check(&tiles.matmul_on(*engine, &x), &want, name);
            }
        }
        assert!(Bf16Tiles::pack(&operands(1, 48, 128).0, 48, 128).is_none());
    }
}
