//! Starting a run (new, or fine-tuning another run's weights) and resuming one: the checks
//! of the recipe and data, then the epochs.

use super::EpochMetrics;
use super::checkpoints::restore;
use super::distill::{self, Distillation, Method, TEACHER_FILE, Teacher};
use super::epochs::run;
use super::run_folder::RunState;
use super::run_folder::{self, CONFIG_FILE, read_json, write_json};
use super::{NewRun, Progress, TrainError, TrainSummary, TrainingConfig};
use crate::data::{Augmentation, DataError, ImageSet, Splits};
use crate::model::{ImageClassifier, ModelConfig};
use runtime::PreprocessConfig;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    let splits = splits(
        &new.data,
        new.recipe.val_fraction,
        new.recipe.train_fraction,
        new.recipe.seed,
    )?;
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
                model.set_dropout(dropout);
            }
            (source.preset, model, source.preprocess, Some(weights))
        }
        None => {
            let (model, preprocess) =
                architecture(&new, train_set.all_grey(), splits.classes.len())?;
            (Some(new.preset), model, preprocess, None)
        }
    };
    let mut model = model;
    let teacher = match &new.distill_from {
        Some(source) => {
            let ModelConfig::Vit(vit) = &mut model else {
                return Err(TrainError::Invalid(
                    "distillation trains a ViT's distillation token, which only a ViT has".into(),
                ));
            };
            if init_from.is_some() && !vit.distillation_token {
                return Err(TrainError::Invalid(
                    "--distill-from with --init-from needs a source run that was distilled too \
                     (its model has the distillation token)"
                        .into(),
                ));
            }
            vit.distillation_token = true;
            Some(load_teacher(
                source,
                &preprocess,
                &splits.classes,
                progress,
            )?)
        }
        None if matches!(&model, ModelConfig::Vit(vit) if vit.distillation_token) => {
            return Err(TrainError::Invalid(
                "the source run was distilled: fine-tuning it needs a teacher (--distill-from)"
                    .into(),
            ));
        }
        None => None,
    };
    let distillation = teacher.as_ref().map(|teacher| Distillation {
        method: new.distillation,
        teacher: new.distill_from.clone().expect("a teacher has a source"),
        teacher_fingerprint: distill::fingerprint(teacher.bytes()),
        teacher_architecture: teacher.architecture.clone(),
        teacher_preset: teacher.preset.clone(),
    });
    let channels = model.channels();
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
        train_fraction: recipe.train_fraction,
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
        distillation,
    };
    validate_recipe(&config)?;
    let start = Start {
        run_dir,
        state: None,
        metrics: Vec::new(),
        sets: (train_set, val_set),
        stop_after: new.stop_after,
        teacher,
    };
    restore_and_run(&config, start, progress, |config, _, teacher| {
        run_folder::create(run_dir)?;
        if let Some(teacher) = teacher {
            let path = run_dir.join(TEACHER_FILE);
            runtime::write_atomic(&path, teacher.bytes()).map_err(|e| TrainError::run(&path, e))?;
        }
        write_json(&run_dir.join(CONFIG_FILE), config)
    })
}

/// The teacher at `source`: an ONNX file, or a run folder, whose best weights are exported
/// (and verified) for the purpose.
fn load_teacher(
    source: &Path,
    preprocess: &PreprocessConfig,
    classes: &[String],
    progress: &mut dyn Progress,
) -> Result<Teacher, TrainError> {
    let bytes = if source.is_dir() {
        progress.message(&format!("exporting the teacher run {}", source.display()));
        crate::export::export_bytes(source, &Default::default())
            .map_err(|e| TrainError::run(source, e))?
            .0
    } else {
        std::fs::read(source).map_err(|e| TrainError::run(source, e))?
    };
    Teacher::new(bytes, source, preprocess, classes)
}

/// Where a call of [`train`] or [`resume`] starts from.
struct Start<'a> {
    run_dir: &'a Path,
    state: Option<RunState>,
    metrics: Vec<EpochMetrics>,
    sets: (ImageSet, ImageSet),
    stop_after: Option<usize>,
    teacher: Option<Teacher>,
}

/// Restore the session of the run's architecture, call `prepare` (which may write to the run
/// folder: everything has been read and checked by then), and train.
fn restore_and_run(
    config: &TrainingConfig,
    start: Start,
    progress: &mut dyn Progress,
    prepare: impl FnOnce(&TrainingConfig, &Restored, Option<&Teacher>) -> Result<(), TrainError>,
) -> Result<TrainSummary, TrainError> {
    fn with<M: ImageClassifier>(
        config: &TrainingConfig,
        init: impl Fn(&burn::prelude::Device) -> Result<M, crate::model::ConfigError>,
        start: Start,
        progress: &mut dyn Progress,
        prepare: impl FnOnce(&TrainingConfig, &Restored, Option<&Teacher>) -> Result<(), TrainError>,
    ) -> Result<TrainSummary, TrainError> {
        let session = restore(
            config,
            init,
            start.run_dir,
            start.state,
            start.metrics,
            progress,
        )?;
        prepare(
            config,
            &Restored {
                state: session.state.as_ref(),
                metrics: &session.metrics,
            },
            start.teacher.as_ref(),
        )?;
        run(
            config,
            start.run_dir,
            session,
            start.sets,
            start.stop_after,
            start.teacher,
            progress,
        )
    }
    match &config.model {
        ModelConfig::Vit(model) => with(config, |d| model.init(d), start, progress, prepare),
        ModelConfig::Cnn(model) => with(config, |d| model.init(d), start, progress, prepare),
        ModelConfig::Swin(model) => with(config, |d| model.init(d), start, progress, prepare),
    }
}

/// What a restored session holds of the run folder, for the writes before training.
struct Restored<'a> {
    state: Option<&'a RunState>,
    metrics: &'a [EpochMetrics],
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
) -> Result<(ModelConfig, PreprocessConfig), TrainError> {
    let channels = new.channels.unwrap_or(if all_grey { 1 } else { 3 });
    let mut model = new.preset.config(channels, classes);
    new.overrides.apply(&mut model)?;
    model.validate()?;
    let mut preprocess = PreprocessConfig::new(model.image_size() as u32, channels as u32);
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
    let splits = splits(
        &config.data,
        config.val_fraction,
        config.train_fraction,
        config.seed,
    )?;
    if splits.classes != config.classes {
        return Err(DataError::ClassMismatch {
            train: splits.classes,
            val: config.classes,
        }
        .into());
    }
    let teacher = match &config.distillation {
        Some(distillation) => {
            let path = run_dir.join(TEACHER_FILE);
            let bytes = std::fs::read(&path).map_err(|e| TrainError::run(&path, e))?;
            if distill::fingerprint(&bytes) != distillation.teacher_fingerprint {
                return Err(TrainError::run(
                    &path,
                    "is not the teacher the run started with (config.json has its fingerprint)",
                ));
            }
            Some(Teacher::new(
                bytes,
                &path,
                &config.preprocess,
                &config.classes,
            )?)
        }
        None => None,
    };
    let start = Start {
        run_dir,
        state,
        metrics,
        sets: load_sets(&splits, progress)?,
        stop_after,
        teacher,
    };
    restore_and_run(&config, start, progress, |config, session, _| {
        if *config != saved {
            write_json(&run_dir.join(CONFIG_FILE), config)?;
        }
        // Lines of an epoch a crash kept from committing go, so the file matches the state.
        if stale_metrics {
            run_folder::write_metrics(run_dir, session.metrics)?;
        }
        run_folder::tidy(run_dir, session.state);
        Ok(())
    })
}

/// The data's split, with `train_fraction` of each class's training images when given.
fn splits(
    data: &Path,
    val_fraction: f64,
    train_fraction: Option<f64>,
    seed: u64,
) -> Result<Splits, TrainError> {
    if train_fraction.is_some_and(|f| !(f > 0.0 && f <= 1.0)) {
        return Err(TrainError::Invalid(
            "the training fraction must be in (0, 1]".into(),
        ));
    }
    let splits = Splits::from_folder(data, val_fraction, seed)?;
    Ok(match train_fraction {
        Some(fraction) => splits.keep_training_fraction(fraction, seed),
        None => splits,
    })
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
    if let Some(Distillation {
        method: Method::Soft {
            temperature,
            weight,
        },
        ..
    }) = &config.distillation
    {
        if !(*temperature > 0.0 && temperature.is_finite()) {
            return invalid("the distillation temperature must be positive");
        }
        if !(0.0..=1.0).contains(weight) {
            return invalid("the distillation weight must be in [0, 1]");
        }
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
