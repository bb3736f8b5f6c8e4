//! Malformed and hostile ONNX files, made by hand: each gets one clear error line and exit 1
//! from the CLI (never a panic), and a run that fails inside tract leaves the classifier usable.

mod common;
use common::{float_value_info, onnx_file, repo, runtime, stderr};

use prost::Message;
use runtime::tract_onnx::pb;
use std::path::Path;

fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: outputs[0].into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn floats(name: &str, dims: &[i64], values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: values.to_vec(),
        ..Default::default()
    }
}

fn int64s(name: &str, values: &[i64]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: vec![values.len() as i64],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

/// A 2×2 grey image flattened into a linear layer of `classes` logits.
fn linear_classifier(classes: usize) -> pb::GraphProto {
    pb::GraphProto {
        name: "linear".into(),
        input: vec![float_value_info("image", &[1, 1, 2, 2])],
        output: vec![float_value_info("logits", &[1, classes as i64])],
        initializer: vec![floats(
            "weight",
            &[4, classes as i64],
            &vec![0.5; 4 * classes],
        )],
        node: vec![
            node("Flatten", &["image"], &["flat"]),
            node("MatMul", &["flat", "weight"], &["logits"]),
        ],
        ..Default::default()
    }
}

/// An attribute holding the integers `ints`.
fn ints_attribute(name: &str, ints: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

/// The same classifier behind a 1×1 convolution whose attributes are `window`.
fn conv_classifier(window: &[(&str, &[i64])]) -> pb::GraphProto {
    let mut graph = linear_classifier(3);
    graph
        .initializer
        .push(floats("kernel", &[1, 1, 1, 1], &[1.0]));
    let mut conv = node("Conv", &["image", "kernel"], &["conv"]);
    conv.attribute = window
        .iter()
        .map(|(name, ints)| ints_attribute(name, ints))
        .collect();
    graph.node[0].input[0] = "conv".into();
    graph.node.insert(0, conv);
    graph
}

/// A 6×6 image through `blocks` residual blocks whose 3×3 convolutions lack their padding, so
/// each block adds a 4-pixel map to a 6-pixel one, as a fuzzed CNN without `pads` did.
fn unpadded_residual_blocks(blocks: usize) -> pb::GraphProto {
    let mut graph = pb::GraphProto {
        name: "unpadded".into(),
        input: vec![float_value_info("image", &[1, 1, 6, 6])],
        output: vec![float_value_info("logits", &[1, 3])],
        initializer: vec![
            floats("kernel", &[1, 1, 3, 3], &[0.1; 9]),
            floats("weight", &[36, 3], &[0.5; 108]),
        ],
        ..Default::default()
    };
    let mut x = "image".to_string();
    for block in 0..blocks {
        let (conv, sum) = (format!("conv{block}"), format!("sum{block}"));
        graph.node.push(node("Conv", &[&x, "kernel"], &[&conv]));
        graph.node.push(node("Add", &[&conv, &x], &[&sum]));
        x = sum;
    }
    graph.node.push(node("Flatten", &[&x], &["flat"]));
    graph
        .node
        .push(node("MatMul", &["flat", "weight"], &["logits"]));
    graph
}

/// A 2-D max pooling window over the image reshaped to 5 axes: tract indexes the window by the
/// input's 3 spatial axes.
fn pooling_over_more_axes() -> pb::GraphProto {
    let mut graph = linear_classifier(3);
    graph
        .initializer
        .push(int64s("five_axes", &[1, 1, 1, 2, 2]));
    let mut pool = node("MaxPool", &["volume"], &["pooled"]);
    pool.attribute.push(ints_attribute("kernel_shape", &[1, 1]));
    graph.node[0].input[0] = "pooled".into();
    graph.node.splice(
        0..0,
        [node("Reshape", &["image", "five_axes"], &["volume"]), pool],
    );
    graph
}

fn write(dir: &Path, name: &str, graph: pb::GraphProto) -> String {
    let path = dir.join(name);
    std::fs::write(&path, onnx_file(graph)).unwrap();
    path.display().to_string()
}

fn assert_one_clear_line(args: &[&str], expected: &str) {
    let output = runtime(args);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{args:?}: {err}");
    assert!(
        err.contains(expected),
        "{args:?}: {expected:?} not in {err:?}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err:?}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn malformed_graphs_are_one_line_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let sample = repo("models/samples/frame.jpg").display().to_string();

    let mut no_outputs = linear_classifier(3);
    no_outputs.output.clear();
    let mut ghost_output = linear_classifier(3);
    ghost_output.output[0].name = "ghost".into();
    let mut ghost_input = linear_classifier(3);
    ghost_input.node[1].input[1] = "missing_weight".into();
    // An axis far beyond any rank: tract's shape rules spent minutes on one (found by fuzzing).
    let mut huge_axis = linear_classifier(3);
    huge_axis.node[0].attribute.push(pb::AttributeProto {
        name: "axis".into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: -68_719_476_737,
        ..Default::default()
    });
    // Window attributes that disagree with the kernel's 2 spatial axes made tract index past
    // their end (a `pads` of 3 values, found by fuzzing).
    let three_pads = conv_classifier(&[("kernel_shape", &[1, 1]), ("pads", &[0, 0, 2175])]);
    let one_stride = conv_classifier(&[("strides", &[2])]);
    let zero_dilation = conv_classifier(&[("dilations", &[1, 0])]);
    // A permutation naming an axis the tensor lacks (found by fuzzing).
    let mut bad_perm = linear_classifier(3);
    let mut transpose = node("Transpose", &["image"], &["transposed"]);
    transpose
        .attribute
        .push(ints_attribute("perm", &[0, 5, 1, 3]));
    bad_perm.node[0].input[0] = "transposed".into();
    bad_perm.node.insert(0, transpose);
    let cases = [
        (
            "bad-perm.onnx",
            bad_perm,
            "perm [0, 5, 1, 3] is not an order of its 4 axes",
        ),
        (
            "pooling.onnx",
            pooling_over_more_axes(),
            "node \"pooled\" (MaxPool) has a window of 2 axes over an input of 5",
        ),
        (
            "unpadded.onnx",
            unpadded_residual_blocks(2),
            "node \"sum0\" (Add) makes a dimension of broadcast((4), (6)): its inputs' shapes disagree",
        ),
        (
            "three-pads.onnx",
            three_pads,
            "pads has 3 values where its 2 spatial axes need 4",
        ),
        (
            "one-stride.onnx",
            one_stride,
            "strides has 1 values where its 2 spatial axes need 2",
        ),
        (
            "zero-dilation.onnx",
            zero_dilation,
            "dilations holds 0, outside 1..=1048576",
        ),
        ("no-outputs.onnx", no_outputs, "no outputs"),
        (
            "ghost-output.onnx",
            ghost_output,
            "\"ghost\" is not produced by any node",
        ),
        (
            "ghost-input.onnx",
            ghost_input,
            "reads \"missing_weight\", which nothing produces",
        ),
        (
            "huge-axis.onnx",
            huge_axis,
            "names axis -68719476737, beyond any tensor's rank",
        ),
        ("zero-classes.onnx", linear_classifier(0), "0 classes"),
    ];
    for (name, graph, expected) in cases {
        let model = write(dir.path(), name, graph);
        for command in ["classify", "explain"] {
            let mut args = vec![command, &sample, "--model", &model];
            // explain first asks for attention outputs, which these models lack.
            let expected = match command {
                "explain" => {
                    args.extend(["-o", "/dev/null"]);
                    "error: loading"
                }
                _ => expected,
            };
            assert_one_clear_line(&args, expected);
        }
    }
    // The same models work once they are well formed.
    let good = write(dir.path(), "good.onnx", linear_classifier(3));
    let good_conv = conv_classifier(&[
        ("kernel_shape", &[1, 1]),
        ("strides", &[1, 1]),
        ("dilations", &[1, 1]),
        ("pads", &[0, 0, 0, 0]),
    ]);
    let good_conv = write(dir.path(), "good-conv.onnx", good_conv);
    for model in [good, good_conv] {
        let output = runtime(&["classify", &sample, "--model", &model]);
        assert!(output.status.success(), "{}", stderr(&output));
    }
}

#[test]
fn attention_layers_of_different_token_counts_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut graph = linear_classifier(3);
    // Layer 0 over CLS + 1 patch, layer 1 over CLS + 4: explain used to read layer 0 with
    // layer 1's count, out of its bounds.
    let uniform = |tokens: usize| vec![1.0 / tokens as f32; tokens * tokens];
    for (index, tokens) in [(0, 2), (1, 5)] {
        let name = format!("attention.{index}");
        let constant = format!("attention_weights.{index}");
        let dims = [1, tokens as i64, tokens as i64];
        graph
            .initializer
            .push(floats(&constant, &dims, &uniform(tokens)));
        graph.node.push(node("Identity", &[&constant], &[&name]));
        graph.output.push(float_value_info(&name, &dims));
    }
    let model = write(dir.path(), "uneven.onnx", graph);
    let sample = repo("models/samples/frame.jpg").display().to_string();
    assert_one_clear_line(
        &["explain", &sample, "--model", &model, "-o", "/dev/null"],
        "attention output 1 is over 5 tokens where the layers before it have 2",
    );
}

#[test]
fn an_absurd_logits_batch_is_an_error_not_an_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.f32");
    std::fs::write(&input, [0u8; 16]).unwrap();
    let input = input.display().to_string();
    for batch in ["18446744073709551615", "0"] {
        assert_one_clear_line(&["logits", "--input", &input, "--batch", batch], "f32 need");
    }
}

/// A model whose one pixel picks a row of a table: `round(10 x)` indexes 3 rows, so a bright
/// pixel asks for row 10 and tract's Gather fails (it panics on the index).
fn gather_model() -> Vec<u8> {
    let mut cast = node("Cast", &["scaled"], &["index"]);
    cast.attribute.push(pb::AttributeProto {
        name: "to".into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: pb::tensor_proto::DataType::Int64 as i64,
        ..Default::default()
    });
    onnx_file(pb::GraphProto {
        name: "gather".into(),
        input: vec![float_value_info("image", &[1, 1, 1, 1])],
        output: vec![float_value_info("logits", &[1, 2])],
        initializer: vec![
            floats("table", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            floats("ten", &[], &[10.0]),
            int64s("one", &[1]),
        ],
        node: vec![
            node("Reshape", &["image", "one"], &["flat"]),
            node("Mul", &["flat", "ten"], &["scaled"]),
            cast,
            node("Gather", &["table", "index"], &["logits"]),
        ],
        ..Default::default()
    })
}

#[test]
fn a_run_that_fails_inside_tract_leaves_the_classifier_usable() {
    let model = runtime::Model::from_bytes(&gather_model(), &Default::default()).unwrap();
    let mut classifier = runtime::Classifier::new(model, 1).unwrap();
    classifier.set_input(&[0.0]).unwrap();
    classifier.infer().unwrap();
    assert_eq!(classifier.logits(), [1.0, 2.0]);

    classifier.set_input(&[1.0]).unwrap();
    let error = classifier.infer().unwrap_err().to_string();
    assert!(error.starts_with("inference failed"), "{error}");

    // The failed run left the input in tract's state; the next frame used to panic on it.
    classifier.set_input(&[0.1]).unwrap();
    classifier.infer().unwrap();
    assert_eq!(classifier.logits(), [3.0, 4.0]);
}

#[test]
fn options_replace_malformed_metadata_instead_of_failing_on_it() {
    let mut proto = pb::ModelProto::decode(&onnx_file(linear_classifier(3))[..]).unwrap();
    for key in ["vit.mean", "vit.std", "vit.labels"] {
        proto.metadata_props.push(pb::StringStringEntryProto {
            key: key.into(),
            value: "[not json".into(),
        });
    }
    let bytes = proto.encode_to_vec();
    let error = runtime::Model::from_bytes(&bytes, &Default::default()).unwrap_err();
    assert!(error.to_string().contains("vit.mean"), "{error}");
    // Options given for every malformed key: the metadata is not needed, so not read.
    let options = runtime::ModelOptions {
        mean: Some(vec![0.5]),
        std: Some(vec![0.25]),
        labels: Some(vec!["a".into(), "b".into(), "c".into()]),
        ..Default::default()
    };
    let model = runtime::Model::from_bytes(&bytes, &options).unwrap();
    assert_eq!(model.labels, ["a", "b", "c"]);
}
