//! Classifying a live stream: a reader thread cuts the input into frames and the caller's
//! thread classifies them, through a fixed ring of frame slots allocated once.
//!
//! When inference is slower than the camera, [`KeepPolicy::Latest`] drops the older waiting
//! frames (and counts them), so latency and memory stay bounded; [`KeepPolicy::All`] makes the
//! reader wait instead, which back-pressures the pipe. Bad frames become [`StreamEvent::Failed`]
//! and the stream goes on.
//!
//! ```
//! use runtime::{Classifier, KeepPolicy, Model, ModelOptions, StreamConfig, StreamEvent, StreamFormat};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bytes = runtime::embedded::DEFAULT_MODEL.expect("built with feature embedded-model");
//! let mut classifier = Classifier::new(Model::from_bytes(bytes, &ModelOptions::default())?, 1)?;
//! // Three 64×48 RGB frames, as `ffmpeg -f rawvideo -pix_fmt rgb24` would pipe them.
//! let input = std::io::Cursor::new(vec![100u8; 64 * 48 * 3 * 3]);
//! let config = StreamConfig { keep: KeepPolicy::All, ..StreamConfig::new(StreamFormat::Rgb24, 64, 48) };
//! let summary = runtime::run_stream(&mut classifier, input, &config, |event, classifier| {
//!     if let StreamEvent::Classified { index, top, .. } = event {
//!         println!("frame {index}: {}", classifier.label(top[0].class));
//!     }
//!     Ok(())
//! })?;
//! assert_eq!(summary.classified, 3);
//! # Ok(())
//! # }
//! ```

use crate::classifier::{ClassifyError, FrameTimings, TopK};
use crate::decode::{DecodeError, MAX_IMAGE_SIDE};
use crate::frame_source::FrameFault;
use crate::latency::LatencyHistogram;
use crate::yuv::yuv420_len;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

mod run;

pub use run::run_stream;

/// Most frame slots a ring can have.
pub const MAX_SLOTS: usize = 16;

/// Most bytes the ring's slots may take together: sizes come from the command line (frame
/// size, `--max-jpeg-bytes`, `--slots`), and a typo must be an error, not an abort when the
/// allocation fails. 16 slots of 4K RGB take 398 MB.
pub const MAX_RING_BYTES: usize = 1 << 30;

/// How frames arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFormat {
    /// Packed 8-bit RGB (ffmpeg's `rgb24`).
    Rgb24,
    /// Packed 8-bit BGR (ffmpeg's `bgr24`, OpenCV's order).
    Bgr24,
    /// 8-bit grey, one byte per pixel (ffmpeg's `gray`).
    Gray8,
    /// Planar 4:2:0, BT.601 limited range (ffmpeg's `yuv420p`).
    Yuv420p,
    /// Semi-planar 4:2:0 (`nv12`), as many camera ISPs deliver.
    Nv12,
    /// Concatenated JPEG images (`ffmpeg -f image2pipe -c:v mjpeg`, MJPEG webcams).
    Mjpeg,
}

impl StreamFormat {
    /// Every format, in the order error messages list them.
    pub const ALL: [StreamFormat; 6] = [
        StreamFormat::Rgb24,
        StreamFormat::Bgr24,
        StreamFormat::Gray8,
        StreamFormat::Yuv420p,
        StreamFormat::Nv12,
        StreamFormat::Mjpeg,
    ];

    /// The name `--format` takes (ffmpeg's `-pix_fmt` name for the raw formats).
    pub fn name(self) -> &'static str {
        match self {
            StreamFormat::Rgb24 => "rgb24",
            StreamFormat::Bgr24 => "bgr24",
            StreamFormat::Gray8 => "gray8",
            StreamFormat::Yuv420p => "yuv420p",
            StreamFormat::Nv12 => "nv12",
            StreamFormat::Mjpeg => "mjpeg",
        }
    }

    /// Bytes of one raw frame; `None` for MJPEG, whose frames vary. Saturates rather than
    /// overflows for absurd sizes, which the stream's size check then refuses.
    pub fn frame_bytes(self, width: u32, height: u32) -> Option<usize> {
        let pixels = (width as usize).saturating_mul(height as usize);
        match self {
            StreamFormat::Rgb24 | StreamFormat::Bgr24 => Some(pixels.saturating_mul(3)),
            StreamFormat::Gray8 => Some(pixels),
            StreamFormat::Yuv420p | StreamFormat::Nv12 => Some(yuv420_len(width, height)),
            StreamFormat::Mjpeg => None,
        }
    }
}

impl fmt::Display for StreamFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StreamFormat {
    type Err = StreamError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StreamFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                StreamError::Config(format!(
                    "unknown frame format {s:?} (expected rgb24, bgr24, gray8, yuv420p, nv12 or mjpeg)"
                ))
            })
    }
}

/// What happens when frames arrive faster than they are classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KeepPolicy {
    /// Classify the newest frame; older waiting frames are dropped and counted.
    #[default]
    Latest,
    /// Classify every frame; the reader waits for a free slot.
    All,
}

impl FromStr for KeepPolicy {
    type Err = StreamError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "latest" => Ok(KeepPolicy::Latest),
            "all" => Ok(KeepPolicy::All),
            other => Err(StreamError::Config(format!(
                "unknown keep policy {other:?} (expected latest or all)"
            ))),
        }
    }
}

/// What [`run_stream`] reads, and how; [`StreamConfig::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// How the frames are encoded in the input.
    pub format: StreamFormat,
    /// Frame size of raw formats (ignored for MJPEG, whose images carry their size).
    pub width: u32,
    /// Frame height of raw formats, in pixels (ignored for MJPEG, like `width`).
    pub height: u32,
    /// Classify every n-th frame (1: all); the others are read and skipped.
    pub every: u64,
    /// Which frames are classified when they arrive faster than inference runs.
    pub keep: KeepPolicy,
    /// Frame slots in the ring (2..=[`MAX_SLOTS`]).
    pub slots: usize,
    /// Slot size for MJPEG; a bigger JPEG is a frame error.
    pub max_jpeg_bytes: usize,
}

impl StreamConfig {
    /// A config for `format` frames of `width`×`height`: every frame, [`KeepPolicy::Latest`], 4
    /// slots, JPEGs up to 16 MiB.
    pub fn new(format: StreamFormat, width: u32, height: u32) -> Self {
        StreamConfig {
            format,
            width,
            height,
            every: 1,
            keep: KeepPolicy::Latest,
            slots: 4,
            max_jpeg_bytes: 16 << 20,
        }
    }

    /// The bytes of one slot, once the configuration is valid and the ring of slots fits
    /// [`MAX_RING_BYTES`].
    fn slot_bytes(&self) -> Result<usize, StreamError> {
        let invalid = |message: String| Err(StreamError::Config(message));
        if !(2..=MAX_SLOTS).contains(&self.slots) {
            return invalid(format!(
                "slots must be in 2..={MAX_SLOTS}, got {}",
                self.slots
            ));
        }
        if self.every == 0 {
            return invalid("--every must be at least 1".into());
        }
        let slot_bytes = match self.format.frame_bytes(self.width, self.height) {
            None if self.max_jpeg_bytes < 1024 => {
                return invalid(format!(
                    "a {}-byte JPEG limit is too small",
                    self.max_jpeg_bytes
                ));
            }
            None => self.max_jpeg_bytes,
            Some(_) if self.width == 0 || self.height == 0 => {
                return invalid(format!(
                    "{} frames need a size (--size WIDTHxHEIGHT)",
                    self.format
                ));
            }
            Some(_) if self.width > MAX_IMAGE_SIDE || self.height > MAX_IMAGE_SIDE => {
                return invalid(format!(
                    "frame size {}x{} exceeds {MAX_IMAGE_SIDE} px per side",
                    self.width, self.height
                ));
            }
            Some(bytes) => bytes,
        };
        match slot_bytes.checked_mul(self.slots) {
            Some(total) if total <= MAX_RING_BYTES => Ok(slot_bytes),
            _ => invalid(format!(
                "{} slots of {slot_bytes} bytes exceed the ring's limit of {} MiB: use fewer \
                 --slots, smaller frames or a lower --max-jpeg-bytes",
                self.slots,
                MAX_RING_BYTES >> 20
            )),
        }
    }
}

/// Why [`run_stream`] could not start, or stopped before the end of the input.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The [`StreamConfig`] is invalid (slots, `every`, frame size, JPEG limit, ring size), or a
    /// format or policy name is unknown.
    #[error("{0}")]
    Config(String),
    /// The reader thread could not be started.
    #[error("cannot start the reader thread: {0}")]
    Spawn(std::io::Error),
    /// A frame buffer (a ring slot, or the YUV conversion's) of the field's bytes could not be
    /// allocated.
    #[error("cannot allocate the frame buffers ({0} bytes)")]
    OutOfMemory(usize),
    /// The reader thread panicked; its message.
    #[error("the frame reader failed: internal error (panic): {0}")]
    ReaderPanicked(String),
    /// The event handler failed (e.g. its output was closed); the stream stopped.
    #[error("stream stopped: {0}")]
    Stopped(std::io::Error),
}

/// Why one frame produced no prediction.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame's bytes were cut short or malformed in the input, or could not be read.
    #[error(transparent)]
    Read(#[from] FrameFault),
    /// The MJPEG frame could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Preprocessing or inference failed.
    #[error(transparent)]
    Classify(#[from] ClassifyError),
}

/// One record of the stream, in input order (dropped and skipped frames have none).
#[derive(Debug)]
pub enum StreamEvent<'a> {
    /// A frame was classified.
    Classified {
        /// Position in the input, counting every frame read (0-based).
        index: u64,
        /// When the frame was completely read, since the stream started.
        arrival: Duration,
        /// The best classes, best first; the [`Classifier`](crate::Classifier) passed alongside names them.
        top: &'a TopK,
        /// From arrival to this result: queueing, decoding, preprocessing and inference.
        latency: Duration,
        /// MJPEG decoding or YUV conversion.
        decode: Duration,
        /// The classifier's own stages for this frame.
        timings: FrameTimings,
    },
    /// A frame produced no prediction; the stream goes on.
    Failed {
        /// Position in the input, counting every frame read (0-based).
        index: u64,
        /// When the frame was completely read, since the stream started.
        arrival: Duration,
        /// What went wrong.
        error: &'a FrameError,
    },
}

/// Counts and timings of a whole stream.
#[derive(Clone, Debug, Serialize)]
pub struct StreamSummary {
    /// Complete frames read from the input (classified, dropped or skipped).
    pub frames_read: u64,
    /// Frames with a prediction.
    pub classified: u64,
    /// Dropped by the latest-frame policy because inference was behind.
    pub dropped: u64,
    /// Passed over by `every`.
    pub skipped: u64,
    /// Error records (unreadable, undecodable or truncated frames).
    pub errors: u64,
    /// Wall-clock time from the start of the stream to its end, in seconds.
    pub seconds: f64,
    /// `classified` over `seconds`.
    pub classified_per_second: f64,
    /// From a frame's arrival to its result, in milliseconds.
    pub latency_ms: Quantiles,
    /// The model run of each classified frame, in milliseconds.
    pub inference_ms: Quantiles,
    /// Mean time per classified frame in each stage.
    pub mean_stage_ms: StageTimes,
}

/// Median and 99th percentile of a duration, in milliseconds (within 1 %).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Quantiles {
    /// 50th percentile in milliseconds; `None` when no frame was classified.
    pub median: Option<f64>,
    /// 99th percentile in milliseconds; `None` when no frame was classified.
    pub p99: Option<f64>,
}

impl From<&LatencyHistogram> for Quantiles {
    fn from(histogram: &LatencyHistogram) -> Self {
        let ms = |q| histogram.quantile(q).map(|d| d.as_secs_f64() * 1e3);
        Quantiles {
            median: ms(0.5),
            p99: ms(0.99),
        }
    }
}

/// Time per classified frame in each stage, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StageTimes {
    /// MJPEG decoding or YUV conversion (near 0 for RGB, BGR and grey input).
    pub decode: f64,
    /// Resizing and normalising into the input tensor.
    pub preprocess: f64,
    /// Running the model.
    pub inference: f64,
}
