//! `exporter inspect`: what an ONNX file holds.

use anyhow::Result;

pub(super) fn run(path: &std::path::Path, json: bool) -> Result<()> {
    let info = exporter::export::inspect(path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!(
        "{}  (producer: {}, opset {:?})",
        path.display(),
        info.producer,
        info.opset
    );
    for (name, dims) in &info.inputs {
        println!("input  {name} [{}]", dims.join(", "));
    }
    for (name, dims) in &info.outputs {
        println!("output {name} [{}]", dims.join(", "));
    }
    println!("parameters {}", info.parameters);
    println!("ops:");
    for (op, n) in &info.op_histogram {
        println!("  {op:<20} {n}");
    }
    println!("metadata:");
    for (key, value) in &info.metadata {
        println!("  {key} = {value}");
    }
    Ok(())
}
