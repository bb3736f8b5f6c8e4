//! ONNX LayerNormalization over the last axis as one operator.
//!
//! tract-onnx 0.23.9 expands each LayerNormalization into about a dozen primitive nodes, which
//! its optimiser folds to five (sum, scale, subtract, RmsNorm, multiply-add), each a pass over
//! the activations with its own dispatch. On the 17-token default model those five took 20 %
//! of inference (`bench --profile`). [`register`] makes the ONNX parser build
//! [`LastAxisLayerNorm`] instead, which normalises each row in three passes over data already
//! in L1. Other LayerNormalization forms (another axis, no bias, the optional mean and
//! inverse-deviation outputs) keep tract's own expansion.

use std::sync::OnceLock;
use tract_onnx::model::{Onnx, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_hir::internal::*;

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
        // Statistics in f32 (the ONNX default stash type), whatever the tensors are stored in.
        let dt = fact.datum_type;
        let mut wired: TVec<OutletId> = inputs.into();
        if dt != f32::datum_type() {
            for (index, input) in wired.iter_mut().enumerate() {
                let name = format!("{prefix}.to_f32.{index}");
                *input = model.wire_node(name, cast(f32::datum_type()), &[*input])?[0];
            }
        }
        let epsilon_bits = self.epsilon.to_bits();
        let name = if dt == f32::datum_type() {
            prefix.to_string()
        } else {
            format!("{prefix}.f32")
        };
        let normalised = model.wire_node(name, LastAxisLayerNorm { epsilon_bits }, &wired)?;
        if dt == f32::datum_type() {
            return Ok(normalised);
        }
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
        let mut output = x.into_tensor();
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            let data = plain.as_slice_mut::<f32>()?;
            let total = data.len();
            tract_linalg::multithread::par_chunks_mut(data, width, total, |_, rows| {
                normalise_rows(rows, scale, bias, epsilon);
                Ok(())
            })?;
        }
        Ok(tvec!(output.into_tvalue()))
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

const LANES: usize = 8;

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
    use prost::Message;
    use tract_onnx::pb;

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

    /// A one-node ONNX model: LayerNormalization of a [2, 5, width] input over `axis`.
    fn layer_norm_model(width: usize, axis: i64) -> Vec<u8> {
        let initializer = |name: &str, data: Vec<f32>| pb::TensorProto {
            name: name.into(),
            dims: vec![data.len() as i64],
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: data,
            ..Default::default()
        };
        let value = |name: &str, dims: &[i64]| pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: pb::tensor_proto::DataType::Float as i32,
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| pb::tensor_shape_proto::Dimension {
                                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let shape = [2, 5, width as i64];
        let normalised: usize = shape[axis as usize..].iter().product::<i64>() as usize;
        let node = pb::NodeProto {
            op_type: "LayerNormalization".into(),
            input: vec!["x".into(), "scale".into(), "bias".into()],
            output: vec!["y".into()],
            attribute: vec![pb::AttributeProto {
                name: "axis".into(),
                i: if axis == 2 { -1 } else { axis },
                r#type: pb::attribute_proto::AttributeType::Int as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let scale_shape: Vec<i64> = shape[axis as usize..].to_vec();
        let mut scale = initializer("scale", values(normalised, 5, 1.0));
        scale.dims = scale_shape.clone();
        let mut bias = initializer("bias", values(normalised, 6, 0.0));
        bias.dims = scale_shape;
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(pb::GraphProto {
                node: vec![node],
                initializer: vec![scale, bias],
                input: vec![value("x", &shape)],
                output: vec![value("y", &shape)],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (a.try_as_plain_ram().unwrap(), b.try_as_plain_ram().unwrap());
        let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn run(onnx: &Onnx, bytes: &[u8], input: &Tensor) -> (Tensor, Vec<String>) {
        let model = onnx.model_for_read(&mut &bytes[..]).unwrap();
        let model = model.into_optimized().unwrap();
        let ops = model
            .nodes
            .iter()
            .map(|n| n.op.name().to_string())
            .collect();
        let plan = model.into_runnable().unwrap();
        let output = plan.run(tvec!(input.clone().into())).unwrap();
        (output[0].clone().into_tensor(), ops)
    }

    #[test]
    fn the_parser_builds_one_node_and_gives_tracts_answer() {
        let mut fused = tract_onnx::onnx();
        register(&mut fused);
        let stock = tract_onnx::onnx();
        let input = tensor1(&values(2 * 5 * 64, 9, 3.0))
            .into_shape(&[2, 5, 64])
            .unwrap();

        let last_axis = layer_norm_model(64, 2);
        let (ours, ops) = run(&fused, &last_axis, &input);
        assert!(ops.iter().any(|op| op == "LastAxisLayerNorm"), "{ops:?}");
        let (theirs, stock_ops) = run(&stock, &last_axis, &input);
        assert!(!stock_ops.iter().any(|op| op == "LastAxisLayerNorm"));
        // Outputs are within ±4; the two differ only in rounding order.
        assert!(largest_difference(&ours, &theirs) < 1e-5);

        // Over two axes the stock expansion still runs, and still agrees.
        let two_axes = layer_norm_model(64, 1);
        let (ours, ops) = run(&fused, &two_axes, &input);
        assert!(!ops.iter().any(|op| op == "LastAxisLayerNorm"), "{ops:?}");
        let (theirs, _) = run(&stock, &two_axes, &input);
        assert_eq!(largest_difference(&ours, &theirs), 0.0);
    }
}
