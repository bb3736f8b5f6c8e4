//! Tests of [`DenseLinear`](super::DenseLinear): every kernel against the definition, the
//! fusions tract's graphs get, and the packed layouts.

use super::*;
use crate::ops::properties::{run_model, seeded as values};
use crate::ops::rows::on_two_threads;

/// Every row block remainder (1–6 rows), partial panels and the threaded path.
#[test]
fn matches_the_definition_on_every_row_and_column_remainder() {
    for (rows, depth, width) in [
        (1, 1, 1),
        (5, 3, 17),
        (7, 16, 16),
        (13, 9, 33),
        (17, 64, 40),
        (23, 5, 70),
        (325, 128, 100),
    ] {
        let x = values(rows * depth, 1);
        let w = values(depth * width, 2);
        let b = values(width, 3);
        for isa in Isa::available_float() {
            let shape = tvec![rows, width];
            let op = DenseLinear::new(isa, &w, false, Some(&b), depth, width, shape);
            let op = op.unwrap();
            let mut out = vec![f32::NAN; rows * width];
            on_two_threads(|| op.apply(&x, None, &mut out));
            for r in 0..rows {
                for c in 0..width {
                    let expected: f64 = b[c] as f64
                        + (0..depth)
                            .map(|d| x[r * depth + d] as f64 * w[d * width + c] as f64)
                            .sum::<f64>();
                    let got = out[r * width + c] as f64;
                    assert!(
                        (got - expected).abs() <= 1e-5 * (1.0 + expected.abs()),
                        "{isa}, {rows}x{depth}x{width} at ({r}, {c}): {got} vs {expected}"
                    );
                }
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
    /// Random shapes and values, NaN and infinities among them, on every kernel.
    #[test]
    fn every_kernel_agrees_with_the_definition_on_random_cases(
        case in random_case(),
        use_bias: bool,
        gelu: bool,
        use_residual: bool,
    ) {
        let (rows, depth, width, x, w, b, r) = case;
        // GELU of an infinite sum has no one right answer (−∞ · 0): finite inputs only.
        let gelu = gelu && x.iter().all(|v| v.is_finite());
        let bias = use_bias.then_some(&b[..]);
        let residual = use_residual.then_some(&r[..]);
        for isa in Isa::available_float() {
            let shape = tvec![rows, width];
            let mut op = DenseLinear::new(isa, &w, false, bias, depth, width, shape).unwrap();
            op.gelu = gelu;
            op.residual = use_residual;
            let mut out = vec![0.0; rows * width];
            op.apply(&x, residual, &mut out);
            for i in 0..rows {
                for c in 0..width {
                    let terms = (0..depth).map(|d| x[i * depth + d] as f64 * w[d * width + c] as f64);
                    let size: f64 = terms.clone().map(f64::abs).sum::<f64>() + 1.0;
                    let mut want = terms.sum::<f64>() + bias.map_or(0.0, |b| b[c] as f64);
                    if gelu {
                        want = crate::ops::dense::gelu::<false>(want as f32) as f64;
                    }
                    want += residual.map_or(0.0, |r| r[i * width + c] as f64);
                    let got = out[i * width + c];
                    proptest::prop_assert!(
                        crate::ops::properties::agrees(got, want, 1e-5 * size),
                        "{isa}, {rows}x{depth}x{width} at ({i}, {c}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[allow(clippy::type_complexity)]
fn random_case() -> impl proptest::strategy::Strategy<
    Value = (usize, usize, usize, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>),
> {
    use crate::ops::properties::values;
    use proptest::prelude::*;
    (1..=24usize, 1..=70usize, 1..=100usize, any::<bool>()).prop_flat_map(
        |(rows, depth, width, specials)| {
            (
                Just(rows),
                Just(depth),
                Just(width),
                values(rows * depth, specials),
                values(depth * width, false),
                values(width, false),
                values(rows * width, specials),
            )
        },
    )
}

/// GELU far from zero: the identity above, zero below (an AVX-512 GELU once gave NaN past
/// x ≈ 19, where p(z)^16 overflows).
#[test]
fn gelu_saturates_without_nan_on_every_kernel() {
    let x = [-1e30, -100.0, -20.0, -5.0, 0.0, 5.0, 20.0, 100.0, 1e30];
    for isa in Isa::available_float() {
        let shape = tvec![x.len(), 1];
        let mut op = DenseLinear::new(isa, &[1.0], false, None, 1, 1, shape).unwrap();
        op.gelu = true;
        let mut out = vec![f32::NAN; x.len()];
        op.apply(&x, None, &mut out);
        for (&x, &y) in x.iter().zip(&out) {
            let expected = if x.abs() < 10.0 { y } else { x.max(0.0) };
            assert!(y.is_finite() && y == expected, "{isa}: gelu({x}) = {y}");
        }
        assert!(
            (out[5] - 5.0).abs() < 1e-5 && out[3].abs() < 1e-5,
            "{isa}: {out:?}"
        );
    }
}

/// A product by a constant, and what may follow it.
#[derive(Default)]
struct Layer<'a> {
    x: &'a [usize],
    w: &'a [usize],
    axes: &'a str,
    /// A Reshape after the product: `(at, from, to)`.
    reshape: Option<(usize, &'a [usize], &'a [usize])>,
    bias: Option<&'a [usize]>,
    gelu: bool,
    residual: bool,
}

impl Layer<'_> {
    /// The fused operators' descriptions, after checking the fused model against
    /// tract's answer on the same model unfused.
    fn fused(&self) -> Vec<String> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(self.x)).unwrap();
        let constant = |model: &mut TypedModel, name: &str, shape: &[usize], seed| {
            let values = tensor1(&values(shape.iter().product(), seed));
            model
                .add_const(name, values.into_shape(shape).unwrap())
                .unwrap()
        };
        let w = constant(&mut model, "w", self.w, 7);
        let op = EinSum::new(self.axes.parse().unwrap(), f32::datum_type());
        let mut y = model.wire_node("product", op, &[x, w]).unwrap()[0];
        if let Some((at, from, to)) = self.reshape {
            let dims = |dims: &[usize]| dims.iter().map(|&d| d.to_dim()).collect();
            let reshape = AxisOp::Reshape(at, dims(from), dims(to));
            y = model.wire_node("reshape", reshape, &[y]).unwrap()[0];
        }
        let add = tract_onnx::tract_core::ops::math::add;
        if let Some(shape) = self.bias {
            let bias = constant(&mut model, "b", shape, 8);
            y = model.wire_node("bias", add(), &[y, bias]).unwrap()[0];
        }
        if self.gelu {
            let gelu = ElementWiseOp(Box::new(GeluExact {}), None);
            y = model.wire_node("gelu", gelu, &[y]).unwrap()[0];
        }
        let mut inputs = tvec![
            tensor1(&values(self.x.iter().product(), 9))
                .into_shape(self.x)
                .unwrap()
                .into_tvalue()
        ];
        if self.residual {
            let shape = model
                .outlet_fact(y)
                .unwrap()
                .shape
                .as_concrete()
                .unwrap()
                .to_vec();
            let r = model.add_source("r", f32::fact(&shape)).unwrap();
            y = model.wire_node("residual", add(), &[r, y]).unwrap()[0];
            let r = tensor1(&values(shape.iter().product(), 10));
            inputs.push(r.into_shape(&shape).unwrap().into_tvalue());
        }
        model.select_output_outlets(&[y]).unwrap();
        let run = |model: TypedModel| run_model(model, &inputs);
        let expected = run(model.clone());
        let mut descriptions = Vec::new();
        for isa in Isa::available_float() {
            let mut model = model.clone();
            fuse_dense(&mut model, isa).unwrap();
            let fused: Vec<String> = model
                .nodes()
                .iter()
                .filter_map(|node| node.op_as::<DenseLinear>())
                .map(|op| op.info().unwrap().join(" "))
                .collect();
            let got = run(model);
            assert_eq!(got.0, expected.0, "{}", self.axes);
            for (g, e) in got.1.iter().zip(&expected.1) {
                let axes = self.axes;
                assert!(
                    (g - e).abs() <= 2e-5 * (1.0 + e.abs()),
                    "{isa}, {axes}: {g} vs {e}"
                );
            }
            // The description names the kernel; the rest is the same for every one.
            let suffix = format!(", {isa}");
            descriptions.push(
                fused
                    .iter()
                    .map(|d| d.strip_suffix(&suffix).unwrap().to_string())
                    .collect::<Vec<_>>(),
            );
        }
        descriptions.dedup();
        assert_eq!(descriptions.len(), 1, "{descriptions:?}");
        descriptions.pop().unwrap()
    }
}

#[test]
fn products_by_a_constant_are_fused_with_what_follows() {
    // The exporter's projections, with the bias shapes it adds, and its MLP.
    let qkv = Layer {
        x: &[1, 17, 64],
        w: &[64, 48],
        axes: "amk,kn->mn",
        bias: Some(&[1, 48]),
        ..Layer::default()
    };
    assert_eq!(qkv.fused(), ["64x48"]);
    let hidden = Layer { gelu: true, ..qkv };
    assert_eq!(hidden.fused(), ["64x48, GELU"]);
    let mlp_output = Layer {
        x: &[17, 64],
        axes: "mk,kn->amn",
        bias: Some(&[1, 1, 48]),
        residual: true,
        ..hidden
    };
    assert_eq!(mlp_output.fused(), ["64x48, GELU, + residual"]);
    // The output projection: heads and head size contracted together.
    let projection = Layer {
        x: &[17, 4, 8],
        w: &[4, 8, 40],
        axes: "mbk,bkn->amn",
        residual: true,
        ..Layer::default()
    };
    assert_eq!(projection.fused(), ["32x40, + residual"]);
    // torch's Gemm stores W transposed.
    let gemm = Layer {
        x: &[17, 64],
        w: &[48, 64],
        axes: "mk,nk->mn",
        ..Layer::default()
    };
    assert_eq!(gemm.fused(), ["64x48"]);
    // A bias that varies by row stays tract's Add, and so does what follows it.
    let by_row = Layer {
        bias: Some(&[17, 1]),
        gelu: true,
        ..gemm
    };
    assert_eq!(by_row.fused(), ["64x48"]);
    // A Swin's output projection: the token grid folded into a token axis between the
    // product and its bias.
    let swin_projection = Layer {
        x: &[1, 14, 14, 32],
        w: &[32, 32],
        axes: "abmk,kn->abmn",
        reshape: Some((1, &[14, 14], &[196])),
        bias: Some(&[1, 1, 32]),
        residual: true,
        ..Layer::default()
    };
    assert_eq!(swin_projection.fused(), ["32x32, + residual"]);
    // A Reshape that splits the last axis keeps the bias out of the operator.
    let split_columns = Layer {
        reshape: Some((3, &[32], &[4, 8])),
        bias: Some(&[1, 1, 1, 4, 8]),
        residual: false,
        ..swin_projection
    };
    assert_eq!(split_columns.fused(), ["32x32"]);
    // A product that also reorders its rows (tract folds a Swin's window merge into its
    // output projection): ours in x's row order, with the bias and GELU past the Reshape, and
    // the rows moved into order after it; the residual stays tract's.
    let window_merge = Layer {
        x: &[2, 2, 7, 7, 32],
        w: &[32, 32],
        axes: "dcbmk,kn->adbcmn",
        reshape: Some((1, &[2, 7, 2, 7], &[196])),
        bias: Some(&[1, 1, 32]),
        gelu: true,
        residual: true,
    };
    assert_eq!(window_merge.fused(), ["32x32, GELU"]);
    let transposed_rows = Layer {
        x: &[3, 5, 8],
        w: &[8, 4],
        axes: "bmk,kn->mbn",
        ..Layer::default()
    };
    assert_eq!(transposed_rows.fused(), ["8x4"]);
    // A batch axis in W: tract's.
    let batched = Layer {
        x: &[2, 17, 8],
        w: &[2, 8, 16],
        axes: "bmk,bkn->bmn",
        ..Layer::default()
    };
    assert!(batched.fused().is_empty());
}
