//! Static post-training int8 quantization of an ONNX classifier, calibrated on real images.
//!
//! Every `MatMul` whose right operand is a constant 2-D float matrix (the projections, the MLP
//! and the head) becomes
//!
//! ```text
//! QuantizeLinear(x, s_x, z_x) → MatMulInteger(·, W_q, z_x) → Cast(float) → Mul(s_x · s_w)
//! ```
//!
//! with `W_q` int8 per output column (symmetric, `s_w[n] = max|W[:, n]| / 127`) and `x` int8
//! per tensor (asymmetric, its range measured over the calibration images). tract lowers
//! MatMulInteger to its integer kernels (AVX2/VNNI on x86, SDOT on aarch64); QDQ pairs around a
//! float MatMul would stay f32 in tract. LayerNorm, Softmax, GELU, the attention products (two
//! activations) and the patch convolution stay f32.

use crate::decode::decode_file;
use crate::metadata as key;
use crate::model::{Model, ModelError, ModelOptions};
use crate::preprocess::PatchPipeline;
use prost::Message;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tract_onnx::pb::{
    AttributeProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto, ValueInfoProto,
    attribute_proto::AttributeType, tensor_proto::DataType,
};
use tract_onnx::prelude::{
    DatumExt, Framework, InferenceModelExt, IntoRunnable, TValue, Tensor, tvec,
};

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("no calibration images: {0}")]
    NoImages(String),
    #[error("none of the {0} calibration images could be decoded")]
    NoneDecoded(usize),
    #[error("the model is already int8-quantized")]
    AlreadyQuantized,
    #[error("nothing to quantize: the model has no MatMul with constant 2-D float weights")]
    NothingToQuantize,
    #[error("the model's opset {0} is older than {1}, the first with per-axis (De)QuantizeLinear")]
    OldOpset(i64, i64),
    #[error("initializer {0} is unreadable: {1}")]
    BadInitializer(String, String),
    #[error("calibration run failed: {0}")]
    Tract(String),
}

/// What [`quantize`] did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QuantizeReport {
    pub calibration_images: usize,
    /// Calibration files that could not be decoded (skipped).
    pub skipped_images: usize,
    /// Products now on int8 weights, and those left in float.
    pub int8_products: usize,
    pub float_products: usize,
    pub float_bytes: usize,
    pub int8_bytes: usize,
}

/// Quantize `onnx` (a float model) with activation ranges measured on `images`; returns the
/// int8 file's bytes. `options` are what [`Model::from_bytes`] takes (for third-party models
/// whose metadata lacks the preprocessing).
pub fn quantize(
    onnx: &[u8],
    options: &ModelOptions,
    images: &[PathBuf],
) -> Result<(Vec<u8>, QuantizeReport), QuantizeError> {
    if images.is_empty() {
        return Err(QuantizeError::NoImages("the image list is empty".into()));
    }
    let (model, mut proto) = float_model(onnx, options)?;

    let graph = proto
        .graph
        .as_ref()
        .expect("Model::from_bytes checked the graph");
    let weights: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let is_weight_matrix = |name: &str| {
        weights
            .get(name)
            .is_some_and(|t| t.dims.len() == 2 && t.data_type == DataType::Float as i32)
    };
    let products: Vec<&NodeProto> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "MatMul" && n.input.len() == 2 && is_weight_matrix(&n.input[1]))
        .collect();
    if products.is_empty() {
        return Err(QuantizeError::NothingToQuantize);
    }
    let float_products =
        graph.node.iter().filter(|n| n.op_type == "MatMul").count() - products.len();
    let mut activations: Vec<String> = Vec::new();
    for node in &products {
        if !activations.contains(&node.input[0]) {
            activations.push(node.input[0].clone());
        }
    }

    let (ranges, decoded) = calibrate(&proto, &model, &activations, images)?;
    let weights: HashMap<String, TensorProto> = graph
        .initializer
        .iter()
        .filter(|t| products.iter().any(|n| n.input[1] == t.name))
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    let int8_products = products.len();

    let graph = proto.graph.as_mut().expect("checked above");
    let mut nodes = Vec::with_capacity(graph.node.len() + 4 * int8_products);
    let mut quantized_activations: HashMap<String, String> = HashMap::new();
    let mut quantized_weights: HashMap<String, (String, Vec<f32>)> = HashMap::new();
    let mut initializers: Vec<TensorProto> = Vec::new();
    for node in std::mem::take(&mut graph.node) {
        let is_product = node.op_type == "MatMul"
            && node.input.len() == 2
            && weights.contains_key(&node.input[1]);
        if !is_product {
            nodes.push(node);
            continue;
        }
        let (x, w, y) = (&node.input[0], &node.input[1], &node.output[0]);
        let (x_scale, x_zero) = activation_quantization(ranges[x]);
        let x_q = quantized_activations
            .entry(x.clone())
            .or_insert_with(|| {
                let q = format!("{x}.int8");
                initializers.push(scalar_f32(&format!("{q}.scale"), x_scale));
                initializers.push(scalar_i8(&format!("{q}.zero_point"), x_zero));
                nodes.push(plain_node(
                    "QuantizeLinear",
                    &q,
                    &[x, &format!("{q}.scale"), &format!("{q}.zero_point")],
                    &q,
                ));
                q
            })
            .clone();
        if !quantized_weights.contains_key(w) {
            let (dims, values) = float_values(&weights[w])?;
            let (columns, scales) = quantize_symmetric(&values, &dims, 1);
            let w_q = format!("{w}.int8");
            initializers.push(int8_tensor(&w_q, &weights[w].dims, &columns));
            quantized_weights.insert(w.clone(), (w_q, scales));
        }
        let (w_q, w_scales) = &quantized_weights[w];
        let output_scales: Vec<f32> = w_scales.iter().map(|s| s * x_scale).collect();
        let (accumulated, as_float, scale) = (
            format!("{y}.int32"),
            format!("{y}.float"),
            format!("{y}.scale"),
        );
        initializers.push(vector_f32(&scale, &output_scales));
        nodes.push(plain_node(
            "MatMulInteger",
            &accumulated,
            &[&x_q, w_q, &format!("{x_q}.zero_point")],
            &accumulated,
        ));
        let mut cast = plain_node("Cast", &as_float, &[&accumulated], &as_float);
        cast.attribute
            .push(int_attribute("to", DataType::Float as i64));
        nodes.push(cast);
        nodes.push(plain_node("Mul", &node.name, &[&as_float, &scale], y));
    }
    graph.node = nodes;
    let still_used: HashSet<&String> = graph.node.iter().flat_map(|n| &n.input).collect();
    graph
        .initializer
        .retain(|t| !quantized_weights.contains_key(&t.name) || still_used.contains(&t.name));
    graph.initializer.extend(initializers);
    store_int8(graph)?;

    let scheme = serde_json::json!({
        "scheme": "static int8",
        "compute": "int8",
        "weights": "int8, symmetric, per output channel",
        "activations": "int8, asymmetric, per tensor, min/max over the calibration images",
        "other_weights": "large float constants stored int8 per channel, dequantized at load",
        "products": "MatMul with constant weights -> MatMulInteger; the rest stays f32",
        "int8_products": int8_products,
        "float_products": float_products,
        "calibration_images": decoded,
    });
    let bytes = encode_with_scheme(proto, &scheme);
    let report = QuantizeReport {
        calibration_images: decoded,
        skipped_images: images.len() - decoded,
        int8_products,
        float_products,
        float_bytes: onnx.len(),
        int8_bytes: bytes.len(),
    };
    Ok((bytes, report))
}

/// Store every large float constant (weight matrices included) as int8, per output channel,
/// behind a `DequantizeLinear` that tract folds at load: a file about 4× smaller that runs
/// exactly the f32 graph (f32 kernels, f32 speed) with rounded weights. No calibration.
pub fn quantize_weights(
    onnx: &[u8],
    options: &ModelOptions,
) -> Result<(Vec<u8>, QuantizeReport), QuantizeError> {
    let (_, mut proto) = float_model(onnx, options)?;
    let graph = proto
        .graph
        .as_mut()
        .expect("Model::from_bytes checked the graph");
    let float_products = graph.node.iter().filter(|n| n.op_type == "MatMul").count();
    let stored = store_int8(graph)?;
    if stored == 0 {
        return Err(QuantizeError::NothingToQuantize);
    }
    let scheme = serde_json::json!({
        "scheme": "int8 weights",
        "compute": "f32",
        "weights": "large float constants stored int8, symmetric, per output channel, dequantized at load",
    });
    let bytes = encode_with_scheme(proto, &scheme);
    let report = QuantizeReport {
        calibration_images: 0,
        skipped_images: 0,
        int8_products: 0,
        float_products,
        float_bytes: onnx.len(),
        int8_bytes: bytes.len(),
    };
    Ok((bytes, report))
}

/// The file's bytes, its metadata recording `scheme` under [`key::QUANTIZATION`].
fn encode_with_scheme(mut proto: ModelProto, scheme: &serde_json::Value) -> Vec<u8> {
    proto.metadata_props.push(StringStringEntryProto {
        key: key::QUANTIZATION.into(),
        value: scheme.to_string(),
    });
    proto.encode_to_vec()
}

/// Whether a file's quantization (the `vit.quantization` JSON) runs integer arithmetic, as
/// [`quantize`] makes, rather than only storing int8 weights ([`quantize_weights`]).
pub fn computes_in_int8(quantization: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(quantization)
        .map_or(true, |scheme| scheme["compute"] != "f32")
}

/// Load `onnx` as a float model (so tract is known to run it) and decode it for rewriting.
fn float_model(onnx: &[u8], options: &ModelOptions) -> Result<(Model, ModelProto), QuantizeError> {
    let float_options = ModelOptions {
        precision: None,
        attention: false,
        ..options.clone()
    };
    let model = Model::from_bytes(onnx, &float_options)?;
    if model.metadata.contains_key(key::QUANTIZATION) {
        return Err(QuantizeError::AlreadyQuantized);
    }
    let proto = ModelProto::decode(onnx).map_err(|e| ModelError::NotOnnx(e.to_string()))?;
    // The stored constants use per-axis DequantizeLinear.
    let opset = default_opset(&proto);
    if opset < 13 {
        return Err(QuantizeError::OldOpset(opset, 13));
    }
    Ok((model, proto))
}

fn default_opset(proto: &ModelProto) -> i64 {
    proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(1, |o| o.version)
}

/// Each activation's (min, max), by value name.
type Ranges = HashMap<String, (f32, f32)>;

/// The range of each activation over the calibration images, and how many images were decoded.
fn calibrate(
    proto: &ModelProto,
    model: &Model,
    activations: &[String],
    images: &[PathBuf],
) -> Result<(Ranges, usize), QuantizeError> {
    let tract = |e: tract_onnx::prelude::TractError| QuantizeError::Tract(format!("{e:#}"));
    // The same graph with the activations as extra outputs, after the logits.
    let mut probe = proto.clone();
    let graph = probe.graph.as_mut().expect("checked by the caller");
    graph.output.truncate(1);
    graph
        .output
        .extend(activations.iter().map(|name| ValueInfoProto {
            name: name.clone(),
            ..Default::default()
        }));
    let config = &model.preprocess;
    let shape = [
        1,
        config.channels as usize,
        config.image_size as usize,
        config.image_size as usize,
    ];
    let plan = tract_onnx::onnx()
        .model_for_proto_model(&probe)
        .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(tract)?;
    let preprocess = |e: crate::PreprocessError| ModelError::Mismatch(e.to_string());
    let mut pipeline = PatchPipeline::new(config.clone()).map_err(preprocess)?;
    let mut ranges: Ranges = activations
        .iter()
        .map(|a| (a.clone(), (f32::INFINITY, f32::NEG_INFINITY)))
        .collect();
    let mut decoded = 0;
    for path in images {
        let image = match decode_file(path) {
            Ok(image) => image,
            Err(error) => {
                log::warn!("calibration: skipping {}: {error}", path.display());
                continue;
            }
        };
        let mut input = Tensor::zero::<f32>(&shape).map_err(tract)?;
        let mut plain = input.try_as_plain_ram_mut().map_err(tract)?;
        pipeline
            .run(&image.frame(), plain.as_slice_mut::<f32>().map_err(tract)?)
            .map_err(preprocess)?;
        let outputs = plan
            .run(tvec!(TValue::from_const(Arc::new(input))))
            .map_err(tract)?;
        for (name, output) in activations.iter().zip(&outputs[1..]) {
            let range = ranges.get_mut(name).expect("one range per activation");
            let values = output
                .try_as_plain_ram()
                .and_then(|plain| plain.as_slice::<f32>())
                .map_err(tract)?;
            for &v in values {
                range.0 = range.0.min(v);
                range.1 = range.1.max(v);
            }
        }
        decoded += 1;
    }
    if decoded == 0 {
        return Err(QuantizeError::NoneDecoded(images.len()));
    }
    Ok((ranges, decoded))
}

/// Scale and int8 zero point mapping `[min, max]` (widened to hold 0) onto -128..=127.
fn activation_quantization((min, max): (f32, f32)) -> (f32, i8) {
    let (min, max) = (min.min(0.0), max.max(0.0));
    let scale = if max > min { (max - min) / 255.0 } else { 1.0 };
    let zero = (-128.0 - min / scale).round().clamp(-128.0, 127.0);
    (scale, zero as i8)
}

/// The other large float constants (patch convolution, position embedding) are stored int8
/// with a `DequantizeLinear` in front: tract folds it at load, so they cost accuracy a
/// rounding and the file 4× fewer bytes, and the arithmetic stays f32.
fn store_int8(graph: &mut tract_onnx::pb::GraphProto) -> Result<usize, QuantizeError> {
    let overridable: HashSet<String> = graph.input.iter().map(|i| i.name.clone()).collect();
    let (large, kept): (Vec<TensorProto>, Vec<TensorProto>) =
        std::mem::take(&mut graph.initializer)
            .into_iter()
            .partition(|t| {
                t.data_type == DataType::Float as i32
                    && t.dims.len() >= 2
                    && t.dims.iter().product::<i64>() >= STORE_INT8_MIN_VALUES
                    && !overridable.contains(&t.name)
            });
    graph.initializer = kept;
    let count = large.len();
    for tensor in large {
        let (dims, values) = float_values(&tensor)?;
        // One scale per output channel (axis 0) if there are several, else per last axis.
        let axis = if dims[0] > 1 { 0 } else { dims.len() - 1 };
        let (quantized, scales) = quantize_symmetric(&values, &dims, axis);
        let (stored, scale) = (
            format!("{}.int8", tensor.name),
            format!("{}.int8.scale", tensor.name),
        );
        graph
            .initializer
            .push(int8_tensor(&stored, &tensor.dims, &quantized));
        graph.initializer.push(vector_f32(&scale, &scales));
        let mut dequantize = plain_node(
            "DequantizeLinear",
            &format!("{}.dequantize", tensor.name),
            &[&stored, &scale],
            &tensor.name,
        );
        dequantize
            .attribute
            .push(int_attribute("axis", axis as i64));
        graph.node.insert(0, dequantize);
    }
    Ok(count)
}

/// Float constants at least this large (rank ≥ 2) are stored int8 by [`store_int8`].
const STORE_INT8_MIN_VALUES: i64 = 1024;

/// Symmetric int8 with one scale per index of `axis` (row-major `dims`): the values and the
/// scales. For a `[K, N]` weight matrix, axis 1 is per output column.
fn quantize_symmetric(values: &[f32], dims: &[usize], axis: usize) -> (Vec<i8>, Vec<f32>) {
    let channels = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let channel = |i: usize| (i / inner) % channels;
    let mut peaks = vec![0f32; channels];
    for (i, v) in values.iter().enumerate() {
        peaks[channel(i)] = peaks[channel(i)].max(v.abs());
    }
    let scales: Vec<f32> = peaks
        .iter()
        .map(|&peak| if peak > 0.0 { peak / 127.0 } else { 1.0 })
        .collect();
    let quantized = values
        .iter()
        .enumerate()
        .map(|(i, v)| (v / scales[channel(i)]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (quantized, scales)
}

/// Dims and values of a float initializer (raw little-endian or `float_data`).
fn float_values(tensor: &TensorProto) -> Result<(Vec<usize>, Vec<f32>), QuantizeError> {
    let bad = |why: &str| QuantizeError::BadInitializer(tensor.name.clone(), why.into());
    if !tensor.external_data.is_empty() {
        return Err(bad("external data is not supported"));
    }
    let dims: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
    let values: Vec<f32> = if tensor.raw_data.is_empty() {
        tensor.float_data.clone()
    } else {
        tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    if values.len() != dims.iter().product::<usize>() {
        return Err(bad("its data does not match its dims"));
    }
    Ok((dims, values))
}

fn plain_node(op: &str, name: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn int8_tensor(name: &str, dims: &[i64], values: &[i8]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Int8 as i32,
        raw_data: values.iter().map(|&v| v as u8).collect(),
        ..Default::default()
    }
}

fn scalar_f32(name: &str, value: f32) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: DataType::Float as i32,
        raw_data: value.to_le_bytes().to_vec(),
        ..Default::default()
    }
}

fn scalar_i8(name: &str, value: i8) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: DataType::Int8 as i32,
        raw_data: vec![value as u8],
        ..Default::default()
    }
}

fn vector_f32(name: &str, values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![values.len() as i64],
        data_type: DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// The calibration images under `dir` (any depth), at most `max`, evenly spread.
pub fn calibration_images(dir: &Path, max: usize) -> Result<Vec<PathBuf>, QuantizeError> {
    let images = crate::dataset::images_under(dir, max)
        .map_err(|e| QuantizeError::NoImages(e.to_string()))?;
    if images.is_empty() {
        return Err(QuantizeError::NoImages(format!(
            "{} holds no image files",
            dir.display()
        )));
    }
    Ok(images)
}

/// Sizes of the model's initializers by element type, for reports (`float`, `int8`, …).
pub fn weight_bytes(onnx: &[u8]) -> Result<BTreeMap<&'static str, usize>, ModelError> {
    let proto = ModelProto::decode(onnx).map_err(|e| ModelError::NotOnnx(e.to_string()))?;
    let mut sizes = BTreeMap::new();
    for tensor in proto.graph.iter().flat_map(|g| &g.initializer) {
        let kind = match DataType::try_from(tensor.data_type) {
            Ok(DataType::Float) => "float",
            Ok(DataType::Int8) => "int8",
            _ => "other",
        };
        let bytes = if tensor.raw_data.is_empty() {
            4 * (tensor.float_data.len() + tensor.int32_data.len()) + 8 * tensor.int64_data.len()
        } else {
            tensor.raw_data.len()
        };
        *sizes.entry(kind).or_default() += bytes;
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_range_maps_onto_int8_with_zero_exact() {
        let (scale, zero) = activation_quantization((-1.0, 3.0));
        assert!((scale - 4.0 / 255.0).abs() < 1e-7);
        // Zero is representable: x = 0 quantizes to the zero point exactly.
        assert_eq!(zero, (-128.0f32 + 1.0 / scale).round() as i8);
        let quantize = |x: f32| ((x / scale).round() + zero as f32).clamp(-128.0, 127.0);
        assert_eq!(quantize(-1.0), -128.0);
        assert_eq!(quantize(3.0), 127.0);
        // A range that excludes zero is widened to hold it.
        let (scale, zero) = activation_quantization((2.0, 4.0));
        assert!((scale - 4.0 / 255.0).abs() < 1e-7);
        assert_eq!(zero, -128);
    }

    #[test]
    fn columns_are_scaled_by_their_own_peak() {
        // 2×3, row-major: column peaks 2, 0.5, 0 (an all-zero column keeps scale 1).
        let values = [2.0, -0.25, 0.0, -1.0, 0.5, 0.0];
        let (q, scales) = quantize_symmetric(&values, &[2, 3], 1);
        assert_eq!(scales, vec![2.0 / 127.0, 0.5 / 127.0, 1.0]);
        assert_eq!(q, vec![127, -64, 0, -64, 127, 0]);
        // Per row (axis 0) of the same matrix: peaks 2 and 1.
        let (q, scales) = quantize_symmetric(&values, &[2, 3], 0);
        assert_eq!(scales, vec![2.0 / 127.0, 1.0 / 127.0]);
        assert_eq!(q, vec![127, -16, 0, -127, 64, 0]);
    }
}
