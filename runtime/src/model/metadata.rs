//! The public metadata format: `metadata_props` keys the exporter writes into every ONNX file
//! so one file is enough on a device. Documented in docs/onnx.md; changing a key is a breaking
//! change of the format (bump [`FORMAT_VERSION`]).

/// Format version of this key set.
pub const FORMAT: &str = "vit.format_version";
/// The key set's current version: the value the exporter writes under [`FORMAT`].
pub const FORMAT_VERSION: u32 = 1;
/// JSON array of class names in output order.
pub const LABELS: &str = "vit.labels";
/// Square input side in pixels.
pub const IMAGE_SIZE: &str = "vit.image_size";
/// 1 (grey) or 3 (RGB).
pub const CHANNELS: &str = "vit.channels";
/// JSON arrays, one value per channel, applied to pixels scaled to [0, 1].
pub const MEAN: &str = "vit.mean";
/// JSON array of per-channel standard deviations, applied like [`MEAN`].
pub const STD: &str = "vit.std";
/// `squash` or `center-crop`.
pub const RESIZE: &str = "vit.resize";
/// Architecture preset name (`seed`, `video`, …) or `custom`.
pub const PRESET: &str = "vit.preset";
/// JSON of the architecture (image size, patch, dim, depth, heads, MLP, dropout, classes).
pub const MODEL_CONFIG: &str = "vit.model_config";
/// The architecture: `vit`, `deit` (a ViT with a distillation token) or `resnet` (absent in
/// files from before the CNN: `vit`).
pub const ARCHITECTURE: &str = "vit.architecture";
/// How a DeiT was distilled: JSON of the method, the teacher, and how inference combines the
/// two heads.
pub const DISTILLATION: &str = "vit.distillation";
/// Tool and version that wrote the file.
pub const PRODUCER: &str = "vit.producer";
/// Validation accuracy (0–1) of the exported checkpoint, and its epoch.
pub const VAL_ACCURACY: &str = "vit.val_accuracy";
/// The epoch of the checkpoint whose [`VAL_ACCURACY`] is recorded.
pub const VAL_EPOCH: &str = "vit.val_epoch";
/// Present when the graph also outputs `attention.{block}` (`[batch, tokens, tokens]`, each
/// block's softmax weights averaged over heads, token 0 = CLS) for `runtime explain`.
pub const ATTENTION: &str = "vit.attention";
/// Present in files written by `runtime quantize`: JSON of the int8 scheme (weights,
/// activations) and which products it covers.
pub const QUANTIZATION: &str = "vit.quantization";
