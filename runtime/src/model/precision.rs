//! The arithmetic a loaded model runs in: f32 as exported, f16 through tract's float
//! translator, or int8 from a file made by `runtime quantize` ([`crate::quantize`]).

use std::fmt;
use std::str::FromStr;
use tract_onnx::prelude::{
    DatumType, OutletId, SpecialOps, TractResult, TypedModel, TypedModelPatch,
};
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_core::transform::get_transform;

/// The arithmetic a model runs in (`--precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 throughout, as exported (the default).
    #[default]
    F32,
    /// Weights and activations in f16. Native fp16 arithmetic on aarch64 with asimdhp
    /// (Cortex-A76/A78, Apple); elsewhere tract converts to f32 around each product.
    F16,
    /// Matrix products on int8 weights and activations (MatMulInteger), the rest in f32.
    Int8,
}

impl Precision {
    /// The name `--precision` and reports use: `f32`, `f16` or `int8`.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Int8 => "int8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            "int8" => Ok(Precision::Int8),
            other => Err(format!("unknown precision {other:?} (f32, f16 or int8)")),
        }
    }
}

/// Translate the model's f32 arithmetic and weights to f16, keeping its inputs and outputs f32
/// so that callers feed and read the same tensors at every precision.
pub fn to_f16(model: TypedModel) -> TractResult<TypedModel> {
    let translator = get_transform("f32_to_f16")?
        .ok_or_else(|| tract_onnx::prelude::TractError::msg("this tract has no f32_to_f16"))?;
    let mut model = translator.transform_into(model)?;
    for input in model.input_outlets()?.to_vec() {
        let half = model.outlet_fact(input)?.clone();
        if half.datum_type != DatumType::F16 {
            continue;
        }
        let name = format!("{}.to_f16", model.node(input.node).name);
        TypedModelPatch::intercept(&model, input, name, cast(DatumType::F16), half.clone())?
            .apply(&mut model)?;
        let mut single = half;
        single.datum_type = DatumType::F32;
        let source = &mut model.nodes[input.node];
        source.op = Box::new(TypedSource::new(single.clone()));
        source.outputs[0].fact = single;
    }
    let mut outputs: Vec<OutletId> = Vec::new();
    for output in model.output_outlets()?.to_vec() {
        if model.outlet_fact(output)?.datum_type == DatumType::F16 {
            let name = format!("{}.to_f32", model.node(output.node).name);
            outputs.push(model.wire_node(name, cast(DatumType::F32), &[output])?[0]);
        } else {
            outputs.push(output);
        }
    }
    model.select_output_outlets(&outputs)?;
    Ok(model)
}
