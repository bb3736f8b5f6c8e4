//! `exporter inspect`: inputs, outputs, op histogram, parameter count and metadata of an ONNX
//! file.

use super::{float_values, op_histogram};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// What `exporter inspect` prints about an ONNX file.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub producer: String,
    pub opset: Vec<(String, i64)>,
    pub inputs: Vec<(String, Vec<String>)>,
    pub outputs: Vec<(String, Vec<String>)>,
    pub parameters: usize,
    pub op_histogram: BTreeMap<String, usize>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot read {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path} is not an ONNX model ({reason})")]
    NotOnnx { path: String, reason: String },
}

pub fn inspect(path: &Path) -> Result<Inspection, InspectError> {
    let bytes = std::fs::read(path).map_err(|error| InspectError::Io {
        path: path.display().to_string(),
        error,
    })?;
    let not_onnx = |reason: String| InspectError::NotOnnx {
        path: path.display().to_string(),
        reason,
    };
    let model = crate::onnx_graph::decode(&bytes).map_err(|e| not_onnx(e.to_string()))?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| not_onnx("no graph".into()))?;
    if graph.node.is_empty() {
        return Err(not_onnx("the graph has no nodes".into()));
    }
    let shape = |info: &runtime::tract_onnx::pb::ValueInfoProto| -> (String, Vec<String>) {
        use runtime::tract_onnx::pb::{tensor_shape_proto::dimension::Value, type_proto};
        let dims = match info.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(type_proto::Value::TensorType(t)) => t
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(Value::DimValue(v)) => v.to_string(),
                            Some(Value::DimParam(p)) => p.clone(),
                            None => "?".into(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            _ => vec![],
        };
        (info.name.clone(), dims)
    };
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    Ok(Inspection {
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
        opset: model
            .opset_import
            .iter()
            .map(|o| (o.domain.clone(), o.version))
            .collect(),
        inputs: graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(shape)
            .collect(),
        outputs: graph.output.iter().map(shape).collect(),
        parameters: float_values(graph),
        op_histogram: op_histogram(graph),
        metadata: model
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect(),
    })
}
