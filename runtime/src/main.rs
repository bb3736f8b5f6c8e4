//! `runtime`: classify frames on the device with a ViT in ONNX.
//! A thin layer over the `runtime` library: parse flags, call, print.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use runtime::explain::{Explainer, Method};
use runtime::{
    Classifier, DecodedImage, KeepPolicy, Model, ModelOptions, PixelFormat, Precision, ResizeMode,
    StreamConfig, StreamError, StreamEvent, StreamFormat, StreamSummary,
};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "runtime",
    version,
    about = "Classify frames with a Vision Transformer (ONNX, on tract)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify image files; several images in one call reuse the loaded model.
    ///
    /// A bad image is reported on its own line and the others are still classified; the exit
    /// status is non-zero if any failed.
    Classify {
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
        /// Predictions per image.
        #[arg(long, default_value_t = 3)]
        top_k: usize,
        /// One JSON object per image on stdout.
        #[arg(long)]
        json: bool,
        /// With --json, also the raw logits (to compare runtimes and machines).
        #[arg(long, requires = "json")]
        logits: bool,
    },
    /// The model's inputs, outputs, metadata, and the CPU features tract uses.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// Also the optimised graph tract runs, node by node (operator, settings, output shape).
        #[arg(long)]
        graph: bool,
        #[arg(long)]
        json: bool,
    },
    /// Logits of raw preprocessed input tensors (little-endian f32, N×C×H×W), for comparing
    /// runtimes on identical inputs (tests/onnx_peers.py).
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// File of N×C×H×W little-endian f32 values.
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long)]
        json: bool,
    },
    /// Accuracy, per-class accuracy and confusion matrix on a folder-per-class dataset.
    ///
    /// DATA holds one sub-folder per class, named as the model's labels (all of them or some);
    /// images that cannot be decoded are skipped and counted.
    Eval {
        /// The model to evaluate (same as --model).
        #[arg(value_name = "MODEL")]
        model_path: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
        /// Folder-per-class test images.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Classify a live stream of frames from stdin, a file or a FIFO (ffmpeg, GStreamer, camera).
    ///
    /// Raw frames (rgb24, bgr24, gray8, yuv420p, nv12) are WIDTHxHEIGHT as given by --size;
    /// mjpeg is a stream of concatenated JPEGs. Prints one line per classified frame (a JSON
    /// object with --json), an error record for each bad frame (the stream goes on), and a
    /// summary at the end of the input: on stderr, or as a last `{"summary": …}` line with
    /// --json. Exits non-zero if any frame failed.
    ///
    /// Example: ffmpeg -f lavfi -i testsrc=size=640x480:rate=30 -f rawvideo -pix_fmt rgb24 - |
    /// runtime stream --format rgb24 --size 640x480
    Stream {
        /// File or FIFO to read (default: stdin).
        input: Option<PathBuf>,
        /// rgb24, bgr24, gray8, yuv420p, nv12 (BT.601 limited range, as ffmpeg writes), mjpeg.
        #[arg(long)]
        format: StreamFormat,
        /// Size of raw frames, e.g. 640x480 (not needed for mjpeg).
        #[arg(long, value_name = "WIDTHxHEIGHT")]
        size: Option<FrameSize>,
        /// Classify every N-th frame; the others are read and skipped.
        #[arg(long, default_value_t = 1, value_name = "N")]
        every: u64,
        /// When frames arrive faster than they are classified: `latest` classifies the newest
        /// and drops (and counts) the older waiting ones; `all` makes the reader wait.
        #[arg(long, default_value = "latest")]
        keep: KeepPolicy,
        /// Frame slots in the ring between the reader and inference (2..=16).
        #[arg(long, default_value_t = 4)]
        slots: usize,
        /// Largest JPEG accepted in mjpeg input; bigger ones are error records.
        #[arg(long, default_value_t = 16 << 20)]
        max_jpeg_bytes: usize,
        #[command(flatten)]
        model: ModelArgs,
        /// Predictions per frame.
        #[arg(long, default_value_t = 1)]
        top_k: usize,
        #[arg(long)]
        json: bool,
    },
    /// Where the model looked: an attention heat map over the image, with the top-1 label.
    ///
    /// Needs a model exported with `exporter export --with-attention` (the shipped default
    /// model has its attention outputs). `rollout` multiplies the blocks' attention (with the
    /// residual path) from the last block down to the patches; `last-layer` shows what the
    /// last block's CLS token attends to.
    Explain {
        image: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        /// rollout or last-layer.
        #[arg(long, default_value = "rollout")]
        method: Method,
        /// The overlay PNG (the input's size).
        #[arg(short, long)]
        out: PathBuf,
        /// Also save every block's CLS attention, side by side, as one PNG.
        #[arg(long, value_name = "PNG")]
        grid: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Make an int8 copy of a float model: nothing to calibrate.
    ///
    /// Each MatMul with constant weights gets int8 weights (symmetric, per output channel) and
    /// is written as standard ONNX's DynamicQuantizeLinear → MatMulInteger, as onnxruntime's
    /// quantize_dynamic writes it; the runtime runs it on its own int8 operator, which
    /// quantizes each row of activations at each run. LayerNorm, softmax, GELU and the
    /// attention products stay f32. Run the result like any model (`--model`), and measure
    /// what it costs with `runtime eval`.
    Quantize {
        /// The float model (default: the embedded one).
        #[arg(value_name = "MODEL")]
        model_path: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
        /// Only store the weights as int8 (dequantized at load): a file about 4× smaller that
        /// computes in f32 at f32 speed.
        #[arg(long)]
        weights_only: bool,
        /// Where to write the int8 ONNX file.
        #[arg(short, long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Latency per frame (preprocess, inference, total): min, median, p99.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Frame to use (default: a synthetic 640x480 RGB frame).
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long, default_value_t = 200)]
        runs: usize,
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Also time each operator (over the same number of extra runs) and print where the
        /// inference time goes.
        #[arg(long)]
        profile: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// ONNX model (default: the model embedded in this binary).
    #[arg(long, global = true)]
    model: Option<PathBuf>,
    /// Input side in pixels, for models whose metadata does not say.
    #[arg(long)]
    input_size: Option<u32>,
    /// Input channels (1 or 3), for models whose metadata does not say.
    #[arg(long)]
    channels: Option<u32>,
    /// Per-channel mean of [0,1] pixels, e.g. 0.485,0.456,0.406.
    #[arg(long, value_delimiter = ',')]
    mean: Option<Vec<f32>>,
    /// Per-channel std of [0,1] pixels, e.g. 0.229,0.224,0.225.
    #[arg(long, value_delimiter = ',')]
    std: Option<Vec<f32>>,
    /// squash or center-crop.
    #[arg(long)]
    resize: Option<ResizeMode>,
    /// Class names, one per line, in output order.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Cores for tract's matrix products: 0 (default) one per physical core, 1 the calling
    /// thread only (steadiest latency, leaves the other cores to the camera). A build without
    /// the `threads` feature has the calling thread only.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// f32, f16 or int8. Default: as stored (an int8 file from `runtime quantize` runs int8).
    /// int8 needs such a file; with no --model it picks the embedded int8 copy. f16 is native
    /// arithmetic on aarch64 with fp16 (Cortex-A76 and later), a storage format elsewhere.
    #[arg(long)]
    precision: Option<Precision>,
    /// Instruction set of the runtime's own operators' kernels: portable; neon or neon-dot
    /// (aarch64, the latter with SDOT); avx2, avx-vnni, avx512 or avx512-vnni (x86-64). The
    /// VNNI and dot-product sets change only the int8 kernels. Default: the RUNTIME_ISA environment variable, else the best this CPU runs. A lower one
    /// is for testing and comparing kernels on one machine; one the CPU lacks is an error.
    #[arg(long)]
    isa: Option<runtime::Isa>,
}

/// A loaded model and how it was loaded.
struct Loaded {
    model: Model,
    source: String,
    load: Duration,
    threads: usize,
}

impl ModelArgs {
    fn load(&self) -> Result<Loaded> {
        self.load_with(false)
    }

    fn options(&self, attention: bool) -> Result<ModelOptions> {
        Ok(ModelOptions {
            image_size: self.input_size,
            channels: self.channels,
            mean: self.mean.clone(),
            std: self.std.clone(),
            resize: self.resize,
            labels: self
                .labels
                .as_deref()
                .map(ModelOptions::labels_from_file)
                .transpose()?,
            attention,
            precision: self.precision,
            isa: self.isa,
        })
    }

    /// Load, keeping the model's attention outputs if `attention`.
    fn load_with(&self, attention: bool) -> Result<Loaded> {
        let threads = runtime::set_threads(self.threads)?;
        let options = self.options(attention)?;
        let started = Instant::now();
        let (model, source) = match &self.model {
            Some(path) => (
                Model::load(path, &options)
                    .with_context(|| format!("loading {}", path.display()))?,
                path.display().to_string(),
            ),
            None => match runtime::embedded::default_model(self.precision) {
                Some((bytes, name)) => (Model::from_bytes(bytes, &options)?, name.to_string()),
                None => bail!(
                    "this build has no embedded model (feature embedded-model): pass --model PATH"
                ),
            },
        };
        Ok(Loaded {
            model,
            source,
            load: started.elapsed(),
            threads,
        })
    }
}

fn main() {
    // `runtime classify … | head` should end quietly when the reader goes away, as other
    // Unix tools do; Rust's runtime ignores SIGPIPE, which turns that into a panic in println!.
    #[cfg(unix)]
    // SAFETY: set once at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // A panic the library catches comes back as an error, printed once below.
    let report_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !runtime::panic_is_caught_here() {
            report_panic(info);
        }
    }));
    match run(Cli::parse()) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(1);
        }
    }
}

/// `Ok(false)`: the command ran but some input failed.
fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Classify {
            images,
            model,
            top_k,
            json,
            logits,
        } => classify(&images, &model, top_k, json, logits),
        Command::Info { model, graph, json } => info(&model, graph, json).map(|_| true),
        Command::Logits {
            model,
            input,
            batch,
            json,
        } => logits(&model, &input, batch, json).map(|_| true),
        Command::Eval {
            model_path,
            mut model,
            data,
            json,
        } => {
            model.model = model_path.or(model.model);
            eval(&model, &data, json).map(|_| true)
        }
        Command::Quantize {
            model_path,
            mut model,
            weights_only,
            out,
            json,
        } => {
            model.model = model_path.or(model.model);
            quantize(&model, weights_only, &out, json).map(|_| true)
        }
        Command::Stream {
            input,
            format,
            size,
            every,
            keep,
            slots,
            max_jpeg_bytes,
            model,
            top_k,
            json,
        } => {
            let FrameSize { width, height } = size.unwrap_or_default();
            let config = StreamConfig {
                every,
                keep,
                slots,
                max_jpeg_bytes,
                ..StreamConfig::new(format, width, height)
            };
            stream(input.as_deref(), &config, &model, top_k, json)
        }
        Command::Explain {
            image,
            model,
            method,
            out,
            grid,
            json,
        } => explain(&image, &model, method, &out, grid.as_deref(), json).map(|_| true),
        Command::Bench {
            model,
            image,
            runs,
            warmup,
            profile,
            json,
        } => bench(&model, image.as_deref(), runs, warmup, profile, json).map(|_| true),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn classify(
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

fn eval(args: &ModelArgs, data: &Path, json: bool) -> Result<()> {
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

fn logits(args: &ModelArgs, input: &Path, batch: usize, json: bool) -> Result<()> {
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

fn info(args: &ModelArgs, graph: bool, json: bool) -> Result<()> {
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

fn quantize(args: &ModelArgs, weights_only: bool, out: &Path, json: bool) -> Result<()> {
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

fn explain(
    image_path: &Path,
    args: &ModelArgs,
    method: Method,
    out: &Path,
    grid: Option<&Path>,
    json: bool,
) -> Result<()> {
    let image = runtime::decode_file(image_path)
        .with_context(|| format!("reading {}", image_path.display()))?;
    let Loaded { model, source, .. } = args.load_with(true)?;
    let mut explainer = Explainer::new(model)?;
    let explanation = explainer.explain(&image.frame())?;
    let best = explanation.top(1)[0];
    let label = &explainer.model().labels[best.class];
    let caption = format!("{label} {:.0}%", best.probability * 100.0);
    let resize = explainer.model().preprocess.resize;
    let region = runtime::Region::for_mode(resize, image.width, image.height);
    let map = explanation.map(method);
    let overlay = runtime::overlay::render(&image, region, &map, Some(&caption));
    write_png(out, &overlay)?;
    if let Some(grid) = grid {
        let pictures: Vec<_> = explanation
            .layer_maps()
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                let caption = format!("block {i}");
                runtime::overlay::render(&image, region, layer, Some(&caption))
            })
            .collect();
        write_png(grid, &runtime::overlay::tile(&pictures))?;
    }
    if json {
        println!(
            "{}",
            json!({
                "image": image_path, "model": source, "method": method.name(),
                "top": {"label": label, "class": best.class, "probability": best.probability},
                "overlay": out, "grid": grid, "layers": explanation.layers.len(),
                "map": {"side": map.side, "values": map.values},
            })
        );
    } else {
        println!(
            "{}: {caption} · {method} over {} blocks → {}{}",
            image_path.display(),
            explanation.layers.len(),
            out.display(),
            grid.map_or(String::new(), |g| format!(", per block → {}", g.display()))
        );
    }
    Ok(())
}

fn write_png(path: &Path, picture: &image::RgbImage) -> Result<()> {
    runtime::write_atomic_with(path, |file| {
        picture
            .write_to(file, image::ImageFormat::Png)
            .map_err(std::io::Error::other)
    })
    .with_context(|| format!("writing {}", path.display()))
}

/// `WIDTHxHEIGHT` of raw stream frames.
#[derive(Clone, Copy, Default)]
struct FrameSize {
    width: u32,
    height: u32,
}

impl std::str::FromStr for FrameSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parsed = s
            .split_once(['x', 'X'])
            .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)));
        match parsed {
            Some((width, height)) if width > 0 && height > 0 => Ok(FrameSize { width, height }),
            _ => Err(format!("expected WIDTHxHEIGHT such as 640x480, got {s:?}")),
        }
    }
}

fn stream(
    input: Option<&Path>,
    config: &StreamConfig,
    args: &ModelArgs,
    top_k: usize,
    json: bool,
) -> Result<bool> {
    let reader: Box<dyn std::io::Read + Send> = match input {
        None => Box::new(std::io::stdin()),
        Some(path) if path == Path::new("-") => Box::new(std::io::stdin()),
        Some(path) => Box::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        ),
    };
    let Loaded { model, .. } = args.load()?;
    let mut classifier = Classifier::new(model, top_k)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let result = runtime::run_stream(&mut classifier, reader, config, |event, classifier| {
        if json {
            write_event_json(&mut out, event, classifier)?;
        } else {
            write_event_text(&mut out, event, classifier)?;
        }
        // Each record leaves at once: the reader of a pipe wants it now, not when 8 KB fill.
        out.flush()
    });
    let summary = match result {
        Ok(summary) => summary,
        // The reader of our output went away (`| head`): a normal way to end a stream.
        Err(StreamError::Stopped(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(true);
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        writeln!(out, "{}", json!({ "summary": summary }))?;
        out.flush()?;
    } else {
        eprintln!("{}", summary_text(&summary));
    }
    Ok(summary.errors == 0)
}

/// One JSON line per event, written without building a `serde_json::Value` per frame.
fn write_event_json(
    out: &mut impl Write,
    event: &StreamEvent<'_>,
    classifier: &Classifier,
) -> std::io::Result<()> {
    match *event {
        StreamEvent::Classified {
            index,
            arrival,
            top,
            latency,
            decode,
            timings,
        } => {
            let record = FrameRecord {
                frame: index,
                t_ms: ms(arrival),
                top: TopRecord { top, classifier },
                latency_ms: ms(latency),
                decode_ms: ms(decode),
                preprocess_ms: ms(timings.preprocess),
                inference_ms: ms(timings.inference),
            };
            serde_json::to_writer(&mut *out, &record)?;
        }
        StreamEvent::Failed {
            index,
            arrival,
            error,
        } => {
            let record = json!({"frame": index, "t_ms": ms(arrival), "error": error.to_string()});
            serde_json::to_writer(&mut *out, &record)?;
        }
    }
    out.write_all(b"\n")
}

#[derive(serde::Serialize)]
struct FrameRecord<'a> {
    frame: u64,
    t_ms: f64,
    top: TopRecord<'a>,
    latency_ms: f64,
    decode_ms: f64,
    preprocess_ms: f64,
    inference_ms: f64,
}

struct TopRecord<'a> {
    top: &'a runtime::TopK,
    classifier: &'a Classifier,
}

impl serde::Serialize for TopRecord<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        #[derive(serde::Serialize)]
        struct Entry<'a> {
            label: &'a str,
            class: usize,
            probability: f32,
        }
        let mut seq = serializer.serialize_seq(Some(self.top.len()))?;
        for p in self.top {
            seq.serialize_element(&Entry {
                label: self.classifier.label(p.class),
                class: p.class,
                probability: p.probability,
            })?;
        }
        seq.end()
    }
}

fn write_event_text(
    out: &mut impl Write,
    event: &StreamEvent<'_>,
    classifier: &Classifier,
) -> std::io::Result<()> {
    match *event {
        StreamEvent::Classified {
            index,
            arrival,
            top,
            latency,
            ..
        } => {
            write!(out, "frame {index} @ {:.1} ms:", ms(arrival))?;
            for p in top {
                write!(
                    out,
                    " {} {:.1}%",
                    classifier.label(p.class),
                    p.probability * 100.0
                )?;
            }
            writeln!(out, "  [{:.2} ms]", ms(latency))
        }
        StreamEvent::Failed {
            index,
            arrival,
            error,
        } => writeln!(out, "frame {index} @ {:.1} ms: error: {error}", ms(arrival)),
    }
}

fn summary_text(s: &StreamSummary) -> String {
    let quantile = |q: Option<f64>| q.map_or("-".to_string(), |v| format!("{v:.2} ms"));
    format!(
        "{} frames read: {} classified, {} dropped, {} skipped, {} errors in {:.2} s ({:.1} frames/s)\n\
         latency median {} (p99 {}), inference median {}; per frame: decode {:.2} ms, preprocess {:.2} ms, inference {:.2} ms",
        s.frames_read,
        s.classified,
        s.dropped,
        s.skipped,
        s.errors,
        s.seconds,
        s.classified_per_second,
        quantile(s.latency_ms.median),
        quantile(s.latency_ms.p99),
        quantile(s.inference_ms.median),
        s.mean_stage_ms.decode,
        s.mean_stage_ms.preprocess,
        s.mean_stage_ms.inference,
    )
}

fn tract_version() -> &'static str {
    "tract-onnx 0.23.9"
}

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

fn bench(
    args: &ModelArgs,
    image: Option<&Path>,
    runs: usize,
    warmup: usize,
    profile: bool,
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
    let mut times = runtime::classifier::Profile::default();
    if profile {
        for _ in 0..runs {
            classifier.preprocess(&frame.frame())?;
            classifier.infer_profiled(&mut times)?;
        }
    }
    let operators = times.by_time();
    let per_frame = |time: &Duration| ms(*time) / runs as f64;
    if json {
        let operators: Vec<_> = operators
            .iter()
            .map(|(name, time, calls)| json!({"op": name, "ms_per_frame": per_frame(time), "calls_per_frame": calls / runs}))
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
    if !operators.is_empty() {
        let all = times.total();
        println!(
            "\n{:<32} {:>9} {:>6} {:>7}",
            "operator", "ms/frame", "share", "calls"
        );
        for (name, time, calls) in &operators {
            println!(
                "{name:<32} {:>9.3} {:>5.1}% {:>7}",
                per_frame(time),
                100.0 * time.as_secs_f64() / all.as_secs_f64(),
                calls / runs
            );
        }
    }
    Ok(())
}
