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

use crate::ops::patterns::{add_after, nodes_with_op, replace_nodes, residual_after};
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
mod input;
#[cfg(target_arch = "aarch64")]
mod neon;
mod portable;

pub(crate) use input::{InputRows, Windows};

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
        ensure!(
            super::is_row_major(input),
            "input of shape {:?} has strides {:?}",
            input.shape(),
            input.strides()
        );
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
    /// The rows the kernel computes together: a share of rows for a thread is best a multiple.
    pub(crate) fn row_block(&self) -> usize {
        Self::block(self.isa, self.width).0
    }

    /// `y` for `x` of whole rows, the rows spread over the inference threads.
    pub(crate) fn apply(&self, x: &[f32], residual: Option<&[f32]>, out: &mut [f32]) {
        let macs = x.len() * self.width;
        let (block, _) = Self::block(self.isa, self.width);
        for_each_share(out, self.width, block, macs, |first_row, out| {
            let rows = out.len() / self.width;
            let x = &x[first_row * self.depth..][..rows * self.depth];
            let residual = residual.map(|r| &r[first_row * self.width..][..out.len()]);
            self.rows(InputRows::matrix(x, self.depth), residual, out);
        });
    }

    /// The output rows `out` from the rows `x` (and `residual`), on the operator's kernel, on
    /// the calling thread.
    pub(crate) fn rows(&self, x: InputRows, residual: Option<&[f32]>, out: &mut [f32]) {
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
    let reordered = fuse_reordering_products(model, isa)?;
    let find = |model: &TypedModel, einsum: usize| {
        let in_order = |linear: &Linear| linear.reordered_rows.is_none();
        let linear = linear_form(model, einsum, f32::datum_type())?.filter(in_order);
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
    .map(|in_order| in_order + reordered)
}

/// A product that also reorders its rows, as when tract folds a Swin's window merge into its
/// output projection: [`DenseLinear`] computes it in x's row order, with the bias and GELU that
/// follow it (past Reshapes that leave the last axis alone), and tract's axis moves put the
/// rows in order after it. The residual stays tract's Add. Returns how many were replaced.
fn fuse_reordering_products(model: &mut TypedModel, isa: Isa) -> TractResult<usize> {
    let einsums = nodes_with_op::<EinSum>(model);
    let mut fused = 0;
    for einsum in einsums {
        let Some(linear) = linear_form(model, einsum, f32::datum_type())? else {
            continue;
        };
        let Some((x_rows, places)) = linear.reordered_rows.clone() else {
            continue;
        };
        let reshaped = through_row_reshapes(model, einsum)?;
        let (bias, gelu, last) = bias_and_gelu_after(model, reshaped, linear.width)?;
        let Some(final_shape) = model
            .outlet_fact(OutletId::new(last, 0))?
            .shape
            .as_concrete()
        else {
            continue;
        };
        let final_shape: TVec<usize> = final_shape.into();
        let bias_ram = bias.as_ref().map(|b| b.try_as_plain_ram()).transpose()?;
        let bias_values = bias_ram.as_ref().map(|b| b.as_slice::<f32>()).transpose()?;
        let weight = linear.weight.try_as_plain_ram()?;
        let mut in_x_order = x_rows.clone();
        in_x_order.push(linear.width);
        let mut op = DenseLinear::new(
            isa,
            weight.as_slice::<f32>()?,
            linear.transposed,
            bias_values,
            linear.depth,
            linear.width,
            in_x_order,
        )?;
        op.gelu = gelu;
        let name = model.node(einsum).name.clone();
        let mut patch = TypedModelPatch::new(format!("fuse {name} into a dense layer"));
        let x = patch.tap_model(model, model.node(einsum).inputs[0])?;
        let mut wire = patch.wire_node(&name, op, &[x])?[0];
        // Move each output row axis into place, in the output's order.
        let mut order: TVec<usize> = (0..x_rows.len()).collect();
        for (target, &axis) in places.iter().enumerate() {
            let from = order
                .iter()
                .position(|&a| a == axis)
                .expect("a permutation");
            if from != target {
                let moved = order.remove(from);
                order.insert(target, moved);
                let op = AxisOp::Move(from, target);
                wire = patch.wire_node(format!("{name}.row_order.{target}"), op, &[wire])?[0];
            }
        }
        let dims = |shape: &[usize]| shape.iter().map(|&d| d.to_dim()).collect();
        let ordered: TVec<usize> = places
            .iter()
            .map(|&axis| x_rows[axis])
            .chain([linear.width])
            .collect();
        let reshape = AxisOp::Reshape(0, dims(&ordered), dims(&final_shape));
        wire = patch.wire_node(format!("{name}.shape"), reshape, &[wire])?[0];
        patch.shunt_outside(model, last.into(), wire)?;
        patch.apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
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
    let einsums = nodes_with_op::<EinSum>(model);
    let mut fused = 0;
    for einsum in einsums {
        let Some(found) = find(model, einsum)? else {
            continue;
        };
        let last = through_row_reshapes(model, found.last)?;
        let last_fact = model.outlet_fact(OutletId::new(last, 0))?;
        let Some(output_shape) = last_fact.shape.as_concrete().map(TVec::from) else {
            continue;
        };
        let tail = tail_after(model, last, found.width)?;
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

/// `node`, or the last of the Reshapes that follow it, each the only use of the one before,
/// if they only regroup the rows (the last axis untouched): the values' order is the same, so
/// the operator writes the reshaped tensor and takes in the bias, GELU and residual after them.
/// tract puts such Reshapes between a Swin's output projection and its bias, when it folds the
/// token grid into a token axis.
fn through_row_reshapes(model: &TypedModel, mut node: usize) -> TractResult<usize> {
    while let Some(next) = model.single_succ(node)? {
        let rank = model.outlet_fact(OutletId::new(node, 0))?.rank();
        match next.op_as::<AxisOp>() {
            Some(AxisOp::Reshape(at, from, _)) if at + from.len() < rank => node = next.id,
            _ => break,
        }
    }
    Ok(node)
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
    let (bias, gelu, last) = bias_and_gelu_after(model, product, width)?;
    let residual = residual_after(model, last)?;
    Ok(Tail {
        bias,
        gelu,
        residual: residual.map(|(outlet, _)| outlet),
        last: residual.map_or(last, |(_, add)| add),
    })
}

/// The bias Add and the GELU after the node `product`, `width` wide, each optional and the only
/// use of the one before: the bias, whether there is a GELU, and the last node taken in.
fn bias_and_gelu_after(
    model: &TypedModel,
    product: usize,
    width: usize,
) -> TractResult<(Option<Arc<Tensor>>, bool, usize)> {
    let (bias, last) = match bias_after(model, product, width)? {
        Some((bias, add)) => (Some(bias), add),
        None => (None, product),
    };
    let gelu = model
        .single_succ(last)?
        .filter(|next| is_f32_gelu(next))
        .map(|next| next.id);
    Ok((bias, gelu.is_some(), gelu.unwrap_or(last)))
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
    let inputs: TVec<OutletId> = std::iter::once(x).chain(tail.residual).collect();
    replace_nodes(model, "a dense layer", name, op, &inputs, tail.last)
}

/// An EinSum read as a linear layer.
pub(crate) struct Linear {
    pub(crate) weight: Arc<Tensor>,
    /// W is stored `[width, depth]`.
    pub(crate) transposed: bool,
    pub(crate) depth: usize,
    pub(crate) width: usize,
    /// When the product also reorders its rows (tract folds a transpose, such as a Swin's
    /// window merge, into it): x's row sizes in x's order, and for each of the output's row
    /// axes its place among them.
    pub(crate) reordered_rows: Option<(TVec<usize>, TVec<usize>)>,
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
    if x.len() <= rows.len() {
        return Ok(None);
    }
    let (x_rows, contracted) = x.split_at(rows.len());
    let reordered_rows = if x_rows == rows {
        None
    } else {
        let places: Option<TVec<usize>> = rows
            .iter()
            .map(|axis| x_rows.iter().position(|a| a == axis))
            .collect();
        let Some(places) = places else {
            return Ok(None);
        };
        Some((x_rows.iter().map(|&(_, dim)| dim).collect(), places))
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
        reordered_rows,
    }))
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

#[cfg(test)]
mod tests;
