//! A 2-D convolution (one group, no dilation, a constant kernel) computed by [`DenseLinear`]'s
//! kernels, with the residual Add and the ReLU that follow it.
//!
//! tract 0.23.9 gathers each convolution's image patches straight into its matrix kernel's
//! packed layout, every run. [`DenseConv`] copies the image once into a zero-bordered,
//! channels-last buffer, where each kernel row of a patch is one contiguous run. A
//! [`DenseLinear`] whose W was reordered once at load reads the patches there, one row per
//! output pixel ([`InputRows::patches`]), so no patch is copied. Every instruction set with a
//! dense kernel (AVX-512, AVX2, NEON, portable) has a convolution. Convolutions that feed only convolutions pass each other channels-last images.
//! [`fuse_conv`] puts it in place of tract's `Conv` in a typed model.

use std::cell::RefCell;

use crate::ops::dense::{DenseLinear, InputRows, Windows};
use crate::ops::rows::for_each_share;
use crate::ops::{Isa, aligned, with_buffer};
use tract_onnx::tract_core::internal::*;

mod fusion;
#[cfg(test)]
mod tests;

pub use fusion::fuse_conv;

thread_local! {
    /// The image, channels last, with its zero border.
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The products, channels last.
    static PRODUCTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Pixels moved together between the channels-first and channels-last layouts: a cache
/// line of f32 on the channels-first side.
const TILE: usize = 16;

/// The most patch values one pass over W's panels reads, in bytes: half of a 512 kB L2
/// cache (the windows overlap, so the image values they read take less).
const PATCH_CHUNK_BYTES: usize = 256 << 10;

/// The largest bordered image, in values, [`DenseConv`] takes (1 GiB of f32); tract keeps
/// larger ones.
const MAX_VALUES: usize = 1 << 28;

/// Sizes along the height and the width.
pub type Pair = [usize; 2];

/// The geometry of a convolution of an image `channels × input` by a kernel `kernel` wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// The image's channels.
    pub channels: usize,
    /// The image's height and width.
    pub input: Pair,
    /// The kernel's height and width.
    pub kernel: Pair,
    /// The steps between windows, down and across.
    pub strides: Pair,
    /// Zero rows and columns before the image (above, left).
    pub pad_before: Pair,
    /// Zero rows and columns after the image (below, right).
    pub pad_after: Pair,
}

impl Geometry {
    /// The output's height and width.
    pub fn output(&self) -> Pair {
        let padded = self.padded();
        std::array::from_fn(|a| (padded[a] - self.kernel[a]) / self.strides[a] + 1)
    }

    /// The zero-bordered image's height and width.
    fn padded(&self) -> Pair {
        std::array::from_fn(|a| self.pad_before[a] + self.input[a] + self.pad_after[a])
    }

    /// Values in one patch: a kernel's window over every channel.
    fn patch_len(&self) -> usize {
        self.kernel[0] * self.kernel[1] * self.channels
    }

    /// Whether the operator can compute this geometry: at least a channel, kernels and strides
    /// of at least one, a kernel no larger than the bordered image, and a bordered image of at
    /// most [`MAX_VALUES`] values (whatever a malformed file's sizes, no arithmetic overflows).
    pub fn is_valid(&self) -> bool {
        let padded = |a: usize| {
            self.pad_before[a]
                .checked_add(self.input[a])?
                .checked_add(self.pad_after[a])
        };
        let (Some(height), Some(width)) = (padded(0), padded(1)) else {
            return false;
        };
        let values = height
            .checked_mul(width)
            .and_then(|area| area.checked_mul(self.channels));
        self.channels > 0
            && values.is_some_and(|values| values <= MAX_VALUES)
            && (0..2).all(|a| {
                self.kernel[a] > 0 && self.strides[a] > 0 && self.kernel[a] <= [height, width][a]
            })
    }
}

/// Where the channels are in an image tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[images, channels, height, width]`: ONNX's layout.
    ChannelsFirst,
    /// `[images, height, width, channels]`: what [`DenseConv`]s pass each other.
    ChannelsLast,
}

/// `y = act(conv(x, K) + b + r)` for `x` f32 images, K and b held by the operator, `act` the
/// identity or ReLU, and `r` an optional second input of the output's shape (a residual
/// block's shortcut). Each of x, r and y is channels first unless its layout says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenseConv {
    geometry: Geometry,
    /// K as a `[patch, output channels]` product, with the bias.
    product: DenseLinear,
    output_channels: usize,
    /// A second input is added to the sums.
    pub residual: bool,
    /// ReLU applied last.
    pub relu: bool,
    /// The layouts of x, of r and of y.
    pub layouts: [Layout; 3],
}

impl DenseConv {
    /// The operator for `kernel` (`[output channels, channels, kernel height, kernel width]`,
    /// ONNX's layout) and an optional `bias`, computed by `isa`'s dense kernel.
    pub fn new(
        isa: Isa,
        geometry: Geometry,
        kernel: &[f32],
        bias: Option<&[f32]>,
    ) -> TractResult<DenseConv> {
        ensure!(geometry.is_valid(), "convolution geometry {geometry:?}");
        let patch = geometry.patch_len();
        ensure!(!kernel.is_empty() && kernel.len().is_multiple_of(patch));
        let output_channels = kernel.len() / patch;
        // A patch row is ordered (kernel row, kernel column, channel): K becomes
        // `[output channel][kernel row][kernel column][channel]`, W transposed.
        let [height, width] = geometry.kernel;
        let channels = geometry.channels;
        let mut reordered = vec![0f32; kernel.len()];
        for o in 0..output_channels {
            for c in 0..channels {
                for ky in 0..height {
                    for kx in 0..width {
                        reordered[o * patch + (ky * width + kx) * channels + c] =
                            kernel[((o * channels + c) * height + ky) * width + kx];
                    }
                }
            }
        }
        let [out_height, out_width] = geometry.output();
        let product = DenseLinear::new(
            isa,
            &reordered,
            true,
            bias,
            patch,
            output_channels,
            tvec![out_height * out_width, output_channels],
        )?;
        Ok(DenseConv {
            geometry,
            product,
            output_channels,
            residual: false,
            relu: false,
            layouts: [Layout::ChannelsFirst; 3],
        })
    }

    /// The instruction set of the dense kernel it runs on.
    pub fn isa(&self) -> Isa {
        self.product.isa
    }

    /// The output's shape for `images` images.
    pub fn output_shape(&self, images: usize) -> TVec<usize> {
        shape(
            self.layouts[2],
            images,
            self.output_channels,
            self.geometry.output(),
        )
    }

    /// `out` from `x` and `residual`, each step spread over the inference threads.
    fn apply(&self, x: &[f32], residual: Option<&[f32]>, out: &mut [f32]) {
        let g = &self.geometry;
        let image_len = g.channels * g.input[0] * g.input[1];
        let images = x.len() / image_len;
        let [out_height, out_width] = g.output();
        let pixels = out_height * out_width;
        let patch = g.patch_len();
        let channels = self.output_channels;
        let macs = images * pixels * patch * channels;
        let [padded_height, padded_width] = g.padded();
        let [x_layout, residual_layout, y_layout] = self.layouts;
        // A channels-last residual is the dense kernel's to add; a channels-first one is added
        // where the sums change layout.
        let (kernel_residual, residual) = match residual_layout {
            Layout::ChannelsLast => (residual, None),
            Layout::ChannelsFirst => (None, residual),
        };
        with_buffer(&PADDED, |padded| {
            with_buffer(&PRODUCTS, |products| {
                let padded_row = padded_width * g.channels;
                let padded = aligned(padded, images * padded_height * padded_row);
                for_each_share(padded, padded_row, 1, macs, |first, rows| {
                    self.pad(x, x_layout, first, rows)
                });
                let patches = InputRows::patches(
                    padded,
                    Windows {
                        runs: g.kernel[0],
                        run: g.kernel[1] * g.channels,
                        image_row: padded_row,
                        image: padded_height * padded_row,
                        output: [out_height, out_width],
                        steps: [g.strides[0] * padded_row, g.strides[1] * g.channels],
                    },
                );
                let block = self.product.row_block();
                // A share's pixels a chunk at a time, so that the image values their patches
                // read stay in the L2 cache while every panel of W passes over them.
                let chunk = (PATCH_CHUNK_BYTES / (patch * size_of::<f32>()) / block).max(1) * block;
                let compute = |sums: &mut [f32]| {
                    for_each_share(sums, channels, block, macs, |share_first, share| {
                        for (c, rows) in share.chunks_mut(chunk * channels).enumerate() {
                            let first = share_first + c * chunk;
                            let kernel_residual =
                                kernel_residual.map(|r| &r[first * channels..][..rows.len()]);
                            self.product
                                .rows(patches.from(first), kernel_residual, rows);
                            if y_layout == Layout::ChannelsLast {
                                self.finish_channels_last(residual, first, rows);
                            }
                        }
                    })
                };
                match y_layout {
                    Layout::ChannelsLast => compute(out),
                    Layout::ChannelsFirst => {
                        let products = aligned(products, images * pixels * channels);
                        compute(products);
                        let products = &*products;
                        for_each_share(out, pixels, 1, macs, |first, planes| {
                            self.to_channels_first(products, residual, first, planes)
                        });
                    }
                }
            })
        });
    }

    /// The rows of the zero-bordered, channels-last images from `first` on (`rows`), from `x`.
    /// From channels first a tile of [`TILE`] pixels at a time, so that the strided writes
    /// stay in a few cache lines.
    fn pad(&self, x: &[f32], layout: Layout, first: usize, rows: &mut [f32]) {
        let g = &self.geometry;
        let channels = g.channels;
        let [padded_height, padded_width] = g.padded();
        let [height, width] = g.input;
        let plane = height * width;
        rows.fill(0.0);
        for (r, row) in rows.chunks_exact_mut(padded_width * channels).enumerate() {
            let (image, padded_y) = ((first + r) / padded_height, (first + r) % padded_height);
            let Some(y) = padded_y
                .checked_sub(g.pad_before[0])
                .filter(|&y| y < height)
            else {
                continue;
            };
            let image = &x[image * channels * plane..][..channels * plane];
            let row = &mut row[g.pad_before[1] * channels..][..width * channels];
            if layout == Layout::ChannelsLast {
                row.copy_from_slice(&image[y * width * channels..][..width * channels]);
                continue;
            }
            for start in (0..width).step_by(TILE) {
                let tile = TILE.min(width - start);
                let pixels = &mut row[start * channels..][..tile * channels];
                for c in 0..channels {
                    let values = &image[c * plane + y * width + start..][..tile];
                    for (pixel, &value) in pixels.chunks_exact_mut(channels).zip(values) {
                        pixel[c] = value;
                    }
                }
            }
        }
    }

    /// Channels-last output rows from pixel `first` on: the channels-first `residual` added
    /// and the ReLU applied.
    fn finish_channels_last(&self, residual: Option<&[f32]>, first: usize, rows: &mut [f32]) {
        let channels = self.output_channels;
        let [height, width] = self.geometry.output();
        let pixels = height * width;
        for (i, row) in rows.chunks_exact_mut(channels).enumerate() {
            let (image, pixel) = ((first + i) / pixels, (first + i) % pixels);
            if let Some(residual) = residual {
                let planes = &residual[image * channels * pixels..][..channels * pixels];
                for (o, y) in row.iter_mut().enumerate() {
                    *y += planes[o * pixels + pixel];
                }
            }
            if self.relu {
                for y in row.iter_mut() {
                    *y = y.max(0.0);
                }
            }
        }
    }

    /// The output planes (one per image and output channel) from `first` on, from `products`
    /// (`[images × pixels, output channels]`), with the residual added and the ReLU applied; a
    /// tile of [`TILE`] pixels at a time.
    fn to_channels_first(
        &self,
        products: &[f32],
        residual: Option<&[f32]>,
        first: usize,
        planes: &mut [f32],
    ) {
        let channels = self.output_channels;
        let [height, width] = self.geometry.output();
        let pixels = height * width;
        // Planes of one image at a time, a tile of pixels across all of them at a time: the
        // tile's products are then read from a few cache lines.
        let mut planes = planes;
        let mut plane = first;
        while !planes.is_empty() {
            let (image, o_first) = (plane / channels, plane % channels);
            let count = (channels - o_first).min(planes.len() / pixels);
            let (these, rest) = planes.split_at_mut(count * pixels);
            let sums = &products[image * pixels * channels..][..pixels * channels];
            let residual = residual.map(|r| &r[plane * pixels..][..count * pixels]);
            for start in (0..pixels).step_by(TILE) {
                let tile = TILE.min(pixels - start);
                let sums = &sums[start * channels..][..tile * channels];
                for (i, out) in these.chunks_exact_mut(pixels).enumerate() {
                    let o = o_first + i;
                    let out = &mut out[start..][..tile];
                    for (y, sums) in out.iter_mut().zip(sums.chunks_exact(channels)) {
                        *y = sums[o];
                    }
                    if let Some(residual) = residual {
                        for (y, r) in out.iter_mut().zip(&residual[i * pixels + start..][..tile]) {
                            *y += r;
                        }
                    }
                    if self.relu {
                        for y in out.iter_mut() {
                            *y = y.max(0.0);
                        }
                    }
                }
            }
            planes = rest;
            plane += count;
        }
    }
}

/// The shape of `images` images of `channels × size` in `layout`.
fn shape(layout: Layout, images: usize, channels: usize, [height, width]: Pair) -> TVec<usize> {
    match layout {
        Layout::ChannelsFirst => tvec![images, channels, height, width],
        Layout::ChannelsLast => tvec![images, height, width, channels],
    }
}

impl Op for DenseConv {
    fn name(&self) -> StaticName {
        "DenseConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        let residual = if self.residual { ", + residual" } else { "" };
        let relu = if self.relu { ", ReLU" } else { "" };
        let last = ["x", "residual", "y"]
            .iter()
            .zip(self.layouts)
            .filter(|(_, layout)| *layout == Layout::ChannelsLast)
            .map(|(name, _)| format!(", {name} channels last"))
            .collect::<String>();
        Ok(vec![format!(
            "{}x{} kernel, stride {}x{}, {} -> {} channels{residual}{relu}{last}, {}",
            g.kernel[0],
            g.kernel[1],
            g.strides[0],
            g.strides[1],
            g.channels,
            self.output_channels,
            self.product.isa
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for DenseConv {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1 + self.residual as usize);
        for input in &inputs {
            ensure!(input.datum_type() == f32::datum_type());
            ensure!(
                super::is_row_major(input),
                "input with strides {:?}",
                input.strides()
            );
        }
        let g = &self.geometry;
        let x_shape = inputs[0].shape();
        let images = x_shape.first().copied().unwrap_or(0);
        let expected = shape(self.layouts[0], images, g.channels, g.input);
        ensure!(
            x_shape == &*expected,
            "a convolution of {expected:?} images got input {x_shape:?}"
        );
        let output_shape = self.output_shape(images);
        let residual_shape = shape(self.layouts[1], images, self.output_channels, g.output());
        if let Some(residual) = inputs.get(1) {
            ensure!(
                residual.shape() == &*residual_shape,
                "residual of the wrong shape"
            );
        }
        // SAFETY: f32 has no invalid bit patterns, and `apply` writes every value.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&output_shape)? };
        {
            let x = inputs[0].try_as_plain_ram()?;
            let residual = inputs.get(1).map(|r| r.try_as_plain_ram()).transpose()?;
            let residual = residual.as_ref().map(|r| r.as_slice::<f32>()).transpose()?;
            let mut out = output.try_as_plain_ram_mut()?;
            self.apply(x.as_slice()?, residual, out.as_slice_mut()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for DenseConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 + self.residual as usize);
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()));
        let Some(x_shape) = inputs[0].shape.as_concrete() else {
            bail!("DenseConv needs a concrete input shape");
        };
        Ok(tvec!(f32::fact(&*self.output_shape(x_shape[0]))))
    }

    as_op!();
}
