//! Tests of [`TokenMajorAttention`](super::TokenMajorAttention): every kernel against the
//! definition, and the patterns it replaces.

use super::fusion::einsum_form;
use super::*;
use crate::ops::rows::on_two_threads;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// Attention in double precision, straight from the definition.
fn reference(shape: Shape, scale: f32, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    reference_with_bias(shape, scale, None, q, k, v)
}

/// The definition with each window's scores plus `bias` (its values and how many windows they
/// cover) before the softmax.
fn reference_with_bias(
    shape: Shape,
    scale: f32,
    bias: Option<(&[f32], usize)>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    let Shape {
        windows,
        queries,
        keys,
        heads,
        key_size,
        value_size,
    } = shape;
    let mut out = vec![0f32; windows * queries * heads * value_size];
    for w in 0..windows {
        let q = &q[w * queries * heads * key_size..];
        let k = &k[w * keys * heads * key_size..];
        let v = &v[w * keys * heads * value_size..];
        let out = &mut out[w * queries * heads * value_size..];
        for i in 0..queries {
            for h in 0..heads {
                let scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        let dot = (0..key_size)
                            .map(|d| {
                                q[(i * heads + h) * key_size + d] as f64
                                    * k[(j * heads + h) * key_size + d] as f64
                            })
                            .sum::<f64>();
                        let added = bias.map_or(0.0, |(values, bias_windows)| {
                            let window = if bias_windows == 1 { 0 } else { w };
                            values[((window * heads + h) * queries + i) * keys + j] as f64
                        });
                        dot * scale as f64 + added
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for c in 0..value_size {
                    let value: f64 = (0..keys)
                        .map(|j| exps[j] / sum * v[(j * heads + h) * value_size + c] as f64)
                        .sum();
                    out[(i * heads + h) * value_size + c] = value as f32;
                }
            }
        }
    }
    out
}

fn values(len: usize, seed: u32) -> Vec<f32> {
    // A fixed spread of values in [-2, 2), no generator needed.
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32)
        .map(|x| x / (1 << 24) as f32 * 4.0 - 2.0)
        .collect()
}

/// An attention case of these sizes: q, k, v, the scale and the definition's answer.
struct Case {
    shape: Shape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    scale: f32,
    expected: Vec<f32>,
}

fn case((queries, keys, heads, key_size, value_size): (usize, usize, usize, usize, usize)) -> Case {
    let shape = Shape {
        windows: 1,
        queries,
        keys,
        heads,
        key_size,
        value_size,
    };
    let q = values(queries * heads * key_size, 1);
    let k = values(keys * heads * key_size, 2);
    let v = values(keys * heads * value_size, 3);
    let scale = 1.0 / (key_size as f32).sqrt();
    let expected = reference(shape, scale, &q, &k, &v);
    Case {
        shape,
        q,
        k,
        v,
        scale,
        expected,
    }
}

/// Runs every f32 kernel on two threads and checks each output against `expected`.
fn every_kernel_matches(
    shape: Shape,
    scale: f32,
    bias: Option<(&[f32], usize)>,
    [q, k, v]: [&[f32]; 3],
    expected: &[f32],
) {
    for isa in Isa::available_float() {
        let mut out = vec![f32::NAN; expected.len()];
        on_two_threads(|| attend(shape, scale, bias, isa, q, k, v, &mut out)).unwrap();
        for (got, want) in out.iter().zip(expected) {
            assert!(
                (got - want).abs() <= 2e-6 * (1.0 + want.abs()),
                "{isa}, {shape:?}, bias over {:?}: {got} against {want}",
                bias.map(|(_, windows)| windows)
            );
        }
    }
}

#[test]
fn matches_the_definition_on_every_block_and_column_remainder() {
    // Tokens and sizes around ROWS and TILE, so partial blocks and tiles run.
    for sizes in [
        (1, 1, 1, 1, 1),
        (5, 7, 2, 3, 9),
        (17, 17, 4, 16, 16),
        (50, 50, 4, 16, 16),
        (9, 33, 3, 24, 40),
        (7, 9, 2, 33, 33),
        (6, 130, 1, 64, 25),
        // Above rows::PARALLEL_MACS: the rows are split between threads when there are several.
        (203, 203, 2, 16, 16),
        // Smaller again: the buffers reused from the larger ones are longer than needed.
        (5, 7, 2, 3, 9),
    ] {
        let Case {
            shape,
            q,
            k,
            v,
            scale,
            expected,
        } = case(sizes);
        every_kernel_matches(shape, scale, None, [&q, &k, &v], &expected);
    }
}

#[test]
fn windows_and_a_bias_match_the_definition() {
    // (windows, windows the bias covers: none, one for all, or one each), at a Swin's window
    // sizes among others; the largest runs its windows on two threads.
    for sizes in [
        (5, 7, 2, 3, 9),
        (16, 16, 2, 4, 4),
        (49, 49, 2, 16, 16),
        (36, 36, 4, 16, 16),
    ] {
        for (windows, bias_windows) in [
            (1, None),
            (1, Some(1)),
            (4, Some(1)),
            (4, Some(4)),
            (3, None),
        ] {
            let (queries, keys, heads, key_size, value_size) = sizes;
            let shape = Shape {
                windows,
                queries,
                keys,
                heads,
                key_size,
                value_size,
            };
            let q = values(windows * queries * heads * key_size, 1);
            let k = values(windows * keys * heads * key_size, 2);
            let v = values(windows * keys * heads * value_size, 3);
            // A bias like a Swin's: small values, and -100 on some pairs, as its mask.
            let bias: Option<Vec<f32>> = bias_windows.map(|w| {
                values(w * heads * queries * keys, 4)
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| if i % 7 == 3 { b - 100.0 } else { 0.1 * b })
                    .collect()
            });
            let bias = bias.as_deref().zip(bias_windows);
            let scale = 1.0 / (key_size as f32).sqrt();
            let expected = reference_with_bias(shape, scale, bias, &q, &k, &v);
            every_kernel_matches(shape, scale, bias, [&q, &k, &v], &expected);
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]
    /// Random shapes and values, NaN and infinities among them, on every f32 kernel.
    #[test]
    fn every_kernel_agrees_with_the_definition_on_random_cases(
        (shape, q, k, v) in random_case(),
    ) {
        let scale = 1.0 / (shape.key_size as f32).sqrt();
        let expected = reference(shape, scale, &q, &k, &v);
        for isa in Isa::available_float() {
            let mut out = vec![0.0; expected.len()];
            attend(shape, scale, None, isa, &q, &k, &v, &mut out).unwrap();
            for (&got, &want) in out.iter().zip(&expected) {
                proptest::prop_assert!(
                    crate::ops::properties::agrees(got, want as f64, 1e-5 * (1.0 + want.abs() as f64)),
                    "{isa}, {shape:?}: {got} vs {want}"
                );
            }
        }
    }
}

fn random_case() -> impl proptest::strategy::Strategy<Value = (Shape, Vec<f32>, Vec<f32>, Vec<f32>)>
{
    use crate::ops::properties::values;
    use proptest::prelude::*;
    (
        1..=20usize,
        1..=70usize,
        1..=3usize,
        1..=40usize,
        1..=40usize,
        any::<bool>(),
    )
        .prop_flat_map(|(queries, keys, heads, key_size, value_size, specials)| {
            let shape = Shape {
                windows: 1,
                queries,
                keys,
                heads,
                key_size,
                value_size,
            };
            (
                Just(shape),
                values(queries * heads * key_size, specials),
                values(keys * heads * key_size, specials),
                values(keys * heads * value_size, specials),
            )
        })
}

#[test]
fn a_nan_key_makes_its_heads_rows_nan_not_a_confident_answer() {
    let Case {
        shape,
        q,
        mut k,
        v,
        scale,
        ..
    } = case((5, 40, 2, 16, 16));
    // Key 3 of head 0 is NaN in one component: every score of head 0 meets it.
    k[(3 * shape.heads) * shape.key_size] = f32::NAN;
    let expected = reference(shape, scale, &q, &k, &v);
    for isa in Isa::available_float() {
        let mut out = vec![0.0; expected.len()];
        attend(shape, scale, None, isa, &q, &k, &v, &mut out).unwrap();
        for (index, (got, want)) in out.iter().zip(&expected).enumerate() {
            let head = index / shape.value_size % shape.heads;
            if head == 0 {
                assert!(got.is_nan(), "{isa}: {got} at {index}");
            } else {
                assert!((got - want).abs() <= 2e-6 * (1.0 + want.abs()), "{isa}");
            }
        }
    }
}

/// The int8 products (AVX-512 VNNI) against the definition: within int8's rounding, on
/// partial blocks, tiles and groups of four, and on two threads. Skipped on a CPU without
/// VNNI (it says so).
#[test]
#[cfg(target_arch = "x86_64")]
fn int8_products_stay_within_rounding_of_the_definition() {
    if !Isa::Avx512Vnni.runs_here() {
        eprintln!("no AVX-512 VNNI here: the int8 attention kernel is not tested");
        return;
    }
    for sizes in [
        (1, 1, 1, 1, 1),
        (5, 7, 2, 3, 9),
        (17, 33, 4, 16, 16),
        (9, 33, 3, 24, 40),
        (7, 9, 2, 33, 33),
        (203, 203, 2, 32, 32),
        (13, 130, 1, 64, 25),
    ] {
        let Case {
            shape,
            q,
            k,
            v,
            scale,
            expected,
        } = case(sizes);
        let mut out = vec![f32::NAN; expected.len()];
        // The kernel itself, whatever the number of keys (`attend` takes it from 128).
        // SAFETY: the CPU has AVX-512 VNNI (checked above).
        on_two_threads(|| unsafe { int8::attend(shape, scale, &q, &k, &v, &mut out) });
        let errors: Vec<f32> = out
            .iter()
            .zip(&expected)
            .map(|(g, e)| (g - e).abs())
            .collect();
        let worst = errors.iter().cloned().fold(0f32, f32::max);
        let mean = errors.iter().sum::<f32>() / errors.len() as f32;
        // v is within ±2: a wrong scale or zero point errs by tenths or more.
        assert!(
            worst < 0.05 && mean < 0.01,
            "{shape:?}: worst {worst}, mean {mean}"
        );
    }
}

/// A NaN key makes its head's rows NaN and a NaN value its column, in int8 as in f32.
#[test]
#[cfg(target_arch = "x86_64")]
fn int8_products_keep_nan_where_f32_does() {
    if !Isa::Avx512Vnni.runs_here() {
        eprintln!("no AVX-512 VNNI here: the int8 attention kernel is not tested");
        return;
    }
    let Case {
        shape,
        q,
        mut k,
        mut v,
        scale,
        ..
    } = case((5, 40, 2, 16, 16));
    let (heads, value_size) = (shape.heads, shape.value_size);
    // Key 3 of head 0, and column 7 of key 2's value in head 1.
    k[(3 * heads) * shape.key_size] = f32::NAN;
    v[(2 * heads + 1) * value_size + 7] = f32::NAN;
    let expected = reference(shape, scale, &q, &k, &v);
    let mut out = vec![0.0; expected.len()];
    // SAFETY: the CPU has AVX-512 VNNI (checked above).
    unsafe { int8::attend(shape, scale, &q, &k, &v, &mut out) };
    for (index, (got, want)) in out.iter().zip(&expected).enumerate() {
        let (head, column) = (index / value_size % heads, index % value_size);
        if head == 0 || column == 7 {
            assert!(got.is_nan() && want.is_nan(), "{got} at {index}");
        } else {
            assert!((got - want).abs() < 0.05, "{got} vs {want} at {index}");
        }
    }
}

#[test]
fn einsums_are_read_up_to_labels_and_unit_axes() {
    let form = |shapes: [&[usize]; 2], axes: &str| {
        let mut model = TypedModel::default();
        let a = model.add_source("a", f32::fact(shapes[0])).unwrap();
        let b = model.add_source("b", f32::fact(shapes[1])).unwrap();
        let op = EinSum::new(axes.parse().unwrap(), f32::datum_type());
        let out = model.wire_node("e", op, &[a, b]).unwrap()[0];
        einsum_form(&model, model.node(out.node)).unwrap().unwrap()
    };
    let plain: [&[usize]; 2] = [&[2, 3, 4], &[5, 3, 4]];
    let expected = ([vec![], vec![]], vec![], "abc,dbc->bad".to_string());
    assert_eq!(form(plain, "mbk,nbk->bmn"), expected);
    assert_eq!(form(plain, "xyz,wyz->yxw"), expected);
    assert_ne!(form(plain, "mbk,nbk->bnm").2, expected.2);
    // torch's q and k: [tokens, 1, heads, d] slices of the fused QKV output.
    let sliced: [&[usize]; 2] = [&[2, 1, 3, 4], &[5, 1, 3, 4]];
    let expected = ([vec![1], vec![1]], vec![], "abc,dbc->bad".to_string());
    assert_eq!(form(sliced, "mdbk,ncbk->bmn"), expected);
    // An int8 file's context: a unit axis in front of the output, in neither input.
    let context: [&[usize]; 2] = [&[3, 2, 5], &[5, 3, 4]];
    let expected = ([vec![], vec![]], vec![0], "abc,cad->bad".to_string());
    assert_eq!(form(context, "bmk,kbn->ambn"), expected);
    // A unit axis that is kept in the output is part of the form.
    let unit_heads: [&[usize]; 2] = [&[2, 1, 4], &[5, 1, 4]];
    assert_eq!(
        form(unit_heads, "mbk,nbk->bmn").0,
        [Vec::<usize>::new(), vec![]]
    );
}

#[test]
fn a_nested_evaluation_gets_its_own_buffer() {
    thread_local! {
        static BUFFER: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    let inner_len = with_buffer(&BUFFER, |outer| {
        outer.push(1.0);
        with_buffer(&BUFFER, |inner| inner.len())
    });
    assert_eq!(inner_len, 0);
    assert_eq!(with_buffer(&BUFFER, |kept| kept.len()), 1);
}
