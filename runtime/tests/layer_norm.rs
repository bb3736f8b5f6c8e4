//! `runtime::ops::layer_norm::register`: ONNX LayerNormalization over the last axis parses into one
//! operator with tract's answer; other forms keep tract's own expansion.

mod common;

use common::{float_value_info, onnx_file};
use runtime::ops::layer_norm::register;
use runtime::tract_onnx::pb;
use runtime::tract_onnx::prelude::*;

const SHAPE: [i64; 3] = [2, 5, 64];

/// Deterministic values around `offset`, within ±2 of it.
fn values(n: usize, offset: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 * 0.37).sin() * 2.0 + offset)
        .collect()
}

/// A one-node model: LayerNormalization of a [2, 5, 64] input over the axes from `axis` on.
fn layer_norm_model(axis: usize) -> Vec<u8> {
    let normalised = SHAPE[axis..].to_vec();
    let initializer = |name: &str, offset: f32| pb::TensorProto {
        name: name.into(),
        dims: normalised.clone(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: values(normalised.iter().product::<i64>() as usize, offset),
        ..Default::default()
    };
    let node = pb::NodeProto {
        op_type: "LayerNormalization".into(),
        input: vec!["x".into(), "scale".into(), "bias".into()],
        output: vec!["y".into()],
        attribute: vec![pb::AttributeProto {
            name: "axis".into(),
            // The last axis as the exporter and torch write it.
            i: if axis == SHAPE.len() - 1 {
                -1
            } else {
                axis as i64
            },
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    onnx_file(pb::GraphProto {
        node: vec![node],
        initializer: vec![initializer("scale", 1.0), initializer("bias", 0.0)],
        input: vec![float_value_info("x", &SHAPE)],
        output: vec![float_value_info("y", &SHAPE)],
        ..Default::default()
    })
}

/// The output and the optimised model's operators.
fn run(onnx: &tract_onnx::Onnx, bytes: &[u8], input: &Tensor) -> (Vec<f32>, Vec<String>) {
    let model = onnx
        .model_for_read(&mut &bytes[..])
        .unwrap()
        .into_optimized()
        .unwrap();
    let ops = model
        .nodes
        .iter()
        .map(|n| n.op.name().to_string())
        .collect();
    let output = model
        .into_runnable()
        .unwrap()
        .run(tvec!(input.clone().into()))
        .unwrap();
    let values = output[0].try_as_plain_ram().unwrap();
    (values.as_slice::<f32>().unwrap().to_vec(), ops)
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn the_parser_builds_one_node_and_gives_tracts_answer() {
    let mut fused = tract_onnx::onnx();
    register(&mut fused);
    let stock = tract_onnx::onnx();
    let shape = SHAPE.map(|d| d as usize);
    let input = tensor1(&values(shape.iter().product(), 3.0))
        .into_shape(&shape)
        .unwrap();

    let last_axis = layer_norm_model(2);
    let (ours, ops) = run(&fused, &last_axis, &input);
    assert!(ops.iter().any(|op| op == "LastAxisLayerNorm"), "{ops:?}");
    let (theirs, stock_ops) = run(&stock, &last_axis, &input);
    assert!(!stock_ops.iter().any(|op| op == "LastAxisLayerNorm"));
    // Outputs are within ±4; the two differ only in rounding order.
    assert!(largest_difference(&ours, &theirs) < 1e-5);

    // Over two axes the stock expansion still runs, and still agrees.
    let two_axes = layer_norm_model(1);
    let (ours, ops) = run(&fused, &two_axes, &input);
    assert!(!ops.iter().any(|op| op == "LastAxisLayerNorm"), "{ops:?}");
    let (theirs, _) = run(&stock, &two_axes, &input);
    assert_eq!(largest_difference(&ours, &theirs), 0.0);
}
