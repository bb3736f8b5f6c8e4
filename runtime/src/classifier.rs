//! The frame → top-k loop: preprocessing into a reused input tensor, one reused tract state,
//! softmax and top-k into fixed buffers. Nothing here allocates per frame.

use crate::model::Model;
use crate::preprocess::{FrameRef, PatchPipeline, PreprocessError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tract_onnx::prelude::{TValue, TVec, Tensor, TypedSimpleState, tvec};

/// Most results a [`TopK`] holds.
pub const MAX_TOP_K: usize = 16;

/// One class and its probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// Index of the class in the model's output order; [`Classifier::label`] names it.
    pub class: usize,
    /// Softmax probability of the class, in [0, 1].
    pub probability: f32,
}

/// The best predictions of one frame, best first; fixed capacity, no heap.
pub type TopK = heapless::Vec<Prediction, MAX_TOP_K>;

/// Why a classifier could not be built or a frame not be classified.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// The frame, or a raw input tensor, does not fit: empty, bad stride, buffer too short, wrong
    /// length.
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    /// Building or running the tract plan failed (an error, or a panic caught in tract); the
    /// classifier stays usable for the next frame.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The `k` given to [`Classifier::new`] is 0 or above [`MAX_TOP_K`].
    #[error("top-k must be in 1..={MAX_TOP_K}, got {0}")]
    TopK(usize),
}

/// Time spent on the last frame.
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameTimings {
    /// Frame to input tensor: crop, resize, channel conversion, normalisation.
    pub preprocess: Duration,
    /// Running the model; as measured, this includes the softmax and top-k.
    pub inference: Duration,
    /// Time after the model run: near zero, since the softmax and top-k fall in `inference`.
    pub postprocess: Duration,
}

/// A model with its preprocessing, tract state and result buffers, all reused from frame to
/// frame: classifying allocates nothing outside tract's own run.
pub struct Classifier {
    model: Model,
    state: TypedSimpleState,
    pipeline: PatchPipeline,
    /// Shared with tract during a run and exclusively ours between runs.
    input: Arc<Tensor>,
    logits: Vec<f32>,
    probabilities: Vec<f32>,
    top: TopK,
    k: usize,
    timings: FrameTimings,
}

impl Classifier {
    /// A classifier returning the `k` best classes of each frame: `k` in 1..=[`MAX_TOP_K`], lowered
    /// to the model's class count if that is smaller.
    pub fn new(model: Model, k: usize) -> Result<Classifier, ClassifyError> {
        if k == 0 || k > MAX_TOP_K {
            return Err(ClassifyError::TopK(k));
        }
        let p = &model.preprocess;
        let shape = [
            1,
            p.channels as usize,
            p.image_size as usize,
            p.image_size as usize,
        ];
        let input = Arc::new(
            Tensor::zero::<f32>(&shape).map_err(|e| ClassifyError::Inference(e.to_string()))?,
        );
        let state = TypedSimpleState::new(&model.plan)
            .map_err(|e| ClassifyError::Inference(e.to_string()))?;
        Ok(Classifier {
            pipeline: PatchPipeline::new(p.clone())?.with_isa(model.isa),
            logits: vec![0.0; model.classes()],
            probabilities: vec![0.0; model.classes()],
            top: TopK::new(),
            k: k.min(model.classes()),
            timings: FrameTimings::default(),
            state,
            input,
            model,
        })
    }

    /// The model this classifier runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Name of class `class` (a [`Prediction::class`]); panics if the model has no such class.
    pub fn label(&self, class: usize) -> &str {
        &self.model.labels[class]
    }

    /// Raw logits of the last frame, in class order.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// The best predictions of the last frame (what [`Classifier::classify_frame`] returned).
    pub fn top(&self) -> &TopK {
        &self.top
    }

    /// Softmax probabilities of the last frame, in class order.
    pub fn probabilities(&self) -> &[f32] {
        &self.probabilities
    }

    /// Time spent in each stage of the last [`Classifier::classify_frame`] (other calls leave it).
    pub fn timings(&self) -> FrameTimings {
        self.timings
    }

    /// Classify one frame of any size; the result lives until the next call.
    pub fn classify_frame(&mut self, frame: &FrameRef) -> Result<&TopK, ClassifyError> {
        let started = Instant::now();
        self.preprocess(frame)?;
        let preprocessed = Instant::now();
        self.infer()?;
        let inferred = Instant::now();
        self.timings = FrameTimings {
            preprocess: preprocessed - started,
            inference: inferred - preprocessed,
            postprocess: inferred.elapsed(),
        };
        Ok(&self.top)
    }

    /// Write the frame into the input tensor.
    pub fn preprocess(&mut self, frame: &FrameRef) -> Result<(), ClassifyError> {
        let pipeline = &mut self.pipeline;
        write_input(&mut self.input, |pixels| Ok(pipeline.run(frame, pixels)?))
    }

    /// Use an already preprocessed `C×H×W` tensor as the next input (tests, raw pipelines).
    pub fn set_input(&mut self, pixels: &[f32]) -> Result<(), ClassifyError> {
        write_input(&mut self.input, |values| {
            if values.len() != pixels.len() {
                return Err(PreprocessError::OutputSize {
                    needed: values.len(),
                    actual: pixels.len(),
                }
                .into());
            }
            values.copy_from_slice(pixels);
            Ok(())
        })
    }

    /// Run the model on the current input tensor, then softmax and top-k.
    pub fn infer(&mut self) -> Result<&TopK, ClassifyError> {
        self.run()?;
        Ok(&self.top)
    }

    /// [`Classifier::infer`], also returning every output of the plan: the logits first, then
    /// the attention maps of a model loaded with them (`runtime explain`).
    pub fn run(&mut self) -> Result<TVec<TValue>, ClassifyError> {
        let input = tvec!(TValue::from_const(self.input.clone()));
        let outputs = guarded_run(&mut self.state, |state| state.run(input))?;
        self.read_logits(&outputs)?;
        Ok(outputs)
    }

    /// Logits, probabilities and top-k from the plan's outputs.
    fn read_logits(&mut self, outputs: &[TValue]) -> Result<(), ClassifyError> {
        let logits = outputs[0]
            .try_as_plain_ram()
            .and_then(|plain| plain.as_slice::<f32>())
            .map_err(|e| ClassifyError::Inference(e.to_string()))?;
        self.logits.copy_from_slice(logits);
        softmax_into(logits, &mut self.probabilities);
        top_k_into(&self.probabilities, self.k, &mut self.top);
        Ok(())
    }
}

impl Classifier {
    /// [`Classifier::infer`], adding each operator's time to `profile` (by operator name, or
    /// by node for [`Profile::by_node`], in plan order of first appearance). Slower than
    /// `infer` by the timing; for `runtime bench --profile`, not the frame loop.
    pub fn infer_profiled(&mut self, profile: &mut Profile) -> Result<&TopK, ClassifyError> {
        let input = tvec!(TValue::from_const(self.input.clone()));
        let outputs = guarded_run(&mut self.state, |state| {
            state.run_plan_with_eval(input, |context, state, node, inputs| {
                let started = Instant::now();
                let outputs = tract_onnx::tract_core::plan::eval(context, state, node, inputs);
                let elapsed = started.elapsed();
                if profile.by_node {
                    let info = node.op.info().unwrap_or_default().join(", ");
                    let op = node.op.name();
                    profile.add(
                        &format!("#{} {} ({op}: {info})", node.id, node.name),
                        elapsed,
                    );
                } else {
                    profile.add(&node.op.name(), elapsed);
                }
                outputs
            })
        })?;
        self.read_logits(&outputs)?;
        Ok(&self.top)
    }
}

/// Time per operator (or per node) over profiled runs.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// (operator or node, total time, calls), in order of first appearance.
    pub operators: Vec<(String, Duration, usize)>,
    by_node: bool,
}

impl Profile {
    /// A profile by node of the optimised graph: its number, name, operator and what the
    /// operator says it computes.
    pub fn by_node() -> Profile {
        Profile {
            by_node: true,
            ..Profile::default()
        }
    }

    /// Whether the profile is by node rather than by operator.
    pub fn is_by_node(&self) -> bool {
        self.by_node
    }

    fn add(&mut self, operator: &str, time: Duration) {
        match self
            .operators
            .iter_mut()
            .find(|(name, ..)| name == operator)
        {
            Some((_, total, calls)) => {
                *total += time;
                *calls += 1;
            }
            None => self.operators.push((operator.to_string(), time, 1)),
        }
    }

    /// Time of all operators together, over every profiled run.
    pub fn total(&self) -> Duration {
        self.operators.iter().map(|(_, time, _)| *time).sum()
    }

    /// Operators by time spent, most first.
    pub fn by_time(&self) -> Vec<(String, Duration, usize)> {
        let mut sorted = self.operators.clone();
        sorted.sort_by_key(|(_, time, _)| std::cmp::Reverse(*time));
        sorted
    }
}

/// Run `body` (a run of the plan): an error, or a panic escaping tract, becomes
/// [`ClassifyError::Inference`], and the state drops what the failed run left in it (the input
/// among it), so the next frame runs as if nothing had happened.
fn guarded_run(
    state: &mut TypedSimpleState,
    body: impl FnOnce(&mut TypedSimpleState) -> tract_onnx::prelude::TractResult<TVec<TValue>>,
) -> Result<TVec<TValue>, ClassifyError> {
    let error = match crate::catch_panic(|| body(state)) {
        Ok(Ok(outputs)) => return Ok(outputs),
        Ok(Err(e)) => format!("{e:#}"),
        Err(panic) => format!("internal error (panic) in tract: {panic}"),
    };
    let _ = state.reset_turn();
    Err(ClassifyError::Inference(error))
}

/// Give `write` the input tensor's values; between runs tract holds no reference to it.
fn write_input(
    input: &mut Arc<Tensor>,
    write: impl FnOnce(&mut [f32]) -> Result<(), ClassifyError>,
) -> Result<(), ClassifyError> {
    let input = Arc::get_mut(input).ok_or_else(|| {
        ClassifyError::Inference("the last run still holds the input tensor".into())
    })?;
    let mut plain = input
        .try_as_plain_ram_mut()
        .map_err(|e| ClassifyError::Inference(e.to_string()))?;
    write(
        plain
            .as_slice_mut::<f32>()
            .map_err(|e| ClassifyError::Inference(e.to_string()))?,
    )
}

/// Numerically stable softmax of `logits` into `out` (same length).
pub fn softmax_into(logits: &[f32], out: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = (l - max).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}

/// The `k` largest probabilities, best first (ties: lower class first); `k` is capped at
/// [`MAX_TOP_K`], what a [`TopK`] holds.
pub fn top_k_into(probabilities: &[f32], k: usize, top: &mut TopK) {
    let k = k.min(MAX_TOP_K);
    top.clear();
    for (class, &probability) in probabilities.iter().enumerate() {
        let candidate = Prediction { class, probability };
        let position = top
            .iter()
            .position(|p| probability > p.probability)
            .unwrap_or(top.len());
        if position >= k {
            continue;
        }
        if top.len() == k {
            top.pop();
        }
        top.insert(position, candidate)
            .expect("room was made above");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_survives_large_logits() {
        let mut out = [0.0; 3];
        softmax_into(&[1000.0, 1000.0, -1000.0], &mut out);
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((out[0] - 0.5).abs() < 1e-6 && out[2] == 0.0);
    }

    #[test]
    fn top_k_is_sorted_and_bounded() {
        let mut top = TopK::new();
        top_k_into(&[0.1, 0.4, 0.05, 0.3, 0.15], 3, &mut top);
        let classes: Vec<usize> = top.iter().map(|p| p.class).collect();
        assert_eq!(classes, vec![1, 3, 4]);
        top_k_into(&[0.5, 0.5], 1, &mut top);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].class, 0);
        // More than a TopK holds is capped (it used to panic).
        top_k_into(&[0.01; 40], usize::MAX, &mut top);
        assert_eq!(top.len(), MAX_TOP_K);
    }
}
