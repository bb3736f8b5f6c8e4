//! Loading an ONNX classifier into tract: metadata (or flags) → preprocessing and labels,
//! input fixed to `[1, C, H, W]`, optimised once.

pub mod embedded;
pub mod metadata;
pub mod precision;
pub mod quantize;

mod checks;
mod introspect;

pub use introspect::cpu_features;

use checks::{check_shapes_agree, check_wiring, declared_shape, parse, parse_json};

use self::precision::Precision;
use crate::metadata as key;
use crate::ops::{Isa, IsaError};
use crate::preprocess::{PreprocessConfig, ResizeMode, per_channel};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::{
    DatumExt, Framework, InferenceModel, InferenceModelExt, IntoRunnable, TractResult, TypedModel,
    TypedRunnableModel,
};

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model file (or a labels file) could not be read.
    #[error("cannot read model {path}: {error}")]
    Io {
        /// The file's path.
        path: String,
        /// The underlying I/O error.
        error: std::io::Error,
    },
    /// The bytes are no ONNX protobuf, or hold no graph or a graph without nodes.
    #[error("not an ONNX model: {0}")]
    NotOnnx(String),
    /// The graph's input is not an f32 tensor of rank 4.
    #[error("the model's input is not an image tensor [N, C, H, W]: {0}")]
    NotAnImage(String),
    /// Neither the options, the input's shape nor the metadata give a needed value: what is
    /// missing, and the command-line option that supplies it.
    #[error("the model does not say its {0}: pass it as an option (e.g. --{1})")]
    Missing(&'static str, &'static str),
    /// A `vit.*` metadata value does not parse.
    #[error("metadata {key} is unreadable: {reason}")]
    BadMetadata {
        /// The metadata key (one of [`crate::metadata`]'s).
        key: &'static str,
        /// The parser's error.
        reason: String,
    },
    /// Options, metadata and graph disagree (input shape, label count, output shape), or the
    /// preprocessing they describe is invalid.
    #[error("{0}")]
    Mismatch(String),
    /// tract could not analyse, type, optimise or plan the graph.
    #[error("tract cannot prepare the model: {0}")]
    Tract(String),
    /// The graph is miswired: it has no outputs, or reads a value that nothing produces.
    #[error("malformed model: {0}")]
    Malformed(String),
    /// A panic escaped tract while loading (caught in builds that unwind); its message.
    #[error("internal error (panic) while loading the model: {0}")]
    Panic(String),
    /// The precision asked for does not suit the file: int8 of a float model, or f32 or f16 of an
    /// int8 one.
    #[error("{0}")]
    Precision(String),
    /// The instruction set asked for (options or `RUNTIME_ISA`) is unknown or not on this CPU.
    #[error(transparent)]
    Isa(#[from] IsaError),
    /// Attention maps were asked for, but the graph has no `attention.N` outputs.
    #[error(
        "the model has no attention outputs: export it with `exporter export --with-attention` (the shipped model has them)"
    )]
    NoAttention,
    /// Attention maps were asked for from a model of an architecture without attention (its
    /// `vit.architecture`, e.g. `resnet`).
    #[error(
        "a {0} model has no attention over the whole image to show (a CNN has none, a Swin's stays within windows): explain needs a ViT"
    )]
    NoAttentionInArchitecture(String),
}

/// What the caller knows about a model that its metadata may lack (third-party exports).
/// Every field set here wins over the metadata.
#[derive(Clone, Debug, Default)]
pub struct ModelOptions {
    /// Square input side in pixels (`vit.image_size`); must match a fixed input shape.
    pub image_size: Option<u32>,
    /// Input channels, 1 for grey or 3 for RGB (`vit.channels`); must match a fixed input shape.
    pub channels: Option<u32>,
    /// Per-channel mean of pixels scaled to [0, 1] (`vit.mean`); a single value serves every
    /// channel. Without it and the metadata: 0.5.
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation (`vit.std`), given like `mean`. Without it and the metadata:
    /// 0.5.
    pub std: Option<Vec<f32>>,
    /// How frames reach the square input (`vit.resize`); without it and the metadata,
    /// [`ResizeMode::Squash`].
    pub resize: Option<ResizeMode>,
    /// Class names in output order (`vit.labels`); without them and the metadata, `class_0`,
    /// `class_1`, ….
    pub labels: Option<Vec<String>>,
    /// Keep the `attention.N` outputs (for `runtime explain`). Otherwise only the logits are
    /// computed, whatever else the file outputs.
    pub attention: bool,
    /// The arithmetic to run in; `None` runs the file as it is (f32, or int8 if quantized).
    pub precision: Option<Precision>,
    /// The instruction set of the runtime's own operators' kernels; `None` takes the one
    /// `RUNTIME_ISA` names, else the best this CPU runs.
    pub isa: Option<Isa>,
}

impl ModelOptions {
    /// Read a labels file: one class name per line, blank lines ignored.
    pub fn labels_from_file(path: &Path) -> Result<Vec<String>, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|error| ModelError::Io {
            path: path.display().to_string(),
            error,
        })?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }
}

/// A loaded, optimised model and everything needed to feed and read it.
#[derive(Clone, Debug)]
pub struct Model {
    /// The optimised tract plan, which a [`Classifier`](crate::Classifier) runs.
    pub plan: Arc<TypedRunnableModel>,
    /// How frames become the input tensor: size, channels, normalisation, resize mode.
    pub preprocess: PreprocessConfig,
    /// Class names in output order, one per logit.
    pub labels: Vec<String>,
    /// Name of the graph's input node.
    pub input_name: String,
    /// Name of the node whose output is the logits.
    pub output_name: String,
    /// Attention maps the plan outputs after the logits (0 unless asked for).
    pub attention_layers: usize,
    /// The arithmetic the plan runs in.
    pub precision: Precision,
    /// The instruction set of the runtime's own operators' kernels.
    pub isa: Isa,
    /// `onnx.metadata_props` of the file, by key.
    pub metadata: BTreeMap<String, String>,
}

/// Operators that quantize activations: a file with any of them computes in int8.
const QUANTIZING_OPS: [&str; 5] = [
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "MatMulInteger",
    "QLinearMatMul",
    "ConvInteger",
];

/// A tract error as a [`ModelError`], with its whole chain of causes.
fn tract(error: tract_onnx::prelude::TractError) -> ModelError {
    ModelError::Tract(format!("{error:#}"))
}

impl Model {
    /// Load a model from an ONNX file, as [`Model::from_bytes`] does.
    pub fn load(path: &Path, options: &ModelOptions) -> Result<Model, ModelError> {
        let bytes = std::fs::read(path).map_err(|error| ModelError::Io {
            path: path.display().to_string(),
            error,
        })?;
        Model::from_bytes(&bytes, options)
    }

    /// Load a model from the bytes of an ONNX file. A malformed file is an error, never a
    /// panic: what tract asserts on is checked first, and in builds that unwind a panic that
    /// still escapes tract becomes [`ModelError::Panic`].
    pub fn from_bytes(bytes: &[u8], options: &ModelOptions) -> Result<Model, ModelError> {
        crate::catch_panic(|| Model::from_bytes_unguarded(bytes, options))
            .unwrap_or_else(|message| Err(ModelError::Panic(message)))
    }

    fn from_bytes_unguarded(bytes: &[u8], options: &ModelOptions) -> Result<Model, ModelError> {
        let (isa, isa_forced) = Isa::choose(options.isa)?;
        let mut onnx = tract_onnx::onnx();
        // Parse the protobuf first so a non-ONNX file gets its own error, not a tract trace.
        let mut proto = onnx
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| ModelError::NotOnnx(format!("{e}")))?;
        // Shapes recorded for intermediate values are hints tract would hold the graph to;
        // a file whose hints keep a symbolic batch (onnxruntime's quantizer writes them)
        // then contradicts the batch of one set below. tract infers every shape anyway.
        if let Some(graph) = proto.graph.as_mut() {
            graph.value_info.clear();
            crate::quantize::unquantize_activations(graph);
        }
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| ModelError::NotOnnx("no graph".into()))?;
        if graph.node.is_empty() {
            return Err(ModelError::NotOnnx("the graph has no nodes".into()));
        }
        check_wiring(graph)?;
        let metadata: BTreeMap<String, String> = proto
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        let stored = match metadata.get(key::QUANTIZATION) {
            Some(scheme) if crate::quantize::computes_in_int8(scheme) => Precision::Int8,
            Some(_) => Precision::F32,
            // A third party's file (onnxruntime's quantize_dynamic or quantize_static).
            None if graph
                .node
                .iter()
                .any(|n| QUANTIZING_OPS.contains(&&*n.op_type)) =>
            {
                Precision::Int8
            }
            None => Precision::F32,
        };
        let precision = options.precision.unwrap_or(stored);
        match (stored, precision) {
            (Precision::F32, Precision::Int8) => {
                return Err(ModelError::Precision(
                    "this is a float model: make an int8 copy with `runtime quantize MODEL -o MODEL.int8.onnx`".into(),
                ));
            }
            (Precision::Int8, Precision::F32 | Precision::F16) => {
                return Err(ModelError::Precision(format!(
                    "this model is int8-quantized: {precision} needs the float model it was made from"
                )));
            }
            _ => {}
        }
        if precision != Precision::F16 {
            // f16's translator knows tract's own operators only.
            crate::ops::layer_norm::register(&mut onnx);
        }
        let mut model = onnx.model_for_proto_model(&proto).map_err(tract)?;

        let input_fact = model.input_fact(0).map_err(tract)?.clone();
        let declared = declared_shape(&input_fact)?;
        // What the caller passed wins, and the metadata is read only when needed: a malformed
        // key that an option replaces does not fail the load.
        let channels = match options.channels.or(declared[1]) {
            Some(channels) => channels,
            None => parse(&metadata, key::CHANNELS)?
                .ok_or(ModelError::Missing("channel count", "channels"))?,
        };
        let image_size = match options
            .image_size
            .or(declared[2].filter(|h| declared[3] == Some(*h)))
        {
            Some(size) => size,
            None => parse(&metadata, key::IMAGE_SIZE)?
                .ok_or(ModelError::Missing("input size", "input-size"))?,
        };
        for (axis, name, want) in [
            (1, "channels", channels),
            (2, "height", image_size),
            (3, "width", image_size),
        ] {
            if let Some(have) = declared[axis].filter(|have| *have != want) {
                return Err(ModelError::Mismatch(format!(
                    "the model's input {name} is {have}, not {want}"
                )));
            }
        }
        let n = channels as usize;
        let mean = match options.mean.clone() {
            Some(mean) => mean,
            None => parse_json(&metadata, key::MEAN)?.unwrap_or_else(|| vec![0.5; n]),
        };
        let std = match options.std.clone() {
            Some(std) => std,
            None => parse_json(&metadata, key::STD)?.unwrap_or_else(|| vec![0.5; n]),
        };
        let resize = match options.resize {
            Some(mode) => mode,
            None => match metadata.get(key::RESIZE) {
                Some(text) => {
                    text.parse()
                        .map_err(|e: crate::PreprocessError| ModelError::BadMetadata {
                            key: key::RESIZE,
                            reason: e.to_string(),
                        })?
                }
                None => ResizeMode::default(),
            },
        };
        let preprocess = PreprocessConfig {
            image_size,
            channels,
            mean: per_channel(mean, n),
            std: per_channel(std, n),
            resize,
        };
        preprocess
            .validate()
            .map_err(|e| ModelError::Mismatch(e.to_string()))?;

        let shape = [
            1,
            channels as usize,
            image_size as usize,
            image_size as usize,
        ];
        model = model
            .with_input_fact(0, f32::fact(shape).into())
            .map_err(tract)?;
        let input_name = model
            .node(model.input_outlets().map_err(tract)?[0].node)
            .name
            .clone();
        let outlets = model.output_outlets().map_err(tract)?.to_vec();
        let logits = *outlets
            .first()
            .ok_or_else(|| ModelError::Malformed("the graph has no outputs".into()))?;
        let output_name = model.node(logits.node).name.clone();
        // Outputs beyond the logits (attention maps) cost time: keep them only when asked.
        let mut keep = vec![logits];
        if options.attention {
            let attention = graph
                .output
                .iter()
                .zip(&outlets)
                .filter(|(info, _)| info.name.starts_with("attention."))
                .map(|(_, outlet)| *outlet);
            keep.extend(attention);
            if keep.len() == 1 {
                // A ViT, distilled or not, has the maps once exported with them.
                return Err(match metadata.get(key::ARCHITECTURE) {
                    Some(architecture) if !matches!(architecture.as_str(), "vit" | "deit") => {
                        ModelError::NoAttentionInArchitecture(architecture.clone())
                    }
                    _ => ModelError::NoAttention,
                });
            }
        }
        let attention_layers = keep.len() - 1;
        model.select_output_outlets(&keep).map_err(tract)?;
        check_shapes_agree(&mut model, graph)?;
        // The f16 translator and the attention fusion work on the decluttered graph;
        // into_optimized declutters anyway.
        let mut typed = model.into_typed().map_err(tract)?;
        if precision != Precision::F16 {
            fuse_before_declutter(&mut typed, isa, isa_forced).map_err(tract)?;
        }
        let mut typed = typed.into_decluttered().map_err(tract)?;
        // Checked before the fusions, which assume at least one class.
        let output = typed.output_fact(0).map_err(tract)?;
        let classes = match output.shape.as_concrete() {
            Some([1, 0]) => {
                return Err(ModelError::Mismatch(
                    "the model's logits have 0 classes".into(),
                ));
            }
            Some(dims) if dims.len() == 2 && dims[0] == 1 => dims[1],
            _ => {
                return Err(ModelError::Mismatch(format!(
                    "the model's output is {output:?}, not [1, classes] logits"
                )));
            }
        };
        if precision == Precision::F16 {
            if !tract_linalg::has_fp16() {
                log::warn!(
                    "this CPU has no fp16 arithmetic: f16 only stores values here, and every \
                     operation converts them, so it runs far slower than f32"
                );
            }
            typed = precision::to_f16(typed).map_err(tract)?;
        } else {
            fuse_decluttered(&mut typed, precision, isa, isa_forced).map_err(tract)?;
        }
        let optimized = optimize(typed, isa).map_err(tract)?;
        let labels = match options.labels.clone() {
            Some(labels) => Some(labels),
            None => parse_json(&metadata, key::LABELS)?,
        };
        let labels = match labels {
            Some(labels) if labels.len() != classes => {
                return Err(ModelError::Mismatch(format!(
                    "{} labels for a model with {classes} outputs",
                    labels.len()
                )));
            }
            Some(labels) => labels,
            None => (0..classes).map(|c| format!("class_{c}")).collect(),
        };
        let plan = optimized.into_runnable().map_err(tract)?;
        Ok(Model {
            plan,
            preprocess,
            labels,
            input_name,
            output_name,
            attention_layers,
            precision,
            isa,
            metadata,
        })
    }

    /// Number of classes: the logits the model outputs.
    pub fn classes(&self) -> usize {
        self.labels.len()
    }
}

/// `model` optimised with the runtime's own f32 operators where they beat tract's on this CPU:
/// what a [`Model`] runs, for any input shape the model was given (the exporter's
/// distillation teacher runs several images at a time).
pub fn optimized_f32(model: InferenceModel) -> TractResult<TypedModel> {
    let isa = Isa::best();
    let mut typed = model.into_typed()?;
    fuse_before_declutter(&mut typed, isa, false)?;
    let mut typed = typed.into_decluttered()?;
    fuse_decluttered(&mut typed, Precision::F32, isa, false)?;
    optimize(typed, isa)
}

/// The fusions that need the graph as the file wrote it: convolutions, before declutter turns
/// strided 1×1 ones into a Downsample and a product (with the constants propagated, so the
/// kernels and biases are known).
fn fuse_before_declutter(typed: &mut TypedModel, isa: Isa, isa_forced: bool) -> TractResult<()> {
    if isa_forced || crate::ops::dense::beats_tract(isa) {
        typed.prop_consts()?;
        crate::ops::conv::fuse_conv(typed, isa)?;
    }
    Ok(())
}

/// The fusions of a decluttered f32 or int8 graph.
fn fuse_decluttered(
    typed: &mut TypedModel,
    precision: Precision,
    isa: Isa,
    isa_forced: bool,
) -> TractResult<()> {
    crate::ops::layer_norm::fuse_decomposed(typed, isa)?;
    crate::ops::attention::fuse_attention(typed, isa)?;
    // A kernel asked for runs even where tract's would be faster: that is what asking for it
    // is for (tests, comparisons). The int8 products go first: a QDQ file's are f32 products
    // by the time tract has folded its weights.
    if isa_forced || crate::ops::dense_int8::beats_tract(isa) {
        crate::ops::dense_int8::fuse_int8_dense(typed, isa)?;
    }
    if precision == Precision::Int8 {
        crate::ops::attention::use_int8(typed, isa);
    }
    if isa_forced || crate::ops::dense::beats_tract(isa) {
        crate::ops::dense::fuse_dense(typed, isa)?;
        crate::ops::conv::fuse_conv(typed, isa)?;
    }
    Ok(())
}

/// tract's optimisation, then the runtime's own softmax and LayerNorm kernels.
fn optimize(typed: TypedModel, isa: Isa) -> TractResult<TypedModel> {
    let mut optimized = typed.into_optimized()?;
    crate::ops::softmax::use_row_softmax(&mut optimized, isa);
    crate::ops::layer_norm::use_isa(&mut optimized, isa);
    Ok(optimized)
}
