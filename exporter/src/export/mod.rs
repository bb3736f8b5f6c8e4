//! `exporter export`: the trained ViT as a standard, self-describing ONNX graph, verified
//! against burn's forward pass with tract before it is written.
//!
//! The graph mirrors the burn model ([`crate::model`]) op for op with the ops every runtime
//! fuses: Conv patchify (kernel = stride = patch), Concat for CLS, Add for position,
//! LayerNormalization, MatMul + Add projections, Reshape/Transpose for heads, Softmax, exact
//! GELU (Erf below opset 20, the Gelu op from 20), Gather for the CLS token. Weights are
//! initializers.

pub mod onnx_graph;

mod cnn;
mod inspect;
mod swin;
mod verify;
mod vit;

pub use inspect::{InspectError, Inspection, inspect};

use verify::{verification_images, verify};

use crate::model::{ModelConfig, TrainedModel};
use crate::training::{BestCheckpoint, RunResult, TrainError, TrainingConfig, load_result};
use burn::nn::Linear;
use burn::prelude::*;
use onnx_graph::encode;
use runtime::metadata;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Largest difference to burn's logits an export may show.
pub const TOLERANCE: f32 = 1e-4;
pub const DEFAULT_OPSET: i64 = 17;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Run(#[from] TrainError),
    #[error("opset {0} is not supported (use 17 to 21)")]
    Opset(i64),
    #[error("no validation images to verify with: {0} (pass --data DIR)")]
    NoImages(String),
    #[error("--with-attention is for ViTs: {0}")]
    NoAttention(&'static str),
    #[error("tract cannot run the exported graph: {0}")]
    Tract(String),
    #[error(
        "verification failed: tract's outputs differ from burn's by {diff:.3e} (> {TOLERANCE:.0e}) at batch {batch}"
    )]
    Mismatch { diff: f32, batch: usize },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub path: PathBuf,
    pub bytes: usize,
    pub opset: i64,
    pub parameters: usize,
    /// Of one image's forward pass: convolutions and matrix products.
    pub multiply_adds: u64,
    pub op_histogram: BTreeMap<String, usize>,
    /// Max |tract − burn| over every output (logits, and attention maps when exported), per
    /// verified batch size.
    pub max_abs_diff: Vec<(usize, f32)>,
    pub attention_outputs: usize,
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub opset: i64,
    /// Dataset to take verification images from (default: the run's training data).
    pub data: Option<PathBuf>,
    /// Also output each block's attention weights averaged over heads, `attention.{block}`
    /// of shape `[batch, tokens, tokens]`, for `runtime explain`. Off by default: the plain
    /// graph computes logits only.
    pub with_attention: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            opset: DEFAULT_OPSET,
            data: None,
            with_attention: false,
        }
    }
}

/// Export the run's best weights to `out`.
pub fn export(
    run_dir: &Path,
    out: &Path,
    options: &ExportOptions,
) -> Result<ExportReport, ExportError> {
    let (bytes, mut report) = export_bytes(run_dir, options)?;
    runtime::write_atomic(out, &bytes).map_err(|source| ExportError::Write {
        path: out.display().to_string(),
        source,
    })?;
    report.path = out.to_path_buf();
    Ok(report)
}

/// The verified ONNX file of the run's best weights, in memory (the report's path is empty).
pub fn export_bytes(
    run_dir: &Path,
    options: &ExportOptions,
) -> Result<(Vec<u8>, ExportReport), ExportError> {
    let opset = options.opset;
    if !(17..=21).contains(&opset) {
        return Err(ExportError::Opset(opset));
    }
    let device = crate::backend::device();
    // The weights and the figures written into the metadata come from one committed state.
    let RunResult {
        config,
        model,
        best,
    } = load_result(run_dir, &device)?;
    let mut metadata = metadata_for(&config, best.as_ref());
    if options.with_attention {
        let layout = match &config.distillation {
            Some(_) => format!("{ATTENTION_LAYOUT}, token 1 the distillation token"),
            None => ATTENTION_LAYOUT.to_string(),
        };
        metadata.push((metadata::ATTENTION.into(), layout));
    }
    let graph = match (&config.model, &model) {
        (ModelConfig::Vit(vit), TrainedModel::Vit(model)) => {
            vit::build_graph(vit, model, opset, options.with_attention)
        }
        (ModelConfig::Cnn(cnn), TrainedModel::Cnn(model)) => {
            if options.with_attention {
                return Err(ExportError::NoAttention("a CNN has no attention"));
            }
            cnn::build_graph(cnn, model)
        }
        (ModelConfig::Swin(swin), TrainedModel::Swin(model)) => {
            if options.with_attention {
                return Err(ExportError::NoAttention(
                    "a Swin attends within windows, with no token that sums up the image",
                ));
            }
            swin::build_graph(swin, model, opset)
        }
        _ => unreachable!("load_result builds the model its configuration names"),
    };
    let proto = graph.finish(opset, env!("CARGO_PKG_VERSION"), metadata);
    let bytes = encode(&proto);

    let images = verification_images(&config, options.data.as_deref())?;
    let mut max_abs_diff = Vec::new();
    for batch in [1, images.len().min(3)] {
        let diff = verify(
            &bytes,
            &model,
            &images,
            batch,
            &device,
            options.with_attention,
        )?;
        if diff > TOLERANCE {
            return Err(ExportError::Mismatch { diff, batch });
        }
        max_abs_diff.push((batch, diff));
    }
    let graph = proto.graph.as_ref().expect("built with a graph");
    let report = ExportReport {
        path: PathBuf::new(),
        bytes: bytes.len(),
        opset,
        parameters: float_values(graph),
        multiply_adds: config.model.multiply_adds(),
        op_histogram: op_histogram(graph),
        max_abs_diff,
        attention_outputs: graph.output.len() - 1,
    };
    Ok((bytes, report))
}

/// The value of the `vit.attention` metadata key: what the attention outputs hold.
pub const ATTENTION_LAYOUT: &str =
    "attention.{block}: [batch, tokens, tokens] softmax weights, mean over heads; token 0 is CLS";

fn metadata_for(config: &TrainingConfig, best: Option<&BestCheckpoint>) -> Vec<(String, String)> {
    let p = &config.preprocess;
    let mut entries = vec![
        (metadata::FORMAT, metadata::FORMAT_VERSION.to_string()),
        (metadata::LABELS, json(&config.classes)),
        (metadata::IMAGE_SIZE, p.image_size.to_string()),
        (metadata::CHANNELS, p.channels.to_string()),
        (metadata::MEAN, json(&p.mean)),
        (metadata::STD, json(&p.std)),
        (metadata::RESIZE, p.resize.to_string()),
        (
            metadata::PRESET,
            config
                .preset
                .map_or("custom".into(), |p| p.name().to_string()),
        ),
        (metadata::MODEL_CONFIG, json(&config.model)),
        (
            metadata::ARCHITECTURE,
            config.model.architecture().to_string(),
        ),
        (
            metadata::PRODUCER,
            format!("exporter {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    if let Some(distillation) = &config.distillation {
        let mut description = serde_json::to_value(distillation).expect("serialises");
        description["inference"] = "the mean of the class and distillation heads' logits".into();
        description["label_smoothing"] = config.label_smoothing.into();
        entries.push((metadata::DISTILLATION, description.to_string()));
    }
    if let Some(best) = best
        && let Some(accuracy) = best.val_accuracy
    {
        entries.push((metadata::VAL_ACCURACY, format!("{accuracy:.6}")));
        entries.push((metadata::VAL_EPOCH, best.epoch.to_string()));
    }
    entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("metadata serialises")
}

fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("float tensor")
}

fn bias_of(linear: &Linear, len: usize) -> Vec<f32> {
    linear
        .bias
        .as_ref()
        .map_or_else(|| vec![0.0; len], |b| values(b.val()))
}

/// Values in the graph's float initializers: the parameters `export` and `inspect` report.
fn float_values(graph: &runtime::tract_onnx::pb::GraphProto) -> usize {
    let float = runtime::tract_onnx::pb::tensor_proto::DataType::Float as i32;
    graph
        .initializer
        .iter()
        .filter(|t| t.data_type == float)
        .map(|t| t.dims.iter().product::<i64>().max(1) as usize)
        .sum()
}

pub fn op_histogram(graph: &runtime::tract_onnx::pb::GraphProto) -> BTreeMap<String, usize> {
    let mut histogram = BTreeMap::new();
    for node in &graph.node {
        *histogram.entry(node.op_type.clone()).or_insert(0) += 1;
    }
    histogram
}
