//! Where [`DenseConv`] replaces tract's `Conv` in a typed model.

use super::{DenseConv, Geometry, Layout};
use crate::ops::Isa;
use crate::ops::patterns::{constant_operand, nodes_with_op, replace_nodes, residual_after};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// Replace each f32 `Conv` of a typed model that [`DenseConv`] computes (NCHW, one
/// group, no dilation, 2-D, a constant kernel and bias, a concrete input shape) by it, with the
/// residual Add and the ReLU after it (each the only use of the one before); returns how many
/// were replaced.
pub fn fuse_conv(model: &mut TypedModel, isa: Isa) -> TractResult<usize> {
    let mut fused = 0;
    for node in nodes_with_op::<Conv>(model) {
        let Some(op) = dense_conv(model, node, isa)? else {
            continue;
        };
        let (residual, last) = match residual_after(model, node)? {
            Some((residual, add)) => (Some(residual), add),
            None => (None, node),
        };
        let relu = model.single_succ(last)?.filter(|next| is_relu(model, next));
        let op = DenseConv {
            residual: residual.is_some(),
            relu: relu.is_some(),
            ..op
        };
        let last = relu.map_or(last, |relu| relu.id);
        let name = model.node(node).name.clone();
        let inputs: TVec<OutletId> = std::iter::once(model.node(node).inputs[0])
            .chain(residual)
            .collect();
        replace_nodes(model, "a dense convolution", &name, op, &inputs, last)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
        pass_channels_last(model)?;
    }
    Ok(fused)
}

/// Each [`DenseConv`] whose output only [`DenseConv`]s read (as their input or their residual)
/// hands it over channels last, so neither side changes its layout.
fn pass_channels_last(model: &mut TypedModel) -> TractResult<()> {
    let outputs = model.output_outlets()?.to_vec();
    for node in nodes_with_op::<DenseConv>(model) {
        let outlet = OutletId::new(node, 0);
        let readers = model.node(node).outputs[0].successors.clone();
        let all_convs = readers
            .iter()
            .all(|reader| model.node(reader.node).op_is::<DenseConv>());
        if readers.is_empty() || !all_convs || outputs.contains(&outlet) {
            continue;
        }
        for reader in readers {
            let node = model.node_mut(reader.node);
            let mut op = node.op_as::<DenseConv>().expect("a DenseConv").clone();
            op.layouts[reader.slot] = Layout::ChannelsLast;
            node.op = Box::new(op);
        }
        let mut op = model
            .node(node)
            .op_as::<DenseConv>()
            .expect("a DenseConv")
            .clone();
        op.layouts[2] = Layout::ChannelsLast;
        let images = model.outlet_fact(outlet)?.shape[0].to_usize()?;
        let fact = f32::fact(&*op.output_shape(images));
        model.node_mut(node).op = Box::new(op);
        model.set_outlet_fact(outlet, fact)?;
    }
    Ok(())
}

/// The operator for the `Conv` at `node`, if it is one [`DenseConv`] computes.
fn dense_conv(model: &TypedModel, node: usize, isa: Isa) -> TractResult<Option<DenseConv>> {
    let conv = model.node(node);
    let op = conv.op_as::<Conv>().expect("a Conv node");
    let spec = &op.pool_spec;
    let plain = op.q_params.is_none()
        && op.group == 1
        && op.kernel_fmt == KernelFormat::OIHW
        && spec.data_format == DataFormat::NCHW
        && spec.rank() == 2
        && spec.dilations().iter().all(|&d| d == 1)
        && conv.inputs.len() == 3;
    if !plain {
        return Ok(None);
    }
    let input = model.outlet_fact(conv.inputs[0])?;
    let Some(shape) = input.shape.as_concrete() else {
        return Ok(None);
    };
    let kernel = model.outlet_fact(conv.inputs[1])?.konst.clone();
    let bias = model.outlet_fact(conv.inputs[2])?.konst.clone();
    let (Some(kernel), Some(bias)) = (kernel, bias) else {
        return Ok(None);
    };
    if input.datum_type != f32::datum_type()
        || kernel.datum_type() != f32::datum_type()
        || bias.datum_type() != f32::datum_type()
        || shape.len() != 4
    {
        return Ok(None);
    }
    let padding = spec.computed_padding(&shape[2..]);
    let strides = spec.strides();
    let geometry = Geometry {
        channels: shape[1],
        input: [shape[2], shape[3]],
        kernel: [spec.kernel_shape[0], spec.kernel_shape[1]],
        strides: [strides[0], strides[1]],
        pad_before: [padding[0].pad_before, padding[1].pad_before],
        pad_after: [padding[0].pad_after, padding[1].pad_after],
    };
    let output_channels = spec.output_channels;
    if !geometry.is_valid() {
        return Ok(None);
    }
    if kernel.shape()
        != [
            output_channels,
            geometry.channels,
            geometry.kernel[0],
            geometry.kernel[1],
        ]
        || geometry.output() != [padding[0].convoluted, padding[1].convoluted]
    {
        return Ok(None);
    }
    let kernel = kernel.try_as_plain_ram()?;
    let bias_ram = bias.try_as_plain_ram()?;
    let bias_values = bias_ram.as_slice::<f32>()?;
    // tract gives a convolution without a bias a scalar zero.
    let bias = match bias_values.len() {
        n if n == output_channels => Some(bias_values),
        1 if bias_values[0] == 0.0 => None,
        _ => return Ok(None),
    };
    DenseConv::new(isa, geometry, kernel.as_slice::<f32>()?, bias).map(Some)
}

/// Whether `node` is an f32 ReLU: the Max of a value and a constant zero, the value's shape.
fn is_relu(model: &TypedModel, node: &TypedNode) -> bool {
    let Ok(Some((value, zero))) = constant_operand(model, node, "Max") else {
        return false;
    };
    let is_zero = zero.datum_type() == f32::datum_type()
        && zero.len() == 1
        && zero
            .try_as_plain_ram()
            .is_ok_and(|z| z.as_slice::<f32>().is_ok_and(|z| z[0] == 0.0));
    let shapes = [value, OutletId::new(node.id, 0)].map(|o| model.outlet_fact(o).map(|f| &f.shape));
    is_zero && matches!(shapes, [Ok(a), Ok(b)] if a == b)
}
