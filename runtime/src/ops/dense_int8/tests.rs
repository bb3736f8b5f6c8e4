//! Tests of [`DenseLinearInt8`](super::DenseLinearInt8): every kernel against the definition
//! and the fusions of quantized graphs.

use super::*;
use crate::ops::properties::seeded as values;
use crate::ops::rows::on_two_threads;

fn int8_values(len: usize, seed: u32) -> Vec<i8> {
    // The whole range, -128 included: the AVX2 kernel must not saturate on it.
    values(len, seed)
        .into_iter()
        .map(|v| (v * 128.0).round().clamp(-128.0, 127.0) as i8)
        .collect()
}

/// `x` as `kernel` sees it once quantized (`scale · (level − zero)`, rows of `depth`), and
/// the rows' scales.
fn as_quantized(kernel: Kernel, x: &[f32], depth: usize) -> (Vec<f64>, Vec<RowScale>) {
    let rows = x.len() / depth;
    let stride = depth.next_multiple_of(4);
    let mut q = vec![0u8; rows * stride];
    let mut scales = vec![RowScale::default(); rows];
    // SAFETY: the tests only take kernels this CPU runs (`available_kernels`).
    unsafe { quantize_rows(kernel, x, depth, stride, &mut q, &mut scales) };
    let level = |q: u8| match kernel.signed() {
        true => q as i8 as f64,
        false => q as f64,
    };
    let values = (0..rows * depth)
        .map(|at| {
            let RowScale { scale, zero } = scales[at / depth];
            scale as f64 * (level(q[at / depth * stride + at % depth]) - zero as f64)
        })
        .collect();
    (values, scales)
}

/// Each kernel against the definition on the same quantized rows: the integer sums are
/// exact, so only the f32 epilogue rounds. Every row-block and column remainder, depths
/// that are not multiples of four, GELU, the residual and the threaded path.
#[test]
fn every_kernel_matches_the_definition_on_odd_shapes() {
    for (rows, depth, width) in [
        (1, 1, 1),
        (5, 3, 17),
        (7, 16, 16),
        (13, 9, 33),
        (17, 64, 40),
        (23, 5, 70),
        (197, 130, 100),
    ] {
        let x = values(rows * depth, 1);
        let w = int8_values(depth * width, 2);
        let scales: Vec<f32> = values(width, 3)
            .iter()
            .map(|s| 0.01 + s.abs() / 50.0)
            .collect();
        let b = values(width, 4);
        let r = values(rows * width, 5);
        for isa in available_kernels() {
            for (gelu, residual) in [(false, false), (true, true)] {
                let shape = tvec![rows, width];
                let mut op =
                    DenseLinearInt8::new(isa, &w, false, &scales, Some(&b), depth, width, shape)
                        .unwrap();
                op.gelu = gelu;
                op.residual = residual;
                let residual = residual.then_some(&r[..]);
                let mut out = vec![f32::NAN; rows * width];
                on_two_threads(|| op.apply(&x, residual, &mut out));
                let (xq, _) = as_quantized(op.kernel, &x, depth);
                for i in 0..rows {
                    for c in 0..width {
                        let (mut sum, mut size) = (b[c] as f64, b[c].abs() as f64);
                        for d in 0..depth {
                            let xq = xq[i * depth + d];
                            // The operator takes −128 as −127.
                            let w = w[d * width + c].max(-127);
                            let term = xq * scales[c] as f64 * w as f64;
                            sum += term;
                            size += term.abs();
                        }
                        let mut expected = sum as f32;
                        if gelu {
                            expected = crate::ops::dense::gelu::<false>(expected);
                        }
                        if let Some(r) = residual {
                            expected += r[i * width + c];
                        }
                        let got = out[i * width + c];
                        assert!(
                            (got - expected).abs() <= 1e-5 * (1.0 + size as f32),
                            "{isa}, {rows}x{depth}x{width} at ({i}, {c}): {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
    /// Random shapes and values, NaN and infinities among them, on every kernel: the
    /// definition on the rows as quantized, and NaN out for a row with NaN or ±∞ in.
    #[test]
    fn every_kernel_agrees_with_the_definition_on_random_cases(case in random_case()) {
        let (rows, depth, width, x, w, scales) = case;
        for isa in available_kernels() {
            let shape = tvec![rows, width];
            let op = DenseLinearInt8::new(isa, &w, false, &scales, None, depth, width, shape)
                .unwrap();
            let mut out = vec![0.0; rows * width];
            op.apply(&x, None, &mut out);
            let (xq, row_scales) = as_quantized(op.kernel, &x, depth);
            for i in 0..rows {
                proptest::prop_assert_eq!(
                    row_scales[i].scale.is_nan(),
                    x[i * depth..][..depth].iter().any(|v| !v.is_finite())
                );
                for c in 0..width {
                    let terms = (0..depth).map(|d| {
                        xq[i * depth + d] * scales[c] as f64 * w[d * width + c].max(-127) as f64
                    });
                    let size: f64 = terms.clone().map(f64::abs).sum::<f64>() + 1.0;
                    let want = terms.sum::<f64>();
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

fn random_case()
-> impl proptest::strategy::Strategy<Value = (usize, usize, usize, Vec<f32>, Vec<i8>, Vec<f32>)> {
    use crate::ops::properties::values;
    use proptest::prelude::*;
    (1..=24usize, 1..=70usize, 1..=100usize, any::<bool>()).prop_flat_map(
        |(rows, depth, width, specials)| {
            (
                Just(rows),
                Just(depth),
                Just(width),
                values(rows * depth, specials),
                prop::collection::vec(any::<i8>(), depth * width),
                prop::collection::vec(0.001f32..0.05, width),
            )
        },
    )
}

#[test]
fn rows_are_quantized_to_their_own_range_with_zero_exact() {
    let quantize = portable::quantize_rows;
    let x = [-1.0, 0.0, 3.0, 0.5, /* next row */ 2.0, 4.0, 1.0, 0.0];
    let mut q = [7u8; 10];
    let mut scales = [RowScale::default(); 2];
    quantize(&x, 4, 5, 255, &mut q, &mut scales);
    // Row 0: [-1, 3] over 255 levels; zero maps to a whole level.
    assert!((scales[0].scale - 4.0 / 255.0).abs() < 1e-7);
    assert_eq!(scales[0].zero, (255.0f32 / 4.0).round());
    assert_eq!(q[0], 0);
    assert_eq!(q[1] as f32, scales[0].zero);
    assert_eq!(q[2], 255);
    // The padding byte is left alone.
    assert_eq!(q[4], 7);
    // Row 1 is positive: its range is widened to hold zero. 127.5 rounds to even.
    assert_eq!(scales[1].zero, 0.0);
    assert_eq!(&q[5..9], &[128, 255, 64, 0]);
    // A 7-bit kernel's levels.
    quantize(&x, 4, 5, 127, &mut q, &mut scales);
    assert_eq!(q[6], 127);
}

/// Every kernel's quantizer gives the portable one's bytes and scales, on rows longer and
/// shorter than a vector, with NaN and infinities (which give levels of 0, a NaN scale and
/// no panic).
#[test]
fn every_quantizer_matches_the_portable_one() {
    for depth in [1, 3, 16, 17, 64, 130] {
        let rows = 5;
        let mut x = values(rows * depth, depth as u32);
        for (i, v) in x.iter_mut().enumerate() {
            *v *= (1 + i % 7) as f32;
        }
        x[depth / 2] = f32::NAN;
        x[depth + depth / 2] = f32::INFINITY;
        let stride = depth.next_multiple_of(4);
        for isa in available_kernels() {
            let kernel = Kernel::of(isa);
            let mut expected = (vec![9u8; rows * stride], vec![RowScale::default(); rows]);
            let levels = kernel.levels();
            portable::quantize_rows(&x, depth, stride, levels, &mut expected.0, &mut expected.1);
            let mut got = (vec![9u8; rows * stride], vec![RowScale::default(); rows]);
            // SAFETY: the kernel runs here (`available_kernels`).
            unsafe { quantize_rows(kernel, &x, depth, stride, &mut got.0, &mut got.1) };
            if kernel.signed() {
                // Stored `q − 128`, with the zero point moved alike.
                for (row, scale) in got.0.chunks_exact_mut(stride).zip(&mut got.1) {
                    row[..depth].iter_mut().for_each(|q| *q ^= 0x80);
                    scale.zero += 128.0;
                }
            }
            assert_eq!(got.0, expected.0, "{isa}, depth {depth}");
            let same = |a: &RowScale, b: &RowScale| {
                a.zero == b.zero && (a.scale == b.scale || a.scale.is_nan() && b.scale.is_nan())
            };
            assert!(
                got.1.iter().zip(&expected.1).all(|(a, b)| same(a, b)),
                "{isa}, depth {depth}: {:?} vs {:?}",
                got.1,
                expected.1
            );
            // The rows holding NaN and infinity: NaN outputs, not a confident answer.
            assert!(got.1[0].scale.is_nan() && got.1[1].scale.is_nan(), "{isa}");
            assert!(got.1[2..].iter().all(|s| s.scale.is_finite()), "{isa}");
            assert_eq!(got.0[stride..][..depth.min(2)], [0u8; 2][..depth.min(2)]);
        }
    }
}
