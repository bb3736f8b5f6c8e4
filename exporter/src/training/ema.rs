//! Exponential moving average of the weights (Polyak averaging, as timm's `ModelEmaV2`).
//!
//! After every optimizer step the average moves towards the trained weights by `1 - decay`.
//! It smooths out the last steps' noise, which at a small learning rate is most of what
//! separates one epoch's validation score from the next.

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;

pub struct WeightAverage<M> {
    decay: f64,
    average: M,
}

impl<M: Module> WeightAverage<M> {
    /// An average that starts at `model` (on the device it will be evaluated on).
    pub fn new(model: M, decay: f64) -> Self {
        WeightAverage {
            decay,
            average: model,
        }
    }

    /// `average = decay * average + (1 - decay) * current`, parameter by parameter.
    pub fn update(&mut self, current: &M) {
        // Both modules have the same structure, so their parameters come in the same order;
        // ids are not used because a resumed average is loaded from its own file.
        struct Collect(Vec<Tensor<1>>);
        impl ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let value = param.val();
                let len = value.shape().num_elements();
                self.0.push(value.reshape([len]));
            }
        }
        struct Blend {
            current: std::vec::IntoIter<Tensor<1>>,
            decay: f64,
        }
        impl ModuleMapper for Blend {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let current = self.current.next().expect("same module structure");
                let decay = self.decay;
                param.map(|average| {
                    let dims = average.dims();
                    average.mul_scalar(decay) + current.reshape(dims).mul_scalar(1.0 - decay)
                })
            }
        }
        let mut collect = Collect(Vec::new());
        current.visit(&mut collect);
        let average = self.average.clone();
        self.average = average.map(&mut Blend {
            current: collect.0.into_iter(),
            decay: self.decay,
        });
    }

    pub fn model(&self) -> &M {
        &self.average
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, Preset, TrainedModel};

    fn flat(model: &impl Module) -> Vec<f32> {
        struct Flatten(Vec<f32>);
        impl ModuleVisitor for Flatten {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let data = param.val().into_data().convert::<f32>();
                self.0.extend(data.iter::<f32>());
            }
        }
        let mut flatten = Flatten(Vec::new());
        model.visit(&mut flatten);
        flatten.0
    }

    fn moves_every_weight_by_one_minus_decay<M: Module>(start: M, trained: M) {
        let (a, b) = (flat(&start), flat(&trained));
        assert_ne!(a, b);
        let mut average = WeightAverage::new(start, 0.75);
        average.update(&trained);
        let once = flat(average.model());
        for ((x, y), z) in a.iter().zip(&b).zip(&once) {
            assert!((0.75 * x + 0.25 * y - z).abs() < 1e-6, "{x} {y} {z}");
        }
        average.update(&trained);
        let twice = flat(average.model());
        for ((x, y), z) in a.iter().zip(&b).zip(&twice) {
            let expected = 0.5625 * x + 0.4375 * y;
            assert!((expected - z).abs() < 1e-6, "{x} {y} {z}");
        }
    }

    #[test]
    fn each_update_moves_every_weight_by_one_minus_decay() {
        let device = crate::backend::device();
        for preset in [Preset::Tiny, Preset::CnnTiny] {
            let config = preset.config(1, 3);
            device.seed(1);
            let start = config.init(&device).unwrap();
            device.seed(2);
            let trained = config.init(&device).unwrap();
            match (config, start, trained) {
                (ModelConfig::Vit(_), TrainedModel::Vit(a), TrainedModel::Vit(b)) => {
                    moves_every_weight_by_one_minus_decay(a, b)
                }
                (ModelConfig::Cnn(_), TrainedModel::Cnn(a), TrainedModel::Cnn(mut b)) => {
                    // Fresh running statistics are equal; the average must move them too.
                    let shifted = b.stem.norm.running_mean.value().add_scalar(1.0);
                    b.stem.norm.running_mean = burn::module::RunningState::new(shifted);
                    moves_every_weight_by_one_minus_decay(a, b)
                }
                _ => unreachable!(),
            }
        }
    }
}
