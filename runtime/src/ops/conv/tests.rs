//! Tests of [`DenseConv`](super::DenseConv): every kernel against the definition, and the
//! fusion against tract's own convolution.

use super::*;
use crate::ops::properties::{run_model, seeded as values};
use crate::ops::rows::on_two_threads;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::math::{Add, Max};
use tract_onnx::tract_core::ops::nn::{DataFormat, Reduce, Reducer};

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
/// and uneven sizes, strides and paddings, a 1×1 shortcut, two images, and patches in chunks.
fn cases() -> Vec<Case> {
    vec![
        case(1, [28, 28], [3, 3], [1, 1], [[1, 1], [1, 1]]),
        // More patches than fit one chunk (`PATCH_CHUNK_BYTES`).
        case(32, [28, 28], [3, 3], [1, 1], [[1, 1], [1, 1]]),
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

/// Each of the `rows × columns` matrices in `values` (one per image) transposed: channels-first
/// images of `channels × pixels` to channels last, and `pixels × channels` back.
fn transposed(values: &[f32], rows: usize, columns: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for (from, to) in values
        .chunks_exact(rows * columns)
        .zip(out.chunks_exact_mut(rows * columns))
    {
        for r in 0..rows {
            for c in 0..columns {
                to[c * rows + r] = from[r * columns + c];
            }
        }
    }
    out
}

#[test]
fn every_kernel_matches_the_definition_in_every_layout() {
    use Layout::{ChannelsFirst as First, ChannelsLast as Last};
    for (i, case) in cases().iter().enumerate() {
        let g = &case.geometry;
        let [out_h, out_w] = g.output();
        let (in_pixels, out_pixels) = (g.input[0] * g.input[1], out_h * out_w);
        let x = values(case.images * g.channels * in_pixels, 1);
        let k = values(case.output_channels * g.patch_len(), 2);
        let b = values(case.output_channels, 3);
        let r = values(case.images * case.output_channels * out_pixels, 4);
        for isa in Isa::available_float() {
            for (residual, relu) in [(false, false), (true, true), (false, true)] {
                let expected = definition(case, &x, &k, &b, residual.then_some(&r[..]), relu);
                for layouts in [
                    [First; 3],
                    [Last, First, Last],
                    [First, Last, Last],
                    [Last, Last, First],
                ] {
                    let mut op = DenseConv::new(isa, *g, &k, Some(&b)).unwrap();
                    op.residual = residual;
                    op.relu = relu;
                    op.layouts = layouts;
                    let x = match layouts[0] {
                        First => x.clone(),
                        Last => transposed(&x, g.channels, in_pixels),
                    };
                    let r = match layouts[1] {
                        First => r.clone(),
                        Last => transposed(&r, case.output_channels, out_pixels),
                    };
                    let r = residual.then_some(&r[..]);
                    let mut out = vec![f32::NAN; expected.len()];
                    on_two_threads(|| op.apply(&x, r, &mut out));
                    if layouts[2] == Last {
                        out = transposed(&out, out_pixels, case.output_channels);
                    }
                    for (at, (&got, &want)) in out.iter().zip(&expected).enumerate() {
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{isa}, case {i} ({g:?}), residual {residual}, relu {relu}, \
                             {layouts:?}, at {at}: {got} vs {want}"
                        );
                    }
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
    let overflowing = Geometry {
        pad_after: [usize::MAX, 0],
        ..g
    };
    assert!(!overflowing.is_valid());
    let huge = Geometry {
        input: [1 << 15, 1 << 15],
        ..g
    };
    assert!(!huge.is_valid());
    let no_stride = Geometry {
        strides: [0, 1],
        ..g
    };
    assert!(DenseConv::new(Isa::Portable, no_stride, &values(27, 1), None).is_err());
}

/// tract's `Conv` of `x` by `case`'s geometry, with seeded kernel and bias.
fn wire_conv(model: &mut TypedModel, name: &str, x: OutletId, case: &Case, seed: u32) -> OutletId {
    let g = &case.geometry;
    let kernel_shape = [case.output_channels, g.channels, g.kernel[0], g.kernel[1]];
    let kernel = tensor1(&values(kernel_shape.iter().product(), seed))
        .into_shape(&kernel_shape)
        .unwrap();
    let kernel = model.add_const(format!("{name}.kernel"), kernel).unwrap();
    let bias = tensor1(&values(case.output_channels, seed + 1));
    let bias = model.add_const(format!("{name}.bias"), bias).unwrap();
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
    model.wire_node(name, conv, &[x, kernel, bias]).unwrap()[0]
}

fn wire_relu(model: &mut TypedModel, name: &str, x: OutletId) -> OutletId {
    let zero = model
        .add_const(format!("{name}.zero"), tensor4(&[[[[0f32]]]]))
        .unwrap();
    model
        .wire_node(name, TypedBinOp(Box::new(Max), None), &[x, zero])
        .unwrap()[0]
}

fn wire_add(model: &mut TypedModel, name: &str, a: OutletId, b: OutletId) -> OutletId {
    model
        .wire_node(name, TypedBinOp(Box::new(Add), None), &[a, b])
        .unwrap()[0]
}

fn concrete_shape(model: &TypedModel, outlet: OutletId) -> Vec<usize> {
    model
        .outlet_fact(outlet)
        .unwrap()
        .shape
        .as_concrete()
        .unwrap()
        .to_vec()
}

fn seeded_input(shape: &[usize], seed: u32) -> TValue {
    tensor1(&values(shape.iter().product(), seed))
        .into_shape(shape)
        .unwrap()
        .into_tvalue()
}

/// tract's `Conv` (with a ReLU, or a residual Add and a ReLU, after it) in a typed model.
fn tract_model(case: &Case, tail: Tail) -> (TypedModel, TVec<TValue>) {
    let g = &case.geometry;
    let mut model = TypedModel::default();
    let shape = [case.images, g.channels, g.input[0], g.input[1]];
    let x = model.add_source("x", f32::fact(shape)).unwrap();
    let mut y = wire_conv(&mut model, "conv", x, case, 2);
    let mut inputs = tvec![seeded_input(&shape, 1)];
    if tail == Tail::ResidualRelu {
        let out_shape = concrete_shape(&model, y);
        let r = model.add_source("r", f32::fact(&out_shape)).unwrap();
        y = wire_add(&mut model, "add", y, r);
        inputs.push(seeded_input(&out_shape, 4));
    }
    if tail != Tail::None {
        y = wire_relu(&mut model, "relu", y);
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
            let expected = run_model(model.clone(), &inputs);
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
                let got = run_model(fused, &inputs);
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

/// A residual block as the exporter writes it: a stem, two 3×3 convolutions and a strided 1×1
/// shortcut, with their ReLUs and residual Adds, ending in a global average pool.
#[test]
fn convolutions_that_feed_convolutions_hand_over_channels_last() {
    let conv = |channels, input, kernel, strides, pad, output_channels| Case {
        output_channels,
        images: 2,
        ..case(channels, input, kernel, strides, [pad, pad])
    };
    let mut model = TypedModel::default();
    let shape = [2, 3, 9, 7];
    let x = model.add_source("x", f32::fact(shape)).unwrap();
    let stem = wire_conv(
        &mut model,
        "stem",
        x,
        &conv(3, [9, 7], [3, 3], [1, 1], [1, 1], 8),
        10,
    );
    let stem = wire_relu(&mut model, "stem.relu", stem);
    let first = wire_conv(
        &mut model,
        "first",
        stem,
        &conv(8, [9, 7], [3, 3], [2, 2], [1, 1], 12),
        20,
    );
    let first = wire_relu(&mut model, "first.relu", first);
    let shortcut = wire_conv(
        &mut model,
        "shortcut",
        stem,
        &conv(8, [9, 7], [1, 1], [2, 2], [0, 0], 12),
        30,
    );
    let second = wire_conv(
        &mut model,
        "second",
        first,
        &conv(12, [5, 4], [3, 3], [1, 1], [1, 1], 12),
        40,
    );
    let sum = wire_add(&mut model, "residual", second, shortcut);
    let block = wire_relu(&mut model, "relu", sum);
    let pool = model
        .wire_node("pool", Reduce::new(tvec![2, 3], Reducer::Sum), &[block])
        .unwrap()[0];
    model.select_output_outlets(&[pool]).unwrap();
    let inputs = tvec![seeded_input(&shape, 1)];
    let expected = run_model(model.clone(), &inputs);
    for isa in Isa::available_float() {
        let mut fused = model.clone();
        assert_eq!(fuse_conv(&mut fused, isa).unwrap(), 4);
        // Every value passed from one DenseConv to another is channels last, and only those:
        // three of the four outputs (the last feeds the pool), and every input but the
        // stem's (which of the Add's two convolutions takes it in is the fusion's choice).
        let is_conv = |outlet: OutletId| fused.node(outlet.node).op_is::<DenseConv>();
        let mut handed_over = 0;
        for node in fused.nodes().iter().filter(|n| n.op_is::<DenseConv>()) {
            let op = node.op_as::<DenseConv>().unwrap();
            for (slot, &input) in node.inputs.iter().enumerate() {
                let want = if is_conv(input) {
                    Layout::ChannelsLast
                } else {
                    Layout::ChannelsFirst
                };
                assert_eq!(op.layouts[slot], want, "{}", node.name);
            }
            let readers = &node.outputs[0].successors;
            let to_convs = readers
                .iter()
                .all(|r| fused.node(r.node).op_is::<DenseConv>());
            let want = if to_convs {
                Layout::ChannelsLast
            } else {
                Layout::ChannelsFirst
            };
            assert_eq!(op.layouts[2], want, "{}", node.name);
            handed_over += to_convs as usize;
        }
        assert_eq!(handed_over, 3);
        let got = run_model(fused, &inputs);
        assert_eq!(got.0, expected.0);
        for (g, e) in got.1.iter().zip(&expected.1) {
            assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{isa}: {g} vs {e}");
        }
    }
}
