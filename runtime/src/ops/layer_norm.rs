//! ONNX LayerNormalization over the last axis as one operator.
//!
//! tract-onnx 0.23.9 expands each LayerNormalization into about a dozen primitive nodes, which
//! its optimiser folds to five (sum, scale, subtract, RmsNorm, multiply-add), each a pass over
//! the activations with its own dispatch. On the 17-token default model those five took 20 %
//! of inference (`bench --profile`). [`register`] makes the ONNX parser build
//! [`LastAxisLayerNorm`] instead, which normalises each row in three passes over data already
//! in L1. Other LayerNormalization forms (another axis, no bias, the optional mean and
//! inverse-deviation outputs) keep tract's own expansion.

use crate::ops::Isa;
use crate::ops::patterns::{constant_operand, is_bin, nodes_with_op};
use crate::ops::rows::{LANES, update_rows};
use std::sync::OnceLock;
use tract_onnx::model::{Onnx, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};
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
            isa: Isa::best().for_rows(),
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
    /// The kernel's instruction set: the best this CPU runs until [`use_isa`] says otherwise.
    pub isa: Isa,
}

/// Make every [`LastAxisLayerNorm`] of `model` run the row kernel for the best instruction set
/// `isa` (the parser, which builds them, knows nothing of the choice).
pub fn use_isa(model: &mut TypedModel, isa: Isa) {
    for node in &mut model.nodes {
        if let Some(op) = node.op_as_mut::<LastAxisLayerNorm>() {
            op.isa = isa.for_rows();
        }
    }
}

impl Op for LastAxisLayerNorm {
    fn name(&self) -> StaticName {
        "LastAxisLayerNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "epsilon: {}, {}",
            f32::from_bits(self.epsilon_bits),
            self.isa
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
            normalise_rows(rows, scale, bias, epsilon, self.isa)
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

/// Replace each LayerNorm over the last axis written out in primitive operators (what torch
/// exports below opset 17: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add) in a
/// decluttered f32 model by [`LastAxisLayerNorm`]; returns how many were replaced.
///
/// tract's decluttering already folds the variance and the division into an `RmsNorm` of
/// `x - mean(x)`; matched here: `RmsNorm(Sub(x, Mul(Reduce<Sum>(x), 1/n)))` over the last axis,
/// then a Mul by a constant scale and an Add of a constant bias, each optional (tract drops
/// a scale of ones and a bias of zeros), each the only use of the one before.
pub fn fuse_decomposed(model: &mut TypedModel, isa: Isa) -> TractResult<usize> {
    let norms = nodes_with_op::<RmsNorm>(model);
    let mut fused = 0;
    for norm in norms {
        let Some(found) = match_decomposed(model, norm)? else {
            continue;
        };
        let name = model.node(norm).name.clone();
        let mut patch = TypedModelPatch::new(format!("fuse {name} into a LayerNorm"));
        let x = patch.tap_model(model, found.x)?;
        let width = found.width;
        // As vectors of the normalised axis, whatever rank they were broadcast at.
        let vector = |constant: Option<Arc<Tensor>>, default: f32| match constant {
            Some(c) => c.as_ref().clone().into_shape(&[width]),
            None => Ok(tensor1(&vec![default; width])),
        };
        let scale = patch.add_const(format!("{name}.scale"), vector(found.scale, 1.0)?)?;
        let bias = patch.add_const(format!("{name}.bias"), vector(found.bias, 0.0)?)?;
        let op = LastAxisLayerNorm {
            epsilon_bits: found.epsilon.to_bits(),
            isa: isa.for_rows(),
        };
        let wire = patch.wire_node(&name, op, &[x, scale, bias])?[0];
        patch.shunt_outside(model, found.last.into(), wire)?;
        patch.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// A LayerNorm found in primitive operators.
struct Decomposed {
    x: OutletId,
    width: usize,
    epsilon: f32,
    scale: Option<Arc<Tensor>>,
    bias: Option<Arc<Tensor>>,
    /// The node whose output is the LayerNorm's.
    last: usize,
}

fn match_decomposed(model: &TypedModel, norm: usize) -> TractResult<Option<Decomposed>> {
    let node = model.node(norm);
    let op = node.op_as::<RmsNorm>().unwrap();
    let fact = &node.outputs[0].fact;
    let width = fact.shape.last().and_then(|d| d.to_usize().ok());
    let (Some(width), Some(axis)) = (width, fact.rank().checked_sub(1)) else {
        return Ok(None);
    };
    if op.axis != axis || fact.datum_type != f32::datum_type() || width == 0 {
        return Ok(None);
    }
    let epsilon = op.eps.cast_to_scalar::<f32>()?;
    // x - mean(x)
    let centred = model.node(node.inputs[0].node);
    if !is_bin(centred, "Sub") || centred.outputs[0].successors.len() != 1 {
        return Ok(None);
    }
    let (x, mean) = (centred.inputs[0], model.node(centred.inputs[1].node));
    let reciprocal = 1.0 / width as f32;
    let Some((sum, scalar)) = constant_operand(model, mean, "Mul")? else {
        return Ok(None);
    };
    let is_reciprocal = scalar.len() == 1
        && (scalar.cast_to_scalar::<f32>()? - reciprocal).abs() <= 1e-6 * reciprocal;
    let sum = model.node(sum.node);
    let sums_x = sum.inputs == [x]
        && sum
            .op_as::<Reduce>()
            .is_some_and(|r| r.reducer == Reducer::Sum && *r.axes == [axis]);
    if !is_reciprocal || !sums_x {
        return Ok(None);
    }
    // The scale and bias, each a constant along the last axis.
    let mut found = Decomposed {
        x,
        width,
        epsilon,
        scale: None,
        bias: None,
        last: norm,
    };
    for (which, name) in [(0, "Mul"), (1, "Add")] {
        let Some(next) = model.single_succ(found.last)? else {
            break;
        };
        let Some((input, constant)) = constant_operand(model, next, name)? else {
            continue;
        };
        let along_last_axis = constant.len() == width
            && constant.shape().last() == Some(&width)
            && constant.datum_type() == f32::datum_type();
        if input.node != found.last || !along_last_axis {
            break;
        }
        *[&mut found.scale, &mut found.bias][which] = Some(constant);
        found.last = next.id;
    }
    Ok(Some(found))
}

/// Layer-normalise each `scale.len()` row of `rows` in place, on `isa`'s kernel.
pub fn normalise_rows(rows: &mut [f32], scale: &[f32], bias: &[f32], epsilon: f32, isa: Isa) {
    assert!(isa.runs_here(), "{isa} kernel on a CPU without it");
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: the CPU has the feature the function is compiled for (checked above).
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
    use proptest::prelude::{Just, Strategy};

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

    /// `x - mean(x)`, RmsNorm and what follows, as tract declutters torch's opset-13
    /// LayerNorm, fused with and without a scale and bias; the answers agree with tract's.
    #[test]
    fn a_layer_norm_in_primitive_operators_is_fused() -> TractResult<()> {
        use tract_onnx::tract_core::ops::math;
        for (scale, bias) in [(true, true), (false, true), (true, false), (false, false)] {
            let (rows, width) = (5, 17);
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([rows, width]))?;
            let sum = model.wire_node("sum", Reduce::new(tvec![1], Reducer::Sum), &[x])?[0];
            // Typed binary operators take operands of one rank.
            let n = model.add_const("n", tensor2(&[[1.0 / width as f32]]))?;
            let mean = model.wire_node("mean", math::mul(), &[sum, n])?[0];
            let centred = model.wire_node("centred", math::sub(), &[x, mean])?[0];
            let eps = tensor0(1e-5f32).into_arc_tensor();
            let rms = RmsNorm { axis: 1, eps };
            let mut y = model.wire_node("rms", rms, &[centred])?[0];
            if scale {
                let gamma = tensor1(&values(width, 1, 1.0)).into_shape(&[1, width])?;
                let gamma = model.add_const("gamma", gamma)?;
                y = model.wire_node("scale", math::mul(), &[y, gamma])?[0];
            }
            if bias {
                let beta = tensor1(&values(width, 2, 0.0)).into_shape(&[1, width])?;
                let beta = model.add_const("beta", beta)?;
                y = model.wire_node("bias", math::add(), &[beta, y])?[0];
            }
            model.select_output_outlets(&[y])?;
            let input = tensor1(&values(rows * width, 3, 10.0)).into_shape(&[rows, width])?;
            let expected = model
                .clone()
                .into_runnable()?
                .run(tvec!(input.clone().into()))?;
            assert_eq!(fuse_decomposed(&mut model, Isa::best())?, 1);
            let ops: Vec<_> = model.nodes().iter().map(|n| n.op.name()).collect();
            assert!(
                !ops.iter().any(|op| op == "RmsNorm" || op == "Reduce<Sum>"),
                "{ops:?}"
            );
            let got = model.into_runnable()?.run(tvec!(input.into()))?;
            let (got, expected) = (got[0].try_as_plain_ram()?, expected[0].try_as_plain_ram()?);
            let (got, expected) = (got.as_slice::<f32>()?, expected.as_slice::<f32>()?);
            for (a, b) in got.iter().zip(expected) {
                assert!((a - b).abs() <= 2e-5 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
        /// Random rows, NaN and infinities among them, on every kernel.
        #[test]
        fn every_kernel_agrees_with_the_definition_on_random_rows(
            (width, input, scale, bias) in (1..=200usize, 1..=4usize, proptest::bool::ANY)
                .prop_flat_map(|(width, rows, specials)| {
                    use crate::ops::properties::values;
                    (Just(width), values(width * rows, specials), values(width, false), values(width, false))
                }),
            offset in -100.0f32..100.0,
        ) {
            let input: Vec<f32> = input.iter().map(|v| v + offset).collect();
            for isa in Isa::available_float() {
                let mut ours = input.clone();
                normalise_rows(&mut ours, &scale, &bias, 1e-5, isa);
                for (row_in, row_out) in input.chunks(width).zip(ours.chunks(width)) {
                    // f32 loses |x| · 2^-24 in `x − mean`: relative to the deviation, that is the
                    // row's condition (large offsets, nearly equal values).
                    let n = width as f64;
                    let mean = row_in.iter().map(|&x| x as f64).sum::<f64>() / n;
                    let variance = row_in.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
                    let largest = row_in.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
                    let condition = largest / (variance + 1e-5).sqrt();
                    let expected = reference(row_in, &scale, &bias, 1e-5);
                    for ((&got, want), gain) in row_out.iter().zip(expected).zip(&scale) {
                        let tolerance = 2e-6 * (1.0 + condition) * (1.0 + gain.abs() as f64)
                            + 1e-5 * want.abs() as f64;
                        proptest::prop_assert!(
                            crate::ops::properties::agrees(got, want as f64, tolerance),
                            "{isa}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_match_a_double_precision_layer_norm() {
        for width in [1, 7, 8, 17, 64, 192] {
            let scale = values(width, 1, 1.0);
            let bias = values(width, 2, 0.0);
            // An offset far from zero is where a one-pass variance would lose digits.
            let input = values(width * 3, 3, 100.0);
            for isa in Isa::available_float() {
                let mut ours = input.clone();
                normalise_rows(&mut ours, &scale, &bias, 1e-5, isa);
                for (row_in, row_out) in input.chunks(width).zip(ours.chunks(width)) {
                    for (a, b) in row_out.iter().zip(reference(row_in, &scale, &bias, 1e-5)) {
                        assert!(
                            (a - b).abs() <= 2e-5 * b.abs().max(1.0),
                            "{isa}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
