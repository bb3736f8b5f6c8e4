//! Training: the tutorial's recipe (AdamW, cosine schedule, global gradient-norm clipping,
//! cross-entropy), per-epoch validation and metrics, atomic checkpoints and exact resume.
//!
//! A run folder holds:
//! - `config.json`: the [`TrainingConfig`] (model, preprocessing, classes, recipe);
//! - `metrics.jsonl`: one [`EpochMetrics`] line per finished epoch;
//! - `model-epoch-NNNN.bpk` + `optimizer-epoch-NNNN.bpk`: the latest epoch;
//! - `best-epoch-NNNN.bpk`: the weights with the best validation accuracy so far (without a
//!   validation split, `--val-fraction 0`: the latest epoch's, the run's result);
//! - with `--ema`, `ema-epoch-NNNN.bpk`: the latest epoch's weight average, whose validation
//!   accuracy then chooses the best weights (which hold the average);
//! - `state.json`: the commit point, naming the files above and carrying the best epoch's
//!   figures; written last, so an interrupted run resumes from its last complete epoch and
//!   readers never pair one epoch's weights with another's figures ([`crate::run_folder`]).

pub mod distill;
pub mod ema;
pub mod eval;
pub mod plots;
pub mod run_folder;

mod checkpoints;
mod epochs;
mod start;

pub use checkpoints::{RunResult, load_model, load_result, load_run, load_weights};
pub use epochs::learning_rate;
pub use eval::{Evaluation, evaluate};
pub use start::{resume, train};

use self::distill::{Distillation, Method};
use crate::data::{Augmentation, DataError};
use crate::model::{ConfigError, ModelConfig, Preset};
use runtime::PreprocessConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {reason}")]
    Run { path: String, reason: String },
}

impl TrainError {
    pub(crate) fn run(path: &Path, reason: impl ToString) -> Self {
        TrainError::Run {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// Everything that defines a run; saved as `config.json` and read back on resume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingConfig {
    pub data: PathBuf,
    pub preset: Option<Preset>,
    pub model: ModelConfig,
    pub preprocess: PreprocessConfig,
    pub classes: Vec<String>,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    /// Global L2 norm all gradients are scaled to at most (`torch.nn.utils.clip_grad_norm_`).
    pub grad_clip: Option<f64>,
    pub label_smoothing: Option<f32>,
    pub seed: u64,
    pub val_fraction: f64,
    /// Fraction of each class's training images kept (validation keeps all of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_fraction: Option<f64>,
    pub augmentation: Option<Augmentation>,
    pub backend: String,
    /// Weights the run started from (another run's best), instead of a random initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Decay of the exponential moving average of the weights, updated every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
    /// DeiT distillation from a teacher (the model has a distillation token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<Distillation>,
}

/// The recipe, separate from the model and data it is applied to.
#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub min_learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub grad_clip: Option<f64>,
    pub label_smoothing: Option<f32>,
    pub seed: u64,
    pub val_fraction: f64,
    /// Train on this fraction of each class's training images only (the rest unused).
    pub train_fraction: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay, and choose (and
    /// save) the best epoch by the average's validation accuracy.
    pub ema: Option<f64>,
}

impl Default for Recipe {
    /// The tutorial's: AdamW lr 1e-3, cosine schedule, clip 1.0, batch 32, 80/20 split.
    fn default() -> Self {
        Recipe {
            epochs: 10,
            batch_size: 32,
            learning_rate: 1e-3,
            min_learning_rate: 1e-5,
            weight_decay: 0.05,
            warmup_epochs: 0.0,
            grad_clip: Some(1.0),
            label_smoothing: None,
            seed: 42,
            val_fraction: 0.2,
            train_fraction: None,
            ema: None,
        }
    }
}

/// How a new run picks its model and preprocessing.
#[derive(Clone, Debug)]
pub struct NewRun {
    pub data: PathBuf,
    pub preset: Preset,
    pub overrides: ModelOverrides,
    pub recipe: Recipe,
    /// Random-resized crop + flip; `None` decides from the data: on for colour images, off for
    /// grey (digit-like) ones, where flips and crops change the meaning.
    pub augment: Option<bool>,
    /// Smallest crop area (fraction of the image) of the random-resized crop, when augmenting.
    pub crop_min_area: Option<f32>,
    /// Random-erasing probability, when augmenting.
    pub erase: Option<f32>,
    /// Fine-tune: start from this run's best weights, with its architecture, preprocessing and
    /// classes (which the data must match), instead of from `preset`.
    pub init_from: Option<PathBuf>,
    /// Distil from this teacher (an ONNX file, or a run folder, exported for the purpose): the
    /// ViT gets DeiT's distillation token.
    pub distill_from: Option<PathBuf>,
    pub distillation: Method,
    pub channels: Option<usize>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub resize: runtime::ResizeMode,
    pub backend: String,
    /// Stop after this many epochs of this call, keeping the full schedule: a long run split
    /// over several sessions, continued with [`resume`].
    pub stop_after: Option<usize>,
}

impl NewRun {
    /// `preset` trained on `data` with `recipe`, everything else as `exporter train` defaults
    /// it: the preset's architecture, channel count and augmentation decided from the data,
    /// mean and std 0.5, squash resizing, the `flex` backend, the whole schedule in one call.
    pub fn new(data: PathBuf, preset: Preset, recipe: Recipe) -> NewRun {
        NewRun {
            data,
            preset,
            overrides: ModelOverrides::default(),
            recipe,
            augment: None,
            crop_min_area: None,
            erase: None,
            init_from: None,
            distill_from: None,
            distillation: Method::Hard,
            channels: None,
            mean: None,
            std: None,
            resize: runtime::ResizeMode::default(),
            backend: crate::backend::DEFAULT.into(),
            stop_after: None,
        }
    }
}

/// Command-line overrides of a preset's architecture.
#[derive(Clone, Debug, Default)]
pub struct ModelOverrides {
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub dim: Option<usize>,
    pub depth: Option<usize>,
    pub heads: Option<usize>,
    pub mlp_dim: Option<usize>,
    /// The CNN's stage widths and blocks per stage.
    pub widths: Option<Vec<usize>>,
    pub blocks: Option<Vec<usize>>,
    pub dropout: Option<f64>,
}

impl ModelOverrides {
    /// Applies the overrides; those the architecture does not have are refused by name.
    fn apply(&self, config: &mut ModelConfig) -> Result<(), ConfigError> {
        let set = |field: &mut usize, value: Option<usize>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        let given = [
            ("--patch-size", self.patch_size.is_some()),
            ("--dim", self.dim.is_some()),
            ("--depth", self.depth.is_some()),
            ("--heads", self.heads.is_some()),
            ("--mlp-dim", self.mlp_dim.is_some()),
            ("--widths", self.widths.is_some()),
            ("--blocks", self.blocks.is_some()),
        ];
        let (architecture, applies): (&str, &[&str]) = match config {
            ModelConfig::Vit(_) => (
                "a ViT",
                &["--patch-size", "--dim", "--depth", "--heads", "--mlp-dim"],
            ),
            ModelConfig::Cnn(_) => ("a CNN", &["--widths", "--blocks"]),
            ModelConfig::Swin(_) => ("a Swin", &["--patch-size"]),
        };
        if let Some((flag, _)) = given
            .iter()
            .find(|(flag, set)| *set && !applies.contains(flag))
        {
            return Err(ConfigError(format!(
                "{flag} does not apply to {architecture}"
            )));
        }
        match config {
            ModelConfig::Vit(config) => {
                set(&mut config.image_size, self.image_size);
                set(&mut config.patch_size, self.patch_size);
                set(&mut config.dim, self.dim);
                set(&mut config.depth, self.depth);
                set(&mut config.heads, self.heads);
                set(&mut config.mlp_dim, self.mlp_dim);
            }
            ModelConfig::Cnn(config) => {
                set(&mut config.image_size, self.image_size);
                if let Some(widths) = &self.widths {
                    config.widths = widths.clone();
                }
                if let Some(blocks) = &self.blocks {
                    config.blocks = blocks.clone();
                }
            }
            ModelConfig::Swin(config) => {
                set(&mut config.image_size, self.image_size);
                set(&mut config.patch_size, self.patch_size);
            }
        }
        if let Some(dropout) = self.dropout {
            config.set_dropout(dropout);
        }
        Ok(())
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: usize,
    pub learning_rate: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    /// Absent when the run trains on every image, without validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    pub images_per_second: f64,
    pub epoch_seconds: f64,
    /// The weight average's validation figures, when the run keeps one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_val_accuracy: Option<f64>,
    /// Time the teacher took in this epoch (included in `epoch_seconds`), when distilling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_seconds: Option<f64>,
}

pub use crate::run_folder::read_metrics;

/// The best epoch's figures (in `state.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BestCheckpoint {
    pub epoch: usize,
    /// Absent without validation, where the latest epoch is the best by definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// What a finished (or resumed-and-finished) run reports.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub epochs: Vec<EpochMetrics>,
    pub best: Option<BestCheckpoint>,
    pub steps: usize,
    pub train_images: usize,
    pub val_images: usize,
    pub skipped_images: usize,
}

/// Observer of training progress (a progress bar in the CLI, nothing in tests).
pub trait Progress {
    fn epoch_started(&mut self, _epoch: usize, _epochs: usize, _steps: usize) {}
    fn step(&mut self, _loss: f64, _accuracy: f64, _images_per_second: f64) {}
    fn epoch_finished(&mut self, _metrics: &EpochMetrics) {}
    fn message(&mut self, _text: &str) {}
}

impl Progress for () {}
