//! DenseLinearInt8's aarch64 kernels: blocks of rows × 16 columns (four vectors of four
//! columns × four int8 weights, the layout every kernel shares). NEON multiplies signed bytes
//! only, so the activations are stored signed (`q − 128`, [`super::Kernel::signed`]).
//!
//! - With the dot product (`neon-dot`: Cortex-A76, A78, Neoverse): `sdot` by lane, four
//!   products of a row's group against each column summed into i32, 16 bytes of a row (four
//!   groups) loaded at once; 4 rows (16 sums).
//! - Without (`neon`: Cortex-A72 in the Pi 4, A53): `smull` and `smlal` multiply two groups
//!   into i16 lanes (|x · w| ≤ 128 · 127, so two of them fit), `sadalp` adds their pairs into
//!   i32, and one pairwise add per block finishes each column's sum; 2 rows (16 sums), 12
//!   instructions for 64 multiply-adds.

use super::{ARRAY_COLUMNS as COLUMNS, ArraySums, DenseLinearInt8, QuantizedRows, rows_in_blocks};
use std::arch::aarch64::*;
use std::arch::asm;

const VECTORS: usize = 4;
/// Rows of a block.
pub(super) const ROWS: usize = 2;
pub(super) const DOT_ROWS: usize = 4;

/// The output rows `out` from the quantized rows `x` (and `residual`), with `smull`/`sadalp`.
///
/// # Safety
/// None beyond the arguments' (every aarch64 CPU has NEON).
#[target_feature(enable = "neon")]
pub(super) unsafe fn rows(
    op: &DenseLinearInt8,
    x: &QuantizedRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    rows_in_blocks::<Widening, ROWS>(op, x, residual, out);
}

/// As [`rows`], with `sdot`.
///
/// # Safety
/// The CPU has the dot product instructions.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn rows_dot(
    op: &DenseLinearInt8,
    x: &QuantizedRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    rows_in_blocks::<Dot, DOT_ROWS>(op, x, residual, out);
}

struct Widening;
struct Dot;

impl ArraySums for Widening {
    #[inline(always)]
    fn sums<const R: usize>(x: &QuantizedRows, first: usize, panel: &[i8]) -> [[i32; COLUMNS]; R] {
        widening_sums::<R>(x, first, panel)
    }
}

impl ArraySums for Dot {
    #[inline(always)]
    fn sums<const R: usize>(x: &QuantizedRows, first: usize, panel: &[i8]) -> [[i32; COLUMNS]; R] {
        dot_sums::<R>(x, first, panel)
    }
}

/// Rows `first..first + R` and the panel: the row pointers, after checking the bounds.
#[inline(always)]
fn operands<const R: usize>(x: &QuantizedRows, first: usize, panel: &[i8]) -> [*const i8; R] {
    let groups = x.stride / 4;
    assert!(panel.len() == groups * 4 * COLUMNS && x.values.len() >= (first + R) * x.stride);
    std::array::from_fn(|r| x.values[(first + r) * x.stride..].as_ptr().cast())
}

/// `acc + Σ_i w[4c + i] · x[4 · LANE + i]` for the four columns `c` of `w`.
///
/// # Safety
/// The CPU has the dot product instructions.
#[inline(always)]
unsafe fn sdot<const LANE: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: a register-only instruction the caller's CPU has.
    unsafe {
        asm!(
            ".arch_extension dotprod",
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{lane}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            lane = const LANE,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    acc
}

/// The i32 sums of rows `first..first + R` against the panel, with `sdot`.
#[inline(always)]
fn dot_sums<const R: usize>(x: &QuantizedRows, first: usize, panel: &[i8]) -> [[i32; COLUMNS]; R] {
    let rows = operands::<R>(x, first, panel);
    let groups = x.stride / 4;
    let panel = panel.as_ptr();
    // SAFETY: NEON and the dot product are the caller's target features; every read is within
    // the panel or a row (`operands` checked their lengths).
    unsafe {
        let mut acc = [[vdupq_n_s32(0); VECTORS]; R];
        let w = |g: usize, v: usize| vld1q_s8(panel.add((g * VECTORS + v) * 16));
        let mut g = 0;
        // Four groups of each row at a time, one `sdot` lane each.
        while g + 4 <= groups {
            let xs: [int8x16_t; R] = std::array::from_fn(|r| vld1q_s8(rows[r].add(4 * g)));
            macro_rules! group {
                ($lane:literal) => {
                    let ws: [int8x16_t; VECTORS] = std::array::from_fn(|v| w(g + $lane, v));
                    for r in 0..R {
                        for v in 0..VECTORS {
                            acc[r][v] = sdot::<$lane>(acc[r][v], ws[v], xs[r]);
                        }
                    }
                };
            }
            group!(0);
            group!(1);
            group!(2);
            group!(3);
            g += 4;
        }
        while g < groups {
            let xs: [int8x16_t; R] = std::array::from_fn(|r| {
                vreinterpretq_s8_s32(vld1q_dup_s32(rows[r].add(4 * g).cast()))
            });
            for r in 0..R {
                for v in 0..VECTORS {
                    acc[r][v] = sdot::<0>(acc[r][v], w(g, v), xs[r]);
                }
            }
            g += 1;
        }
        let mut sums = [[0i32; COLUMNS]; R];
        for r in 0..R {
            for v in 0..VECTORS {
                vst1q_s32(sums[r][v * 4..].as_mut_ptr(), acc[r][v]);
            }
        }
        sums
    }
}

/// The i32 sums of rows `first..first + R` (R is 1 or 2) against the panel, with `smull`,
/// `smlal` and `sadalp`, two groups a step: each column's sum is kept as two halves (`acc[r][2v]`
/// holds columns 4v and 4v + 1, two halves each), added at the end.
#[inline(always)]
fn widening_sums<const R: usize>(
    x: &QuantizedRows,
    first: usize,
    panel: &[i8],
) -> [[i32; COLUMNS]; R] {
    assert!(R == 1 || R == 2);
    let rows = operands::<R>(x, first, panel);
    let groups = x.stride / 4;
    let panel = panel.as_ptr();
    // SAFETY: NEON is the caller's target feature; every read is within the panel or a row
    // (`operands` checked their lengths).
    unsafe {
        let mut acc = [[vdupq_n_s32(0); 2 * VECTORS]; R];
        let w = |g: usize, v: usize| vld1q_s8(panel.add((g * VECTORS + v) * 16));
        // A row's four values of group g in every 32-bit lane, against four columns.
        let x = |r: usize, g: usize| vreinterpretq_s8_s32(vld1q_dup_s32(rows[r].add(4 * g).cast()));
        let mut g = 0;
        while g < groups {
            // An odd last group is paired with zeros.
            let pair = g + 1 < groups;
            let xs: [[int8x16_t; 2]; R] =
                std::array::from_fn(|r| [x(r, g), if pair { x(r, g + 1) } else { vdupq_n_s8(0) }]);
            for v in 0..VECTORS {
                let ws = [w(g, v), if pair { w(g + 1, v) } else { vdupq_n_s8(0) }];
                let [low, high] = [2 * v, 2 * v + 1];
                if R == 2 {
                    let sums = [acc[0][low], acc[0][high], acc[R - 1][low], acc[R - 1][high]];
                    let [a_low, a_high, b_low, b_high] = widen_two(sums, ws, [xs[0], xs[R - 1]]);
                    [acc[0][low], acc[0][high]] = [a_low, a_high];
                    [acc[R - 1][low], acc[R - 1][high]] = [b_low, b_high];
                } else {
                    [acc[0][low], acc[0][high]] = widen_one([acc[0][low], acc[0][high]], ws, xs[0]);
                }
            }
            g += 2;
        }
        let mut sums = [[0i32; COLUMNS]; R];
        for r in 0..R {
            for v in 0..VECTORS {
                let columns = vpaddq_s32(acc[r][2 * v], acc[r][2 * v + 1]);
                vst1q_s32(sums[r][v * 4..].as_mut_ptr(), columns);
            }
        }
        sums
    }
}

/// One step of [`widening_sums`] for one row: `acc` plus the products of two groups of `x`
/// (`[group g, group g + 1]`, each broadcast) and of `w`, in two halves.
///
/// Written out because the compiler turns `vmull_high_s8` into an `ext` and an `smull`, and
/// `vpadalq_s16` into `saddlp` and `add`, then spills the sums.
#[inline(always)]
fn widen_one(acc: [int32x4_t; 2], w: [int8x16_t; 2], x: [int8x16_t; 2]) -> [int32x4_t; 2] {
    let [mut low, mut high] = acc;
    // SAFETY: register-only NEON instructions.
    unsafe {
        asm!(
            "smull  {t0:v}.8h, {w0:v}.8b,  {x0:v}.8b",
            "smull2 {t1:v}.8h, {w0:v}.16b, {x0:v}.16b",
            "smlal  {t0:v}.8h, {w1:v}.8b,  {x1:v}.8b",
            "smlal2 {t1:v}.8h, {w1:v}.16b, {x1:v}.16b",
            "sadalp {low:v}.4s,  {t0:v}.8h",
            "sadalp {high:v}.4s, {t1:v}.8h",
            low = inout(vreg) low,
            high = inout(vreg) high,
            w0 = in(vreg) w[0],
            w1 = in(vreg) w[1],
            x0 = in(vreg) x[0],
            x1 = in(vreg) x[1],
            t0 = out(vreg) _,
            t1 = out(vreg) _,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    [low, high]
}

/// [`widen_one`] for two rows sharing the weights, interleaved so that no instruction waits on
/// the one before: `acc` is row 0's two halves, then row 1's; `x` the rows' groups.
#[inline(always)]
fn widen_two(acc: [int32x4_t; 4], w: [int8x16_t; 2], x: [[int8x16_t; 2]; 2]) -> [int32x4_t; 4] {
    let [mut a_low, mut a_high, mut b_low, mut b_high] = acc;
    // SAFETY: register-only NEON instructions.
    unsafe {
        asm!(
            "smull  {t0:v}.8h, {w0:v}.8b,  {a0:v}.8b",
            "smull  {t1:v}.8h, {w0:v}.8b,  {b0:v}.8b",
            "smull2 {t2:v}.8h, {w0:v}.16b, {a0:v}.16b",
            "smull2 {t3:v}.8h, {w0:v}.16b, {b0:v}.16b",
            "smlal  {t0:v}.8h, {w1:v}.8b,  {a1:v}.8b",
            "smlal  {t1:v}.8h, {w1:v}.8b,  {b1:v}.8b",
            "smlal2 {t2:v}.8h, {w1:v}.16b, {a1:v}.16b",
            "smlal2 {t3:v}.8h, {w1:v}.16b, {b1:v}.16b",
            "sadalp {a_low:v}.4s,  {t0:v}.8h",
            "sadalp {b_low:v}.4s,  {t1:v}.8h",
            "sadalp {a_high:v}.4s, {t2:v}.8h",
            "sadalp {b_high:v}.4s, {t3:v}.8h",
            a_low = inout(vreg) a_low,
            a_high = inout(vreg) a_high,
            b_low = inout(vreg) b_low,
            b_high = inout(vreg) b_high,
            w0 = in(vreg) w[0],
            w1 = in(vreg) w[1],
            a0 = in(vreg) x[0][0],
            a1 = in(vreg) x[0][1],
            b0 = in(vreg) x[1][0],
            b1 = in(vreg) x[1][1],
            t0 = out(vreg) _,
            t1 = out(vreg) _,
            t2 = out(vreg) _,
            t3 = out(vreg) _,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    [a_low, a_high, b_low, b_high]
}
