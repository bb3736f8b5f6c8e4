//! A small residual CNN (ResNet's basic blocks), the tutorial's point of comparison: its
//! convolutions bring the inductive bias a ViT lacks (locality, translation equivariance), so
//! it learns more from few images.
//!
//! Stem (3×3 conv, BatchNorm, ReLU), then stages of residual blocks `relu(bn(conv(relu(bn(conv
//! x)))) + shortcut x`, each stage after the first halving the resolution and starting with a
//! 1×1 conv + BatchNorm shortcut; global average pooling, dropout and a linear head. The export
//! folds each BatchNorm into its convolution (`export/cnn.rs`).
//!
//! BatchNorm here never goes through burn's `BatchNorm::forward`, which keeps its running
//! statistics per thread: training splits each batch across the cores, and which thread ran
//! which part would change the result. Each part normalises with its own statistics (a "ghost
//! batch", as data-parallel training without synchronised BatchNorm does), and the training
//! loop folds all parts' statistics into the running ones on its own thread, in part order.

use super::dropout;
use super::{BatchStatistics, ConfigError, ImageClassifier, TrainOutput};
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Initializer, Linear, LinearConfig,
    PaddingConfig2d,
};
use burn::prelude::*;
use burn::tensor::module::{batch_norm, batch_norm_train};
use serde::{Deserialize, Serialize};

/// BatchNorm epsilon and momentum, PyTorch's defaults (the export reads the epsilon).
pub const BATCH_NORM_EPSILON: f64 = 1e-5;
const BATCH_NORM_MOMENTUM: f64 = 0.1;

/// The CNN's hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CnnConfig {
    pub image_size: usize,
    pub channels: usize,
    /// Channels of each stage; every stage after the first halves the resolution.
    pub widths: Vec<usize>,
    /// Residual blocks in each stage.
    pub blocks: Vec<usize>,
    /// Dropout before the head.
    pub dropout: f64,
    pub num_classes: usize,
}

impl CnnConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        if self.image_size == 0 || !(self.channels == 1 || self.channels == 3) {
            return fail(format!(
                "a CNN needs a positive image size and 1 or 3 channels, not {} px × {}",
                self.image_size, self.channels
            ));
        }
        if self.widths.is_empty() || self.widths.len() != self.blocks.len() {
            return fail(format!(
                "{} stage widths and {} block counts: one of each per stage",
                self.widths.len(),
                self.blocks.len()
            ));
        }
        if self.widths.contains(&0) || self.blocks.contains(&0) {
            return fail("every stage needs a positive width and at least one block".into());
        }
        if self.image_size >> (self.widths.len() - 1) == 0 {
            return fail(format!(
                "{} px is too small for {} stages that each halve it",
                self.image_size,
                self.widths.len()
            ));
        }
        super::check_head(self.dropout, self.num_classes)
    }

    /// Multiply-adds of one image: every convolution at its output size, and the head.
    pub fn multiply_adds(&self) -> u64 {
        let conv = |c_in: usize, c_out: usize, kernel: usize, side: usize| {
            (c_in * c_out * kernel * kernel * side * side) as u64
        };
        let mut side = self.image_size;
        let mut total = conv(self.channels, self.widths[0], 3, side);
        let mut c_in = self.widths[0];
        for (stage, (&width, &blocks)) in self.widths.iter().zip(&self.blocks).enumerate() {
            for block in 0..blocks {
                let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                side = side.div_ceil(stride);
                total += conv(c_in, width, 3, side) + conv(width, width, 3, side);
                if c_in != width || stride != 1 {
                    total += conv(c_in, width, 1, side);
                }
                c_in = width;
            }
        }
        total + (c_in * self.num_classes) as u64
    }

    pub fn init(&self, device: &Device) -> Result<ResNet, ConfigError> {
        self.validate()?;
        let stem = ConvNorm::new(self.channels, self.widths[0], 3, 1, device);
        let mut blocks = Vec::new();
        let mut c_in = self.widths[0];
        for (stage, (&width, &count)) in self.widths.iter().zip(&self.blocks).enumerate() {
            for block in 0..count {
                let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                blocks.push(ResidualBlock::new(c_in, width, stride, device));
                c_in = width;
            }
        }
        Ok(ResNet {
            stem,
            blocks,
            dropout: DropoutConfig::new(self.dropout).init(),
            head: LinearConfig::new(c_in, self.num_classes).init(device),
        })
    }
}

/// A convolution without bias and the BatchNorm after it: one Conv with a bias once exported.
#[derive(Module, Debug)]
pub struct ConvNorm {
    pub conv: Conv2d,
    pub norm: BatchNorm,
}

impl ConvNorm {
    fn new(c_in: usize, c_out: usize, kernel: usize, stride: usize, device: &Device) -> Self {
        let pad = kernel / 2;
        ConvNorm {
            conv: Conv2dConfig::new([c_in, c_out], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(false)
                // He initialisation for ReLU networks, fan-out (torchvision's ResNet).
                .with_initializer(Initializer::KaimingNormal {
                    gain: std::f64::consts::SQRT_2,
                    fan_out_only: true,
                })
                .init(device),
            norm: BatchNormConfig::new(c_out)
                .with_epsilon(BATCH_NORM_EPSILON)
                .with_momentum(BATCH_NORM_MOMENTUM)
                .init(device),
        }
    }

    /// Batch statistics on an autodiff device (pushed to `statistics`), running ones otherwise.
    fn forward(&self, x: Tensor<4>, statistics: &mut Vec<BatchStatistics>) -> Tensor<4> {
        let x = self.conv.forward(x);
        let (gamma, beta) = (self.norm.gamma.val(), self.norm.beta.val());
        if !x.device().is_autodiff() {
            let mean = self.norm.running_mean.value();
            let variance = self.norm.running_var.value();
            return batch_norm(x, gamma, beta, mean, variance, self.norm.epsilon);
        }
        let [batch, _, height, width] = x.dims();
        let trained = batch_norm_train(x, gamma, beta, self.norm.epsilon);
        statistics.push(BatchStatistics {
            mean: trained.mean,
            variance: trained.variance,
            count: batch * height * width,
        });
        trained.output
    }

    /// `running = (1 − momentum) · running + momentum · batch`, where `batch` pools the parts'
    /// statistics as one batch would have given them (variance unbiased, as PyTorch keeps it).
    fn update_statistics(&self, parts: &[&BatchStatistics]) {
        let total: usize = parts.iter().map(|p| p.count).sum();
        let Some(first) = parts.first() else { return };
        let weight = |p: &BatchStatistics| p.count as f64 / total as f64;
        let mean = parts
            .iter()
            .skip(1)
            .fold(first.mean.clone().mul_scalar(weight(first)), |sum, p| {
                sum + p.mean.clone().mul_scalar(weight(p))
            });
        let spread = |p: &BatchStatistics| {
            (p.variance.clone() + (p.mean.clone() - mean.clone()).square()).mul_scalar(weight(p))
        };
        let variance = parts
            .iter()
            .skip(1)
            .fold(spread(first), |sum, p| sum + spread(p))
            .mul_scalar(total as f64 / (total.max(2) - 1) as f64);
        let m = self.norm.momentum;
        for (running, batch) in [
            (&self.norm.running_mean, mean),
            (&self.norm.running_var, variance),
        ] {
            let blended = running.value().mul_scalar(1.0 - m) + batch.mul_scalar(m);
            running.update(blended.detach());
            running.value_sync();
        }
    }
}

/// Two 3×3 ConvNorms with a ReLU between, added to the input (through a 1×1 ConvNorm when the
/// shape changes), then a ReLU.
#[derive(Module, Debug)]
pub struct ResidualBlock {
    pub first: ConvNorm,
    pub second: ConvNorm,
    pub shortcut: Option<ConvNorm>,
}

impl ResidualBlock {
    fn new(c_in: usize, c_out: usize, stride: usize, device: &Device) -> Self {
        let mut second = ConvNorm::new(c_out, c_out, 3, 1, device);
        // Each block starts as the identity (its last BatchNorm scaled to 0): deep residual
        // nets then train from the first step as if shallow (Goyal et al. 2017).
        second.norm.gamma = Param::from_tensor(Tensor::zeros([c_out], device));
        ResidualBlock {
            first: ConvNorm::new(c_in, c_out, 3, stride, device),
            second,
            shortcut: (c_in != c_out || stride != 1)
                .then(|| ConvNorm::new(c_in, c_out, 1, stride, device)),
        }
    }

    fn forward(&self, x: Tensor<4>, statistics: &mut Vec<BatchStatistics>) -> Tensor<4> {
        let residual = match &self.shortcut {
            Some(shortcut) => shortcut.forward(x.clone(), statistics),
            None => x.clone(),
        };
        let y = burn::tensor::activation::relu(self.first.forward(x, statistics));
        burn::tensor::activation::relu(self.second.forward(y, statistics) + residual)
    }

    fn norms(&self) -> impl Iterator<Item = &ConvNorm> {
        // The order `forward` pushes their statistics in.
        self.shortcut.iter().chain([&self.first, &self.second])
    }
}

#[derive(Module, Debug)]
pub struct ResNet {
    pub stem: ConvNorm,
    pub blocks: Vec<ResidualBlock>,
    pub dropout: Dropout,
    pub head: Linear,
}

impl ResNet {
    fn forward_with_statistics(
        &self,
        images: Tensor<4>,
        statistics: &mut Vec<BatchStatistics>,
    ) -> Tensor<2> {
        let x = burn::tensor::activation::relu(self.stem.forward(images, statistics));
        let x = self
            .blocks
            .iter()
            .fold(x, |x, block| block.forward(x, statistics));
        let [batch, channels, _, _] = x.dims();
        let pooled = x.mean_dim(3).mean_dim(2).reshape([batch, channels]);
        self.head.forward(dropout::forward(&self.dropout, pooled))
    }

    /// Every ConvNorm in the order their statistics come.
    pub fn norms(&self) -> impl Iterator<Item = &ConvNorm> {
        std::iter::once(&self.stem).chain(self.blocks.iter().flat_map(ResidualBlock::norms))
    }
}

impl ImageClassifier for ResNet {
    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward_with_statistics(images, &mut Vec::new())
    }

    fn forward_train(&self, images: Tensor<4>) -> TrainOutput {
        let mut statistics = Vec::new();
        let logits = self.forward_with_statistics(images, &mut statistics);
        TrainOutput {
            logits,
            distillation: None,
            statistics,
        }
    }

    fn update_statistics(&self, parts: &[Vec<BatchStatistics>]) {
        for (layer, norm) in self.norms().enumerate() {
            let layer_parts: Vec<&BatchStatistics> =
                parts.iter().filter_map(|part| part.get(layer)).collect();
            norm.update_statistics(&layer_parts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, Preset};
    use burn::tensor::Distribution;

    fn cnn(preset: Preset, channels: usize, classes: usize) -> CnnConfig {
        match preset.config(channels, classes) {
            ModelConfig::Cnn(config) => config,
            other => panic!("{preset} is not a CNN: {other:?}"),
        }
    }

    fn values(t: Tensor<1>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn parameter_count_and_multiply_adds_match_the_architecture() {
        let config = cnn(Preset::CnnTiny, 1, 3);
        let model = config.init(&crate::backend::device()).unwrap();
        // Stem 1→4 (3×3), stage 1: 4→4 ×2 convs; stage 2: 4→8, 8→8, 1×1 shortcut 4→8; each
        // conv's BatchNorm has 4 values per channel (γ, β, running mean and variance).
        let convs = 9 * 4 + 2 * 9 * 16 + 9 * 32 + 9 * 64 + 32;
        let norms = 4 * (4 + 4 + 4 + 8 + 8 + 8);
        assert_eq!(model.num_params(), convs + norms + (8 * 3 + 3));
        // 16 px in the first stage, 8 px in the second.
        let macs = 256 * (9 * 4 + 2 * 9 * 16) + 64 * (9 * 32 + 9 * 64 + 32) + 8 * 3;
        assert_eq!(config.multiply_adds(), macs as u64);
    }

    #[test]
    fn every_weight_gets_a_gradient_and_no_running_statistic_does() {
        let device = crate::backend::device().autodiff();
        let model = cnn(Preset::CnnTiny, 1, 3).init(&device).unwrap();
        let images = Tensor::<4>::random([2, 1, 16, 16], Distribution::Normal(0.0, 1.0), &device);
        let logits = model.forward_train(images).logits;
        let grads = burn::optim::GradientsParams::from_grads(logits.sum().backward(), &model);
        let running: usize = model.norms().map(|n| 2 * n.norm.gamma.dims()[0]).sum();
        let trained = model.num_params() - running;
        let with_gradient: usize = {
            struct Count<'a>(&'a burn::optim::GradientsParams, usize);
            impl burn::module::ModuleVisitor for Count<'_> {
                fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                    if let Some(grad) = self.0.get::<D>(param.id) {
                        self.1 += grad.shape().num_elements();
                    }
                }
            }
            let mut count = Count(&grads, 0);
            model.visit(&mut count);
            count.1
        };
        assert_eq!(with_gradient, trained);
    }

    #[test]
    fn bad_configs_are_rejected_with_the_reason() {
        let good = cnn(Preset::Cnn, 1, 10);
        assert!(good.validate().is_ok());
        let cases = [
            (
                CnnConfig {
                    blocks: vec![1, 1],
                    ..good.clone()
                },
                "one of each per stage",
            ),
            (
                CnnConfig {
                    widths: vec![32, 0, 8],
                    ..good.clone()
                },
                "positive width",
            ),
            (
                CnnConfig {
                    image_size: 2,
                    ..good.clone()
                },
                "too small",
            ),
            (
                CnnConfig {
                    channels: 2,
                    ..good.clone()
                },
                "1 or 3 channels",
            ),
            (
                CnnConfig {
                    num_classes: 1,
                    ..good
                },
                "at least 2",
            ),
        ];
        for (config, reason) in cases {
            let error = config.validate().unwrap_err().0;
            assert!(error.contains(reason), "{error}");
        }
    }

    #[test]
    fn training_normalises_by_the_batch_and_inference_by_the_running_statistics() {
        let train_device = crate::backend::device().autodiff();
        let model = cnn(Preset::CnnTiny, 1, 3).init(&train_device).unwrap();
        let images = Tensor::<4>::random(
            [6, 1, 16, 16],
            Distribution::Normal(2.0, 3.0),
            &train_device,
        );
        let statistics = model.forward_train(images.clone()).statistics;
        assert_eq!(statistics.len(), model.norms().count());
        // The stem's statistics are those of its convolution's output.
        let stem = model.stem.conv.forward(images);
        let expected_mean = values(
            stem.clone()
                .mean_dim(3)
                .mean_dim(2)
                .mean_dim(0)
                .flatten(0, 3),
        );
        for (a, b) in values(statistics[0].mean.clone())
            .iter()
            .zip(&expected_mean)
        {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // Fresh running statistics are 0 and 1; one update moves them by the momentum.
        let running = || values(model.stem.norm.running_mean.value());
        assert!(running().iter().all(|&v| v == 0.0));
        model.update_statistics(&[statistics]);
        for (a, b) in running().iter().zip(&expected_mean) {
            assert!((a - 0.1 * b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn pooled_parts_give_the_whole_batchs_running_statistics() {
        let train_device = crate::backend::device().autodiff();
        let whole_model = cnn(Preset::CnnTiny, 1, 3).init(&train_device).unwrap();
        let parts_model = whole_model.clone().valid().train();
        let images = Tensor::<4>::random(
            [5, 1, 16, 16],
            Distribution::Normal(0.0, 1.0),
            &train_device,
        );
        // The stem sees the same input either way, so its statistics must agree exactly.
        let whole = vec![whole_model.forward_train(images.clone()).statistics];
        let parts = vec![
            parts_model
                .forward_train(images.clone().narrow(0, 0, 3))
                .statistics,
            parts_model.forward_train(images.narrow(0, 3, 2)).statistics,
        ];
        whole_model.update_statistics(&whole);
        parts_model.update_statistics(&parts);
        for (running_whole, running_parts) in [
            (
                &whole_model.stem.norm.running_mean,
                &parts_model.stem.norm.running_mean,
            ),
            (
                &whole_model.stem.norm.running_var,
                &parts_model.stem.norm.running_var,
            ),
        ] {
            for (a, b) in values(running_whole.value())
                .iter()
                .zip(&values(running_parts.value()))
            {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}
