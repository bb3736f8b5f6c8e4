//! DenseLinear's AVX-512 kernel: blocks of 8 rows × 48 columns or 12 rows × 32 (24 of the
//! 32 zmm registers), each step one broadcast per row against a panel row of three or two
//! vectors. Three vectors take fewer broadcasts per multiply-add; two waste less on widths
//! that are not multiples of 48 (the shipped model's 64 and 128). The bias starts the sums;
//! GELU and the residual are applied to the block before its one store.

use super::{DenseLinear, InputRows};
use crate::ops::avx512::{LANES, first_lanes, gelu, rows_times_panel};
use std::arch::x86_64::*;

/// The rows and columns of the block of sums for a layer `width` wide: three vectors unless
/// two pad fewer columns.
pub(super) fn block(width: usize) -> (usize, usize) {
    let padding = |columns: usize| width.next_multiple_of(columns) - width;
    if padding(3 * LANES) <= padding(2 * LANES) {
        (8, 3 * LANES)
    } else {
        (12, 2 * LANES)
    }
}

/// The output rows `out` from the rows `x` (and `residual`).
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn rows(
    op: &DenseLinear,
    x: InputRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    // SAFETY: the CPU has AVX-512F.
    unsafe {
        match block(op.width) {
            (8, 48) => rows_with::<3, 8>(op, x, residual, out),
            _ => rows_with::<2, 12>(op, x, residual, out),
        }
    }
}

/// Panel by panel (which then stays in cache), block by block of rows, with panel rows of `V`
/// vectors and blocks of `ROWS` rows.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn rows_with<const V: usize, const ROWS: usize>(
    op: &DenseLinear,
    x: InputRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    let columns_per_panel = V * LANES;
    let (depth, width) = (op.depth, op.width);
    let rows = out.len() / width;
    assert!(x.depth() == depth && residual.is_none_or(|r| r.len() == out.len()));
    x.check(rows);
    assert!(op.panels.len() == width.div_ceil(columns_per_panel) * depth * columns_per_panel);
    let panels = op.panels.chunks_exact(depth * columns_per_panel);
    let next_panels = panels.clone().skip(1).map(Some).chain([None]);
    for (p, (panel, next)) in panels.zip(next_panels).enumerate() {
        // W comes from memory once per inference: ask for the next panel while this one's
        // rows are computed, so it is in L2 when its turn comes.
        if let Some(next) = next {
            for line in next.chunks(64 / size_of::<f32>()) {
                _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast());
            }
        }
        let column = p * columns_per_panel;
        let columns = columns_per_panel.min(width - column);
        let mut block = Block::<V> {
            panel: panel.as_ptr(),
            width,
            // SAFETY: the bias is padded to whole panels.
            bias: std::array::from_fn(|v| unsafe {
                _mm512_loadu_ps(op.bias.as_ptr().add(column + v * LANES))
            }),
            masks: std::array::from_fn(|v| first_lanes(columns.saturating_sub(v * LANES))),
            gelu: op.gelu,
            x,
            residual: residual.map(|r| r[column..].as_ptr()),
            out: out[column..].as_mut_ptr(),
        };
        let mut first = 0;
        while first < rows {
            // Whole blocks, then the rest in blocks of 8, 4, 2 and 1 rows, so none is wasted.
            // SAFETY: `first + R ≤ rows`, and x, `out` and `residual` hold `rows` rows
            // (checked above).
            let done = unsafe {
                match rows - first {
                    n if n >= ROWS => block.compute::<ROWS>(first),
                    8.. => block.compute::<8>(first),
                    4.. => block.compute::<4>(first),
                    2.. => block.compute::<2>(first),
                    _ => block.compute::<1>(first),
                }
            };
            first += done;
        }
    }
}

/// One panel of W, and where its rows go.
struct Block<'a, const V: usize> {
    panel: *const f32,
    width: usize,
    bias: [__m512; V],
    /// The panel's columns that are outputs (the rest is padding).
    masks: [__mmask16; V],
    gelu: bool,
    x: InputRows<'a>,
    /// The residual and the output from the panel's first column.
    residual: Option<*const f32>,
    out: *mut f32,
}

impl<const V: usize> Block<'_, V> {
    /// Rows `first..first + R`; returns `R`.
    ///
    /// # Safety
    /// x (checked), `residual` and `out` hold those rows, and the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn compute<const R: usize>(&mut self, first: usize) -> usize {
        let (runs, run) = self.x.runs();
        let starts = self.x.starts::<R>(first);
        let mut sums = [self.bias; R];
        for k in 0..runs {
            // SAFETY: the rows were checked (see above).
            let x: [*const f32; R] =
                std::array::from_fn(|r| unsafe { self.x.run_start(starts[r], k) });
            // SAFETY: each run holds `run` values, and the panel's rows from `k · run` on hold
            // `run` rows of V vectors, since `runs · run` is its depth.
            unsafe {
                let panel = self.panel.add(k * run * V * LANES);
                rows_times_panel::<R, V>(&x, run, panel, &mut sums)
            };
        }
        for (r, row) in sums.iter().enumerate() {
            let at = (first + r) * self.width;
            for (v, &sum) in row.iter().enumerate() {
                let mask = self.masks[v];
                let mut y = if self.gelu { gelu(sum) } else { sum };
                // Masked lanes are neither read nor written, so the addresses past a partial
                // panel's outputs are never touched.
                let offset = at + v * LANES;
                if let Some(residual) = self.residual {
                    // SAFETY: the masked lanes are within row `first + r` (see above).
                    let residual =
                        unsafe { _mm512_maskz_loadu_ps(mask, residual.wrapping_add(offset)) };
                    y = _mm512_add_ps(y, residual);
                }
                // SAFETY: as for the residual.
                unsafe { _mm512_mask_storeu_ps(self.out.wrapping_add(offset), mask, y) };
            }
        }
        R
    }
}
