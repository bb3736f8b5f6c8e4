//! f16 and int8 against f32 on the shipped model, `runtime quantize`'s output file, and the
//! errors of both.
#![cfg(feature = "embedded-model")]

mod common;

use common::{float_value_info, onnx_file, repo, runtime, stderr};
use runtime::tract_onnx::pb;
use runtime::{Classifier, Isa, Model, ModelOptions, Precision, decode_file};
use std::path::PathBuf;

fn test_images() -> Vec<PathBuf> {
    runtime::dataset::images_under(&repo("models/fashion-vit/test-images"), 1000).unwrap()
}

fn load(bytes: &[u8], precision: Option<Precision>) -> Classifier {
    let options = ModelOptions {
        precision,
        ..ModelOptions::default()
    };
    Classifier::new(Model::from_bytes(bytes, &options).unwrap(), 1).unwrap()
}

/// Top-1 class and logits of each image.
fn predictions(classifier: &mut Classifier, images: &[PathBuf]) -> Vec<(usize, Vec<f32>)> {
    images
        .iter()
        .map(|path| {
            let image = decode_file(path).unwrap();
            let class = classifier.classify_frame(&image.frame()).unwrap()[0].class;
            (class, classifier.logits().to_vec())
        })
        .collect()
}

fn agreement(a: &[(usize, Vec<f32>)], b: &[(usize, Vec<f32>)]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x.0 == y.0).count()
}

fn float_model() -> &'static [u8] {
    runtime::embedded::DEFAULT_MODEL.unwrap()
}

// Thresholds: on the 10 000 Fashion-MNIST test images the int8 file agreed with f32 on over
// 99.5 % of top-1 answers and f16 on 99.97 % (docs/precision.md). Over these 30 images that
// predicts no disagreement for either; the tests allow one (f16) and two (int8), so they fail
// on a broken precision (a wrong scale or zero point scrambles most answers), not on noise.

#[test]
fn f16_agrees_with_f32_and_keeps_f32_inputs_and_outputs() {
    let images = test_images();
    assert_eq!(images.len(), 30);
    let f32_answers = predictions(&mut load(float_model(), None), &images);
    let mut half = load(float_model(), Some(Precision::F16));
    assert_eq!(half.model().precision, Precision::F16);
    let f16_answers = predictions(&mut half, &images);
    assert!(agreement(&f32_answers, &f16_answers) >= 29);
    let largest_gap = f32_answers
        .iter()
        .zip(&f16_answers)
        .flat_map(|(a, b)| a.1.iter().zip(&b.1).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    // f16 keeps ~3 decimal digits; logits here are within ±15.
    assert!(
        largest_gap > 0.0 && largest_gap < 0.1,
        "largest gap {largest_gap}"
    );
}

#[test]
fn the_shipped_int8_file_agrees_with_f32_and_is_embedded() {
    let on_disk = std::fs::read(repo("models/fashion-vit/model.int8.onnx")).unwrap();
    assert!(runtime::embedded::DEFAULT_INT8_MODEL == Some(&on_disk[..]));
    let images = test_images();
    let f32_answers = predictions(&mut load(float_model(), None), &images);
    let mut int8 = load(&on_disk, Some(Precision::Int8));
    assert_eq!(int8.model().precision, Precision::Int8);
    // 6 blocks × (q, k and v, which tract splits, the output projection, the MLP's two) + the
    // head, on the runtime's int8 operator where it has a kernel, else on tract's.
    if runtime::ops::dense_int8::beats_tract(Isa::best()) {
        assert_eq!(int8.model().operators().get("DenseLinearInt8"), Some(&37));
    } else {
        let kernels = int8.model().kernels();
        assert!(kernels.keys().any(|k| k.contains("i32")), "{kernels:?}");
    }
    assert!(agreement(&f32_answers, &predictions(&mut int8, &images)) >= 28);
}

/// On every kernel this CPU runs, the int8 file `bytes` computes in int8, its 37 products run
/// on the runtime's int8 operator, and its answers agree with f32's.
fn assert_every_int8_kernel_agrees_with_f32(bytes: &[u8]) {
    let images = test_images();
    let f32_answers = predictions(&mut load(float_model(), None), &images);
    for isa in Isa::available() {
        let options = ModelOptions {
            isa: Some(isa),
            ..ModelOptions::default()
        };
        let model = Model::from_bytes(bytes, &options).unwrap();
        assert_eq!(model.precision, Precision::Int8, "{isa}");
        assert_eq!(model.operators().get("DenseLinearInt8"), Some(&37), "{isa}");
        let answers = predictions(&mut Classifier::new(model, 1).unwrap(), &images);
        assert!(agreement(&f32_answers, &answers) >= 28, "{isa}");
    }
}

#[test]
fn every_int8_kernel_agrees_with_f32() {
    let on_disk = std::fs::read(repo("models/fashion-vit/model.int8.onnx")).unwrap();
    assert_every_int8_kernel_agrees_with_f32(&on_disk);
}

#[test]
fn quantize_writes_a_smaller_self_describing_int8_model() {
    let images = test_images();
    let (bytes, report) =
        runtime::quantize::quantize(float_model(), &ModelOptions::default()).unwrap();
    // 6 blocks × (QKV, output, MLP in, MLP out) + the head; the two attention products per
    // block multiply activations and stay float.
    assert_eq!((report.int8_products, report.float_products), (25, 12));
    let float_weights: usize = runtime::quantize::weight_bytes(float_model())
        .unwrap()
        .values()
        .sum();
    let int8_weights = runtime::quantize::weight_bytes(&bytes).unwrap();
    let ratio = float_weights as f64 / int8_weights.values().sum::<usize>() as f64;
    assert!(ratio >= 3.5, "weights only {ratio:.2}× smaller");
    assert!(int8_weights["int8"] > 3 * int8_weights["float"]);
    assert!(float_model().len() as f64 / bytes.len() as f64 >= 3.0);

    let model = Model::from_bytes(&bytes, &ModelOptions::default()).unwrap();
    assert_eq!(model.precision, Precision::Int8);
    let float = Model::from_bytes(float_model(), &ModelOptions::default()).unwrap();
    assert_eq!(model.labels, float.labels);
    assert_eq!(model.preprocess, float.preprocess);
    let scheme: serde_json::Value =
        serde_json::from_str(&model.metadata["vit.quantization"]).unwrap();
    assert_eq!(scheme["int8_products"], 25);
    for key in ["vit.preset", "vit.labels", "vit.attention"] {
        assert_eq!(model.metadata[key], float.metadata[key], "{key}");
    }

    let f32_answers = predictions(&mut Classifier::new(float, 1).unwrap(), &images);
    let int8_answers = predictions(&mut Classifier::new(model, 1).unwrap(), &images);
    assert!(agreement(&f32_answers, &int8_answers) >= 28);
}

#[test]
fn quantize_refuses_models_it_cannot_quantize() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let run = |model: &str| {
        let output = runtime(&["quantize", model, "-o", out.to_str().unwrap()]);
        assert!(!output.status.success());
        assert!(!out.exists(), "nothing is written on failure");
        let message = stderr(&output);
        assert_eq!(message.trim().lines().count(), 1, "{message}");
        message
    };
    let int8 = repo("models/fashion-vit/model.int8.onnx");
    assert!(run(int8.to_str().unwrap()).contains("already int8-quantized"));

    // A valid classifier with no weight matrix: reshape to [1, 4] and add a bias.
    let no_matmul = dir.path().join("no_matmul.onnx");
    std::fs::write(&no_matmul, reshape_and_add_model()).unwrap();
    assert!(run(no_matmul.to_str().unwrap()).contains("nothing to quantize"));
}

#[test]
fn precision_flags_that_do_not_fit_the_file_are_one_line_errors() {
    let float = repo("models/fashion-vit/model.onnx");
    let int8 = repo("models/fashion-vit/model.int8.onnx");
    let image = repo("models/fashion-vit/test-images/bag/00018.png");
    let cases = [
        (&float, "int8", "runtime quantize"),
        (&int8, "f16", "int8-quantized"),
        (&int8, "f32", "int8-quantized"),
    ];
    for (model, precision, says) in cases {
        let output = runtime(&[
            "classify",
            image.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--precision",
            precision,
        ]);
        assert!(!output.status.success());
        let message = stderr(&output);
        assert_eq!(message.trim().lines().count(), 1, "{message}");
        assert!(message.contains(says), "{message}");
    }
    let embedded_int8 = runtime(&[
        "classify",
        image.to_str().unwrap(),
        "--precision",
        "int8",
        "--json",
    ]);
    assert!(embedded_int8.status.success(), "{}", stderr(&embedded_int8));
    assert!(String::from_utf8_lossy(&embedded_int8.stdout).contains("\"bag\""));
}

#[test]
fn a_gemm_head_is_quantized_with_its_weights_either_way_round() {
    // A CNN's head (or torch's Linear): Flatten, then Gemm by a constant [16, 3] matrix, or
    // its [3, 16] transpose with transB = 1, plus a bias.
    let weights: Vec<f32> = (0..48)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
        .collect();
    let transposed: Vec<f32> = (0..48).map(|i| weights[(i % 16) * 3 + i / 16]).collect();
    let pixels: Vec<f32> = (0..16).map(|i| (i as f32 - 6.0) / 5.0).collect();
    for (trans_b, w, dims) in [(0, &weights, [16, 3]), (1, &transposed, [3, 16])] {
        let float = gemm_model(trans_b, w, dims);
        let (bytes, report) =
            runtime::quantize::quantize(&float, &ModelOptions::default()).unwrap();
        assert_eq!((report.int8_products, report.float_products), (1, 0));
        let logits = |bytes: &[u8]| {
            let model = Model::from_bytes(bytes, &ModelOptions::default()).unwrap();
            let precision = model.precision;
            let mut classifier = Classifier::new(model, 1).unwrap();
            classifier.set_input(&pixels).unwrap();
            classifier.infer().unwrap();
            (precision, classifier.logits().to_vec())
        };
        let (f32_precision, expected) = logits(&float);
        let (int8_precision, got) = logits(&bytes);
        assert_eq!(
            (f32_precision, int8_precision),
            (Precision::F32, Precision::Int8)
        );
        // By hand: bias + pixels · W.
        for (n, &value) in expected.iter().enumerate() {
            let exact: f32 =
                0.5 * n as f32 + (0..16).map(|k| pixels[k] * weights[k * 3 + n]).sum::<f32>();
            assert!(
                (value - exact).abs() < 1e-4,
                "transB {trans_b}: {value} vs {exact}"
            );
        }
        for (a, b) in expected.iter().zip(&got) {
            assert!(
                (a - b).abs() < 0.05 * (1.0 + a.abs()),
                "transB {trans_b}: {a} vs {b}"
            );
        }
    }
}

/// `logits = Gemm(Flatten(pixels), W, bias)` with bias `[0, 0.5, 1]`.
fn gemm_model(trans_b: i64, weights: &[f32], dims: [i64; 2]) -> Vec<u8> {
    use pb::tensor_proto::DataType;
    let floats = |name: &str, dims: Vec<i64>, values: &[f32]| pb::TensorProto {
        name: name.into(),
        dims,
        data_type: DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    };
    let int = |name: &str, i: i64| pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], output: &str, attribute| pb::NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    };
    onnx_file(pb::GraphProto {
        name: "gemm".into(),
        node: vec![
            node("Flatten", &["pixels"], "flat", vec![int("axis", 1)]),
            node(
                "Gemm",
                &["flat", "w", "bias"],
                "logits",
                vec![int("transB", trans_b)],
            ),
        ],
        initializer: vec![
            floats("w", dims.to_vec(), weights),
            floats("bias", vec![3], &[0.0, 0.5, 1.0]),
        ],
        input: vec![float_value_info("pixels", &[1, 1, 4, 4])],
        output: vec![float_value_info("logits", &[1, 3])],
        ..Default::default()
    })
}

fn reshape_and_add_model() -> Vec<u8> {
    use pb::tensor_proto::DataType;
    let tensor =
        |name: &str, dims: Vec<i64>, data_type: DataType, raw_data: Vec<u8>| pb::TensorProto {
            name: name.into(),
            dims,
            data_type: data_type as i32,
            raw_data,
            ..Default::default()
        };
    let node = |op: &str, inputs: &[&str], output: &str| pb::NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "no_matmul".into(),
        node: vec![
            node("Reshape", &["pixels", "shape"], "flat"),
            node("Add", &["flat", "bias"], "logits"),
        ],
        initializer: vec![
            tensor(
                "shape",
                vec![2],
                DataType::Int64,
                [1i64, 4].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            tensor(
                "bias",
                vec![4],
                DataType::Float,
                [0.1f32, 0.2, 0.3, 0.4]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        ],
        input: vec![float_value_info("pixels", &[1, 1, 2, 2])],
        output: vec![float_value_info("logits", &[1, 4])],
        ..Default::default()
    };
    onnx_file(graph)
}

/// `output = DequantizeLinear(QuantizeLinear(input))`, u8 with `scale` and `zero`.
fn fake_quantize(
    graph: &mut pb::GraphProto,
    nodes: &mut Vec<pb::NodeProto>,
    input: &str,
    output: &str,
    scale: f32,
    zero: u8,
) {
    use pb::tensor_proto::DataType;
    let (s, z, q) = (
        format!("{output}.s"),
        format!("{output}.z"),
        format!("{output}.q"),
    );
    for (name, data_type, raw_data) in [
        (&s, DataType::Float, scale.to_le_bytes().to_vec()),
        (&z, DataType::Uint8, vec![zero]),
    ] {
        graph.initializer.push(pb::TensorProto {
            name: name.clone(),
            data_type: data_type as i32,
            raw_data,
            ..Default::default()
        });
    }
    for (op, from, to) in [
        ("QuantizeLinear", input, q.as_str()),
        ("DequantizeLinear", q.as_str(), output),
    ] {
        nodes.push(pb::NodeProto {
            op_type: op.into(),
            name: format!("{to}.{op}"),
            input: vec![from.to_string(), s.clone(), z.clone()],
            output: vec![to.to_string()],
            ..Default::default()
        });
    }
}

/// The shipped float model in onnxruntime's QDQ form (as `quantize_static` writes it): each
/// MatMul's weights int8 per column behind a DequantizeLinear, its activations and the
/// softmax's input and output through QuantizeLinear → DequantizeLinear with fixed ranges
/// standing in for calibrated ones.
fn qdq_model() -> Vec<u8> {
    use pb::tensor_proto::DataType;
    use prost::Message;
    let mut proto = pb::ModelProto::decode(float_model()).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let matrices: Vec<pb::TensorProto> = graph
        .initializer
        .iter()
        .filter(|t| t.dims.len() == 2 && t.data_type == DataType::Float as i32)
        .cloned()
        .collect();
    let tensor =
        |name: String, dims: Vec<i64>, data_type: DataType, raw_data: Vec<u8>| pb::TensorProto {
            name,
            dims,
            data_type: data_type as i32,
            raw_data,
            ..Default::default()
        };
    let node = |op: &str, inputs: Vec<String>, output: String| pb::NodeProto {
        op_type: op.into(),
        name: output.clone(),
        input: inputs,
        output: vec![output],
        ..Default::default()
    };
    let mut nodes = Vec::new();
    for mut n in std::mem::take(&mut graph.node) {
        let weight = matrices.iter().find(|t| n.input.get(1) == Some(&t.name));
        if let (true, Some(weight)) = (n.op_type == "MatMul", weight) {
            let (depth, width) = (weight.dims[0] as usize, weight.dims[1] as usize);
            let values: Vec<f32> = weight
                .raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let scales: Vec<f32> = (0..width)
                .map(|c| {
                    (0..depth)
                        .map(|d| values[d * width + c].abs())
                        .fold(0.0, f32::max)
                        / 127.0
                })
                .collect();
            let levels: Vec<u8> = (0..depth * width)
                .map(|i| (values[i] / scales[i % width]).round() as i8 as u8)
                .collect();
            let w = format!("{}.qdq", weight.name);
            graph.initializer.push(tensor(
                w.clone() + ".q",
                weight.dims.clone(),
                DataType::Int8,
                levels,
            ));
            let raw = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            graph.initializer.push(tensor(
                w.clone() + ".s",
                vec![width as i64],
                DataType::Float,
                raw,
            ));
            let mut dequantize = node(
                "DequantizeLinear",
                vec![w.clone() + ".q", w.clone() + ".s"],
                w.clone(),
            );
            dequantize.attribute.push(pb::AttributeProto {
                name: "axis".into(),
                r#type: pb::attribute_proto::AttributeType::Int as i32,
                i: 1,
                ..Default::default()
            });
            nodes.push(dequantize);
            let x = format!("{}.qdq", n.name);
            fake_quantize(graph, &mut nodes, &n.input[0], &x, 0.05, 128);
            n.input = vec![x, w];
        }
        if n.op_type == "Softmax" {
            // The scores and the weights too, as onnxruntime does.
            let (scores, weights) = (n.input[0].clone(), n.output[0].clone());
            let (quantized, raw) = (format!("{scores}.qdq"), format!("{weights}.raw"));
            fake_quantize(graph, &mut nodes, &scores, &quantized, 0.1, 128);
            n.input[0] = quantized;
            n.output[0] = raw.clone();
            nodes.push(n);
            fake_quantize(graph, &mut nodes, &raw, &weights, 1.0 / 255.0, 0);
            continue;
        }
        nodes.push(n);
    }
    graph.node = nodes;
    proto.encode_to_vec()
}

#[test]
fn qdq_files_run_on_the_int8_operator() {
    assert_every_int8_kernel_agrees_with_f32(&qdq_model());
}
