//! ONNX export of a trained tiny model: verified against burn, standard ops, metadata, and
//! clear failures on broken checkpoints.

use exporter::Preset;
use exporter::export::{self, ExportError, ExportOptions};
use exporter::training::{self, NewRun, Recipe};
use std::path::{Path, PathBuf};

fn trained_run(dir: &Path) -> PathBuf {
    trained_run_of(dir, Preset::Tiny)
}

fn trained_run_of(dir: &Path, preset: Preset) -> PathBuf {
    let data = dir.join("data");
    // The CNN pools over positions, so its classes differ by texture, not place.
    let write = match preset {
        Preset::CnnTiny => exporter::synthetic::write_stripes,
        _ => exporter::synthetic::write_dataset,
    };
    write(&data, 3, 12, 20, 24, 3).unwrap();
    let run = dir.join("run");
    let new = NewRun::new(
        data,
        preset,
        Recipe {
            epochs: 2,
            batch_size: 8,
            learning_rate: 3e-3,
            ..Recipe::default()
        },
    );
    training::train(new, &run, &mut ()).unwrap();
    run
}

#[test]
fn export_matches_burn_and_uses_standard_ops() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let out = dir.path().join("model.onnx");
    let report = export::export(&run, &out, &ExportOptions::default()).unwrap();
    let batches: Vec<usize> = report.max_abs_diff.iter().map(|(b, _)| *b).collect();
    assert_eq!(batches, vec![1, 3]);
    assert!(
        report.max_abs_diff.iter().all(|(_, d)| *d <= 1e-4),
        "{:?}",
        report.max_abs_diff
    );

    let info = export::inspect(&out).unwrap();
    let ops = &info.op_histogram;
    let depth = 2;
    assert_eq!(ops.get("LayerNormalization"), Some(&(2 * depth + 1)));
    assert_eq!(ops.get("Softmax"), Some(&depth));
    assert_eq!(ops.get("Erf"), Some(&depth));
    assert_eq!(ops.get("Conv"), Some(&1));
    assert_eq!(
        ops.get("Gather"),
        Some(&1),
        "Gather only picks the CLS token"
    );
    assert!(!ops.contains_key("Constant"), "weights are initializers");
    assert_eq!(
        info.inputs,
        vec![(
            "pixel_values".to_string(),
            vec!["batch".into(), "1".into(), "16".into(), "16".into()]
        )]
    );
    assert_eq!(
        info.outputs,
        vec![("logits".to_string(), vec!["batch".into(), "3".into()])]
    );
    assert_eq!(info.opset, vec![(String::new(), 17)]);
}

#[test]
fn metadata_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let out = dir.path().join("model.onnx");
    export::export(&run, &out, &ExportOptions::default()).unwrap();
    let config: training::TrainingConfig =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    let meta = export::inspect(&out).unwrap().metadata;
    use runtime::metadata as key;
    let labels: Vec<String> = serde_json::from_str(&meta[key::LABELS]).unwrap();
    assert_eq!(labels, config.classes);
    assert_eq!(meta[key::IMAGE_SIZE], "16");
    assert_eq!(meta[key::CHANNELS], "1");
    let mean: Vec<f32> = serde_json::from_str(&meta[key::MEAN]).unwrap();
    let std: Vec<f32> = serde_json::from_str(&meta[key::STD]).unwrap();
    assert_eq!(
        (mean, std),
        (
            config.preprocess.mean.clone(),
            config.preprocess.std.clone()
        )
    );
    assert_eq!(meta[key::RESIZE], "squash");
    assert_eq!(meta[key::PRESET], "tiny");
    let model: exporter::model::ModelConfig =
        serde_json::from_str(&meta[key::MODEL_CONFIG]).unwrap();
    assert_eq!(meta[key::ARCHITECTURE], "vit");
    assert_eq!(model, config.model);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap()).unwrap();
    let accuracy: f64 = meta[key::VAL_ACCURACY].parse().unwrap();
    assert!((accuracy - state["best"]["val_accuracy"].as_f64().unwrap()).abs() < 1e-6);
    assert_eq!(meta[key::VAL_EPOCH], state["best"]["epoch"].to_string());
}

#[test]
fn opset_20_uses_the_gelu_op() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let out = dir.path().join("model20.onnx");
    let report = export::export(
        &run,
        &out,
        &ExportOptions {
            opset: 20,
            ..ExportOptions::default()
        },
    )
    .unwrap();
    assert!(report.max_abs_diff.iter().all(|(_, d)| *d <= 1e-4));
    assert_eq!(report.op_histogram.get("Gelu"), Some(&2));
    assert!(!report.op_histogram.contains_key("Erf"));
}

#[test]
fn broken_checkpoints_fail_clearly_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let out = dir.path().join("model.onnx");

    let best = run.join(
        exporter::run_folder::read_state(&run)
            .unwrap()
            .unwrap()
            .best_weights,
    );
    let name = best.file_name().unwrap().to_str().unwrap().to_string();
    let weights = std::fs::read(&best).unwrap();
    std::fs::write(&best, &weights[..weights.len() / 2]).unwrap();
    let err = export::export(&run, &out, &ExportOptions::default()).unwrap_err();
    assert!(matches!(err, ExportError::Run(_)), "{err}");
    assert!(err.to_string().contains(&name), "{err}");
    assert!(!out.exists());

    std::fs::write(&best, b"garbage").unwrap();
    let err = export::export(&run, &out, &ExportOptions::default()).unwrap_err();
    assert!(err.to_string().contains(&name), "{err}");
    assert!(!out.exists());

    // The state that names the weights and carries their figures: unreadable is an error.
    std::fs::write(run.join("state.json"), b"{ \"epoch\": ").unwrap();
    let err = export::export(&run, &out, &ExportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("state.json"), "{err}");
    assert!(!out.exists());

    std::fs::write(run.join("config.json"), b"{ not json").unwrap();
    let err = export::export(&run, &out, &ExportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "tmp"))
            .count(),
        0
    );
}

#[test]
fn inspect_refuses_files_that_are_not_onnx() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.onnx");
    std::fs::write(&path, b"hello, I am not a protobuf").unwrap();
    let err = export::inspect(&path).unwrap_err().to_string();
    assert!(err.contains("not an ONNX model"), "{err}");
}

#[test]
fn attention_outputs_are_opt_in_and_match_burn() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    for opset in [17, 18] {
        let out = dir.path().join(format!("attention{opset}.onnx"));
        let options = ExportOptions {
            opset,
            with_attention: true,
            ..ExportOptions::default()
        };
        // The export verifies every output (logits and maps) against burn's.
        let report = export::export(&run, &out, &options).unwrap();
        assert!(report.max_abs_diff.iter().all(|(_, d)| *d <= 1e-4));
        assert_eq!(report.attention_outputs, 2);
        assert_eq!(report.op_histogram.get("ReduceMean"), Some(&2));
        let info = export::inspect(&out).unwrap();
        let names: Vec<&str> = info.outputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["logits", "attention.0", "attention.1"]);
        // 16 px, patch 4: 16 patches and CLS.
        assert_eq!(info.outputs[1].1, ["batch", "17", "17"]);
        assert!(info.metadata.contains_key(runtime::metadata::ATTENTION));
    }
}

#[test]
fn a_cnn_exports_with_its_batch_norms_folded_and_matches_burn() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run_of(dir.path(), Preset::CnnTiny);
    let out = dir.path().join("cnn.onnx");
    // Trained for 2 epochs, the running statistics are far from their initial 0 and 1, so a
    // wrong fold would show.
    let report = export::export(&run, &out, &ExportOptions::default()).unwrap();
    assert!(
        report.max_abs_diff.iter().all(|(_, d)| *d <= 1e-4),
        "{:?}",
        report.max_abs_diff
    );
    let info = export::inspect(&out).unwrap();
    let ops = &info.op_histogram;
    // Stem, 2 convolutions per block, and the second stage's 1×1 shortcut.
    assert_eq!(ops.get("Conv"), Some(&(1 + 2 * 2 + 1)));
    assert!(!ops.contains_key("BatchNormalization"), "{ops:?}");
    for op in ["GlobalAveragePool", "Gemm", "Flatten"] {
        assert_eq!(ops.get(op), Some(&1), "{op}");
    }
    assert_eq!(ops.get("Add"), Some(&2), "one residual per block");
    assert_eq!(info.metadata["vit.architecture"], "resnet");
    assert_eq!(info.metadata["vit.preset"], "cnn-tiny");
    assert_eq!(report.multiply_adds, {
        let config: exporter::model::ModelConfig =
            serde_json::from_str(&info.metadata["vit.model_config"]).unwrap();
        config.multiply_adds()
    });

    let attention = ExportOptions {
        with_attention: true,
        ..ExportOptions::default()
    };
    let error = export::export(&run, &dir.path().join("a.onnx"), &attention).unwrap_err();
    assert!(matches!(error, ExportError::NoAttention(_)), "{error}");
}

#[test]
fn a_swin_exports_its_windows_shift_and_bias_as_standard_ops_and_matches_burn() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run_of(dir.path(), Preset::SwinTiny);
    let out = dir.path().join("swin.onnx");
    for opset in [17, 20] {
        let options = ExportOptions {
            opset,
            ..ExportOptions::default()
        };
        let report = export::export(&run, &out, &options).unwrap();
        assert!(
            report.max_abs_diff.iter().all(|(_, d)| *d <= 1e-4),
            "opset {opset}: {:?}",
            report.max_abs_diff
        );
    }
    let info = export::inspect(&out).unwrap();
    let ops = &info.op_histogram;
    // 4 blocks; the first stage's second block is the one shifted (a Slice pair per axis,
    // there and back), the last stage is one window.
    assert_eq!(ops.get("Softmax"), Some(&4));
    assert_eq!(ops.get("Slice"), Some(&8));
    assert_eq!(ops.get("Gelu"), Some(&4));
    assert_eq!(info.metadata["vit.architecture"], "swin");
    let attention = ExportOptions {
        with_attention: true,
        ..ExportOptions::default()
    };
    let error = export::export(&run, &dir.path().join("a.onnx"), &attention).unwrap_err();
    assert!(matches!(error, ExportError::NoAttention(_)), "{error}");
}
