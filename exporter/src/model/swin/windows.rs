//! The Swin's window geometry: the cyclic shift, cutting the grid into windows and back, the
//! shifted windows' mask, and the relative positions the bias table is indexed by.

use super::MASKED;
use burn::prelude::*;

/// The grid `[batch, side, side, C]` rolled by `shift` along both sides: towards the start
/// (`back` false: row `i` takes row `i + shift`), or back.
pub fn roll(grid: Tensor<4>, shift: usize, back: bool) -> Tensor<4> {
    if shift == 0 {
        return grid;
    }
    let side = grid.dims()[1];
    let split = if back { side - shift } else { shift };
    let roll_axis = |t: Tensor<4>, axis: usize| {
        Tensor::cat(
            vec![
                t.clone().narrow(axis, split, side - split),
                t.narrow(axis, 0, split),
            ],
            axis,
        )
    };
    roll_axis(roll_axis(grid, 1), 2)
}

/// `[batch, side, side, C]` → `[batch · windows, window², C]`, windows in row-major order.
pub fn partition(grid: Tensor<4>, window: usize) -> Tensor<3> {
    let [batch, side, _, dim] = grid.dims();
    let n = side / window;
    grid.reshape([batch, n, window, n, window, dim])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([batch * n * n, window * window, dim])
}

/// The inverse of [`partition`].
pub fn merge_windows(windows: Tensor<3>, batch: usize, side: usize) -> Tensor<4> {
    let [_, tokens, dim] = windows.dims();
    let window = (tokens as f64).sqrt() as usize;
    let n = side / window;
    windows
        .reshape([batch, n, n, window, window, dim])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([batch, side, side, dim])
}

/// The paper's mask for the shifted windows: `[windows, N, N]`, 0 where two tokens come from
/// the same region of the unrolled grid and [`MASKED`] where the roll brought them together.
pub fn shift_mask_values(side: usize, window: usize, shift: usize) -> Vec<f32> {
    let region = |i: usize| match i {
        i if i < side - window => 0,
        i if i < side - shift => 1,
        _ => 2,
    };
    let n = side / window;
    let tokens = window * window;
    let mut values = Vec::with_capacity(n * n * tokens * tokens);
    for wy in 0..n {
        for wx in 0..n {
            let labels: Vec<usize> = (0..tokens)
                .map(|t| {
                    let (y, x) = (wy * window + t / window, wx * window + t % window);
                    3 * region(y) + region(x)
                })
                .collect();
            for &a in &labels {
                values.extend(labels.iter().map(|&b| if a == b { 0.0 } else { MASKED }));
            }
        }
    }
    values
}

pub(super) fn shift_mask(side: usize, window: usize, shift: usize, device: &Device) -> Tensor<3> {
    let windows = (side / window).pow(2);
    let tokens = window * window;
    Tensor::from_data(
        TensorData::new(
            shift_mask_values(side, window, shift),
            [windows, tokens, tokens],
        ),
        device,
    )
}

/// For each pair of positions in a window, the row of the relative position bias table:
/// `(dy + w − 1)·(2w − 1) + (dx + w − 1)`, `[N · N]` row-major.
pub fn relative_position_index(window: usize) -> Vec<i64> {
    let tokens = window * window;
    let span = 2 * window - 1;
    let mut index = Vec::with_capacity(tokens * tokens);
    for a in 0..tokens {
        for b in 0..tokens {
            let dy = (a / window + window - 1) - b / window;
            let dx = (a % window + window - 1) - b % window;
            index.push((dy * span + dx) as i64);
        }
    }
    index
}
