//! Checks of a model before tract sees it (its wiring, its axis and window attributes, its
//! input shape), and parsing of the metadata values: bad input becomes a [`ModelError`], never
//! a panic.

use super::{ModelError, tract};
use std::collections::BTreeMap;
use tract_onnx::prelude::{DatumType, InferenceFact, InferenceModel, OutletId, TVec, TractResult};
use tract_onnx::tract_hir::infer::Factoid;

/// Most axes a tensor of a model has; ONNX sets no limit, real graphs stay below 8.
const MAX_RANK: u64 = 64;

/// Largest kernel side, stride, dilation or padding a window attribute may hold: far beyond any
/// image side this runtime takes (16 384), and small enough that tract's shape arithmetic on
/// it cannot overflow.
const MAX_WINDOW: i64 = 1 << 20;

/// What tract-onnx asserts on rather than checks: the graph has outputs, every value a node or
/// an output reads is a graph input, an initializer or some node's output, axis attributes
/// are within any tensor's rank, and convolution and pooling windows are consistent.
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
        check_window(node, graph)?;
        check_permutation(node)?;
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

/// The attribute `name` of `node`, if it has one.
fn attribute<'a>(
    node: &'a tract_onnx::pb::NodeProto,
    name: &str,
) -> Option<&'a tract_onnx::pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// A Transpose's `perm` names each axis once: tract reads the input's dimension at every entry
/// (a fuzzed `[0, 5, 1, 3]` indexed past a rank-4 shape).
fn check_permutation(node: &tract_onnx::pb::NodeProto) -> Result<(), ModelError> {
    let Some(perm) = attribute(node, "perm") else {
        return Ok(());
    };
    let mut seen = vec![false; perm.ints.len()];
    for &axis in &perm.ints {
        match usize::try_from(axis)
            .ok()
            .and_then(|axis| seen.get_mut(axis))
        {
            Some(seen) if !*seen => *seen = true,
            _ => {
                return Err(ModelError::Malformed(format!(
                    "node {:?} ({}): perm {:?} is not an order of its {} axes",
                    node.name,
                    node.op_type,
                    perm.ints,
                    perm.ints.len()
                )));
            }
        }
    }
    Ok(())
}

/// The operators that slide a window over their input's spatial axes.
const WINDOWED_OPS: [&str; 8] = [
    "Conv",
    "ConvInteger",
    "QLinearConv",
    "ConvTranspose",
    "MaxPool",
    "AveragePool",
    "LpPool",
    "MaxUnpool",
];

/// A convolution's or pooling's window attributes: tract indexes `strides`, `dilations` and
/// both halves of `pads` by spatial axis, so each must have one entry per spatial axis (a
/// fuzzed `pads` of 3 entries on a 2-D convolution panicked), with values ONNX allows.
fn check_window(
    node: &tract_onnx::pb::NodeProto,
    graph: &tract_onnx::pb::GraphProto,
) -> Result<(), ModelError> {
    if !WINDOWED_OPS.contains(&node.op_type.as_str()) {
        return Ok(());
    }
    // Where the weight is, for the operators whose window comes from it.
    let weight_input = match node.op_type.as_str() {
        "Conv" | "ConvInteger" | "ConvTranspose" => Some(1),
        "QLinearConv" => Some(3),
        _ => None,
    };
    let malformed = |what: String| {
        ModelError::Malformed(format!("node {:?} ({}): {what}", node.name, node.op_type))
    };
    let ints = |name: &str| attribute(node, name).map(|a| a.ints.as_slice());
    let weight_rank = weight_input
        .and_then(|i| node.input.get(i))
        .and_then(|name| graph.initializer.iter().find(|init| &init.name == name))
        .map(|init| init.dims.len());
    // One entry per spatial axis (two for `pads`): the kernel's shape or the weight's rank
    // says how many axes, else the first of these attributes does.
    let mut axes = match (ints("kernel_shape"), weight_rank) {
        (Some(kernel), _) => Some(kernel.len()),
        (None, Some(rank)) => Some(rank.saturating_sub(2)),
        (None, None) => None,
    };
    for (name, per_axis, least) in [
        ("kernel_shape", 1, 1),
        ("strides", 1, 1),
        ("dilations", 1, 1),
        ("pads", 2, 0),
        ("output_padding", 1, 0),
    ] {
        let Some(values) = ints(name) else { continue };
        let expected = *axes.get_or_insert(values.len() / per_axis) * per_axis;
        if values.len() != expected {
            return Err(malformed(format!(
                "{name} has {} values where its {} spatial axes need {expected}",
                values.len(),
                expected / per_axis
            )));
        }
        if let Some(value) = values.iter().find(|v| !(least..=MAX_WINDOW).contains(*v)) {
            return Err(malformed(format!(
                "{name} holds {value}, outside {least}..={MAX_WINDOW}"
            )));
        }
    }
    if let Some(group) = attribute(node, "group")
        && group.i < 1
    {
        return Err(malformed(format!("group is {}", group.i)));
    }
    Ok(())
}

/// With the input fixed to `[1, C, H, W]`, every dimension is a number. One that comes out as
/// an expression of numbers, `broadcast(28, 26)`, means the graph's shapes disagree: a fuzzed CNN
/// without its padding added 28 pixels to 26. tract carries such a dimension on, and the
/// expression doubles at every residual block (12 blocks took 37 s to load). So one pass along
/// the graph, before tract's own analysis, stops at the first node that makes one.
///
/// The same pass compares each pooling or convolution window with its input's rank, which the
/// ONNX attributes alone do not give: tract indexes the window by the input's spatial axes.
pub(super) fn check_shapes_agree(
    model: &mut InferenceModel,
    graph: &tract_onnx::pb::GraphProto,
) -> Result<(), ModelError> {
    // Window sides by the name of the node's first output, which tract keeps as its label.
    let windows: std::collections::HashMap<&str, usize> = graph
        .node
        .iter()
        .filter(|node| WINDOWED_OPS.contains(&node.op_type.as_str()))
        .filter_map(|node| {
            let kernel = attribute(node, "kernel_shape")?;
            Some((node.output.first()?.as_str(), kernel.ints.len()))
        })
        .collect();
    for id in model.eval_order().map_err(tract)? {
        let node = model.node(id);
        let window = model
            .outlet_label(OutletId::new(id, 0))
            .and_then(|label| windows.get(label));
        let input_rank = node
            .inputs
            .first()
            .and_then(|input| model.outlet_fact(*input).ok())
            .and_then(|fact| fact.shape.rank().concretize());
        if let (Some(&sides), Some(rank)) = (window, input_rank)
            && rank != sides as i64 + 2
        {
            return Err(ModelError::Mismatch(format!(
                "node {:?} ({}) has a window of {sides} axes over an input of {rank}",
                node.name,
                node.op.name()
            )));
        }
        // A node this pass cannot infer yet is left to tract's analysis, which goes both ways.
        let Ok(outputs) = infer_outputs(model, id) else {
            continue;
        };
        for (slot, fact) in outputs.into_iter().enumerate() {
            let disagreeing = fact
                .shape
                .dims()
                .filter_map(|dim| dim.concretize())
                .find(|dim| dim.to_i64().is_err() && dim.symbols().is_empty());
            if let Some(dim) = disagreeing {
                let node = model.node(id);
                return Err(ModelError::Mismatch(format!(
                    "node {:?} ({}) makes a dimension of {dim}: its inputs' shapes disagree",
                    node.name,
                    node.op.name()
                )));
            }
            model
                .set_outlet_fact(OutletId::new(id, slot), fact)
                .map_err(tract)?;
        }
    }
    Ok(())
}

/// The facts of node `id`'s outputs given its inputs', as one step of tract's analysis makes them.
fn infer_outputs(model: &mut InferenceModel, id: usize) -> TractResult<TVec<InferenceFact>> {
    let (inputs, outputs) = model.node_facts(id)?;
    let inputs: TVec<InferenceFact> = inputs.into_iter().cloned().collect();
    let outputs: TVec<InferenceFact> = outputs.into_iter().cloned().collect();
    let node = model.node(id);
    let observed = node
        .op
        .observe_outlets(model, node)?
        .iter()
        .map(|outlet| model.outlet_fact(*outlet).cloned())
        .collect::<TractResult<TVec<_>>>()?;
    let (_, inferred, _) = model.node_mut(id).op.infer(
        inputs.iter().collect(),
        outputs.iter().collect(),
        observed.iter().collect(),
    )?;
    outputs
        .iter()
        .zip(&inferred)
        .map(|(old, new)| old.unify(new))
        .collect()
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
