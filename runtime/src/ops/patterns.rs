//! What the fusions read in a decluttered graph, shared by the operators' matchers.

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;

/// The ids of the nodes whose operator is an `O`, in the model's order: where a fusion looks.
pub(crate) fn nodes_with_op<O: Op>(model: &TypedModel) -> Vec<usize> {
    model
        .nodes()
        .iter()
        .filter(|node| node.op_is::<O>())
        .map(|node| node.id)
        .collect()
}

/// Whether `node` is the binary operator `name` (Add, Mul, Sub…) of two inputs.
pub(crate) fn is_bin(node: &TypedNode, name: &str) -> bool {
    node.op_as::<TypedBinOp>()
        .is_some_and(|bin| bin.0.name() == name)
        && node.inputs.len() == 2
}

/// The computed operand and the constant one of `node`, if it is the binary `name` of a
/// computed value and a constant.
pub(crate) fn constant_operand(
    model: &TypedModel,
    node: &TypedNode,
    name: &str,
) -> TractResult<Option<(OutletId, Arc<Tensor>)>> {
    if !is_bin(node, name) {
        return Ok(None);
    }
    let facts = [
        model.outlet_fact(node.inputs[0])?,
        model.outlet_fact(node.inputs[1])?,
    ];
    Ok(match (&facts[0].konst, &facts[1].konst) {
        (None, Some(constant)) => Some((node.inputs[0], constant.clone())),
        (Some(constant), None) => Some((node.inputs[1], constant.clone())),
        _ => None,
    })
}

/// Where `outlet`'s value comes from once the unit axes added in front of it (tract's
/// `AxisOp::Add`, which declutter puts in to match ranks) are looked through.
pub(crate) fn through_unit_axes(model: &TypedModel, mut outlet: OutletId) -> OutletId {
    loop {
        let node = model.node(outlet.node);
        match node.op_as::<AxisOp>() {
            Some(AxisOp::Add(_)) => outlet = node.inputs[0],
            _ => return outlet,
        }
    }
}
