//! Attention's core (`softmax(scale · q kᵀ) v`) as one operator.
//!
//! tract 0.23.9 runs it as two matrix products around a softmax, and packs every operand
//! (q, k, the scores, v) into its kernel layout on every run. With many tokens and a small
//! head the packing and the scores' round trip through memory cost more than the arithmetic:
//! at the `seed` preset's 1297 tokens and head size 16, attention was nearly all of the
//! inference time. [`TokenMajorAttention`] reads q, k and v where the QKV projection left
//! them (`[tokens, heads, head size]`), keeps a block of score rows in L1 between the two
//! products, and never writes the scores out. [`fuse_attention`] puts it in place of the
//! four operators in a decluttered model.
//!
//! The Swin's windowed attention is the same core over a leading axis of windows, with a
//! constant added to the scores before the softmax (the relative position bias, and the
//! shift mask in shifted blocks): each window is one evaluation of the kernels, the bias
//! added to each row of scores as it leaves the first product.

use std::cell::RefCell;

use crate::ops::rows::for_each_share;
use crate::ops::{Isa, aligned, with_buffer};
use tract_onnx::tract_core::internal::*;

/// Scaled dot-product attention over f32 `q [queries, heads, d]`, `k [keys, heads, d]` and
/// `v [keys, heads, dv]`, giving `[queries, heads, dv]`; or, with a leading axis of windows
/// (`q [windows, queries, heads, d]`, …), the same in each window.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenMajorAttention {
    /// Factor of the scores `q kᵀ` before the softmax (usually `1/√d`).
    pub scale: f32,
    /// The kernel's instruction set.
    pub isa: Isa,
    /// Added to the scaled scores before the softmax: `[windows or 1, heads, queries, keys]`.
    pub bias: Option<Bias>,
}

/// A constant added to the attention scores, for every window alike or for each its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Bias {
    /// `[windows, heads, queries, keys]` values, row-major.
    pub values: Arc<Vec<f32>>,
    /// 1 (one bias for every window) or the number of windows.
    pub windows: usize,
}

impl std::hash::Hash for TokenMajorAttention {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.scale.to_bits().hash(state);
        self.isa.hash(state);
        if let Some(bias) = &self.bias {
            bias.windows.hash(state);
            bias.values.len().hash(state);
            bias.values.iter().for_each(|v| v.to_bits().hash(state));
        }
    }
}

impl Eq for TokenMajorAttention {}

impl Op for TokenMajorAttention {
    fn name(&self) -> StaticName {
        "TokenMajorAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let bias = match &self.bias {
            Some(bias) => format!(", bias over {} window(s)", bias.windows),
            None => String::new(),
        };
        Ok(vec![format!("scale: {}, {}{bias}", self.scale, self.isa)])
    }

    op_as_typed_op!();
}

impl EvalOp for TokenMajorAttention {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, v) = args_3!(inputs);
        let shape = Shape::of(&q, &k, &v)?;
        let mut output_shape = tvec![shape.queries, shape.heads, shape.value_size];
        if q.rank() == 4 {
            output_shape.insert(0, shape.windows);
        }
        if let Some(bias) = &self.bias {
            let per_window = shape.heads * shape.queries * shape.keys;
            ensure!(
                (bias.windows == 1 || bias.windows == shape.windows)
                    && bias.values.len() == bias.windows * per_window,
                "a bias of {} values over {} window(s) for {shape:?}",
                bias.values.len(),
                bias.windows
            );
        }
        // SAFETY: f32 has no invalid bit patterns, and `attend` writes every value.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&output_shape)? };
        let (q, k, v) = (
            q.try_as_plain_ram()?,
            k.try_as_plain_ram()?,
            v.try_as_plain_ram()?,
        );
        {
            let mut out = output.try_as_plain_ram_mut()?;
            let (q, k, v) = (q.as_slice()?, k.as_slice()?, v.as_slice()?);
            let bias = self.bias.as_ref().map(|b| (b.values.as_slice(), b.windows));
            attend(
                shape,
                self.scale,
                bias,
                self.isa,
                q,
                k,
                v,
                out.as_slice_mut()?,
            )?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for TokenMajorAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let rank = inputs[0].rank();
        ensure!(inputs.len() == 3 && (rank == 3 || rank == 4));
        ensure!(inputs.iter().all(|f| f.rank() == rank));
        let (q, v) = (&inputs[0].shape, &inputs[2].shape);
        let mut shape: TVec<TDim> = q.iter().take(rank - 1).cloned().collect();
        shape.push(v[rank - 1].clone());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// The sizes of one evaluation (of each window).
#[derive(Debug, Clone, Copy)]
struct Shape {
    windows: usize,
    queries: usize,
    keys: usize,
    heads: usize,
    key_size: usize,
    value_size: usize,
}

impl Shape {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> TractResult<Shape> {
        let rank = q.rank();
        for t in [q, k, v] {
            ensure!(t.datum_type() == f32::datum_type() && t.rank() == rank);
            ensure!(rank == 3 || rank == 4);
            ensure!(super::is_row_major(t));
        }
        // A window axis in front, or none: one window.
        let windows = if rank == 4 { q.shape()[0] } else { 1 };
        let axes = |t: &Tensor| -> [usize; 3] {
            let s = &t.shape()[rank - 3..];
            [s[0], s[1], s[2]]
        };
        ensure!(
            rank == 3 || (k.shape()[0] == windows && v.shape()[0] == windows),
            "attention operands q {:?}, k {:?}, v {:?} have different windows",
            q.shape(),
            k.shape(),
            v.shape()
        );
        let [queries, heads, key_size] = axes(q);
        let (k_axes, v_axes) = (axes(k), axes(v));
        let [keys, value_size] = [k_axes[0], v_axes[2]];
        ensure!(
            keys > 0 && key_size > 0,
            "attention over {keys} keys of size {key_size}"
        );
        ensure!(
            k_axes == [keys, heads, key_size] && v_axes == [keys, heads, value_size],
            "attention operands q {:?}, k {:?}, v {:?} do not agree",
            q.shape(),
            k.shape(),
            v.shape()
        );
        Ok(Shape {
            windows,
            queries,
            keys,
            heads,
            key_size,
            value_size,
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod int8;
mod portable;

thread_local! {
    /// Reused between frames: k and v in tiles on the calling thread, a block of scores on
    /// every worker.
    static PANELS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// How a kernel tiles the work: the query rows of a block (its largest), the keys of a score
/// tile and the value columns of an output tile, as many as its registers hold sums for.
#[derive(Debug, Clone, Copy)]
struct Tiling {
    rows: usize,
    key_tile: usize,
    value_tile: usize,
}

impl Tiling {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn of(isa: Isa, value_size: usize) -> Tiling {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::tiling(value_size),
            _ => portable::TILING,
        }
    }
}

/// k and v of every head, rearranged once per evaluation so that the inner loops read them
/// front to back: `keys[h][key tile][d][key_tile]` and
/// `values[h][column tile][key][value_tile]`, zero-padded to whole tiles.
struct Panels<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    tiling: Tiling,
    /// Keys rounded up to a whole number of key tiles.
    padded_keys: usize,
    column_tiles: usize,
}

impl Panels<'_> {
    fn keys_of(&self, head: usize, key_size: usize) -> &[f32] {
        let len = self.padded_keys * key_size;
        &self.keys[head * len..][..len]
    }

    fn values_of(&self, head: usize) -> &[f32] {
        let len = self.column_tiles * self.padded_keys * self.tiling.value_tile;
        &self.values[head * len..][..len]
    }
}

/// `output = softmax(scale · q kᵀ + bias) v` per head (and window): the query rows spread over
/// the inference threads, or, with several windows, the windows. `bias` is the values and the
/// number of windows they cover (1: the same for every window).
#[allow(clippy::too_many_arguments)]
fn attend(
    shape: Shape,
    scale: f32,
    bias: Option<(&[f32], usize)>,
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    output: &mut [f32],
) -> TractResult<()> {
    if shape.windows == 0 || shape.queries == 0 || shape.heads == 0 || shape.value_size == 0 {
        return Ok(());
    }
    let per_window = shape.heads * shape.queries * shape.keys;
    let bias_of = |window: usize| {
        bias.map(|(values, windows)| {
            let first = if windows == 1 { 0 } else { window * per_window };
            &values[first..][..per_window]
        })
    };
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni
        && shape.keys >= int8::MIN_KEYS
        && shape.windows == 1
        && bias.is_none()
    {
        assert!(isa.runs_here(), "{isa} kernel on a CPU without it");
        // SAFETY: the CPU has AVX-512 VNNI (checked above).
        unsafe { int8::attend(shape, scale, q, k, v, output) };
        return Ok(());
    }
    let isa = kernel(isa);
    assert!(isa.runs_here(), "{isa} kernel on a CPU without it");
    let tiling = Tiling::of(isa, shape.value_size);
    let macs = shape.windows
        * shape.heads
        * shape.queries
        * shape.keys
        * (shape.key_size + shape.value_size);
    if shape.windows == 1 {
        return with_buffer(&PANELS, |buffer| {
            let job = Job {
                shape,
                scale,
                bias: bias_of(0),
                q,
                panels: pack(shape, tiling, k, v, buffer),
            };
            // The default model's core is 0.3 M multiply-adds: one thread.
            let row_len = shape.heads * shape.value_size;
            for_each_share(output, row_len, tiling.rows, macs, |first_query, out| {
                run_kernel(isa, tiling, &job, first_query, out)
            });
            Ok(())
        });
    }
    // Windows (a Swin's): whole windows per thread, each packing its own window's k and v.
    let q_len = shape.queries * shape.heads * shape.key_size;
    let k_len = shape.keys * shape.heads * shape.key_size;
    let v_len = shape.keys * shape.heads * shape.value_size;
    let out_len = shape.queries * shape.heads * shape.value_size;
    for_each_share(output, out_len, 1, macs, |first_window, out| {
        for (i, out) in out.chunks_exact_mut(out_len).enumerate() {
            let w = first_window + i;
            with_buffer(&PANELS, |buffer| {
                let (k, v) = (&k[w * k_len..][..k_len], &v[w * v_len..][..v_len]);
                let job = Job {
                    shape,
                    scale,
                    bias: bias_of(w),
                    q: &q[w * q_len..][..q_len],
                    panels: pack(shape, tiling, k, v, buffer),
                };
                run_kernel(isa, tiling, &job, 0, out);
            });
        }
    });
    Ok(())
}

/// The f32 kernel of `isa` over the query rows `out` holds, from `first_query` on.
fn run_kernel(isa: Isa, tiling: Tiling, job: &Job, first_query: usize, out: &mut [f32]) {
    with_buffer(&SCRATCH, |scratch| {
        let scratch = aligned(scratch, tiling.rows * job.panels.padded_keys);
        match isa {
            // SAFETY: the CPU has the features the kernels are compiled for (checked by the
            // caller).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::attend_queries(job, first_query, out, scratch) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::attend_queries(job, first_query, out, scratch) },
            _ => portable::attend_queries(job, first_query, out, scratch),
        }
    })
}

/// Rearranges k and v into `buffer` (see [`Panels`]).
fn pack<'a>(
    shape: Shape,
    tiling: Tiling,
    k: &[f32],
    v: &[f32],
    buffer: &'a mut Vec<f32>,
) -> Panels<'a> {
    let Shape {
        keys,
        heads,
        key_size,
        value_size,
        ..
    } = shape;
    let Tiling {
        key_tile,
        value_tile,
        ..
    } = tiling;
    let padded_keys = keys.next_multiple_of(key_tile);
    let column_tiles = value_size.div_ceil(value_tile);
    let keys_len = heads * padded_keys * key_size;
    let values_len = heads * column_tiles * padded_keys * value_tile;
    // The padding (keys past the last, value columns past the last) is never read into an
    // output, so a reused buffer keeps whatever it held there.
    let (key_panels, value_panels) = aligned(buffer, keys_len + values_len).split_at_mut(keys_len);
    let row = |j: usize, h: usize| j * heads + h;
    // Keys transposed a tile at a time: its panel rows written front to back, its keys read
    // from as many rows as stay in L1.
    for (h, panel) in key_panels
        .chunks_exact_mut(padded_keys * key_size)
        .enumerate()
    {
        for (tile, panel) in panel.chunks_exact_mut(key_size * key_tile).enumerate() {
            let first = tile * key_tile;
            let tile_keys = key_tile.min(keys - first);
            for (d, panel_row) in panel.chunks_exact_mut(key_tile).enumerate() {
                for (lane, value) in panel_row[..tile_keys].iter_mut().enumerate() {
                    *value = k[row(first + lane, h) * key_size + d];
                }
            }
        }
    }
    // Values: each row cut into tiles of columns.
    for (h, panel) in value_panels
        .chunks_exact_mut(column_tiles * padded_keys * value_tile)
        .enumerate()
    {
        for (tile, panel) in panel.chunks_exact_mut(padded_keys * value_tile).enumerate() {
            let column = tile * value_tile;
            let columns = value_tile.min(value_size - column);
            for (j, panel_row) in panel.chunks_exact_mut(value_tile).take(keys).enumerate() {
                let v_row = &v[row(j, h) * value_size + column..][..columns];
                panel_row[..columns].copy_from_slice(v_row);
            }
        }
    }
    Panels {
        keys: key_panels,
        values: value_panels,
        tiling,
        padded_keys,
        column_tiles,
    }
}

/// What every worker reads.
struct Job<'a> {
    shape: Shape,
    scale: f32,
    /// Added to the scaled scores: `[heads, queries, keys]`.
    bias: Option<&'a [f32]>,
    q: &'a [f32],
    panels: Panels<'a>,
}

impl Job<'_> {
    /// Adds the bias (if any) of `head` and `query` to that row of scaled scores.
    #[inline(always)]
    fn add_bias(&self, head: usize, query: usize, scores: &mut [f32]) {
        if let Some(bias) = self.bias {
            let keys = self.shape.keys;
            let row = &bias[(head * self.shape.queries + query) * keys..][..keys];
            for (score, &b) in scores[..keys].iter_mut().zip(row) {
                *score += b;
            }
        }
    }
}

/// The f32 kernel the attention core runs for the best instruction set `isa`: aarch64 runs the
/// portable one, which the compiler vectorises with NEON.
fn kernel(isa: Isa) -> Isa {
    match isa.float() {
        Isa::Neon => Isa::Portable,
        isa => isa,
    }
}

/// Make the attention cores of an int8 model compute their two products in int8 where `isa`
/// has a kernel for it (AVX-512 VNNI, `int8.rs`) and there are enough keys to pay for
/// quantizing k and v; returns how many.
pub fn use_int8(model: &mut TypedModel, isa: Isa) -> usize {
    if isa != Isa::Avx512Vnni {
        return 0;
    }
    let mut count = 0;
    for node in &mut model.nodes {
        if let Some(op) = node.op_as_mut::<TokenMajorAttention>() {
            op.isa = isa;
            count += 1;
        }
    }
    count
}

mod fusion;

pub use fusion::fuse_attention;

#[cfg(test)]
mod tests;
