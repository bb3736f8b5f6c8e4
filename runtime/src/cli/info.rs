//! `runtime info`: the model's inputs, outputs and metadata, and what tract runs it with.

use super::{Loaded, ModelArgs, ms};
use anyhow::Result;
use serde_json::json;

pub(super) fn run(args: &ModelArgs, graph: bool, json: bool) -> Result<()> {
    let Loaded {
        model,
        source,
        load,
        threads,
    } = args.load()?;
    let p = &model.preprocess;
    let features = runtime::model::cpu_features();
    let kernels = model.kernels();
    let operators = model.operators();
    let operator_kernels = model.operator_kernels();
    if json {
        let mut report = json!({
                "source": source,
                "load_ms": ms(load),
                "input": {"name": model.input_name, "shape": [1, p.channels, p.image_size, p.image_size], "type": "f32"},
                "output": {"name": model.output_name, "shape": [1, model.classes()]},
                "preprocess": p,
                "labels": model.labels,
                "metadata": model.metadata,
                "cpu": {"arch": std::env::consts::ARCH, "features": features},
                "tract": {"version": tract_version(), "threads": threads, "precision": model.precision.as_str(), "matmul_kernels": kernels, "operators": operators},
                "operator_kernels": operator_kernels,
        });
        if graph {
            report["graph"] = json!(model.graph());
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model    {source} (loaded and optimised in {:.1} ms)",
        ms(load)
    );
    println!(
        "input    {} [1, {}, {}, {}] f32",
        model.input_name, p.channels, p.image_size, p.image_size
    );
    println!("output   {} [1, {}]", model.output_name, model.classes());
    println!(
        "preprocess  resize {} · mean {:?} · std {:?}",
        p.resize, p.mean, p.std
    );
    let shown: Vec<&str> = model.labels.iter().take(12).map(String::as_str).collect();
    let more = model.labels.len().saturating_sub(shown.len());
    println!(
        "labels   {}{}",
        shown.join(", "),
        if more > 0 {
            format!(" … (+{more})")
        } else {
            String::new()
        }
    );
    if !model.metadata.is_empty() {
        println!("metadata");
        for (key, value) in &model.metadata {
            let value: String = if value.chars().count() > 100 {
                format!("{}…", value.chars().take(100).collect::<String>())
            } else {
                value.clone()
            };
            println!("  {key} = {value}");
        }
    }
    println!(
        "cpu      {} [{}]",
        std::env::consts::ARCH,
        features.join(" ")
    );
    println!(
        "tract    {} · {threads} thread(s) · {}",
        tract_version(),
        model.precision
    );
    let list = |map: &std::collections::BTreeMap<String, usize>| {
        map.iter()
            .map(|(name, n)| format!("{name} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("kernels  {}", list(&kernels));
    println!("ops      {}", list(&operators));
    let ours: Vec<String> = operator_kernels
        .iter()
        .map(|(op, isa)| format!("{op} {isa}"))
        .collect();
    println!(
        "own ops  {} (best here: {})",
        if ours.is_empty() {
            "none".to_string()
        } else {
            ours.join(", ")
        },
        runtime::Isa::best()
    );
    if graph {
        println!("graph");
        for line in model.graph() {
            println!("  {line}");
        }
    }
    Ok(())
}

fn tract_version() -> &'static str {
    "tract-onnx 0.23.9"
}
