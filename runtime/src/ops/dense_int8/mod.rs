//! The int8 sibling of [`DenseLinear`](crate::ops::dense::DenseLinear): `y = act(x W + b) + r`
//! with W int8 (symmetric, one scale per output column, packed once at load) and x quantized
//! inside the operator, row by row, each time it runs.
//!
//! Each row of x gets its own scale and zero point from its own range (asymmetric, u8): no
//! calibration, and a row of small values keeps its precision next to a row of large ones. The
//! kernels sum u8 × i8 products into i32 (VNNI's `vpdpbusd`, AVX2's `vpmaddubsw`); the
//! zero point comes out through W's column sums, and the scales, the bias, GELU and the
//! residual are applied to the block of sums before it is stored, as the f32 operator does.
//! [`fuse_int8_dense`] puts it in place of the quantized products of a file from
//! `runtime quantize` or onnxruntime's `quantize_dynamic` and `quantize_static` (see there).

mod fusion;
pub use fusion::fuse_int8_dense;

use std::cell::RefCell;
use std::sync::Arc;

use crate::ops::dense::{eval_dense, gelu};
use crate::ops::rows::for_each_share;
use crate::ops::{AlignedBuffer, Isa, aligned, with_buffer};
use tract_onnx::tract_core::internal::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod portable;

/// The kernels, one per instruction set that has its own int8 arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "aarch64")]
    Neon,
    #[cfg(target_arch = "aarch64")]
    NeonDot,
}

impl Kernel {
    /// The kernel for the best instruction set `isa` (AVX-512 without VNNI runs AVX2's).
    fn of(isa: Isa) -> Kernel {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => Kernel::Avx512Vnni,
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => Kernel::AvxVnni,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => Kernel::Avx2,
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => Kernel::NeonDot,
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => Kernel::Neon,
            _ => Kernel::Portable,
        }
    }

    /// The instruction set it needs.
    fn isa(self) -> Isa {
        match self {
            Kernel::Portable => Isa::Portable,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => Isa::Avx2,
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => Isa::AvxVnni,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => Isa::Avx512Vnni,
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => Isa::Neon,
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => Isa::NeonDot,
        }
    }

    /// Whether the kernel multiplies signed bytes: its activations are stored `q − 128`.
    #[cfg(test)]
    fn signed(self) -> bool {
        cfg!(target_arch = "aarch64") && self != Kernel::Portable
    }

    /// The largest quantized activation: `vpmaddubsw` needs 0..=127 not to saturate.
    fn levels(self) -> u8 {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => 127,
            _ => 255,
        }
    }

    /// The rows and columns of a block for a layer `width` wide; W's panels are as wide as the
    /// block.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn block(self, width: usize) -> (usize, usize) {
        match self {
            Kernel::Portable => (1, ARRAY_COLUMNS),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => (avx2::ROWS, ARRAY_COLUMNS),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => (avx2::VNNI_ROWS, ARRAY_COLUMNS),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => avx512::block(width),
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => (neon::ROWS, ARRAY_COLUMNS),
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => (neon::DOT_ROWS, ARRAY_COLUMNS),
        }
    }
}

/// Whether [`fuse_int8_dense`] runs where `isa` is the best instruction set: wherever it has a
/// kernel of its own (the portable one is a reference, slower than tract's integer kernels).
/// Unlike the f32 operator it runs on the in-order Cortex-A53 and A55 too: tract has no int8
/// kernels scheduled for them, and every device then quantizes activations the same way.
pub fn beats_tract(isa: Isa) -> bool {
    Kernel::of(isa) != Kernel::Portable
}

/// `y = act(x W + b) + r` over the last axis of a contiguous f32 `x` (`[rows…, depth]`) with
/// int8 arithmetic: W `[depth, width]` int8 with a scale per column, x quantized per row.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseLinearInt8 {
    /// The kernel's instruction set.
    pub isa: Isa,
    kernel: Kernel,
    /// W in panels as wide as the kernel's block, `[panel][depth / 4][columns][4]`: four
    /// consecutive values of a column side by side, as one `vpdpbusd` lane reads them. The
    /// depth is padded to a multiple of four, the width to whole panels, both with zeros.
    panels: Arc<AlignedBuffer<i8>>,
    /// Per column, padded to whole panels: `Σ_d W[d][c]` (as f32), W's scale and the bias.
    column_sums: Arc<Vec<f32>>,
    scales: Arc<Vec<f32>>,
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

impl Eq for DenseLinearInt8 {}

/// A row's quantization: `x ≈ scale · (q − zero)`, `q` the stored byte as the kernel reads it
/// (u8, or i8 where the kernel is [`Kernel::signed`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct RowScale {
    pub(crate) scale: f32,
    pub(crate) zero: f32,
}

/// Rows of x quantized for a kernel: `stride` bytes a row (the depth padded to a multiple of
/// four), and each row's scale.
struct QuantizedRows<'a> {
    values: &'a [u8],
    stride: usize,
    scales: &'a [RowScale],
}

thread_local! {
    /// Reused between frames: the quantized rows of a thread's share, and their scales.
    static QUANTIZED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static ROW_SCALES: RefCell<Vec<RowScale>> = const { RefCell::new(Vec::new()) };
}

impl DenseLinearInt8 {
    /// The operator for int8 `weight` (row-major `[depth, width]`, or `[width, depth]` if
    /// `transposed`) with one `scale` per column and an optional `bias`, computed by the
    /// kernel for the best instruction set `isa`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        isa: Isa,
        weight: &[i8],
        transposed: bool,
        scales: &[f32],
        bias: Option<&[f32]>,
        depth: usize,
        width: usize,
        output_shape: TVec<usize>,
    ) -> TractResult<DenseLinearInt8> {
        ensure!(weight.len() == depth * width && depth > 0 && width > 0);
        ensure!(scales.len() == width && output_shape.last() == Some(&width));
        let kernel = Kernel::of(isa);
        let (_, columns) = kernel.block(width);
        let panel_count = width.div_ceil(columns);
        let stride = depth.next_multiple_of(4);
        let mut panels = AlignedBuffer::<i8>::zeroed(panel_count * stride * columns);
        let mut column_sums = vec![0f32; panel_count * columns];
        for d in 0..depth {
            for c in 0..width {
                let w = if transposed {
                    weight[c * depth + d]
                } else {
                    weight[d * width + c]
                };
                // −128 (which some quantizers write) as −127: the NEON kernel adds two products
                // in i16, which (−128)² twice would overflow; one level of one weight at most.
                let w = w.max(-127);
                let (panel, column) = (c / columns, c % columns);
                panels[((panel * stride + d - d % 4) * columns + column * 4) + d % 4] = w;
                column_sums[c] += w as f32;
            }
        }
        let pad = |values: &[f32]| {
            let mut padded = vec![0f32; panel_count * columns];
            padded[..width].copy_from_slice(values);
            padded
        };
        if let Some(bias) = bias {
            ensure!(bias.len() == width);
        }
        Ok(DenseLinearInt8 {
            isa: kernel.isa(),
            kernel,
            panels: Arc::new(panels),
            column_sums: Arc::new(column_sums),
            scales: Arc::new(pad(scales)),
            bias: Arc::new(bias.map_or_else(|| vec![0f32; panel_count * columns], pad)),
            depth,
            width,
            output_shape,
            gelu: false,
            residual: false,
        })
    }

    /// `y` for `x` of whole rows, the rows spread over the inference threads.
    pub(crate) fn apply(&self, x: &[f32], residual: Option<&[f32]>, out: &mut [f32]) {
        let macs = x.len() * self.width;
        let (block, _) = self.kernel.block(self.width);
        let stride = self.depth.next_multiple_of(4);
        assert!(
            self.isa.runs_here(),
            "{} kernel on a CPU without it",
            self.isa
        );
        for_each_share(out, self.width, block, macs, |first_row, out| {
            let rows = out.len() / self.width;
            let x = &x[first_row * self.depth..][..rows * self.depth];
            let residual = residual.map(|r| &r[first_row * self.width..][..out.len()]);
            with_buffer(&QUANTIZED, |values| {
                with_buffer(&ROW_SCALES, |scales| {
                    let values = aligned(values, rows * stride);
                    scales.resize(rows, RowScale::default());
                    // SAFETY: the CPU runs the kernel's instruction set (checked above).
                    unsafe { quantize_rows(self.kernel, x, self.depth, stride, values, scales) };
                    let x = QuantizedRows {
                        values,
                        stride,
                        scales,
                    };
                    // SAFETY: as for the quantizer.
                    unsafe { self.rows(&x, residual, out) };
                })
            })
        });
    }

    /// The output rows `out` from the quantized rows `x` (and `residual`), on the operator's
    /// kernel.
    ///
    /// # Safety
    /// The CPU runs the kernel's instruction set.
    unsafe fn rows(&self, x: &QuantizedRows, residual: Option<&[f32]>, out: &mut [f32]) {
        match self.kernel {
            // SAFETY: the CPU has the features the kernels are compiled for (the caller's
            // promise).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { avx512::rows(self, x, residual, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => unsafe { avx2::rows_vnni(self, x, residual, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::rows(self, x, residual, out) },
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => unsafe { neon::rows_dot(self, x, residual, out) },
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => unsafe { neon::rows(self, x, residual, out) },
            Kernel::Portable => portable::rows(self, x, residual, out),
        }
    }

    /// One output row's columns from `column` on, from their i32 `sums`: the plain-Rust
    /// epilogue of the kernels that keep their sums in arrays (inlined, the compiler
    /// vectorises it for the caller's instruction set).
    #[inline(always)]
    fn finish_row(
        &self,
        sums: &[i32],
        row: RowScale,
        column: usize,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let fma = cfg!(any(target_arch = "aarch64", target_feature = "fma"))
            || self.kernel != Kernel::Portable;
        let columns = sums.len();
        let column_sums = &self.column_sums[column..][..columns];
        let scales = &self.scales[column..][..columns];
        let bias = &self.bias[column..][..columns];
        for c in 0..columns {
            let sum = sums[c] as f32 - row.zero * column_sums[c];
            let y = sum * (row.scale * scales[c]) + bias[c];
            let y = match (self.gelu, fma) {
                (false, _) => y,
                (true, true) => gelu::<true>(y),
                (true, false) => gelu::<false>(y),
            };
            out[c] = residual.map_or(y, |residual| y + residual[c]);
        }
    }
}

impl RowScale {
    /// The quantization of a row whose values lie in `[min, max]` to `0..=levels`, and
    /// `1 / scale`. The range is widened to hold zero, so that zero is exact (`zero` is a
    /// whole level). A row holding NaN or an infinity (`min` or `max` not finite; quantizers
    /// pass NaN for a NaN anywhere in the row) gets a NaN scale, so its outputs are NaN as
    /// in f32 rather than a confident answer; its levels are all 0.
    #[inline(always)]
    pub(crate) fn for_range(min: f32, max: f32, levels: f32) -> (RowScale, f32) {
        if !(min.is_finite() && max.is_finite()) {
            return (
                RowScale {
                    scale: f32::NAN,
                    zero: 0.0,
                },
                0.0,
            );
        }
        let (min, max) = (min.min(0.0), max.max(0.0));
        let (scale, inverse) = if max > min {
            ((max - min) / levels, levels / (max - min))
        } else {
            (1.0, 1.0)
        };
        let zero = (-min * inverse).round_ties_even();
        (RowScale { scale, zero }, inverse)
    }
}

/// Output columns of a panel for the kernels that return a block's sums in arrays.
const ARRAY_COLUMNS: usize = 16;

/// A kernel that returns the i32 sums of a block of rows against a panel of [`ARRAY_COLUMNS`]
/// columns in arrays, for [`DenseLinearInt8::finish_row`] to finish.
trait ArraySums {
    /// The sums of rows `first..first + R` of `x` against `panel`.
    fn sums<const R: usize>(
        x: &QuantizedRows,
        first: usize,
        panel: &[i8],
    ) -> [[i32; ARRAY_COLUMNS]; R];
}

/// The output rows `out` from `x` (and `residual`) on `K`'s sums: panel by panel, block by
/// block of `ROWS` rows (then 2 and 1). Inlined into each kernel's entry, so that it is
/// compiled for that kernel's instruction set.
#[inline(always)]
fn rows_in_blocks<K: ArraySums, const ROWS: usize>(
    op: &DenseLinearInt8,
    x: &QuantizedRows,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    let width = op.width;
    let rows = out.len() / width;
    assert!(x.values.len() >= rows * x.stride && x.scales.len() >= rows);
    assert!(residual.is_none_or(|r| r.len() == out.len()));
    for (p, panel) in op.panels.chunks_exact(x.stride * ARRAY_COLUMNS).enumerate() {
        let column = p * ARRAY_COLUMNS;
        let mut first = 0;
        while first < rows {
            first += match rows - first {
                n if n >= ROWS => finish::<K, ROWS>(op, x, first, panel, column, residual, out),
                n if n >= 2 => finish::<K, 2>(op, x, first, panel, column, residual, out),
                _ => finish::<K, 1>(op, x, first, panel, column, residual, out),
            };
        }
    }
}

/// Rows `first..first + R` of the panel's columns: their sums, then the outputs; returns `R`.
#[inline(always)]
fn finish<K: ArraySums, const R: usize>(
    op: &DenseLinearInt8,
    x: &QuantizedRows,
    first: usize,
    panel: &[i8],
    column: usize,
    residual: Option<&[f32]>,
    out: &mut [f32],
) -> usize {
    let sums = K::sums::<R>(x, first, panel);
    let columns = ARRAY_COLUMNS.min(op.width - column);
    for (r, sums) in sums.iter().enumerate() {
        let at = (first + r) * op.width + column;
        let out = &mut out[at..][..columns];
        let residual = residual.map(|residual| &residual[at..][..columns]);
        op.finish_row(&sums[..columns], x.scales[first + r], column, residual, out);
    }
    R
}

/// Quantize rows of `depth` values of `x` to `0..=levels`, each with a scale and zero point of
/// its own, into rows of `stride` bytes (the padding is left as it was: W's is zero): `q =
/// clamp(x / scale + zero)` rounded to even, by every kernel alike. A row holding NaN or an
/// infinity gets levels of 0 and a NaN scale ([`RowScale::for_range`]).
///
/// # Safety
/// The CPU runs the kernel's instruction set.
unsafe fn quantize_rows(
    kernel: Kernel,
    x: &[f32],
    depth: usize,
    stride: usize,
    values: &mut [u8],
    scales: &mut [RowScale],
) {
    let rows = x.len() / depth;
    assert!(values.len() >= rows * stride && scales.len() >= rows && stride >= depth);
    let levels = kernel.levels();
    match kernel {
        // SAFETY: the quantizers need a part of their kernel's features (the caller's promise).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => unsafe {
            avx512::quantize_rows(x, depth, stride, levels, values, scales)
        },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 | Kernel::AvxVnni => unsafe {
            avx2::quantize_rows(x, depth, stride, levels, values, scales)
        },
        Kernel::Portable => portable::quantize_rows(x, depth, stride, levels, values, scales),
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon | Kernel::NeonDot => {
            portable::quantize_rows(x, depth, stride, levels, values, scales);
            for row in values.chunks_exact_mut(stride).take(rows) {
                for q in &mut row[..depth] {
                    *q ^= 0x80;
                }
            }
            for scale in &mut scales[..rows] {
                scale.zero -= 128.0;
            }
        }
    }
}

/// [`quantize_rows`] to 0..=255 on AVX-512, for the int8 attention's queries.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn quantize_rows_avx512(
    x: &[f32],
    depth: usize,
    stride: usize,
    values: &mut [u8],
    scales: &mut [RowScale],
) {
    // SAFETY: the caller's promise.
    unsafe { avx512::quantize_rows(x, depth, stride, u8::MAX, values, scales) }
}

impl Op for DenseLinearInt8 {
    fn name(&self) -> StaticName {
        "DenseLinearInt8".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let gelu = if self.gelu { ", GELU" } else { "" };
        let residual = if self.residual { ", + residual" } else { "" };
        Ok(vec![format!(
            "{}x{} int8{gelu}{residual}, {}",
            self.depth, self.width, self.isa
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for DenseLinearInt8 {
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

impl TypedOp for DenseLinearInt8 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 + self.residual as usize);
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()));
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

/// Every int8 kernel this CPU runs (each instruction set's own, once).
#[cfg(test)]
fn available_kernels() -> Vec<Isa> {
    let mut kernels: Vec<Kernel> = Isa::available().into_iter().map(Kernel::of).collect();
    kernels.dedup();
    kernels.into_iter().map(Kernel::isa).collect()
}

#[cfg(test)]
mod tests;
