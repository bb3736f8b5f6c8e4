//! `runtime explain` on the shipped model (exported with its attention outputs): an overlay of
//! the input's size, per-block maps side by side, and a clear error for a model without maps.

mod common;
use common::{repo, runtime};

use prost::Message;

fn test_image() -> String {
    repo("models/fashion-vit/test-images/trouser/00002.png")
        .display()
        .to_string()
}

#[test]
fn overlay_and_grid_have_the_frames_size_and_a_real_map() {
    let dir = tempfile::tempdir().unwrap();
    let (overlay, grid) = (dir.path().join("overlay.png"), dir.path().join("grid.png"));
    // A colour photo of another size: the overlay keeps the input's size, whatever the model's.
    let photo = repo("models/samples/frame.jpg").display().to_string();
    for (image, (width, height)) in [(test_image(), (28, 28)), (photo, (451, 300))] {
        let output = runtime(&[
            "explain",
            &image,
            "-o",
            overlay.to_str().unwrap(),
            "--grid",
            grid.to_str().unwrap(),
            "--json",
        ]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(image::image_dimensions(&overlay).unwrap(), (width, height));
        let blocks = report["layers"].as_u64().unwrap() as u32;
        assert_eq!(blocks, 6);
        assert_eq!(
            image::image_dimensions(&grid).unwrap(),
            (blocks * width, height)
        );

        // Patch 4 on 28 px: a 7×7 map, and a trained model's map is not flat.
        assert_eq!(report["map"]["side"], 7);
        let values: Vec<f64> = report["map"]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let (min, max) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(max > 1.5 * min, "{values:?}");

        // The explained label is the classifier's.
        let classify = runtime(&["classify", &image, "--json"]);
        let classified: serde_json::Value = serde_json::from_slice(&classify.stdout).unwrap();
        assert_eq!(report["top"]["label"], classified["top"][0]["label"]);
    }
}

#[test]
fn the_two_methods_differ() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let map = |method: &str| -> serde_json::Value {
        let output = runtime(&[
            "explain",
            &test_image(),
            "--method",
            method,
            "-o",
            out.to_str().unwrap(),
            "--json",
        ]);
        assert!(output.status.success());
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()["map"].clone()
    };
    assert_ne!(map("rollout"), map("last-layer"));
    let bad = runtime(&[
        "explain",
        &test_image(),
        "--method",
        "gradcam",
        "-o",
        "x.png",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("rollout or last-layer"));
}

#[test]
fn a_model_without_attention_outputs_names_the_export_flag() {
    let dir = tempfile::tempdir().unwrap();
    // The shipped model with its attention outputs removed, as a plain export would be, and
    // said to be of each architecture: a ViT, distilled or not, needs the export flag; a CNN
    // or a Swin has no global attention to show.
    let bytes = std::fs::read(repo("models/fashion-vit/model.onnx")).unwrap();
    for (architecture, advice) in [
        ("vit", "--with-attention"),
        ("deit", "--with-attention"),
        ("resnet", "explain needs a ViT"),
        ("swin", "explain needs a ViT"),
    ] {
        let mut proto = runtime::tract_onnx::pb::ModelProto::decode(&bytes[..]).unwrap();
        proto.graph.as_mut().unwrap().output.truncate(1);
        proto
            .metadata_props
            .retain(|entry| entry.key != "vit.architecture");
        proto
            .metadata_props
            .push(runtime::tract_onnx::pb::StringStringEntryProto {
                key: "vit.architecture".into(),
                value: architecture.into(),
            });
        let plain = dir.path().join(format!("{architecture}.onnx"));
        std::fs::write(&plain, proto.encode_to_vec()).unwrap();
        let out = dir.path().join("o.png");
        let output = runtime(&[
            "explain",
            &test_image(),
            "--model",
            plain.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(output.status.code(), Some(1), "{architecture}");
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(advice), "{architecture}: {err}");
        assert!(!out.exists(), "nothing written on failure");
    }
}
