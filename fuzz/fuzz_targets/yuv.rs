//! YUV 4:2:0 frames of any size (odd ones included) to grey and RGB: no reads or writes
//! outside the frame and the output.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::yuv::{ChromaLayout, luma_to_gray, yuv420_len, yuv420_to_rgb};

fuzz_target!(|data: &[u8]| {
    let Some(([w, h, layout], frame)) = data.split_first_chunk::<3>() else {
        return;
    };
    let (width, height) = (1 + u32::from(*w % 80), 1 + u32::from(*h % 80));
    let Some(frame) = frame.get(..yuv420_len(width, height)) else {
        return;
    };
    let pixels = width as usize * height as usize;
    let mut grey = vec![0u8; pixels];
    luma_to_gray(frame, width, height, &mut grey);
    let layout = if layout & 1 == 0 {
        ChromaLayout::Planar
    } else {
        ChromaLayout::SemiPlanar
    };
    let mut rgb = vec![0u8; pixels * 3];
    yuv420_to_rgb(frame, width, height, layout, &mut rgb);
});
