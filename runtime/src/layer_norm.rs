//! ONNX LayerNormalization over the last axis as one operator.
//!
//! tract-onnx 0.23.9 expands each LayerNormalization into about a dozen primitive nodes, which
//! its optimiser folds to five (sum, scale, subtract, RmsNorm, multiply-add), each a pass over
//! the activations with its own dispatch. On the 17-token default model those five took 20 %
//! of inference (`bench --profile`). [`register`] makes the ONNX parser build
//! [`LastAxisLayerNorm`] instead, which normalises each row in three passes over data already
//! in L1. Other LayerNormalization forms (another axis, no bias, the optional mean and
//! inverse-deviation outputs) keep tract's own expansion.

use crate::rows::{LANES, update_rows};
use std::sync::OnceLock;
use tract_onnx::model::{Onnx, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_hir::internal::*;

/// Multiply-adds per value (see [`update_rows`]): the mean, the variance, the output.
const NORMALISE_COST: usize = 3;

type Builder = fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's own LayerNormalization builder, for the forms [`LastAxisLayerNorm`] does not take.
static STOCK: OnceLock<Option<Builder>> = OnceLock::new();

/// Make `onnx` parse LayerNormalization over the last axis into [`LastAxisLayerNorm`].
pub fn register(onnx: &mut Onnx) {
    let stock = onnx.op_register.0.get("LayerNormalization").copied();
    STOCK.get_or_init(|| stock);
    onnx.op_register.insert("LayerNormalization", layer_norm);
}

fn layer_norm(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let attribute = |name: &str| node.attribute.iter().find(|a| a.name == name);
    let axis = attribute("axis").map_or(-1, |a| a.i);
    let stash_is_f32 = attribute("stash_type").is_none_or(|a| a.i == 1);
    let extra_outputs = node.output.iter().skip(1).any(|name| !name.is_empty());
    if axis == -1 && stash_is_f32 && node.input.len() == 3 && !extra_outputs {
        let epsilon = attribute("epsilon").map_or(1e-5, |a| a.f);
        return Ok((expand(LastAxisLayerNormExpansion { epsilon }), vec![]));
    }
    match STOCK.get().copied().flatten() {
        Some(stock) => stock(ctx, node),
        None => bail!("LayerNormalization with axis {axis} is not supported"),
    }
}

#[derive(Debug, Clone)]
struct LastAxisLayerNormExpansion {
    epsilon: f32,
}

impl Expansion for LastAxisLayerNormExpansion {
    fn name(&self) -> StaticName {
        "LastAxisLayerNorm".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &inputs[1].datum_type)?;
        s.equals(&inputs[0].datum_type, &inputs[2].datum_type)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?.clone();
        let width = fact
            .shape
            .last()
            .cloned()
            .context("LayerNormalization of a scalar")?;
        for (input, name) in inputs[1..].iter().zip(["scale", "bias"]) {
            let shape = &model.outlet_fact(*input)?.shape;
            ensure!(
                shape.rank() == 1 && shape[0] == width,
                "LayerNormalization {name} has shape {shape:?}, the normalised axis {width}"
            );
        }
        let op = LastAxisLayerNorm {
            epsilon_bits: self.epsilon.to_bits(),
        };
        let dt = fact.datum_type;
        if dt == f32::datum_type() {
            return model.wire_node(prefix, op, inputs);
        }
        // Statistics in f32 (the ONNX default stash type), whatever the tensors are stored in.
        let mut wired = TVec::new();
        for (index, input) in inputs.iter().enumerate() {
            let name = format!("{prefix}.to_f32.{index}");
            wired.push(model.wire_node(name, cast(f32::datum_type()), &[*input])?[0]);
        }
        let normalised = model.wire_node(format!("{prefix}.f32"), op, &wired)?;
        model.wire_node(prefix, cast(dt), &normalised)
    }
}

/// `(x - mean) / sqrt(variance + epsilon) * scale + bias` over the last axis of an f32 tensor;
/// inputs: x, scale and bias (both as long as x's last axis).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct LastAxisLayerNorm {
    epsilon_bits: u32,
}

impl Op for LastAxisLayerNorm {
    fn name(&self) -> StaticName {
        "LastAxisLayerNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "epsilon: {}",
            f32::from_bits(self.epsilon_bits)
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for LastAxisLayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, scale, bias) = args_3!(inputs);
        let width = *x.shape().last().context("LayerNorm of a scalar")?;
        let (scale, bias) = (scale.try_as_plain_ram()?, bias.try_as_plain_ram()?);
        let (scale, bias) = (scale.as_slice::<f32>()?, bias.as_slice::<f32>()?);
        ensure!(width > 0 && scale.len() == width && bias.len() == width);
        let epsilon = f32::from_bits(self.epsilon_bits);
        let output = update_rows(x, width, NORMALISE_COST, |rows| {
            normalise_rows(rows, scale, bias, epsilon)
        })?;
        Ok(tvec!(output))
    }
}

impl TypedOp for LastAxisLayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Layer-normalise each `scale.len()` row of `rows` in place.
pub fn normalise_rows(rows: &mut [f32], scale: &[f32], bias: &[f32], epsilon: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the feature the function is compiled for.
        unsafe { normalise_rows_avx2(rows, scale, bias, epsilon) };
        return;
    }
    normalise_rows_portable(rows, scale, bias, epsilon);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn normalise_rows_avx2(rows: &mut [f32], scale: &[f32], bias: &[f32], epsilon: f32) {
    normalise_rows_portable(rows, scale, bias, epsilon);
}

/// Sum of `f(x)` over `row`, in lanes the compiler can keep in one vector register.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane += f(value);
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

#[inline(always)]
fn normalise_rows_portable(rows: &mut [f32], scale: &[f32], bias: &[f32], epsilon: f32) {
    let width = scale.len();
    let reciprocal_width = 1.0 / width as f32;
    for row in rows.chunks_exact_mut(width) {
        let mean = lane_sum(row, |x| x) * reciprocal_width;
        let variance = lane_sum(row, |x| (x - mean) * (x - mean)) * reciprocal_width;
        let inverse_deviation = 1.0 / (variance + epsilon).sqrt();
        for ((value, &gain), &offset) in row.iter_mut().zip(scale).zip(bias) {
            *value = (*value - mean) * inverse_deviation * gain + offset;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(row: &[f32], scale: &[f32], bias: &[f32], epsilon: f64) -> Vec<f32> {
        let n = row.len() as f64;
        let mean = row.iter().map(|&x| x as f64).sum::<f64>() / n;
        let variance = row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let inverse = 1.0 / (variance + epsilon).sqrt();
        row.iter()
            .zip(scale)
            .zip(bias)
            .map(|((&x, &g), &b)| ((x as f64 - mean) * inverse * g as f64 + b as f64) as f32)
            .collect()
    }

    fn values(n: usize, seed: u32, offset: f32) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 4.0 + offset
            })
            .collect()
    }

    #[test]
    fn rows_match_a_double_precision_layer_norm() {
        for width in [1, 7, 8, 17, 64, 192] {
            let scale = values(width, 1, 1.0);
            let bias = values(width, 2, 0.0);
            // An offset far from zero is where a one-pass variance would lose digits.
            let input = values(width * 3, 3, 100.0);
            let mut ours = input.clone();
            normalise_rows(&mut ours, &scale, &bias, 1e-5);
            for (row_in, row_out) in input.chunks(width).zip(ours.chunks(width)) {
                for (a, b) in row_out.iter().zip(reference(row_in, &scale, &bias, 1e-5)) {
                    assert!((a - b).abs() <= 2e-5 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
    }
}
