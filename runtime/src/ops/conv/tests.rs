//! Tests of [`DenseConv`](super::DenseConv): every kernel against the definition, and the
//! fusion against tract's own convolution.

use super::*;
use crate::ops::properties::seeded as values;
use crate::ops::rows::on_two_threads;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::math::{Add, Max};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// A convolution to test: the geometry, output channels and images.
struct Case {
    geometry: Geometry,
    output_channels: usize,
    images: usize,
}

fn case(channels: usize, input: Pair, kernel: Pair, strides: Pair, pads: [Pair; 2]) -> Case {
    Case {
        geometry: Geometry {
            channels,
            input,
            kernel,
            strides,
            pad_before: pads[0],
            pad_after: pads[1],
        },
        output_channels: 5,
        images: 1,
    }
}

/// Shapes that are not multiples of any block: one channel (a stem), one output pixel, odd
/// and uneven sizes, strides and paddings, a 1×1 shortcut, and two images.
fn cases() -> Vec<Case> {
    vec![
        case(1, [28, 28], [3, 3], [1, 1], [[1, 1], [1, 1]]),
        case(3, [1, 1], [1, 1], [1, 1], [[0, 0], [0, 0]]),
        case(2, [1, 1], [3, 3], [1, 1], [[1, 1], [1, 1]]),
        case(7, [9, 6], [3, 2], [2, 1], [[1, 0], [2, 1]]),
        case(17, [14, 14], [3, 3], [2, 2], [[1, 1], [1, 1]]),
        Case {
            output_channels: 33,
            ..case(32, [14, 14], [1, 1], [2, 2], [[0, 0], [0, 0]])
        },
        Case {
            output_channels: 1,
            images: 2,
            ..case(4, [5, 7], [5, 3], [1, 3], [[2, 0], [0, 1]])
        },
    ]
}

/// `act(conv(x, K) + b + r)` in f64, straight from the definition.
fn definition(
    case: &Case,
    x: &[f32],
    k: &[f32],
    b: &[f32],
    r: Option<&[f32]>,
    relu: bool,
) -> Vec<f64> {
    let g = &case.geometry;
    let [out_h, out_w] = g.output();
    let (c_in, c_out) = (g.channels, case.output_channels);
    let [kh, kw] = g.kernel;
    let mut y = Vec::new();
    for n in 0..case.images {
        for (o, &bias) in b.iter().enumerate().take(c_out) {
            for oy in 0..out_h {
                for ox in 0..out_w {
                    let mut sum = bias as f64;
                    for c in 0..c_in {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy =
                                    (oy * g.strides[0] + ky) as isize - g.pad_before[0] as isize;
                                let ix =
                                    (ox * g.strides[1] + kx) as isize - g.pad_before[1] as isize;
                                if iy < 0
                                    || ix < 0
                                    || iy >= g.input[0] as isize
                                    || ix >= g.input[1] as isize
                                {
                                    continue;
                                }
                                let xi = ((n * c_in + c) * g.input[0] + iy as usize) * g.input[1]
                                    + ix as usize;
                                let ki = ((o * c_in + c) * kh + ky) * kw + kx;
                                sum += x[xi] as f64 * k[ki] as f64;
                            }
                        }
                    }
                    let at = y.len();
                    if let Some(r) = r {
                        sum += r[at] as f64;
                    }
                    y.push(if relu { sum.max(0.0) } else { sum });
                }
            }
        }
    }
    y
}

#[test]
fn every_kernel_matches_the_definition() {
    for (i, case) in cases().iter().enumerate() {
        let g = &case.geometry;
        let [out_h, out_w] = g.output();
        let x = values(case.images * g.channels * g.input[0] * g.input[1], 1);
        let k = values(case.output_channels * g.patch_len(), 2);
        let b = values(case.output_channels, 3);
        let r = values(case.images * case.output_channels * out_h * out_w, 4);
        for isa in Isa::available_float() {
            for (residual, relu) in [(false, false), (true, true), (false, true)] {
                let mut op = DenseConv::new(isa, *g, &k, Some(&b)).unwrap();
                op.residual = residual;
                op.relu = relu;
                let r = residual.then_some(&r[..]);
                let mut out = vec![
                    f32::NAN;
                    r.map_or(0, <[f32]>::len)
                        .max(case.images * case.output_channels * out_h * out_w)
                ];
                on_two_threads(|| op.apply(&x, r, &mut out));
                let expected = definition(case, &x, &k, &b, r, relu);
                for (at, (&got, &want)) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{isa}, case {i} ({g:?}), residual {residual}, relu {relu}, at {at}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_kernel_of_the_wrong_size_or_an_empty_geometry_is_an_error() {
    let g = case(3, [4, 4], [3, 3], [1, 1], [[1, 1], [1, 1]]).geometry;
    assert!(DenseConv::new(Isa::Portable, g, &values(27 * 2 + 1, 1), None).is_err());
    let too_big = Geometry {
        kernel: [7, 7],
        ..g
    };
    assert!(DenseConv::new(Isa::Portable, too_big, &values(3 * 49, 1), None).is_err());
    let no_stride = Geometry {
        strides: [0, 1],
        ..g
    };
    assert!(DenseConv::new(Isa::Portable, no_stride, &values(27, 1), None).is_err());
}

/// tract's `Conv` (with a ReLU, or a residual Add and a ReLU, after it) in a typed model.
fn tract_model(case: &Case, tail: Tail) -> (TypedModel, TVec<TValue>) {
    let g = &case.geometry;
    let mut model = TypedModel::default();
    let shape = [case.images, g.channels, g.input[0], g.input[1]];
    let x = model.add_source("x", f32::fact(shape)).unwrap();
    let kernel_shape = [case.output_channels, g.channels, g.kernel[0], g.kernel[1]];
    let kernel = tensor1(&values(kernel_shape.iter().product(), 2))
        .into_shape(&kernel_shape)
        .unwrap();
    let kernel = model.add_const("kernel", kernel).unwrap();
    let bias = model
        .add_const("bias", tensor1(&values(case.output_channels, 3)))
        .unwrap();
    let conv = Conv {
        pool_spec: PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: g.kernel.to_vec().into(),
            padding: PaddingSpec::Explicit(
                g.pad_before.to_vec().into(),
                g.pad_after.to_vec().into(),
            ),
            dilations: None,
            strides: Some(g.strides.to_vec().into()),
            input_channels: g.channels,
            output_channels: case.output_channels,
        },
        kernel_fmt: KernelFormat::OIHW,
        group: 1,
        q_params: None,
    };
    let mut y = model.wire_node("conv", conv, &[x, kernel, bias]).unwrap()[0];
    let mut inputs = tvec![
        tensor1(&values(shape.iter().product(), 1))
            .into_shape(&shape)
            .unwrap()
            .into_tvalue()
    ];
    if tail == Tail::ResidualRelu {
        let out_shape = model
            .outlet_fact(y)
            .unwrap()
            .shape
            .as_concrete()
            .unwrap()
            .to_vec();
        let r = model.add_source("r", f32::fact(&out_shape)).unwrap();
        y = model
            .wire_node("add", TypedBinOp(Box::new(Add), None), &[y, r])
            .unwrap()[0];
        let r = tensor1(&values(out_shape.iter().product(), 4));
        inputs.push(r.into_shape(&out_shape).unwrap().into_tvalue());
    }
    if tail != Tail::None {
        let zero = model.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
        y = model
            .wire_node("relu", TypedBinOp(Box::new(Max), None), &[y, zero])
            .unwrap()[0];
    }
    model.select_output_outlets(&[y]).unwrap();
    (model, inputs)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tail {
    None,
    Relu,
    ResidualRelu,
}

#[test]
fn tracts_convolutions_are_fused_with_their_residual_and_relu() {
    for (i, case) in cases().iter().enumerate() {
        for tail in [Tail::None, Tail::Relu, Tail::ResidualRelu] {
            let (model, inputs) = tract_model(case, tail);
            let run = |model: TypedModel| {
                let plan = model.into_runnable().unwrap();
                let output = plan.run(inputs.clone()).unwrap()[0].clone().into_tensor();
                let values = output
                    .try_as_plain_ram()
                    .unwrap()
                    .as_slice::<f32>()
                    .unwrap()
                    .to_vec();
                (output.shape().to_vec(), values)
            };
            let expected = run(model.clone());
            for isa in Isa::available_float() {
                let mut fused = model.clone();
                assert_eq!(fuse_conv(&mut fused, isa).unwrap(), 1);
                let ops: Vec<String> = fused
                    .nodes()
                    .iter()
                    .map(|n| n.op.name().to_string())
                    .collect();
                let conv = fused
                    .nodes()
                    .iter()
                    .find_map(|n| n.op_as::<DenseConv>())
                    .unwrap();
                assert_eq!(
                    (conv.residual, conv.relu),
                    (tail == Tail::ResidualRelu, tail != Tail::None),
                    "{ops:?}"
                );
                assert!(!ops.iter().any(|op| op == "Max" || op == "Add"), "{ops:?}");
                let got = run(fused);
                assert_eq!(got.0, expected.0);
                for (g, e) in got.1.iter().zip(&expected.1) {
                    assert!(
                        (g - e).abs() <= 2e-5 * (1.0 + e.abs()),
                        "{isa}, case {i}, {tail:?}: {g} vs {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn grouped_and_dilated_convolutions_stay_tracts() {
    let case = case(4, [6, 6], [3, 3], [1, 1], [[1, 1], [1, 1]]);
    let (model, _) = tract_model(&case, Tail::None);
    let conv = model.nodes().iter().find(|n| n.op_is::<Conv>()).unwrap().id;
    for change in [0, 1] {
        let mut model = model.clone();
        let node = model.node_mut(conv);
        let mut op = node.op_as::<Conv>().unwrap().clone();
        if change == 0 {
            op.pool_spec.dilations = Some(tvec![2, 2]);
        } else {
            op.group = 2;
            op.pool_spec.output_channels = 5;
        }
        node.op = Box::new(op);
        assert_eq!(fuse_conv(&mut model, Isa::best()).unwrap(), 0);
    }
}
