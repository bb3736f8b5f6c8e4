//! DenseLinearInt8's AVX-512 VNNI kernel: blocks of 6 rows × 64 columns or 12 rows × 32 (24
//! of the 32 zmm registers), each step one `vpdpbusd` per row and vector: four u8 activations
//! of a row, broadcast, against four int8 weights of each of 16 columns, summed into i32
//! lanes. Four vectors a panel row take half the broadcasts of two (deit-tiny's int8 products
//! 3.5 → 3.1 ms); two waste less on widths that are not multiples of 64. The scales, the bias,
//! GELU and the residual are applied to the block before its one store.

use super::{DenseLinearInt8, QuantizedRows, RowScale};
use crate::ops::avx512::{LANES, first_lanes, gelu};
use std::arch::x86_64::*;

/// The rows and columns of the block of sums for a layer `width` wide: four vectors unless
/// two pad fewer columns.
pub(super) fn block(width: usize) -> (usize, usize) {
    let padding = |columns: usize| width.next_multiple_of(columns) - width;
    if padding(4 * LANES) <= padding(2 * LANES) {
        (6, 4 * LANES)
    } else {
        (12, 2 * LANES)
    }
}

/// The output rows `out` from the quantized rows `x` (and `residual`).
///
/// # Safety
/// The CPU has AVX-512F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn rows(
    op: &DenseLinearInt8,
    x: &QuantizedRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    // SAFETY: as this function.
    unsafe {
        match block(op.width) {
            (6, 64) => rows_with::<4, 6>(op, x, residual, out),
            _ => rows_with::<2, 12>(op, x, residual, out),
        }
    }
}

/// Panel by panel, block by block of rows, with panel rows of `V` vectors and blocks of `ROWS`
/// rows (then 4, 2 and 1).
///
/// # Safety
/// As [`rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows_with<const V: usize, const ROWS: usize>(
    op: &DenseLinearInt8,
    x: &QuantizedRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    let columns = V * LANES;
    let width = op.width;
    let rows = out.len() / width;
    assert!(x.values.len() >= rows * x.stride && x.scales.len() >= rows);
    assert!(residual.is_none_or(|r| r.len() == out.len()));
    assert!(op.panels.len() == width.div_ceil(columns) * x.stride * columns);
    for (p, panel) in op.panels.chunks_exact(x.stride * columns).enumerate() {
        let column = p * columns;
        let block = Block::<V> {
            panel: panel.as_ptr(),
            groups: x.stride / 4,
            epilogue: Epilogue::new(op, column),
            x,
            width,
            residual: residual.map(|r| r[column..].as_ptr()),
            out: out[column..].as_mut_ptr(),
        };
        let mut first = 0;
        while first < rows {
            // SAFETY: `first + R ≤ rows`, and the slices hold `rows` rows (asserted above).
            first += unsafe {
                match rows - first {
                    n if n >= ROWS => block.compute::<ROWS>(first),
                    4.. => block.compute::<4>(first),
                    2.. => block.compute::<2>(first),
                    _ => block.compute::<1>(first),
                }
            };
        }
    }
}

/// What turns a panel's i32 sums into outputs: per column, W's column sum, scale and bias.
struct Epilogue<const V: usize> {
    column_sums: [__m512; V],
    scales: [__m512; V],
    bias: [__m512; V],
    /// The panel's columns that are outputs (the rest is padding).
    masks: [__mmask16; V],
    gelu: bool,
}

impl<const V: usize> Epilogue<V> {
    #[target_feature(enable = "avx512f")]
    fn new(op: &DenseLinearInt8, column: usize) -> Epilogue<V> {
        // SAFETY: the per-column vectors are padded to whole panels.
        let load = |values: &[f32], v: usize| unsafe {
            _mm512_loadu_ps(values[column + v * LANES..][..LANES].as_ptr())
        };
        let columns = (V * LANES).min(op.width - column);
        Epilogue {
            column_sums: std::array::from_fn(|v| load(&op.column_sums, v)),
            scales: std::array::from_fn(|v| load(&op.scales, v)),
            bias: std::array::from_fn(|v| load(&op.bias, v)),
            masks: std::array::from_fn(|v| first_lanes(columns.saturating_sub(v * LANES))),
            gelu: op.gelu,
        }
    }

    /// `act(s_r · s_c · (sum − z_r · Σ_d W[d][c]) + b_c)` for vector `v` of a row.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn output(&self, sum: __m512i, row: RowScale, v: usize) -> __m512 {
        let sum = _mm512_fnmadd_ps(
            _mm512_set1_ps(row.zero),
            self.column_sums[v],
            _mm512_cvtepi32_ps(sum),
        );
        let scale = _mm512_mul_ps(_mm512_set1_ps(row.scale), self.scales[v]);
        let y = _mm512_fmadd_ps(sum, scale, self.bias[v]);
        if self.gelu { gelu(y) } else { y }
    }
}

/// One panel of W, and where its rows go.
struct Block<'a, const V: usize> {
    panel: *const i8,
    /// Groups of four values in a row.
    groups: usize,
    epilogue: Epilogue<V>,
    x: &'a QuantizedRows<'a>,
    width: usize,
    /// The residual and the output from the panel's first column.
    residual: Option<*const f32>,
    out: *mut f32,
}

impl<const V: usize> Block<'_, V> {
    /// Rows `first..first + R`; returns `R`.
    ///
    /// # Safety
    /// `x`, `residual` and `out` hold those rows, and the CPU has AVX-512F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn compute<const R: usize>(&self, first: usize) -> usize {
        let rows: [*const u8; R] =
            std::array::from_fn(|r| self.x.values[(first + r) * self.x.stride..].as_ptr());
        let mut sums = [[_mm512_setzero_si512(); V]; R];
        for g in 0..self.groups {
            // SAFETY: the panel holds `groups` rows of V vectors of 64 bytes.
            let w: [__m512i; V] = std::array::from_fn(|v| unsafe {
                _mm512_loadu_si512(self.panel.add((g * V + v) * 64).cast())
            });
            for r in 0..R {
                // SAFETY: each row holds `groups` groups of four values.
                let four = unsafe { rows[r].add(4 * g).cast::<i32>().read_unaligned() };
                let x = _mm512_set1_epi32(four);
                for v in 0..V {
                    sums[r][v] = _mm512_dpbusd_epi32(sums[r][v], x, w[v]);
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            let scale = self.x.scales[first + r];
            let at = (first + r) * self.width;
            for (v, &sum) in row.iter().enumerate() {
                let mask = self.epilogue.masks[v];
                let mut y = self.epilogue.output(sum, scale, v);
                // Masked lanes are neither read nor written, so the addresses past a partial
                // panel's outputs are never touched.
                let offset = at + v * LANES;
                if let Some(residual) = self.residual {
                    // SAFETY: the masked lanes are within row `first + r`.
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

/// [`super::quantize_rows`] on 16 lanes.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn quantize_rows(
    x: &[f32],
    depth: usize,
    stride: usize,
    levels: u8,
    values: &mut [u8],
    scales: &mut [RowScale],
) {
    let levels = levels as f32;
    let chunks = depth.div_ceil(LANES);
    for ((row, quantized), scale) in x
        .chunks_exact(depth)
        .zip(values.chunks_exact_mut(stride))
        .zip(scales.iter_mut())
    {
        // Lanes past the row read as zero, which the range holds anyway.
        let load = |c: usize| {
            let mask = first_lanes(depth - c * LANES);
            // SAFETY: the masked lanes are within the row.
            unsafe { _mm512_maskz_loadu_ps(mask, row.as_ptr().wrapping_add(c * LANES)) }
        };
        let mut low = _mm512_set1_ps(f32::INFINITY);
        let mut high = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut nan: __mmask16 = 0;
        for c in 0..chunks {
            // The accumulator second: a NaN lane keeps it, and is counted apart.
            let x = load(c);
            low = _mm512_min_ps(x, low);
            high = _mm512_max_ps(x, high);
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        }
        let (min, max) = (_mm512_reduce_min_ps(low), _mm512_reduce_max_ps(high));
        let min = if nan != 0 { f32::NAN } else { min };
        let (row_scale, inverse) = RowScale::for_range(min, max, levels);
        let (inverse, zero) = (_mm512_set1_ps(inverse), _mm512_set1_ps(row_scale.zero));
        let (floor, ceiling) = (_mm512_setzero_ps(), _mm512_set1_ps(levels));
        for c in 0..chunks {
            // max(NaN, 0) is 0; the conversion rounds to even.
            let level = _mm512_fmadd_ps(load(c), inverse, zero);
            let level = _mm512_min_ps(_mm512_max_ps(level, floor), ceiling);
            let mask = first_lanes(depth - c * LANES);
            // SAFETY: the masked bytes are within the row.
            unsafe {
                _mm512_mask_cvtusepi32_storeu_epi8(
                    quantized.as_mut_ptr().wrapping_add(c * LANES).cast(),
                    mask,
                    _mm512_cvtps_epi32(level),
                )
            };
        }
        *scale = row_scale;
    }
}
