//! The models the exporter trains: the tutorial's Vision Transformer ([`vit`]), a small
//! residual CNN ([`cnn`]), the tutorial's point of comparison, and the Swin Transformer
//! ([`swin`]), its first extension. Training, evaluation and export
//! see them through [`ImageClassifier`] and [`ModelConfig`], so one loop trains both.

pub mod cnn;
pub mod dropout;
pub mod swin;
pub mod vit;

pub use cnn::{CnnConfig, ResNet};
pub use swin::{SwinConfig, SwinTransformer};
pub use vit::{LAYER_NORM_EPSILON, ViTConfig, VisionTransformer};

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid model configuration: {0}")]
pub struct ConfigError(pub String);

/// `[batch, channels, height, width]` → `[batch, patches, p·p·channels]`, row-major patches,
/// each flattened as `(p1 p2 c)` (the tutorial's `b c (h p1) (w p2) -> b (h w) (p1 p2 c)`).
fn patchify(images: Tensor<4>, p: usize) -> Tensor<3> {
    let [batch, channels, height, width] = images.dims();
    let (rows, cols) = (height / p, width / p);
    images
        .reshape([batch, channels, rows, p, cols, p])
        .permute([0, 2, 4, 3, 5, 1])
        .reshape([batch, rows * cols, p * p * channels])
}

/// The first of `fields` (name, value) that is 0, as an error naming it.
fn check_positive(fields: &[(&str, usize)]) -> Result<(), ConfigError> {
    match fields.iter().find(|(_, value)| *value == 0) {
        Some((name, _)) => Err(ConfigError(format!("{name} must be positive"))),
        None => Ok(()),
    }
}

/// The checks every architecture's head shares: dropout in [0, 1) and at least 2 classes.
fn check_head(dropout: f64, num_classes: usize) -> Result<(), ConfigError> {
    if !(0.0..1.0).contains(&dropout) {
        return Err(ConfigError(format!("dropout {dropout} is not in [0, 1)")));
    }
    if num_classes < 2 {
        return Err(ConfigError(format!(
            "{num_classes} class: a classifier needs at least 2"
        )));
    }
    Ok(())
}

/// What the training loop, evaluation and export need of a model, whatever its architecture.
pub trait ImageClassifier: Module + Clone + fmt::Debug + Send + Sync + 'static {
    /// `[batch, channels, height, width]` normalised pixels → `[batch, classes]` logits. On an
    /// autodiff device this is the training pass (dropout on, batch statistics).
    fn forward(&self, images: Tensor<4>) -> Tensor<2>;

    /// The training pass: the class head's logits, the distillation head's (DeiT), and the
    /// batch statistics of its normalisation layers for [`ImageClassifier::update_statistics`].
    fn forward_train(&self, images: Tensor<4>) -> TrainOutput {
        TrainOutput {
            logits: self.forward(images),
            distillation: None,
            statistics: Vec::new(),
        }
    }

    /// Fold one step's batch statistics (one list per part of the batch, in part order) into
    /// the running ones. Called on the training thread after each step, so the result does not
    /// depend on which thread ran which part.
    fn update_statistics(&self, _parts: &[Vec<BatchStatistics>]) {}
}

/// What a training pass gives.
pub struct TrainOutput {
    /// The class head's logits.
    pub logits: Tensor<2>,
    /// The distillation head's logits, for a ViT with a distillation token.
    pub distillation: Option<Tensor<2>>,
    /// Each normalisation layer's batch statistics, in a fixed order (the CNN's BatchNorms).
    pub statistics: Vec<BatchStatistics>,
}

/// One normalisation layer's statistics over one part of a batch (detached).
#[derive(Clone, Debug)]
pub struct BatchStatistics {
    pub mean: Tensor<1>,
    /// Biased (population) variance.
    pub variance: Tensor<1>,
    /// Values per channel the statistics were taken over (batch × height × width).
    pub count: usize,
}

/// A model's hyper-parameters, as `config.json` and the ONNX metadata (`vit.model_config`)
/// hold them. Untagged: a ViT's fields are as before this enum existed, so every earlier run
/// still reads; a CNN's have no `patch_size`, which tells them apart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelConfig {
    Vit(ViTConfig),
    Cnn(CnnConfig),
    Swin(SwinConfig),
}

impl ModelConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            ModelConfig::Vit(config) => config.validate(),
            ModelConfig::Cnn(config) => config.validate(),
            ModelConfig::Swin(config) => config.validate(),
        }
    }

    pub fn image_size(&self) -> usize {
        match self {
            ModelConfig::Vit(config) => config.image_size,
            ModelConfig::Cnn(config) => config.image_size,
            ModelConfig::Swin(config) => config.image_size,
        }
    }

    pub fn channels(&self) -> usize {
        match self {
            ModelConfig::Vit(config) => config.channels,
            ModelConfig::Cnn(config) => config.channels,
            ModelConfig::Swin(config) => config.channels,
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            ModelConfig::Vit(config) => config.num_classes,
            ModelConfig::Cnn(config) => config.num_classes,
            ModelConfig::Swin(config) => config.num_classes,
        }
    }

    pub fn set_dropout(&mut self, dropout: f64) {
        match self {
            ModelConfig::Vit(config) => config.dropout = dropout,
            ModelConfig::Cnn(config) => config.dropout = dropout,
            ModelConfig::Swin(config) => config.dropout = dropout,
        }
    }

    /// The architecture's name, as the ONNX metadata's `vit.architecture` gives it: `vit`,
    /// `deit` (a ViT with a distillation token), `resnet` or `swin`.
    pub fn architecture(&self) -> &'static str {
        match self {
            ModelConfig::Vit(config) if config.distillation_token => "deit",
            ModelConfig::Vit(_) => "vit",
            ModelConfig::Cnn(_) => "resnet",
            ModelConfig::Swin(_) => "swin",
        }
    }

    /// Multiply-adds of one image's forward pass (convolutions and matrix products).
    pub fn multiply_adds(&self) -> u64 {
        match self {
            ModelConfig::Vit(config) => config.multiply_adds(),
            ModelConfig::Cnn(config) => config.multiply_adds(),
            ModelConfig::Swin(config) => config.multiply_adds(),
        }
    }

    /// A model of this configuration with fresh weights.
    pub fn init(&self, device: &Device) -> Result<TrainedModel, ConfigError> {
        Ok(match self {
            ModelConfig::Vit(config) => TrainedModel::Vit(config.init(device)?),
            ModelConfig::Cnn(config) => TrainedModel::Cnn(config.init(device)?),
            ModelConfig::Swin(config) => TrainedModel::Swin(config.init(device)?),
        })
    }
}

/// A model of any architecture, as eval and export load it from a run.
#[derive(Debug)]
pub enum TrainedModel {
    Vit(VisionTransformer),
    Cnn(ResNet),
    Swin(SwinTransformer),
}

impl TrainedModel {
    /// Inference logits (running statistics, no dropout, on a plain device).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            TrainedModel::Vit(model) => model.forward(images),
            TrainedModel::Cnn(model) => ImageClassifier::forward(model, images),
            TrainedModel::Swin(model) => ImageClassifier::forward(model, images),
        }
    }

    pub fn num_params(&self) -> usize {
        match self {
            TrainedModel::Vit(model) => model.num_params(),
            TrainedModel::Cnn(model) => model.num_params(),
            TrainedModel::Swin(model) => model.num_params(),
        }
    }

    /// Visit every parameter (and running statistic), as [`Module::visit`].
    pub fn visit<V: burn::module::ModuleVisitor>(&self, visitor: &mut V) {
        match self {
            TrainedModel::Vit(model) => model.visit(visitor),
            TrainedModel::Cnn(model) => model.visit(visitor),
            TrainedModel::Swin(model) => model.visit(visitor),
        }
    }
}

/// Named architectures; `num_classes` and `channels` come from the dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// For tests: 16 px, patch 4, dim 16, 2 layers, 2 heads.
    Tiny,
    /// 28 px grey images (Fashion-MNIST): patch 7 (16 patches), dim 64, 6 layers, 4 heads, MLP 128.
    Fashion,
    /// The tutorial notebook: 144 px, patch 4, dim 32, 6 layers, 2 heads, MLP 32.
    Seed,
    /// The tutorial video: 144 px, patch 8, dim 128, 4 layers, 4 heads, MLP 512.
    Video,
    /// DeiT-Tiny's shape: 224 px, patch 16, dim 192, 12 layers, 3 heads, MLP 768.
    DeitTiny,
    /// A residual CNN for 28 px images: 3 stages of 32, 64 and 128 channels, 1 block each.
    Cnn,
    /// For tests: a residual CNN for 16 px images, 2 stages of 4 and 8 channels.
    CnnTiny,
    /// A Swin for the tutorial's 144 px input: patch 4 (36×36 tokens), windows of 6×6, 2 stages
    /// of 2 blocks, widths 32 and 64, heads 2 and 4, MLP ×2.
    SwinSeed,
    /// A Swin for 28 px images: patch 2 (14×14 tokens), windows of 7×7, 2 stages of 2 blocks,
    /// widths 32 and 64, heads 2 and 4, MLP ×2.
    SwinFashion,
    /// For tests: a Swin for 16 px images, patch 2, windows of 4, widths 8 and 16.
    SwinTiny,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Fashion => "fashion",
            Preset::Seed => "seed",
            Preset::Video => "video",
            Preset::DeitTiny => "deit-tiny",
            Preset::Cnn => "cnn",
            Preset::CnnTiny => "cnn-tiny",
            Preset::SwinSeed => "swin-seed",
            Preset::SwinFashion => "swin-fashion",
            Preset::SwinTiny => "swin-tiny",
        }
    }

    pub fn config(self, channels: usize, num_classes: usize) -> ModelConfig {
        let vit = |(image_size, patch_size, dim, depth, heads, mlp_dim, dropout)| {
            ModelConfig::Vit(ViTConfig {
                image_size,
                channels,
                patch_size,
                dim,
                depth,
                heads,
                mlp_dim,
                dropout,
                num_classes,
                distillation_token: false,
            })
        };
        let cnn = |image_size, widths: &[usize], blocks: &[usize]| {
            ModelConfig::Cnn(CnnConfig {
                image_size,
                channels,
                widths: widths.to_vec(),
                blocks: blocks.to_vec(),
                dropout: 0.0,
                num_classes,
            })
        };
        let swin = |image_size, patch_size, window_size, embed_dim, dropout| {
            ModelConfig::Swin(SwinConfig {
                image_size,
                channels,
                patch_size,
                window_size,
                embed_dim,
                depths: vec![2, 2],
                heads: vec![2, 4],
                mlp_ratio: 2,
                dropout,
                num_classes,
            })
        };
        match self {
            Preset::Tiny => vit((16, 4, 16, 2, 2, 32, 0.0)),
            Preset::Fashion => vit((28, 7, 64, 6, 4, 128, 0.1)),
            Preset::Seed => vit((144, 4, 32, 6, 2, 32, 0.1)),
            Preset::Video => vit((144, 8, 128, 4, 4, 512, 0.1)),
            Preset::DeitTiny => vit((224, 16, 192, 12, 3, 768, 0.1)),
            Preset::Cnn => cnn(28, &[32, 64, 128], &[1, 1, 1]),
            Preset::CnnTiny => cnn(16, &[4, 8], &[1, 1]),
            Preset::SwinSeed => swin(144, 4, 6, 32, 0.1),
            Preset::SwinFashion => swin(28, 2, 7, 32, 0.1),
            Preset::SwinTiny => swin(16, 2, 4, 8, 0.0),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_produces_batch_by_classes_logits() {
        let device = crate::backend::device();
        for preset in <Preset as clap::ValueEnum>::value_variants() {
            for channels in [1, 3] {
                let config = preset.config(channels, 7);
                let model = config.init(&device).unwrap();
                let size = config.image_size();
                let images = Tensor::<4>::zeros([2, channels, size, size], &device);
                assert_eq!(model.forward(images).dims(), [2, 7], "preset {preset}");
            }
        }
    }

    #[test]
    fn configs_read_back_as_their_architecture() {
        for preset in [Preset::Fashion, Preset::Cnn, Preset::SwinFashion] {
            let config = preset.config(1, 10);
            let json = serde_json::to_string(&config).unwrap();
            let back: ModelConfig = serde_json::from_str(&json).unwrap();
            assert_eq!(back, config, "{json}");
        }
        // The shipped model's run, from before the CNN and the distillation token existed.
        let shipped: serde_json::Value =
            serde_json::from_str(include_str!("../../../models/fashion-vit/config.json")).unwrap();
        let ModelConfig::Vit(vit) = serde_json::from_value(shipped["model"].clone()).unwrap()
        else {
            panic!("read as a CNN")
        };
        assert_eq!((vit.patch_size, vit.distillation_token), (4, false));
    }
}
