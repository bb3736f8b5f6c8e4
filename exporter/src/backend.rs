//! Which burn device trains the model.
//!
//! Flex (burn's pure-Rust CPU backend, SIMD + rayon) is the default: it was the fastest CPU
//! backend measured here (docs/training.md). GPU backends are cargo features.

use burn::tensor::Device;

/// The backend `exporter train` uses unless told otherwise.
pub const DEFAULT: &str = "flex";

/// The backends this build was compiled with, for `--backend` and error messages.
pub fn available() -> Vec<&'static str> {
    let mut names = vec![DEFAULT];
    if cfg!(feature = "ndarray") {
        names.push("ndarray");
    }
    if cfg!(feature = "cpu") {
        names.push("cpu");
    }
    if cfg!(feature = "wgpu") {
        names.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        names.push("cuda");
    }
    names
}

/// The default training device.
pub fn device() -> Device {
    Device::flex()
}

/// A device by backend name (one of [`available`]).
pub fn device_named(name: &str) -> Result<Device, String> {
    match name {
        "flex" => Ok(Device::flex()),
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        "ndarray" => Ok(Device::ndarray()),
        #[cfg(feature = "cpu")]
        "cpu" => Ok(Device::cpu()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(Default::default())),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0)),
        other => Err(format!(
            "backend {other:?} is not compiled in (available: {}; GPU backends are cargo features)",
            available().join(", ")
        )),
    }
}
