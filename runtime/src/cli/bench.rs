//! `runtime bench`: latency of the whole frame path, with tract's per-node profile.

use super::{Loaded, ModelArgs, ms};
use anyhow::{Context, Result, bail};
use runtime::classifier::Profile;
use runtime::{Classifier, DecodedImage, PixelFormat};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// A deterministic colour test frame, so `bench` needs no file.
fn synthetic_frame(width: u32, height: u32) -> DecodedImage {
    let pixels = (0..height)
        .flat_map(|y| {
            (0..width).flat_map(move |x| {
                [
                    (x * 255 / width) as u8,
                    (y * 255 / height) as u8,
                    ((x + y) % 256) as u8,
                ]
            })
        })
        .collect();
    DecodedImage {
        pixels,
        width,
        height,
        format: PixelFormat::Rgb8,
    }
}

#[derive(serde::Serialize)]
struct Stats {
    min_ms: f64,
    median_ms: f64,
    p99_ms: f64,
}

fn stats(samples: &mut [Duration]) -> Stats {
    samples.sort();
    let at = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    Stats {
        min_ms: at(0.0),
        median_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

pub(super) fn run(
    args: &ModelArgs,
    image: Option<&Path>,
    runs: usize,
    warmup: usize,
    profile: Option<Profile>,
    json: bool,
) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let Loaded {
        model,
        source,
        load,
        threads,
    } = args.load()?;
    let frame = match image {
        Some(path) => {
            runtime::decode_file(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => synthetic_frame(640, 480),
    };
    let mut classifier = Classifier::new(model, 1)?;
    for _ in 0..warmup {
        classifier.classify_frame(&frame.frame())?;
    }
    let (mut pre, mut inference, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let started = Instant::now();
        classifier.classify_frame(&frame.frame())?;
        total.push(started.elapsed());
        let t = classifier.timings();
        pre.push(t.preprocess);
        inference.push(t.inference);
    }
    let (pre, inference, total) = (stats(&mut pre), stats(&mut inference), stats(&mut total));
    let profiled_runs = if profile.is_some() { runs } else { 0 };
    let mut times = profile.unwrap_or_default();
    for _ in 0..profiled_runs {
        classifier.preprocess(&frame.frame())?;
        classifier.infer_profiled(&mut times)?;
    }
    let label = if times.is_by_node() { "node" } else { "op" };
    let operators = times.by_time();
    let per_frame = |time: &Duration| ms(*time) / runs as f64;
    if json {
        let operators: Vec<_> = operators
            .iter()
            .map(|(name, time, calls)| json!({label: name, "ms_per_frame": per_frame(time), "calls_per_frame": calls / runs}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": source, "load_ms": ms(load), "threads": threads, "runs": runs, "frame": [frame.width, frame.height],
                "precision": classifier.model().precision.as_str(),
                "preprocess": pre, "inference": inference, "total": total, "operators": operators,
            }))?
        );
        return Ok(());
    }
    println!(
        "model {source}: loaded in {:.1} ms; {runs} runs on a {}x{} frame, {threads} thread(s), {}",
        ms(load),
        frame.width,
        frame.height,
        classifier.model().precision
    );
    println!(
        "{:<12} {:>9} {:>9} {:>9}",
        "ms/frame", "min", "median", "p99"
    );
    for (name, s) in [
        ("preprocess", &pre),
        ("inference", &inference),
        ("total", &total),
    ] {
        println!(
            "{name:<12} {:>9.3} {:>9.3} {:>9.3}",
            s.min_ms, s.median_ms, s.p99_ms
        );
    }
    let all = times.total();
    let share = |time: &Duration| 100.0 * time.as_secs_f64() / all.as_secs_f64();
    if times.is_by_node() {
        // Node descriptions are long: they go last.
        println!("\n{:>9} {:>6}  node", "ms/frame", "share");
        for (name, time, _) in &operators {
            println!("{:>9.3} {:>5.1}%  {name}", per_frame(time), share(time));
        }
    } else if !operators.is_empty() {
        println!(
            "\n{:<32} {:>9} {:>6} {:>7}",
            "operator", "ms/frame", "share", "calls"
        );
        for (name, time, calls) in &operators {
            println!(
                "{name:<32} {:>9.3} {:>5.1}% {:>7}",
                per_frame(time),
                share(time),
                calls / runs
            );
        }
    }
    Ok(())
}
