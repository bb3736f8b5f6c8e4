//! `runtime quantize`: an int8 copy of an ONNX classifier.

use super::ModelArgs;
use anyhow::{Context, Result, bail};
use serde_json::json;
use std::path::Path;
use std::time::Instant;

pub(super) fn run(args: &ModelArgs, weights_only: bool, out: &Path, json: bool) -> Result<()> {
    let (bytes, source) = match &args.model {
        Some(path) => (
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            path.display().to_string(),
        ),
        None => match runtime::embedded::default_model(None) {
            Some((bytes, name)) => (bytes.to_vec(), name.to_string()),
            None => bail!("this build has no embedded model (feature embedded-model): pass MODEL"),
        },
    };
    let options = args.options(false)?;
    let started = Instant::now();
    let (int8, report) = match weights_only {
        false => runtime::quantize::quantize(&bytes, &options),
        true => runtime::quantize::quantize_weights(&bytes, &options),
    }
    .with_context(|| format!("quantizing {source}"))?;
    runtime::write_atomic(out, &int8).with_context(|| format!("writing {}", out.display()))?;
    let weights = |bytes: &[u8]| -> Result<usize> {
        Ok(runtime::quantize::weight_bytes(bytes)?.values().sum())
    };
    let (float_weights, int8_weights) = (weights(&bytes)?, weights(&int8)?);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": source,
                "out": out,
                "report": report,
                "weight_bytes": {"float": float_weights, "int8": int8_weights},
                "seconds": started.elapsed().as_secs_f64(),
            }))?
        );
    } else {
        if weights_only {
            println!(
                "wrote {}: weights stored int8, computed in f32",
                out.display()
            );
        } else {
            println!(
                "wrote {}: {} products on int8, {} left float, in {:.1} s",
                out.display(),
                report.int8_products,
                report.float_products,
                started.elapsed().as_secs_f64()
            );
        }
        println!(
            "file {} → {} bytes ({:.2}×); weights {} → {} bytes ({:.2}×)",
            report.float_bytes,
            report.int8_bytes,
            report.float_bytes as f64 / report.int8_bytes as f64,
            float_weights,
            int8_weights,
            float_weights as f64 / int8_weights as f64
        );
    }
    Ok(())
}
