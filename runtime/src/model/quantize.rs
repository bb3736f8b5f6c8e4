//! Post-training int8 quantization of an ONNX classifier, dynamic: nothing to calibrate.
//!
//! Every `MatMul` whose right operand is a constant 2-D float matrix (the projections, the MLP
//! and the head), and every plain `Gemm` by a constant (a CNN's head, torch's `Linear`; its
//! bias becomes an `Add` after), becomes, in standard ONNX (the form of onnxruntime's
//! `quantize_dynamic`),
//!
//! ```text
//! DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q, z_x) → Cast(float) → Mul(s_x · s_w)
//! ```
//!
//! with `W_q` int8 per output column (symmetric, `s_w[n] = max|W[:, n]| / 127`) and `x` u8,
//! its scale and zero point taken from its range at each run. The runtime runs each such chain
//! as one [`DenseLinearInt8`](crate::ops::dense_int8::DenseLinearInt8), which quantizes x per
//! row instead of per tensor (docs/precision.md says why). LayerNorm, Softmax, GELU, the attention
//! products (two activations) and the patch convolution stay f32; their large constants are
//! stored int8 and dequantized at load.

use crate::metadata as key;
use crate::model::{Model, ModelError, ModelOptions};
use prost::Message;
use std::collections::{BTreeMap, HashMap, HashSet};
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto,
    attribute_proto::AttributeType, tensor_proto::DataType,
};

/// Why a model could not be quantized.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// The input does not load as a float model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The file was already written by [`quantize`] or [`quantize_weights`] (its metadata says so).
    #[error("the model is already int8-quantized")]
    AlreadyQuantized,
    /// There is no product with constant weights ([`quantize`]), or no large float constant
    /// ([`quantize_weights`]), to store as int8.
    #[error("nothing to quantize: the model has no MatMul or Gemm with constant 2-D float weights")]
    NothingToQuantize,
    /// The model's default-domain opset (first) is older than the one needed (second).
    #[error("the model's opset {0} is older than {1}, the first with per-axis (De)QuantizeLinear")]
    OldOpset(i64, i64),
    /// A float initializer's data cannot be read: its name, and why.
    #[error("initializer {0} is unreadable: {1}")]
    BadInitializer(String, String),
}

/// What [`quantize`] did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QuantizeReport {
    /// Products now on int8 weights, and those left in float.
    pub int8_products: usize,
    /// `MatMul` products that still run in float.
    pub float_products: usize,
    /// Size in bytes of the input file (the whole file, not only its weights).
    pub float_bytes: usize,
    /// Size in bytes of the written file (the whole file, not only its weights).
    pub int8_bytes: usize,
}

/// Quantize `onnx` (a float model): int8 weights, activations quantized at each run; returns
/// the int8 file's bytes. `options` are what [`Model::from_bytes`] takes (for third-party
/// models whose metadata lacks the preprocessing).
pub fn quantize(
    onnx: &[u8],
    options: &ModelOptions,
) -> Result<(Vec<u8>, QuantizeReport), QuantizeError> {
    let (_, mut proto) = float_model(onnx, options)?;
    let graph = proto
        .graph
        .as_mut()
        .expect("Model::from_bytes checked the graph");
    let weights: HashMap<String, TensorProto> = graph
        .initializer
        .iter()
        .filter(|t| t.dims.len() == 2 && t.data_type == DataType::Float as i32)
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    let is_product = |n: &NodeProto| {
        let constant_weights = n.input.len() >= 2 && weights.contains_key(&n.input[1]);
        match n.op_type.as_str() {
            "MatMul" => constant_weights && n.input.len() == 2,
            "Gemm" => constant_weights && n.input.len() <= 3 && is_plain_gemm(n),
            _ => false,
        }
    };
    let int8_products = graph.node.iter().filter(|n| is_product(n)).count();
    if int8_products == 0 {
        return Err(QuantizeError::NothingToQuantize);
    }
    let products = graph
        .node
        .iter()
        .filter(|n| matches!(n.op_type.as_str(), "MatMul" | "Gemm"))
        .count();
    let float_products = products - int8_products;

    let mut nodes = Vec::with_capacity(graph.node.len() + 5 * int8_products);
    let mut quantized_activations: HashSet<String> = HashSet::new();
    let mut quantized_weights: HashSet<String> = HashSet::new();
    let mut initializers: Vec<TensorProto> = Vec::new();
    for node in std::mem::take(&mut graph.node) {
        if !is_product(&node) {
            nodes.push(node);
            continue;
        }
        let (x, w, y) = (&node.input[0], &node.input[1], &node.output[0]);
        let (x_q, x_scale, x_zero) = (
            format!("{x}.uint8"),
            format!("{x}.scale"),
            format!("{x}.zero_point"),
        );
        if quantized_activations.insert(x.clone()) {
            let mut quantize = plain_node("DynamicQuantizeLinear", &x_q, &[x], &x_q);
            quantize.output = vec![x_q.clone(), x_scale.clone(), x_zero.clone()];
            nodes.push(quantize);
        }
        // Gemm's `transB = 1` weights are `[N, K]`: stored transposed, as MatMulInteger takes them.
        let transposed = node.op_type == "Gemm" && attribute(&node, "transB") == Some(1);
        let stored = if transposed {
            format!("{w}.T")
        } else {
            w.clone()
        };
        let (w_q, w_scale) = (format!("{stored}.int8"), format!("{stored}.int8.scale"));
        if quantized_weights.insert(stored.clone()) {
            let (mut dims, mut values) = float_values(&weights[w])?;
            if transposed {
                values = transpose(&values, dims[0], dims[1]);
                dims.swap(0, 1);
            }
            let (columns, scales) = quantize_symmetric(&values, &dims, 1);
            let shape: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
            initializers.push(int8_tensor(&w_q, &shape, &columns));
            initializers.push(vector_f32(&w_scale, &scales));
        }
        let (scale, accumulated, as_float) = (
            format!("{y}.scale"),
            format!("{y}.int32"),
            format!("{y}.float"),
        );
        nodes.push(plain_node("Mul", &scale, &[&x_scale, &w_scale], &scale));
        nodes.push(plain_node(
            "MatMulInteger",
            &accumulated,
            &[&x_q, &w_q, &x_zero],
            &accumulated,
        ));
        let mut cast = plain_node("Cast", &as_float, &[&accumulated], &as_float);
        cast.attribute
            .push(int_attribute("to", DataType::Float as i64));
        nodes.push(cast);
        match node.input.get(2).filter(|bias| !bias.is_empty()) {
            Some(bias) => {
                let product = format!("{y}.product");
                nodes.push(plain_node("Mul", &product, &[&as_float, &scale], &product));
                nodes.push(plain_node("Add", &node.name, &[&product, bias], y));
            }
            None => nodes.push(plain_node("Mul", &node.name, &[&as_float, &scale], y)),
        }
    }
    graph.node = nodes;
    let still_used: HashSet<&String> = graph.node.iter().flat_map(|n| &n.input).collect();
    graph
        .initializer
        .retain(|t| !weights.contains_key(&t.name) || still_used.contains(&t.name));
    graph.initializer.extend(initializers);
    store_int8(graph)?;

    let scheme = serde_json::json!({
        "scheme": "dynamic int8",
        "compute": "int8",
        "weights": "int8, symmetric, per output channel",
        "activations": "u8, asymmetric, from their range at each run (DynamicQuantizeLinear); the runtime quantizes each row",
        "other_weights": "large float constants stored int8 per channel, dequantized at load",
        "products": "MatMul and Gemm with constant weights -> MatMulInteger; the rest stays f32",
        "int8_products": int8_products,
        "float_products": float_products,
    });
    let bytes = encode_with_scheme(proto, &scheme);
    let report = QuantizeReport {
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

/// The other large float constants (patch convolution, position embedding) are stored int8
/// with a `DequantizeLinear` in front: tract folds it at load, so they cost accuracy a
/// rounding and the file 4× fewer bytes, and the arithmetic stays f32.
fn store_int8(graph: &mut GraphProto) -> Result<usize, QuantizeError> {
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
pub(crate) fn quantize_symmetric(
    values: &[f32],
    dims: &[usize],
    axis: usize,
) -> (Vec<i8>, Vec<f32>) {
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

/// A `Gemm` that is a plain product plus bias: `alpha = beta = 1`, `A` not transposed.
fn is_plain_gemm(node: &NodeProto) -> bool {
    let float = |name: &str| {
        node.attribute
            .iter()
            .find(|a| a.name == name)
            .map_or(1.0, |a| a.f)
    };
    float("alpha") == 1.0 && float("beta") == 1.0 && attribute(node, "transA").unwrap_or(0) == 0
}

/// An integer attribute of `node`, if it has it.
fn attribute(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// A row-major `rows × columns` matrix transposed.
fn transpose(values: &[f32], rows: usize, columns: usize) -> Vec<f32> {
    (0..columns)
        .flat_map(|c| (0..rows).map(move |r| values[r * columns + c]))
        .collect()
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

fn vector_f32(name: &str, values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![values.len() as i64],
        data_type: DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// Feed every operator that reads `DequantizeLinear(QuantizeLinear(x))` of an activation with
/// `x` itself, except the products by constant weights (whose pairs mark them int8, for
/// [`fuse_int8_dense`](crate::ops::dense_int8::fuse_int8_dense)); returns how many inputs.
///
/// onnxruntime's `quantize_static` puts such a pair on nearly every activation of a QDQ file.
/// tract runs each pair as two operators (and folds chains of them into lookup tables), and
/// the pairs hide the LayerNorm, GELU and attention patterns from the runtime's operators:
/// the shipped model's QDQ file took 2.0 ms a frame against onnxruntime's 0.51. Worse, tract
/// 0.23.9 folds the pair in front of a Softmax into a quantized softmax whose answers are
/// wrong (6.7 % on the 30 test images, 96.7 % with that pair dropped). Without the pairs each
/// activation is spared one rounding; the products still quantize theirs, per row.
pub(crate) fn unquantize_activations(graph: &mut GraphProto) -> usize {
    let constants: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let producer: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let op_of = |value: &str| producer.get(value).map(|n| n.op_type.as_str());
    fn input(node: &NodeProto, i: usize) -> &str {
        node.input.get(i).map_or("", String::as_str)
    }
    // A product by int8 weights: its second input dequantizes a constant.
    let by_weights = |node: &NodeProto| {
        matches!(node.op_type.as_str(), "MatMul" | "Gemm")
            && producer
                .get(input(node, 1))
                .is_some_and(|w| w.op_type == "DequantizeLinear" && constants.contains(input(w, 0)))
    };
    let kept: HashSet<&str> = graph
        .node
        .iter()
        .filter(|n| by_weights(n))
        .map(|n| input(n, 0))
        .collect();
    let mut unquantized: HashMap<String, String> = HashMap::new();
    for dequantize in graph
        .node
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
    {
        let (Some(output), quantized) = (dequantize.output.first(), input(dequantize, 0)) else {
            continue;
        };
        let Some(quantize) = producer
            .get(quantized)
            .filter(|q| q.op_type == "QuantizeLinear")
        else {
            continue;
        };
        let x = input(quantize, 0);
        let activation = !constants.contains(x) && op_of(x).is_some_and(|op| op != "Constant");
        if activation && !kept.contains(output.as_str()) {
            unquantized.insert(output.clone(), x.to_string());
        }
    }
    let mut count = 0;
    for node in &mut graph.node {
        for value in &mut node.input {
            if let Some(x) = unquantized.get(value) {
                *value = x.clone();
                count += 1;
            }
        }
    }
    count
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
