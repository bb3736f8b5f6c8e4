//! The Vision Transformer of the "ViT from scratch" tutorial, in burn.
//!
//! Patch embedding (`b c (h p1) (w p2) -> b (h w) (p1 p2 c)` then Linear), a learnable CLS
//! token in front, a learnable position embedding added, `depth` pre-norm encoder blocks, and
//! LayerNorm + Linear on the CLS token. The ONNX exporter mirrors this file op for op
//! (`export/graph.rs`).

use super::dropout;
use super::{ConfigError, ImageClassifier, TrainOutput};
use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use serde::{Deserialize, Serialize};

/// LayerNorm epsilon, shared with the ONNX export (PyTorch's default).
pub const LAYER_NORM_EPSILON: f64 = 1e-5;

/// The ViT's hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViTConfig {
    pub image_size: usize,
    pub channels: usize,
    pub patch_size: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_dim: usize,
    pub dropout: f64,
    pub num_classes: usize,
    /// DeiT's distillation token: a second learned token after CLS, with its own position and
    /// its own head, trained to predict a teacher's answer (`exporter train --distill-from`).
    /// At inference the two heads' logits are averaged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub distillation_token: bool,
}

impl ViTConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        super::check_positive(&[
            ("image size", self.image_size),
            ("channels", self.channels),
            ("patch size", self.patch_size),
            ("dim", self.dim),
            ("depth", self.depth),
            ("heads", self.heads),
            ("MLP hidden size", self.mlp_dim),
            ("number of classes", self.num_classes),
        ])?;
        if !self.image_size.is_multiple_of(self.patch_size) {
            return fail(format!(
                "image size {} is not divisible by patch size {}",
                self.image_size, self.patch_size
            ));
        }
        if !self.dim.is_multiple_of(self.heads) {
            return fail(format!(
                "dim {} is not divisible by {} heads",
                self.dim, self.heads
            ));
        }
        super::check_head(self.dropout, self.num_classes)
    }

    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens before the patches: CLS, and the distillation token if there is one.
    pub fn prefix_tokens(&self) -> usize {
        1 + usize::from(self.distillation_token)
    }

    /// Patches plus the CLS token (and the distillation token).
    pub fn tokens(&self) -> usize {
        self.patches_per_side().pow(2) + self.prefix_tokens()
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Multiply-adds of one image: the patch embedding, each block's projections, attention
    /// products and MLP, and the head.
    pub fn multiply_adds(&self) -> u64 {
        let (t, d, m) = (self.tokens() as u64, self.dim as u64, self.mlp_dim as u64);
        let patches = self.patches_per_side().pow(2) as u64;
        let patch_input = (self.patch_size.pow(2) * self.channels) as u64;
        let block = t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * m;
        let heads = self.prefix_tokens() as u64;
        patches * patch_input * d + self.depth as u64 * block + heads * d * self.num_classes as u64
    }

    pub fn init(&self, device: &Device) -> Result<VisionTransformer, ConfigError> {
        self.validate()?;
        let patch_input = self.patch_size * self.patch_size * self.channels;
        // ViT/timm initialise both learnable embeddings with a small normal (std 0.02); the
        // tutorial's `randn` makes the position signal dwarf the patch embedding early on.
        let embedding = |shape: [usize; 3]| {
            Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 0.02),
                device,
            ))
        };
        Ok(VisionTransformer {
            patch_embedding: LinearConfig::new(patch_input, self.dim).init(device),
            cls_token: embedding([1, 1, self.dim]),
            position_embedding: embedding([1, self.tokens(), self.dim]),
            blocks: (0..self.depth)
                .map(|_| EncoderBlock::new(self, device))
                .collect(),
            norm: layer_norm(self.dim, device),
            head: LinearConfig::new(self.dim, self.num_classes).init(device),
            distillation_token: self.distillation_token.then(|| embedding([1, 1, self.dim])),
            distillation_head: self
                .distillation_token
                .then(|| LinearConfig::new(self.dim, self.num_classes).init(device)),
            patch_size: self.patch_size,
        })
    }
}

fn layer_norm(dim: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(dim)
        .with_epsilon(LAYER_NORM_EPSILON)
        .init(device)
}

#[derive(Module, Debug)]
pub struct VisionTransformer {
    pub patch_embedding: Linear,
    pub cls_token: Param<Tensor<3>>,
    pub position_embedding: Param<Tensor<3>>,
    pub blocks: Vec<EncoderBlock>,
    pub norm: LayerNorm,
    pub head: Linear,
    /// DeiT's distillation token and its head ([`ViTConfig::distillation_token`]); absent in
    /// a plain ViT, whose checkpoints hold neither.
    pub distillation_token: Option<Param<Tensor<3>>>,
    pub distillation_head: Option<Linear>,
    pub patch_size: usize,
}

impl VisionTransformer {
    /// `[batch, channels, height, width]` normalised pixels → `[batch, classes]` logits; with
    /// a distillation token, the mean of the two heads' (what the export computes).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.mean_of_heads(self.forward_heads(images))
    }

    /// The class head's logits, and the distillation head's if the model has that token.
    pub fn forward_heads(&self, images: Tensor<4>) -> (Tensor<2>, Option<Tensor<2>>) {
        let tokens = self.embed(images);
        self.heads(self.blocks.iter().fold(tokens, |x, block| block.forward(x)))
    }

    fn heads(&self, tokens: Tensor<3>) -> (Tensor<2>, Option<Tensor<2>>) {
        let [batch, _, dim] = tokens.dims();
        let token = |index: usize| {
            self.norm
                .forward(tokens.clone().narrow(1, index, 1).reshape([batch, dim]))
        };
        let class = self.head.forward(token(0));
        let distillation = self
            .distillation_head
            .as_ref()
            .map(|head| head.forward(token(1)));
        (class, distillation)
    }

    fn mean_of_heads(&self, (class, distillation): (Tensor<2>, Option<Tensor<2>>)) -> Tensor<2> {
        match distillation {
            Some(distillation) => (class + distillation).mul_scalar(0.5),
            None => class,
        }
    }

    /// Logits, and each block's attention weights averaged over heads (`[batch, tokens,
    /// tokens]`, rows summing to 1): what `exporter export --with-attention` adds as outputs.
    pub fn forward_with_attention(&self, images: Tensor<4>) -> (Tensor<2>, Vec<Tensor<3>>) {
        let mut x = self.embed(images);
        let mut maps = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (next, weights) = block.forward_with_attention(x);
            maps.push(weights.mean_dim(1).squeeze_dim(1));
            x = next;
        }
        (self.mean_of_heads(self.heads(x)), maps)
    }

    /// Patchify, project, prepend CLS (and the distillation token), add position:
    /// `[batch, tokens, dim]`.
    fn embed(&self, images: Tensor<4>) -> Tensor<3> {
        let batch = images.dims()[0];
        let patches = self
            .patch_embedding
            .forward(super::patchify(images, self.patch_size));
        let dim = patches.dims()[2];
        let cls = self.cls_token.val().expand([batch, 1, dim]);
        let tokens = match &self.distillation_token {
            Some(token) => vec![cls, token.val().expand([batch, 1, dim]), patches],
            None => vec![cls, patches],
        };
        Tensor::cat(tokens, 1) + self.position_embedding.val()
    }
}

impl ImageClassifier for VisionTransformer {
    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        VisionTransformer::forward(self, images)
    }

    fn forward_train(&self, images: Tensor<4>) -> TrainOutput {
        let (logits, distillation) = self.forward_heads(images);
        TrainOutput {
            logits,
            distillation,
            statistics: Vec::new(),
        }
    }
}

/// Pre-norm transformer encoder block.
#[derive(Module, Debug)]
pub struct EncoderBlock {
    pub attention_norm: LayerNorm,
    pub attention: SelfAttention,
    pub mlp_norm: LayerNorm,
    pub mlp: FeedForward,
    pub dropout: Dropout,
}

impl EncoderBlock {
    fn new(config: &ViTConfig, device: &Device) -> Self {
        EncoderBlock {
            attention_norm: layer_norm(config.dim, device),
            attention: SelfAttention::new(config, device),
            mlp_norm: layer_norm(config.dim, device),
            mlp: FeedForward::new(config, device),
            dropout: DropoutConfig::new(config.dropout).init(),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with_attention(x).0
    }

    /// The block's output and its attention weights `[batch, heads, tokens, tokens]`.
    pub fn forward_with_attention(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let (attended, weights) = self
            .attention
            .forward_with_weights(self.attention_norm.forward(x.clone()));
        let x = x + dropout::forward(&self.dropout, attended);
        let transformed = self.mlp.forward(self.mlp_norm.forward(x.clone()));
        (x + transformed, weights)
    }
}

/// Multi-head self-attention with one fused QKV projection (as `nn.MultiheadAttention`'s
/// `in_proj`), so the exported graph needs one MatMul for all three.
#[derive(Module, Debug)]
pub struct SelfAttention {
    pub qkv: Linear,
    pub output: Linear,
    pub dropout: Dropout,
    pub heads: usize,
}

impl SelfAttention {
    fn new(config: &ViTConfig, device: &Device) -> Self {
        SelfAttention {
            qkv: LinearConfig::new(config.dim, 3 * config.dim).init(device),
            output: LinearConfig::new(config.dim, config.dim).init(device),
            dropout: DropoutConfig::new(config.dropout).init(),
            heads: config.heads,
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with_weights(x).0
    }

    /// The attended tokens and the softmax weights `[batch, heads, tokens, tokens]`.
    pub fn forward_with_weights(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let [batch, tokens, dim] = x.dims();
        let head_dim = dim / self.heads;
        let split_heads = |t: Tensor<3>| {
            t.reshape([batch, tokens, self.heads, head_dim])
                .swap_dims(1, 2)
        };
        let mut qkv = self.qkv.forward(x).chunk(3, 2).into_iter().map(split_heads);
        let (q, k, v) = (
            qkv.next().unwrap(),
            qkv.next().unwrap(),
            qkv.next().unwrap(),
        );
        // Scaling q ([tokens, head_dim]) rather than the scores ([tokens, tokens]) is the same
        // product and, at 1297 tokens, a far smaller pass in training.
        let scores = q
            .mul_scalar(1.0 / (head_dim as f64).sqrt())
            .matmul(k.swap_dims(2, 3));
        let weights = row_softmax(scores);
        let context = dropout::forward(&self.dropout, weights.clone())
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, tokens, dim]);
        (self.output.forward(context), weights)
    }
}

/// Softmax over the last axis of attention scores. The same function as burn's `softmax`, in
/// fewer full-size passes under autodiff (the row maximum is a constant for the gradient, and one
/// reciprocal per row replaces a division per element); training the 1297-token `seed` preset
/// spends most of its time here.
pub(super) fn row_softmax(scores: Tensor<4>) -> Tensor<4> {
    let row_max = scores.clone().detach().max_dim(3);
    let exponentials = (scores - row_max).exp();
    let row_sum_recip = exponentials.clone().sum_dim(3).recip();
    exponentials * row_sum_recip
}

/// Linear → GELU → dropout → Linear → dropout.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub hidden: Linear,
    pub output: Linear,
    pub activation: Gelu,
    pub dropout: Dropout,
}

impl FeedForward {
    fn new(config: &ViTConfig, device: &Device) -> Self {
        FeedForward {
            hidden: LinearConfig::new(config.dim, config.mlp_dim).init(device),
            output: LinearConfig::new(config.mlp_dim, config.dim).init(device),
            activation: Gelu::new(),
            dropout: DropoutConfig::new(config.dropout).init(),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = dropout::forward(
            &self.dropout,
            self.activation.forward(self.hidden.forward(x)),
        );
        dropout::forward(&self.dropout, self.output.forward(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, Preset};

    fn vit(preset: Preset, channels: usize, classes: usize) -> ViTConfig {
        match preset.config(channels, classes) {
            ModelConfig::Vit(config) => config,
            other => panic!("{preset} is not a ViT: {other:?}"),
        }
    }

    #[test]
    fn a_distillation_token_adds_a_token_and_a_head_averaged_at_inference() {
        let device = crate::backend::device();
        let plain = vit(Preset::Tiny, 1, 3);
        let deit = ViTConfig {
            distillation_token: true,
            ..plain.clone()
        };
        assert_eq!(deit.tokens(), plain.tokens() + 1);
        let (plain_model, model) = (plain.init(&device).unwrap(), deit.init(&device).unwrap());
        let (d, classes) = (plain.dim, plain.num_classes);
        // The token, its position row and its head.
        assert_eq!(
            model.num_params() - plain_model.num_params(),
            d + d + (d * classes + classes)
        );
        let images = Tensor::<4>::random([2, 1, 16, 16], Distribution::Normal(0.0, 1.0), &device);
        let (class, distillation) = model.forward_heads(images.clone());
        let mean = (class + distillation.expect("a second head")).mul_scalar(0.5);
        model
            .forward(images.clone())
            .to_data()
            .assert_approx_eq::<f32>(&mean.to_data(), Default::default());
        let (logits, maps) = model.forward_with_attention(images);
        logits
            .to_data()
            .assert_approx_eq::<f32>(&mean.to_data(), Default::default());
        assert_eq!(maps[0].dims(), [2, deit.tokens(), deit.tokens()]);
    }

    #[test]
    fn row_softmax_matches_burns_softmax_and_its_gradient() {
        let device = crate::backend::device().autodiff();
        let scores = || Tensor::<4>::random([2, 3, 5, 7], Distribution::Normal(0.0, 4.0), &device);
        let values = scores();
        let ours = values.clone().require_grad();
        let burns = values.require_grad();
        // A weighted sum, so each output element gets its own upstream gradient.
        let weights = scores();
        let ours_out = row_softmax(ours.clone());
        let burns_out = burn::tensor::activation::softmax(burns.clone(), 3);
        burns_out
            .to_data()
            .assert_approx_eq::<f32>(&ours_out.to_data(), Default::default());
        let ours_grad = ours.grad(&(ours_out * weights.clone()).sum().backward());
        let burns_grad = burns.grad(&(burns_out * weights).sum().backward());
        burns_grad
            .unwrap()
            .to_data()
            .assert_approx_eq::<f32>(&ours_grad.unwrap().to_data(), Default::default());
    }

    #[test]
    fn grey_models_take_one_channel() {
        let device = crate::backend::device();
        let config = vit(Preset::Tiny, 1, 3);
        let model = config.init(&device).unwrap();
        let images = Tensor::<4>::ones([1, 1, 16, 16], &device);
        let logits = model
            .forward(images)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(logits.len(), 3);
        assert!(logits.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn bad_configs_are_rejected_with_the_reason() {
        let good = vit(Preset::Seed, 3, 37);
        assert!(good.validate().is_ok());
        let odd_patch = ViTConfig {
            patch_size: 5,
            ..good.clone()
        };
        assert!(
            odd_patch
                .validate()
                .unwrap_err()
                .0
                .contains("not divisible by patch size 5")
        );
        let odd_heads = ViTConfig {
            heads: 3,
            ..good.clone()
        };
        assert!(
            odd_heads
                .validate()
                .unwrap_err()
                .0
                .contains("not divisible by 3 heads")
        );
        let one_class = ViTConfig {
            num_classes: 1,
            ..good
        };
        assert!(one_class.init(&crate::backend::device()).is_err());
    }

    #[test]
    fn parameter_count_matches_the_architecture() {
        let config = vit(Preset::Seed, 3, 37);
        let model = config.init(&crate::backend::device()).unwrap();
        let (d, m, p, n) = (32, 32, 4 * 4 * 3, 1297);
        let block = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d);
        let expected = (p * d + d) + d + n * d + 6 * block + 2 * d + (d * 37 + 37);
        assert_eq!(model.num_params(), expected);
    }
}
