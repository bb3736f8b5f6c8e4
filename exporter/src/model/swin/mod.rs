//! The Swin Transformer (Liu et al. 2021), the tutorial's first extension of the ViT: attention
//! inside local windows, which costs linearly in the tokens instead of quadratically, with the
//! windows shifted by half a window in every second block so information crosses their borders,
//! and patches merged stage by stage into a hierarchy.
//!
//! Patch partition and linear embedding (as the ViT's, then a LayerNorm); stages of Swin blocks
//! (pre-norm window attention with a learned relative position bias, then a GELU MLP); between
//! stages, patch merging (each 2×2 group of tokens concatenated, normalised and projected to
//! twice the width); a final LayerNorm, the mean over tokens and a linear head. The shifted
//! window is a cyclic shift of the token grid plus a mask that keeps tokens from attending
//! across the wrap, as in the paper. A stage whose grid is no larger than the window uses one
//! window and no shift.

use super::dropout;
use super::vit::LAYER_NORM_EPSILON;
use super::{ConfigError, ImageClassifier};
use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use serde::{Deserialize, Serialize};

mod windows;

use windows::shift_mask;
pub use windows::{merge_windows, partition, relative_position_index, roll, shift_mask_values};

/// What the mask adds to the scores of token pairs the shifted window must keep apart; the
/// paper's value, small enough that the softmax weight is 0 in f32.
pub const MASKED: f32 = -100.0;

/// The Swin's hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwinConfig {
    pub image_size: usize,
    pub channels: usize,
    pub patch_size: usize,
    /// Side of the attention windows, in tokens.
    pub window_size: usize,
    /// Width of the first stage; each later stage doubles it.
    pub embed_dim: usize,
    /// Swin blocks in each stage.
    pub depths: Vec<usize>,
    /// Attention heads in each stage.
    pub heads: Vec<usize>,
    /// MLP hidden width as a multiple of the stage's width.
    pub mlp_ratio: usize,
    pub dropout: f64,
    pub num_classes: usize,
}

/// One stage's geometry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageShape {
    /// Tokens per side.
    pub side: usize,
    pub dim: usize,
    pub heads: usize,
    /// Window side: the configured one, or the whole grid when that is smaller.
    pub window: usize,
}

impl SwinConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        super::check_positive(&[
            ("image size", self.image_size),
            ("channels", self.channels),
            ("patch size", self.patch_size),
            ("window size", self.window_size),
            ("embedding width", self.embed_dim),
            ("MLP ratio", self.mlp_ratio),
        ])?;
        if self.depths.is_empty() || self.depths.len() != self.heads.len() {
            return fail(format!(
                "{} stage depths and {} head counts: one of each per stage",
                self.depths.len(),
                self.heads.len()
            ));
        }
        if self.depths.contains(&0) || self.heads.contains(&0) {
            return fail("every stage needs at least one block and one head".into());
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return fail(format!(
                "image size {} is not divisible by patch size {}",
                self.image_size, self.patch_size
            ));
        }
        let mut side = self.image_size / self.patch_size;
        for stage in 0..self.depths.len() {
            if stage > 0 {
                if !side.is_multiple_of(2) {
                    return fail(format!(
                        "stage {stage} merges 2×2 tokens of a {side}×{side} grid: it must be even"
                    ));
                }
                side /= 2;
            }
            let window = self.window_size.min(side);
            if !side.is_multiple_of(window) {
                return fail(format!(
                    "stage {stage}'s {side}×{side} tokens do not tile into {window}×{window} windows"
                ));
            }
            let dim = self.embed_dim << stage;
            if !dim.is_multiple_of(self.heads[stage]) {
                return fail(format!(
                    "stage {stage}'s width {dim} is not divisible by {} heads",
                    self.heads[stage]
                ));
            }
        }
        super::check_head(self.dropout, self.num_classes)
    }

    /// Each stage's grid, width, heads and window.
    pub fn stages(&self) -> Vec<StageShape> {
        let mut side = self.image_size / self.patch_size;
        (0..self.depths.len())
            .map(|stage| {
                if stage > 0 {
                    side /= 2;
                }
                StageShape {
                    side,
                    dim: self.embed_dim << stage,
                    heads: self.heads[stage],
                    window: self.window_size.min(side),
                }
            })
            .collect()
    }

    /// Multiply-adds of one image: the patch embedding, each block's projections, windowed
    /// attention products and MLP, each patch merging, and the head.
    pub fn multiply_adds(&self) -> u64 {
        let tokens0 = (self.image_size / self.patch_size).pow(2) as u64;
        let patch_input = (self.patch_size.pow(2) * self.channels) as u64;
        let mut total = tokens0 * patch_input * self.embed_dim as u64;
        for (stage, shape) in self.stages().iter().enumerate() {
            let (t, d) = ((shape.side * shape.side) as u64, shape.dim as u64);
            let window_tokens = (shape.window * shape.window) as u64;
            let m = self.mlp_ratio as u64 * d;
            let block = t * d * 3 * d + 2 * t * window_tokens * d + t * d * d + 2 * t * d * m;
            total += self.depths[stage] as u64 * block;
            if stage > 0 {
                // 4·(d/2) → d on the merged grid.
                total += t * 2 * d * d;
            }
        }
        let last = self.embed_dim << (self.depths.len() - 1);
        total + (last * self.num_classes) as u64
    }

    pub fn init(&self, device: &Device) -> Result<SwinTransformer, ConfigError> {
        self.validate()?;
        let stages = self
            .stages()
            .iter()
            .enumerate()
            .map(|(index, &shape)| SwinStage {
                merge: (index > 0).then(|| PatchMerging::new(shape.dim / 2, device)),
                blocks: (0..self.depths[index])
                    .map(|block| {
                        // Every second block shifts, unless one window covers the grid.
                        let shifted = block % 2 == 1 && shape.window < shape.side;
                        SwinBlock::new(self, shape, shifted, device)
                    })
                    .collect(),
            })
            .collect();
        let last = self.embed_dim << (self.depths.len() - 1);
        Ok(SwinTransformer {
            patch_embedding: LinearConfig::new(
                self.patch_size.pow(2) * self.channels,
                self.embed_dim,
            )
            .init(device),
            embedding_norm: layer_norm(self.embed_dim, device),
            stages,
            norm: layer_norm(last, device),
            head: LinearConfig::new(last, self.num_classes).init(device),
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
pub struct SwinTransformer {
    pub patch_embedding: Linear,
    pub embedding_norm: LayerNorm,
    pub stages: Vec<SwinStage>,
    pub norm: LayerNorm,
    pub head: Linear,
    pub patch_size: usize,
}

#[derive(Module, Debug)]
pub struct SwinStage {
    /// Patch merging into this stage (every stage but the first).
    pub merge: Option<PatchMerging>,
    pub blocks: Vec<SwinBlock>,
}

impl SwinTransformer {
    /// Patchify and project (`b c (h p1) (w p2) -> b (h w) (p1 p2 c)`, then Linear and
    /// LayerNorm): `[batch, tokens, dim]`.
    fn embed(&self, images: Tensor<4>) -> Tensor<3> {
        let patches = super::patchify(images, self.patch_size);
        self.embedding_norm
            .forward(self.patch_embedding.forward(patches))
    }

    fn classify(&self, x: Tensor<3>) -> Tensor<2> {
        let [batch, _, dim] = x.dims();
        let pooled = self.norm.forward(x).mean_dim(1).reshape([batch, dim]);
        self.head.forward(pooled)
    }
}

impl ImageClassifier for SwinTransformer {
    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = self.embed(images);
        for stage in &self.stages {
            if let Some(merge) = &stage.merge {
                x = merge.forward(x);
            }
            x = stage.blocks.iter().fold(x, |x, block| block.forward(x));
        }
        self.classify(x)
    }
}

/// Each 2×2 group of tokens concatenated (4·C), LayerNorm, then Linear to 2·C without bias.
#[derive(Module, Debug)]
pub struct PatchMerging {
    pub norm: LayerNorm,
    pub reduction: Linear,
}

impl PatchMerging {
    fn new(dim: usize, device: &Device) -> Self {
        PatchMerging {
            norm: layer_norm(4 * dim, device),
            reduction: LinearConfig::new(4 * dim, 2 * dim)
                .with_bias(false)
                .init(device),
        }
    }

    /// `[batch, side², C]` → `[batch, (side/2)², 2·C]`, the group's tokens in the order
    /// (even row, even column), (odd, even), (even, odd), (odd, odd), as torchvision's.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, tokens, dim] = x.dims();
        let side = (tokens as f64).sqrt() as usize;
        let half = side / 2;
        let grouped = x
            .reshape([batch, half, 2, half, 2, dim])
            .permute([0, 1, 3, 4, 2, 5])
            .reshape([batch, half * half, 4 * dim]);
        self.reduction.forward(self.norm.forward(grouped))
    }
}

/// A pre-norm Swin block: window attention (shifted or not), then a GELU MLP, each with a
/// residual.
#[derive(Module, Debug)]
pub struct SwinBlock {
    pub attention_norm: LayerNorm,
    pub attention: WindowAttention,
    pub mlp_norm: LayerNorm,
    pub hidden: Linear,
    pub output: Linear,
    pub activation: Gelu,
    pub dropout: Dropout,
    /// Tokens per side of the grid this block works on.
    pub side: usize,
    /// How far the grid is rolled before the windows are cut (0: not shifted).
    pub shift: usize,
}

impl SwinBlock {
    fn new(config: &SwinConfig, shape: StageShape, shifted: bool, device: &Device) -> Self {
        let hidden = config.mlp_ratio * shape.dim;
        SwinBlock {
            attention_norm: layer_norm(shape.dim, device),
            attention: WindowAttention::new(shape, device),
            mlp_norm: layer_norm(shape.dim, device),
            hidden: LinearConfig::new(shape.dim, hidden).init(device),
            output: LinearConfig::new(hidden, shape.dim).init(device),
            activation: Gelu::new(),
            dropout: DropoutConfig::new(config.dropout).init(),
            side: shape.side,
            shift: if shifted { shape.window / 2 } else { 0 },
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with_attention(x).0
    }

    /// The block's output and its attention weights `[batch · windows, heads, N, N]`.
    pub fn forward_with_attention(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let [batch, tokens, dim] = x.dims();
        let (side, window) = (self.side, self.attention.window);
        // The projections act on each token alone, so they run on the whole grid: only q, k
        // and v are cut into windows, and only the context is put back.
        let qkv = self
            .attention
            .qkv
            .forward(self.attention_norm.forward(x.clone()))
            .reshape([batch, side, side, 3 * dim]);
        let windows = partition(roll(qkv, self.shift, false), window);
        let mask = (self.shift > 0).then(|| shift_mask(side, window, self.shift, &x.device()));
        let (context, weights) = self.attention.attend(windows, mask);
        let grid = roll(merge_windows(context, batch, side), self.shift, true);
        let attended = self
            .attention
            .output
            .forward(grid.reshape([batch, tokens, dim]));
        let x = x + dropout::forward(&self.dropout, attended);
        let hidden = self
            .activation
            .forward(self.hidden.forward(self.mlp_norm.forward(x.clone())));
        let transformed = self.output.forward(dropout::forward(&self.dropout, hidden));
        (x + dropout::forward(&self.dropout, transformed), weights)
    }
}

/// Multi-head self-attention inside each window, with a learned bias per head for each
/// relative position (Swin's `relative_position_bias_table`).
#[derive(Module, Debug)]
pub struct WindowAttention {
    pub qkv: Linear,
    pub output: Linear,
    /// `[(2w − 1)², heads]`.
    pub relative_bias: Param<Tensor<2>>,
    pub dropout: Dropout,
    pub heads: usize,
    pub window: usize,
}

impl WindowAttention {
    fn new(shape: StageShape, device: &Device) -> Self {
        let span = 2 * shape.window - 1;
        WindowAttention {
            qkv: LinearConfig::new(shape.dim, 3 * shape.dim).init(device),
            output: LinearConfig::new(shape.dim, shape.dim).init(device),
            relative_bias: Param::from_tensor(Tensor::random(
                [span * span, shape.heads],
                Distribution::Normal(0.0, 0.02),
                device,
            )),
            dropout: DropoutConfig::new(0.0).init(),
            heads: shape.heads,
            window: shape.window,
        }
    }

    /// The bias added to each head's scores: `[heads, N, N]`.
    pub fn bias(&self) -> Tensor<3> {
        let tokens = self.window * self.window;
        let device = self.relative_bias.device();
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(relative_position_index(self.window), [tokens * tokens]),
            &device,
        );
        self.relative_bias
            .val()
            .select(0, index)
            .reshape([tokens, tokens, self.heads])
            .permute([2, 0, 1])
    }

    /// The context of each window, before the output projection: `windows` holds q, k and v
    /// side by side (`[batch · W, N, 3·C]`, the QKV projection cut into windows); `mask`
    /// `[W, N, N]` is added to every head's scores of window `W`. Returns the context
    /// `[batch · W, N, C]` and the softmax weights.
    pub fn attend(&self, windows: Tensor<3>, mask: Option<Tensor<3>>) -> (Tensor<3>, Tensor<4>) {
        let [count, tokens, width] = windows.dims();
        let (heads, dim) = (self.heads, width / 3);
        let head_dim = dim / heads;
        let split_heads =
            |t: Tensor<3>| t.reshape([count, tokens, heads, head_dim]).swap_dims(1, 2);
        let mut qkv = windows.chunk(3, 2).into_iter().map(split_heads);
        let (q, k, v) = (
            qkv.next().unwrap(),
            qkv.next().unwrap(),
            qkv.next().unwrap(),
        );
        let scores = q
            .mul_scalar(1.0 / (head_dim as f64).sqrt())
            .matmul(k.swap_dims(2, 3))
            + self.bias().unsqueeze_dim::<4>(0);
        let scores = match mask {
            Some(mask) => {
                let per_image = mask.dims()[0];
                let images = count / per_image;
                (scores.reshape([images, per_image, heads, tokens, tokens])
                    + mask.unsqueeze_dim::<4>(1).unsqueeze_dim::<5>(0))
                .reshape([count, heads, tokens, tokens])
            }
            None => scores,
        };
        let weights = super::vit::row_softmax(scores);
        let context = dropout::forward(&self.dropout, weights.clone())
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([count, tokens, dim]);
        (context, weights)
    }
}

#[cfg(test)]
mod tests;
