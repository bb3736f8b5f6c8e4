//! A small builder over the ONNX protobuf types (`tract_onnx::pb`, prost-generated): named
//! initializers, nodes with attributes, and the model wrapper.

use runtime::tract_onnx::pb::{
    self, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::Dimension,
    tensor_shape_proto::dimension, type_proto,
};

/// One attribute value of a node.
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
}

#[derive(Default)]
pub struct GraphBuilder {
    graph: GraphProto,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            graph: GraphProto {
                name: name.into(),
                ..Default::default()
            },
        }
    }

    /// A float initializer (weights live here, not in Constant nodes).
    /// A graph whose input is `pixel_values`, `[batch, channels, side, side]` f32.
    pub fn with_image_input(name: &str, channels: usize, side: usize) -> Self {
        let mut graph = GraphBuilder::new(name);
        let dims = [
            Dim::Symbol("batch"),
            Dim::Fixed(channels),
            Dim::Fixed(side),
            Dim::Fixed(side),
        ];
        graph.input("pixel_values", &dims);
        graph
    }

    pub fn weight(&mut self, name: &str, dims: &[usize], values: Vec<f32>) -> String {
        assert_eq!(
            dims.iter().product::<usize>(),
            values.len(),
            "initializer {name} has the wrong length"
        );
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.graph.initializer.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data,
            ..Default::default()
        });
        name.into()
    }

    /// An int64 initializer (shapes, axes, indices); `dims` empty makes a scalar.
    pub fn ints(&mut self, name: &str, dims: &[usize], values: Vec<i64>) -> String {
        self.graph.initializer.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Int64 as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    /// Add a node named `name` whose single output is also called `name`.
    pub fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
    ) -> String {
        self.node_multi(op, name, inputs, &[name], attrs);
        name.into()
    }

    pub fn node_multi(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<(&str, Attr)>,
    ) {
        let attribute = attrs
            .into_iter()
            .map(|(key, value)| {
                let mut attr = AttributeProto {
                    name: key.into(),
                    ..Default::default()
                };
                match value {
                    Attr::Int(i) => (attr.i, attr.r#type) = (i, AttributeType::Int as i32),
                    Attr::Float(f) => (attr.f, attr.r#type) = (f, AttributeType::Float as i32),
                    Attr::Ints(v) => (attr.ints, attr.r#type) = (v, AttributeType::Ints as i32),
                }
                attr
            })
            .collect();
        self.graph.node.push(NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute,
            ..Default::default()
        });
    }

    pub fn input(&mut self, name: &str, dims: &[Dim]) {
        self.graph.input.push(value_info(name, dims));
    }

    pub fn output(&mut self, name: &str, dims: &[Dim]) {
        self.graph.output.push(value_info(name, dims));
    }

    pub fn finish(
        self,
        opset: i64,
        producer_version: &str,
        metadata: Vec<(String, String)>,
    ) -> ModelProto {
        ModelProto {
            // IR 8 is what opset 17–20 files carry; readers of newer IRs accept it.
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            producer_name: "edge-vit exporter".into(),
            producer_version: producer_version.into(),
            graph: Some(self.graph),
            metadata_props: metadata
                .into_iter()
                .map(|(key, value)| StringStringEntryProto { key, value })
                .collect(),
            ..Default::default()
        }
    }
}

/// A dimension of a graph input or output.
pub enum Dim {
    Fixed(usize),
    Symbol(&'static str),
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
                Dim::Symbol(s) => dimension::Value::DimParam(s.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Encode a model to protobuf bytes.
pub fn encode(model: &ModelProto) -> Vec<u8> {
    prost::Message::encode_to_vec(model)
}

/// Decode protobuf bytes (used by `inspect`).
pub fn decode(bytes: &[u8]) -> Result<pb::ModelProto, prost::DecodeError> {
    prost::Message::decode(bytes)
}
