//! The ONNX graph of a trained CNN: each convolution with its BatchNorm folded in (one Conv
//! with a bias), Relu, Add for the residuals, GlobalAveragePool, Flatten and a Gemm head.
//! No BatchNormalization node is left, so every runtime sees plain convolutions.

use super::onnx_graph::{Attr, Dim, GraphBuilder};
use super::{bias_of, values};
use crate::model::CnnConfig;
use crate::model::cnn::{ConvNorm, ResNet};

pub(super) fn build_graph(config: &CnnConfig, model: &ResNet) -> GraphBuilder {
    let (c, s) = (config.channels, config.image_size);
    let mut g = GraphBuilder::with_image_input("resnet", c, s);
    let stem = conv_norm(&mut g, "stem", "pixel_values", &model.stem);
    let mut x = g.node("Relu", "stem.relu", &[&stem], vec![]);
    for (i, block) in model.blocks.iter().enumerate() {
        let b = format!("blocks.{i}");
        let residual = match &block.shortcut {
            Some(shortcut) => conv_norm(&mut g, &format!("{b}.shortcut"), &x, shortcut),
            None => x.clone(),
        };
        let y = conv_norm(&mut g, &format!("{b}.first"), &x, &block.first);
        let y = g.node("Relu", &format!("{b}.first.relu"), &[&y], vec![]);
        let y = conv_norm(&mut g, &format!("{b}.second"), &y, &block.second);
        let y = g.node("Add", &format!("{b}.residual"), &[&y, &residual], vec![]);
        x = g.node("Relu", &format!("{b}.relu"), &[&y], vec![]);
    }
    let pooled = g.node("GlobalAveragePool", "pool", &[&x], vec![]);
    let pooled = g.node(
        "Flatten",
        "pool.flatten",
        &[&pooled],
        vec![("axis", Attr::Int(1))],
    );
    let [width, classes] = model.head.weight.dims();
    let head_w = g.weight(
        "head.weight",
        &[width, classes],
        values(model.head.weight.val()),
    );
    let head_b = g.weight("head.bias", &[classes], bias_of(&model.head, classes));
    g.node("Gemm", "logits", &[&pooled, &head_w, &head_b], vec![]);
    g.output("logits", &[Dim::Symbol("batch"), Dim::Fixed(classes)]);
    g
}

/// A Conv whose weights and bias hold the BatchNorm after it, at its running statistics:
/// `scale = γ / √(σ² + ε)`, `W' = scale · W` per output channel, `b' = β − scale · μ`.
fn conv_norm(g: &mut GraphBuilder, name: &str, input: &str, layer: &ConvNorm) -> String {
    let conv = &layer.conv;
    let [c_out, c_in, kh, kw] = conv.weight.dims();
    let norm = &layer.norm;
    let (gamma, beta) = (values(norm.gamma.val()), values(norm.beta.val()));
    let (mean, variance) = (
        values(norm.running_mean.value()),
        values(norm.running_var.value()),
    );
    let scale: Vec<f64> = (0..c_out)
        .map(|o| gamma[o] as f64 / (variance[o] as f64 + norm.epsilon).sqrt())
        .collect();
    let per_output = c_in * kh * kw;
    let weight: Vec<f32> = values(conv.weight.val())
        .chunks(per_output)
        .zip(&scale)
        .flat_map(|(kernel, &scale)| kernel.iter().map(move |&w| (w as f64 * scale) as f32))
        .collect();
    let conv_bias = conv.bias.as_ref().map(|b| values(b.val()));
    let bias: Vec<f32> = (0..c_out)
        .map(|o| {
            let before = conv_bias.as_ref().map_or(0.0, |b| b[o] as f64);
            (beta[o] as f64 + scale[o] * (before - mean[o] as f64)) as f32
        })
        .collect();
    let w = g.weight(&format!("{name}.weight"), &[c_out, c_in, kh, kw], weight);
    let b = g.weight(&format!("{name}.bias"), &[c_out], bias);
    let [stride, _] = conv.stride;
    let pad = (kh / 2) as i64;
    g.node(
        "Conv",
        name,
        &[input, &w, &b],
        vec![
            ("kernel_shape", Attr::Ints(vec![kh as i64, kw as i64])),
            ("strides", Attr::Ints(vec![stride as i64; 2])),
            ("pads", Attr::Ints(vec![pad; 4])),
        ],
    )
}
