//! Finding attention cores in a decluttered graph and putting [`TokenMajorAttention`] in their
//! place.

use super::{Bias, TokenMajorAttention, kernel};
use crate::ops::Isa;
use crate::ops::patterns::{constant_operand, is_bin, nodes_with_op};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

/// One attention core found in a decluttered graph: where q, k and v come from, and the unit
/// axes to drop from each to make it `[tokens, heads, d]`.
struct Core {
    operands: [(OutletId, Vec<usize>); 3],
    scale: f32,
    bias: Option<Bias>,
    context: usize,
    /// Unit axes of the context's output in neither input, to put back on the result.
    context_unit_axes: Vec<usize>,
}

/// Replace each f32 attention core of a decluttered model by [`TokenMajorAttention`]; returns
/// how many were replaced.
///
/// The shape matched is `EinSum(mbk,nbk->bmn)` → optional `Mul` by a constant scalar →
/// optional `Add` of a constant (a Swin's relative position bias and shift mask) →
/// `Softmax` over the last axis → `EinSum(bmk,kbn->mbn)`, or the same with an axis of windows
/// in front of every operand, each intermediate used once (an
/// exported attention map keeps its softmax, and its core, unfused). That is how tract-onnx
/// reads the exporter's graph, and torch's once its transposes are folded, except that torch's
/// q, k and v are `[tokens, 1, heads, d]` slices of the fused QKV output: unit axes summed away
/// are dropped before matching, and removed from the operands.
pub fn fuse_attention(model: &mut TypedModel, isa: Isa) -> TractResult<usize> {
    let softmaxes = nodes_with_op::<Softmax>(model);
    let mut fused = 0;
    for softmax in softmaxes {
        let Some(core) = match_core(model, softmax)? else {
            continue;
        };
        let name = model.node(core.context).name.clone();
        let mut patch = TypedModelPatch::new(format!("fuse attention into {name}"));
        let mut inputs = TVec::new();
        for (which, (outlet, unit_axes)) in ["q", "k", "v"].iter().zip(&core.operands) {
            let mut wire = patch.tap_model(model, *outlet)?;
            for &axis in unit_axes.iter().rev() {
                let op = AxisOp::Rm(axis);
                wire = patch.wire_node(format!("{name}.{which}.rm{axis}"), op, &[wire])?[0];
            }
            inputs.push(wire);
        }
        let op = TokenMajorAttention {
            scale: core.scale,
            isa: kernel(isa),
            bias: core.bias,
        };
        let mut wire = patch.wire_node(&name, op, &inputs)?[0];
        for &axis in &core.context_unit_axes {
            let op = AxisOp::Add(axis);
            wire = patch.wire_node(format!("{name}.add{axis}"), op, &[wire])?[0];
        }
        patch.shunt_outside(model, core.context.into(), wire)?;
        patch.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

fn match_core(model: &TypedModel, softmax: usize) -> TractResult<Option<Core>> {
    let node = model.node(softmax);
    let op = node.op_as::<Softmax>().unwrap();
    let fact = &node.outputs[0].fact;
    let rank = fact.rank();
    if op.kind != SoftmaxKind::Softmax
        || op.quant_output_dt.is_some()
        || fact.datum_type != f32::datum_type()
        || !(rank == 3 || rank == 4)
        || op.axes.as_slice() != [rank - 1]
    {
        return Ok(None);
    }
    // The forms of the two products, with or without a leading windows axis.
    let (scores_form, context_form) = match rank {
        3 => ("abc,dbc->bad", "abc,cad->bad"),
        _ => ("abcd,aecd->acbe", "abcd,adbe->acbe"),
    };
    let Some(context) = model.single_succ(softmax)? else {
        return Ok(None);
    };
    let Some(([_, v_axes], context_unit_axes, form)) = einsum_form(model, context)? else {
        return Ok(None);
    };
    if form != context_form || context.inputs[0] != softmax.into() {
        return Ok(None);
    }
    let (mut scores, mut scale, mut bias) = (model.node(node.inputs[0].node), 1.0, None);
    if is_bin(scores, "Add") && scores.outputs[0].successors.len() == 1 {
        let Some((biased, value)) = constant_operand(model, scores, "Add")? else {
            return Ok(None);
        };
        let Some(found) = bias_of(&value, fact)? else {
            return Ok(None);
        };
        bias = Some(found);
        scores = model.node(biased.node);
    }
    if is_bin(scores, "Mul") && scores.outputs[0].successors.len() == 1 {
        let Some((product, value)) = constant_operand(model, scores, "Mul")? else {
            return Ok(None);
        };
        if value.len() != 1 || value.datum_type() != f32::datum_type() {
            return Ok(None);
        }
        scale = value.cast_to_scalar::<f32>()?;
        scores = model.node(product.node);
    }
    let Some(([q_axes, k_axes], scores_unit_axes, form)) = einsum_form(model, scores)? else {
        return Ok(None);
    };
    let single_use = scores.outputs[0].successors.len() == 1;
    if form != scores_form || !scores_unit_axes.is_empty() || !single_use {
        return Ok(None);
    }
    Ok(Some(Core {
        operands: [
            (scores.inputs[0], q_axes),
            (scores.inputs[1], k_axes),
            (context.inputs[1], v_axes),
        ],
        scale,
        bias,
        context: context.id,
        context_unit_axes,
    }))
}

/// `value` as a [`Bias`] of scores shaped as `scores` (`[windows,] heads, queries, keys`): its
/// last three axes those of the scores, the ones before them 1 or the windows.
fn bias_of(value: &Tensor, scores: &TypedFact) -> TractResult<Option<Bias>> {
    let Some(shape) = scores.shape.as_concrete() else {
        return Ok(None);
    };
    let (rank, dims) = (shape.len(), value.shape());
    if value.datum_type() != f32::datum_type() || dims.len() < 3 {
        return Ok(None);
    }
    let windows = if rank == 4 { shape[0] } else { 1 };
    let leading: usize = dims[..dims.len() - 3].iter().product();
    if dims[dims.len() - 3..] != shape[rank - 3..] || !(leading == 1 || leading == windows) {
        return Ok(None);
    }
    let values = value
        .to_plain_array_view::<f32>()?
        .iter()
        .copied()
        .collect();
    Ok(Some(Bias {
        values: Arc::new(values),
        windows: leading,
    }))
}

/// An EinSum as [`einsum_form`] reads it: the unit axes dropped from each input and from the
/// output, and the form.
type EinsumForm = ([Vec<usize>; 2], Vec<usize>, String);

/// How a plain f32 EinSum of two inputs reads once the unit axes that are summed away (in
/// neither the other input nor the output) and the output's unit axes in neither input are
/// dropped, relabelled in order of first appearance (so `mbk,nbk->bmn` and `mdbk,ncbk->bmn`
/// with `d` and `c` of size 1 both read `abc,dbc->bad`); with the positions dropped from each
/// input and from the output.
pub(super) fn einsum_form(model: &TypedModel, node: &TypedNode) -> TractResult<Option<EinsumForm>> {
    let Some(einsum) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if einsum.q_params.is_some()
        || einsum.operating_dt != f32::datum_type()
        || node.inputs.len() != 2
    {
        return Ok(None);
    }
    let (inputs, outputs) = einsum.axes.to_strs();
    let mut dropped = [Vec::new(), Vec::new()];
    let mut kept = Vec::new();
    for (i, axes) in inputs.iter().enumerate() {
        let shape = &model.outlet_fact(node.inputs[i])?.shape;
        let mut chars = String::new();
        for (position, axis) in axes.chars().enumerate() {
            let elsewhere = inputs[1 - i].contains(axis) || outputs[0].contains(axis);
            if !elsewhere && shape[position] == TDim::from(1) {
                dropped[i].push(position);
            } else {
                chars.push(axis);
            }
        }
        kept.push(chars);
    }
    let output_shape = &node.outputs[0].fact.shape;
    let mut output_dropped = Vec::new();
    let mut output = String::new();
    for (position, axis) in outputs[0].chars().enumerate() {
        let in_inputs = inputs.iter().any(|input| input.contains(axis));
        if !in_inputs && output_shape[position] == TDim::from(1) {
            output_dropped.push(position);
        } else {
            output.push(axis);
        }
    }
    let mut labels: Vec<char> = Vec::new();
    let form = format!("{},{}->{output}", kept[0], kept[1])
        .chars()
        .map(|c| {
            if !c.is_alphabetic() {
                return c;
            }
            let index = labels.iter().position(|&l| l == c).unwrap_or_else(|| {
                labels.push(c);
                labels.len() - 1
            });
            (b'a' + index as u8) as char
        })
        .collect();
    Ok(Some((dropped, output_dropped, form)))
}
