//! Checks of a model before tract sees it (its wiring, its axis attributes, its input shape),
//! and parsing of the metadata values: bad input becomes a [`ModelError`], never a panic.

//! Loading an ONNX classifier into tract: metadata (or flags) → preprocessing and labels,
//! input fixed to `[1, C, H, W]`, optimised once.

use super::ModelError;
use std::collections::BTreeMap;
use tract_onnx::prelude::{DatumType, InferenceFact};
use tract_onnx::tract_hir::infer::Factoid;

/// Most axes a tensor of a model has; ONNX sets no limit, real graphs stay below 8.
const MAX_RANK: u64 = 64;

/// What tract-onnx asserts on rather than checks: the graph has outputs, every value a node or
/// an output reads is a graph input, an initializer or some node's output, and axis attributes
/// are within any tensor's rank.
pub(super) fn check_wiring(graph: &tract_onnx::pb::GraphProto) -> Result<(), ModelError> {
    if graph.output.is_empty() {
        return Err(ModelError::Malformed("the graph has no outputs".into()));
    }
    let known: std::collections::HashSet<&str> = graph
        .input
        .iter()
        .map(|input| input.name.as_str())
        .chain(graph.initializer.iter().map(|init| init.name.as_str()))
        .chain(
            graph
                .node
                .iter()
                .flat_map(|node| node.output.iter().map(String::as_str)),
        )
        .collect();
    for output in &graph.output {
        if !known.contains(output.name.as_str()) {
            return Err(ModelError::Malformed(format!(
                "the graph output {:?} is not produced by any node",
                output.name
            )));
        }
    }
    for node in &graph.node {
        // tract's shape rules walk axis ranges: an axis of -68719476737 (a fuzzed file) kept
        // one busy for minutes. No tensor has more than MAX_RANK axes.
        let out_of_range = node
            .attribute
            .iter()
            .filter(|a| a.name == "axis" || a.name == "axes")
            .flat_map(|a| std::iter::once(a.i).chain(a.ints.iter().copied()))
            .find(|axis| axis.unsigned_abs() > MAX_RANK);
        if let Some(axis) = out_of_range {
            return Err(ModelError::Malformed(format!(
                "node {:?} ({}) names axis {axis}, beyond any tensor's rank",
                node.name, node.op_type
            )));
        }
        if let Some(input) = node
            .input
            .iter()
            .find(|input| !input.is_empty() && !known.contains(input.as_str()))
        {
            return Err(ModelError::Malformed(format!(
                "node {:?} ({}) reads {input:?}, which nothing produces",
                node.name, node.op_type
            )));
        }
    }
    Ok(())
}

/// The input's 4 dimensions where they are fixed numbers (`None` for symbols like `batch`).
pub(super) fn declared_shape(fact: &InferenceFact) -> Result<[Option<u32>; 4], ModelError> {
    if let Some(dt) = fact.datum_type.concretize()
        && dt != DatumType::F32
    {
        return Err(ModelError::NotAnImage(format!(
            "input type is {dt:?}, not f32"
        )));
    }
    let Some(rank) = fact.shape.rank().concretize() else {
        return Ok([None; 4]);
    };
    if rank != 4 {
        return Err(ModelError::NotAnImage(format!("input has rank {rank}")));
    }
    let mut dims = [None; 4];
    for (axis, dim) in fact.shape.dims().enumerate() {
        dims[axis] = dim
            .concretize()
            .and_then(|d| d.to_i64().ok())
            .and_then(|d| u32::try_from(d).ok());
    }
    Ok(dims)
}

pub(super) fn parse<T: std::str::FromStr>(
    metadata: &BTreeMap<String, String>,
    name: &'static str,
) -> Result<Option<T>, ModelError>
where
    T::Err: std::fmt::Display,
{
    metadata
        .get(name)
        .map(|text| {
            text.trim()
                .parse()
                .map_err(|e: T::Err| ModelError::BadMetadata {
                    key: name,
                    reason: e.to_string(),
                })
        })
        .transpose()
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    metadata: &BTreeMap<String, String>,
    name: &'static str,
) -> Result<Option<T>, ModelError> {
    metadata
        .get(name)
        .map(|text| {
            serde_json::from_str(text).map_err(|e| ModelError::BadMetadata {
                key: name,
                reason: e.to_string(),
            })
        })
        .transpose()
}
