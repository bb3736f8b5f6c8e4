//! DenseLinear's portable kernel: plain Rust over blocks of [`ROWS`] rows × [`COLUMNS`]
//! columns, which the compiler keeps in vector registers (twelve of the sixteen AVX2 ones; the
//! AVX2 kernel is this code compiled for AVX2 and FMA).

use super::{DenseLinear, InputRows};
use crate::ops::rows::{PANEL_WIDTH, rows_times_panel};
use crate::ops::softmax::multiply_add;

/// Output columns per panel.
pub(super) const COLUMNS: usize = PANEL_WIDTH;
/// Activation rows computed together: each panel row loaded feeds this many of them.
pub(super) const ROWS: usize = 6;

/// The output rows `out` from the rows `x` (and `residual`).
pub(super) fn rows(op: &DenseLinear, x: InputRows, residual: Option<&[f32]>, out: &mut [f32]) {
    // aarch64 always has a fused multiply-add; elsewhere `mul_add` would be a libm call.
    rows_with::<{ cfg!(target_arch = "aarch64") }>(op, x, residual, out);
}

/// Panel by panel (which then stays in cache), block by block of [`ROWS`] rows.
#[inline(always)]
pub(super) fn rows_with<const FMA: bool>(
    op: &DenseLinear,
    x: InputRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    let (depth, width) = (op.depth, op.width);
    assert_eq!(x.depth(), depth);
    let rows = out.len() / width;
    let panels = op.panels.chunks_exact(depth * COLUMNS);
    let (biases, _) = op.bias.as_chunks::<COLUMNS>();
    for (p, (panel, bias)) in panels.zip(biases).enumerate() {
        let column = p * COLUMNS;
        let block = Block {
            panel,
            bias,
            width,
            columns: COLUMNS.min(width - column),
            gelu: op.gelu,
        };
        for first in (0..rows).step_by(ROWS) {
            let x = x.from(first);
            let at = first * width + column;
            let residual = residual.map(|r| &r[at..]);
            let out = &mut out[at..];
            match rows - first {
                1 => block.compute::<FMA, 1>(x, residual, out),
                2 => block.compute::<FMA, 2>(x, residual, out),
                3 => block.compute::<FMA, 3>(x, residual, out),
                4 => block.compute::<FMA, 4>(x, residual, out),
                5 => block.compute::<FMA, 5>(x, residual, out),
                _ => block.compute::<FMA, ROWS>(x, residual, out),
            }
        }
    }
}

/// One panel of W, and what is done with its sums.
struct Block<'a> {
    panel: &'a [f32],
    bias: &'a [f32; COLUMNS],
    /// Output row length.
    width: usize,
    /// Columns of the panel that are outputs (the rest is padding).
    columns: usize,
    gelu: bool,
}

impl Block<'_> {
    /// `R` output rows of the panel's columns, from `R` rows of `x` (and of `residual`).
    #[inline(always)]
    fn compute<const FMA: bool, const R: usize>(
        &self,
        x: InputRows,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (runs, run) = x.runs();
        let starts = x.starts::<R>(0);
        let mut sums = [*self.bias; R];
        for (k, panel) in self
            .panel
            .chunks_exact(run * COLUMNS)
            .take(runs)
            .enumerate()
        {
            let x: [&[f32]; R] = std::array::from_fn(|r| x.run(starts[r], k));
            sums = rows_times_panel::<FMA, R>(x, panel, sums);
        }
        if self.gelu {
            // Plain loops: a helper such as `array::map` may not be inlined into the caller
            // compiled for FMA, and `mul_add` outside it is a slow library call.
            #[allow(clippy::needless_range_loop)]
            for r in 0..R {
                for c in 0..COLUMNS {
                    sums[r][c] = gelu::<FMA>(sums[r][c]);
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            let out = &mut out[r * self.width..][..self.columns];
            match residual {
                Some(residual) => {
                    let residual = &residual[r * self.width..][..self.columns];
                    for ((o, &y), &res) in out.iter_mut().zip(row).zip(residual) {
                        *o = y + res;
                    }
                }
                None => out.copy_from_slice(&row[..self.columns]),
            }
        }
    }
}

/// `x Φ(x)`, GELU in its erf form as tract's `GeluExact` computes it: erf from Abramowitz
/// and Stegun's 7.1.28 (absolute error below 3e-7), `1 - 1 / p(|z|)^16`.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub(crate) fn gelu<const FMA: bool>(x: f32) -> f32 {
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let p = multiply_add::<FMA>(0.0000430638, z, 0.0002765672);
    let p = multiply_add::<FMA>(p, z, 0.0001520143);
    let p = multiply_add::<FMA>(p, z, 0.0092705272);
    let p = multiply_add::<FMA>(p, z, 0.0422820123);
    let p = multiply_add::<FMA>(p, z, 0.0705230784);
    let p = multiply_add::<FMA>(p, z, 1.0);
    let p2 = p * p;
    let p4 = p2 * p2;
    let p8 = p4 * p4;
    let erf = (1.0 - 1.0 / (p8 * p8)).copysign(x);
    0.5 * x * (1.0 + erf)
}
