//! The default model compiled into the binary, so `runtime classify frame.jpg` needs no other
//! file on the device.

/// Path of the shipped default model, relative to the workspace root.
pub const DEFAULT_MODEL_PATH: &str = "models/fashion-vit/model.onnx";

#[cfg(feature = "embedded-model")]
pub const DEFAULT_MODEL: Option<&[u8]> = Some(include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/fashion-vit/model.onnx"
)));

#[cfg(not(feature = "embedded-model"))]
pub const DEFAULT_MODEL: Option<&[u8]> = None;
