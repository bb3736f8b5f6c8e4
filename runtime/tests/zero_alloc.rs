//! Steady-state frames allocate nothing in our code: proven with a counting global allocator.
//! Also reports what tract's own run allocates per frame (stated in docs/runtime.md).

use runtime::classifier::{softmax_into, top_k_into};
use runtime::{
    Classifier, DecodedImage, KeepPolicy, Model, ModelOptions, PixelFormat, StreamConfig,
    StreamEvent, StreamFormat, TopK, run_stream,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
/// Bytes allocated and not yet freed, and the most of them since the last `reset_peak`.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        grow(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        grow(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The counters are global: tests that read them take turns.
static SERIAL: Mutex<()> = Mutex::new(());

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    f();
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

fn frame(width: u32, height: u32, seed: u8) -> DecodedImage {
    let pixels = (0..width * height * 3)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    DecodedImage {
        pixels,
        width,
        height,
        format: PixelFormat::Rgb8,
    }
}

fn shipped_classifier(k: usize) -> Classifier {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/fashion-vit/model.onnx"
    ))
    .unwrap();
    let model = Model::from_bytes(&bytes, &ModelOptions::default()).unwrap();
    Classifier::new(model, k).unwrap()
}

/// Allocations of one `classify_frame` on frames like `frames` (tract's run: ours is 0).
fn allocations_per_frame(classifier: &mut Classifier, frames: &[DecodedImage]) -> usize {
    for f in frames {
        classifier.classify_frame(&f.frame()).unwrap();
    }
    let runs = 10;
    let total = allocations_during(|| {
        for f in frames.iter().cycle().take(runs) {
            classifier.classify_frame(&f.frame()).unwrap();
        }
    });
    assert_eq!(
        total % runs,
        0,
        "the same work allocates the same each frame"
    );
    total / runs
}

/// `n` packed RGB frames back to back, as `ffmpeg -f rawvideo -pix_fmt rgb24` writes them.
fn raw_stream(width: u32, height: u32, n: usize) -> (Vec<u8>, Vec<DecodedImage>) {
    let frames: Vec<DecodedImage> = (0..n).map(|i| frame(width, height, i as u8)).collect();
    let bytes = frames
        .iter()
        .flat_map(|f| f.pixels.iter().copied())
        .collect();
    (bytes, frames)
}

#[test]
fn a_stream_adds_no_allocation_to_the_classifiers_own() {
    let _turn = SERIAL.lock().unwrap();
    let mut classifier = shipped_classifier(3);
    let (bytes, frames) = raw_stream(64, 48, 60);
    let tract_per_frame = allocations_per_frame(&mut classifier, &frames[..3]);

    // Allocation counts seen by the handler at frames 20 and 59 (the handler must not allocate).
    let marks = [AtomicUsize::new(0), AtomicUsize::new(0)];
    let config = StreamConfig {
        keep: KeepPolicy::All,
        ..StreamConfig::new(StreamFormat::Rgb24, 64, 48)
    };
    let summary = run_stream(
        &mut classifier,
        std::io::Cursor::new(bytes),
        &config,
        |event, _| {
            if let StreamEvent::Classified { index, .. } = event {
                match index {
                    20 => marks[0].store(ALLOCATIONS.load(Ordering::SeqCst), Ordering::SeqCst),
                    59 => marks[1].store(ALLOCATIONS.load(Ordering::SeqCst), Ordering::SeqCst),
                    _ => {}
                }
            }
            Ok(())
        },
    )
    .unwrap();
    assert_eq!((summary.classified, summary.dropped), (60, 0));
    let streamed = marks[1].load(Ordering::SeqCst) - marks[0].load(Ordering::SeqCst);
    println!(
        "tract allocations per frame: {tract_per_frame}; per streamed frame: {}",
        streamed as f64 / 39.0
    );
    assert_eq!(
        streamed,
        39 * tract_per_frame,
        "the reader, the ring and the handler's bookkeeping allocated"
    );
}

#[test]
fn a_slow_consumer_drops_old_frames_and_memory_stays_flat() {
    let _turn = SERIAL.lock().unwrap();
    let mut classifier = shipped_classifier(1);
    // 200 frames of 320×240 (46 MB in all) arrive at once; each takes 3 ms more to handle.
    let (bytes, _) = raw_stream(320, 240, 200);
    let config = StreamConfig::new(StreamFormat::Rgb24, 320, 240);
    let frame_bytes = 320 * 240 * 3;
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let summary = run_stream(
        &mut classifier,
        std::io::Cursor::new(bytes),
        &config,
        |_, _| {
            std::thread::sleep(Duration::from_millis(3));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(summary.frames_read, 200);
    assert!(summary.dropped > 100, "{summary:?}");
    assert_eq!(
        summary.classified + summary.dropped + summary.skipped,
        summary.frames_read,
        "every frame is accounted for"
    );
    assert_eq!(summary.errors, 0);
    // The ring's slots, plus small change (tract's first-run buffers, the latency histograms);
    // queueing the frames instead would take 46 MB.
    let growth = PEAK.load(Ordering::SeqCst) - before;
    println!("peak heap growth while streaming: {growth} bytes");
    assert!(
        growth < (config.slots + 1) * frame_bytes,
        "memory grew by {growth} bytes while 200 frames passed"
    );
}

#[test]
fn steady_state_frames_allocate_nothing_in_our_code() {
    let _turn = SERIAL.lock().unwrap();
    let mut classifier = shipped_classifier(5);
    let frames = [frame(640, 480, 1), frame(640, 480, 2), frame(640, 480, 3)];
    // Warm-up: filter tables and tract's scratch space are sized on the first frames.
    for f in &frames {
        classifier.classify_frame(&f.frame()).unwrap();
    }

    let mut preprocess = 0;
    let mut whole = 0;
    for f in frames.iter().cycle().take(30) {
        preprocess += allocations_during(|| classifier.preprocess(&f.frame()).unwrap());
        whole += allocations_during(|| {
            classifier.classify_frame(&f.frame()).unwrap();
        });
    }
    assert_eq!(preprocess, 0, "the preprocessing allocated");

    let logits: Vec<f32> = (0..10).map(|i| (i as f32 * 0.7).sin()).collect();
    let mut probabilities = vec![0.0; 10];
    let mut top = TopK::new();
    let post = allocations_during(|| {
        for _ in 0..30 {
            softmax_into(&logits, &mut probabilities);
            top_k_into(&probabilities, 5, &mut top);
        }
    });
    assert_eq!(post, 0, "the post-processing allocated");
    // What remains of a whole frame is tract's run; report it (docs/runtime.md quotes this line).
    println!("tract allocations per frame: {:.1}", whole as f64 / 30.0);
}

#[test]
fn the_int8_model_allocates_no_more_per_frame_than_f32() {
    let _turn = SERIAL.lock().unwrap();
    let frames = [frame(640, 480, 4), frame(640, 480, 5)];
    let mut float = shipped_classifier(5);
    let float_allocations = allocations_per_frame(&mut float, &frames);
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/fashion-vit/model.int8.onnx"
    ))
    .unwrap();
    let model = Model::from_bytes(&bytes, &ModelOptions::default()).unwrap();
    // The int8 operator quantizes each frame's rows into buffers it keeps: it allocates its
    // output, as the f32 one does, and nothing else (37 of them: a buffer per operator and
    // frame would add at least 37). Its graph has one tract reshape more per block, which
    // allocates one shape each.
    let reshapes = |model: &Model| model.operators().get("IntoShape").copied().unwrap_or(0);
    let extra_reshapes = reshapes(&model) - reshapes(float.model());
    let mut int8 = Classifier::new(model, 5).unwrap();
    let int8_allocations = allocations_per_frame(&mut int8, &frames);
    assert!(
        int8_allocations <= float_allocations + extra_reshapes,
        "int8 {int8_allocations} allocations per frame, f32 {float_allocations}, \
         {extra_reshapes} more reshapes"
    );
}
