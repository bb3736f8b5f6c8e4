//! `exporter eval`: a run's accuracy and confusion matrix on a folder.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(super) struct EvalArgs {
    /// Run folder written by `exporter train`.
    #[arg(long, value_name = "RUN_DIR")]
    checkpoint: PathBuf,
    /// Folder-per-class images with the run's class names.
    #[arg(long)]
    data: PathBuf,
    /// Where to write confusion.png and confusion.txt (default: the run folder).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long)]
    json: bool,
}

pub(super) fn run(args: EvalArgs) -> Result<()> {
    let report = exporter::eval::eval_run(&args.checkpoint, &args.data, args.batch_size)
        .with_context(|| {
            format!(
                "evaluating {} on {}",
                args.checkpoint.display(),
                args.data.display()
            )
        })?;
    let out = args.out.unwrap_or_else(|| args.checkpoint.clone());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    runtime::write_atomic(
        &out.join("confusion.txt"),
        report.summary.confusion.text().as_bytes(),
    )?;
    exporter::plots::confusion_matrix(
        &report.summary.confusion.matrix,
        &report.summary.confusion.classes,
        &out.join("confusion.png"),
    )
    .map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "accuracy {:.2}% on {} images (loss {:.4})",
        report.summary.accuracy * 100.0,
        report.summary.count,
        report.loss
    );
    if report.skipped > 0 {
        println!("skipped {} unreadable images", report.skipped);
    }
    print!("{}", report.summary.confusion.per_class_text());
    println!("\n{}", report.summary.confusion.text());
    println!("confusion matrix: {}", out.join("confusion.png").display());
    Ok(())
}
