//! A linear layer (`x W + b`, W a constant) as one operator that never packs its activations.
//!
//! tract 0.23.9 turns each projection and MLP product into a packing operator (the
//! activations rearranged into its kernel layout, every run) and a matrix product; on the
//! `video` preset the packing alone was 7 % of the inference, and the product scaled poorly
//! to a second core. [`DenseLinear`] rearranges W once, at load, into column panels, and its
//! kernel reads the activations' rows where they are: each step broadcasts one value from
//! each row of a block against one row of a panel, so the block of products stays in
//! registers and the bias is where the sums start. [`fuse_dense`] puts it in place of each
//! f32 EinSum with a constant right-hand side (and the bias Add after it) in a decluttered
//! model.

use std::sync::Arc;

use crate::ops::patterns::is_bin;
use crate::ops::rows::for_each_share;
use crate::ops::{AlignedBuffer, Isa};
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::GeluExact;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod portable;

pub(crate) use portable::gelu;

/// `y = act(x W + b) + r` over the last axis of a contiguous f32 `x` (`[rows…, depth]`, any
/// leading axes), with W `[depth, width]` and b `[width]` held by the operator, `act` the
/// identity or exact GELU, and `r` an optional second input of the output's shape (the
/// residual stream).
#[derive(Debug, Clone, PartialEq)]
pub struct DenseLinear {
    /// The kernel's instruction set.
    pub isa: Isa,
    /// W in panels as wide as the kernel's block (`DenseLinear::block`), `[panel][depth][columns]`,
    /// zero-padded.
    panels: Arc<AlignedBuffer>,
    /// b zero-padded to whole panels (zeros when the layer has none).
    bias: Arc<Vec<f32>>,
    depth: usize,
    width: usize,
    /// The output's shape: the product's, unit axes included.
    output_shape: TVec<usize>,
    /// GELU (erf form) applied to `x W + b`.
    pub gelu: bool,
    /// A second input is added last.
    pub residual: bool,
}

impl Eq for DenseLinear {}

impl DenseLinear {
    /// The operator for `weight` (row-major `[depth, width]`, or `[width, depth]` if
    /// `transposed`, as torch's `Gemm` stores it) and an optional `bias`, computed by `isa`'s
    /// kernel.
    pub fn new(
        isa: Isa,
        weight: &[f32],
        transposed: bool,
        bias: Option<&[f32]>,
        depth: usize,
        width: usize,
        output_shape: TVec<usize>,
    ) -> TractResult<DenseLinear> {
        ensure!(weight.len() == depth * width && depth > 0 && width > 0);
        ensure!(output_shape.last() == Some(&width));
        let isa = isa.float();
        let (_, columns) = Self::block(isa, width);
        let panel_count = width.div_ceil(columns);
        let mut panels = AlignedBuffer::zeroed(panel_count * depth * columns);
        for d in 0..depth {
            for c in 0..width {
                let w = if transposed {
                    weight[c * depth + d]
                } else {
                    weight[d * width + c]
                };
                panels[((c / columns) * depth + d) * columns + c % columns] = w;
            }
        }
        let mut padded_bias = vec![0f32; panel_count * columns];
        if let Some(bias) = bias {
            ensure!(bias.len() == width);
            padded_bias[..width].copy_from_slice(bias);
        }
        Ok(DenseLinear {
            isa,
            panels: Arc::new(panels),
            bias: Arc::new(padded_bias),
            depth,
            width,
            output_shape,
            gelu: false,
            residual: false,
        })
    }

    /// The rows and columns of the block of sums the kernel keeps in registers for a layer
    /// `width` wide; W's panels are as wide as the block.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn block(isa: Isa, width: usize) -> (usize, usize) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::block(width),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => (neon::ROWS, portable::COLUMNS),
            _ => (portable::ROWS, portable::COLUMNS),
        }
    }
}

impl Op for DenseLinear {
    fn name(&self) -> StaticName {
        "DenseLinear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let gelu = if self.gelu { ", GELU" } else { "" };
        let residual = if self.residual { ", + residual" } else { "" };
        Ok(vec![format!(
            "{}x{}{gelu}{residual}, {}",
            self.depth, self.width, self.isa
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for DenseLinear {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (depth, width) = (self.depth, self.width);
        eval_dense(
            inputs,
            self.residual,
            depth,
            width,
            &self.output_shape,
            |x, r, out| self.apply(x, r, out),
        )
    }
}

/// The evaluation the dense operators share: the inputs checked (f32, contiguous, whole rows
/// of `depth`, and a residual of the output's size if `residual`), then `apply(x, residual,
/// out)` into a new output of `output_shape`.
pub(crate) fn eval_dense(
    inputs: TVec<TValue>,
    residual: bool,
    depth: usize,
    width: usize,
    output_shape: &[usize],
    apply: impl FnOnce(&[f32], Option<&[f32]>, &mut [f32]),
) -> TractResult<TVec<TValue>> {
    ensure!(inputs.len() == 1 + residual as usize);
    for input in &inputs {
        ensure!(input.datum_type() == f32::datum_type());
        ensure!(input.strides() == &*Tensor::natural_strides(input.shape()));
    }
    let x = &inputs[0];
    let rows = output_shape.iter().product::<usize>() / width;
    ensure!(
        x.len() == rows * depth,
        "a {depth}x{width} linear layer got input {:?}",
        x.shape()
    );
    // SAFETY: f32 has no invalid bit patterns, and `apply` writes every value.
    let mut output = unsafe { Tensor::uninitialized::<f32>(output_shape)? };
    {
        let x = x.try_as_plain_ram()?;
        let residual = inputs.get(1).map(|r| r.try_as_plain_ram()).transpose()?;
        let residual = residual.as_ref().map(|r| r.as_slice::<f32>()).transpose()?;
        if let Some(residual) = residual {
            ensure!(residual.len() == output.len(), "residual of the wrong size");
        }
        let mut out = output.try_as_plain_ram_mut()?;
        apply(x.as_slice()?, residual, out.as_slice_mut()?);
    }
    Ok(tvec!(output.into_tvalue()))
}

impl TypedOp for DenseLinear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 + self.residual as usize);
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()));
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

impl DenseLinear {
    /// `y` for `x` of whole rows, the rows spread over the inference threads.
    pub(crate) fn apply(&self, x: &[f32], residual: Option<&[f32]>, out: &mut [f32]) {
        let macs = x.len() * self.width;
        let (block, _) = Self::block(self.isa, self.width);
        for_each_share(out, self.width, block, macs, |first_row, out| {
            let rows = out.len() / self.width;
            let x = &x[first_row * self.depth..][..rows * self.depth];
            let residual = residual.map(|r| &r[first_row * self.width..][..out.len()]);
            self.rows(x, residual, out);
        });
    }

    /// The output rows `out` from the rows `x` (and `residual`), on the operator's kernel.
    fn rows(&self, x: &[f32], residual: Option<&[f32]>, out: &mut [f32]) {
        assert!(
            self.isa.runs_here(),
            "{} kernel on a CPU without it",
            self.isa
        );
        match self.isa {
            // SAFETY: the CPU has the features the kernels are compiled for (checked above).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::rows(self, x, residual, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::rows(self, x, residual, out) },
            // SAFETY: every aarch64 CPU has NEON.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => unsafe { neon::rows(self, x, residual, out) },
            _ => portable::rows(self, x, residual, out),
        }
    }
}

/// Whether [`fuse_dense`] speeds up a CPU whose best kernels are `isa`'s. On x86-64 (AVX2 and
/// FMA, AVX-512) it was measured. On aarch64 it is an estimate (docs/performance.md): the NEON
/// kernel's inner loop reaches the FMA rate of tract's `8x8_gen` under llvm-mca's Cortex-A72
/// and Neoverse-N1 (A76) models and saves tract's packing of the activations, but the in-order
/// Cortex-A53 and A55 get tract's kernels scheduled for them. Elsewhere tract's kernels stay.
pub fn beats_tract(isa: Isa) -> bool {
    match isa.float() {
        Isa::Avx2 | Isa::Avx512 => true,
        Isa::Neon => !in_order_arm_core(),
        _ => false,
    }
}

/// Whether this is an in-order Cortex-A53 or A55 (Pi 3, Pi Zero 2, many boards' little cores):
/// the largest `CPU part` of /proc/cpuinfo, as tract reads it, or the core kind given to
/// tract by `TRACT_CPU_AARCH64_KIND` (what qemu needs, since it shows the host's cpuinfo).
fn in_order_arm_core() -> bool {
    if let Ok(kind) = std::env::var("TRACT_CPU_AARCH64_KIND") {
        return matches!(kind.to_ascii_lowercase().as_str(), "a53" | "a55");
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let parts = cpuinfo.lines().filter_map(|line| {
        let (key, value) = line.split_once(':')?;
        let value = value.trim().strip_prefix("0x")?;
        (key.trim() == "CPU part").then(|| u32::from_str_radix(value, 16).ok())?
    });
    matches!(parts.max(), Some(0xd03 | 0xd05))
}

/// Replace each f32 product of activations by a constant matrix in a decluttered model by
/// [`DenseLinear`], with what follows it among a bias Add, a `GeluExact` and a residual Add, in
/// that order (each the only use of the one before); returns how many were replaced.
///
/// Matched: an EinSum whose second input is a constant and that reads, once unit axes are
/// dropped, `x[rows…, contracted…] · W[contracted…, n] → y[rows…, n]`. In row-major storage
/// that is `x [rows, depth] · W [depth, width]`, whatever the axes' names: the exporter's
/// `amk,kn->mn`, the output projection's `mbk,bkn->amn` (heads and head size contracted
/// together), torch's `MatMul`s, and its `Gemm`s, whose W is `[n, contracted]`.
pub fn fuse_dense(model: &mut TypedModel, isa: Isa) -> TractResult<usize> {
    let find = |model: &TypedModel, einsum: usize| {
        let linear = linear_form(model, einsum, f32::datum_type())?;
        Ok(linear.map(|linear| Found {
            x: model.node(einsum).inputs[0],
            last: einsum,
            width: linear.width,
            product: linear,
        }))
    };
    fuse_products(model, find, |linear: Linear, bias, tail, output_shape| {
        let weight = linear.weight.try_as_plain_ram()?;
        let mut op = DenseLinear::new(
            isa,
            weight.as_slice::<f32>()?,
            linear.transposed,
            bias,
            linear.depth,
            linear.width,
            output_shape,
        )?;
        op.gelu = tail.gelu;
        op.residual = tail.residual.is_some();
        Ok(op)
    })
}

/// A product by constant weights that a fusion found at an EinSum.
pub(crate) struct Found<P> {
    /// The f32 activations.
    pub(crate) x: OutletId,
    /// The node whose output is `x W` in f32 (the EinSum itself, or what rescales its sums).
    pub(crate) last: usize,
    pub(crate) width: usize,
    /// What the operator is built from.
    pub(crate) product: P,
}

/// Put an operator in place of each product `find` sees at an EinSum of a decluttered model,
/// with its [`Tail`]: `build` makes it from the product, the bias, the tail (whose GELU and
/// residual it takes in) and the output's shape. Returns how many were replaced.
pub(crate) fn fuse_products<P, O: TypedOp>(
    model: &mut TypedModel,
    find: impl Fn(&TypedModel, usize) -> TractResult<Option<Found<P>>>,
    build: impl Fn(P, Option<&[f32]>, &Tail, TVec<usize>) -> TractResult<O>,
) -> TractResult<usize> {
    let einsums: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|node| node.op_is::<EinSum>())
        .map(|node| node.id)
        .collect();
    let mut fused = 0;
    for einsum in einsums {
        let Some(found) = find(model, einsum)? else {
            continue;
        };
        let last = model.outlet_fact(OutletId::new(found.last, 0))?;
        let Some(output_shape) = last.shape.as_concrete().map(TVec::from) else {
            continue;
        };
        let tail = tail_after(model, found.last, found.width)?;
        let bias = tail
            .bias
            .as_ref()
            .map(|b| b.try_as_plain_ram())
            .transpose()?;
        let bias = bias.as_ref().map(|b| b.as_slice::<f32>()).transpose()?;
        let op = build(found.product, bias, &tail, output_shape)?;
        let name = model.node(einsum).name.clone();
        replace_with(model, &name, op, found.x, &tail)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// What a dense operator takes in after its product: the bias Add, the GELU and the residual
/// Add, in that order, each the only use of the one before.
pub(crate) struct Tail {
    pub(crate) bias: Option<Arc<Tensor>>,
    pub(crate) gelu: bool,
    pub(crate) residual: Option<OutletId>,
    /// The last node taken in (the product itself if none).
    pub(crate) last: usize,
}

/// The [`Tail`] after the node `product`, `width` wide.
fn tail_after(model: &TypedModel, product: usize, width: usize) -> TractResult<Tail> {
    let (bias, last) = match bias_after(model, product, width)? {
        Some((bias, add)) => (Some(bias), add),
        None => (None, product),
    };
    let gelu = model
        .single_succ(last)?
        .filter(|next| is_f32_gelu(next))
        .map(|next| next.id);
    let last = gelu.unwrap_or(last);
    let residual = residual_after(model, last)?;
    Ok(Tail {
        bias,
        gelu: gelu.is_some(),
        residual: residual.map(|(outlet, _)| outlet),
        last: residual.map_or(last, |(_, add)| add),
    })
}

/// Put `op`, computed from `x` (and the tail's residual), in place of the product and its
/// tail.
fn replace_with(
    model: &mut TypedModel,
    name: &str,
    op: impl Into<Box<dyn TypedOp>>,
    x: OutletId,
    tail: &Tail,
) -> TractResult<()> {
    let mut patch = TypedModelPatch::new(format!("fuse {name} into a dense layer"));
    let mut inputs = tvec![patch.tap_model(model, x)?];
    if let Some(residual) = tail.residual {
        inputs.push(patch.tap_model(model, residual)?);
    }
    let wire = patch.wire_node(name, op, &inputs)?[0];
    patch.shunt_outside(model, tail.last.into(), wire)?;
    patch.apply(model)
}

/// An EinSum read as a linear layer.
pub(crate) struct Linear {
    pub(crate) weight: Arc<Tensor>,
    /// W is stored `[width, depth]`.
    pub(crate) transposed: bool,
    pub(crate) depth: usize,
    pub(crate) width: usize,
}

/// `einsum` as a linear layer if it is an f32 `x W` (see [`fuse_dense`]), or with
/// `weights` int8 the integer product of tract's `MatMulInteger` (`x` u8 or i8, i32 sums;
/// its other inputs, zero points and scales, are the caller's to check).
pub(crate) fn linear_form(
    model: &TypedModel,
    einsum: usize,
    weights: DatumType,
) -> TractResult<Option<Linear>> {
    let node = model.node(einsum);
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    let x_fact = model.outlet_fact(node.inputs[0])?;
    let w_fact = model.outlet_fact(node.inputs[1])?;
    let form_matches = if weights == f32::datum_type() {
        op.q_params.is_none()
            && op.operating_dt == f32::datum_type()
            && node.inputs.len() == 2
            && x_fact.datum_type == f32::datum_type()
    } else {
        op.q_params.is_some() && weights == i8::datum_type()
    };
    let Some(weight) = w_fact.konst.clone() else {
        return Ok(None);
    };
    if !form_matches || weight.datum_type() != weights {
        return Ok(None);
    }
    // Each operand's axes as (label, size), unit axes dropped: they do not move any data.
    let (inputs, outputs) = op.axes.to_strs();
    let facts = [x_fact, w_fact, &node.outputs[0].fact];
    let mut axes = Vec::new();
    for (labels, fact) in [&inputs[0], &inputs[1], &outputs[0]].into_iter().zip(facts) {
        let Some(shape) = fact.shape.as_concrete() else {
            return Ok(None);
        };
        let kept: Vec<(char, usize)> = labels
            .chars()
            .zip(shape.iter().copied())
            .filter(|&(_, dim)| dim != 1)
            .collect();
        axes.push(kept);
    }
    let [x, w, y] = [&axes[0], &axes[1], &axes[2]];
    let Some((&(n, width), rows)) = y.split_last() else {
        return Ok(None);
    };
    let Some(contracted) = x.strip_prefix(rows) else {
        return Ok(None);
    };
    let transposed = if w.split_last() == Some((&(n, width), contracted)) {
        false
    } else if w.split_first() == Some((&(n, width), contracted)) {
        true
    } else {
        return Ok(None);
    };
    Ok(Some(Linear {
        weight,
        transposed,
        depth: contracted.iter().map(|&(_, dim)| dim).product(),
        width,
    }))
}

/// The Add node that is `node`'s only use and its other operand, if the sum keeps `node`'s
/// shape.
fn add_after(model: &TypedModel, node: usize) -> TractResult<Option<(usize, OutletId)>> {
    let Some(add) = model.single_succ(node)? else {
        return Ok(None);
    };
    let same_shape = add.outputs[0].fact.shape == model.node(node).outputs[0].fact.shape;
    let other = add.inputs.iter().copied().find(|i| i.node != node);
    match other {
        Some(other) if is_bin(add, "Add") && same_shape => Ok(Some((add.id, other))),
        _ => Ok(None),
    }
}

/// The bias and the Add node if `einsum`'s only use is adding a constant that varies along
/// the last axis only (`[1, …, width]`).
fn bias_after(
    model: &TypedModel,
    einsum: usize,
    width: usize,
) -> TractResult<Option<(Arc<Tensor>, usize)>> {
    let Some((add, other)) = add_after(model, einsum)? else {
        return Ok(None);
    };
    let Some(bias) = model.outlet_fact(other)?.konst.clone() else {
        return Ok(None);
    };
    let along_last_axis = bias.shape().last() == Some(&width) && bias.len() == width;
    if !along_last_axis || bias.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    Ok(Some((bias, add)))
}

fn is_f32_gelu(node: &TypedNode) -> bool {
    node.op_as::<ElementWiseOp>()
        .is_some_and(|op| op.0.is::<GeluExact>() && op.1.is_none())
        && node.outputs[0].fact.datum_type == f32::datum_type()
}

/// The other operand and the Add node if `node`'s only use is being added to a computed f32
/// tensor of its own shape.
fn residual_after(model: &TypedModel, node: usize) -> TractResult<Option<(OutletId, usize)>> {
    let Some((add, other)) = add_after(model, node)? else {
        return Ok(None);
    };
    let other_fact = model.outlet_fact(other)?;
    let same = other_fact.shape == model.node(node).outputs[0].fact.shape;
    if !same || other_fact.konst.is_some() || other_fact.datum_type != f32::datum_type() {
        return Ok(None);
    }
    Ok(Some((other, add)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rows::on_two_threads;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

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
        // A batch axis in W: tract's.
        let batched = Layer {
            x: &[2, 17, 8],
            w: &[2, 8, 16],
            axes: "bmk,bkn->bmn",
            ..Layer::default()
        };
        assert!(batched.fused().is_empty());
    }
}
