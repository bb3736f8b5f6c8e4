//! Any bytes as an image file: decoding fails cleanly or gives an image the preprocessing
//! takes, in grey and in RGB.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::{PatchPipeline, PreprocessConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(image) = runtime::decode_bytes(data) else {
        return;
    };
    for channels in [1, 3] {
        let mut pipeline = PatchPipeline::new(PreprocessConfig::new(8, channels)).unwrap();
        let mut out = vec![0f32; 8 * 8 * channels as usize];
        pipeline
            .run(&image.frame(), &mut out)
            .expect("a decoded image is a valid frame");
        assert!(out.iter().all(|v| v.is_finite()));
    }
});
