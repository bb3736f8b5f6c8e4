//! The one preprocessing shared by training and serving.
//!
//! A decoded frame of any size becomes the model's normalised `C×H×W` input:
//! crop (optional) → separable antialiased bilinear resize → channel conversion → normalise,
//! written straight into a caller-owned `f32` slice. The exporter's data loader and the runtime's
//! frame pipeline both call [`PatchPipeline::run`], so the model sees identical pixels in
//! training and on the device.
//!
//! Filter tables and the intermediate row buffer live in the pipeline and are rebuilt only when
//! the frame geometry changes, so a camera loop with a fixed frame size allocates nothing.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

mod pipeline;

pub use pipeline::PatchPipeline;

/// ITU-R BT.601 luma weights, as PIL's `convert("L")` and torchvision's `Grayscale` use.
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

/// Why a frame, an output slice or a preprocessing configuration was refused.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum PreprocessError {
    /// The frame has no pixels.
    #[error("frame is empty ({width}x{height})")]
    EmptyFrame {
        /// Frame width in pixels.
        width: u32,
        /// Frame height in pixels.
        height: u32,
    },
    /// The frame's buffer is shorter than its size, stride and format need.
    #[error(
        "frame buffer holds {actual} bytes, {width}x{height} {format} with stride {stride} needs {needed}"
    )]
    FrameTooShort {
        /// Frame width in pixels.
        width: u32,
        /// Frame height in pixels.
        height: u32,
        /// Bytes from one row's start to the next.
        stride: usize,
        /// Layout of the pixels.
        format: PixelFormat,
        /// Bytes the frame needs: `stride × (height − 1)` plus one row.
        needed: usize,
        /// Bytes the buffer holds.
        actual: usize,
    },
    /// Rows would overlap: the stride is shorter than a row.
    #[error("stride {stride} is shorter than a row of {row} bytes")]
    StrideTooShort {
        /// Bytes from one row's start to the next.
        stride: usize,
        /// Bytes of one row: width × bytes per pixel.
        row: usize,
    },
    /// The frame would span more than `isize::MAX` bytes, or its size overflows `usize`.
    #[error(
        "a {width}x{height} frame with rows {stride} bytes apart spans more bytes than memory holds"
    )]
    FrameTooLarge {
        /// Frame width in pixels.
        width: u32,
        /// Frame height in pixels.
        height: u32,
        /// Bytes from one row's start to the next.
        stride: usize,
    },
    /// The output slice's length is not the model input's `C×H×W`.
    #[error("output tensor holds {actual} values, the model input needs {needed}")]
    OutputSize {
        /// Values of the model's input.
        needed: usize,
        /// Values of the slice.
        actual: usize,
    },
    /// The crop region is empty, not a number, or reaches outside the frame.
    #[error("crop region {0:?} lies outside the frame")]
    BadRegion(Region),
    /// The configuration is invalid (size, channels, mean or std), or a resize mode's name unknown.
    #[error("invalid preprocessing: {0}")]
    InvalidConfig(String),
}

/// How a frame of arbitrary aspect ratio reaches the model's square input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Stretch the whole frame to the input size, as the tutorial's `Resize((144, 144))` does.
    #[default]
    Squash,
    /// Resize the shorter side to the input size and keep the centre square.
    CenterCrop,
}

impl ResizeMode {
    /// The name the metadata and the command line use: `squash` or `center-crop`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResizeMode::Squash => "squash",
            ResizeMode::CenterCrop => "center-crop",
        }
    }
}

impl fmt::Display for ResizeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ResizeMode {
    type Err = PreprocessError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "squash" => Ok(ResizeMode::Squash),
            "center-crop" => Ok(ResizeMode::CenterCrop),
            other => Err(PreprocessError::InvalidConfig(format!(
                "unknown resize mode {other:?} (expected squash or center-crop)"
            ))),
        }
    }
}

/// Everything needed to turn a frame into the model's input; stored in the ONNX metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreprocessConfig {
    /// Square input side in pixels.
    pub image_size: u32,
    /// 1 (grey) or 3 (RGB).
    pub channels: u32,
    /// Per-channel mean and std applied to pixels scaled to [0, 1]; one value per channel.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation, every value positive (see `mean`).
    pub std: Vec<f32>,
    /// How a frame of any aspect ratio reaches the square input.
    pub resize: ResizeMode,
}

impl PreprocessConfig {
    /// Pixels scaled to [-1, 1]: a neutral default that suits both grey and colour data.
    pub fn new(image_size: u32, channels: u32) -> Self {
        let n = channels as usize;
        PreprocessConfig {
            image_size,
            channels,
            mean: vec![0.5; n],
            std: vec![0.5; n],
            resize: ResizeMode::Squash,
        }
    }

    /// Check the configuration: size in 1..=4096, 1 or 3 channels, and per channel a finite mean
    /// and a positive, finite std.
    pub fn validate(&self) -> Result<(), PreprocessError> {
        let invalid = |msg: String| Err(PreprocessError::InvalidConfig(msg));
        if self.image_size == 0 || self.image_size > 4096 {
            return invalid(format!("image size {} is not in 1..=4096", self.image_size));
        }
        if self.channels != 1 && self.channels != 3 {
            return invalid(format!("{} channels (expected 1 or 3)", self.channels));
        }
        let n = self.channels as usize;
        if self.mean.len() != n || self.std.len() != n {
            return invalid(format!(
                "mean/std need {n} values each, got {} and {}",
                self.mean.len(),
                self.std.len()
            ));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0)
            || self.mean.iter().any(|m| !m.is_finite())
        {
            return invalid("std must be positive and mean/std finite".into());
        }
        Ok(())
    }

    /// Number of `f32` values of one preprocessed image (`C×H×W`).
    pub fn tensor_len(&self) -> usize {
        (self.channels * self.image_size * self.image_size) as usize
    }
}

/// One value for every channel: a single value is repeated, a list is kept as given (and
/// checked by [`PreprocessConfig::validate`]).
pub fn per_channel(values: Vec<f32>, channels: usize) -> Vec<f32> {
    if values.len() == 1 {
        vec![values[0]; channels]
    } else {
        values
    }
}

/// Layout of the bytes of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelFormat {
    /// One byte per pixel: grey.
    Gray8,
    /// Three bytes per pixel: red, green, blue.
    Rgb8,
    /// Three bytes per pixel: blue, green, red (OpenCV's order).
    Bgr8,
}

impl PixelFormat {
    /// Bytes of one pixel: 1 or 3.
    pub fn bytes_per_pixel(self) -> usize {
        match self {
            PixelFormat::Gray8 => 1,
            PixelFormat::Rgb8 | PixelFormat::Bgr8 => 3,
        }
    }
}

impl fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PixelFormat::Gray8 => "gray8",
            PixelFormat::Rgb8 => "rgb8",
            PixelFormat::Bgr8 => "bgr8",
        })
    }
}

/// Borrowed pixels of one frame; `stride` is the distance in bytes between row starts.
#[derive(Clone, Copy, Debug)]
pub struct FrameRef<'a> {
    /// The pixels: at least [`FrameRef::required_bytes`] bytes; any beyond are ignored.
    pub data: &'a [u8],
    /// Frame width in pixels.
    pub width: u32,
    /// Frame height in pixels.
    pub height: u32,
    /// Bytes from one row's start to the next: at least `width × bytes per pixel`.
    pub stride: usize,
    /// Layout of each pixel's bytes.
    pub format: PixelFormat,
}

impl<'a> FrameRef<'a> {
    /// A tightly packed frame (stride = width × bytes per pixel).
    pub fn packed(data: &'a [u8], width: u32, height: u32, format: PixelFormat) -> Self {
        let stride = (width as usize).saturating_mul(format.bytes_per_pixel());
        FrameRef {
            data,
            width,
            height,
            stride,
            format,
        }
    }

    /// The bytes a `width`×`height` frame's buffer must hold: `stride × (height − 1)` plus one
    /// row. Computed without overflow: a stride near `usize::MAX` (a bottom-up image's negative
    /// stride passed as unsigned) is an error, not a wrapped small number.
    pub fn required_bytes(
        width: u32,
        height: u32,
        stride: usize,
        format: PixelFormat,
    ) -> Result<usize, PreprocessError> {
        if width == 0 || height == 0 {
            return Err(PreprocessError::EmptyFrame { width, height });
        }
        let too_large = PreprocessError::FrameTooLarge {
            width,
            height,
            stride,
        };
        // On 32-bit boards even one row of a 2^32-pixel-wide frame overflows.
        let row = (width as usize)
            .checked_mul(format.bytes_per_pixel())
            .ok_or(too_large.clone())?;
        if stride < row {
            return Err(PreprocessError::StrideTooShort { stride, row });
        }
        stride
            .checked_mul(height as usize - 1)
            .and_then(|rows| rows.checked_add(row))
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .ok_or(too_large)
    }

    fn check(&self) -> Result<(), PreprocessError> {
        let needed = Self::required_bytes(self.width, self.height, self.stride, self.format)?;
        if self.data.len() < needed {
            return Err(PreprocessError::FrameTooShort {
                width: self.width,
                height: self.height,
                stride: self.stride,
                format: self.format,
                needed,
                actual: self.data.len(),
            });
        }
        Ok(())
    }

    fn row(&self, y: usize) -> &'a [u8] {
        let start = y * self.stride;
        &self.data[start..start + self.width as usize * self.format.bytes_per_pixel()]
    }
}

/// A rectangle of a frame in pixels (possibly fractional, as random-resized crops are).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Region {
    /// Left edge, in pixels from the frame's left side.
    pub left: f32,
    /// Top edge, in pixels from the frame's top.
    pub top: f32,
    /// Width in pixels; above 0.
    pub width: f32,
    /// Height in pixels; above 0.
    pub height: f32,
}

impl Region {
    /// The whole of a `width`×`height` frame.
    pub fn whole(width: u32, height: u32) -> Self {
        Region {
            left: 0.0,
            top: 0.0,
            width: width as f32,
            height: height as f32,
        }
    }

    /// The region `mode` keeps of a `width`×`height` frame.
    pub fn for_mode(mode: ResizeMode, width: u32, height: u32) -> Self {
        match mode {
            ResizeMode::Squash => Region::whole(width, height),
            ResizeMode::CenterCrop => {
                let side = width.min(height) as f32;
                Region {
                    left: (width as f32 - side) / 2.0,
                    top: (height as f32 - side) / 2.0,
                    width: side,
                    height: side,
                }
            }
        }
    }
}
