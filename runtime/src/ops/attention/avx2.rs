//! The attention core's AVX2 kernel: the portable kernel compiled for AVX2 and FMA, whose
//! 6 × 16 blocks of sums the compiler keeps in twelve of the sixteen ymm registers.

use super::{Job, portable};

/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend_queries(
    job: &Job,
    first_query: usize,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    portable::attend_queries_with::<true>(job, first_query, out, scratch);
}
