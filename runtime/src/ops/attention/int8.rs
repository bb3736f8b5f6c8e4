//! The attention core's two products in int8, for int8 models on AVX-512 VNNI: q·kᵀ and the
//! softmax weights · v as `vpdpbusd` sums of u8 × i8, the softmax itself in f32.
//!
//! - k is quantized per key (symmetric, i8) and v per column over the keys, once per
//!   evaluation, into tiles of [`KEY_TILE`] keys and 16 or 32 value columns, four values of a
//!   key (or four keys of a column) side by side as one `vpdpbusd` lane reads them.
//! - A block of query rows is quantized per row (u8, asymmetric, as the dense layers'
//!   activations); its scores come out of the i32 sums with the zero point taken off through
//!   the keys' sums, scaled, and stored in f32 for the softmax.
//! - The softmax weights `e = exp(s − max) ∈ (0, 1]` (the largest is 1) become `round(255 e)`
//!   per row, and the context is divided by their integer sum, so each row's weights add up to
//!   one exactly.

use super::Shape;
use super::avx512::exp_in_place;
use crate::ops::avx512::{LANES, first_lanes};
use crate::ops::dense_int8::{RowScale, quantize_rows_avx512};
use crate::ops::rows::for_each_share;
use crate::ops::{aligned, with_buffer};
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Keys from which the int8 products pay for quantizing and tiling k and v at each run: at 50
/// (the shipped model) int8 attention made the int8 model 30 % slower, at 197 (`deit-tiny`) and
/// 325 (`video`) 5 to 8 % faster (docs/precision.md); below, the f32 kernel runs.
pub(super) const MIN_KEYS: usize = 128;

/// Query rows computed together, and keys a score tile (24 of the 32 zmm registers).
const ROWS: usize = 12;
const KEY_TILE: usize = 2 * LANES;

thread_local! {
    /// Reused between frames: k and v quantized and tiled (the calling thread), and a
    /// block's quantized queries and weights (every worker).
    static PANELS: RefCell<Vec<i8>> = const { RefCell::new(Vec::new()) };
    static SCALES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What every worker reads of the queries.
struct Job<'a> {
    shape: Shape,
    scale: f32,
    q: &'a [f32],
}

/// k and v of every head in int8 tiles, with their scales.
struct Int8Panels<'a> {
    /// `[head][key tile][key_size / 4][KEY_TILE][4]`, zero-padded.
    keys: &'a [i8],
    /// `[head][column tile][padded keys / 4][value tile][4]`, zero-padded.
    values: &'a [i8],
    /// Per head: each key's scale and the sum of its int8 values (`padded_keys` each), then
    /// each value column's scale (`column_tiles · value_tile`).
    key_scales: &'a [f32],
    key_sums: &'a [f32],
    value_scales: &'a [f32],
    padded_keys: usize,
    groups: usize,
    value_tile: usize,
    column_tiles: usize,
}

/// `output = softmax(scale · q kᵀ) v` per head with int8 products (see the module); the
/// query rows spread over the inference threads.
///
/// # Safety
/// The CPU has AVX-512F, BW and VNNI.
pub(super) unsafe fn attend(
    shape: Shape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    output: &mut [f32],
) {
    let Shape {
        queries,
        keys,
        heads,
        key_size,
        value_size,
        ..
    } = shape;
    let padded_keys = keys.next_multiple_of(KEY_TILE);
    let groups = key_size.div_ceil(4);
    // The f32 AVX-512 kernel's value tiles, for the same registers.
    let value_tile = super::avx512::tiling(value_size).value_tile;
    let column_tiles = value_size.div_ceil(value_tile);
    let keys_len = heads * padded_keys * groups * 4;
    let values_len = heads * column_tiles * padded_keys * value_tile;
    let key_scales_len = heads * padded_keys;
    let value_scales_len = heads * column_tiles * value_tile;
    with_buffer(&PANELS, |bytes| {
        with_buffer(&SCALES, |floats| {
            let bytes = aligned(bytes, keys_len + values_len);
            // A reused buffer keeps old values in the padding: zero it, the sums read it.
            bytes.fill(0);
            let (key_bytes, value_bytes) = bytes.split_at_mut(keys_len);
            let floats = aligned(floats, 2 * key_scales_len + value_scales_len);
            floats.fill(0.0);
            let (key_scales, rest) = floats.split_at_mut(key_scales_len);
            let (key_sums, value_scales) = rest.split_at_mut(key_scales_len);
            // SAFETY: the caller's CPU has AVX-512 (the packing's rounding and maxima run
            // on its vectors).
            unsafe {
                scales(
                    shape,
                    k,
                    v,
                    padded_keys,
                    value_tile,
                    key_scales,
                    value_scales,
                );
                pack(
                    shape,
                    k,
                    v,
                    padded_keys,
                    value_tile,
                    key_scales,
                    value_scales,
                    key_bytes,
                    value_bytes,
                    key_sums,
                );
            }
            let panels = Int8Panels {
                keys: key_bytes,
                values: value_bytes,
                key_scales,
                key_sums,
                value_scales,
                padded_keys,
                groups,
                value_tile,
                column_tiles,
            };
            let job = Job { shape, scale, q };
            let macs = heads * queries * keys * (key_size + value_size);
            for_each_share(
                output,
                heads * value_size,
                ROWS,
                macs,
                |first_query, out| {
                    with_buffer(&super::SCRATCH, |scores| {
                        with_buffer(&BYTES, |bytes| {
                            let scores = aligned(scores, ROWS * padded_keys);
                            let bytes = aligned(bytes, ROWS * (padded_keys + groups * 4));
                            // SAFETY: the caller's CPU has AVX-512 VNNI.
                            unsafe {
                                attend_queries(&job, &panels, first_query, out, scores, bytes)
                            };
                        })
                    })
                },
            );
        })
    });
}

/// Each key's scale (`max |k| / 127`, per head) and each value column's (over the keys).
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn scales(
    shape: Shape,
    k: &[f32],
    v: &[f32],
    padded_keys: usize,
    value_tile: usize,
    key_scales: &mut [f32],
    value_scales: &mut [f32],
) {
    let Shape {
        keys,
        heads,
        key_size,
        value_size,
        ..
    } = shape;
    // A NaN makes its scale NaN, so the scores or the value column it reaches are NaN, as
    // in f32; `f32::max` alone would drop it and quantize the rest as if it were not there.
    let peak_of = |m: f32, x: f32| match m.is_nan() || x.is_nan() {
        true => f32::NAN,
        false => m.max(x.abs()),
    };
    let scale_of = |peak: f32| match peak {
        peak if peak > 0.0 => peak / 127.0,
        peak if peak.is_nan() => f32::NAN,
        _ => 1.0,
    };
    let columns = value_size.div_ceil(value_tile) * value_tile;
    for (j, (key, value)) in k
        .chunks_exact(heads * key_size)
        .zip(v.chunks_exact(heads * value_size))
        .take(keys)
        .enumerate()
    {
        for h in 0..heads {
            let peak = key[h * key_size..][..key_size]
                .iter()
                .fold(0f32, |m, &x| peak_of(m, x));
            key_scales[h * padded_keys + j] = scale_of(peak);
            // Column maxima first, turned into scales below.
            let peaks = &mut value_scales[h * columns..][..value_size];
            for (p, x) in peaks.iter_mut().zip(&value[h * value_size..][..value_size]) {
                *p = peak_of(*p, *x);
            }
        }
    }
    for h in 0..heads {
        for p in &mut value_scales[h * columns..][..value_size] {
            *p = scale_of(*p);
        }
    }
}

/// k and v in int8 tiles (see [`Int8Panels`]), with each key's sum of its int8 values: 16
/// values a vector, rounded to even and narrowed to bytes, then put in place four at a time
/// (a key's four values of a group; a column's values of four keys, interleaved).
///
/// # Safety
/// The CPU has AVX-512F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack(
    shape: Shape,
    k: &[f32],
    v: &[f32],
    padded_keys: usize,
    value_tile: usize,
    key_scales: &[f32],
    value_scales: &[f32],
    key_bytes: &mut [i8],
    value_bytes: &mut [i8],
    key_sums: &mut [f32],
) {
    let Shape {
        keys,
        heads,
        key_size,
        value_size,
        ..
    } = shape;
    let groups = key_size.div_ceil(4);
    let column_tiles = value_size.div_ceil(value_tile);
    // 16 values (masked to `n`) from `from`, times `inverse`, as 16 bytes.
    let bytes = |from: *const f32, n: usize, inverse: __m512| -> (__m128i, __m512i) {
        // SAFETY: the masked lanes are within the caller's row.
        let x = unsafe { _mm512_maskz_loadu_ps(first_lanes(n), from) };
        let levels = _mm512_cvtps_epi32(_mm512_mul_ps(x, inverse));
        (_mm512_cvtsepi32_epi8(levels), levels)
    };
    for h in 0..heads {
        let key_panel = &mut key_bytes[h * padded_keys * groups * 4..];
        for j in 0..keys {
            let row = k[(j * heads + h) * key_size..][..key_size].as_ptr();
            let inverse = _mm512_set1_ps(1.0 / key_scales[h * padded_keys + j]);
            let (tile, lane) = (j / KEY_TILE, j % KEY_TILE);
            let mut sum = _mm512_setzero_si512();
            for start in (0..key_size).step_by(LANES) {
                let (packed, levels) = bytes(row.wrapping_add(start), key_size - start, inverse);
                sum = _mm512_add_epi32(sum, levels);
                let mut four = [0i32; 4];
                // SAFETY: four lanes of 32 bits.
                unsafe { _mm_storeu_si128(four.as_mut_ptr().cast(), packed) };
                for (i, &four) in four.iter().enumerate() {
                    let g = start / 4 + i;
                    if g < groups {
                        let at = ((tile * groups + g) * KEY_TILE + lane) * 4;
                        key_panel[at..at + 4].copy_from_slice(&four.to_ne_bytes().map(|b| b as i8));
                    }
                }
            }
            key_sums[h * padded_keys + j] = _mm512_reduce_add_epi32(sum) as f32;
        }
        let scales = &value_scales[h * column_tiles * value_tile..];
        let value_panel = &mut value_bytes[h * column_tiles * padded_keys * value_tile..];
        for first in (0..keys).step_by(4) {
            for start in (0..value_size).step_by(LANES) {
                let n = value_size - start;
                // SAFETY: the scales are padded to whole tiles.
                let inverse = _mm512_div_ps(_mm512_set1_ps(1.0), unsafe {
                    _mm512_loadu_ps(scales.as_ptr().add(start))
                });
                let inverse = _mm512_maskz_mov_ps(first_lanes(n), inverse);
                let rows: [__m128i; 4] = std::array::from_fn(|r| {
                    let j = first + r;
                    if j < keys {
                        bytes(
                            v[(j * heads + h) * value_size + start..].as_ptr(),
                            n,
                            inverse,
                        )
                        .0
                    } else {
                        _mm_setzero_si128()
                    }
                });
                let (a, b) = (
                    _mm_unpacklo_epi8(rows[0], rows[1]),
                    _mm_unpacklo_epi8(rows[2], rows[3]),
                );
                let (c, d) = (
                    _mm_unpackhi_epi8(rows[0], rows[1]),
                    _mm_unpackhi_epi8(rows[2], rows[3]),
                );
                let columns = [
                    _mm_unpacklo_epi16(a, b),
                    _mm_unpackhi_epi16(a, b),
                    _mm_unpacklo_epi16(c, d),
                    _mm_unpackhi_epi16(c, d),
                ];
                let (tile, column) = (start / value_tile, start % value_tile);
                let at = ((tile * padded_keys / 4 + first / 4) * value_tile + column) * 4;
                for (i, four_columns) in columns.iter().enumerate() {
                    // SAFETY: 16 bytes within the tile's row of four keys (the tile is a whole
                    // number of 16 columns).
                    unsafe {
                        _mm_storeu_si128(
                            value_panel.as_mut_ptr().add(at + 16 * i).cast(),
                            *four_columns,
                        )
                    };
                }
            }
        }
    }
}

/// The output rows `out` (whole query tokens from `first_query` on), block by block of up to
/// [`ROWS`] queries of one head.
///
/// # Safety
/// The CPU has AVX-512F, BW and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn attend_queries(
    job: &Job,
    panels: &Int8Panels,
    first_query: usize,
    out: &mut [f32],
    scores: &mut [f32],
    bytes: &mut [u8],
) {
    let Shape {
        heads, value_size, ..
    } = job.shape;
    let queries = out.len() / (heads * value_size);
    for head in 0..heads {
        let mut block = 0;
        while block < queries {
            // SAFETY: `block + R ≤ queries`, the buffers hold ROWS rows.
            block += unsafe {
                match queries - block {
                    ROWS.. => {
                        block_of::<ROWS>(job, panels, head, first_query, block, out, scores, bytes)
                    }
                    8.. => block_of::<8>(job, panels, head, first_query, block, out, scores, bytes),
                    4.. => block_of::<4>(job, panels, head, first_query, block, out, scores, bytes),
                    2.. => block_of::<2>(job, panels, head, first_query, block, out, scores, bytes),
                    _ => block_of::<1>(job, panels, head, first_query, block, out, scores, bytes),
                }
            };
        }
    }
}

/// Queries `block..block + R` of the share, head `head`; returns `R`.
///
/// # Safety
/// As [`attend_queries`], and `block + R` queries are in the share.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
// Register blocks read best indexed by row and vector, as the f32 kernels' do.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn block_of<const R: usize>(
    job: &Job,
    panels: &Int8Panels,
    head: usize,
    first_query: usize,
    block: usize,
    out: &mut [f32],
    scores: &mut [f32],
    bytes: &mut [u8],
) -> usize {
    let Shape {
        keys,
        heads,
        key_size,
        value_size,
        ..
    } = job.shape;
    let Int8Panels {
        padded_keys,
        groups,
        value_tile,
        column_tiles,
        ..
    } = *panels;
    let (weights, queries) = bytes.split_at_mut(ROWS * padded_keys);
    // The block's queries, quantized per row as the dense layers' activations are.
    let mut query_scales = [RowScale::default(); R];
    for (r, scale) in query_scales.chunks_exact_mut(1).enumerate() {
        let token = first_query + block + r;
        let row = &job.q[(token * heads + head) * key_size..][..key_size];
        let quantized = &mut queries[r * groups * 4..][..groups * 4];
        // SAFETY: the CPU has AVX-512F (this function's features).
        unsafe { quantize_rows_avx512(row, key_size, groups * 4, quantized, scale) };
        quantized[key_size..].fill(0);
    }
    // Scores, tile by tile of keys.
    let key_panel = &panels.keys[head * padded_keys * groups * 4..];
    let key_scales = &panels.key_scales[head * padded_keys..][..padded_keys];
    let key_sums = &panels.key_sums[head * padded_keys..][..padded_keys];
    for tile in 0..padded_keys / KEY_TILE {
        let panel = key_panel[tile * groups * KEY_TILE * 4..].as_ptr();
        let mut sums = [[_mm512_setzero_si512(); 2]; R];
        for g in 0..groups {
            // SAFETY: the tile holds `groups` rows of two vectors.
            let w: [__m512i; 2] = std::array::from_fn(|v| unsafe {
                _mm512_loadu_si512(panel.add((g * 2 + v) * 64).cast())
            });
            for r in 0..R {
                // SAFETY: each quantized query holds `groups` groups of four.
                let four = unsafe {
                    queries
                        .as_ptr()
                        .add((r * groups + g) * 4)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let x = _mm512_set1_epi32(four);
                for v in 0..2 {
                    sums[r][v] = _mm512_dpbusd_epi32(sums[r][v], x, w[v]);
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            let RowScale { scale: s_q, zero } = query_scales[r];
            let factor = _mm512_set1_ps(s_q * job.scale);
            for (v, &sum) in row.iter().enumerate() {
                let at = tile * KEY_TILE + v * LANES;
                // SAFETY: within the head's padded keys.
                let (key_sum, key_scale) = unsafe {
                    (
                        _mm512_loadu_ps(key_sums.as_ptr().add(at)),
                        _mm512_loadu_ps(key_scales.as_ptr().add(at)),
                    )
                };
                let exact =
                    _mm512_fnmadd_ps(_mm512_set1_ps(zero), key_sum, _mm512_cvtepi32_ps(sum));
                let score = _mm512_mul_ps(_mm512_mul_ps(exact, factor), key_scale);
                // SAFETY: row r of the scores holds `padded_keys`.
                unsafe { _mm512_storeu_ps(scores.as_mut_ptr().add(r * padded_keys + at), score) };
            }
        }
    }
    // Softmax weights as bytes (the padding 0), and each row's integer sum.
    let mut totals = [0f32; R];
    for (r, total) in totals.iter_mut().enumerate() {
        // SAFETY: row r holds `keys` scores.
        let exp_sum = unsafe { exp_in_place(scores.as_mut_ptr().add(r * padded_keys), keys) };
        let row = &scores[r * padded_keys..][..padded_keys];
        let to = &mut weights[r * padded_keys..][..padded_keys];
        let mut sum = _mm512_setzero_si512();
        for start in (0..padded_keys).step_by(LANES) {
            let mask = first_lanes(keys.saturating_sub(start));
            // SAFETY: the masked lanes are within the row; the rest read as 0.
            let e = unsafe { _mm512_maskz_loadu_ps(mask, row.as_ptr().add(start)) };
            let level = _mm512_cvtps_epi32(_mm512_mul_ps(e, _mm512_set1_ps(255.0)));
            sum = _mm512_add_epi32(sum, level);
            // SAFETY: 16 bytes within the row.
            unsafe {
                _mm512_mask_cvtusepi32_storeu_epi8(to.as_mut_ptr().add(start).cast(), !0, level)
            };
        }
        // Bytes cannot hold NaN: a row whose scores hold one divides by NaN instead.
        *total = match exp_sum.is_nan() {
            true => f32::NAN,
            false => _mm512_reduce_add_epi32(sum) as f32,
        };
    }
    // Context, tile by tile of value columns.
    let value_panel = &panels.values[head * column_tiles * padded_keys * value_tile..];
    let value_scales = &panels.value_scales[head * column_tiles * value_tile..];
    let vectors = value_tile / LANES;
    for tile in 0..column_tiles {
        let panel = value_panel[tile * padded_keys * value_tile..].as_ptr();
        let mut sums = [[_mm512_setzero_si512(); 2]; R];
        for g in 0..padded_keys / 4 {
            for v in 0..vectors {
                // SAFETY: the tile holds `padded_keys / 4` rows of `vectors` vectors.
                let w = unsafe { _mm512_loadu_si512(panel.add((g * vectors + v) * 64).cast()) };
                for r in 0..R {
                    // SAFETY: each row of weights holds `padded_keys` bytes.
                    let four = unsafe {
                        weights
                            .as_ptr()
                            .add(r * padded_keys + 4 * g)
                            .cast::<i32>()
                            .read_unaligned()
                    };
                    sums[r][v] = _mm512_dpbusd_epi32(sums[r][v], _mm512_set1_epi32(four), w);
                }
            }
        }
        let column = tile * value_tile;
        let columns = value_size - column;
        for (r, row) in sums.iter().enumerate() {
            let at = ((block + r) * heads + head) * value_size + column;
            for (v, &sum) in row.iter().take(vectors).enumerate() {
                let mask = first_lanes(columns.saturating_sub(v * LANES));
                // SAFETY: the scales are padded to whole tiles.
                let scale =
                    unsafe { _mm512_loadu_ps(value_scales.as_ptr().add(column + v * LANES)) };
                let y = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(sum),
                    _mm512_mul_ps(scale, _mm512_set1_ps(1.0 / totals[r])),
                );
                let to = out.as_mut_ptr().wrapping_add(at + v * LANES);
                // SAFETY: the masked lanes are columns of this head in query row `block + r`.
                unsafe { _mm512_mask_storeu_ps(to, mask, y) };
            }
        }
    }
    R
}
