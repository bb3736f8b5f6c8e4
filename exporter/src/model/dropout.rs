//! Dropout with a cheap mask.
//!
//! burn's `Dropout` draws its mask one element at a time through ChaCha and a generic
//! distribution sampler. The ViT drops attention weights and MLP activations, about 90,000
//! values per 28 px image at patch 4, and drawing them was a third of the training time on CPU.
//! Here the mask comes from SplitMix64 (two draws per 64-bit output) and carries the
//! `1 / keep` scale, so applying it is one multiply. The layer's settings stay in burn's
//! `Dropout` module, so checkpoints are unchanged.

use std::cell::Cell;

use burn::nn::Dropout;
use burn::tensor::{Tensor, TensorData};

thread_local! {
    /// Per thread: each part of a training batch runs on its own thread with its own stream,
    /// and runs training side by side (tests) each get a reproducible one.
    static STREAM: Cell<u64> = const { Cell::new(0) };
}

/// Restart this thread's mask stream; the training loop calls it for each part of a batch, from
/// the epoch's seed and the step, so a resumed epoch drops the same values.
pub fn seed(seed: u64) {
    STREAM.with(|state| state.set(seed));
}

/// `layer` applied to `input`: identity unless it is training on an autodiff device, as in burn.
pub fn forward<const D: usize>(layer: &Dropout, input: Tensor<D>) -> Tensor<D> {
    let device = input.device();
    if !layer.training.is_enabled() || !device.is_autodiff() || layer.prob == 0.0 {
        return input;
    }
    let shape = input.shape();
    let mask = STREAM.with(|state| {
        let mut stream = state.get();
        let mask = keep_mask(shape.num_elements(), 1.0 - layer.prob, &mut stream);
        state.set(stream);
        mask
    });
    input * Tensor::from_data(TensorData::new(mask, shape), &device)
}

/// `len` values, each `1 / keep` with probability `keep` and 0 otherwise.
fn keep_mask(len: usize, keep: f64, stream: &mut u64) -> Vec<f32> {
    let threshold = (keep * 2f64.powi(32)) as u64;
    let scale = (1.0 / keep) as f32;
    let value = |draw: u64| if draw < threshold { scale } else { 0.0 };
    let mut mask = Vec::with_capacity(len + 1);
    while mask.len() < len {
        let bits = split_mix64(stream);
        mask.push(value(bits & 0xffff_ffff));
        mask.push(value(bits >> 32));
    }
    mask.truncate(len);
    mask
}

/// SplitMix64 (Steele, Lea and Flood 2014): fast, and statistically sound for masks.
fn split_mix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::DropoutConfig;
    use burn::tensor::Device;

    #[test]
    fn the_mask_keeps_the_asked_share_and_scales_by_its_inverse() {
        let mut stream = 7;
        for keep in [0.5, 0.9, 0.95] {
            let mask = keep_mask(100_001, keep, &mut stream);
            assert_eq!(mask.len(), 100_001);
            let kept = mask.iter().filter(|&&v| v != 0.0).count() as f64 / mask.len() as f64;
            // 100k Bernoulli draws: the standard deviation of the share is below 0.0016.
            assert!((kept - keep).abs() < 0.01, "kept {kept} of keep {keep}");
            let scale = (1.0 / keep) as f32;
            assert!(mask.iter().all(|&v| v == 0.0 || v == scale));
            // The mean is preserved, which is why kept values are scaled.
            let mean = mask.iter().map(|&v| v as f64).sum::<f64>() / mask.len() as f64;
            assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        }
    }

    #[test]
    fn a_seed_replays_the_same_masks() {
        let layer = DropoutConfig::new(0.5).init();
        let device = Device::flex().autodiff();
        let ones = || Tensor::<2>::ones([8, 64], &device);
        seed(3);
        let first = forward(&layer, ones()).into_data();
        let second = forward(&layer, ones()).into_data();
        seed(3);
        assert_eq!(forward(&layer, ones()).into_data(), first);
        assert_ne!(first, second, "consecutive masks must differ");
    }

    #[test]
    fn it_is_the_identity_outside_training() {
        let layer = DropoutConfig::new(0.5).init();
        let input = Tensor::<2>::ones([4, 4], &Device::flex());
        let output = forward(&layer, input.clone());
        assert_eq!(output.into_data(), input.into_data());
    }
}
