//! Training side of the project: the tutorial's Vision Transformer in burn, its data pipeline,
//! training loop and evaluation. Pixels come from the runtime crate's preprocessing.

pub mod backend;
pub mod data;
pub mod dropout;
pub mod ema;
pub mod eval;
pub mod export;
pub mod fashion_mnist;
pub mod model;
pub mod onnx_graph;
pub mod plots;
pub mod run_folder;
pub mod synthetic;
pub mod training;

pub use model::{Preset, ViTConfig, VisionTransformer};
