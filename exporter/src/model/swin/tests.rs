//! Tests of the Swin: its stages, its window geometry and its forward pass.

use super::*;

fn config() -> SwinConfig {
    SwinConfig {
        image_size: 16,
        channels: 1,
        patch_size: 2,
        window_size: 4,
        embed_dim: 8,
        depths: vec![2, 2],
        heads: vec![2, 4],
        mlp_ratio: 2,
        dropout: 0.0,
        num_classes: 3,
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn stages_halve_the_grid_double_the_width_and_cap_the_window() {
    let shapes = config().stages();
    assert_eq!(
        shapes,
        [
            StageShape {
                side: 8,
                dim: 8,
                heads: 2,
                window: 4
            },
            StageShape {
                side: 4,
                dim: 16,
                heads: 4,
                window: 4
            },
        ]
    );
    let model = config().init(&crate::backend::device()).unwrap();
    // The first stage's second block shifts; the last stage is one window: no shift.
    let shifts: Vec<usize> = model
        .stages
        .iter()
        .flat_map(|s| s.blocks.iter().map(|b| b.shift))
        .collect();
    assert_eq!(shifts, [0, 2, 0, 0]);
}

#[test]
fn bad_configs_are_rejected_with_the_reason() {
    let cases = [
        (
            SwinConfig {
                window_size: 3,
                ..config()
            },
            "do not tile",
        ),
        (
            SwinConfig {
                image_size: 12,
                patch_size: 4,
                ..config()
            },
            "must be even",
        ),
        (
            SwinConfig {
                heads: vec![3, 4],
                ..config()
            },
            "not divisible by 3 heads",
        ),
        (
            SwinConfig {
                depths: vec![2],
                ..config()
            },
            "one of each per stage",
        ),
    ];
    for (config, reason) in cases {
        let error = config.validate().unwrap_err().0;
        assert!(error.contains(reason), "{error}");
    }
}

#[test]
fn partition_and_merge_are_inverse_and_roll_back_undoes_roll() {
    let device = crate::backend::device();
    let grid = Tensor::<4>::random([2, 8, 8, 3], Distribution::Normal(0.0, 1.0), &device);
    let windows = partition(grid.clone(), 4);
    assert_eq!(windows.dims(), [8, 16, 3]);
    // Window 1 of image 0 holds rows 0..4, columns 4..8.
    let first = values(windows.clone().narrow(0, 1, 1).narrow(1, 0, 1));
    let expected = values(grid.clone().narrow(0, 0, 1).narrow(1, 0, 1).narrow(2, 4, 1));
    assert_eq!(first, expected);
    assert_eq!(values(merge_windows(windows, 2, 8)), values(grid.clone()));
    let rolled = roll(grid.clone(), 2, false);
    // Row 0 of the rolled grid is row 2 of the original, as torch.roll(x, -2) gives.
    assert_eq!(
        values(rolled.clone().narrow(1, 0, 1).narrow(2, 0, 1)),
        values(grid.clone().narrow(1, 2, 1).narrow(2, 2, 1))
    );
    assert_eq!(values(roll(rolled, 2, true)), values(grid));
}

#[test]
fn the_shift_mask_separates_the_regions_the_roll_brought_together() {
    // 4×4 grid, windows of 2, shift 1: the last window holds one token of each of the
    // four regions (rows 3/0 and columns 3/0 rolled together); the first window is whole.
    let mask = shift_mask_values(4, 2, 1);
    let window = |w: usize| &mask[w * 16..(w + 1) * 16];
    assert!(window(0).iter().all(|&v| v == 0.0));
    let last = window(3);
    for a in 0..4 {
        for b in 0..4 {
            let expected = if a == b { 0.0 } else { MASKED };
            assert_eq!(last[a * 4 + b], expected, "{a} {b}");
        }
    }
}

#[test]
fn relative_positions_index_the_table_symmetrically() {
    let index = relative_position_index(2);
    // Same position → the centre of the 3×3 table; a token right of another → one column
    // left of the centre, and the reverse pair one column right.
    assert_eq!(index[0], 4);
    assert_eq!((index[1], index[4]), (3, 5));
    assert!(index.iter().all(|&i| (0..9).contains(&i)));
}

#[test]
fn the_model_gives_batch_by_classes_logits_and_window_attention_maps() {
    let device = crate::backend::device();
    let model = config().init(&device).unwrap();
    let images = Tensor::<4>::random([2, 1, 16, 16], Distribution::Normal(0.0, 1.0), &device);
    let logits = ImageClassifier::forward(&model, images.clone());
    assert_eq!(logits.dims(), [2, 3]);
    // The same pass block by block, keeping each block's weights averaged over heads.
    let (mut x, mut maps) = (model.embed(images), Vec::new());
    for stage in &model.stages {
        if let Some(merge) = &stage.merge {
            x = merge.forward(x);
        }
        for block in &stage.blocks {
            let (next, weights) = block.forward_with_attention(x);
            maps.push(weights.mean_dim(1).squeeze_dim::<3>(1));
            x = next;
        }
    }
    model
        .classify(x)
        .to_data()
        .assert_approx_eq::<f32>(&logits.to_data(), Default::default());
    // Stage 1: 4 windows of 16 tokens per image; stage 2: 1 window of 16.
    let shapes: Vec<[usize; 3]> = maps.iter().map(|m| m.dims()).collect();
    assert_eq!(shapes, [[8, 16, 16], [8, 16, 16], [2, 16, 16], [2, 16, 16]]);
    // Masked pairs get no weight: in the shifted block's last window of image 0, a token
    // of region (0, 0) never attends to one of another region.
    let shifted = values(maps[1].clone().narrow(0, 3, 1));
    assert!(shifted.iter().all(|v| v.is_finite()));
    let mask = shift_mask_values(8, 4, 2);
    let last = &mask[3 * 256..4 * 256];
    for (weight, m) in shifted.iter().zip(last) {
        if *m != 0.0 {
            assert!(*weight < 1e-6, "{weight}");
        }
    }
}
