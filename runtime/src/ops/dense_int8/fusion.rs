//! Finding the quantized products of a decluttered model, in the two standard forms:
//!
//! - dynamic, as `runtime quantize` and onnxruntime's `quantize_dynamic` write them:
//!   `DynamicQuantizeLinear(x) → MatMulInteger(·, W_q) → Cast → Mul(s_x · s_w)`, which tract
//!   declutters to a `DynamicQuantizeLinearU8`, an i32 EinSum, a Cast and the Mul by
//!   `Mul(s_x, s_w)`;
//! - QDQ, as onnxruntime's `quantize_static` writes them: a MatMul of `DequantizeLinear(·)`
//!   (x quantized upstream) by `DequantizeLinear(W_q)`, which tract folds into f32 constants.
//!
//! Either way the product becomes one [`DenseLinearInt8`] on x, with the bias Add, the GELU and
//! the residual Add after it (as [`fuse_dense`](crate::ops::dense::fuse_dense) takes them). The
//! file's own quantization of x (per tensor) gives way to the operator's, per row.

use super::DenseLinearInt8;
use crate::ops::Isa;
use crate::ops::dense::{Found, Linear, fuse_products, linear_form};
use crate::ops::patterns::{is_bin, through_unit_axes};
use crate::quantize::quantize_symmetric;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearI8, QuantizeLinearU8};

/// Replace each quantized product of a decluttered model (see the module) by
/// [`DenseLinearInt8`] on `isa`'s kernel; returns how many were replaced.
pub fn fuse_int8_dense(model: &mut TypedModel, isa: Isa) -> TractResult<usize> {
    let find = |model: &TypedModel, einsum: usize| match integer_product(model, einsum)? {
        Some(found) => Ok(Some(found)),
        None => qdq_product(model, einsum),
    };
    fuse_products(
        model,
        find,
        |weights: Int8Weights, bias, tail, output_shape| {
            let Linear {
                depth,
                width,
                transposed,
                ..
            } = weights.linear;
            let mut op = DenseLinearInt8::new(
                isa,
                &weights.values,
                transposed,
                &weights.scales,
                bias,
                depth,
                width,
                output_shape,
            )?;
            op.gelu = tail.gelu;
            op.residual = tail.residual.is_some();
            Ok(op)
        },
    )
}

/// The weights of a quantized product: the layer, W's int8 values as stored (`[depth, width]`,
/// or `[width, depth]` if transposed) and their scale per column.
struct Int8Weights {
    linear: Linear,
    values: Vec<i8>,
    scales: Vec<f32>,
}

/// `quantize(x) → EinSum (i32) → Cast (f32) → Mul(s_x · s_w)` at `einsum`, W symmetric (zero
/// points zero), where `quantize` is tract's `DynamicQuantizeLinearU8` (s_x its second output,
/// the factor `Mul(s_x, s_w)`) or a `QuantizeLinear` with a constant scale (the factor a
/// constant), as earlier `runtime quantize` files have it.
fn integer_product(model: &TypedModel, einsum: usize) -> TractResult<Option<Found<Int8Weights>>> {
    let node = model.node(einsum);
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    // Inputs: a, b, bias, a0, a_scale, b0, b_scale, c0, c_scale (tract's MatMulInteger).
    if op.q_params != Some(i32::datum_type()) || node.inputs.len() != 9 {
        return Ok(None);
    }
    let quantize = model.node(node.inputs[0].node);
    // tract's QuantizeLinear holds 1 / s_x.
    let static_inverse_scale = quantize.op_as::<ElementWiseOp>().and_then(|op| {
        match op.0.downcast_ref::<QuantizeLinearU8>() {
            Some(q) => Some(q.scale),
            None => op.0.downcast_ref::<QuantizeLinearI8>().map(|q| q.scale),
        }
    });
    let dynamic = quantize.op.name() == "DynamicQuantizeLinearU8";
    if !(dynamic || static_inverse_scale.is_some()) || node.inputs[0].slot != 0 {
        return Ok(None);
    }
    // The activations' zero point is the quantizer's; the other parameters are neutral.
    let zero_point_fits = if dynamic {
        node.inputs[3] == OutletId::new(quantize.id, 2)
    } else {
        model.outlet_fact(node.inputs[3])?.konst.is_some()
    };
    if !zero_point_fits {
        return Ok(None);
    }
    for (input, neutral) in [(2, 0.0), (4, 1.0), (5, 0.0), (6, 1.0), (7, 0.0), (8, 1.0)] {
        if !all_equal(model, node.inputs[input], neutral)? {
            return Ok(None);
        }
    }
    // Products that also reorder their rows stay f32.
    let in_order = |linear: &Linear| linear.reordered_rows.is_none();
    let Some(linear) = linear_form(model, einsum, i8::datum_type())?.filter(in_order) else {
        return Ok(None);
    };
    let Some(cast) = model.single_succ(einsum)? else {
        return Ok(None);
    };
    let to_f32 = cast
        .op_as::<Cast>()
        .is_some_and(|c| c.to == f32::datum_type());
    let Some(mul) = to_f32
        .then(|| model.single_succ(cast.id))
        .transpose()?
        .flatten()
    else {
        return Ok(None);
    };
    if !is_bin(mul, "Mul") || mul.outputs[0].fact.shape != cast.outputs[0].fact.shape {
        return Ok(None);
    }
    let Some(&factor) = mul.inputs.iter().find(|i| i.node != cast.id) else {
        return Ok(None);
    };
    let weight_scales = match static_inverse_scale {
        Some(inverse) => per_column(model, factor, linear.width)?
            .map(|factors| factors.iter().map(|f| f * inverse).collect()),
        None => {
            let scales = model.node(through_unit_axes(model, factor).node);
            let scale_of_x = OutletId::new(quantize.id, 1);
            let is_scale_of_x = |&&i: &&OutletId| through_unit_axes(model, i) == scale_of_x;
            let other = scales.inputs.iter().find(|i| !is_scale_of_x(i));
            match other {
                Some(&other)
                    if is_bin(scales, "Mul") && scales.inputs.iter().any(|i| is_scale_of_x(&i)) =>
                {
                    per_column(model, other, linear.width)?
                }
                _ => None,
            }
        }
    };
    let Some(scales) = weight_scales else {
        return Ok(None);
    };
    let values = linear.weight.try_as_plain_ram()?.as_slice::<i8>()?.to_vec();
    Ok(Some(Found {
        x: quantize.inputs[0],
        last: mul.id,
        width: linear.width,
        product: Int8Weights {
            linear,
            values,
            scales,
        },
    }))
}

/// Whether `outlet` is a constant whose every value is `value`.
fn all_equal(model: &TypedModel, outlet: OutletId, value: f32) -> TractResult<bool> {
    let Some(constant) = model.outlet_fact(outlet)?.konst.clone() else {
        return Ok(false);
    };
    let values = constant.cast_to::<f32>()?;
    Ok(values
        .try_as_plain_ram()?
        .as_slice::<f32>()?
        .iter()
        .all(|&v| v == value))
}

/// An f32 `x W` at `einsum` whose x comes out of a `DequantizeLinear` (after a QuantizeLinear,
/// or an operator tract ran on the quantized values): W is taken back to int8, one symmetric
/// scale per column (exactly the file's values when it stores them so), and x, already
/// rounded to the file's levels, is quantized again by row.
fn qdq_product(model: &TypedModel, einsum: usize) -> TractResult<Option<Found<Int8Weights>>> {
    let node = model.node(einsum);
    let dequantize = model.node(node.inputs[0].node);
    if !dequantize.op_is::<DequantizeLinearF32>() {
        return Ok(None);
    }
    // Straight after a QuantizeLinear the pair is read through: the operator quantizes anew.
    let quantize = model.node(dequantize.inputs[0].node);
    let x = match quantize.op_as::<ElementWiseOp>() {
        Some(op) if op.0.is::<QuantizeLinearU8>() || op.0.is::<QuantizeLinearI8>() => {
            quantize.inputs[0]
        }
        _ => node.inputs[0],
    };
    let in_order = |linear: &Linear| linear.reordered_rows.is_none();
    let Some(linear) = linear_form(model, einsum, f32::datum_type())?.filter(in_order) else {
        return Ok(None);
    };
    let values = linear.weight.try_as_plain_ram()?.as_slice::<f32>()?;
    let (dims, column_axis) = match linear.transposed {
        false => ([linear.depth, linear.width], 1),
        true => ([linear.width, linear.depth], 0),
    };
    let (values, scales) = quantize_symmetric(values, &dims, column_axis);
    Ok(Some(Found {
        x,
        last: einsum,
        width: linear.width,
        product: Int8Weights {
            linear,
            values,
            scales,
        },
    }))
}

/// A constant with one value per column (`[width]`, unit axes allowed) or one for all.
fn per_column(model: &TypedModel, outlet: OutletId, width: usize) -> TractResult<Option<Vec<f32>>> {
    let Some(values) = model.outlet_fact(outlet)?.konst.clone() else {
        return Ok(None);
    };
    if values.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    let values = values.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    Ok(match values.len() {
        1 => Some(vec![values[0]; width]),
        n if n == width => Some(values),
        _ => None,
    })
}
