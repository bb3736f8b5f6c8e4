//! Frames of any shape, stride, format and crop through the preprocessing: an error for what
//! does not fit, finite values for what does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::{FrameRef, PatchPipeline, PixelFormat, PreprocessConfig, Region, ResizeMode};

fuzz_target!(|data: &[u8]| {
    let Some((head, pixels)) = data.split_first_chunk::<12>() else {
        return;
    };
    let format = [PixelFormat::Gray8, PixelFormat::Rgb8, PixelFormat::Bgr8][head[3] as usize % 3];
    let width = 1 + u32::from(head[0] % 96);
    let height = 1 + u32::from(head[1] % 96);
    let row = width as usize * format.bytes_per_pixel();
    // Mostly valid strides, sometimes short or absurd ones.
    let stride = match head[2] {
        0 => 0,
        1 => usize::MAX - 7,
        extra => row + usize::from(extra % 16),
    };
    let mut config =
        PreprocessConfig::new(1 + u32::from(head[5] % 40), 1 + 2 * u32::from(head[6] & 1));
    config.resize = if head[4] & 1 == 0 {
        ResizeMode::Squash
    } else {
        ResizeMode::CenterCrop
    };
    let Ok(mut pipeline) = PatchPipeline::new(config.clone()) else {
        return;
    };
    let frame = FrameRef {
        data: pixels,
        width,
        height,
        stride,
        format,
    };
    let mut out = vec![0f32; config.tensor_len()];
    if pipeline.run(&frame, &mut out).is_ok() {
        assert!(out.iter().all(|v| v.is_finite()));
    }
    // A crop anywhere, of any size, including NaN and infinite corners.
    let corner = |i: usize| {
        f32::from_le_bytes([
            head[7],
            head[8 + i % 4],
            head[8 + (i + 1) % 4],
            head[8 + (i + 2) % 4],
        ])
    };
    let region = Region {
        left: corner(0),
        top: corner(1),
        width: corner(2),
        height: corner(3),
    };
    if pipeline.run_region(&frame, region, &mut out).is_ok() {
        assert!(out.iter().all(|v| v.is_finite()), "{region:?}");
    }
});
