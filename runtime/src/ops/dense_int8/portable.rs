//! DenseLinearInt8's portable kernel: plain Rust, one row at a time against a panel of 16
//! columns. It is the fallback where no instruction set has a kernel, and the reference the
//! others are tested against.

use super::{ARRAY_COLUMNS, ArraySums, DenseLinearInt8, QuantizedRows, RowScale, rows_in_blocks};

/// The output rows `out` from the quantized rows `x` (and `residual`).
pub(super) fn rows(
    op: &DenseLinearInt8,
    x: &QuantizedRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    rows_in_blocks::<Portable, 1>(op, x, residual, out);
}

struct Portable;

impl ArraySums for Portable {
    fn sums<const R: usize>(
        x: &QuantizedRows,
        first: usize,
        panel: &[i8],
    ) -> [[i32; ARRAY_COLUMNS]; R] {
        std::array::from_fn(|r| {
            let row = &x.values[(first + r) * x.stride..][..x.stride];
            let mut sums = [0i32; ARRAY_COLUMNS];
            for (group, w) in row
                .chunks_exact(4)
                .zip(panel.chunks_exact(4 * ARRAY_COLUMNS))
            {
                for (sum, w) in sums.iter_mut().zip(w.chunks_exact(4)) {
                    for (&q, &w) in group.iter().zip(w) {
                        *sum += q as i32 * w as i32;
                    }
                }
            }
            sums
        })
    }
}

/// [`super::quantize_rows`] in plain Rust.
pub(super) fn quantize_rows(
    x: &[f32],
    depth: usize,
    stride: usize,
    levels: u8,
    values: &mut [u8],
    scales: &mut [RowScale],
) {
    let levels = levels as f32;
    for ((row, quantized), scale) in x
        .chunks_exact(depth)
        .zip(values.chunks_exact_mut(stride))
        .zip(scales.iter_mut())
    {
        // `min` and `max` skip NaN, so it is counted apart, in the same pass.
        let (min, max, nan) = row.iter().fold(
            (f32::INFINITY, f32::NEG_INFINITY, false),
            |(lo, hi, nan), &v| (lo.min(v), hi.max(v), nan | v.is_nan()),
        );
        let min = if nan { f32::NAN } else { min };
        let (row_scale, inverse) = RowScale::for_range(min, max, levels);
        for (q, &v) in quantized.iter_mut().zip(row) {
            // As the vector kernels: one rounding of the multiply-add, ties to even, and
            // `as` turns a NaN into 0.
            let level = v.mul_add(inverse, row_scale.zero).clamp(0.0, levels);
            *q = level.round_ties_even() as u8;
        }
        *scale = row_scale;
    }
}
