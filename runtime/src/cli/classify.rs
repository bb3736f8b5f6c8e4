//! `runtime classify`: image files to top-k classes, as text or JSON lines.

use super::{ModelArgs, ms};
use anyhow::Result;
use runtime::Classifier;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

pub(super) fn run(
    images: &[PathBuf],
    args: &ModelArgs,
    top_k: usize,
    json: bool,
    with_logits: bool,
) -> Result<bool> {
    let model = args.load()?.model;
    let mut classifier = Classifier::new(model, top_k)?;
    let mut all_ok = true;
    for path in images {
        let started = Instant::now();
        let result = runtime::decode_file(path)
            .map_err(anyhow::Error::from)
            .and_then(|image| Ok(classifier.classify_frame(&image.frame())?.clone()));
        let total = started.elapsed();
        let top = match result {
            Ok(top) => top,
            Err(error) => {
                all_ok = false;
                if json {
                    println!("{}", json!({"image": path, "error": format!("{error:#}")}));
                } else {
                    eprintln!("error: {}: {error:#}", path.display());
                }
                continue;
            }
        };
        let timings = classifier.timings();
        if json {
            let predictions: Vec<_> = top
                .iter()
                .map(|p| json!({"label": classifier.label(p.class), "class": p.class, "probability": p.probability}))
                .collect();
            let mut record = json!({
                "image": path,
                "top": predictions,
                "latency_ms": {"total": ms(total), "preprocess": ms(timings.preprocess), "inference": ms(timings.inference)},
            });
            if with_logits {
                record["logits"] = json!(classifier.logits());
            }
            println!("{record}");
        } else {
            let best = top[0];
            let others: Vec<String> = top[1..]
                .iter()
                .map(|p| {
                    format!(
                        "{} {:.1}%",
                        classifier.label(p.class),
                        p.probability * 100.0
                    )
                })
                .collect();
            println!(
                "{}: {} {:.1}%{}  [{:.2} ms: preprocess {:.2}, inference {:.2}]",
                path.display(),
                classifier.label(best.class),
                best.probability * 100.0,
                if others.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", others.join(", "))
                },
                ms(total),
                ms(timings.preprocess),
                ms(timings.inference)
            );
        }
    }
    Ok(all_ok)
}
