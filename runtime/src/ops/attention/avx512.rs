//! The attention core's AVX-512 kernel: blocks of up to [`ROWS`] queries of one head. Their
//! scores against tiles of 32 keys take 24 of the 32 zmm registers; the scores are scaled as
//! they are stored, exponentiated on 16 lanes, and multiplied by tiles of 16 or 32 value
//! columns (16 when the head is that small, so no work is padding).

use super::{Job, Shape, Tiling};
use crate::ops::avx512::{LANES, exp_non_positive, first_lanes, rows_times_panel};
use std::arch::x86_64::*;

/// Query rows computed together.
const ROWS: usize = 12;
/// Vectors per key tile.
const KEY_VECTORS: usize = 2;

pub(super) fn tiling(value_size: usize) -> Tiling {
    Tiling {
        rows: ROWS,
        key_tile: KEY_VECTORS * LANES,
        value_tile: if value_size <= LANES {
            LANES
        } else {
            2 * LANES
        },
    }
}

/// The output rows `out` (whole query tokens from `first_query` on).
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn attend_queries(
    job: &Job,
    first_query: usize,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let Shape {
        heads,
        key_size,
        value_size,
        ..
    } = job.shape;
    let queries = out.len() / (heads * value_size);
    let panels = &job.panels;
    assert!(scratch.len() >= ROWS * panels.padded_keys);
    assert!(job.q.len() >= (first_query + queries) * heads * key_size);
    assert!(panels.tiling.value_tile == tiling(value_size).value_tile);
    for head in 0..heads {
        let mut core = Core {
            job,
            head,
            first_query,
            key_panel: panels.keys_of(head, key_size).as_ptr(),
            value_panel: panels.values_of(head).as_ptr(),
            scores: scratch.as_mut_ptr(),
            out: out.as_mut_ptr(),
        };
        // SAFETY: the checks above, and the CPU has AVX-512F.
        unsafe {
            if panels.tiling.value_tile == LANES {
                core.queries::<1>(queries)
            } else {
                core.queries::<2>(queries)
            }
        }
    }
}

/// One head of the work of [`attend_queries`].
struct Core<'a> {
    job: &'a Job<'a>,
    head: usize,
    first_query: usize,
    key_panel: *const f32,
    value_panel: *const f32,
    /// `ROWS` rows of `padded_keys` scores.
    scores: *mut f32,
    out: *mut f32,
}

impl Core<'_> {
    /// Queries `0..queries` of the share, with value tiles of `V` vectors.
    ///
    /// # Safety
    /// As [`attend_queries`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn queries<const V: usize>(&mut self, queries: usize) {
        let mut block = 0;
        while block < queries {
            // Whole blocks, then the rest in blocks of 8, 4, 2 and 1, so none is wasted.
            // SAFETY: `block + R ≤ queries`.
            block += unsafe {
                match queries - block {
                    ROWS.. => self.block::<ROWS, V>(block),
                    8.. => self.block::<8, V>(block),
                    4.. => self.block::<4, V>(block),
                    2.. => self.block::<2, V>(block),
                    _ => self.block::<1, V>(block),
                }
            };
        }
    }

    /// Queries `block..block + R`; returns `R`.
    ///
    /// # Safety
    /// As [`attend_queries`], and `block + R` queries are in the share.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block<const R: usize, const V: usize>(&mut self, block: usize) -> usize {
        let Shape {
            keys,
            heads,
            key_size,
            value_size,
            ..
        } = self.job.shape;
        let padded_keys = self.job.panels.padded_keys;
        let key_tile = KEY_VECTORS * LANES;
        let mut q = [std::ptr::null(); R];
        for (r, q) in q.iter_mut().enumerate() {
            let token = self.first_query + block + r;
            // SAFETY: the token is in q (asserted by the caller).
            *q = unsafe {
                self.job
                    .q
                    .as_ptr()
                    .add((token * heads + self.head) * key_size)
            };
        }
        let scale = _mm512_set1_ps(self.job.scale);
        for tile in 0..padded_keys / key_tile {
            let mut sums = [[_mm512_setzero_ps(); KEY_VECTORS]; R];
            // SAFETY: the tile holds `key_size` rows of `key_tile` keys; q rows `key_size`.
            unsafe {
                let panel = self.key_panel.add(tile * key_size * key_tile);
                rows_times_panel::<R, KEY_VECTORS>(&q, key_size, panel, &mut sums);
            }
            for (r, row) in sums.iter().enumerate() {
                for (v, &sum) in row.iter().enumerate() {
                    let at = r * padded_keys + tile * key_tile + v * LANES;
                    // SAFETY: the scratch holds ROWS rows of `padded_keys`.
                    unsafe { _mm512_storeu_ps(self.scores.add(at), _mm512_mul_ps(sum, scale)) };
                }
            }
        }
        // Softmax without its division: the context's few values are divided instead.
        let mut reciprocals = [0f32; R];
        let mut weights = [std::ptr::null(); R];
        for r in 0..R {
            // SAFETY: row r of the scratch, `keys` scores.
            let row = unsafe { self.scores.add(r * padded_keys) };
            if self.job.bias.is_some() {
                // SAFETY: as above; no other reference to the row is alive.
                let scores = unsafe { std::slice::from_raw_parts_mut(row, keys) };
                self.job
                    .add_bias(self.head, self.first_query + block + r, scores);
            }
            reciprocals[r] = 1.0 / unsafe { exp_in_place(row, keys) };
            weights[r] = row.cast_const();
        }
        let value_tile = V * LANES;
        for (tile, column) in (0..value_size).step_by(value_tile).enumerate() {
            let mut sums = [[_mm512_setzero_ps(); V]; R];
            // SAFETY: the tile holds `padded_keys` rows of `value_tile` columns.
            unsafe {
                let panel = self.value_panel.add(tile * padded_keys * value_tile);
                rows_times_panel::<R, V>(&weights, keys, panel, &mut sums);
            }
            let columns = value_size - column;
            for (r, row) in sums.iter().enumerate() {
                let recip = _mm512_set1_ps(reciprocals[r]);
                let at = ((block + r) * heads + self.head) * value_size + column;
                for (v, &sum) in row.iter().enumerate() {
                    let mask = first_lanes(columns.saturating_sub(v * LANES));
                    let to = self.out.wrapping_add(at + v * LANES);
                    // SAFETY: the masked lanes are columns of this head in query row
                    // `block + r` of the share; the others are not touched.
                    unsafe { _mm512_mask_storeu_ps(to, mask, _mm512_mul_ps(sum, recip)) };
                }
            }
        }
        R
    }
}

/// `row[i] = exp(row[i] - max)` over the `len` values of `row`; returns their sum.
///
/// # Safety
/// `row` holds `len` values, and the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn exp_in_place(row: *mut f32, len: usize) -> f32 {
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    for start in (0..len).step_by(LANES) {
        let mask = first_lanes(len - start);
        // SAFETY: the masked lanes are within the row.
        let x = unsafe { _mm512_mask_loadu_ps(max, mask, row.add(start)) };
        max = _mm512_max_ps(max, x);
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    let mut sum = _mm512_setzero_ps();
    for start in (0..len).step_by(LANES) {
        let mask = first_lanes(len - start);
        // SAFETY: as above.
        unsafe {
            let x = _mm512_maskz_loadu_ps(mask, row.add(start));
            let e = exp_non_positive(_mm512_sub_ps(x, max));
            _mm512_mask_storeu_ps(row.add(start), mask, e);
            sum = _mm512_mask_add_ps(sum, mask, sum, e);
        }
    }
    _mm512_reduce_add_ps(sum)
}
