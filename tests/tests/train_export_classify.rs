//! The whole product on a tiny model: train (burn) → export (ONNX) → classify (tract runtime),
//! giving burn's answer; and a third-party-style file without metadata, driven by options.

use exporter::Preset;
use exporter::export::{self, ExportOptions};
use exporter::training::{self, NewRun, Recipe};
use runtime::{Classifier, Model, ModelOptions};
use std::path::Path;

fn trained_run(dir: &Path) -> std::path::PathBuf {
    trained_run_of(dir, Preset::Tiny)
}

fn trained_run_of(dir: &Path, preset: Preset) -> std::path::PathBuf {
    let data = dir.join("data");
    // The CNN pools over positions, so its classes differ by texture, not place.
    let write = match preset {
        Preset::CnnTiny => exporter::synthetic::write_stripes,
        _ => exporter::synthetic::write_dataset,
    };
    write(&data, 3, 12, 20, 24, 5).unwrap();
    let run = dir.join("run");
    training::train(NewRun::new(data, preset, recipe()), &run, &mut ()).unwrap();
    run
}

/// Two quick epochs.
fn recipe() -> Recipe {
    Recipe {
        epochs: 2,
        batch_size: 4,
        learning_rate: 5e-3,
        ..Recipe::default()
    }
}

/// burn's logits for one image file, through the exporter's own data path.
fn burn_logits(run: &Path, image: &Path) -> Vec<f32> {
    use burn::prelude::*;
    let device = exporter::backend::device();
    let (config, model) = training::load_run(run, &device).unwrap();
    let decoded = runtime::decode_file(image).unwrap();
    let mut pipeline = runtime::PatchPipeline::new(config.preprocess.clone()).unwrap();
    let mut pixels = vec![0.0; config.preprocess.tensor_len()];
    pipeline.run(&decoded.frame(), &mut pixels).unwrap();
    let s = config.preprocess.image_size as usize;
    let c = config.preprocess.channels as usize;
    let input = Tensor::<4>::from_data(TensorData::new(pixels, [1, c, s, s]), &device);
    model
        .forward(input)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn runtime_logits(classifier: &mut Classifier, image: &Path) -> Vec<f32> {
    let decoded = runtime::decode_file(image).unwrap();
    classifier.classify_frame(&decoded.frame()).unwrap();
    classifier.logits().to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn images(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut all: Vec<_> = std::fs::read_dir(dir.join("data/class_1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    all.sort();
    all.truncate(4);
    all
}

#[test]
fn runtime_gives_burns_answer_on_an_exported_model() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let onnx = dir.path().join("model.onnx");
    export::export(&run, &onnx, &ExportOptions::default()).unwrap();
    let model = Model::load(&onnx, &ModelOptions::default()).unwrap();
    assert_eq!(model.labels, vec!["class_0", "class_1", "class_2"]);
    // The comparison below covers the runtime's fused attention and, where it is used, its
    // dense layers (q, k, v, output projection and two MLP products per block, and the head),
    // not tract's own operators.
    let operators = model.operators();
    assert_eq!(
        operators.get("TokenMajorAttention"),
        Some(&2),
        "{operators:?}"
    );
    let dense = runtime::ops::dense::beats_tract(model.isa).then_some(6 * 2 + 1);
    assert_eq!(
        operators.get("DenseLinear").copied(),
        dense,
        "{operators:?}"
    );
    let mut classifier = Classifier::new(model, 3).unwrap();
    for image in images(dir.path()) {
        let ours = runtime_logits(&mut classifier, &image);
        let reference = burn_logits(&run, &image);
        let diff = max_diff(&ours, &reference);
        assert!(
            diff <= 1e-4,
            "{}: log-probabilities differ by {diff}",
            image.display()
        );
    }
}

#[test]
fn runtime_gives_burns_answer_on_an_exported_cnn_and_its_int8_copy() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run_of(dir.path(), Preset::CnnTiny);
    let onnx = dir.path().join("cnn.onnx");
    export::export(&run, &onnx, &ExportOptions::default()).unwrap();
    let bytes = std::fs::read(&onnx).unwrap();
    let attention = ModelOptions {
        attention: true,
        ..ModelOptions::default()
    };
    let error = Model::from_bytes(&bytes, &attention)
        .unwrap_err()
        .to_string();
    assert!(error.contains("a resnet model has no attention"), "{error}");
    let mut classifier = Classifier::new(
        Model::from_bytes(&bytes, &ModelOptions::default()).unwrap(),
        3,
    )
    .unwrap();
    let (int8, report) = runtime::quantize::quantize(&bytes, &ModelOptions::default()).unwrap();
    assert_eq!(report.int8_products, 1, "the Gemm head");
    let int8_model = Model::from_bytes(&int8, &ModelOptions::default()).unwrap();
    assert_eq!(int8_model.precision, runtime::Precision::Int8);
    let mut int8_classifier = Classifier::new(int8_model, 3).unwrap();
    for image in images(dir.path()) {
        let ours = runtime_logits(&mut classifier, &image);
        let reference = burn_logits(&run, &image);
        let diff = max_diff(&ours, &reference);
        assert!(diff <= 1e-4, "{}: logits differ by {diff}", image.display());
        let rounded = runtime_logits(&mut int8_classifier, &image);
        let diff = max_diff(&ours, &rounded);
        let scale = ours.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        assert!(
            diff <= 0.05 * scale,
            "{}: int8 differs by {diff}",
            image.display()
        );
    }
}

#[test]
fn a_distilled_vit_averages_its_heads_in_onnx_and_explains_both_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = trained_run_of(&dir.path().join("teacher"), Preset::CnnTiny);
    let data = dir.path().join("teacher/data");
    let run = dir.path().join("student");
    let new = NewRun {
        distill_from: Some(teacher),
        ..NewRun::new(data.clone(), Preset::Tiny, recipe())
    };
    training::train(new, &run, &mut ()).unwrap();
    let onnx = dir.path().join("deit.onnx");
    let with_attention = ExportOptions {
        with_attention: true,
        ..ExportOptions::default()
    };
    let report = export::export(&run, &onnx, &with_attention).unwrap();
    assert_eq!(report.attention_outputs, 2);
    let info = export::inspect(&onnx).unwrap();
    assert_eq!(info.metadata["vit.architecture"], "deit");
    let distillation: serde_json::Value =
        serde_json::from_str(&info.metadata["vit.distillation"]).unwrap();
    assert_eq!(distillation["method"], "hard");
    assert_eq!(distillation["teacher_architecture"], "resnet");
    // One head product for both heads, one output of logits.
    assert_eq!(info.op_histogram.get("Gather"), Some(&1));
    assert_eq!(info.outputs[0].0, "logits");

    let model = Model::load(&onnx, &ModelOptions::default()).unwrap();
    let mut classifier = Classifier::new(model, 3).unwrap();
    let image = data.join("class_1/000.png");
    let diff = max_diff(
        &runtime_logits(&mut classifier, &image),
        &burn_logits(&run, &image),
    );
    assert!(diff <= 1e-4, "logits differ by {diff}");

    let options = ModelOptions {
        attention: true,
        ..ModelOptions::default()
    };
    let mut explainer =
        runtime::explain::Explainer::new(Model::load(&onnx, &options).unwrap()).unwrap();
    let frame = runtime::decode_file(&image).unwrap();
    let explanation = explainer.explain(&frame.frame()).unwrap();
    assert_eq!((explanation.tokens, explanation.prefix), (18, 2));
    use runtime::explain::{Method, Token};
    let cls = explanation.map_for(Method::LastLayer, Token::Cls).unwrap();
    let distilled = explanation
        .map_for(Method::LastLayer, Token::Distillation)
        .unwrap();
    assert_eq!((cls.side, distilled.side), (4, 4));
    assert_ne!(cls.values, distilled.values, "two tokens, two rows");

    // A plain ViT has no distillation token to show.
    let plain_run = trained_run(&dir.path().join("plain"));
    let plain = dir.path().join("plain.onnx");
    export::export(&plain_run, &plain, &with_attention).unwrap();
    let mut explainer =
        runtime::explain::Explainer::new(Model::load(&plain, &options).unwrap()).unwrap();
    let explanation = explainer.explain(&frame.frame()).unwrap();
    assert_eq!(explanation.prefix, 1);
    let error = explanation
        .map_for(Method::Rollout, Token::Distillation)
        .unwrap_err();
    assert!(
        error.to_string().contains("no distillation token"),
        "{error}"
    );
}

#[test]
fn runtime_gives_burns_answer_on_an_exported_swin_and_its_int8_copy() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run_of(dir.path(), Preset::SwinTiny);
    let onnx = dir.path().join("swin.onnx");
    export::export(&run, &onnx, &ExportOptions::default()).unwrap();
    let bytes = std::fs::read(&onnx).unwrap();
    let model = Model::from_bytes(&bytes, &ModelOptions::default()).unwrap();
    // Every block's windowed attention, shifted or not, runs on the runtime's fused core: the
    // comparison with burn below covers its windows and its bias.
    let operators = model.operators();
    assert_eq!(
        operators.get("TokenMajorAttention"),
        Some(&4),
        "{operators:?}"
    );
    let mut classifier = Classifier::new(model, 3).unwrap();
    let (int8, report) = runtime::quantize::quantize(&bytes, &ModelOptions::default()).unwrap();
    // Per block: QKV, output and two MLP products; one merging; the head.
    assert_eq!(report.int8_products, 4 * 4 + 1 + 1);
    let mut int8_classifier = Classifier::new(
        Model::from_bytes(&int8, &ModelOptions::default()).unwrap(),
        3,
    )
    .unwrap();
    for image in images(dir.path()) {
        let ours = runtime_logits(&mut classifier, &image);
        let diff = max_diff(&ours, &burn_logits(&run, &image));
        assert!(diff <= 1e-4, "{}: logits differ by {diff}", image.display());
        let rounded = runtime_logits(&mut int8_classifier, &image);
        let scale = ours.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = max_diff(&ours, &rounded);
        assert!(
            diff <= 0.05 * scale,
            "{}: int8 differs by {diff}",
            image.display()
        );
    }
}

#[test]
fn a_model_without_metadata_runs_with_options() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let with_metadata = dir.path().join("model.onnx");
    export::export(&run, &with_metadata, &ExportOptions::default()).unwrap();

    // Strip the metadata, as a torch.onnx export would come.
    let mut proto = exporter::onnx_graph::decode(&std::fs::read(&with_metadata).unwrap()).unwrap();
    proto.metadata_props.clear();
    let bare = dir.path().join("bare.onnx");
    std::fs::write(&bare, exporter::onnx_graph::encode(&proto)).unwrap();

    // The input shape is symbolic in batch only: size and channels are read from the model.
    let model = Model::load(&bare, &ModelOptions::default()).unwrap();
    assert_eq!(
        (model.preprocess.image_size, model.preprocess.channels),
        (16, 1)
    );
    assert_eq!(
        model.labels,
        vec!["class_0", "class_1", "class_2"],
        "placeholder labels"
    );

    let options = ModelOptions {
        mean: Some(vec![0.5]),
        std: Some(vec![0.5]),
        labels: Some(vec!["a".into(), "b".into(), "c".into()]),
        ..ModelOptions::default()
    };
    let bare_model = Model::load(&bare, &options).unwrap();
    assert_eq!(bare_model.labels, vec!["a", "b", "c"]);
    let mut bare_classifier = Classifier::new(bare_model, 3).unwrap();
    let mut full_classifier = Classifier::new(
        Model::load(&with_metadata, &ModelOptions::default()).unwrap(),
        3,
    )
    .unwrap();
    for image in images(dir.path()) {
        let a = runtime_logits(&mut bare_classifier, &image);
        let b = runtime_logits(&mut full_classifier, &image);
        assert_eq!(a, b, "same options as the metadata give the same answer");
    }

    let wrong_labels = ModelOptions {
        labels: Some(vec!["only".into(), "two".into()]),
        ..ModelOptions::default()
    };
    let err = Model::load(&bare, &wrong_labels).unwrap_err().to_string();
    assert!(err.contains("2 labels for a model with 3 outputs"), "{err}");
    let wrong_size = ModelOptions {
        image_size: Some(32),
        ..ModelOptions::default()
    };
    let err = Model::load(&bare, &wrong_size).unwrap_err().to_string();
    assert!(err.contains("height is 16, not 32"), "{err}");
}

#[test]
fn a_model_whose_input_is_not_an_image_is_refused() {
    use exporter::onnx_graph::{Dim, GraphBuilder};
    let mut g = GraphBuilder::new("mlp");
    g.input("features", &[Dim::Symbol("batch"), Dim::Fixed(4)]);
    let w = g.weight("w", &[4, 2], vec![0.5; 8]);
    g.node("MatMul", "logits", &["features", &w], vec![]);
    g.output("logits", &[Dim::Symbol("batch"), Dim::Fixed(2)]);
    let bytes = exporter::onnx_graph::encode(&g.finish(17, "test", vec![]));
    let err = Model::from_bytes(&bytes, &ModelOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an image tensor"), "{err}");
}

#[test]
fn attention_outputs_are_softmax_weights_and_leave_the_logits_alone() {
    use runtime::explain::{Explainer, Method};
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let onnx = dir.path().join("model.onnx");
    let options = ExportOptions {
        with_attention: true,
        ..ExportOptions::default()
    };
    export::export(&run, &onnx, &options).unwrap();

    // Without asking for them, the attention outputs are pruned; asking for them on a plain
    // export is a clear error.
    let plain = Model::load(&onnx, &ModelOptions::default()).unwrap();
    assert_eq!(plain.attention_layers, 0);
    let attention = ModelOptions {
        attention: true,
        ..ModelOptions::default()
    };
    let mapped = Model::load(&onnx, &attention).unwrap();
    // A softmax whose weights are an output keeps tract's attention, so the logits compared
    // below come from the fused operator on one side and tract's on the other.
    let fused = |model: &Model| model.operators().get("TokenMajorAttention").copied();
    assert_eq!((fused(&plain), fused(&mapped)), (Some(2), None));
    let mut explainer = Explainer::new(mapped).unwrap();
    let logits_only = dir.path().join("plain.onnx");
    export::export(&run, &logits_only, &ExportOptions::default()).unwrap();
    let err = Model::load(&logits_only, &attention).unwrap_err();
    assert!(err.to_string().contains("--with-attention"), "{err}");

    let mut classifier = Classifier::new(plain, 1).unwrap();
    for image in images(dir.path()) {
        let decoded = runtime::decode_file(&image).unwrap();
        let explanation = explainer.explain(&decoded.frame()).unwrap();
        // The same logits as the plain classifier path.
        classifier.classify_frame(&decoded.frame()).unwrap();
        let diff = classifier
            .logits()
            .iter()
            .zip(&explanation.logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "{diff}");
        assert_eq!(explanation.layers.len(), 2);
        // Head-averaged softmax weights: every row of every block sums to 1. (That a trained
        // map is not flat is checked on the shipped model, runtime/tests/explain.rs.)
        for layer in &explanation.layers {
            for row in layer.chunks(explanation.tokens) {
                let total: f32 = row.iter().sum();
                assert!((total - 1.0).abs() < 1e-4, "a row sums to {total}");
            }
        }
        for method in [Method::Rollout, Method::LastLayer] {
            assert_eq!(explanation.map(method).side, 4, "16 px in patches of 4");
        }
    }
}
