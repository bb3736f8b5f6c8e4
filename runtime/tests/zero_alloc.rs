//! Steady-state frames allocate nothing in our code: proven with a counting global allocator.
//! Also reports what tract's own run allocates per frame (stated in the README).

use runtime::classifier::{softmax_into, top_k_into};
use runtime::{Classifier, DecodedImage, Model, ModelOptions, PixelFormat, TopK};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

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

#[test]
fn steady_state_frames_allocate_nothing_in_our_code() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/fashion-vit/model.onnx"
    ))
    .unwrap();
    let model = Model::from_bytes(&bytes, &ModelOptions::default()).unwrap();
    let mut classifier = Classifier::new(model, 5).unwrap();
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
    // What remains of a whole frame is tract's run; report it (the README quotes this line).
    println!("tract allocations per frame: {:.1}", whole as f64 / 30.0);
}
