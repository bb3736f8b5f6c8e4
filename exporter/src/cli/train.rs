//! `exporter train`: its flags, and training progress on stderr (a bar per epoch, a line per
//! finished epoch).

use anyhow::{Context, Result};
use clap::Args;
use exporter::Preset;
use exporter::training::distill::Method;
use exporter::training::{self, EpochMetrics, ModelOverrides, NewRun, Progress, Recipe};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Args)]
pub(super) struct TrainArgs {
    /// Dataset folder (required unless --resume).
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// Run folder to create.
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last complete epoch, with the data, model and
    /// recipe in its config.json (only --epochs, --stop-after and --json apply).
    #[arg(
        long,
        value_name = "RUN_DIR",
        conflicts_with_all = ["data", "preset", "image_size", "patch_size", "dim", "depth",
            "heads", "mlp_dim", "widths", "blocks", "dropout", "batch_size", "lr", "min_lr", "weight_decay",
            "warmup_epochs", "grad_clip", "no_grad_clip", "label_smoothing", "seed",
            "val_fraction", "ema", "augment", "no_augment", "crop_min_area", "erase", "channels",
            "mean", "std", "resize", "backend", "train_fraction", "distill_from", "distillation",
            "distill_temperature", "distill_weight"]
    )]
    resume: Option<PathBuf>,
    /// Fine-tune: a new run that starts from this run's best weights, with its architecture,
    /// preprocessing and classes, and a fresh optimizer and schedule (the recipe flags below).
    #[arg(
        long,
        value_name = "RUN_DIR",
        conflicts_with_all = ["resume", "preset", "image_size", "patch_size", "dim", "depth",
            "heads", "mlp_dim", "widths", "blocks", "channels", "mean", "std", "resize"]
    )]
    init_from: Option<PathBuf>,
    /// DeiT: give the ViT a distillation token whose head learns this teacher's answers on
    /// the same augmented batches (an ONNX classifier with the run's labels and
    /// preprocessing, or a run folder, exported for it). The exported model averages the
    /// two heads.
    #[arg(long, value_name = "ONNX_OR_RUN_DIR")]
    distill_from: Option<PathBuf>,
    /// hard: the distillation head learns the teacher's top class (DeiT's default); soft: its
    /// distribution at --distill-temperature, weighted by --distill-weight.
    #[arg(long, value_enum, default_value_t = DistillationKind::Hard, requires = "distill_from")]
    distillation: DistillationKind,
    #[arg(long, default_value_t = 3.0, requires = "distill_from")]
    distill_temperature: f64,
    /// Weight of the soft distillation term against the true labels' (λ).
    #[arg(long, default_value_t = 0.5, requires = "distill_from")]
    distill_weight: f64,
    /// Architecture preset; the flags below override single fields.
    #[arg(long, value_enum, default_value_t = Preset::Seed)]
    preset: Preset,
    #[arg(long)]
    image_size: Option<usize>,
    #[arg(long)]
    patch_size: Option<usize>,
    #[arg(long)]
    dim: Option<usize>,
    #[arg(long)]
    depth: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    #[arg(long)]
    mlp_dim: Option<usize>,
    /// CNN presets: channels of each stage, e.g. 32,64,128 (each stage after the first halves
    /// the resolution).
    #[arg(long, value_delimiter = ',')]
    widths: Option<Vec<usize>>,
    /// CNN presets: residual blocks in each stage, e.g. 1,1,1.
    #[arg(long, value_delimiter = ',')]
    blocks: Option<Vec<usize>>,
    #[arg(long)]
    dropout: Option<f64>,
    /// Epochs to train (with --resume: the new total).
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Learning rate at the end of the cosine schedule.
    #[arg(long, default_value_t = 1e-5)]
    min_lr: f64,
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// Linear warm-up length in epochs (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    warmup_epochs: f64,
    /// Clip the global gradient norm to this value.
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Disable gradient clipping.
    #[arg(long)]
    no_grad_clip: bool,
    #[arg(long)]
    label_smoothing: Option<f32>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of each class held out for validation; 0 trains on every image, without
    /// validation, and the last epoch's weights are the run's result.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Train on this fraction of each class's training images only (validation is the
    /// same): how much data a model needs, measured.
    #[arg(long)]
    train_fraction: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.999),
    /// updated every step; the best epoch is then chosen, and saved, by the average.
    #[arg(long, value_name = "DECAY")]
    ema: Option<f64>,
    /// Random-resized crop + horizontal flip (default: on for colour data, off for grey).
    #[arg(long, overrides_with = "no_augment")]
    augment: bool,
    #[arg(long)]
    no_augment: bool,
    /// Smallest area of the random-resized crop, as a fraction of the image (default 0.5).
    /// Implies --augment unless --no-augment is given.
    #[arg(long)]
    crop_min_area: Option<f32>,
    /// Probability of random erasing: a rectangle of 2–40 % of the image set to the mean
    /// pixel. Implies --augment unless --no-augment is given.
    #[arg(long, value_name = "PROBABILITY")]
    erase: Option<f32>,
    /// Input channels (default: 1 if every training image is grey, else 3).
    #[arg(long)]
    channels: Option<usize>,
    /// Per-channel mean of [0,1] pixels (one value, or one per channel). Default 0.5.
    #[arg(long, value_delimiter = ',')]
    mean: Option<Vec<f32>>,
    /// Per-channel std of [0,1] pixels. Default 0.5.
    #[arg(long, value_delimiter = ',')]
    std: Option<Vec<f32>>,
    /// How frames reach the square input: squash (the tutorial's) or center-crop.
    #[arg(long, default_value = "squash")]
    resize: runtime::ResizeMode,
    /// burn backend to train on.
    #[arg(long, default_value = exporter::backend::DEFAULT)]
    backend: String,
    /// Stop after this many epochs of this invocation, keeping the whole schedule; continue
    /// later with --resume (for runs longer than one sitting).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(super) enum DistillationKind {
    Hard,
    Soft,
}

pub(super) fn run(args: TrainArgs) -> Result<()> {
    let mut progress = BarProgress::new(!args.json);
    let summary = if let Some(run_dir) = &args.resume {
        training::resume(run_dir, args.epochs, args.stop_after, &mut progress)
            .with_context(|| format!("resuming {}", run_dir.display()))?
    } else {
        let new = NewRun {
            data: args.data.clone().expect("clap requires --data"),
            preset: args.preset,
            overrides: ModelOverrides {
                image_size: args.image_size,
                patch_size: args.patch_size,
                dim: args.dim,
                depth: args.depth,
                heads: args.heads,
                mlp_dim: args.mlp_dim,
                widths: args.widths.clone(),
                blocks: args.blocks.clone(),
                dropout: args.dropout,
            },
            recipe: Recipe {
                epochs: args.epochs.unwrap_or(Recipe::default().epochs),
                batch_size: args.batch_size,
                learning_rate: args.lr,
                min_learning_rate: args.min_lr,
                weight_decay: args.weight_decay,
                warmup_epochs: args.warmup_epochs,
                grad_clip: (!args.no_grad_clip).then_some(args.grad_clip),
                label_smoothing: args.label_smoothing,
                seed: args.seed,
                val_fraction: args.val_fraction,
                train_fraction: args.train_fraction,
                ema: args.ema,
            },
            augment: match (args.augment, args.no_augment) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => (args.crop_min_area.is_some() || args.erase.is_some()).then_some(true),
            },
            crop_min_area: args.crop_min_area,
            erase: args.erase,
            init_from: args.init_from.clone(),
            distill_from: args.distill_from.clone(),
            distillation: match args.distillation {
                DistillationKind::Hard => Method::Hard,
                DistillationKind::Soft => Method::Soft {
                    temperature: args.distill_temperature,
                    weight: args.distill_weight,
                },
            },
            channels: args.channels,
            mean: args.mean.clone(),
            std: args.std.clone(),
            resize: args.resize,
            backend: args.backend.clone(),
            stop_after: args.stop_after,
        };
        let out = args.out.clone().expect("clap requires --out");
        training::train(new, &out, &mut progress)
            .with_context(|| format!("training into {}", out.display()))?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let result = match summary.best.as_ref() {
            Some(best) => match best.val_accuracy {
                Some(accuracy) => format!(
                    "best validation accuracy {:.2}% (epoch {})",
                    accuracy * 100.0,
                    best.epoch
                ),
                None => format!("no validation; the result is epoch {}", best.epoch),
            },
            None => "no epoch finished".into(),
        };
        println!(
            "done: {} epochs, {} steps; {result}; run in {}",
            summary.epochs.len(),
            summary.steps,
            summary.run_dir.display()
        );
        if summary.skipped_images > 0 {
            println!(
                "skipped {} unreadable images (see the warnings above)",
                summary.skipped_images
            );
        }
    }
    Ok(())
}

pub(super) fn counter_bar(total: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template"),
    );
    bar.set_message(message);
    bar
}

/// Training progress on stderr: a bar per epoch and a line per finished epoch. When stderr is
/// not a terminal (logs, nohup), a plain line every 30 s replaces the bar.
struct BarProgress {
    visible: bool,
    bar: Option<ProgressBar>,
    epoch: usize,
    epochs: usize,
    steps: usize,
    step: usize,
    last_line: std::time::Instant,
}

impl BarProgress {
    fn new(visible: bool) -> Self {
        BarProgress {
            visible,
            bar: None,
            epoch: 0,
            epochs: 0,
            steps: 0,
            step: 0,
            last_line: std::time::Instant::now(),
        }
    }
}

impl Progress for BarProgress {
    fn epoch_started(&mut self, epoch: usize, epochs: usize, steps: usize) {
        (self.epoch, self.epochs, self.steps, self.step) = (epoch, epochs, steps, 0);
        if self.visible && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = ProgressBar::new(steps as u64);
            bar.set_style(
                ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} {msg} eta {eta}")
                    .expect("valid template"),
            );
            bar.set_prefix(format!("{epoch}/{epochs}"));
            self.bar = Some(bar);
        }
    }

    fn step(&mut self, loss: f64, accuracy: f64, images_per_second: f64) {
        self.step += 1;
        let status = format!(
            "loss {loss:.4} acc {:.1}% {images_per_second:.0} img/s",
            accuracy * 100.0
        );
        if let Some(bar) = &self.bar {
            bar.set_message(status);
            bar.inc(1);
        } else if self.visible && self.last_line.elapsed().as_secs() >= 30 {
            self.last_line = std::time::Instant::now();
            eprintln!(
                "epoch {}/{} step {}/{}: {status}",
                self.epoch, self.epochs, self.step, self.steps
            );
        }
    }

    fn epoch_finished(&mut self, m: &EpochMetrics) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.visible {
            let validation = validation_text(m.val_loss, m.val_accuracy)
                .unwrap_or_else(|| "no validation".into());
            eprintln!(
                "epoch {}/{}: train loss {:.4} acc {:.2}% | {validation} | {:.0} img/s, {:.1}s, lr {:.2e}",
                m.epoch,
                self.epochs,
                m.train_loss,
                m.train_accuracy * 100.0,
                m.images_per_second,
                m.epoch_seconds,
                m.learning_rate
            );
            if let Some(average) = validation_text(m.ema_val_loss, m.ema_val_accuracy) {
                eprintln!("  weight average: {average}");
            }
        }
    }

    fn message(&mut self, text: &str) {
        if self.visible {
            eprintln!("{text}");
        }
    }
}

/// `val loss … acc …%`, for an epoch's validation figures when it has them.
fn validation_text(loss: Option<f64>, accuracy: Option<f64>) -> Option<String> {
    Some(format!(
        "val loss {:.4} acc {:.2}%",
        loss?,
        accuracy? * 100.0
    ))
}
