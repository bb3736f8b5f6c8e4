//! Frames, from bytes to the model's input: image decoding, raw YUV, cutting a stream into
//! frames, the shared preprocessing, and the stream loop that classifies them. Re-exported at
//! the crate root (`runtime::preprocess`, `runtime::stream`, …).

pub mod decode;
pub mod frame_source;
pub mod latency;
pub mod preprocess;
pub mod stream;
pub mod yuv;
