//! The command line: flags and the dispatch to one module per command; `data` is short enough
//! to live here.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

mod eval;
mod export;
mod inspect;
mod train;

use eval::EvalArgs;
use export::ExportArgs;
use train::{TrainArgs, counter_bar};

#[derive(Parser)]
#[command(
    name = "exporter",
    version,
    about = "Train the tutorial's Vision Transformer in burn and export it"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a ViT on a folder-per-class image dataset (or resume a run).
    ///
    /// DATA holds one sub-folder per class (sorted names = class order), or `train/` and `val/`
    /// folders of that shape. Without them, a stratified split keeps --val-fraction of each class
    /// for validation. The run folder gets config.json, metrics.jsonl, curves.png, the latest
    /// checkpoint and the best-by-validation-accuracy weights under per-epoch names, and
    /// state.json, which names them and is written last every epoch: an interrupted run resumes
    /// from its last complete epoch.
    Train(Box<TrainArgs>),
    /// Accuracy, per-class accuracy and confusion matrix of a run's best weights on a folder.
    Eval(EvalArgs),
    /// Write the run's best weights as a verified, self-describing ONNX file.
    ///
    /// The graph uses standard ops (opset 17+: Conv, LayerNormalization, MatMul, Softmax, Erf
    /// GELU, …), input `pixel_values` [batch, C, H, W], output `logits` [batch, classes], and
    /// carries labels and preprocessing in its metadata. Before writing, tract runs it on real
    /// validation images at batch 1 and 3; the export fails unless its logits match burn's
    /// within 1e-4.
    Export(ExportArgs),
    /// Print an ONNX file's inputs, outputs, op histogram, parameter count and metadata.
    Inspect {
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Convert public datasets to folder-per-class images.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Fashion-MNIST IDX files → OUT/{train,test}/<class>/<n>.png (10 classes, 28x28 grey).
    FashionMnist {
        #[arg(long)]
        out: PathBuf,
        /// Folder with the four *-ubyte.gz files (default: Debian's dataset-fashion-mnist).
        #[arg(long, default_value = exporter::fashion_mnist::DEBIAN_DIR)]
        from: PathBuf,
    },
    /// A synthetic set to try the pipeline with nothing to download: each class is a bright
    /// square in its own part of a noisy grey frame (OUT/class_<k>/<n>.png).
    Squares {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 4)]
        classes: usize,
        #[arg(long, default_value_t = 100)]
        per_class: usize,
        /// Frame side in pixels.
        #[arg(long, default_value_t = 144)]
        size: u32,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

pub(crate) fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train::run(*args),
        Command::Eval(args) => eval::run(args),
        Command::Export(args) => export::run(args),
        Command::Inspect { model, json } => inspect::run(&model, json),
        Command::Data(DataCommand::Squares {
            out,
            classes,
            per_class,
            size,
            seed,
        }) => {
            if classes < 2 || per_class == 0 || size < 4 {
                bail!("need at least 2 classes, 1 image per class and 4 px frames");
            }
            exporter::synthetic::write_dataset(&out, classes, per_class, size, size, seed)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} images of {size}x{size} px in {classes} classes to {}",
                classes * per_class,
                out.display()
            );
            Ok(())
        }
        Command::Data(DataCommand::FashionMnist { out, from }) => {
            let bar = counter_bar(70_000, "converting");
            let converted = exporter::fashion_mnist::convert(&from, &out, &|n| bar.inc(n as u64))?;
            bar.finish_and_clear();
            println!(
                "wrote {} training and {} test images to {}",
                converted.train,
                converted.test,
                converted.out.display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_refuses_flags_it_would_ignore() {
        let parse = |extra: &[&str]| {
            let args = ["exporter", "train", "--resume", "runs/x"];
            Cli::try_parse_from(args.iter().chain(extra))
        };
        assert!(parse(&["--epochs", "12", "--stop-after", "2", "--json"]).is_ok());
        for flag in [
            &["--lr", "0.1"][..],
            &["--ema", "0.999"],
            &["--data", "d"],
            &["--erase", "0.5"],
        ] {
            let error = parse(flag).err().expect("refused").to_string();
            assert!(error.contains("cannot be used with"), "{flag:?}: {error}");
        }
    }
}
