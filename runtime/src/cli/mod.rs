//! The command line: flags, the model they load, and the dispatch to one module per command.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use runtime::classifier::Profile;
use runtime::explain::{Method, Token};
use runtime::{KeepPolicy, Model, ModelOptions, Precision, ResizeMode, StreamConfig, StreamFormat};
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod bench;
mod classify;
mod eval;
mod explain;
mod info;
mod logits;
mod quantize;
mod stream;

use stream::FrameSize;

#[derive(Parser)]
#[command(
    name = "runtime",
    version,
    about = "Classify frames with a Vision Transformer (ONNX, on tract)"
)]
pub(crate) struct Cli {
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
        /// Whose attention: cls, or distillation (a DeiT's distillation token, which learnt a
        /// teacher's answers).
        #[arg(long, default_value = "cls")]
        token: Token,
        /// The overlay PNG (the input's size).
        #[arg(short, long)]
        out: PathBuf,
        /// Also save every block's attention of the token, side by side, as one PNG.
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
        /// Like --profile, one line per node of the optimised graph (its number, name and what
        /// it computes), to find the slow layer.
        #[arg(long)]
        profile_nodes: bool,
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

/// `Ok(false)`: the command ran but some input failed.
pub(crate) fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Classify {
            images,
            model,
            top_k,
            json,
            logits,
        } => classify::run(&images, &model, top_k, json, logits),
        Command::Info { model, graph, json } => info::run(&model, graph, json).map(|_| true),
        Command::Logits {
            model,
            input,
            batch,
            json,
        } => logits::run(&model, &input, batch, json).map(|_| true),
        Command::Eval {
            model_path,
            mut model,
            data,
            json,
        } => {
            model.model = model_path.or(model.model);
            eval::run(&model, &data, json).map(|_| true)
        }
        Command::Quantize {
            model_path,
            mut model,
            weights_only,
            out,
            json,
        } => {
            model.model = model_path.or(model.model);
            quantize::run(&model, weights_only, &out, json).map(|_| true)
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
            stream::run(input.as_deref(), &config, &model, top_k, json)
        }
        Command::Explain {
            image,
            model,
            method,
            token,
            out,
            grid,
            json,
        } => explain::run(&image, &model, method, token, &out, grid.as_deref(), json).map(|_| true),
        Command::Bench {
            model,
            image,
            runs,
            warmup,
            profile,
            profile_nodes,
            json,
        } => {
            let profile = match (profile, profile_nodes) {
                (_, true) => Some(Profile::by_node()),
                (true, false) => Some(Profile::default()),
                (false, false) => None,
            };
            bench::run(&model, image.as_deref(), runs, warmup, profile, json).map(|_| true)
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
