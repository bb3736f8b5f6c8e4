//! Where the model looked: attention maps from a model exported with `--with-attention`.
//!
//! Each `attention.N` output holds block N's softmax weights averaged over heads,
//! `[1, tokens, tokens]`, token 0 being CLS (and token 1 DeiT's distillation token, when the
//! model has one). Two readings of them, for the CLS token or the distillation token:
//! - last layer: the token's row of the last block, over the patches;
//! - rollout (Abnar & Zuidema 2020): each block's `A + I` with rows renormalised (the residual
//!   path), multiplied through the blocks; the token's row of the product, over the patches.

use crate::classifier::{Classifier, ClassifyError, TopK, top_k_into};
use crate::model::{Model, ModelError};
use crate::overlay::PatchMap;
use crate::preprocess::FrameRef;
use std::fmt;
use std::str::FromStr;

/// How the attention maps become one patch map (the module documentation describes both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Method {
    /// Attention rollout through every block (the default).
    #[default]
    Rollout,
    /// The last block's CLS attention alone.
    LastLayer,
}

impl Method {
    /// The name the command line and reports use: `rollout` or `last-layer`.
    pub fn name(self) -> &'static str {
        match self {
            Method::Rollout => "rollout",
            Method::LastLayer => "last-layer",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = ExplainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rollout" => Ok(Method::Rollout),
            "last-layer" => Ok(Method::LastLayer),
            other => Err(ExplainError::Method(other.to_string())),
        }
    }
}

/// Whose attention a map shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Token {
    /// The CLS token, whose head gives the class (the default).
    #[default]
    Cls,
    /// DeiT's distillation token, whose head learnt the teacher's answers.
    Distillation,
}

impl Token {
    /// The name the command line and reports use: `cls` or `distillation`.
    pub fn name(self) -> &'static str {
        match self {
            Token::Cls => "cls",
            Token::Distillation => "distillation",
        }
    }

    fn index(self) -> usize {
        match self {
            Token::Cls => 0,
            Token::Distillation => 1,
        }
    }
}

impl FromStr for Token {
    type Err = ExplainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cls" => Ok(Token::Cls),
            "distillation" => Ok(Token::Distillation),
            other => Err(ExplainError::Token(other.to_string())),
        }
    }
}

/// Why a frame could not be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The model cannot be explained: it has no attention outputs ([`ModelError::NoAttention`]).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Building the classifier, preprocessing the frame or running the model failed.
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    /// A method name other than `rollout` and `last-layer` was parsed.
    #[error("unknown method {0:?} (expected rollout or last-layer)")]
    Method(String),
    /// A token name other than `cls` and `distillation` was parsed.
    #[error("unknown token {0:?} (expected cls or distillation)")]
    Token(String),
    /// The distillation token's attention was asked of a model without one.
    #[error(
        "the model has no distillation token (only a DeiT, `exporter train --distill-from`, has)"
    )]
    NoDistillationToken,
    /// An attention output is not `[1, tokens, tokens]` over CLS plus a square patch grid, or
    /// its token count differs from the blocks' before it.
    #[error("attention output {index} is {reason}")]
    BadAttention {
        /// Position of the output among the attention outputs (0: the first).
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// One frame's logits and attention, as the model computed them.
#[derive(Clone, Debug)]
pub struct Explanation {
    /// Raw logits, in class order.
    pub logits: Vec<f32>,
    /// Softmax of the logits, in class order.
    pub probabilities: Vec<f32>,
    /// Per block, the `tokens × tokens` head-averaged attention, row-major.
    pub layers: Vec<Vec<f32>>,
    /// Tokens of each block: CLS (and the distillation token), then one per patch.
    pub tokens: usize,
    /// Tokens before the patches: 1, or 2 with a distillation token.
    pub prefix: usize,
}

impl Explanation {
    /// The `k` most probable classes, best first; `k` is capped at [`MAX_TOP_K`](crate::MAX_TOP_K).
    pub fn top(&self, k: usize) -> TopK {
        let mut top = TopK::new();
        top_k_into(&self.probabilities, k.min(crate::MAX_TOP_K), &mut top);
        top
    }

    /// The CLS token's patch map of `method`.
    pub fn map(&self, method: Method) -> PatchMap {
        self.map_for(method, Token::Cls)
            .expect("every model has CLS")
    }

    /// `token`'s patch map of `method`.
    pub fn map_for(&self, method: Method, token: Token) -> Result<PatchMap, ExplainError> {
        let query = self.query(token)?;
        let layers: Vec<&[f32]> = self.layers.iter().map(Vec::as_slice).collect();
        let values = match method {
            Method::Rollout => rollout_from(&layers, self.tokens, self.prefix, query),
            Method::LastLayer => {
                token_row(layers[layers.len() - 1], self.tokens, self.prefix, query)
            }
        };
        Ok(PatchMap::new(values).expect("checked square when explained"))
    }

    /// Each block's own CLS attention (the `--grid` pictures).
    pub fn layer_maps(&self) -> Vec<PatchMap> {
        self.layer_maps_for(Token::Cls)
            .expect("every model has CLS")
    }

    /// Each block's own attention of `token`.
    pub fn layer_maps_for(&self, token: Token) -> Result<Vec<PatchMap>, ExplainError> {
        let query = self.query(token)?;
        Ok(self
            .layers
            .iter()
            .map(|layer| {
                PatchMap::new(token_row(layer, self.tokens, self.prefix, query))
                    .expect("checked square")
            })
            .collect())
    }

    fn query(&self, token: Token) -> Result<usize, ExplainError> {
        match token.index() < self.prefix {
            true => Ok(token.index()),
            false => Err(ExplainError::NoDistillationToken),
        }
    }
}

/// What token `query` attends to, over the patches (the tokens after the `prefix` ones).
fn token_row(attention: &[f32], tokens: usize, prefix: usize, query: usize) -> Vec<f32> {
    attention[query * tokens + prefix..(query + 1) * tokens].to_vec()
}

/// Attention rollout's CLS row over the patches, for `layers` of `tokens × tokens` row-major
/// attention (first block first) of a model whose only token before the patches is CLS.
pub fn rollout(layers: &[&[f32]], tokens: usize) -> Vec<f32> {
    rollout_from(layers, tokens, 1, 0)
}

/// Attention rollout's row of token `query` over the patches (the tokens after `prefix`).
///
/// Only that row of the product is needed, so it is carried from the last block down as a
/// row vector: `O(layers × tokens²)` instead of `O(layers × tokens³)`.
pub fn rollout_from(layers: &[&[f32]], tokens: usize, prefix: usize, query: usize) -> Vec<f32> {
    let n = tokens;
    let mut row = vec![0.0f32; n];
    row[query] = 1.0;
    let mut next = vec![0.0f32; n];
    for attention in layers.iter().rev() {
        next.fill(0.0);
        for (i, &weight) in row.iter().enumerate() {
            if weight == 0.0 {
                continue;
            }
            let a = &attention[i * n..(i + 1) * n];
            let total: f32 = a.iter().sum::<f32>() + 1.0;
            for (j, (out, &v)) in next.iter_mut().zip(a).enumerate() {
                let residual = if i == j { 1.0 } else { 0.0 };
                *out += weight * (v + residual) / total;
            }
        }
        std::mem::swap(&mut row, &mut next);
    }
    row[prefix..].to_vec()
}

/// Runs a model with attention outputs on frames, through the classifier's own path.
pub struct Explainer {
    classifier: Classifier,
}

impl Explainer {
    /// `model` must be loaded with [`crate::ModelOptions::attention`] set.
    pub fn new(model: Model) -> Result<Explainer, ExplainError> {
        if model.attention_layers == 0 {
            return Err(ModelError::NoAttention.into());
        }
        Ok(Explainer {
            classifier: Classifier::new(model, 1)?,
        })
    }

    /// The model being explained.
    pub fn model(&self) -> &Model {
        self.classifier.model()
    }

    /// Classify `frame` and keep every block's attention over it.
    pub fn explain(&mut self, frame: &FrameRef) -> Result<Explanation, ExplainError> {
        self.classifier.preprocess(frame)?;
        let outputs = self.classifier.run()?;
        let mut layers = Vec::with_capacity(outputs.len() - 1);
        let mut tokens = 0;
        for (index, output) in outputs.iter().enumerate().skip(1) {
            let bad = |reason: String| ExplainError::BadAttention {
                index: index - 1,
                reason,
            };
            let shape = output.shape().to_vec();
            match shape[..] {
                [1, n, m] if n == m && n > 1 && (tokens == 0 || n == tokens) => tokens = n,
                [1, n, m] if n == m && n > 1 => {
                    return Err(bad(format!(
                        "over {n} tokens where the layers before it have {tokens}"
                    )));
                }
                _ => return Err(bad(format!("shaped {shape:?}, not [1, tokens, tokens]"))),
            }

            let values = output
                .to_plain_array_view::<f32>()
                .map_err(|e| bad(e.to_string()))?;
            layers.push(values.iter().copied().collect());
        }
        let prefix = self
            .prefix_tokens(tokens)
            .ok_or_else(|| ExplainError::BadAttention {
                index: 0,
                reason: format!(
                    "over {tokens} tokens: CLS (and a distillation token) plus a square patch grid \
                 was expected"
                ),
            })?;
        Ok(Explanation {
            logits: self.classifier.logits().to_vec(),
            probabilities: self.classifier.probabilities().to_vec(),
            layers,
            tokens,
            prefix,
        })
    }

    /// The tokens before the patches: 2 in a model whose metadata says it is a DeiT, else
    /// whichever of 1 (CLS) or 2 (CLS and a distillation token, as timm's DeiT files have)
    /// leaves a square patch grid.
    fn prefix_tokens(&self, tokens: usize) -> Option<usize> {
        let square =
            |patches: usize| tokens > patches && PatchMap::new(vec![0.0; patches]).is_some();
        let architecture = self.model().metadata.get(crate::metadata::ARCHITECTURE);
        let deit = architecture.map(String::as_str) == Some("deit");
        match deit {
            true => square(tokens.checked_sub(2)?).then_some(2),
            false => [1, 2]
                .into_iter()
                .find(|&prefix| tokens > prefix && square(tokens - prefix)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_matches_the_product_worked_by_hand() {
        // 3 tokens (CLS + 2 patches), 2 blocks; rows sum to 1.
        let first = [0.2, 0.6, 0.2, 0.3, 0.3, 0.4, 0.5, 0.25, 0.25];
        let second = [0.4, 0.4, 0.2, 0.1, 0.8, 0.1, 0.2, 0.2, 0.6];
        // Â = (A + I) / 2. CLS row of Â₂ = [0.7, 0.2, 0.1]; times Â₁ =
        // [[0.6, 0.3, 0.1], [0.15, 0.65, 0.2], [0.25, 0.125, 0.625]] gives
        // [0.475, 0.3525, 0.1725]; the patches are the last two.
        let got = rollout(&[&first, &second], 3);
        let want = [0.3525, 0.1725];
        assert!(
            got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6),
            "{got:?}"
        );
        // One block: just the renormalised CLS row of A + I.
        let single = rollout(&[&second], 3);
        assert!((single[0] - 0.2).abs() < 1e-6 && (single[1] - 0.1).abs() < 1e-6);
    }

    #[test]
    fn last_layer_is_the_cls_row_without_cls() {
        assert_eq!(
            token_row(&[0.5, 0.3, 0.2, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], 3, 1, 0),
            [0.3, 0.2]
        );
    }

    #[test]
    fn a_distillation_token_is_read_like_cls_and_skipped_as_a_patch() {
        // 4 tokens: CLS, distillation, 2 patches.
        let attention = [
            0.1, 0.2, 0.3, 0.4, //
            0.4, 0.1, 0.1, 0.4, //
            0.0, 0.0, 1.0, 0.0, //
            0.0, 0.0, 0.0, 1.0,
        ];
        assert_eq!(token_row(&attention, 4, 2, 0), [0.3, 0.4]);
        assert_eq!(token_row(&attention, 4, 2, 1), [0.1, 0.4]);
        // One block: the query's row of (A + I) / 2 over the patches.
        let cls = rollout_from(&[&attention], 4, 2, 0);
        let distillation = rollout_from(&[&attention], 4, 2, 1);
        for (got, want) in [(cls, [0.15, 0.2]), (distillation, [0.05, 0.2])] {
            assert!(
                got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6),
                "{got:?} vs {want:?}"
            );
        }
    }
}
