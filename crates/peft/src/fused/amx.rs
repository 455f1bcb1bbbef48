//! bf16 products on AMX tiles (Intel Advanced Matrix Extensions, Sapphire Rapids and later):
//! `tdpbf16ps` multiplies a 16×32 bf16 tile by a 32×16 one into a 16×16 f32 tile, 16 times
//! the arithmetic of an AVX-512 `vdpbf16ps` per instruction. This is what PyTorch's CPU
//! autocast reaches through oneDNN; on a 2-core Sapphire Rapids it ran the training step's
//! products at 550–960 GFLOP/s against the `vdpbf16ps` kernel's 150–180 (docs/BENCHMARKS.md).
//!
//! Both operands are rounded to bf16 while they are packed (as [`super::bf16_gemm`] rounds
//! them) into 1 KiB tiles of 16 rows × 16 pairs of consecutive-`k` values: the left side
//! row-major (a tile row is one row's 32 `k` values), the right side in the pair-interleaved
//! ("VNNI") layout of [`super::bf16_gemm`]'s panels, 16 columns wide. `k` is zero-padded to
//! whole tiles and rows and columns to whole pairs of tiles, so the kernel has no edge cases:
//! it keeps a 32×32 block of f32 sums in four tile registers over all of `k`, then stores it
//! into the task's scratch, from which the valid part is copied (f32) or rounded
//! ([`super::epilogue`], bf16) into the output.
//!
//! Linux hands AMX's tile state to a process only on request (`arch_prctl`); [`available`]
//! asks once. `BELLOWS_BF16_KERNEL=dot` (or `f32`) picks a slower kernel instead, to compare.
//!
//! Unsafe code: the tile instructions (inline assembly: Rust has no stable AMX intrinsics) on
//! raw pointers into the packed buffers and the scratch, whose extents the packing fixes, and
//! the permission request (a system call).
#![allow(unsafe_code)]

use std::sync::{Arc, OnceLock};

use super::bf16_gemm::{for_each, pack_operand, Bf16Operand, Dest, Operand, Side, View};
#[cfg(target_arch = "x86_64")]
use super::epilogue::finish_row_v4;
use super::pack_cache::Layout;

/// Rows (and pairs of `k`) of a tile.
pub(super) const TILE: usize = 16;
/// `u32` pairs in one packed tile.
const TILE_PAIRS: usize = TILE * TILE;
/// Output rows per task (a multiple of two tiles).
pub(super) const MC: usize = 128;
/// Output columns per task (a multiple of two tiles).
pub(super) const NC: usize = 128;

/// Whether this CPU and OS run the AMX kernel: the CPU reports AMX-TILE and AMX-BF16 (and
/// the AVX-512 the packing uses) and the kernel granted the tile state. Asked once per process.
pub fn available() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| cpu_has_amx() && super::simd::has_avx512() && request_tile_state())
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_amx() -> bool {
    // CPUID leaf 7, sub-leaf 0: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    (leaf.edx >> 22) & 1 == 1 && (leaf.edx >> 24) & 1 == 1
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx() -> bool {
    false
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`); without
/// it the first tile instruction faults.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: the request only changes which register state the process may use.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

/// `k` pairs padded to whole tiles, and the tiles along `k`.
pub(super) fn pair_tiles(k: usize) -> (usize, usize) {
    let tiles = k.div_ceil(2).div_ceil(TILE);
    (tiles * TILE, tiles)
}

/// Tile rows (or columns) padded to whole pairs of tiles.
pub(super) fn padded_panels(n: usize) -> usize {
    n.div_ceil(2 * TILE) * 2
}

/// `v`'s `[rows, k]` view as left-side tiles: `[panel of 16 rows][k tile][row][16 pairs]`,
/// zero beyond the view (rows padded to [`padded_panels`], `k` to [`pair_tiles`]).
pub(super) fn pack_rows<T: Bf16Operand>(
    v: &[T],
    strides: (usize, usize),
    (rows, k): (usize, usize),
    par: bool,
) -> Vec<u32> {
    let (kpp, _) = pair_tiles(k);
    let panel = kpp * TILE;
    let len = padded_panels(rows) * panel;
    let view = View {
        strides,
        rows,
        k,
        width: TILE,
    };
    let panels = rows.div_ceil(TILE);
    let fill = |p: usize, tiles: &mut [u32]| {
        if p >= panels {
            return; // padding: stays zero
        }
        // SAFETY: `available()` (the only way here) checked the AVX-512 features.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            fill_row_tiles(v, view, p, tiles)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AMX is x86-64 only: {p} {}", tiles.len());
    };
    super::bf16_gemm::panels_filled(len, panel, par, fill)
}

/// Panel `p` (16 rows) of [`pack_rows`] into `tiles` (`[k tile][row][16 pairs]`, zeroed).
///
/// A view with `k`-contiguous rows (`x` in `x·Wᵀ`) is converted row by row, each row's pairs
/// already in tile order; any other is packed pair-interleaved (as the right side is) and each
/// 16×16 block transposed in registers.
///
/// # Safety
/// The CPU must have `avx512f`, `avx512bw` and `avx512vl`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn fill_row_tiles<T: Bf16Operand>(v: &[T], view: View, p: usize, tiles: &mut [u32]) {
    use std::arch::x86_64::_mm512_storeu_si512;
    let View {
        strides: (along, across),
        rows,
        k,
        ..
    } = view;
    let (kpp, ktiles) = pair_tiles(k);
    let n = TILE.min(rows - p * TILE);
    let first = p * TILE * along;
    if across == 1 {
        // Each 32-value piece of a row is one tile row: converted straight into it. Whole
        // pieces with their length known to the compiler (a bf16 piece is then one vector
        // move, not a `memcpy` call of 64 bytes), the last short one after them.
        let mut bits = [0u16; 2 * TILE];
        for i in 0..n {
            let row = &v[first + i * along..][..k];
            let pieces = row.chunks_exact(2 * TILE);
            let rest = pieces.remainder();
            for (q, piece) in pieces.enumerate() {
                let dst: &mut [u32; TILE] = (&mut tiles[q * TILE_PAIRS + i * TILE..][..TILE])
                    .try_into()
                    .expect("a tile row");
                T::row_pairs(piece, &mut bits, dst);
            }
            if !rest.is_empty() {
                // `row_pairs` reads one value past an odd piece: zero.
                bits = [0; 2 * TILE];
                let q = k / (2 * TILE);
                let dst = &mut tiles[q * TILE_PAIRS + i * TILE..][..rest.len().div_ceil(2)];
                T::row_pairs(rest, &mut bits, dst);
            }
        }
        return;
    }
    let mut interleaved = vec![0u32; kpp * TILE];
    super::bf16_gemm::fill_panel(v, view, p, &mut interleaved);
    for q in 0..ktiles {
        // SAFETY: `interleaved` holds `ktiles` blocks of 16 × 16 values; the CPU has AVX-512.
        let cols = unsafe { super::bf16_gemm::transpose16(&interleaved[q * TILE_PAIRS..], TILE) };
        for (i, col) in cols.iter().enumerate() {
            // SAFETY: tile `q`, row `i` lies in `tiles` (`ktiles` tiles of 256 values).
            unsafe {
                _mm512_storeu_si512(
                    tiles.as_mut_ptr().add(q * TILE_PAIRS + i * TILE).cast(),
                    *col,
                )
            };
        }
    }
}

/// `lhs` and `rhs` (`[rows, k]`, `[k, cols]`) packed as the kernel reads them, and the tiles
/// along `k`.
fn pack_both<L: Bf16Operand, R: Bf16Operand>(
    lhs: Operand<L>,
    rhs: Operand<R>,
    (rows, k, cols): (usize, usize, usize),
    par: bool,
) -> (Arc<Vec<u32>>, Arc<Vec<u32>>, usize) {
    let a = pack_operand(lhs, lhs.strides, (rows, k), Layout::RowTiles, par);
    // The right side's columns are its "rows" for packing: column j is `rhs[.., j]`.
    let (rrs, rcs) = rhs.strides;
    let right = Layout::Panels {
        width: TILE,
        pairs: TILE,
        panels: 2,
    };
    let b = pack_operand(rhs, (rcs, rrs), (cols, k), right, par);
    (a, b, pair_tiles(k).1)
}

/// `lhs · rhs` on AMX tiles into `dest`, `lhs` viewed as `[rows, k]` and `rhs` as
/// `[k, cols]` (the caller checked the views, the addend and [`available`]; rows, `k` and
/// columns all non-zero), output blocks of [`MC`] × [`NC`] spread over the pool when `par`.
/// With a `side` product (and a bf16 `dest` without an addend), each block of the side
/// product is computed next to the block it is added to.
pub(super) fn product<L: Bf16Operand, R: Bf16Operand>(
    lhs: Operand<L>,
    rhs: Operand<R>,
    (rows, k, cols): (usize, usize, usize),
    dest: Dest,
    par: bool,
    side: Option<Side>,
) {
    let (a, b, ktiles) = pack_both(lhs, rhs, (rows, k, cols), par);
    let side = side.map(|sd| {
        let (sa, sb, st) = pack_both(sd.lhs, sd.rhs, (rows, sd.k, cols), par);
        (sa, sb, st, sd.scale)
    });
    let (row_tasks, col_tasks) = (rows.div_ceil(MC), cols.div_ceil(NC));
    for_each(par, row_tasks * col_tasks, |t| {
        let (ti, tj) = (t / col_tasks, t % col_tasks);
        let (r0, r1) = (ti * MC, (ti * MC + MC).min(rows));
        let (c0, c1) = (tj * NC, (tj * NC + NC).min(cols));
        SCRATCH.with_borrow_mut(|[sums, side_sums]| {
            sums.resize(MC * NC, 0.0);
            if side.is_some() {
                side_sums.resize(MC * NC, 0.0);
            }
            {
                // SAFETY: `available()` held for the caller.
                let tiles = unsafe { Tiles::configure() };
                let (sp, ssp) = (sums.as_mut_ptr(), side_sums.as_mut_ptr());
                for c in (c0..c1).step_by(2 * TILE) {
                    for r in (r0..r1).step_by(2 * TILE) {
                        let at = (r - r0) * NC + (c - c0);
                        // SAFETY: the panels hold two tile panels each at these offsets
                        // (rows and columns are padded to pairs of panels); the 32×32 block
                        // at `at` lies in the MC × NC scratch (MC, NC multiples of 32,
                        // r − r0 < MC, c − c0 < NC, both multiples of 32).
                        unsafe {
                            block_at(&tiles, (&a, &b, ktiles), (r, c), sp.add(at));
                            if let Some((sa, sb, st, _)) = &side {
                                block_at(&tiles, (sa, sb, *st), (r, c), ssp.add(at));
                            }
                        }
                    }
                }
            }
            // Every block these rows read was stored above.
            let w = c1 - c0;
            for i in r0..r1 {
                let at = (i - r0) * NC;
                let side_row = side.as_ref().map(|(.., s)| (&side_sums[at..][..w], *s));
                // SAFETY: the output row's [c0, c1) belongs to this task alone.
                unsafe { write_row(dest, i * cols + c0, &sums[at..][..w], side_row) };
            }
        });
    });
}

/// One row of a task's sums into the output at element `at`: copied (f32), or rounded with the
/// side product's row, or else the addend's, added (bf16).
///
/// # Safety
/// The output's `sums.len()` elements from `at` must belong to the caller alone.
unsafe fn write_row(dest: Dest, at: usize, sums: &[f32], side: Option<(&[f32], f32)>) {
    let w = sums.len();
    match dest {
        // SAFETY: the caller's bound.
        Dest::F32(out) => unsafe {
            std::ptr::copy_nonoverlapping(sums.as_ptr(), out.ptr().add(at), w)
        },
        Dest::Bf16(out, add) => {
            // SAFETY: as above.
            let o = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(at), w) };
            let add = side.or(add.map(|(t, s)| (&t[at..][..w], s)));
            // SAFETY: AMX CPUs have AVX-512 (`available` checks it).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                finish_row_v4(sums, add, o)
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("AMX is x86-64 only: {} {add:?}", o.len());
        }
    }
}

/// The 32×32 block of `a · b` at output (r, c) (both multiples of 32) into `c_ptr`, a scratch
/// with rows of [`NC`] values.
///
/// # Safety
/// `a` and `b` must be packed by [`pack_both`] for a product that has rows `r..r + 32` and
/// columns `c..c + 32` in its padded panels, and `c_ptr` must address 32 rows of 32 writable
/// values at that row stride.
unsafe fn block_at(
    tiles: &Tiles,
    (a, b, ktiles): (&[u32], &[u32], usize),
    (r, c): (usize, usize),
    c_ptr: *mut f32,
) {
    let panel = ktiles * TILE_PAIRS;
    let ap = &a[(r / TILE) * panel..][..2 * panel];
    let bp = &b[(c / TILE) * panel..][..2 * panel];
    // SAFETY: the caller's bounds.
    unsafe {
        tiles.block(
            (ap.as_ptr(), ap.as_ptr().add(panel)),
            (bp.as_ptr(), bp.as_ptr().add(panel)),
            ktiles,
            c_ptr,
            NC * 4,
        );
    }
}

thread_local! {
    /// This thread's blocks of [`MC`] × [`NC`] sums (the product's, a side product's), reused
    /// by each task it runs (a task calls nothing that could run another task on the thread
    /// meanwhile).
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> =
        const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// The tile configuration `ldtilecfg` loads: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// Loads the tile configuration on this thread (per task: rayon's workers run other code
/// between tasks) and releases the tiles when dropped.
pub(super) struct Tiles(());

impl Tiles {
    /// Configures this thread's tiles.
    ///
    /// # Safety
    /// [`available`] must be true.
    pub(super) unsafe fn configure() -> Self {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.bytes_per_row[t] = (TILE * 4) as u16;
            cfg.rows[t] = TILE as u8;
        }
        // SAFETY: the CPU has AMX and the OS granted its state (`available`); the
        // configuration is 64 bytes, 64-byte aligned.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
        }
        Tiles(())
    }

    /// `c = a · b` for a 32×32 block: `a0`, `a1` the two 16-row left panels' first tiles and
    /// `b0`, `b1` the two 16-column right panels', each followed by `ktiles − 1` more tiles
    /// (consecutive, 1 KiB apart); `c` row-major f32 with a row stride of `ldc` bytes.
    ///
    /// # Safety
    /// The four panels must hold `ktiles` tiles each, and `c` 32 rows of 32 writable values.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        &self,
        (a0, a1): (*const u32, *const u32),
        (b0, b1): (*const u32, *const u32),
        ktiles: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's bounds; the tiles are configured (`self`).
        unsafe {
            use std::arch::asm;
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            let stride = TILE * 4;
            for q in 0..ktiles {
                let at = q * TILE_PAIRS;
                asm!(
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tileloadd tmm5, [{a1} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0.add(at),
                    a1 = in(reg) a1.add(at),
                    b0 = in(reg) b0.add(at),
                    b1 = in(reg) b1.add(at),
                    s = in(reg) stride,
                    options(nostack, readonly)
                );
            }
            asm!(
                "tilestored [{c0} + {ld}*1], tmm0",
                "tilestored [{c1} + {ld}*1], tmm1",
                "tilestored [{c2} + {ld}*1], tmm2",
                "tilestored [{c3} + {ld}*1], tmm3",
                c0 = in(reg) c,
                c1 = in(reg) c.byte_add(TILE * 4),
                c2 = in(reg) c.byte_add(TILE * ldc),
                c3 = in(reg) c.byte_add(TILE * ldc + TILE * 4),
                ld = in(reg) ldc,
                options(nostack)
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("AMX is x86-64 only: {a0:?} {a1:?} {b0:?} {b1:?} {ktiles} {c:?} {ldc}");
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `configure`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}
