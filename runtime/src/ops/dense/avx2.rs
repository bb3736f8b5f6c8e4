//! DenseLinear's AVX2 kernel: the portable kernel compiled for AVX2 and FMA, whose 6 × 16
//! blocks of sums the compiler keeps in twelve of the sixteen ymm registers.

use super::{DenseLinear, InputRows, portable};

/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn rows(
    op: &DenseLinear,
    x: InputRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    portable::rows_with::<true>(op, x, residual, out);
}
