//! Training side of the project: the tutorial's Vision Transformer in burn, its data pipeline,
//! training loop and evaluation, and its export to ONNX. Pixels come from the runtime crate's
//! preprocessing.
//!
//! The folders follow burn's examples: [`model`], [`data`], [`training`] and [`export`] (the
//! inference side is the `runtime` crate).

pub mod backend;
pub mod data;
pub mod export;
pub mod model;
pub mod training;

pub use data::{fashion_mnist, synthetic};
pub use export::onnx_graph;
pub use model::dropout;
pub use model::{Preset, ViTConfig, VisionTransformer};
pub use training::{ema, eval, plots, run_folder};
