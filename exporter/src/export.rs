//! `exporter export`: the trained ViT as a standard, self-describing ONNX graph, verified
//! against burn's forward pass with tract before it is written.
//!
//! The graph mirrors `model.rs` op for op with the ops every runtime fuses: Conv patchify
//! (kernel = stride = patch), Concat for CLS, Add for position, LayerNormalization,
//! MatMul + Add projections, Reshape/Transpose for heads, Softmax, exact GELU (Erf below opset
//! 20, the Gelu op from 20), Gather for the CLS token. Weights are initializers.

use crate::data::{ImageSet, PreparedSet, Splits};
use crate::model::{LAYER_NORM_EPSILON, VisionTransformer};
use crate::onnx_graph::{Attr, Dim, GraphBuilder, encode};
use crate::training::{BestCheckpoint, RunResult, TrainError, TrainingConfig, load_result};
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use runtime::metadata;
use runtime::tract_onnx::prelude::Tensor as TractTensor;
use runtime::tract_onnx::prelude::{DatumExt, IntoRunnable};
use runtime::tract_onnx::prelude::{Framework, InferenceModelExt, TractError, tvec};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Largest difference to burn's logits an export may show.
pub const TOLERANCE: f32 = 1e-4;
pub const DEFAULT_OPSET: i64 = 17;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Run(#[from] TrainError),
    #[error("opset {0} is not supported (use 17 to 21)")]
    Opset(i64),
    #[error("no validation images to verify with: {0} (pass --data DIR)")]
    NoImages(String),
    #[error("tract cannot run the exported graph: {0}")]
    Tract(String),
    #[error(
        "verification failed: tract's outputs differ from burn's by {diff:.3e} (> {TOLERANCE:.0e}) at batch {batch}"
    )]
    Mismatch { diff: f32, batch: usize },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub path: PathBuf,
    pub bytes: usize,
    pub opset: i64,
    pub parameters: usize,
    pub op_histogram: BTreeMap<String, usize>,
    /// Max |tract − burn| over every output (logits, and attention maps when exported), per
    /// verified batch size.
    pub max_abs_diff: Vec<(usize, f32)>,
    pub attention_outputs: usize,
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub opset: i64,
    /// Dataset to take verification images from (default: the run's training data).
    pub data: Option<PathBuf>,
    /// Also output each block's attention weights averaged over heads, `attention.{block}`
    /// of shape `[batch, tokens, tokens]`, for `runtime explain`. Off by default: the plain
    /// graph computes logits only.
    pub with_attention: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            opset: DEFAULT_OPSET,
            data: None,
            with_attention: false,
        }
    }
}

/// Export the run's best weights to `out`.
pub fn export(
    run_dir: &Path,
    out: &Path,
    options: &ExportOptions,
) -> Result<ExportReport, ExportError> {
    let opset = options.opset;
    if !(17..=21).contains(&opset) {
        return Err(ExportError::Opset(opset));
    }
    let device = crate::backend::device();
    // The weights and the figures written into the metadata come from one committed state.
    let RunResult {
        config,
        model,
        best,
    } = load_result(run_dir, &device)?;
    let mut metadata = metadata_for(&config, best.as_ref());
    if options.with_attention {
        metadata.push((metadata::ATTENTION.into(), ATTENTION_LAYOUT.into()));
    }
    let graph = build_graph(&config, &model, opset, options.with_attention);
    let proto = graph.finish(opset, env!("CARGO_PKG_VERSION"), metadata);
    let bytes = encode(&proto);

    let images = verification_images(&config, options.data.as_deref())?;
    let mut max_abs_diff = Vec::new();
    for batch in [1, images.len().min(3)] {
        let diff = verify(
            &bytes,
            &model,
            &images,
            batch,
            &device,
            options.with_attention,
        )?;
        if diff > TOLERANCE {
            return Err(ExportError::Mismatch { diff, batch });
        }
        max_abs_diff.push((batch, diff));
    }
    runtime::write_atomic(out, &bytes).map_err(|source| ExportError::Write {
        path: out.display().to_string(),
        source,
    })?;
    let graph = proto.graph.as_ref().expect("built with a graph");
    Ok(ExportReport {
        path: out.to_path_buf(),
        bytes: bytes.len(),
        opset,
        parameters: graph
            .initializer
            .iter()
            .filter(|t| t.data_type == 1)
            .map(element_count)
            .sum(),
        op_histogram: op_histogram(graph),
        max_abs_diff,
        attention_outputs: graph.output.len() - 1,
    })
}

/// The value of the `vit.attention` metadata key: what the attention outputs hold.
pub const ATTENTION_LAYOUT: &str =
    "attention.{block}: [batch, tokens, tokens] softmax weights, mean over heads; token 0 is CLS";

fn metadata_for(config: &TrainingConfig, best: Option<&BestCheckpoint>) -> Vec<(String, String)> {
    let p = &config.preprocess;
    let mut entries = vec![
        (metadata::FORMAT, metadata::FORMAT_VERSION.to_string()),
        (metadata::LABELS, json(&config.classes)),
        (metadata::IMAGE_SIZE, p.image_size.to_string()),
        (metadata::CHANNELS, p.channels.to_string()),
        (metadata::MEAN, json(&p.mean)),
        (metadata::STD, json(&p.std)),
        (metadata::RESIZE, p.resize.to_string()),
        (
            metadata::PRESET,
            config
                .preset
                .map_or("custom".into(), |p| p.name().to_string()),
        ),
        (metadata::MODEL_CONFIG, json(&config.model)),
        (
            metadata::PRODUCER,
            format!("exporter {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    if let Some(best) = best
        && let Some(accuracy) = best.val_accuracy
    {
        entries.push((metadata::VAL_ACCURACY, format!("{accuracy:.6}")));
        entries.push((metadata::VAL_EPOCH, best.epoch.to_string()));
    }
    entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("metadata serialises")
}

fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("float tensor")
}

fn build_graph(
    config: &TrainingConfig,
    model: &VisionTransformer,
    opset: i64,
    with_attention: bool,
) -> GraphBuilder {
    let v = &config.model;
    let (d, p, c, s, heads) = (v.dim, v.patch_size, v.channels, v.image_size, v.heads);
    let head_dim = v.head_dim();
    let mut g = GraphBuilder::new("vit");
    g.input(
        "pixel_values",
        &[
            Dim::Symbol("batch"),
            Dim::Fixed(c),
            Dim::Fixed(s),
            Dim::Fixed(s),
        ],
    );

    // Shared constants.
    let flatten = g.ints("const.flatten_shape", &[3], vec![0, d as i64, -1]);
    let split_heads = g.ints(
        "const.heads_shape",
        &[4],
        vec![0, 0, heads as i64, head_dim as i64],
    );
    let merge_heads = g.ints("const.merge_shape", &[3], vec![0, 0, d as i64]);
    let qkv_split = g.ints("const.qkv_split", &[3], vec![d as i64; 3]);
    let cls_tail = g.ints("const.cls_tail_shape", &[2], vec![1, d as i64]);
    let cls_index = g.ints("const.cls_index", &[], vec![0]);
    let scale = g.weight(
        "const.attention_scale",
        &[],
        vec![1.0 / (head_dim as f32).sqrt()],
    );
    // ReduceMean's axes, an input from opset 18 (an attribute before): only when used.
    let head_axis =
        (with_attention && opset >= 18).then(|| g.ints("const.head_axis", &[1], vec![1]));
    let mut attention_maps = Vec::new();
    let (sqrt2, one, half) = (
        g.weight("const.sqrt2", &[], vec![std::f32::consts::SQRT_2]),
        g.weight("const.one", &[], vec![1.0]),
        g.weight("const.half", &[], vec![0.5]),
    );

    // Patch embedding: the Linear over (p1 p2 c) patches is a Conv with kernel = stride = p.
    let linear = values(model.patch_embedding.weight.val());
    let mut conv = vec![0.0; d * c * p * p];
    for out in 0..d {
        for ch in 0..c {
            for p1 in 0..p {
                for p2 in 0..p {
                    conv[((out * c + ch) * p + p1) * p + p2] =
                        linear[((p1 * p + p2) * c + ch) * d + out];
                }
            }
        }
    }
    let conv_w = g.weight("patch_embedding.weight", &[d, c, p, p], conv);
    let conv_b = g.weight(
        "patch_embedding.bias",
        &[d],
        bias_of(&model.patch_embedding, d),
    );
    let patches = g.node(
        "Conv",
        "patch_embedding",
        &["pixel_values", &conv_w, &conv_b],
        vec![
            ("kernel_shape", Attr::Ints(vec![p as i64; 2])),
            ("strides", Attr::Ints(vec![p as i64; 2])),
        ],
    );
    let patches = g.node(
        "Reshape",
        "patch_embedding.flatten",
        &[&patches, &flatten],
        vec![],
    );
    let patches = g.node(
        "Transpose",
        "patch_embedding.tokens",
        &[&patches],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );

    // CLS token expanded to the batch, prepended; position embedding added.
    let batch = g.node(
        "Shape",
        "batch_size",
        &["pixel_values"],
        vec![("start", Attr::Int(0)), ("end", Attr::Int(1))],
    );
    let cls_shape = g.node(
        "Concat",
        "cls_token.shape",
        &[&batch, &cls_tail],
        vec![("axis", Attr::Int(0))],
    );
    let cls = g.weight("cls_token", &[1, 1, d], values(model.cls_token.val()));
    let cls = g.node("Expand", "cls_token.expand", &[&cls, &cls_shape], vec![]);
    let tokens = g.node(
        "Concat",
        "tokens",
        &[&cls, &patches],
        vec![("axis", Attr::Int(1))],
    );
    let position = g.weight(
        "position_embedding",
        &[1, v.tokens(), d],
        values(model.position_embedding.val()),
    );
    let mut x = g.node(
        "Add",
        "position_embedding.add",
        &[&tokens, &position],
        vec![],
    );

    for (i, block) in model.blocks.iter().enumerate() {
        let b = format!("blocks.{i}");
        // Attention.
        let h = layer_norm(
            &mut g,
            &format!("{b}.attention_norm"),
            &x,
            &block.attention_norm,
            d,
        );
        let qkv = linear_node(
            &mut g,
            &format!("{b}.attn.qkv"),
            &h,
            &block.attention.qkv,
            d,
            3 * d,
        );
        let names = [
            format!("{b}.attn.q_flat"),
            format!("{b}.attn.k_flat"),
            format!("{b}.attn.v_flat"),
        ];
        let outputs: Vec<&str> = names.iter().map(String::as_str).collect();
        g.node_multi(
            "Split",
            &format!("{b}.attn.split"),
            &[&qkv, &qkv_split],
            &outputs,
            vec![("axis", Attr::Int(2))],
        );
        let mut heads_of = |which: &str, flat: &str, perm: Vec<i64>| {
            let r = g.node(
                "Reshape",
                &format!("{b}.attn.{which}_heads"),
                &[flat, &split_heads],
                vec![],
            );
            g.node(
                "Transpose",
                &format!("{b}.attn.{which}"),
                &[&r],
                vec![("perm", Attr::Ints(perm))],
            )
        };
        let q = heads_of("q", &names[0], vec![0, 2, 1, 3]);
        let k = heads_of("k_t", &names[1], vec![0, 2, 3, 1]);
        let vv = heads_of("v", &names[2], vec![0, 2, 1, 3]);
        let scores = g.node("MatMul", &format!("{b}.attn.scores"), &[&q, &k], vec![]);
        let scores = g.node(
            "Mul",
            &format!("{b}.attn.scaled_scores"),
            &[&scores, &scale],
            vec![],
        );
        let weights = g.node(
            "Softmax",
            &format!("{b}.attn.softmax"),
            &[&scores],
            vec![("axis", Attr::Int(-1))],
        );
        if with_attention {
            let name = format!("attention.{i}");
            let keep_dims = ("keepdims", Attr::Int(0));
            // ReduceMean takes its axes as an input from opset 18, as an attribute before.
            let mean = if opset >= 18 {
                g.node(
                    "ReduceMean",
                    &name,
                    &[&weights, head_axis.as_deref().expect("made for opset 18")],
                    vec![keep_dims],
                )
            } else {
                let axes = ("axes", Attr::Ints(vec![1]));
                g.node("ReduceMean", &name, &[&weights], vec![axes, keep_dims])
            };
            attention_maps.push(mean);
        }
        let context = g.node(
            "MatMul",
            &format!("{b}.attn.context"),
            &[&weights, &vv],
            vec![],
        );
        let context = g.node(
            "Transpose",
            &format!("{b}.attn.context_tokens"),
            &[&context],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let context = g.node(
            "Reshape",
            &format!("{b}.attn.merge_heads"),
            &[&context, &merge_heads],
            vec![],
        );
        let attended = linear_node(
            &mut g,
            &format!("{b}.attn.output"),
            &context,
            &block.attention.output,
            d,
            d,
        );
        x = g.node(
            "Add",
            &format!("{b}.attn.residual"),
            &[&x, &attended],
            vec![],
        );
        // MLP.
        let h = layer_norm(&mut g, &format!("{b}.mlp_norm"), &x, &block.mlp_norm, d);
        let hidden = linear_node(
            &mut g,
            &format!("{b}.mlp.hidden"),
            &h,
            &block.mlp.hidden,
            d,
            v.mlp_dim,
        );
        let activated = if opset >= 20 {
            g.node("Gelu", &format!("{b}.mlp.gelu"), &[&hidden], vec![])
        } else {
            // x · 0.5 · (1 + erf(x / √2)), in the order torch.onnx writes it (fusers match it).
            let n = |part: &str| format!("{b}.mlp.gelu.{part}");
            let scaled = g.node("Div", &n("div"), &[&hidden, &sqrt2], vec![]);
            let erf = g.node("Erf", &n("erf"), &[&scaled], vec![]);
            let plus_one = g.node("Add", &n("add"), &[&erf, &one], vec![]);
            let gated = g.node("Mul", &n("mul"), &[&hidden, &plus_one], vec![]);
            g.node("Mul", &format!("{b}.mlp.gelu"), &[&gated, &half], vec![])
        };
        let out = linear_node(
            &mut g,
            &format!("{b}.mlp.output"),
            &activated,
            &block.mlp.output,
            v.mlp_dim,
            d,
        );
        x = g.node("Add", &format!("{b}.mlp.residual"), &[&x, &out], vec![]);
    }

    let cls = g.node(
        "Gather",
        "cls",
        &[&x, &cls_index],
        vec![("axis", Attr::Int(1))],
    );
    let normed = layer_norm(&mut g, "norm", &cls, &model.norm, d);
    let head_w = g.weight(
        "head.weight",
        &[d, v.num_classes],
        values(model.head.weight.val()),
    );
    let head_b = g.weight(
        "head.bias",
        &[v.num_classes],
        bias_of(&model.head, v.num_classes),
    );
    let projected = g.node("MatMul", "head.matmul", &[&normed, &head_w], vec![]);
    g.node("Add", "logits", &[&projected, &head_b], vec![]);
    g.output("logits", &[Dim::Symbol("batch"), Dim::Fixed(v.num_classes)]);
    let tokens = v.tokens();
    for map in &attention_maps {
        let shape = [Dim::Symbol("batch"), Dim::Fixed(tokens), Dim::Fixed(tokens)];
        g.output(map, &shape);
    }
    g
}

fn bias_of(linear: &Linear, len: usize) -> Vec<f32> {
    linear
        .bias
        .as_ref()
        .map_or_else(|| vec![0.0; len], |b| values(b.val()))
}

fn linear_node(
    g: &mut GraphBuilder,
    name: &str,
    input: &str,
    linear: &Linear,
    d_in: usize,
    d_out: usize,
) -> String {
    let w = g.weight(
        &format!("{name}.weight"),
        &[d_in, d_out],
        values(linear.weight.val()),
    );
    let b = g.weight(&format!("{name}.bias"), &[d_out], bias_of(linear, d_out));
    let product = g.node("MatMul", &format!("{name}.matmul"), &[input, &w], vec![]);
    g.node("Add", name, &[&product, &b], vec![])
}

fn layer_norm(g: &mut GraphBuilder, name: &str, input: &str, norm: &LayerNorm, d: usize) -> String {
    let gamma = g.weight(&format!("{name}.weight"), &[d], values(norm.gamma.val()));
    let beta = g.weight(
        &format!("{name}.bias"),
        &[d],
        norm.beta
            .as_ref()
            .map_or_else(|| vec![0.0; d], |b| values(b.val())),
    );
    g.node(
        "LayerNormalization",
        name,
        &[input, &gamma, &beta],
        vec![
            ("axis", Attr::Int(-1)),
            ("epsilon", Attr::Float(LAYER_NORM_EPSILON as f32)),
        ],
    )
}

fn element_count(t: &runtime::tract_onnx::pb::TensorProto) -> usize {
    t.dims.iter().product::<i64>().max(1) as usize
}

pub fn op_histogram(graph: &runtime::tract_onnx::pb::GraphProto) -> BTreeMap<String, usize> {
    let mut histogram = BTreeMap::new();
    for node in &graph.node {
        *histogram.entry(node.op_type.clone()).or_insert(0) += 1;
    }
    histogram
}

/// Up to 4 preprocessed validation images (training images for a run without validation) of the
/// run's data (or of `data`).
fn verification_images(
    config: &TrainingConfig,
    data: Option<&Path>,
) -> Result<PreparedSet, ExportError> {
    let root = data.unwrap_or(&config.data);
    let no_images = |why: String| ExportError::NoImages(why);
    let splits = Splits::from_folder(root, config.val_fraction, config.seed)
        .map_err(|e| no_images(format!("{}: {e}", root.display())))?;
    let items = match splits.val.is_empty() {
        true => &splits.train,
        false => &splits.val,
    };
    let set = ImageSet::load(&items[..items.len().min(4)], &|_| {});
    if set.is_empty() {
        return Err(no_images(format!(
            "{} has no readable images",
            root.display()
        )));
    }
    PreparedSet::new(&set, &config.preprocess).map_err(|e| no_images(e.to_string()))
}

/// Max |tract − burn| over the outputs (logits, then attention maps) of the first `batch`
/// images.
fn verify(
    bytes: &[u8],
    model: &VisionTransformer,
    images: &PreparedSet,
    batch: usize,
    device: &Device,
    with_attention: bool,
) -> Result<f32, ExportError> {
    let p = &images.config;
    let (c, s) = (p.channels as usize, p.image_size as usize);
    let pixels: Vec<f32> = (0..batch).flat_map(|i| images.image(i).to_vec()).collect();
    let tract = |e: TractError| ExportError::Tract(format!("{e:#}"));
    let runnable = runtime::tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .map_err(tract)?
        .with_input_fact(0, f32::fact([batch, c, s, s]).into())
        .map_err(tract)?
        .into_optimized()
        .map_err(tract)?
        .into_runnable()
        .map_err(tract)?;
    let input = TractTensor::from_shape(&[batch, c, s, s], &pixels).map_err(tract)?;
    let outputs = runnable.run(tvec!(input.into())).map_err(tract)?;
    let input = Tensor::<4>::from_data(TensorData::new(pixels, [batch, c, s, s]), device);
    let reference: Vec<Vec<f32>> = if with_attention {
        let (logits, maps) = model.forward_with_attention(input);
        std::iter::once(values(logits))
            .chain(maps.into_iter().map(values))
            .collect()
    } else {
        vec![values(model.forward(input))]
    };
    if outputs.len() != reference.len() {
        return Err(ExportError::Tract(format!(
            "the graph has {} outputs, burn's model {}",
            outputs.len(),
            reference.len()
        )));
    }
    let mut max_diff = 0.0f32;
    for (ours, reference) in outputs.iter().zip(&reference) {
        let ours = ours.to_plain_array_view::<f32>().map_err(tract)?;
        if ours.len() != reference.len() {
            return Err(ExportError::Tract(format!(
                "an output has {} values, burn's {}",
                ours.len(),
                reference.len()
            )));
        }
        max_diff = ours
            .iter()
            .zip(reference)
            .map(|(a, b)| (a - b).abs())
            .fold(max_diff, f32::max);
    }
    Ok(max_diff)
}

/// What `exporter inspect` prints about an ONNX file.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub producer: String,
    pub opset: Vec<(String, i64)>,
    pub inputs: Vec<(String, Vec<String>)>,
    pub outputs: Vec<(String, Vec<String>)>,
    pub parameters: usize,
    pub op_histogram: BTreeMap<String, usize>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an ONNX model ({reason})")]
    NotOnnx { path: String, reason: String },
}

pub fn inspect(path: &Path) -> Result<Inspection, InspectError> {
    let bytes = std::fs::read(path).map_err(|source| InspectError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let not_onnx = |reason: String| InspectError::NotOnnx {
        path: path.display().to_string(),
        reason,
    };
    let model = crate::onnx_graph::decode(&bytes).map_err(|e| not_onnx(e.to_string()))?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| not_onnx("no graph".into()))?;
    if graph.node.is_empty() {
        return Err(not_onnx("the graph has no nodes".into()));
    }
    let shape = |info: &runtime::tract_onnx::pb::ValueInfoProto| -> (String, Vec<String>) {
        use runtime::tract_onnx::pb::{tensor_shape_proto::dimension::Value, type_proto};
        let dims = match info.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(type_proto::Value::TensorType(t)) => t
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(Value::DimValue(v)) => v.to_string(),
                            Some(Value::DimParam(p)) => p.clone(),
                            None => "?".into(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            _ => vec![],
        };
        (info.name.clone(), dims)
    };
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    Ok(Inspection {
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
        opset: model
            .opset_import
            .iter()
            .map(|o| (o.domain.clone(), o.version))
            .collect(),
        inputs: graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(shape)
            .collect(),
        outputs: graph.output.iter().map(shape).collect(),
        parameters: graph
            .initializer
            .iter()
            .filter(|t| t.data_type == 1)
            .map(element_count)
            .sum(),
        op_histogram: op_histogram(graph),
        metadata: model
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect(),
    })
}
