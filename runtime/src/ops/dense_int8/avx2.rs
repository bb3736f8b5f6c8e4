//! DenseLinearInt8's 256-bit kernels: blocks of rows × 16 columns (two ymm vectors of eight
//! columns × four int8 weights), each step four u8 activations of a row, broadcast, against
//! each vector.
//!
//! - AVX2: `vpmaddubsw` multiplies u8 by i8 and adds pairs into i16 lanes with saturation,
//!   then `vpmaddwd` by ones adds pairs of those into i32. Activations quantized to 0..=127
//!   ([`super::Kernel::levels`]) keep every pair within i16 (2 · 127 · 128 < 2^15), so
//!   nothing saturates; 4 rows (8 sums, 2 weight vectors and the temporaries).
//! - AVX-VNNI: `vpdpbusd` does the same in one instruction on 0..=255; 6 rows (12 sums).

use super::{ARRAY_COLUMNS, ArraySums, DenseLinearInt8, QuantizedRows, RowScale, rows_in_blocks};
use std::arch::x86_64::*;

const VECTORS: usize = 2;
/// Rows of a block.
pub(super) const ROWS: usize = 4;
pub(super) const VNNI_ROWS: usize = 6;

/// The output rows `out` from the quantized rows `x` (and `residual`), with `vpmaddubsw`.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn rows(
    op: &DenseLinearInt8,
    x: &QuantizedRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    rows_in_blocks::<Maddubs, ROWS>(op, x, residual, out);
}

/// As [`rows`], with AVX-VNNI's `vpdpbusd`.
///
/// # Safety
/// The CPU has AVX2, FMA and AVX-VNNI.
#[target_feature(enable = "avx2,fma,avxvnni")]
pub(super) unsafe fn rows_vnni(
    op: &DenseLinearInt8,
    x: &QuantizedRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    rows_in_blocks::<Vnni, VNNI_ROWS>(op, x, residual, out);
}

struct Maddubs;
struct Vnni;

impl ArraySums for Maddubs {
    #[inline(always)]
    fn sums<const R: usize>(
        x: &QuantizedRows,
        first: usize,
        panel: &[i8],
    ) -> [[i32; ARRAY_COLUMNS]; R] {
        sums::<false, R>(x, first, panel)
    }
}

impl ArraySums for Vnni {
    #[inline(always)]
    fn sums<const R: usize>(
        x: &QuantizedRows,
        first: usize,
        panel: &[i8],
    ) -> [[i32; ARRAY_COLUMNS]; R] {
        sums::<true, R>(x, first, panel)
    }
}

/// The i32 sums of rows `first..first + R` against the panel.
#[inline(always)]
fn sums<const VNNI: bool, const R: usize>(
    x: &QuantizedRows,
    first: usize,
    panel: &[i8],
) -> [[i32; ARRAY_COLUMNS]; R] {
    let groups = x.stride / 4;
    assert!(panel.len() == groups * 4 * ARRAY_COLUMNS && x.values.len() >= (first + R) * x.stride);
    let rows: [*const u8; R] = std::array::from_fn(|r| x.values[(first + r) * x.stride..].as_ptr());
    // SAFETY: the caller's target features include AVX2 (and AVX-VNNI when `VNNI`); every
    // read is within the panel or a row (asserted above).
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); VECTORS]; R];
        for g in 0..groups {
            let w: [__m256i; VECTORS] = std::array::from_fn(|v| {
                _mm256_loadu_si256(panel.as_ptr().add((g * VECTORS + v) * 32).cast())
            });
            for r in 0..R {
                let four = rows[r].add(4 * g).cast::<i32>().read_unaligned();
                let x = _mm256_set1_epi32(four);
                for v in 0..VECTORS {
                    acc[r][v] = if VNNI {
                        _mm256_dpbusd_avx_epi32(acc[r][v], x, w[v])
                    } else {
                        let pairs = _mm256_maddubs_epi16(x, w[v]);
                        _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(pairs, ones))
                    };
                }
            }
        }
        let mut sums = [[0i32; ARRAY_COLUMNS]; R];
        for r in 0..R {
            for v in 0..VECTORS {
                _mm256_storeu_si256(sums[r][v * 8..].as_mut_ptr().cast(), acc[r][v]);
            }
        }
        sums
    }
}

/// [`super::quantize_rows`] on 8 lanes.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_rows(
    x: &[f32],
    depth: usize,
    stride: usize,
    levels: u8,
    values: &mut [u8],
    scales: &mut [RowScale],
) {
    const LANES: usize = 8;
    let levels = levels as f32;
    let whole = depth / LANES * LANES;
    for ((row, quantized), scale) in x
        .chunks_exact(depth)
        .zip(values.chunks_exact_mut(stride))
        .zip(scales.iter_mut())
    {
        // SAFETY: `c + LANES ≤ whole ≤ depth` wherever it is called.
        let load = |c: usize| unsafe { _mm256_loadu_ps(row.as_ptr().add(c)) };
        let mut low = _mm256_set1_ps(f32::INFINITY);
        let mut high = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut nan = _mm256_setzero_ps();
        for c in (0..whole).step_by(LANES) {
            // The accumulator second: a NaN lane keeps it, and is counted apart.
            let x = load(c);
            low = _mm256_min_ps(x, low);
            high = _mm256_max_ps(x, high);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
        }
        let (mut lows, mut highs) = ([0f32; LANES], [0f32; LANES]);
        // SAFETY: each array holds one vector.
        unsafe {
            _mm256_storeu_ps(lows.as_mut_ptr(), low);
            _mm256_storeu_ps(highs.as_mut_ptr(), high);
        }
        let rest = &row[whole..];
        let min = lows
            .iter()
            .chain(rest)
            .fold(f32::INFINITY, |m, &v| m.min(v));
        let max = highs
            .iter()
            .chain(rest)
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let has_nan = _mm256_movemask_ps(nan) != 0 || rest.iter().any(|v| v.is_nan());
        let min = if has_nan { f32::NAN } else { min };
        let (row_scale, inverse) = RowScale::for_range(min, max, levels);
        let inverse_lanes = _mm256_set1_ps(inverse);
        let zero = _mm256_set1_ps(row_scale.zero);
        let (floor, ceiling) = (_mm256_setzero_ps(), _mm256_set1_ps(levels));
        for c in (0..whole).step_by(LANES) {
            // max(NaN, 0) is 0; the conversion rounds to even.
            let level = _mm256_fmadd_ps(load(c), inverse_lanes, zero);
            let level = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(level, floor), ceiling));
            let high_half = _mm256_extracti128_si256::<1>(level);
            let words = _mm_packus_epi32(_mm256_castsi256_si128(level), high_half);
            let bytes = _mm_packus_epi16(words, words);
            // SAFETY: `c + 8 ≤ depth ≤ stride`.
            unsafe { _mm_storel_epi64(quantized.as_mut_ptr().add(c).cast(), bytes) };
        }
        for (q, &v) in quantized[whole..depth].iter_mut().zip(rest) {
            let level = v.mul_add(inverse, row_scale.zero).clamp(0.0, levels);
            *q = level.round_ties_even() as u8;
        }
        *scale = row_scale;
    }
}
