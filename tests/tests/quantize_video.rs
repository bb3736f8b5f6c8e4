//! `runtime quantize` on a `video`-preset model (0.8 M parameters), trained for one epoch and
//! exported: the int8 file is at least 3.5× smaller than the f32 one and still classifies.
//!
//! On the 0.2 M-parameter default model the file shrinks 3.1× rather than 3.5×: its biases, norms,
//! per-channel scales and graph (~70 KB that int8 cannot shrink) are a quarter of the int8
//! file. docs/precision.md's precision table shows both.

use exporter::Preset;
use exporter::export::{self, ExportOptions};
use exporter::training::{self, NewRun, Recipe};
use runtime::{Classifier, Model, ModelOptions, Precision, decode_file};

#[test]
fn a_video_model_quantizes_to_a_file_at_least_3_5_times_smaller() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    exporter::synthetic::write_dataset(&data, 2, 4, 48, 48, 11).unwrap();
    let run = dir.path().join("run");
    let new = NewRun::new(
        data.clone(),
        Preset::Video,
        Recipe {
            epochs: 1,
            batch_size: 4,
            ..Recipe::default()
        },
    );
    training::train(new, &run, &mut ()).unwrap();
    let onnx = dir.path().join("model.onnx");
    export::export(&run, &onnx, &ExportOptions::default()).unwrap();
    let float_bytes = std::fs::read(&onnx).unwrap();

    let images = runtime::dataset::images_under(&data, 100).unwrap();
    let (int8_bytes, report) =
        runtime::quantize::quantize(&float_bytes, &ModelOptions::default()).unwrap();
    // 4 blocks × (QKV, output, MLP in, MLP out) + the head.
    assert_eq!(report.int8_products, 17);
    let ratio = float_bytes.len() as f64 / int8_bytes.len() as f64;
    assert!(ratio >= 3.5, "the int8 file is only {ratio:.2}× smaller");

    let model = Model::from_bytes(&int8_bytes, &ModelOptions::default()).unwrap();
    assert_eq!(model.precision, Precision::Int8);
    if runtime::ops::dense_int8::beats_tract(runtime::Isa::best()) {
        // QKV, which tract splits in three, output, MLP in and out, per block; and the head.
        assert_eq!(model.operators().get("DenseLinearInt8"), Some(&25));
    }
    let mut classifier = Classifier::new(model, 1).unwrap();
    let image = decode_file(&images[0]).unwrap();
    let top = classifier.classify_frame(&image.frame()).unwrap();
    assert!(top[0].probability.is_finite());
}
