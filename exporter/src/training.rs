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

use crate::data::{
    Augmentation, Batcher, DataError, ImageSet, PreparedSet, Source, Splits, epoch_order,
};
use crate::ema::WeightAverage;
use crate::model::{ConfigError, Preset, ViTConfig, VisionTransformer};
use crate::run_folder::{
    self, CONFIG_FILE, CURVES_FILE, EpochFile, EpochSave, RunState, read_json, write_json,
};
use burn::module::{ModuleVisitor, Param};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;
use runtime::PreprocessConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    pub model: ViTConfig,
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
    pub augmentation: Option<Augmentation>,
    pub backend: String,
    /// Weights the run started from (another run's best), instead of a random initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Decay of the exponential moving average of the weights, updated every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
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
    pub dropout: Option<f64>,
}

impl ModelOverrides {
    fn apply(&self, config: &mut ViTConfig) {
        let set = |field: &mut usize, value: Option<usize>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        set(&mut config.image_size, self.image_size);
        set(&mut config.patch_size, self.patch_size);
        set(&mut config.dim, self.dim);
        set(&mut config.depth, self.depth);
        set(&mut config.heads, self.heads);
        set(&mut config.mlp_dim, self.mlp_dim);
        if let Some(d) = self.dropout {
            config.dropout = d;
        }
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

/// Start a new run in `run_dir` (which must not hold one already).
pub fn train(
    new: NewRun,
    run_dir: &Path,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, TrainError> {
    if run_dir.join(CONFIG_FILE).exists() {
        return Err(TrainError::run(
            run_dir,
            "already holds a run; use --resume to continue it",
        ));
    }
    let splits = Splits::from_folder(&new.data, new.recipe.val_fraction, new.recipe.seed)?;
    progress.message(&format!(
        "{} classes, {} training and {} validation images",
        splits.classes.len(),
        splits.train.len(),
        splits.val.len()
    ));
    // A fine-tuning source that cannot serve is refused before the images are decoded.
    let source = new
        .init_from
        .as_deref()
        .map(|dir| fine_tuning_source(dir, &splits.classes))
        .transpose()?;
    let (train_set, val_set) = load_sets(&splits, progress)?;
    let (preset, model, preprocess, init_from) = match source {
        Some((source, weights)) => {
            let mut model = source.model;
            if let Some(dropout) = new.overrides.dropout {
                model.dropout = dropout;
            }
            (source.preset, model, source.preprocess, Some(weights))
        }
        None => {
            let (model, preprocess) =
                architecture(&new, train_set.all_grey(), splits.classes.len())?;
            (Some(new.preset), model, preprocess, None)
        }
    };
    let channels = model.channels;
    let recipe = new.recipe;
    let config = TrainingConfig {
        data: new.data,
        preset,
        model,
        preprocess,
        classes: splits.classes,
        epochs: recipe.epochs,
        batch_size: recipe.batch_size,
        learning_rate: recipe.learning_rate,
        min_learning_rate: recipe.min_learning_rate,
        weight_decay: recipe.weight_decay,
        warmup_epochs: recipe.warmup_epochs,
        grad_clip: recipe.grad_clip,
        label_smoothing: recipe.label_smoothing,
        seed: recipe.seed,
        val_fraction: recipe.val_fraction,
        augmentation: {
            let augmentation = Augmentation {
                min_area: new
                    .crop_min_area
                    .unwrap_or(Augmentation::default().min_area),
                erase: new.erase.unwrap_or_default(),
                ..Augmentation::default()
            };
            new.augment.unwrap_or(channels == 3).then_some(augmentation)
        },
        backend: new.backend,
        init_from,
        ema: recipe.ema,
    };
    validate_recipe(&config)?;
    let session = restore(&config, run_dir, None, Vec::new(), progress)?;
    run_folder::create(run_dir)?;
    write_json(&run_dir.join(CONFIG_FILE), &config)?;
    run(
        &config,
        run_dir,
        session,
        (train_set, val_set),
        new.stop_after,
        progress,
    )
}

/// The configuration of the run in `dir` and its best weights, checked to fit data with
/// `classes`.
fn fine_tuning_source(
    dir: &Path,
    classes: &[String],
) -> Result<(TrainingConfig, PathBuf), TrainError> {
    let source: TrainingConfig = read_json(&dir.join(CONFIG_FILE))?;
    if source.classes != classes {
        return Err(TrainError::run(
            dir,
            format!(
                "was trained on classes {:?}, the data has {:?}; fine-tuning needs the same",
                source.classes, classes
            ),
        ));
    }
    // The file the source's committed state names: the weights, whichever epoch it trains on to.
    let best = run_folder::read_best(dir)?;
    Ok((source, best.path))
}

/// The model and preprocessing of a run started from `new.preset`: the preset with the
/// overrides, 1 channel for all-grey data unless told otherwise.
fn architecture(
    new: &NewRun,
    all_grey: bool,
    classes: usize,
) -> Result<(ViTConfig, PreprocessConfig), TrainError> {
    let channels = new.channels.unwrap_or(if all_grey { 1 } else { 3 });
    let mut model = new.preset.config(channels, classes);
    new.overrides.apply(&mut model);
    model.validate()?;
    let mut preprocess = PreprocessConfig::new(model.image_size as u32, channels as u32);
    preprocess.resize = new.resize;
    if let Some(mean) = &new.mean {
        preprocess.mean = runtime::preprocess::per_channel(mean.clone(), channels);
    }
    if let Some(std) = &new.std {
        preprocess.std = runtime::preprocess::per_channel(std.clone(), channels);
    }
    preprocess
        .validate()
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    Ok((model, preprocess))
}

/// Continue the run in `run_dir` from its last complete epoch, optionally to more epochs
/// (which stretches the cosine schedule) or for at most `stop_after` epochs of this call.
pub fn resume(
    run_dir: &Path,
    epochs: Option<usize>,
    stop_after: Option<usize>,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, TrainError> {
    // Everything is checked, and the committed epoch loaded, before anything in the run folder
    // changes: a refused resume leaves the run as it was.
    let saved: TrainingConfig = read_json(&run_dir.join(CONFIG_FILE))?;
    let mut config = saved.clone();
    if let Some(epochs) = epochs {
        config.epochs = epochs;
    }
    validate_recipe(&config)?;
    let state = run_folder::resumable_state(run_dir)?;
    let done = state.as_ref().map_or(0, |s| s.epoch);
    if config.epochs < done {
        return Err(TrainError::Invalid(format!(
            "the run has already trained {done} epochs; --epochs must be at least that"
        )));
    }
    let (metrics, stale_metrics) = run_folder::committed_metrics(run_dir, done)?;
    let splits = Splits::from_folder(&config.data, config.val_fraction, config.seed)?;
    if splits.classes != config.classes {
        return Err(DataError::ClassMismatch {
            train: splits.classes,
            val: config.classes,
        }
        .into());
    }
    let sets = load_sets(&splits, progress)?;
    let session = restore(&config, run_dir, state, metrics, progress)?;
    if config != saved {
        write_json(&run_dir.join(CONFIG_FILE), &config)?;
    }
    // Lines of an epoch a crash kept from committing go, so the file matches the state.
    if stale_metrics {
        run_folder::write_metrics(run_dir, &session.metrics)?;
    }
    run_folder::tidy(run_dir, session.state.as_ref());
    run(&config, run_dir, session, sets, stop_after, progress)
}

fn validate_recipe(config: &TrainingConfig) -> Result<(), TrainError> {
    let invalid = |m: &str| Err(TrainError::Invalid(m.to_string()));
    if config.epochs == 0 {
        return invalid("epochs must be positive");
    }
    if config.batch_size == 0 {
        return invalid("batch size must be positive");
    }
    if !(config.learning_rate > 0.0 && config.learning_rate.is_finite()) {
        return invalid("learning rate must be positive");
    }
    if config
        .label_smoothing
        .is_some_and(|s| !(0.0..1.0).contains(&s))
    {
        return invalid("label smoothing must be in [0, 1)");
    }
    if config.grad_clip.is_some_and(|c| c <= 0.0) {
        return invalid("gradient clip norm must be positive");
    }
    if config
        .augmentation
        .is_some_and(|a| !(a.min_area > 0.0 && a.min_area <= 1.0))
    {
        return invalid("the crop's minimum area must be in (0, 1]");
    }
    if config
        .augmentation
        .is_some_and(|a| !(0.0..=1.0).contains(&a.erase))
    {
        return invalid("the erasing probability must be in [0, 1]");
    }
    if config.ema.is_some_and(|d| !(d > 0.0 && d < 1.0)) {
        return invalid("the weight average's decay must be in (0, 1)");
    }
    Ok(())
}

fn load_sets(
    splits: &Splits,
    progress: &mut dyn Progress,
) -> Result<(ImageSet, ImageSet), TrainError> {
    let started = Instant::now();
    let train = ImageSet::load(&splits.train, &|_| {});
    let val = ImageSet::load(&splits.val, &|_| {});
    let skipped = train.skipped.len() + val.skipped.len();
    progress.message(&format!(
        "decoded {} images in {:.1}s, skipped {skipped} unreadable",
        train.len() + val.len(),
        started.elapsed().as_secs_f64()
    ));
    if train.is_empty() {
        return Err(DataError::Empty("the training split".into()).into());
    }
    // An empty validation split is allowed only when asked for (`--val-fraction 0`).
    if val.is_empty() && !splits.val.is_empty() {
        return Err(DataError::Empty("the validation split".into()).into());
    }
    Ok((train, val))
}

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

/// What training continues from: a fresh model and optimizer, or the committed epoch's.
struct Session {
    device: Device,
    train_device: Device,
    model: VisionTransformer,
    optimizer: ModuleOptimizer,
    average: Option<WeightAverage>,
    /// The committed state, `None` before the first epoch.
    state: Option<RunState>,
    /// The committed epochs' metrics.
    metrics: Vec<EpochMetrics>,
}

/// The session `state` names in `run_dir` (a fresh one without a state); reads and checks
/// every file it needs.
fn restore(
    config: &TrainingConfig,
    run_dir: &Path,
    state: Option<RunState>,
    metrics: Vec<EpochMetrics>,
    progress: &mut dyn Progress,
) -> Result<Session, TrainError> {
    let device = crate::backend::device_named(&config.backend).map_err(TrainError::Invalid)?;
    let train_device = device.clone().autodiff();
    device.seed(config.seed);
    let mut model = config.model.init(&train_device)?;
    let mut optimizer = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .init();
    if let Some(state) = &state {
        model = load_weights(model, &run_dir.join(&state.model))?;
        let optimizer_path = run_dir.join(&state.optimizer);
        let bytes =
            std::fs::read(&optimizer_path).map_err(|e| TrainError::run(&optimizer_path, e))?;
        optimizer = optimizer
            .from_bytes(Bytes::from_bytes_vec(bytes))
            .map_err(|e| TrainError::run(&optimizer_path, e))?;
        progress.message(&format!(
            "resuming after epoch {} (step {})",
            state.epoch, state.step
        ));
    } else if let Some(weights) = &config.init_from {
        model = load_weights(model, weights)?;
        progress.message(&format!("starting from {}", weights.display()));
    }
    let average = match (config.ema, &state) {
        (None, _) => None,
        (Some(decay), None) => Some(WeightAverage::new(model.valid(), decay)),
        (Some(decay), Some(state)) => {
            let Some(name) = &state.ema else {
                return Err(TrainError::run(
                    &run_dir.join(run_folder::STATE_FILE),
                    "names no weight average, which the run keeps (ema in config.json)",
                ));
            };
            let saved = load_weights(config.model.init(&device)?, &run_dir.join(name))?;
            Some(WeightAverage::new(saved, decay))
        }
    };
    Ok(Session {
        device,
        train_device,
        model,
        optimizer,
        average,
        state,
        metrics,
    })
}

fn run(
    config: &TrainingConfig,
    run_dir: &Path,
    session: Session,
    (train_set, val_set): (ImageSet, ImageSet),
    stop_after: Option<usize>,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, TrainError> {
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
        let mut lr = config.learning_rate;
        for indices in order.chunks(config.batch_size) {
            let (images, labels) =
                batcher.batch(&train_source, indices, &mut rng, &train_device)?;
            lr = learning_rate(config, step, total_steps, steps_per_epoch);
            let dropout_seed = epoch_seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let BatchOutcome {
                loss: loss_value,
                correct: batch_correct,
                mut grads,
            } = batch_gradients(
                &model,
                &loss_fn,
                images,
                labels,
                rayon::current_num_threads(),
                dropout_seed,
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
        let validate = |model: &VisionTransformer| {
            val.as_ref()
                .map(|val| evaluate(model, val, eval_batch, &device))
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
fn epoch_save<'a>(
    epoch: usize,
    step: usize,
    model: &VisionTransformer,
    optimizer: &ModuleOptimizer,
    average: Option<&VisionTransformer>,
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

fn model_bytes(model: &VisionTransformer) -> Result<Vec<u8>, TrainError> {
    let bytes = model
        .clone()
        .into_record()
        .into_bytes()
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    Ok(bytes.to_vec())
}

/// Load weights into `model`, refusing files that do not match it.
pub fn load_weights(
    model: VisionTransformer,
    path: &Path,
) -> Result<VisionTransformer, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::run(path, e))?;
    load_weights_from(model, bytes, path)
}

/// [`load_weights`] of the content of `path`, already read.
fn load_weights_from(
    model: VisionTransformer,
    bytes: Vec<u8>,
    path: &Path,
) -> Result<VisionTransformer, TrainError> {
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes))
        .map_err(|e| TrainError::run(path, format!("not a readable checkpoint ({e})")))?;
    model
        .try_load_record(record)
        .map_err(|e| TrainError::run(path, format!("checkpoint does not match the model ({e})")))
}

/// Accuracy, loss and confusion matrix of a model on a prepared set.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    pub count: usize,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

pub fn evaluate(
    model: &VisionTransformer,
    set: &PreparedSet,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation, TrainError> {
    let classes = model.head.weight.dims()[1];
    let mut confusion = vec![vec![0; classes]; classes];
    let mut batcher = Batcher::new(&set.config)?;
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut rng = StdRng::seed_from_u64(0);
    let mut loss_sum = 0.0;
    let indices: Vec<usize> = (0..set.len()).collect();
    for chunk in indices.chunks(batch_size) {
        let (images, labels) = batcher.batch(&Source::Prepared(set), chunk, &mut rng, device)?;
        let logits = model.forward(images);
        loss_sum += loss_fn.forward(logits.clone(), labels).into_scalar::<f32>() as f64
            * chunk.len() as f64;
        let predicted = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("argmax is int");
        for (&index, &p) in chunk.iter().zip(&predicted) {
            confusion[set.labels[index]][p as usize] += 1;
        }
    }
    let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
    let count = set.len();
    Ok(Evaluation {
        loss: loss_sum / count as f64,
        accuracy: correct as f64 / count as f64,
        count,
        confusion,
    })
}

/// The loss, correct predictions and gradients of one batch.
struct BatchOutcome {
    /// Mean loss over the batch.
    loss: f64,
    correct: usize,
    grads: GradientsParams,
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
fn batch_gradients(
    model: &VisionTransformer,
    loss_fn: &CrossEntropyLoss,
    images: Tensor<4>,
    labels: Tensor<1, Int>,
    parts: usize,
    dropout_seed: u64,
) -> BatchOutcome {
    let size = labels.dims()[0];
    let part_len = size.div_ceil(parts.clamp(1, size));
    let part = |index: usize| -> BatchOutcome {
        crate::dropout::seed(dropout_seed.wrapping_add(index as u64));
        let (start, len) = (index * part_len, part_len.min(size - index * part_len));
        let replica = model.clone().fork(&images.device());
        let labels = labels.clone().narrow(0, start, len);
        let logits = replica.forward(images.clone().narrow(0, start, len));
        let loss = loss_fn.forward(logits.clone(), labels.clone());
        let correct = count_correct(logits.detach(), labels);
        let share = len as f64 / size as f64;
        let loss_value = loss.clone().into_scalar::<f32>() as f64 * share;
        let grads = GradientsParams::from_grads(loss.mul_scalar(share).backward(), &replica);
        BatchOutcome {
            loss: loss_value,
            correct,
            grads,
        }
    };
    let parts = size.div_ceil(part_len);
    if parts == 1 {
        return part(0);
    }
    // Collected in part order, so the sums are the same on every run.
    let outcomes: Vec<BatchOutcome> = (0..parts).into_par_iter().map(part).collect();
    let mut sum = GradientsAccumulator::<VisionTransformer>::new();
    let (mut loss, mut correct) = (0.0, 0);
    for outcome in outcomes {
        loss += outcome.loss;
        correct += outcome.correct;
        sum.accumulate(model, outcome.grads);
    }
    BatchOutcome {
        loss,
        correct,
        grads: sum.grads(),
    }
}

fn count_correct(logits: Tensor<2>, labels: Tensor<1, Int>) -> usize {
    let [batch, _] = logits.dims();
    let predicted = logits.argmax(1).reshape([batch]);
    predicted.equal(labels).int().sum().into_scalar::<i64>() as usize
}

/// Scale all gradients so their global L2 norm is at most `max_norm`, as PyTorch's
/// `clip_grad_norm_` does (burn's own clipping is per parameter).
fn clip_global_norm(model: &VisionTransformer, grads: &mut GradientsParams, max_norm: f64) {
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

/// A run's result as eval and export read it, from its one committed state: the configuration,
/// the best weights (the latest epoch's in runs without validation) and their figures.
pub struct RunResult {
    pub config: TrainingConfig,
    pub model: VisionTransformer,
    /// Absent only in runs of older versions that lack `best.json`.
    pub best: Option<BestCheckpoint>,
}

/// The run in `run_dir` as [`RunResult`]: its best weights, loaded, with their figures.
pub fn load_result(run_dir: &Path, device: &Device) -> Result<RunResult, TrainError> {
    let config: TrainingConfig = read_json(&run_dir.join(CONFIG_FILE))?;
    let best = run_folder::read_best(run_dir)?;
    let model = load_weights_from(config.model.init(device)?, best.bytes, &best.path)?;
    Ok(RunResult {
        config,
        model,
        best: best.figures,
    })
}

/// The configuration and best weights of a finished (or interrupted) run, ready for eval or
/// export.
pub fn load_run(
    run_dir: &Path,
    device: &Device,
) -> Result<(TrainingConfig, VisionTransformer), TrainError> {
    let result = load_result(run_dir, device)?;
    Ok((result.config, result.model))
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let model = Preset::Tiny.config(1, 3).init(&device).unwrap();
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
            let summed =
                batch_gradients(&model, &loss_fn, images.clone(), labels.clone(), parts, 1);
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
