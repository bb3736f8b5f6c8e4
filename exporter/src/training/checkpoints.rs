//! Reading a run folder's committed state back: the session training continues from, and
//! the best weights eval and export load.

use super::ema::WeightAverage;
use super::run_folder::{self, CONFIG_FILE, RunState, read_json};
use super::{BestCheckpoint, EpochMetrics, Progress, TrainError, TrainingConfig};
use crate::model::{ConfigError, ImageClassifier, ModelConfig, TrainedModel};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::prelude::*;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use std::path::Path;

/// What training continues from: a fresh model and optimizer, or the committed epoch's.
pub(super) struct Session<M> {
    pub(super) device: Device,
    pub(super) train_device: Device,
    pub(super) model: M,
    pub(super) optimizer: ModuleOptimizer,
    pub(super) average: Option<WeightAverage<M>>,
    /// The committed state, `None` before the first epoch.
    pub(super) state: Option<RunState>,
    /// The committed epochs' metrics.
    pub(super) metrics: Vec<EpochMetrics>,
}

/// The session `state` names in `run_dir` (a fresh one without a state), of the models `init`
/// makes; reads and checks every file it needs.
pub(super) fn restore<M: ImageClassifier>(
    config: &TrainingConfig,
    init: impl Fn(&Device) -> Result<M, ConfigError>,
    run_dir: &Path,
    state: Option<RunState>,
    metrics: Vec<EpochMetrics>,
    progress: &mut dyn Progress,
) -> Result<Session<M>, TrainError> {
    let device = crate::backend::device_named(&config.backend).map_err(TrainError::Invalid)?;
    let train_device = device.clone().autodiff();
    device.seed(config.seed);
    let mut model = init(&train_device)?;
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
            let saved = load_weights(init(&device)?, &run_dir.join(name))?;
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

/// Load weights into `model`, refusing files that do not match it.
pub fn load_weights<M: Module>(model: M, path: &Path) -> Result<M, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::run(path, e))?;
    load_weights_from(model, bytes, path)
}

/// [`load_weights`] of the content of `path`, already read.
fn load_weights_from<M: Module>(model: M, bytes: Vec<u8>, path: &Path) -> Result<M, TrainError> {
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes))
        .map_err(|e| TrainError::run(path, format!("not a readable checkpoint ({e})")))?;
    model
        .try_load_record(record)
        .map_err(|e| TrainError::run(path, format!("checkpoint does not match the model ({e})")))
}

/// A model of the architecture `config` describes, with the weights in `path`.
pub fn load_model(
    config: &ModelConfig,
    path: &Path,
    device: &Device,
) -> Result<TrainedModel, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::run(path, e))?;
    load_model_from(config, bytes, path, device)
}

fn load_model_from(
    config: &ModelConfig,
    bytes: Vec<u8>,
    path: &Path,
    device: &Device,
) -> Result<TrainedModel, TrainError> {
    Ok(match config.init(device)? {
        TrainedModel::Vit(model) => TrainedModel::Vit(load_weights_from(model, bytes, path)?),
        TrainedModel::Cnn(model) => TrainedModel::Cnn(load_weights_from(model, bytes, path)?),
        TrainedModel::Swin(model) => TrainedModel::Swin(load_weights_from(model, bytes, path)?),
    })
}

/// A run's result as eval and export read it, from its one committed state: the configuration,
/// the best weights (the latest epoch's in runs without validation) and their figures.
pub struct RunResult {
    pub config: TrainingConfig,
    pub model: TrainedModel,
    /// Absent only in runs of older versions that lack `best.json`.
    pub best: Option<BestCheckpoint>,
}

/// The run in `run_dir` as [`RunResult`]: its best weights, loaded, with their figures.
pub fn load_result(run_dir: &Path, device: &Device) -> Result<RunResult, TrainError> {
    let config: TrainingConfig = read_json(&run_dir.join(CONFIG_FILE))?;
    let best = run_folder::read_best(run_dir)?;
    let model = load_model_from(&config.model, best.bytes, &best.path, device)?;
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
) -> Result<(TrainingConfig, TrainedModel), TrainError> {
    let result = load_result(run_dir, device)?;
    Ok((result.config, result.model))
}
