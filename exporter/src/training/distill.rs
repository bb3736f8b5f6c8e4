//! DeiT's distillation (Touvron et al. 2021): the student ViT's distillation token has its own
//! head, which learns the teacher's answer on the same augmented batch, every step, while the
//! class head learns the true labels.
//!
//! - hard: `½·CE(class head, label) + ½·CE(distillation head, argmax teacher)`; label smoothing
//!   (`--label-smoothing`) applies to the true-label term only (DeiT §5);
//! - soft: `(1 − λ)·CE(class head, label) + λ·τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ))`.
//!
//! The teacher is any ONNX classifier with the run's labels, image size, channels and
//! normalisation, run in tract on the batch's pixels. A run keeps its own copy
//! (`teacher.onnx`), so a resumed run distils from the same teacher without being told again.

use super::TrainError;
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use rayon::prelude::*;
use runtime::PreprocessConfig;
use runtime::tract_onnx::prelude::{
    DatumExt, Framework, IntoRunnable, Tensor as TractTensor, TypedRunnableModel, tvec,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Images per run of the teacher. tract's convolutions at the training batch (128) spent most
/// of their time filling im2col buffers of over 100 MB; short runs, one per core, keep them
/// in cache (docs/training.md has the figures).
pub const TEACHER_RUN: usize = 4;

/// The teacher's copy in a run folder.
pub const TEACHER_FILE: &str = "teacher.onnx";

/// How the distillation head learns from the teacher.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "method")]
pub enum Method {
    /// Cross-entropy with the teacher's top class (DeiT's choice, and its better one).
    Hard,
    /// KL divergence to the teacher's softened distribution, weighted by `weight` (λ) against
    /// the true-label term.
    Soft { temperature: f64, weight: f64 },
}

/// How a run distils, as `config.json` keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distillation {
    #[serde(flatten)]
    pub method: Method,
    /// Where the teacher came from: an ONNX file, or a run folder exported for the purpose.
    pub teacher: PathBuf,
    /// FNV-1a 64 of the run's `teacher.onnx`, checked on resume.
    pub teacher_fingerprint: String,
    /// The teacher's `vit.architecture` and `vit.preset`, for the exported metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_architecture: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_preset: Option<String>,
}

/// FNV-1a, 64 bits, as hex: enough to tell one teacher file from another.
pub fn fingerprint(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &byte| {
        (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// A teacher loaded for a run: tract plans by the number of images in a run ([`TEACHER_RUN`],
/// and what is left at the end of a batch), logits only.
pub struct Teacher {
    bytes: Arc<Vec<u8>>,
    shape: [usize; 3],
    classes: usize,
    plans: HashMap<usize, Arc<TypedRunnableModel>>,
    /// Its metadata's `vit.architecture` and `vit.preset`.
    pub architecture: Option<String>,
    pub preset: Option<String>,
}

impl Teacher {
    /// The teacher in `bytes` (from `source`, for messages), checked to take the run's inputs
    /// and to name the run's classes in the run's order.
    pub fn new(
        bytes: Vec<u8>,
        source: &Path,
        preprocess: &PreprocessConfig,
        classes: &[String],
    ) -> Result<Teacher, TrainError> {
        let refuse = |reason: String| TrainError::run(source, reason);
        let proto = crate::onnx_graph::decode(&bytes)
            .map_err(|e| refuse(format!("not an ONNX file ({e})")))?;
        let meta: HashMap<&str, &str> = proto
            .metadata_props
            .iter()
            .map(|p| (p.key.as_str(), p.value.as_str()))
            .collect();
        let key = runtime::metadata::LABELS;
        let labels: Vec<String> = match meta.get(key) {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| refuse(format!("its {key} is not a JSON list ({e})")))?,
            None => {
                return Err(refuse(format!(
                    "has no {key}: the teacher must name its classes"
                )));
            }
        };
        if labels != classes {
            return Err(refuse(format!(
                "names the classes {labels:?}; the run's are {classes:?}, in that order"
            )));
        }
        let expected = [
            (
                runtime::metadata::IMAGE_SIZE,
                preprocess.image_size.to_string(),
            ),
            (runtime::metadata::CHANNELS, preprocess.channels.to_string()),
            (
                runtime::metadata::MEAN,
                serde_json::to_string(&preprocess.mean).unwrap(),
            ),
            (
                runtime::metadata::STD,
                serde_json::to_string(&preprocess.std).unwrap(),
            ),
            (runtime::metadata::RESIZE, preprocess.resize.to_string()),
        ];
        for (key, value) in expected {
            if meta.get(key).copied() != Some(value.as_str()) {
                return Err(refuse(format!(
                    "has {key} = {}; the run's preprocessing needs {value}",
                    meta.get(key).unwrap_or(&"nothing")
                )));
            }
        }
        // Each run of the teacher on one thread: the runs themselves go to every core.
        runtime::set_threads(1).map_err(|e| refuse(e.to_string()))?;
        let (size, channels) = (preprocess.image_size as usize, preprocess.channels as usize);
        let text = |key: &str| meta.get(key).map(|v| v.to_string());
        let mut teacher = Teacher {
            bytes: Arc::new(bytes),
            shape: [channels, size, size],
            classes: classes.len(),
            plans: HashMap::new(),
            architecture: text(runtime::metadata::ARCHITECTURE),
            preset: text(runtime::metadata::PRESET),
        };
        teacher.plan(1).map_err(refuse)?;
        Ok(teacher)
    }

    /// The teacher's file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn plan(&mut self, batch: usize) -> Result<&Arc<TypedRunnableModel>, String> {
        if !self.plans.contains_key(&batch) {
            let [c, s, _] = self.shape;
            let tract = |e: runtime::tract_onnx::prelude::TractError| format!("tract: {e:#}");
            let mut model = runtime::tract_onnx::onnx()
                .model_for_read(&mut &self.bytes[..])
                .map_err(tract)?
                .with_input_fact(0, f32::fact([batch, c, s, s]).into())
                .map_err(tract)?;
            // Logits only, whatever else the file outputs (attention maps).
            let logits = model.output_outlets().map_err(tract)?[0];
            model.select_output_outlets(&[logits]).map_err(tract)?;
            // The runtime's own operators, as `runtime classify` runs the teacher.
            let plan = runtime::model::optimized_f32(model)
                .map_err(tract)?
                .into_runnable()
                .map_err(tract)?;
            self.plans.insert(batch, plan);
        }
        Ok(&self.plans[&batch])
    }

    /// The teacher's logits for `images` (`[batch, C, H, W]`, the student's very input), in runs
    /// of [`TEACHER_RUN`] images spread over the cores, each chunk on the calling thread's tract.
    pub fn logits(&mut self, images: &Tensor<4>) -> Result<Tensor<2>, TrainError> {
        let [batch, c, h, w] = images.dims();
        let pixels: Vec<f32> = images
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("float pixels");
        let failed = |e: String| TrainError::Invalid(format!("the teacher failed: {e}"));
        for len in [TEACHER_RUN.min(batch), batch % TEACHER_RUN] {
            if len > 0 {
                self.plan(len).map_err(failed)?;
            }
        }
        let (plans, classes, per_image) = (&self.plans, self.classes, c * h * w);
        let chunks: Vec<Result<Vec<f32>, String>> = pixels
            .par_chunks(TEACHER_RUN * per_image)
            .map(|chunk| {
                let images = chunk.len() / per_image;
                let input = TractTensor::from_shape(&[images, c, h, w], chunk)
                    .map_err(|e| e.to_string())?;
                let outputs = plans[&images]
                    .run(tvec!(input.into()))
                    .map_err(|e| format!("{e:#}"))?;
                let logits = outputs[0]
                    .to_plain_array_view::<f32>()
                    .map_err(|e| e.to_string())?;
                if logits.len() != images * classes {
                    return Err(format!(
                        "{} logits for {images} images of {classes} classes",
                        logits.len()
                    ));
                }
                Ok(logits.iter().copied().collect())
            })
            .collect();
        let mut values = Vec::with_capacity(batch * classes);
        for chunk in chunks {
            values.extend(chunk.map_err(failed)?);
        }
        Ok(Tensor::from_data(
            TensorData::new(values, [batch, classes]),
            &images.device(),
        ))
    }
}

/// The distillation head's part of the loss, for one part of a batch: `teacher` holds the
/// teacher's logits for the same images.
pub fn distillation_loss(method: Method, student: Tensor<2>, teacher: Tensor<2>) -> Tensor<1> {
    match method {
        Method::Hard => {
            let [batch, _] = teacher.dims();
            let targets = teacher.argmax(1).reshape([batch]);
            let log_p = log_softmax(student, 1);
            log_p.gather(1, targets.unsqueeze_dim(1)).neg().mean()
        }
        Method::Soft { temperature, .. } => {
            let t = temperature;
            let p_teacher = softmax(teacher.clone().div_scalar(t), 1);
            let log_teacher = log_softmax(teacher.div_scalar(t), 1);
            let log_student = log_softmax(student.div_scalar(t), 1);
            (p_teacher * (log_teacher - log_student))
                .sum_dim(1)
                .mean()
                .mul_scalar(t * t)
        }
    }
}

/// The weights of the true-label term and the distillation term.
pub fn weights(method: Method) -> (f64, f64) {
    match method {
        Method::Hard => (0.5, 0.5),
        Method::Soft { weight, .. } => (1.0 - weight, weight),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(values: &[f32], classes: usize) -> Tensor<2> {
        let device = crate::backend::device();
        Tensor::from_data(
            TensorData::new(values.to_vec(), [values.len() / classes, classes]),
            &device,
        )
    }

    fn scalar(t: Tensor<1>) -> f32 {
        t.into_scalar::<f32>()
    }

    #[test]
    fn hard_distillation_is_cross_entropy_with_the_teachers_top_class() {
        let student = [1.0, 2.0, 0.5, -1.0, 0.0, 3.0];
        // The teacher's top classes: 0 and 2.
        let teacher = logits(&[5.0, 1.0, 0.0, 0.0, 1.0, 2.0], 3);
        let loss = scalar(distillation_loss(
            Method::Hard,
            logits(&student, 3),
            teacher,
        ));
        let ce = |row: &[f32], target: usize| {
            let total: f32 = row.iter().map(|v| v.exp()).sum();
            total.ln() - row[target]
        };
        let expected = (ce(&student[..3], 0) + ce(&student[3..], 2)) / 2.0;
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }

    #[test]
    fn soft_distillation_is_the_kl_divergence_at_the_temperature() {
        let method = Method::Soft {
            temperature: 2.0,
            weight: 0.5,
        };
        let same = logits(&[1.0, 2.0, 3.0], 3);
        assert!(scalar(distillation_loss(method, same.clone(), same)).abs() < 1e-6);
        let (student, teacher) = ([0.0f32, 0.0], [2.0f32, 0.0]);
        let loss = scalar(distillation_loss(
            method,
            logits(&student, 2),
            logits(&teacher, 2),
        ));
        // Softened teacher: softmax([1, 0]); student uniform; KL · τ².
        let p = 1.0 / (1.0 + (-1.0f32).exp());
        let kl = p * (p / 0.5).ln() + (1.0 - p) * ((1.0 - p) / 0.5).ln();
        assert!((loss - 4.0 * kl).abs() < 1e-5, "{loss} vs {}", 4.0 * kl);
    }

    #[test]
    fn fingerprints_differ_for_different_files() {
        assert_eq!(fingerprint(b""), "cbf29ce484222325");
        assert_ne!(fingerprint(b"teacher a"), fingerprint(b"teacher b"));
    }
}
