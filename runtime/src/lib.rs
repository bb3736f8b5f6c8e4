//! Edge inference for the project's Vision Transformer.
//!
//! The preprocessing here is the single definition of "the pixels the model sees": the
//! exporter's training data loader calls the same [`PatchPipeline`].

pub mod atomic_file;
pub mod classifier;
pub mod dataset;
pub mod decode;
pub mod embedded;
pub mod evaluation;
pub mod metadata;
pub mod model;
pub mod preprocess;
pub mod threads;

pub use atomic_file::{write_atomic, write_atomic_with};
pub use classifier::{Classifier, ClassifyError, FrameTimings, MAX_TOP_K, Prediction, TopK};
pub use decode::{DecodeError, DecodedImage, decode_bytes, decode_file};
pub use model::{Model, ModelError, ModelOptions};
pub use preprocess::{
    FrameRef, PatchPipeline, PixelFormat, PreprocessConfig, PreprocessError, Region, ResizeMode,
};
pub use threads::set_threads;

/// Re-exported so the exporter verifies its graphs with exactly the runtime's tract.
pub use tract_onnx;
