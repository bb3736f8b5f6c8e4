//! What the runtime's own operators share: the portable block product, rewriting an f32
//! tensor row by row in place ([`super::softmax`], [`super::layer_norm`]), and spreading
//! blocks of output rows over the inference threads ([`super::attention`], [`super::dense`]).

use crate::ops::softmax::multiply_add;
use tract_onnx::tract_core::internal::*;

/// Accumulator lanes: one AVX2 vector of f32 (two NEON vectors), which the compiler keeps in
/// registers when a loop sums into `[f32; LANES]`.
pub(crate) const LANES: usize = 8;
/// Columns of a weight panel (dense layers) or a key/value tile (attention): two AVX2 vectors
/// (four NEON ones), so six rows of them take twelve of the sixteen AVX2 registers.
pub(crate) const PANEL_WIDTH: usize = 2 * LANES;

/// `start[r][l] + Σ_j rows[r][j] · panel[j][l]` over the panel's rows: the block product of
/// attention's scores and context and of dense layers. Each panel row loaded feeds all `R`
/// rows, and the sums stay in registers when it is inlined into a caller compiled for FMA.
#[inline(always)]
pub(crate) fn rows_times_panel<const FMA: bool, const R: usize>(
    rows: [&[f32]; R],
    panel: &[f32],
    start: [[f32; PANEL_WIDTH]; R],
) -> [[f32; PANEL_WIDTH]; R] {
    let (panel, _) = panel.as_chunks::<PANEL_WIDTH>();
    let len = panel.len();
    let rows: [&[f32]; R] = std::array::from_fn(|r| &rows[r][..len]);
    let mut acc = start;
    for (j, p) in panel.iter().enumerate() {
        for (acc, row) in acc.iter_mut().zip(&rows) {
            let a = row[j];
            for (sum, &p) in acc.iter_mut().zip(p) {
                *sum = multiply_add::<FMA>(a, p, *sum);
            }
        }
    }
    acc
}

/// `input` (f32, or an error) with `update` applied to chunks of whole `row_len` rows of its
/// row-major storage, in place when nothing else holds the tensor. `cost` is the update's
/// arithmetic per value, in multiply-adds: the rows go to several threads only when the
/// whole is worth it (a LayerNorm of `deit-tiny`'s 197 × 192 values took 30 µs on one thread
/// and 52 µs split over two).
pub(crate) fn update_rows(
    input: TValue,
    row_len: usize,
    cost: usize,
    update: impl Fn(&mut [f32]) + Sync + Send,
) -> TractResult<TValue> {
    let mut output = input.into_tensor();
    {
        let mut plain = output.try_as_plain_ram_mut()?;
        let data = plain.as_slice_mut::<f32>()?;
        let work = data.len() * cost;
        for_each_share(data, row_len, 1, work, |_, rows| update(rows));
    }
    Ok(output.into_tvalue())
}

/// Multiply-adds from which [`for_each_share`] spreads the work over threads: below about
/// 50 µs of arithmetic, waking a second thread costs more than it saves.
#[cfg(feature = "threads")]
pub(crate) const PARALLEL_MACS: usize = 1 << 21;
/// Shares per thread. One: each thread then reuses every panel of W (or tile of k and v) over
/// the most rows, and the helpers spin between operators, so none starts late. At two threads
/// on the AVX-512 host, one share per thread took `deit-tiny` from 13.2 to 12.0 ms and `video`
/// from 4.0 to 3.6 ms against four (docs/performance.md).
#[cfg(feature = "threads")]
const SHARES_PER_THREAD: usize = 1;

/// `f(first_row, rows)` over shares of `out`'s `row_len`-long rows, on as many threads as
/// tract's executor has (the calling one and the `team`'s helpers) when `macs` reaches
/// [`PARALLEL_MACS`]. Shares are as even as [`share_len`] makes them. A build without the
/// `threads` feature computes every row on the calling thread.
pub(crate) fn for_each_share(
    out: &mut [f32],
    row_len: usize,
    block: usize,
    macs: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    #[cfg(not(feature = "threads"))]
    {
        let _ = (row_len, block, macs);
        f(0, out)
    }
    #[cfg(feature = "threads")]
    {
        use tract_linalg::multithread::{Executor, current_tract_executor};
        let rows = out.len() / row_len.max(1);
        let executor = current_tract_executor();
        let threads = match executor {
            _ if macs < PARALLEL_MACS => 1,
            Executor::MultiThread(pool) => pool.current_num_threads(),
            Executor::RayonGlobal => rayon::current_num_threads(),
            Executor::SingleThread => 1,
        };
        let share = share_len(rows, block, SHARES_PER_THREAD * threads);
        if threads < 2 || rows <= share {
            return f(0, out);
        }
        // The calling thread takes shares too, beside `threads - 1` helpers (see `team`).
        let shares = std::sync::Mutex::new(out.chunks_mut(share * row_len).enumerate());
        let work = || {
            loop {
                let next = shares.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some((index, rows)) = next else { break };
                f(index * share, rows);
            }
        };
        super::team::run_on(threads.min(rows.div_ceil(share)), &work);
    }
}

/// Rows per share for `rows` rows in `shares` shares: whole `block`s, so that an operator
/// computing `block` rows at a time runs a partial block in one share at most, unless that
/// leaves a share more than a sixteenth above an even split (a convolution's 7 × 7 pixels in
/// blocks of 12 would go 36 + 13). The kernels compute a partial block as smaller blocks.
#[cfg(feature = "threads")]
fn share_len(rows: usize, block: usize, shares: usize) -> usize {
    let even = rows.div_ceil(shares);
    let whole_blocks = rows.div_ceil(block).div_ceil(shares) * block;
    if whole_blocks * 16 <= even * 17 {
        whole_blocks
    } else {
        even
    }
}

/// Runs `f` with two inference threads where the build has them, so the operators' tests also
/// cover the threaded path.
#[cfg(test)]
pub(crate) fn on_two_threads<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(feature = "threads")]
    {
        use tract_linalg::multithread::{Executor, multithread_tract_scope};
        multithread_tract_scope(Executor::multithread(2), f)
    }
    #[cfg(not(feature = "threads"))]
    f()
}

// Only a threaded build splits the rows.
#[cfg(all(test, feature = "threads"))]
mod tests {
    use super::*;

    /// The shares `for_each_share` hands out: (first row, rows), sorted.
    fn shares(rows: usize, block: usize, macs: usize) -> Vec<(usize, usize)> {
        use std::sync::Mutex;
        let row_len = 3;
        let mut out = vec![0f32; rows * row_len];
        let seen = Mutex::new(Vec::new());
        on_two_threads(|| {
            for_each_share(&mut out, row_len, block, macs, |first, share| {
                share.fill(1.0);
                seen.lock().unwrap().push((first, share.len() / row_len));
            })
        });
        assert!(out.iter().all(|&x| x == 1.0), "every row is handed out");
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        seen
    }

    #[test]
    fn shares_are_even_where_whole_blocks_would_not_be() {
        // 49 pixels in blocks of 12: whole blocks would give one thread 36 rows.
        assert_eq!(shares(49, 12, PARALLEL_MACS), [(0, 25), (25, 24)]);
        // 196 in blocks of 12: whole blocks (108 + 88) are 10 % above even.
        assert_eq!(shares(196, 12, PARALLEL_MACS), [(0, 98), (98, 98)]);
        // 768 in blocks of 12: 32 whole blocks each.
        assert_eq!(shares(768, 12, PARALLEL_MACS), [(0, 384), (384, 384)]);
    }

    #[test]
    fn shares_are_whole_blocks_that_cover_every_row_once() {
        let split = shares(197, 6, PARALLEL_MACS);
        assert!(
            (2..=2 * SHARES_PER_THREAD).contains(&split.len()),
            "{split:?}"
        );
        let mut next = 0;
        for &(first, rows) in &split {
            assert_eq!(first, next, "{split:?}");
            assert!(
                first % 6 == 0 && (rows % 6 == 0 || first + rows == 197),
                "{split:?}"
            );
            next = first + rows;
        }
        assert_eq!(next, 197);
        // Too little work for a second thread: one share.
        assert_eq!(shares(197, 6, PARALLEL_MACS - 1), [(0, 197)]);
    }
}
