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

/// The Add node that is `node`'s only use and its other operand, if the sum keeps `node`'s
/// shape.
pub(crate) fn add_after(model: &TypedModel, node: usize) -> TractResult<Option<(usize, OutletId)>> {
    let Some(add) = model.single_succ(node)? else {
        return Ok(None);
    };
    let same_shape = add.outputs[0].fact.shape == model.node(node).outputs[0].fact.shape;
    let other = add.inputs.iter().copied().find(|i| i.node != node);
    match other {
        Some(other) if is_bin(add, "Add") && same_shape => Ok(Some((add.id, other))),
        _ => Ok(None),
    }
}

/// The other operand and the Add node if `node`'s only use is being added to a computed f32
/// tensor of its own shape.
pub(crate) fn residual_after(
    model: &TypedModel,
    node: usize,
) -> TractResult<Option<(OutletId, usize)>> {
    let Some((add, other)) = add_after(model, node)? else {
        return Ok(None);
    };
    let other_fact = model.outlet_fact(other)?;
    let same = other_fact.shape == model.node(node).outputs[0].fact.shape;
    if !same || other_fact.konst.is_some() || other_fact.datum_type != f32::datum_type() {
        return Ok(None);
    }
    Ok(Some((other, add)))
}

/// Put `op`, computed from `inputs`, in place of the nodes up to `last` (whose output it
/// takes over), named `name`; `what` says what they were fused into.
pub(crate) fn replace_nodes(
    model: &mut TypedModel,
    what: &str,
    name: &str,
    op: impl Into<Box<dyn TypedOp>>,
    inputs: &[OutletId],
    last: usize,
) -> TractResult<()> {
    let mut patch = TypedModelPatch::new(format!("fuse {name} into {what}"));
    let inputs = inputs
        .iter()
        .map(|&input| patch.tap_model(model, input))
        .collect::<TractResult<TVec<_>>>()?;
    let wire = patch.wire_node(name, op, &inputs)?[0];
    patch.shunt_outside(model, last.into(), wire)?;
    patch.apply(model)
}
