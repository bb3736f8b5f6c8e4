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

use crate::classifier::{Classifier, ClassifyError, FrameTimings, TopK};
use crate::decode::{DecodeError, DecodedImage, MAX_IMAGE_SIDE, decode_bytes};
use crate::frame_source::{Fill, FrameFault, FrameSource, JpegFrames, RawFrames};
use crate::latency::LatencyHistogram;
use crate::preprocess::{FrameRef, PixelFormat};
use crate::yuv::{ChromaLayout, luma_to_gray, yuv420_len, yuv420_to_rgb};
use heapless::Deque;
use serde::Serialize;
use std::fmt;
use std::io::Read;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

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
        /// The best classes, best first; the [`Classifier`] passed alongside names them.
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

/// Classify `input` frame by frame, calling `on_event` for each classified or failed frame.
///
/// Returns at the end of the input, or when `on_event` fails (its output closed, say). All
/// buffers are allocated before the first frame; raw formats then allocate nothing per frame
/// outside tract's own run (MJPEG decoding allocates its image).
pub fn run_stream(
    classifier: &mut Classifier,
    input: impl Read + Send + 'static,
    config: &StreamConfig,
    mut on_event: impl FnMut(&StreamEvent<'_>, &Classifier) -> std::io::Result<()>,
) -> Result<StreamSummary, StreamError> {
    let slot_bytes = config.slot_bytes()?;
    let source: Box<dyn FrameSource> = match config.format {
        StreamFormat::Mjpeg => Box::new(JpegFrames::new(input)),
        _ => Box::new(RawFrames::new(input, slot_bytes)),
    };
    let ring = Arc::new(Ring::new(config.slots, slot_bytes)?);
    let started = Instant::now();
    let reader = {
        let (ring, keep, every) = (ring.clone(), config.keep, config.every);
        std::thread::Builder::new()
            .name("frame-reader".into())
            .spawn(move || crate::catch_panic(|| read_frames(&ring, source, keep, every)))
            .map_err(StreamError::Spawn)?
    };

    let converter = Converter::new(config, classifier.model().preprocess.channels == 1)?;
    let mut consumer = Consumer {
        classifier,
        on_event: &mut on_event,
        converter,
        totals: Totals::default(),
        started,
    };
    let mut older = heapless::Vec::<usize, MAX_SLOTS>::new();
    let outcome = loop {
        let Some(id) = ring.next_ready(config.keep, &mut older) else {
            break Ok(());
        };
        let mut result = Ok(());
        for &stale in &older {
            let slot = ring.slot(stale);
            match slot.fill {
                Fill::Fault(fault) if result.is_ok() => {
                    result = consumer.report(&slot, fault.into());
                }
                _ => consumer.totals.dropped += 1,
            }
            drop(slot);
            ring.release(stale);
        }
        let slot = ring.slot(id);
        if result.is_ok() {
            result = match slot.fill {
                Fill::Frame(len) => consumer.classify(&slot, len),
                Fill::Fault(fault) => consumer.report(&slot, fault.into()),
                Fill::End => Ok(()),
            };
        }
        drop(slot);
        ring.release(id);
        if let Err(e) = result {
            break Err(e);
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let counts = ring.stop();
    if outcome.is_ok() {
        // The reader has finished; a stopped stream leaves it to end on its own.
        if let Ok(Err(panic)) = reader.join() {
            return Err(StreamError::ReaderPanicked(panic));
        }
    }
    outcome.map_err(StreamError::Stopped)?;
    let totals = consumer.totals;
    let per_frame = |d: Duration| d.as_secs_f64() * 1e3 / totals.classified.max(1) as f64;
    Ok(StreamSummary {
        frames_read: counts.read,
        classified: totals.classified,
        dropped: totals.dropped + counts.dropped,
        skipped: counts.skipped,
        errors: totals.errors,
        seconds,
        classified_per_second: totals.classified as f64 / seconds.max(1e-9),
        latency_ms: (&totals.latency).into(),
        inference_ms: (&totals.inference).into(),
        mean_stage_ms: StageTimes {
            decode: per_frame(totals.decode),
            preprocess: per_frame(totals.preprocess),
            inference: per_frame(totals.inference_total),
        },
    })
}

#[derive(Default)]
struct Totals {
    classified: u64,
    dropped: u64,
    errors: u64,
    latency: LatencyHistogram,
    inference: LatencyHistogram,
    decode: Duration,
    preprocess: Duration,
    inference_total: Duration,
}

type Handler<'h> = dyn FnMut(&StreamEvent<'_>, &Classifier) -> std::io::Result<()> + 'h;

/// The inference side: turns ready slots into events.
struct Consumer<'c, 'h> {
    classifier: &'c mut Classifier,
    on_event: &'c mut Handler<'h>,
    converter: Converter,
    totals: Totals,
    started: Instant,
}

impl Consumer<'_, '_> {
    fn classify(&mut self, slot: &Slot, len: usize) -> std::io::Result<()> {
        let decoding = Instant::now();
        let frame = match self.converter.frame(&slot.bytes[..len]) {
            Ok(frame) => frame,
            Err(e) => return self.report(slot, e.into()),
        };
        let decode = decoding.elapsed();
        if let Err(e) = self.classifier.classify_frame(&frame) {
            return self.report(slot, e.into());
        }
        let timings = self.classifier.timings();
        let latency = slot.arrival.elapsed();
        let totals = &mut self.totals;
        totals.classified += 1;
        totals.latency.record(latency);
        totals.inference.record(timings.inference);
        totals.decode += decode;
        totals.preprocess += timings.preprocess;
        totals.inference_total += timings.inference;
        let event = StreamEvent::Classified {
            index: slot.index,
            arrival: slot.arrival.saturating_duration_since(self.started),
            top: self.classifier.top(),
            latency,
            decode,
            timings,
        };
        (self.on_event)(&event, self.classifier)
    }

    fn report(&mut self, slot: &Slot, error: FrameError) -> std::io::Result<()> {
        self.totals.errors += 1;
        let event = StreamEvent::Failed {
            index: slot.index,
            arrival: slot.arrival.saturating_duration_since(self.started),
            error: &error,
        };
        (self.on_event)(&event, self.classifier)
    }
}

/// Frames as the preprocessing takes them. YUV is converted into a scratch buffer sized once;
/// JPEGs are decoded into an image of their own.
struct Converter {
    format: StreamFormat,
    width: u32,
    height: u32,
    grey_output: bool,
    scratch: Vec<u8>,
    decoded: Option<DecodedImage>,
}

impl Converter {
    fn new(config: &StreamConfig, grey_model: bool) -> Result<Self, StreamError> {
        let pixels = config.width as usize * config.height as usize;
        let scratch = match config.format {
            StreamFormat::Yuv420p | StreamFormat::Nv12 if grey_model => zeroed(pixels)?,
            StreamFormat::Yuv420p | StreamFormat::Nv12 => zeroed(pixels * 3)?,
            _ => Vec::new(),
        };
        Ok(Converter {
            format: config.format,
            width: config.width,
            height: config.height,
            grey_output: grey_model,
            scratch,
            decoded: None,
        })
    }

    fn frame<'a>(&'a mut self, bytes: &'a [u8]) -> Result<FrameRef<'a>, DecodeError> {
        let (w, h) = (self.width, self.height);
        let layout = match self.format {
            StreamFormat::Rgb24 => return Ok(FrameRef::packed(bytes, w, h, PixelFormat::Rgb8)),
            StreamFormat::Bgr24 => return Ok(FrameRef::packed(bytes, w, h, PixelFormat::Bgr8)),
            StreamFormat::Gray8 => return Ok(FrameRef::packed(bytes, w, h, PixelFormat::Gray8)),
            StreamFormat::Mjpeg => {
                let image = self.decoded.insert(decode_bytes(bytes)?);
                return Ok(image.frame());
            }
            StreamFormat::Yuv420p => ChromaLayout::Planar,
            StreamFormat::Nv12 => ChromaLayout::SemiPlanar,
        };
        if self.grey_output {
            luma_to_gray(bytes, w, h, &mut self.scratch);
            Ok(FrameRef::packed(&self.scratch, w, h, PixelFormat::Gray8))
        } else {
            yuv420_to_rgb(bytes, w, h, layout, &mut self.scratch);
            Ok(FrameRef::packed(&self.scratch, w, h, PixelFormat::Rgb8))
        }
    }
}

struct Slot {
    bytes: Box<[u8]>,
    fill: Fill,
    index: u64,
    arrival: Instant,
}

/// Which slot is where. A slot index is in at most one place (free, ready, or held by one
/// side), so each slot's lock is never contended.
struct Queues {
    free: Deque<usize, MAX_SLOTS>,
    ready: Deque<usize, MAX_SLOTS>,
    reader_done: bool,
    stopped: bool,
    read: u64,
    skipped: u64,
    /// Ready frames the reader took back because it had no free slot.
    dropped: u64,
}

struct Ring {
    slots: Box<[Mutex<Slot>]>,
    queues: Mutex<Queues>,
    changed: Condvar,
}

impl Ring {
    fn new(slots: usize, slot_bytes: usize) -> Result<Ring, StreamError> {
        let now = Instant::now();
        let mut free = Deque::new();
        for id in 0..slots {
            free.push_back(id).expect("slots ≤ MAX_SLOTS");
        }
        let slots = (0..slots)
            .map(|_| {
                Ok(Mutex::new(Slot {
                    bytes: zeroed(slot_bytes)?.into_boxed_slice(),
                    fill: Fill::End,
                    index: 0,
                    arrival: now,
                }))
            })
            .collect::<Result<_, StreamError>>()?;
        Ok(Ring {
            slots,
            queues: Mutex::new(Queues {
                free,
                ready: Deque::new(),
                reader_done: false,
                stopped: false,
                read: 0,
                skipped: 0,
                dropped: 0,
            }),
            changed: Condvar::new(),
        })
    }

    fn slot(&self, id: usize) -> MutexGuard<'_, Slot> {
        self.slots[id]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn queues(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, queues: MutexGuard<'a, Queues>) -> MutexGuard<'a, Queues> {
        self.changed
            .wait(queues)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for the reader to fill; `None` once the consumer has stopped.
    fn free_slot(&self, keep: KeepPolicy) -> Option<usize> {
        let mut queues = self.queues();
        loop {
            if queues.stopped {
                return None;
            }
            if let Some(id) = queues.free.pop_front() {
                return Some(id);
            }
            if keep == KeepPolicy::Latest
                && let Some(oldest) = queues.ready.pop_front()
            {
                queues.dropped += 1;
                return Some(oldest);
            }
            queues = self.wait(queues);
        }
    }

    fn push_ready(&self, id: usize) {
        let mut queues = self.queues();
        queues.ready.push_back(id).expect("a slot is queued once");
        self.changed.notify_all();
    }

    /// The next frame to classify (under `Latest`, the newest; the older ones go to `older`).
    /// `None` when the reader has finished and nothing is waiting.
    fn next_ready(
        &self,
        keep: KeepPolicy,
        older: &mut heapless::Vec<usize, MAX_SLOTS>,
    ) -> Option<usize> {
        older.clear();
        let mut queues = self.queues();
        loop {
            if keep == KeepPolicy::Latest {
                while queues.ready.len() > 1 {
                    let id = queues.ready.pop_front().expect("len > 1");
                    older.push(id).expect("at most MAX_SLOTS slots");
                }
            }
            if let Some(id) = queues.ready.pop_front() {
                return Some(id);
            }
            if queues.reader_done {
                return None;
            }
            queues = self.wait(queues);
        }
    }

    fn release(&self, id: usize) {
        let mut queues = self.queues();
        queues.free.push_back(id).expect("a slot is freed once");
        self.changed.notify_all();
    }

    fn finish_reading(&self) {
        self.queues().reader_done = true;
        self.changed.notify_all();
    }

    /// Stop the reader (if still running) and return its counts.
    fn stop(&self) -> ReaderCounts {
        let mut queues = self.queues();
        queues.stopped = true;
        self.changed.notify_all();
        ReaderCounts {
            read: queues.read,
            skipped: queues.skipped,
            dropped: queues.dropped,
        }
    }
}

struct ReaderCounts {
    read: u64,
    skipped: u64,
    dropped: u64,
}

/// `len` zero bytes, or an error if the allocator cannot have them (instead of an abort).
fn zeroed(len: usize) -> Result<Vec<u8>, StreamError> {
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(len)
        .map_err(|_| StreamError::OutOfMemory(len))?;
    bytes.resize(len, 0);
    Ok(bytes)
}

/// Tells the consumer the reader is done, also when the reader panics: otherwise the consumer
/// would wait for frames forever.
struct FinishReading<'r>(&'r Ring);

impl Drop for FinishReading<'_> {
    fn drop(&mut self) {
        self.0.finish_reading();
    }
}

fn read_frames(ring: &Ring, mut source: Box<dyn FrameSource>, keep: KeepPolicy, every: u64) {
    let _finish = FinishReading(ring);
    let mut index = 0;
    while let Some(id) = ring.free_slot(keep) {
        let mut slot = ring.slot(id);
        let fill = loop {
            let fill = source.fill(&mut slot.bytes);
            if let Fill::Frame(_) = fill {
                ring.queues().read += 1;
                if index % every != 0 {
                    index += 1;
                    ring.queues().skipped += 1;
                    continue;
                }
            }
            break fill;
        };
        slot.fill = fill;
        slot.index = index;
        slot.arrival = Instant::now();
        index += 1;
        drop(slot);
        if fill == Fill::End {
            ring.release(id);
            break;
        }
        ring.push_ready(id);
    }
}
