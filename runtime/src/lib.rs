//! Edge inference for the project's Vision Transformer.
//!
//! The preprocessing here is the single definition of "the pixels the model sees": the
//! exporter's training data loader calls the same [`PatchPipeline`].
//!
//! A camera loop: load once, then classify borrowed frames (any size, any row stride) without
//! allocating. [`Model::load`] takes a file; here the model embedded in the crate.
//!
//! ```
//! use runtime::{Classifier, FrameRef, Model, ModelOptions, PixelFormat};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bytes = runtime::embedded::DEFAULT_MODEL.expect("built with feature embedded-model");
//! let mut classifier = Classifier::new(Model::from_bytes(bytes, &ModelOptions::default())?, 3)?;
//!
//! // A 640×480 BGR frame whose rows are padded to 2048 bytes, as capture buffers often are.
//! let buffer = vec![128u8; 2048 * 480];
//! let frame = FrameRef { data: &buffer, width: 640, height: 480, stride: 2048, format: PixelFormat::Bgr8 };
//! for _ in 0..3 {
//!     let top = classifier.classify_frame(&frame)?;
//!     let best = top[0];
//!     println!("{} {:.1}%", classifier.label(best.class), best.probability * 100.0);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! C and C++ programs use the same classifier through [`ffi`] and `include/vit_runtime.h`.

#![warn(missing_docs)]

pub mod atomic_file;
pub mod classifier;
pub mod dataset;
pub mod evaluation;
pub mod explain;
pub mod ffi;
mod frames;
pub mod model;
pub mod ops;
pub mod overlay;
pub mod threads;

pub use frames::{decode, frame_source, latency, preprocess, stream, yuv};
pub use model::{embedded, metadata, precision, quantize};

pub use atomic_file::{sync_dir, write_atomic, write_atomic_with};
pub use classifier::{Classifier, ClassifyError, FrameTimings, MAX_TOP_K, Prediction, TopK};
pub use decode::{DecodeError, DecodedImage, decode_bytes, decode_file};
pub use model::{Model, ModelError, ModelOptions};
pub use ops::Isa;
pub use precision::Precision;
pub use preprocess::{
    FrameRef, PatchPipeline, PixelFormat, PreprocessConfig, PreprocessError, Region, ResizeMode,
};
pub use stream::{
    KeepPolicy, StreamConfig, StreamError, StreamEvent, StreamFormat, StreamSummary, run_stream,
};
pub use threads::set_threads;

/// Run `body`; a panic in it (inside tract, say) becomes `Err` with its message, so library
/// callers get an error instead of an unwinding stack. With `panic = "abort"` nothing is
/// caught: there the checks before tract are what keeps bad input from panicking.
pub(crate) fn catch_panic<T>(body: impl FnOnce() -> T) -> Result<T, String> {
    CATCHING.with(|depth| depth.set(depth.get() + 1));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    CATCHING.with(|depth| depth.set(depth.get() - 1));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into())
    })
}

thread_local! {
    static CATCHING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether a panic on this thread now would be caught and returned as an error by the
/// library. A program's panic hook can stay quiet then: the error reaches the caller anyway.
pub fn panic_is_caught_here() -> bool {
    CATCHING.with(|depth| depth.get() > 0)
}

/// Re-exported so the exporter verifies its graphs with exactly the runtime's tract.
pub use tract_onnx;
