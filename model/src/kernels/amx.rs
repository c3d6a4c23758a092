//! bf16 matrix products on Intel AMX tiles, for training's frozen products (x·Wᵀ forward, gy·W
//! backward). One `tdpbf16ps` multiplies a 16 × 32 bf16 tile by a 32 × 16 one into 16 × 16 f32 sums:
//! 8,192 multiply-adds, where an AVX-512 VNNI instruction does 64. A training step spends most of its
//! time in these products, on a few cores; AMX runs them several times faster than pai's int8
//! kernels.
//!
//! The weight is packed once into B tiles (bf16 pairs along k, 1 KiB a tile: 2 bytes a weight), the
//! activations are rounded to bf16 per call, and sums stay f32. The inference path never comes here:
//! it keeps llama.cpp's exact int8 arithmetic.
//!
//! AMX needs the CPU (CPUID leaf 7: AMX-TILE, AMX-BF16) and the kernel's leave (Linux
//! `arch_prctl(ARCH_REQ_XCOMP_PERM)`); [`available`] checks both once. Rust has no stable AMX
//! intrinsics, so the instructions are written as inline assembly.

use std::sync::OnceLock;

use super::pool;

/// Tile geometry: 16 rows of 64 bytes (32 bf16 or 16 f32).
const ROWS: usize = 16;
const K_STEP: usize = 32;
/// Output block a task step computes: 2 × 2 tiles, 32 rows × 32 columns.
const BLOCK: usize = 32;

/// Whether AMX-BF16 is usable by this process (CPU support and the OS's permission, asked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            if std::env::var_os("PAI_NO_AMX").is_some() {
                return false;
            }
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let tile = leaf7.edx & (1 << 24) != 0;
            let bf16 = leaf7.edx & (1 << 22) != 0;
            tile && bf16 && request_tile_permission()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// Linux: ask for the AMX tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call with integer arguments; it changes only which register state this
    // process may use.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// f32 → bf16, rounding to nearest even (NaN stays NaN).
fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
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
        for nb in 0..n / ROWS {
            for b in 0..kb {
                let tile = &mut tiles[(nb * kb + b) * ROWS * K_STEP..][..ROWS * K_STEP];
                for pair in 0..ROWS {
                    for j in 0..ROWS {
                        let row = &w[(nb * ROWS + j) * k + b * K_STEP + 2 * pair..];
                        tile[pair * 32 + 2 * j] = bf16(row[0]);
                        tile[pair * 32 + 2 * j + 1] = bf16(row[1]);
                    }
                }
            }
        }
        Some(Self { n, k, tiles })
    }

    pub fn bytes(&self) -> usize {
        self.tiles.len() * 2
    }

    /// y [m, n] = x [m, k] · Wᵀ for row-major x (f32), with bf16 products and f32 sums. Call only
    /// when [`available`] says so.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
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
            // SAFETY: `available()` was checked by the caller; `a` holds 32 rows of k bf16, `out` 32
            // rows of n f32, and the tiles every (column block, k block) of W: every tile load and
            // store below stays inside them.
            unsafe { block_rows(a, &self.tiles, out, n, k) };
        });
        y.truncate(m * n);
        y
    }
}

#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Tiles 0–3: the 2 × 2 f32 sums; 4–5: two A tiles (16 rows of x each); 6–7: two B tiles.
fn tile_config() -> TileConfig {
    let mut c = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        c.colsb[t] = 64;
        c.rows[t] = ROWS as u8;
    }
    c
}

/// out [32, n] = a [32, k] · Wᵀ, 32 columns at a time.
///
/// # Safety
/// AMX must be available; `a` must hold 32 × k bf16, `out` 32 × n f32 and `tiles` the packed W of
/// [n, k].
#[cfg(target_arch = "x86_64")]
unsafe fn block_rows(a: &[u16], tiles: &[u16], out: &mut [f32], n: usize, k: usize) {
    use std::arch::asm;
    debug_assert!(a.len() >= BLOCK * k && out.len() >= BLOCK * n && tiles.len() >= n * k);
    let config = tile_config();
    let kb = k / K_STEP;
    let a_stride = k * 2;
    let out_stride = n * 4;
    let tile_bytes = ROWS * K_STEP;
    // SAFETY (every asm block): tile loads read 16 rows at the given stride from inside `a` (rows 0–15
    // or 16–31, 64 bytes from column b·32) or one 1 KiB tile of `tiles`; stores write 16 rows of 64
    // bytes inside `out` (rows 0–15 or 16–31, columns c..c+16 of n). The tile registers are not used
    // by compiled code.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &config, options(nostack, readonly));
        for nb in (0..n / ROWS).step_by(2) {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for b in 0..kb {
                let a0 = a.as_ptr().add(b * K_STEP);
                let a1 = a0.add(ROWS * k);
                let b0 = tiles.as_ptr().add((nb * kb + b) * tile_bytes);
                let b1 = tiles.as_ptr().add(((nb + 1) * kb + b) * tile_bytes);
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    sa = in(reg) a_stride,
                    sb = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
            let c = out.as_mut_ptr().add(nb * ROWS);
            asm!(
                "tilestored [{c00} + {so}*1], tmm0",
                "tilestored [{c01} + {so}*1], tmm1",
                "tilestored [{c10} + {so}*1], tmm2",
                "tilestored [{c11} + {so}*1], tmm3",
                c00 = in(reg) c,
                c01 = in(reg) c.add(ROWS),
                c10 = in(reg) c.add(ROWS * n),
                c11 = in(reg) c.add(ROWS * n + ROWS),
                so = in(reg) out_stride,
                options(nostack),
            );
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block_rows(_a: &[u16], _tiles: &[u16], _out: &mut [f32], _n: usize, _k: usize) {
    unreachable!("AMX is x86-64 only; available() is false elsewhere")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_bf16(b: u16) -> f32 {
        f32::from_bits(u32::from(b) << 16)
    }

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3F80);
        // 1 + 2⁻⁸ is halfway between two bf16 values: ties to the even one (1.0).
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3F82);
        assert!(from_bf16(bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(bf16(-2.5)), -2.5);
    }

    /// Against the same products in f64 of the bf16-rounded operands, with a row count that is not
    /// a whole block.
    #[test]
    fn matches_the_rounded_product() {
        if !available() {
            eprintln!("no AMX on this machine: skipped");
            return;
        }
        let (m, n, k) = (37, 64, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.07)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 5 % 17) as f32 - 8.0) * 0.13)
            .collect();
        let tiles = Bf16Tiles::pack(&w, n, k).expect("fits");
        let y = tiles.matmul(&x);
        assert_eq!(y.len(), m * n);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|p| {
                        f64::from(from_bf16(bf16(x[i * k + p])))
                            * f64::from(from_bf16(bf16(w[j * k + p])))
                    })
                    .sum();
                let got = f64::from(y[i * n + j]);
                assert!((got - want).abs() < 1e-3, "({i}, {j}): {got} vs {want}");
            }
        }
        assert!(Bf16Tiles::pack(&w, 48, 128).is_none());
    }
}
