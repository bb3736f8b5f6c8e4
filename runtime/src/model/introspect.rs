//! What a loaded model runs: the kernels tract picked, the optimised graph, and the ISA of each
//! of the runtime's own operators (`runtime info`).

//! Loading an ONNX classifier into tract: metadata (or flags) → preprocessing and labels,
//! input fixed to `[1, C, H, W]`, optimised once.

use super::Model;
use crate::ops::Isa;
use std::collections::BTreeMap;
use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;

impl Model {
    /// The matrix-multiply kernels tract picked for this model on this CPU, with how many of
    /// the model's products use each (a product may keep one kernel per shape mode).
    pub fn kernels(&self) -> BTreeMap<String, usize> {
        let mut kernels = BTreeMap::new();
        for node in &self.plan.model().nodes {
            if let Some(op) = node.op_as::<OptMatMul>() {
                for kernel in &op.mmm {
                    *kernels.entry(kernel.name().to_string()).or_default() += 1;
                }
            }
        }
        kernels
    }

    /// The optimised model tract runs, one line per node in evaluation order: name, operator,
    /// its settings and the output shapes. Shows what the optimiser made of a graph (which
    /// products fused, where the layouts moved) next to `bench --profile`'s timings.
    pub fn graph(&self) -> Vec<String> {
        let model = self.plan.model();
        model
            .eval_order()
            .unwrap_or_else(|_| (0..model.nodes.len()).collect())
            .into_iter()
            .map(|id| {
                let node = &model.nodes[id];
                let outputs: Vec<String> = node
                    .outputs
                    .iter()
                    .map(|output| format!("{:?},{:?}", output.fact.shape, output.fact.datum_type))
                    .collect();
                let info = node.op.info().unwrap_or_default().join("; ");
                format!(
                    "{} {} [{}] -> {}",
                    node.name,
                    node.op.name(),
                    info,
                    outputs.join(", ")
                )
            })
            .collect()
    }

    /// The instruction set of the kernel each of the runtime's own operators in the plan runs,
    /// by operator name.
    pub fn operator_kernels(&self) -> BTreeMap<String, Isa> {
        use crate::ops::{
            attention::TokenMajorAttention, conv::DenseConv, dense::DenseLinear,
            dense_int8::DenseLinearInt8, layer_norm::LastAxisLayerNorm, softmax::RowSoftmax,
        };
        let mut kernels = BTreeMap::new();
        for node in &self.plan.model().nodes {
            let op = &node.op;
            let isa = op
                .downcast_ref::<DenseLinear>()
                .map(|op| op.isa)
                .or_else(|| op.downcast_ref::<DenseConv>().map(DenseConv::isa))
                .or_else(|| op.downcast_ref::<DenseLinearInt8>().map(|op| op.isa))
                .or_else(|| op.downcast_ref::<TokenMajorAttention>().map(|op| op.isa))
                .or_else(|| op.downcast_ref::<LastAxisLayerNorm>().map(|op| op.isa))
                .or_else(|| op.downcast_ref::<RowSoftmax>().map(|op| op.isa));
            if let Some(isa) = isa {
                kernels.insert(op.name().to_string(), isa);
            }
        }
        kernels
    }

    /// How many nodes of each operator the optimised model runs.
    pub fn operators(&self) -> BTreeMap<String, usize> {
        let mut operators = BTreeMap::new();
        for node in &self.plan.model().nodes {
            *operators.entry(node.op.name().to_string()).or_default() += 1;
        }
        operators
    }
}

/// The instruction-set extensions tract detected on this CPU and chooses kernels by.
pub fn cpu_features() -> Vec<&'static str> {
    tract_linalg::isa::native()
        .iter()
        .map(|isa| isa.name())
        .collect()
}
