//! [`PatchPipeline`]: a frame of any size into the model's input tensor, through filter tables
//! built once per frame geometry.

use super::{FrameRef, LUMA, PixelFormat, PreprocessConfig, PreprocessError, Region};
use crate::ops::Isa;

/// Precomputed taps of a 1-D resampling: for each output sample, the first input index and
/// its weights (a fixed-width window so the table is one flat buffer).
#[derive(Debug, Default)]
struct FilterTable {
    first: Vec<usize>,
    weights: Vec<f32>,
    taps: usize,
    /// Input length; windows of short inputs reach past it with zero weights.
    src_len: usize,
}

impl FilterTable {
    /// Antialiased bilinear (triangle filter widened by the downscale factor, as PIL and
    /// fast_image_resize do): downscaling averages every source pixel instead of aliasing.
    fn rebuild(&mut self, src_len: usize, start: f32, extent: f32, dst_len: usize) {
        let scale = extent / dst_len as f32;
        let support = scale.max(1.0);
        self.taps = (support.ceil() as usize) * 2 + 1;
        self.src_len = src_len;
        self.first.clear();
        self.weights.clear();
        for out in 0..dst_len {
            let centre = start + (out as f32 + 0.5) * scale;
            let lo = ((centre - support).floor().max(0.0) as usize).min(src_len - 1);
            let lo = lo.min(src_len.saturating_sub(self.taps));
            let mut total = 0.0;
            let base = self.weights.len();
            for tap in 0..self.taps {
                let index = lo + tap;
                let w = if index < src_len {
                    (1.0 - ((index as f32 + 0.5 - centre) / support).abs()).max(0.0)
                } else {
                    0.0
                };
                self.weights.push(w);
                total += w;
            }
            if total > 0.0 {
                self.weights[base..].iter_mut().for_each(|w| *w /= total);
            } else {
                // Sample outside every tap (degenerate tiny crops): nearest pixel.
                let nearest = (centre.floor().max(0.0) as usize).min(src_len - 1);
                self.weights[base + nearest.saturating_sub(lo).min(self.taps - 1)] = 1.0;
            }
            self.first.push(lo);
        }
    }

    fn taps_of(&self, out: usize) -> (usize, &[f32]) {
        (
            self.first[out],
            &self.weights[out * self.taps..(out + 1) * self.taps],
        )
    }

    /// Input indices any output sample reads.
    fn span(&self) -> std::ops::Range<usize> {
        let lo = self.first.first().copied().unwrap_or(0);
        let hi = self
            .first
            .last()
            .map_or(0, |f| f + self.taps)
            .min(self.src_len);
        lo..hi
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Geometry {
    width: u32,
    height: u32,
    region: [u32; 4],
}

/// The frame → tensor preprocessing, with every buffer sized once and reused.
#[derive(Debug)]
pub struct PatchPipeline {
    config: PreprocessConfig,
    scale: Vec<f32>,
    offset: Vec<f32>,
    horizontal: FilterTable,
    vertical: FilterTable,
    /// One output row of the vertical pass, over the columns the horizontal pass reads, in
    /// the frame's channels: `columns × bytes per pixel` (room for 3).
    row: Vec<f32>,
    geometry: Option<Geometry>,
    /// The vertical pass's vector width (every one gives the same values).
    isa: Isa,
}

impl PatchPipeline {
    /// A pipeline for `config`, once [`PreprocessConfig::validate`] accepts it; its buffers are
    /// sized at the first frame.
    pub fn new(config: PreprocessConfig) -> Result<Self, PreprocessError> {
        config.validate()?;
        // (x / 255 - mean) / std folded into one multiply-add per value.
        let scale = config.std.iter().map(|s| 1.0 / (255.0 * s)).collect();
        let offset = config
            .mean
            .iter()
            .zip(&config.std)
            .map(|(m, s)| -m / s)
            .collect();
        Ok(PatchPipeline {
            config,
            scale,
            offset,
            horizontal: FilterTable::default(),
            vertical: FilterTable::default(),
            row: Vec::new(),
            geometry: None,
            isa: Isa::best(),
        })
    }

    /// The pipeline with its vertical pass on `isa`'s vectors (by default the best this CPU
    /// runs). Every instruction set gives the same values: each sum is a multiply then an add,
    /// in the same order. Panics if this CPU cannot run `isa` ([`Isa::choose`] checks).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        assert!(isa.runs_here(), "{isa} kernels on a CPU without them");
        self.isa = isa;
        self
    }

    /// The configuration the pipeline runs.
    pub fn config(&self) -> &PreprocessConfig {
        &self.config
    }

    /// Preprocess a whole frame with the configured resize mode into `out` (`C×H×W`).
    pub fn run(&mut self, frame: &FrameRef, out: &mut [f32]) -> Result<(), PreprocessError> {
        let region = Region::for_mode(self.config.resize, frame.width, frame.height);
        self.run_region(frame, region, out)
    }

    /// Preprocess one region of a frame (random-resized crops in training) into `out`.
    pub fn run_region(
        &mut self,
        frame: &FrameRef,
        region: Region,
        out: &mut [f32],
    ) -> Result<(), PreprocessError> {
        frame.check()?;
        let needed = self.config.tensor_len();
        if out.len() != needed {
            return Err(PreprocessError::OutputSize {
                needed,
                actual: out.len(),
            });
        }
        let inside = region.left >= 0.0
            && region.top >= 0.0
            && region.width > 0.0
            && region.height > 0.0
            && region.left + region.width <= frame.width as f32 + 1e-3
            && region.top + region.height <= frame.height as f32 + 1e-3;
        if !inside {
            return Err(PreprocessError::BadRegion(region));
        }
        self.prepare(frame, region);
        self.resample(frame, out);
        Ok(())
    }

    fn prepare(&mut self, frame: &FrameRef, region: Region) {
        let geometry = Geometry {
            width: frame.width,
            height: frame.height,
            region: [region.left, region.top, region.width, region.height].map(f32::to_bits),
        };
        if self.geometry == Some(geometry) {
            return;
        }
        let size = self.config.image_size as usize;
        self.horizontal
            .rebuild(frame.width as usize, region.left, region.width, size);
        self.vertical
            .rebuild(frame.height as usize, region.top, region.height, size);
        self.row.resize(self.horizontal.span().len() * 3, 0.0);
        self.geometry = Some(geometry);
    }

    /// Both passes, an output row at a time. Both are linear, so the vertical one goes first:
    /// it sums whole source rows (contiguous reads the compiler vectorises), and a downscaled
    /// frame then leaves the horizontal pass, whose short sums do not vectorise, few values.
    fn resample(&mut self, frame: &FrameRef, out: &mut [f32]) {
        // One monomorphised loop per pixel format: no per-tap format dispatch.
        match frame.format {
            PixelFormat::Gray8 => self.resample_of::<Gray8>(frame, out),
            PixelFormat::Rgb8 => self.resample_of::<Rgb8>(frame, out),
            PixelFormat::Bgr8 => self.resample_of::<Bgr8>(frame, out),
        }
    }

    fn resample_of<P: SourcePixel>(&mut self, frame: &FrameRef, out: &mut [f32]) {
        let size = self.config.image_size as usize;
        let row_len = self.horizontal.span().len() * P::BYTES;
        // Taken out of `self` (a move, not a copy) while the passes read the tables.
        let mut row = std::mem::take(&mut self.row);
        for y in 0..size {
            self.vertical_pass(frame, P::BYTES, y, &mut row[..row_len]);
            self.horizontal_pass::<P>(frame, &row[..row_len], y, out);
        }
        self.row = row;
    }

    /// Output row `y` of the vertical pass into `row`: the weighted sum of the source rows
    /// under its taps, over the columns the horizontal pass reads, in the frame's channels,
    /// each value summing its taps in order.
    fn vertical_pass(&self, frame: &FrameRef, bytes: usize, y: usize, row: &mut [f32]) {
        let columns = self.horizontal.span();
        let (first, weights) = self.vertical.taps_of(y);
        // Taps past the last row carry zero weight (short frames): leave them out.
        let taps = weights.len().min(frame.height as usize - first);
        row.fill(0.0);
        for (tap, &w) in weights[..taps].iter().enumerate() {
            // A zero weight adds nothing (the sums are never negative zero).
            if w == 0.0 {
                continue;
            }
            let source = &frame.row(first + tap)[columns.start * bytes..columns.end * bytes];
            add_weighted(self.isa, row, w, source);
        }
    }

    /// Output row `y` from the vertical pass's `row`: the horizontal pass, the channels
    /// converted, and the normalisation, into planar `C×H×W`.
    fn horizontal_pass<P: SourcePixel>(
        &self,
        frame: &FrameRef,
        row: &[f32],
        y: usize,
        out: &mut [f32],
    ) {
        let size = self.config.image_size as usize;
        let channels = self.config.channels as usize;
        let plane = size * size;
        let columns = self.horizontal.span();
        for x in 0..size {
            let (first, weights) = self.horizontal.taps_of(x);
            // Taps past the row's end carry zero weight (short rows): leave them out.
            let taps = weights.len().min(frame.width as usize - first);
            let pixels = &row[(first - columns.start) * P::BYTES..][..taps * P::BYTES];
            let pixel = P::weighted_sum(pixels, &weights[..taps]);
            let at = y * size + x;
            if channels == 1 {
                let grey = LUMA[0] * pixel[0] + LUMA[1] * pixel[1] + LUMA[2] * pixel[2];
                out[at] = grey * self.scale[0] + self.offset[0];
            } else {
                for (c, value) in pixel.iter().enumerate() {
                    out[c * plane + at] = value * self.scale[c] + self.offset[c];
                }
            }
        }
    }
}

/// `sums[i] += w × values[i]` on `isa`'s vectors.
fn add_weighted(isa: Isa, sums: &mut [f32], w: f32, values: &[u8]) {
    match isa.float() {
        // SAFETY: the CPU runs `isa` (`Isa::best`, or checked by `with_isa`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { add_weighted_avx512(sums, w, values) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { add_weighted_avx2(sums, w, values) },
        _ => add_weighted_portable(sums, w, values),
    }
}

/// A multiply then an add: never fused, so every vector width gives the same sums.
#[inline(always)]
fn add_weighted_portable(sums: &mut [f32], w: f32, values: &[u8]) {
    for (sum, &value) in sums.iter_mut().zip(values) {
        *sum += w * value as f32;
    }
}

/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_weighted_avx2(sums: &mut [f32], w: f32, values: &[u8]) {
    add_weighted_portable(sums, w, values)
}

/// # Safety
/// The CPU has AVX-512F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn add_weighted_avx512(sums: &mut [f32], w: f32, values: &[u8]) {
    add_weighted_portable(sums, w, values)
}

/// A packed 8-bit source pixel layout, read as RGB.
trait SourcePixel {
    const BYTES: usize;
    /// `Σ weights[i] × pixel[i]` over consecutive pixels (their channels as f32), as RGB
    /// (grey replicated).
    fn weighted_sum(pixels: &[f32], weights: &[f32]) -> [f32; 3];
}

struct Gray8;
struct Rgb8;
struct Bgr8;

impl SourcePixel for Gray8 {
    const BYTES: usize = 1;
    #[inline]
    fn weighted_sum(pixels: &[f32], weights: &[f32]) -> [f32; 3] {
        let mut acc = 0.0f32;
        for (&w, &p) in weights.iter().zip(pixels) {
            acc += w * p;
        }
        [acc; 3]
    }
}

#[inline]
fn weighted_sum_rgb(pixels: &[f32], weights: &[f32], [r, g, b]: [usize; 3]) -> [f32; 3] {
    let mut acc = [0.0f32; 3];
    for (&w, p) in weights.iter().zip(pixels.chunks_exact(3)) {
        acc[0] += w * p[r];
        acc[1] += w * p[g];
        acc[2] += w * p[b];
    }
    acc
}

impl SourcePixel for Rgb8 {
    const BYTES: usize = 3;
    #[inline]
    fn weighted_sum(pixels: &[f32], weights: &[f32]) -> [f32; 3] {
        weighted_sum_rgb(pixels, weights, [0, 1, 2])
    }
}

impl SourcePixel for Bgr8 {
    const BYTES: usize = 3;
    #[inline]
    fn weighted_sum(pixels: &[f32], weights: &[f32]) -> [f32; 3] {
        weighted_sum_rgb(pixels, weights, [2, 1, 0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::ResizeMode;

    fn identity_config(size: u32, channels: u32) -> PreprocessConfig {
        PreprocessConfig {
            mean: vec![0.0; channels as usize],
            std: vec![1.0; channels as usize],
            ..PreprocessConfig::new(size, channels)
        }
    }

    #[test]
    fn same_size_grey_is_an_exact_copy() {
        let pixels: Vec<u8> = (0..16u8).map(|v| v * 16).collect();
        let frame = FrameRef::packed(&pixels, 4, 4, PixelFormat::Gray8);
        let mut pipeline = PatchPipeline::new(identity_config(4, 1)).unwrap();
        let mut out = vec![0.0; 16];
        pipeline.run(&frame, &mut out).unwrap();
        for (o, p) in out.iter().zip(&pixels) {
            assert!((o - *p as f32 / 255.0).abs() < 1e-6, "{o} vs {p}");
        }
    }

    #[test]
    fn downscale_keeps_flat_areas_flat_and_edges_in_place() {
        // 8x8: left half black, right half white → 2x2: dark left column, bright right column.
        let pixels: Vec<u8> = (0..64).map(|i| if i % 8 < 4 { 0 } else { 255 }).collect();
        let frame = FrameRef::packed(&pixels, 8, 8, PixelFormat::Gray8);
        let mut pipeline = PatchPipeline::new(identity_config(2, 1)).unwrap();
        let mut out = vec![0.0; 4];
        pipeline.run(&frame, &mut out).unwrap();
        assert!(
            out[0] < 0.2 && out[2] < 0.2 && out[1] > 0.8 && out[3] > 0.8,
            "{out:?}"
        );

        let flat = vec![77u8; 7 * 5];
        let frame = FrameRef::packed(&flat, 7, 5, PixelFormat::Gray8);
        let mut pipeline = PatchPipeline::new(identity_config(3, 1)).unwrap();
        let mut out = vec![0.0; 9];
        pipeline.run(&frame, &mut out).unwrap();
        assert!(
            out.iter().all(|v| (v - 77.0 / 255.0).abs() < 1e-5),
            "{out:?}"
        );
    }

    #[test]
    fn rgb_to_grey_uses_bt601_luma_and_bgr_swaps_channels() {
        let rgb = [255u8, 0, 0];
        let frame = FrameRef::packed(&rgb, 1, 1, PixelFormat::Rgb8);
        let mut grey = PatchPipeline::new(identity_config(1, 1)).unwrap();
        let mut out = [0.0];
        grey.run(&frame, &mut out).unwrap();
        assert!((out[0] - 0.299).abs() < 1e-5);

        let bgr = FrameRef::packed(&rgb, 1, 1, PixelFormat::Bgr8);
        let mut colour = PatchPipeline::new(identity_config(1, 3)).unwrap();
        let mut out = [0.0; 3];
        colour.run(&bgr, &mut out).unwrap();
        assert_eq!(out, [0.0, 0.0, 1.0]);
    }

    #[test]
    fn normalisation_applies_mean_and_std_per_channel() {
        let pixels = [255u8, 0, 51];
        let frame = FrameRef::packed(&pixels, 1, 1, PixelFormat::Rgb8);
        let config = PreprocessConfig {
            mean: vec![0.5, 0.5, 0.2],
            std: vec![0.5, 0.25, 0.1],
            ..PreprocessConfig::new(1, 3)
        };
        let mut pipeline = PatchPipeline::new(config).unwrap();
        let mut out = [0.0; 3];
        pipeline.run(&frame, &mut out).unwrap();
        let expected = [1.0, -2.0, 0.0];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn center_crop_ignores_the_sides() {
        // 6x2 frame: black borders of 2 columns each side, white centre → 2x2 white.
        let mut pixels = [0u8; 12];
        for y in 0..2 {
            pixels[y * 6 + 2] = 255;
            pixels[y * 6 + 3] = 255;
        }
        let frame = FrameRef::packed(&pixels, 6, 2, PixelFormat::Gray8);
        let config = PreprocessConfig {
            resize: ResizeMode::CenterCrop,
            ..identity_config(2, 1)
        };
        let mut pipeline = PatchPipeline::new(config).unwrap();
        let mut out = [0.0; 4];
        pipeline.run(&frame, &mut out).unwrap();
        assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-5), "{out:?}");
    }

    #[test]
    fn stride_padding_is_skipped() {
        // 2x2 grey with 3 padding bytes per row.
        let pixels = [10u8, 20, 99, 99, 99, 30, 40, 99, 99, 99];
        let frame = FrameRef {
            data: &pixels,
            width: 2,
            height: 2,
            stride: 5,
            format: PixelFormat::Gray8,
        };
        let mut pipeline = PatchPipeline::new(identity_config(2, 1)).unwrap();
        let mut out = [0.0; 4];
        pipeline.run(&frame, &mut out).unwrap();
        let expected = [10.0, 20.0, 30.0, 40.0].map(|v| v / 255.0);
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn bad_frames_and_outputs_are_named_errors() {
        let mut pipeline = PatchPipeline::new(identity_config(2, 1)).unwrap();
        let mut out = [0.0; 4];
        let empty = FrameRef::packed(&[], 0, 0, PixelFormat::Gray8);
        assert!(matches!(
            pipeline.run(&empty, &mut out),
            Err(PreprocessError::EmptyFrame { .. })
        ));
        let short = FrameRef::packed(&[1, 2, 3], 2, 2, PixelFormat::Gray8);
        assert!(matches!(
            pipeline.run(&short, &mut out),
            Err(PreprocessError::FrameTooShort { .. })
        ));
        let ok = FrameRef::packed(&[1, 2, 3, 4], 2, 2, PixelFormat::Gray8);
        assert!(matches!(
            pipeline.run(&ok, &mut [0.0; 3]),
            Err(PreprocessError::OutputSize { .. })
        ));
        let outside = Region {
            left: 1.0,
            top: 0.0,
            width: 2.0,
            height: 2.0,
        };
        assert!(matches!(
            pipeline.run_region(&ok, outside, &mut out),
            Err(PreprocessError::BadRegion(_))
        ));
        assert!(PatchPipeline::new(PreprocessConfig::new(4, 2)).is_err());
    }

    #[test]
    fn a_stride_that_wraps_is_refused_not_trusted() {
        // A bottom-up image's stride of -1920 passed as unsigned: `stride × 1 + row` wrapped to
        // 2 bytes, which the 2-byte buffer "held", and row 1 was then read out of bounds.
        let data = [7u8; 2];
        let wrapping = FrameRef {
            data: &data,
            width: 1922,
            height: 2,
            stride: 0usize.wrapping_sub(1920),
            format: PixelFormat::Gray8,
        };
        let mut pipeline = PatchPipeline::new(identity_config(2, 1)).unwrap();
        assert!(matches!(
            pipeline.run(&wrapping, &mut [0.0; 4]),
            Err(PreprocessError::FrameTooLarge { .. })
        ));
        let too_short = FrameRef {
            stride: 3,
            ..FrameRef::packed(&data, 2, 1, PixelFormat::Rgb8)
        };
        assert_eq!(
            pipeline.run(&too_short, &mut [0.0; 4]),
            Err(PreprocessError::StrideTooShort { stride: 3, row: 6 })
        );
        assert_eq!(
            FrameRef::required_bytes(640, 480, 2048, PixelFormat::Bgr8),
            Ok(2048 * 479 + 640 * 3)
        );
    }

    #[test]
    fn upscaling_is_monotonic_between_neighbours() {
        let pixels = [0u8, 255];
        let frame = FrameRef::packed(&pixels, 2, 1, PixelFormat::Gray8);
        let mut pipeline = PatchPipeline::new(identity_config(8, 1)).unwrap();
        let mut out = [0.0; 64];
        pipeline.run(&frame, &mut out).unwrap();
        let first_row = &out[..8];
        assert!(
            first_row.windows(2).all(|w| w[0] <= w[1] + 1e-6),
            "{first_row:?}"
        );
        assert!(first_row[0] < 0.01 && first_row[7] > 0.99);
    }

    /// A frame whose rows are not a whole number of vectors: 173 × 91 pixels.
    fn odd_frame_pixels() -> Vec<u8> {
        (0..173 * 91 * 3).map(|i| (i * 7919 % 251) as u8).collect()
    }

    #[test]
    fn downscaling_is_the_separable_filter() {
        let pixels = odd_frame_pixels();
        let frame = FrameRef::packed(&pixels, 173, 91, PixelFormat::Rgb8);
        let size = 24;
        let mut pipeline = PatchPipeline::new(identity_config(size, 3)).unwrap();
        let mut out = vec![0.0; 3 * size as usize * size as usize];
        pipeline.run(&frame, &mut out).unwrap();
        let size = size as usize;
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let (top, down) = pipeline.vertical.taps_of(y);
                    let (left, across) = pipeline.horizontal.taps_of(x);
                    let mut want = 0.0f64;
                    for (j, &wy) in down.iter().enumerate().filter(|(j, _)| top + j < 91) {
                        for (i, &wx) in across.iter().enumerate().filter(|(i, _)| left + i < 173) {
                            let value = pixels[((top + j) * 173 + left + i) * 3 + c];
                            want += wy as f64 * wx as f64 * value as f64;
                        }
                    }
                    let got = out[(c * size + y) * size + x] as f64 * 255.0;
                    assert!(
                        (got - want).abs() < 1e-3,
                        "({c}, {y}, {x}): {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_values() {
        let pixels = odd_frame_pixels();
        for format in [PixelFormat::Rgb8, PixelFormat::Bgr8, PixelFormat::Gray8] {
            let data = &pixels[..173 * 91 * format.bytes_per_pixel()];
            let frame = FrameRef::packed(data, 173, 91, format);
            for channels in [1, 3] {
                let config = identity_config(24, channels);
                let run = |isa| {
                    let mut pipeline = PatchPipeline::new(config.clone()).unwrap().with_isa(isa);
                    let mut out = vec![0.0; config.tensor_len()];
                    pipeline.run(&frame, &mut out).unwrap();
                    out
                };
                let portable = run(Isa::Portable);
                for isa in Isa::available() {
                    assert!(
                        run(isa) == portable,
                        "{isa}, {format:?}, {channels} channels"
                    );
                }
            }
        }
    }
}
