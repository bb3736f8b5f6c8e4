//! [`run_stream`]: the reader thread, the ring of frame slots and the consumer that classifies
//! them.

use super::{
    FrameError, KeepPolicy, MAX_SLOTS, StageTimes, StreamConfig, StreamError, StreamEvent,
    StreamFormat, StreamSummary,
};
use crate::classifier::Classifier;
use crate::decode::{DecodeError, DecodedImage, decode_bytes};
use crate::frame_source::{Fill, FrameSource, JpegFrames, RawFrames};
use crate::latency::LatencyHistogram;
use crate::preprocess::{FrameRef, PixelFormat};
use crate::yuv::{ChromaLayout, luma_to_gray, yuv420_to_rgb};
use heapless::Deque;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

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
