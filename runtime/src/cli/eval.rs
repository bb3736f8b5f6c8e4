//! `runtime eval`: accuracy and confusion matrix on a folder-per-class dataset.

use super::{Loaded, ModelArgs};
use anyhow::{Context, Result};
use runtime::Classifier;
use serde_json::json;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

pub(super) fn run(args: &ModelArgs, data: &Path, json: bool) -> Result<()> {
    let Loaded { model, source, .. } = args.load()?;
    let mut classifier = Classifier::new(model, 1)?;
    let show_progress = !json && std::io::stderr().is_terminal();
    let started = Instant::now();
    let report = runtime::evaluation::evaluate_folder(&mut classifier, data, |done, total| {
        if show_progress && (done % 100 == 0 || done == total) {
            eprint!("\r{done}/{total} images");
        }
    })
    .with_context(|| format!("evaluating {source} on {}", data.display()))?;
    if show_progress {
        eprintln!();
    }
    let seconds = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"model": source, "data": data, "seconds": seconds, "report": report})
            )?
        );
        return Ok(());
    }
    println!(
        "accuracy {:.2}% on {} images ({} right) · {source} · {:.1} s",
        report.summary.accuracy * 100.0,
        report.summary.count,
        report.summary.confusion.correct(),
        seconds
    );
    for skipped in &report.skipped {
        println!("skipped {}: {}", skipped.path.display(), skipped.reason);
    }
    print!("{}", report.summary.confusion.per_class_text());
    println!("\n{}", report.summary.confusion.text());
    Ok(())
}
