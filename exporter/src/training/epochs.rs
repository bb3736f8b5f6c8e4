//! The epochs: batches split across the cores, gradient clipping, the learning-rate schedule,
//! validation, and what each epoch commits to the run folder.

use super::checkpoints::Session;
use super::distill::{self, Method, Teacher};
use super::ema::WeightAverage;
use super::run_folder::{self, CURVES_FILE, EpochFile, EpochSave, RunState};
use super::{
    BestCheckpoint, EpochMetrics, Progress, TrainError, TrainSummary, TrainingConfig, evaluate,
};
use crate::data::{Batcher, ImageSet, PreparedSet, Source, epoch_order};
use crate::model::{BatchStatistics, ImageClassifier};
use burn::module::{ModuleVisitor, Param};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;

/// Learning rate at `step`: linear warm-up, then cosine decay to `min_learning_rate`.
pub fn learning_rate(
    config: &TrainingConfig,
    step: usize,
    total_steps: usize,
    steps_per_epoch: usize,
) -> f64 {
    let warmup = (config.warmup_epochs * steps_per_epoch as f64).round() as usize;
    if step < warmup {
        return config.learning_rate * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total_steps.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    config.min_learning_rate + (config.learning_rate - config.min_learning_rate) * cosine
}

pub(super) fn run<M: ImageClassifier>(
    config: &TrainingConfig,
    run_dir: &Path,
    session: Session<M>,
    (train_set, val_set): (ImageSet, ImageSet),
    stop_after: Option<usize>,
    mut teacher: Option<Teacher>,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, TrainError> {
    let method = config.distillation.as_ref().map(|d| d.method);
    let skipped = train_set.skipped.len() + val_set.skipped.len();
    let Session {
        device,
        train_device,
        mut model,
        mut optimizer,
        mut average,
        mut state,
        mut metrics,
    } = session;
    let start_epoch = state.as_ref().map_or(0, |s| s.epoch);
    let mut step = state.as_ref().map_or(0, |s| s.step);
    let mut best_accuracy = state.as_ref().and_then(|s| s.best.val_accuracy);

    let prepared_train = match config.augmentation {
        None => Some(PreparedSet::new(&train_set, &config.preprocess)?),
        Some(_) => None,
    };
    let train_source = match (&prepared_train, config.augmentation) {
        (Some(prepared), _) => Source::Prepared(prepared),
        (None, Some(augmentation)) => Source::Augmented {
            set: &train_set,
            augmentation,
        },
        (None, None) => unreachable!("a prepared set exists whenever augmentation is off"),
    };
    let val = match val_set.is_empty() {
        true => None,
        false => Some(PreparedSet::new(&val_set, &config.preprocess)?),
    };
    let mut batcher = Batcher::new(&config.preprocess)?;
    let loss_fn = CrossEntropyLossConfig::new()
        .with_smoothing(config.label_smoothing)
        .init(&train_device);
    let steps_per_epoch = train_source.len().div_ceil(config.batch_size);
    let total_steps = steps_per_epoch * config.epochs;

    let end_epoch = stop_after.map_or(config.epochs, |n| config.epochs.min(start_epoch + n));
    for epoch in start_epoch..end_epoch {
        // Seeding per epoch (and dropout per step, from `epoch_seed`) makes dropout and
        // augmentation of a resumed epoch identical.
        let epoch_seed = config.seed.wrapping_add(epoch as u64 + 1);
        device.seed(epoch_seed);
        let mut rng = StdRng::seed_from_u64(config.seed.wrapping_add(1000 + epoch as u64));
        let order = epoch_order(train_source.len(), config.seed, epoch);
        progress.epoch_started(epoch + 1, config.epochs, steps_per_epoch);
        let started = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        let mut teacher_seconds = 0.0;
        let mut lr = config.learning_rate;
        for indices in order.chunks(config.batch_size) {
            let (images, labels) =
                batcher.batch(&train_source, indices, &mut rng, &train_device)?;
            lr = learning_rate(config, step, total_steps, steps_per_epoch);
            let teacher_logits = match &mut teacher {
                Some(teacher) => {
                    let started = Instant::now();
                    let logits = teacher.logits(&images)?;
                    teacher_seconds += started.elapsed().as_secs_f64();
                    Some(logits)
                }
                None => None,
            };
            let dropout_seed = epoch_seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let BatchOutcome {
                loss: loss_value,
                correct: batch_correct,
                mut grads,
                statistics,
            } = batch_gradients(
                &model,
                &loss_fn,
                images,
                labels,
                rayon::current_num_threads(),
                dropout_seed,
                teacher_logits.as_ref().zip(method),
            );
            if !loss_value.is_finite() {
                return Err(TrainError::Invalid(format!(
                    "loss became {loss_value} at step {step}; lower the learning rate"
                )));
            }
            if let Some(max_norm) = config.grad_clip {
                clip_global_norm(&model, &mut grads, max_norm);
            }
            model = optimizer.step(lr, model, grads);
            model.update_statistics(&statistics);
            if let Some(average) = &mut average {
                average.update(&model.valid());
            }
            step += 1;
            loss_sum += loss_value * indices.len() as f64;
            correct += batch_correct;
            seen += indices.len();
            let speed = seen as f64 / started.elapsed().as_secs_f64();
            progress.step(
                loss_value,
                batch_correct as f64 / indices.len() as f64,
                speed,
            );
        }
        let epoch_seconds = started.elapsed().as_secs_f64();
        let eval_batch = config.batch_size.max(64);
        let validate = |model: &M| {
            val.as_ref()
                .map(|val| evaluate(|images| model.forward(images), val, eval_batch, &device))
                .transpose()
        };
        let evaluation = validate(&model.valid())?;
        let average_evaluation = match &average {
            Some(average) => validate(average.model())?,
            None => None,
        };
        let epoch_metrics = EpochMetrics {
            epoch: epoch + 1,
            step,
            learning_rate: lr,
            train_loss: loss_sum / seen as f64,
            train_accuracy: correct as f64 / seen as f64,
            val_loss: evaluation.as_ref().map(|e| e.loss),
            val_accuracy: evaluation.as_ref().map(|e| e.accuracy),
            images_per_second: seen as f64 / epoch_seconds,
            epoch_seconds,
            ema_val_loss: average_evaluation.as_ref().map(|e| e.loss),
            ema_val_accuracy: average_evaluation.as_ref().map(|e| e.accuracy),
            teacher_seconds: teacher.is_some().then_some(teacher_seconds),
        };
        metrics.push(epoch_metrics.clone());
        let selected = average_evaluation.as_ref().or(evaluation.as_ref());
        let new_best = match selected {
            Some(s) => best_accuracy.is_none_or(|best| s.accuracy > best),
            None => true,
        };
        if new_best {
            best_accuracy = selected.map(|s| s.accuracy);
        }
        let save = epoch_save(
            epoch + 1,
            step,
            &model,
            &optimizer,
            average.as_ref().map(WeightAverage::model),
            match (new_best, &state) {
                (false, Some(state)) => Best::Kept(state),
                _ => Best::New(BestCheckpoint {
                    epoch: epoch + 1,
                    val_accuracy: selected.map(|s| s.accuracy),
                    val_loss: selected.map(|s| s.loss),
                }),
            },
            &metrics,
        )?;
        run_folder::commit(run_dir, &save)?;
        state = Some(save.state);
        progress.epoch_finished(&epoch_metrics);
    }
    if let Err(e) = crate::plots::accuracy_curves(&metrics, &run_dir.join(CURVES_FILE)) {
        log::warn!("could not draw the accuracy curves: {e}");
    }
    Ok(TrainSummary {
        run_dir: run_dir.to_path_buf(),
        epochs: metrics,
        best: state.map(|s| s.best),
        steps: step,
        train_images: train_set.len(),
        val_images: val_set.len(),
        skipped_images: skipped,
    })
}

/// Which weights an epoch commits as the run's best.
enum Best<'a> {
    /// This epoch's (the average's, with one), with these figures.
    New(BestCheckpoint),
    /// An earlier epoch's, as the previous state names them.
    Kept(&'a RunState),
}

/// Everything epoch `epoch` (counting from 1) writes, ready for [`run_folder::commit`].
fn epoch_save<'a, M: ImageClassifier>(
    epoch: usize,
    step: usize,
    model: &M,
    optimizer: &ModuleOptimizer,
    average: Option<&M>,
    best: Best,
    metrics: &'a [EpochMetrics],
) -> Result<EpochSave<'a>, TrainError> {
    let weights = model_bytes(model)?;
    let average_weights = average.map(model_bytes).transpose()?;
    let optimizer_bytes = optimizer
        .into_bytes()
        .map_err(|e| TrainError::Invalid(format!("cannot record the optimizer ({e})")))?;
    let mut files = Vec::new();
    let (best_weights, best) = match best {
        Best::New(figures) => {
            let name = EpochFile::Best.name(epoch);
            let result = average_weights.as_ref().unwrap_or(&weights).clone();
            files.push((name.clone(), result));
            (name, figures)
        }
        Best::Kept(previous) => (previous.best_weights.clone(), previous.best.clone()),
    };
    let state = RunState {
        epoch,
        step,
        model: EpochFile::Model.name(epoch),
        optimizer: EpochFile::Optimizer.name(epoch),
        ema: average_weights
            .is_some()
            .then(|| EpochFile::Average.name(epoch)),
        best_weights,
        best,
    };
    files.push((state.model.clone(), weights));
    files.push((state.optimizer.clone(), optimizer_bytes.to_vec()));
    if let (Some(name), Some(bytes)) = (&state.ema, average_weights) {
        files.push((name.clone(), bytes));
    }
    Ok(EpochSave {
        files,
        metrics,
        state,
    })
}

fn model_bytes(model: &impl Module) -> Result<Vec<u8>, TrainError> {
    let bytes = model
        .clone()
        .into_record()
        .into_bytes()
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    Ok(bytes.to_vec())
}

/// The loss, correct predictions and gradients of one batch.
struct BatchOutcome {
    /// Mean loss over the batch.
    loss: f64,
    correct: usize,
    grads: GradientsParams,
    /// Each part's normalisation statistics, in part order.
    statistics: Vec<Vec<BatchStatistics>>,
}

/// The gradients of one batch, computed in `parts` parts on the cores and summed (the training
/// loop asks for one per core).
///
/// burn runs every element-wise operation on the thread that calls it and only spreads the
/// matrix products over the cores, so one graph per batch left a core idle for most of each
/// step (measured on two cores: the caller's thread held 54 % of the samples, the products
/// 45 %). Each part runs on its own replica of the model (same parameters, its own autodiff
/// graph) and scales its loss by its share of the batch, so the summed gradients are exactly
/// the whole batch's. Part `i` seeds its dropout with `dropout_seed + i`, so a resumed epoch
/// drops the same values whichever thread runs which part.
///
/// With `teacher` (its logits for these images, and how to learn from them), the loss is
/// DeiT's ([`distill`]) and the predictions counted are the two heads' mean.
fn batch_gradients<M: ImageClassifier>(
    model: &M,
    loss_fn: &CrossEntropyLoss,
    images: Tensor<4>,
    labels: Tensor<1, Int>,
    parts: usize,
    dropout_seed: u64,
    teacher: Option<(&Tensor<2>, Method)>,
) -> BatchOutcome {
    let size = labels.dims()[0];
    let part_len = size.div_ceil(parts.clamp(1, size));
    let part = |index: usize| -> BatchOutcome {
        crate::dropout::seed(dropout_seed.wrapping_add(index as u64));
        let (start, len) = (index * part_len, part_len.min(size - index * part_len));
        let replica = model.clone().fork(&images.device());
        let labels = labels.clone().narrow(0, start, len);
        let output = replica.forward_train(images.clone().narrow(0, start, len));
        let mut loss = loss_fn.forward(output.logits.clone(), labels.clone());
        let mut predicted = output.logits;
        if let (Some((teacher, method)), Some(distillation)) = (teacher, output.distillation) {
            let (label_weight, teacher_weight) = distill::weights(method);
            let teacher = teacher.clone().narrow(0, start, len);
            let distilled = distill::distillation_loss(method, distillation.clone(), teacher);
            loss = loss.mul_scalar(label_weight) + distilled.mul_scalar(teacher_weight);
            predicted = (predicted + distillation).mul_scalar(0.5);
        }
        let correct = count_correct(predicted.detach(), labels);
        let statistics = output.statistics;
        let share = len as f64 / size as f64;
        let loss_value = loss.clone().into_scalar::<f32>() as f64 * share;
        let grads = GradientsParams::from_grads(loss.mul_scalar(share).backward(), &replica);
        BatchOutcome {
            loss: loss_value,
            correct,
            grads,
            statistics: vec![statistics],
        }
    };
    let parts = size.div_ceil(part_len);
    if parts == 1 {
        return part(0);
    }
    // Collected in part order, so the sums are the same on every run.
    let outcomes: Vec<BatchOutcome> = (0..parts).into_par_iter().map(part).collect();
    let mut sum = GradientsAccumulator::<M>::new();
    let (mut loss, mut correct, mut statistics) = (0.0, 0, Vec::with_capacity(parts));
    for outcome in outcomes {
        loss += outcome.loss;
        correct += outcome.correct;
        sum.accumulate(model, outcome.grads);
        statistics.extend(outcome.statistics);
    }
    BatchOutcome {
        loss,
        correct,
        grads: sum.grads(),
        statistics,
    }
}

fn count_correct(logits: Tensor<2>, labels: Tensor<1, Int>) -> usize {
    let [batch, _] = logits.dims();
    let predicted = logits.argmax(1).reshape([batch]);
    predicted.equal(labels).int().sum().into_scalar::<i64>() as usize
}

/// Scale all gradients so their global L2 norm is at most `max_norm`, as PyTorch's
/// `clip_grad_norm_` does (burn's own clipping is per parameter).
fn clip_global_norm(model: &impl Module, grads: &mut GradientsParams, max_norm: f64) {
    struct SquaredNorm<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SquaredNorm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.grads.get::<D>(param.id) {
                let squared = grad.square().sum();
                self.total = Some(match self.total.take() {
                    Some(total) => total + squared,
                    None => squared,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: Tensor<1>,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.grads.remove::<D>(param.id) {
                let factor = self.factor.clone().reshape([1; D]);
                self.grads.register(param.id, grad * factor);
            }
        }
    }
    let mut norm = SquaredNorm { grads, total: None };
    model.visit(&mut norm);
    let Some(total) = norm.total else { return };
    // min(1, max_norm / (norm + 1e-6)) stays on the device: no sync per step.
    let factor = total
        .sqrt()
        .add_scalar(1e-6)
        .recip()
        .mul_scalar(max_norm)
        .clamp_max(1.0);
    model.visit(&mut Scale { grads, factor });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, Preset, VisionTransformer};
    use burn::tensor::Distribution;

    /// Every parameter's gradient as plain numbers, in visiting order.
    fn flatten(model: &VisionTransformer, grads: &GradientsParams) -> Vec<Vec<f32>> {
        struct Collect<'a> {
            grads: &'a GradientsParams,
            out: Vec<Vec<f32>>,
        }
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let grad = self
                    .grads
                    .get::<D>(param.id)
                    .expect("every parameter has a gradient");
                self.out.push(
                    grad.into_data()
                        .convert::<f32>()
                        .try_to_vec::<f32>()
                        .unwrap(),
                );
            }
        }
        let mut collect = Collect {
            grads,
            out: Vec::new(),
        };
        model.visit(&mut collect);
        collect.out
    }

    #[test]
    fn the_parts_give_the_whole_batch_gradient() {
        let device = crate::backend::device().autodiff();
        let ModelConfig::Vit(config) = Preset::Tiny.config(1, 3) else {
            unreachable!("tiny is a ViT")
        };
        let model = config.init(&device).unwrap();
        let loss_fn = CrossEntropyLossConfig::new()
            .with_smoothing(Some(0.1))
            .init(&device);
        // An odd batch, so the parts' loss shares differ (3 + 2, and 2 + 2 + 1 images).
        let images = Tensor::<4>::random([5, 1, 16, 16], Distribution::Normal(0.0, 1.0), &device);
        let labels = Tensor::<1, Int>::from_data([0, 2, 1, 1, 0], &device);

        let logits = model.forward(images.clone());
        let whole_loss = loss_fn.forward(logits.clone(), labels.clone());
        let whole_correct = count_correct(logits.detach(), labels.clone());
        let whole_loss_value = whole_loss.clone().into_scalar::<f32>() as f64;
        let whole = flatten(
            &model,
            &GradientsParams::from_grads(whole_loss.backward(), &model),
        );

        for parts in [2, 3] {
            let summed = batch_gradients(
                &model,
                &loss_fn,
                images.clone(),
                labels.clone(),
                parts,
                1,
                None,
            );
            assert!(
                (summed.loss - whole_loss_value).abs() < 1e-5,
                "{parts} parts"
            );
            assert_eq!(summed.correct, whole_correct);
            let summed = flatten(&model, &summed.grads);
            assert_eq!(whole.len(), summed.len());
            for (w, h) in whole.iter().zip(&summed) {
                for (a, b) in w.iter().zip(h) {
                    assert!(
                        (a - b).abs() <= 1e-5 + 1e-4 * a.abs(),
                        "{parts} parts: {a} vs {b}"
                    );
                }
            }
        }
    }
}
