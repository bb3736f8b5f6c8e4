//! `runtime logits`: raw logits of preprocessed tensors, to compare runtimes on identical inputs.

use super::ModelArgs;
use anyhow::{Context, Result, bail};
use runtime::Classifier;
use serde_json::json;
use std::path::Path;

pub(super) fn run(args: &ModelArgs, input: &Path, batch: usize, json: bool) -> Result<()> {
    let model = args.load()?.model;
    let per_item = model.preprocess.tensor_len();
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let needed = batch.checked_mul(per_item * 4).filter(|_| batch > 0);
    if needed != Some(bytes.len()) {
        bail!(
            "{} holds {} bytes; {batch} inputs of {per_item} f32 need {}",
            input.display(),
            bytes.len(),
            needed.map_or("more than memory holds".into(), |n| n.to_string())
        );
    }
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut classifier = Classifier::new(model, 1)?;
    let mut all = Vec::with_capacity(batch * classifier.model().classes());
    for item in values.chunks(per_item) {
        classifier.set_input(item)?;
        classifier.infer()?;
        all.extend_from_slice(classifier.logits());
    }
    if json {
        println!(
            "{}",
            json!({"batch": batch, "classes": classifier.model().classes(), "logits": all})
        );
    } else {
        for row in all.chunks(classifier.model().classes()) {
            println!(
                "{}",
                row.iter()
                    .map(|v| format!("{v:.6}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    Ok(())
}
