//! The shipped default model (`models/fashion-vit`): what its metadata promises, and the
//! committed Fashion-MNIST test images classified by the copy embedded in the binary.
#![cfg(feature = "embedded-model")]

use runtime::evaluation::evaluate_folder;
use runtime::{Classifier, Model, ModelOptions, ResizeMode};
use std::path::{Path, PathBuf};

const CLASSES: [&str; 10] = [
    "ankle_boot",
    "bag",
    "coat",
    "dress",
    "pullover",
    "sandal",
    "shirt",
    "sneaker",
    "t-shirt_top",
    "trouser",
];

fn shipped(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/fashion-vit")
        .join(path)
}

fn embedded_model() -> Model {
    let bytes = runtime::embedded::DEFAULT_MODEL.expect("the default build embeds a model");
    Model::from_bytes(bytes, &ModelOptions::default()).unwrap()
}

#[test]
fn the_binary_embeds_the_shipped_file() {
    let on_disk = std::fs::read(shipped("model.onnx")).unwrap();
    assert!(runtime::embedded::DEFAULT_MODEL == Some(&on_disk[..]));
}

#[test]
fn metadata_describes_a_trained_fashion_mnist_model() {
    let model = embedded_model();
    assert_eq!(model.labels, CLASSES);
    let p = &model.preprocess;
    assert_eq!((p.image_size, p.channels), (28, 1));
    assert_eq!(
        (p.mean.as_slice(), p.std.as_slice()),
        (&[0.5][..], &[0.5][..])
    );
    assert_eq!(p.resize, ResizeMode::Squash);
    assert_eq!(model.metadata["vit.preset"], "fashion");
    // The architecture the model card describes.
    let config: serde_json::Value =
        serde_json::from_str(&model.metadata["vit.model_config"]).unwrap();
    let fields = [
        "patch_size",
        "dim",
        "depth",
        "heads",
        "mlp_dim",
        "num_classes",
    ];
    let values = fields.map(|name| config[name].as_u64().unwrap());
    assert_eq!(values, [4, 64, 6, 4, 128, 10], "{fields:?}");
}

#[test]
fn classifies_the_committed_test_images() {
    let mut classifier = Classifier::new(embedded_model(), 1).unwrap();
    let report = evaluate_folder(&mut classifier, &shipped("test-images"), |_, _| {}).unwrap();
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(report.summary.count, 30, "three images of each class");
    // The model scores 92.1 % on the 10k test images; 30 images sample that with a few points of
    // noise. A wrong model, label order or preprocessing lands far below (chance is 10 %).
    let wrong: Vec<String> = (0..CLASSES.len())
        .flat_map(|truth| {
            let row = &report.summary.confusion.matrix[truth];
            (0..CLASSES.len())
                .filter(move |&predicted| predicted != truth && row[predicted] > 0)
                .map(move |predicted| format!("{} as {}", CLASSES[truth], CLASSES[predicted]))
        })
        .collect();
    assert!(
        report.summary.accuracy >= 0.85,
        "{:.1} % right; misclassified: {wrong:?}",
        report.summary.accuracy * 100.0
    );
}
