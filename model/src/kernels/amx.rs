//! Intel AMX tiles for the bf16 products of `bf16.rs`: one `tdpbf16ps` multiplies a 16 × 32 bf16 tile
//! by a 32 × 16 one into 16 × 16 f32 sums, 8,192 multiply-adds, where an AVX-512 VNNI instruction
//! does 64.
//!
//! AMX needs the CPU (CPUID leaf 7: AMX-TILE, AMX-BF16) and the kernel's leave (Linux
//! `arch_prctl(ARCH_REQ_XCOMP_PERM)`); [`available`] checks both once. Rust has no stable AMX
//! intrinsics, so the instructions are written as inline assembly.

use std::sync::OnceLock;

use super::bf16::{BLOCK, COLS as ROWS, K_STEP};

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
pub(super) unsafe fn block_rows(a: &[u16], tiles: &[u16], out: &mut [f32], n: usize, k: usize) {
    use std::arch::asm;
    assert!(a.len() >= BLOCK * k && out.len() >= BLOCK * n && tiles.len() >= n * k);
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
pub(super) unsafe fn block_rows(
    _a: &[u16],
    _tiles: &[u16],
    _out: &mut [f32],
    _n: usize,
    _k: usize,
) {
    unreachable!("AMX is x86-64 only; available() is false elsewhere")
}
