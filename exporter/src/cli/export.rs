//! `exporter export`: a run's best weights as verified ONNX.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(super) struct ExportArgs {
    /// Run folder written by `exporter train`.
    #[arg(long, value_name = "RUN_DIR")]
    checkpoint: PathBuf,
    /// Output file (default: RUN_DIR/model.onnx).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = exporter::export::DEFAULT_OPSET)]
    opset: i64,
    /// Dataset to take verification images from (default: the run's training data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Also output each block's attention map (softmax weights averaged over heads, named
    /// `attention.N`), for `runtime explain`. The plain export computes logits only.
    #[arg(long)]
    with_attention: bool,
    #[arg(long)]
    json: bool,
}

pub(super) fn run(args: ExportArgs) -> Result<()> {
    let out = args
        .out
        .unwrap_or_else(|| args.checkpoint.join("model.onnx"));
    let options = exporter::export::ExportOptions {
        opset: args.opset,
        data: args.data,
        with_attention: args.with_attention,
    };
    let report = exporter::export::export(&args.checkpoint, &out, &options)
        .with_context(|| format!("exporting {}", args.checkpoint.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "wrote {} ({} bytes, opset {}, {} parameters, {:.1} M multiply-adds per image)",
        report.path.display(),
        report.bytes,
        report.opset,
        report.parameters,
        report.multiply_adds as f64 / 1e6
    );
    if report.attention_outputs > 0 {
        println!("  with {} attention outputs", report.attention_outputs);
    }
    for (batch, diff) in &report.max_abs_diff {
        println!("  verified with tract at batch {batch}: max |tract - burn| = {diff:.2e}");
    }
    let ops: Vec<String> = report
        .op_histogram
        .iter()
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    println!("  ops: {}", ops.join(", "));
    Ok(())
}
