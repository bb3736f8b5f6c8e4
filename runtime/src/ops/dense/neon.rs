//! DenseLinear's NEON kernel (aarch64): blocks of [`ROWS`] rows × 16 columns, 16 of the 32
//! q registers. Each step loads four values of each row in one register and multiplies a
//! panel row by one lane of it (`fmla v.4s, v.4s, v.s[l]`), so four steps cost a load per
//! row and four per panel row instead of a broadcast per row and step. W's panels are the
//! portable kernel's.

use super::portable::{COLUMNS, gelu};
use super::{DenseLinear, InputRows};
use std::arch::aarch64::*;

/// Vectors per panel row.
const VECTORS: usize = COLUMNS / 4;
/// Activation rows computed together: 16 accumulators, 4 rows of values and the panel rows
/// fit the 32 registers. With 6 rows (24 accumulators) the compiler kept a copy of every sum
/// on the stack, a store per multiply-add.
pub(super) const ROWS: usize = 4;

/// The output rows `out` from the rows `x` (and `residual`), panel by panel (which then stays
/// in cache), block by block of rows.
#[target_feature(enable = "neon")]
pub(super) fn rows(op: &DenseLinear, x: InputRows, residual: Option<&[f32]>, out: &mut [f32]) {
    let (depth, width) = (op.depth, op.width);
    let rows = out.len() / width;
    assert!(x.depth() == depth && residual.is_none_or(|r| r.len() == out.len()));
    x.check(rows);
    assert!(op.panels.len() == width.div_ceil(COLUMNS) * depth * COLUMNS);
    for (p, panel) in op.panels.chunks_exact(depth * COLUMNS).enumerate() {
        let column = p * COLUMNS;
        let block = Block {
            panel: panel.as_ptr(),
            bias: &op.bias[column..][..COLUMNS],
            width,
            columns: COLUMNS.min(width - column),
            gelu: op.gelu,
        };
        for first in (0..rows).step_by(ROWS) {
            let x = x.from(first);
            let at = first * width + column;
            let residual = residual.map(|r| &r[at..]);
            let out = &mut out[at..];
            // SAFETY: each call reads and writes the rows it is given (its R ≤ rows left).
            unsafe {
                match rows - first {
                    1 => block.compute::<1>(x, residual, out),
                    2 => block.compute::<2>(x, residual, out),
                    3 => block.compute::<3>(x, residual, out),
                    _ => block.compute::<ROWS>(x, residual, out),
                }
            }
        }
    }
}

/// One panel of W, and what is done with its sums.
struct Block<'a> {
    panel: *const f32,
    bias: &'a [f32],
    width: usize,
    /// Columns of the panel that are outputs (the rest is padding).
    columns: usize,
    gelu: bool,
}

impl Block<'_> {
    /// `R` output rows of the panel's columns, from `R` rows of `x` (and of `residual`).
    ///
    /// # Safety
    /// `x` holds `R` rows (checked), `out` (and `residual`) `R - 1` rows of `width` and the
    /// panel's columns of one more.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn compute<const R: usize>(
        &self,
        x: InputRows,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let mut sums = [[vdupq_n_f32(0.0); VECTORS]; R];
        for row in sums.iter_mut() {
            for (v, sum) in row.iter_mut().enumerate() {
                // SAFETY: the bias is padded to whole panels.
                *sum = unsafe { vld1q_f32(self.bias.as_ptr().add(v * 4)) };
            }
        }
        let (runs, run) = x.runs();
        let starts = x.starts::<R>(0);
        for k in 0..runs {
            // Run k of each row, against the panel's rows from k · run on. SAFETY (of the
            // reads below): each run holds `run` values (the rows were checked), and the
            // panel holds `runs · run` rows (its depth).
            let rows: [*const f32; R] =
                std::array::from_fn(|r| unsafe { x.run_start(starts[r], k) });
            let panel = self.panel.wrapping_add(k * run * COLUMNS);
            let mut j = 0;
            while j + 4 <= run {
                let mut values = [vdupq_n_f32(0.0); R];
                for (r, values) in values.iter_mut().enumerate() {
                    // SAFETY: values j..j + 4 of run k of row r.
                    *values = unsafe { vld1q_f32(rows[r].add(j)) };
                }
                // Panel row j + L times lane L of each row's four values. A macro rather than
                // a function: passed by reference, the sums went through the stack.
                macro_rules! lane_step {
                    ($lane:literal) => {
                        for v in 0..VECTORS {
                            // SAFETY: panel rows j..j + 4 exist.
                            let p = unsafe { vld1q_f32(panel.add((j + $lane) * COLUMNS + v * 4)) };
                            for r in 0..R {
                                sums[r][v] = vfmaq_laneq_f32::<$lane>(sums[r][v], p, values[r]);
                            }
                        }
                    };
                }
                lane_step!(0);
                lane_step!(1);
                lane_step!(2);
                lane_step!(3);
                j += 4;
            }
            for j in j..run {
                for v in 0..VECTORS {
                    // SAFETY: panel row j and value j of each row's run.
                    let p = unsafe { vld1q_f32(panel.add(j * COLUMNS + v * 4)) };
                    for (r, row) in sums.iter_mut().enumerate() {
                        row[v] = vfmaq_n_f32(row[v], p, unsafe { *rows[r].add(j) });
                    }
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            let mut block = [0f32; COLUMNS];
            for (v, &sum) in row.iter().enumerate() {
                // SAFETY: a local array of COLUMNS.
                unsafe { vst1q_f32(block.as_mut_ptr().add(v * 4), sum) };
            }
            if self.gelu {
                for value in &mut block {
                    *value = gelu::<true>(*value);
                }
            }
            let out = &mut out[r * self.width..][..self.columns];
            match residual {
                Some(residual) => {
                    let residual = &residual[r * self.width..][..self.columns];
                    for ((o, &y), &res) in out.iter_mut().zip(&block).zip(residual) {
                        *o = y + res;
                    }
                }
                None => out.copy_from_slice(&block[..self.columns]),
            }
        }
    }
}
