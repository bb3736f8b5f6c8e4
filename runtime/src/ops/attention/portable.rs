//! The attention core's portable kernel: blocks of [`ROWS`] queries against tiles of 16 keys
//! (scores) and 16 value columns (context), which the compiler keeps in vector registers
//! (twelve of the sixteen AVX2 ones; the AVX2 kernel is this code compiled for AVX2 and FMA).

use super::{Job, Shape, Tiling};
use crate::ops::rows::{PANEL_WIDTH, rows_times_panel};
use crate::ops::softmax::{exp_in_place, row_max};

/// Query rows computed together: each key (and value) vector loaded feeds this many of them.
const ROWS: usize = 6;
/// Keys per score tile and value columns per output tile.
const TILE: usize = PANEL_WIDTH;

pub(super) const TILING: Tiling = Tiling {
    rows: ROWS,
    key_tile: TILE,
    value_tile: TILE,
};

pub(super) fn attend_queries(job: &Job, first_query: usize, out: &mut [f32], scratch: &mut [f32]) {
    // aarch64 always has a fused multiply-add; elsewhere `mul_add` would be a libm call.
    attend_queries_with::<{ cfg!(target_arch = "aarch64") }>(job, first_query, out, scratch);
}

/// The output rows `out` (whole query tokens from `first_query` on), block by block of
/// [`ROWS`] queries of one head. A last, partial block runs as a whole one on zero queries
/// whose results are dropped.
#[inline(always)]
pub(super) fn attend_queries_with<const FMA: bool>(
    job: &Job,
    first_query: usize,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let Job {
        shape,
        scale,
        q,
        ref panels,
        ..
    } = *job;
    let Shape {
        keys,
        heads,
        key_size,
        value_size,
        ..
    } = shape;
    let padded_keys = panels.padded_keys;
    let queries = out.len() / (heads * value_size);
    let scores = &mut scratch[..ROWS * padded_keys];
    for head in 0..heads {
        let key_panel = panels.keys_of(head, key_size);
        let value_panel = panels.values_of(head);
        for block in (0..queries).step_by(ROWS) {
            let rows = ROWS.min(queries - block);
            // Read in place (a partial block repeats its last query; those results are
            // dropped): copying q into a block cost a sixth of the core at head size 64.
            let q_rows: [&[f32]; ROWS] = std::array::from_fn(|r| {
                let token = first_query + block + r.min(rows - 1);
                &q[(token * heads + head) * key_size..][..key_size]
            });
            for (t, tile) in key_panel.chunks_exact(key_size * TILE).enumerate() {
                let tile_scores = rows_times_panel::<FMA, ROWS>(q_rows, tile, [[0.0; TILE]; ROWS]);
                for (r, tile_scores) in tile_scores.iter().enumerate() {
                    let row = &mut scores[r * padded_keys + t * TILE..][..TILE];
                    for (score, &dot) in row.iter_mut().zip(tile_scores) {
                        *score = dot * scale;
                    }
                }
            }
            for r in 0..ROWS {
                let query = first_query + block + r.min(rows - 1);
                job.add_bias(head, query, &mut scores[r * padded_keys..]);
            }
            // Softmax without its division: the context's few values are divided instead.
            let mut sums = [0f32; ROWS];
            for (sum, row) in sums.iter_mut().zip(scores.chunks_exact_mut(padded_keys)) {
                let row = &mut row[..keys];
                *sum = exp_in_place::<FMA>(row, row_max(row));
            }
            let weights: [&[f32]; ROWS] =
                std::array::from_fn(|r| &scores[r * padded_keys..][..keys]);
            for (column_tile, panel) in value_panel.chunks_exact(padded_keys * TILE).enumerate() {
                let panel = &panel[..keys * TILE];
                let context = rows_times_panel::<FMA, ROWS>(weights, panel, [[0.0; TILE]; ROWS]);
                let c = column_tile * TILE;
                let width = TILE.min(value_size - c);
                for r in 0..rows {
                    let at = (block + r) * heads * value_size + head * value_size + c;
                    let recip = 1.0 / sums[r];
                    for (o, &x) in out[at..][..width].iter_mut().zip(&context[r]) {
                        *o = x * recip;
                    }
                }
            }
        }
    }
}
