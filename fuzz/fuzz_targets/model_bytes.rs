//! Any bytes as an ONNX model (seeded with the shipped models and small exports): loading is
//! an error or a model that classifies a frame; never a panic, an abort or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::{Classifier, Model, ModelOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(model) = Model::from_bytes(data, &ModelOptions::default()) else {
        return;
    };
    // Models that run are kept to sizes a frame can exercise quickly.
    if model.preprocess.tensor_len() > 1 << 20 {
        return;
    }
    let Ok(mut classifier) = Classifier::new(model, 3) else {
        return;
    };
    let input = vec![0.5f32; classifier.model().preprocess.tensor_len()];
    classifier.set_input(&input).unwrap();
    if classifier.infer().is_ok() {
        assert!(classifier.top().len() <= 3);
    }
    // Whatever the first run did, the classifier takes the next frame.
    classifier.set_input(&input).unwrap();
    let _ = classifier.infer();
});
