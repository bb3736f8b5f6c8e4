//! The model's metadata (`vit.*` keys: sizes, channels, mean, std, labels, resize, …) with any
//! values, on a small model of symbolic input size: loading takes them or names the bad key, and
//! a model that loads classifies a frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use runtime::metadata as key;
use runtime::tract_onnx::pb;
use runtime::{Classifier, FrameRef, Model, ModelOptions, PixelFormat};

const KEYS: [&str; 10] = [
    key::FORMAT,
    key::LABELS,
    key::IMAGE_SIZE,
    key::CHANNELS,
    key::MEAN,
    key::STD,
    key::RESIZE,
    key::PRESET,
    key::QUANTIZATION,
    key::ATTENTION,
];

/// `[N, C, H, W]` → mean over C, H, W → `[1, 1]` → × `[1, 3]`: three logits for any input size.
fn model(metadata: Vec<pb::StringStringEntryProto>) -> Vec<u8> {
    let dim = |name: &str| pb::tensor_shape_proto::Dimension {
        value: Some(pb::tensor_shape_proto::dimension::Value::DimParam(
            name.into(),
        )),
        ..Default::default()
    };
    let input = pb::ValueInfoProto {
        name: "image".into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: vec![dim("n"), dim("c"), dim("h"), dim("w")],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], output: &str| pb::NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    let mut mean = node("ReduceMean", &["image"], "mean");
    mean.attribute.push(pb::AttributeProto {
        name: "axes".into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: vec![1, 2, 3],
        ..Default::default()
    });
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        metadata_props: metadata,
        graph: Some(pb::GraphProto {
            name: "mean".into(),
            input: vec![input],
            output: vec![pb::ValueInfoProto {
                name: "logits".into(),
                ..Default::default()
            }],
            initializer: vec![pb::TensorProto {
                name: "weight".into(),
                dims: vec![1, 3],
                data_type: pb::tensor_proto::DataType::Float as i32,
                float_data: vec![1.0, -1.0, 0.5],
                ..Default::default()
            }],
            node: vec![
                mean,
                node("Flatten", &["mean"], "flat"),
                node("MatMul", &["flat", "weight"], "logits"),
            ],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fuzz_target!(|data: &[u8]| {
    // Entries are `key index, value length, value`.
    let mut metadata = Vec::new();
    let mut rest = data;
    while let Some(([index, len], tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(*len).min(tail.len());
        metadata.push(pb::StringStringEntryProto {
            key: KEYS[usize::from(*index) % KEYS.len()].into(),
            value: String::from_utf8_lossy(&tail[..len]).into_owned(),
        });
        rest = &tail[len..];
    }
    let Ok(model) = Model::from_bytes(&model(metadata), &ModelOptions::default()) else {
        return;
    };
    let preprocess = &model.preprocess;
    if preprocess.image_size > 512 {
        return;
    }
    let mut classifier = Classifier::new(model, 3).expect("a loaded model takes a classifier");
    let pixels = [90u8; 6 * 5 * 3];
    let frame = FrameRef::packed(&pixels, 6, 5, PixelFormat::Rgb8);
    classifier
        .classify_frame(&frame)
        .expect("a frame classifies");
});
