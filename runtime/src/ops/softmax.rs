//! Attention's softmax as one tight loop per row.
//!
//! tract 0.23.9's f32 softmax runs three kernels per row (max, exp-and-sum, scale), and each
//! one splits the row into an unaligned head, an aligned body and a tail that go through a
//! thread-local scratch copy. Attention rows are short (17 values in the default model, 325
//! in `video`), so that bookkeeping dominates: `bench --profile` put Softmax at 17 % of the
//! default model's inference and 21 % of `video`'s. [`RowSoftmax`] computes the same values
//! in place with loops the compiler vectorises (AVX2 + FMA when the CPU has them, NEON on
//! aarch64), and [`use_row_softmax`] swaps it in for tract's op after optimisation.

use crate::ops::Isa;
use crate::ops::rows::{LANES, update_rows};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

/// Multiply-adds per value (see [`update_rows`]): the exponential's range reduction and
/// polynomial, the max, the sum and the scale.
const SOFTMAX_COST: usize = 12;

/// Softmax over the last axis of a contiguous f32 tensor.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct RowSoftmax {
    /// The op it replaces, for inputs this one does not handle.
    original: Softmax,
    /// The kernel's instruction set.
    pub isa: Isa,
}

impl Op for RowSoftmax {
    fn name(&self) -> StaticName {
        "RowSoftmax".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.isa.to_string()])
    }

    op_as_typed_op!();
}

impl EvalOp for RowSoftmax {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let row_len = input.shape().last().copied().unwrap_or(0);
        if input.datum_type() != f32::datum_type() || row_len == 0 || !super::is_row_major(&input) {
            return self.original.eval(ctx, tvec!(input));
        }
        let output = update_rows(input, row_len, SOFTMAX_COST, |rows| {
            softmax_rows(rows, row_len, self.isa)
        })?;
        Ok(tvec!(output))
    }
}

impl TypedOp for RowSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.original.output_facts(inputs)
    }

    as_op!();
}

/// Replace each f32 softmax over the last axis in an optimised model by [`RowSoftmax`] on the
/// kernel for `isa`; returns how many were replaced.
pub fn use_row_softmax(model: &mut TypedModel, isa: Isa) -> usize {
    let mut replaced = 0;
    for node in &mut model.nodes {
        let Some(softmax) = node.op_as::<Softmax>() else {
            continue;
        };
        let fact = &node.outputs[0].fact;
        let last_axis = fact.rank().checked_sub(1);
        if softmax.kind == SoftmaxKind::Softmax
            && softmax.quant_output_dt.is_none()
            && fact.datum_type == f32::datum_type()
            && last_axis.is_some_and(|axis| softmax.axes.as_slice() == [axis])
        {
            node.op = Box::new(RowSoftmax {
                original: softmax.clone(),
                isa: isa.for_rows(),
            });
            replaced += 1;
        }
    }
    replaced
}

/// Softmax of each `row_len` row of `rows`, in place, on `isa`'s kernel.
pub fn softmax_rows(rows: &mut [f32], row_len: usize, isa: Isa) {
    assert!(isa.runs_here(), "{isa} kernel on a CPU without it");
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        unsafe { softmax_rows_avx2_fma(rows, row_len) };
        return;
    }
    // aarch64 always has a fused multiply-add; elsewhere `mul_add` would be a libm call.
    softmax_rows_with::<{ cfg!(target_arch = "aarch64") }>(rows, row_len);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2_fma(rows: &mut [f32], row_len: usize) {
    softmax_rows_with::<true>(rows, row_len);
}

#[inline(always)]
fn softmax_rows_with<const FMA: bool>(rows: &mut [f32], row_len: usize) {
    for row in rows.chunks_exact_mut(row_len) {
        let max = row_max(row);
        let sum = exp_in_place::<FMA>(row, max);
        let scale = 1.0 / sum;
        for value in row.iter_mut() {
            *value *= scale;
        }
    }
}

#[inline(always)]
pub(crate) fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane = if value > *lane { value } else { *lane };
        }
    }
    let tail = chunks.remainder().iter().copied();
    lanes
        .into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `row[i] = exp(row[i] - max)`; returns their sum.
#[inline(always)]
pub(crate) fn exp_in_place<const FMA: bool>(row: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *value = exp_non_positive::<FMA>(*value - max);
            *lane += *value;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for value in chunks.into_remainder() {
        *value = exp_non_positive::<FMA>(*value - max);
        sum += *value;
    }
    sum
}

#[inline(always)]
pub(crate) fn multiply_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// e^x for x ≤ 0 (a row value minus the row's max), to about one ulp. Cephes' expf: split
/// x = k·ln 2 + r with |r| ≤ ln 2 / 2, a degree-7 polynomial for e^r, and 2^k built in the
/// exponent bits. x is clamped at -87 so 2^k stays a normal number (no slow denormals); the
/// true e^-87 ≈ 1.6e-38 is already nothing next to the row's largest term, 1. NaN passes the
/// clamp, so a NaN score makes its row NaN as it does in onnxruntime, not a confident answer.
#[inline(always)]
fn exp_non_positive<const FMA: bool>(x: f32) -> f32 {
    // Adding 1.5·2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    let shifted = multiply_add::<FMA>(x, std::f32::consts::LOG2_E, ROUNDER);
    let k = shifted - ROUNDER;
    let exponent = (shifted.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    let r = multiply_add::<FMA>(k, -LN2_HIGH, x);
    let r = multiply_add::<FMA>(k, -LN2_LOW, r);
    let mut p = 1.987_569_1e-4;
    p = multiply_add::<FMA>(p, r, 1.398_199_9e-3);
    p = multiply_add::<FMA>(p, r, 8.333_452e-3);
    p = multiply_add::<FMA>(p, r, 4.166_579_6e-2);
    p = multiply_add::<FMA>(p, r, 1.666_666_5e-1);
    p = multiply_add::<FMA>(p, r, 0.5);
    let e_r = multiply_add::<FMA>(p, r * r, r) + 1.0;
    e_r * f32::from_bits(((exponent + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{Just, Strategy};

    fn reference(row: &[f32]) -> Vec<f32> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exps: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| (e / sum) as f32).collect()
    }

    fn pseudo_random(n: usize, spread: f32, seed: u32) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * spread
            })
            .collect()
    }

    #[test]
    fn exp_is_within_two_ulps_down_to_the_clamp() {
        let mut x = 0f32;
        while x > -87.0 {
            let ours = exp_non_positive::<false>(x) as f64;
            let exact = (x as f64).exp();
            assert!(
                ((ours - exact) / exact).abs() < 2.5e-7,
                "e^{x}: {ours} vs {exact}"
            );
            let fused = exp_non_positive::<true>(x) as f64;
            assert!(
                ((fused - exact) / exact).abs() < 2.5e-7,
                "fused e^{x}: {fused}"
            );
            x -= 0.0137;
        }
        assert!(exp_non_positive::<false>(-1e4) < 1e-37);
        assert_eq!(exp_non_positive::<false>(0.0), 1.0);
    }

    #[test]
    fn rows_of_every_length_match_a_double_precision_softmax() {
        for row_len in [1, 2, 7, 8, 9, 17, 31, 64, 325] {
            for spread in [0.1, 10.0, 200.0] {
                let input = pseudo_random(row_len * 5, spread, row_len as u32);
                for isa in Isa::available_float() {
                    let mut ours = input.clone();
                    softmax_rows(&mut ours, row_len, isa);
                    for (row_in, row_out) in input.chunks(row_len).zip(ours.chunks(row_len)) {
                        let expected = reference(row_in);
                        let sum: f32 = row_out.iter().sum();
                        assert!((sum - 1.0).abs() < 1e-5, "row of {row_len} sums to {sum}");
                        for (a, b) in row_out.iter().zip(&expected) {
                            assert!((a - b).abs() <= 1e-6 * b.max(1e-3), "{isa}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
        /// Random rows, NaN and infinities among them, on every kernel.
        #[test]
        fn every_kernel_agrees_with_the_definition_on_random_rows(
            (row_len, input) in (1..=200usize, 1..=4usize, proptest::bool::ANY).prop_flat_map(
                |(row_len, rows, specials)| {
                    (Just(row_len), crate::ops::properties::values(row_len * rows, specials))
                },
            ),
            spread in 0.1f32..60.0,
        ) {
            let input: Vec<f32> = input.iter().map(|v| v * spread).collect();
            for isa in Isa::available_float() {
                let mut ours = input.clone();
                softmax_rows(&mut ours, row_len, isa);
                for (row_in, row_out) in input.chunks(row_len).zip(ours.chunks(row_len)) {
                    for (&got, want) in row_out.iter().zip(reference(row_in)) {
                        proptest::prop_assert!(
                            crate::ops::properties::agrees(got, want as f64, 1e-6 * (want.abs() as f64).max(1e-3)),
                            "{isa}: {got} vs {want} in {row_in:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_nan_score_makes_its_row_nan_and_leaves_the_others() {
        for isa in Isa::available_float() {
            for row_len in [3, 17, 40] {
                let mut rows = pseudo_random(row_len * 2, 10.0, 3);
                rows[row_len - 1] = f32::NAN;
                softmax_rows(&mut rows, row_len, isa);
                let (first, second) = rows.split_at(row_len);
                assert!(first.iter().all(|p| p.is_nan()), "{isa}: {first:?}");
                assert!((second.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{isa}");
            }
        }
    }

    #[test]
    fn the_op_replaces_tracts_softmax_and_gives_its_answer() -> TractResult<()> {
        let mut model = TypedModel::default();
        let source = model.add_source("scores", f32::fact([2, 3, 17]))?;
        let softmax = Softmax::new(tvec!(2), None, SoftmaxKind::Softmax);
        let output = model.wire_node("softmax", softmax, &[source])?;
        model.select_output_outlets(&output)?;
        let input = tensor1(&pseudo_random(2 * 3 * 17, 20.0, 7)).into_shape(&[2, 3, 17])?;
        let expected = model
            .clone()
            .into_runnable()?
            .run(tvec!(input.clone().into()))?;

        assert_eq!(use_row_softmax(&mut model, Isa::Portable), 1);
        assert_eq!(model.nodes[1].op.name(), "RowSoftmax");
        let ours = model.into_runnable()?.run(tvec!(input.into()))?;
        expected[0].close_enough(&ours[0], Approximation::Close)?;
        Ok(())
    }
}
