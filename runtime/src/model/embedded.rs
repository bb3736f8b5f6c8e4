//! The default model compiled into the binary, so `runtime classify frame.jpg` needs no other
//! file on the device; with its int8 copy (`runtime quantize`) for `--precision int8`.

use crate::precision::Precision;

/// Path of the shipped default model, relative to the workspace root.
pub const DEFAULT_MODEL_PATH: &str = "models/fashion-vit/model.onnx";
/// Its int8 copy, made by `runtime quantize` (see the model card).
pub const DEFAULT_INT8_MODEL_PATH: &str = "models/fashion-vit/model.int8.onnx";

/// The bytes of [`DEFAULT_MODEL_PATH`], compiled in; `None` in a build without the
/// `embedded-model` feature.
#[cfg(feature = "embedded-model")]
pub const DEFAULT_MODEL: Option<&[u8]> = Some(include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/fashion-vit/model.onnx"
)));

/// The bytes of [`DEFAULT_INT8_MODEL_PATH`], compiled in; `None` in a build without the
/// `embedded-model` feature.
#[cfg(feature = "embedded-model")]
pub const DEFAULT_INT8_MODEL: Option<&[u8]> = Some(include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/fashion-vit/model.int8.onnx"
)));

/// `None`: this build has no embedded model (the `embedded-model` feature is off).
#[cfg(not(feature = "embedded-model"))]
pub const DEFAULT_MODEL: Option<&[u8]> = None;

/// `None`: this build has no embedded model (the `embedded-model` feature is off).
#[cfg(not(feature = "embedded-model"))]
pub const DEFAULT_INT8_MODEL: Option<&[u8]> = None;

/// The embedded model to run at `precision` (the int8 copy for int8), with a name for reports.
pub fn default_model(precision: Option<Precision>) -> Option<(&'static [u8], &'static str)> {
    match precision {
        Some(Precision::Int8) => {
            DEFAULT_INT8_MODEL.map(|bytes| (bytes, "embedded default model (int8)"))
        }
        _ => DEFAULT_MODEL.map(|bytes| (bytes, "embedded default model")),
    }
}
