//! `exporter eval`: accuracy, per-class accuracy and a confusion matrix of a trained run.

use crate::data::{Batcher, Source};
use crate::data::{DataError, ImageFolder, ImageSet, PreparedSet};
use crate::training::{TrainError, load_run};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use runtime::evaluation::{Confusion, Summary};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub loss: f64,
    pub skipped: usize,
    #[serde(flatten)]
    pub summary: Summary,
}

/// Evaluate the run's best weights on a folder-per-class dataset whose class names are the
/// run's (all of them or a subset).
pub fn eval_run(run_dir: &Path, data: &Path, batch_size: usize) -> Result<EvalReport, TrainError> {
    let device = crate::backend::device();
    let (config, model) = load_run(run_dir, &device)?;
    let folder = ImageFolder::scan(data)
        .and_then(|folder| folder.relabel(&config.classes))
        .map_err(DataError::from)?;
    let set = ImageSet::load(&folder.items, &|_| {});
    if set.is_empty() {
        return Err(DataError::Empty(data.display().to_string()).into());
    }
    let prepared = PreparedSet::new(&set, &config.preprocess)?;
    let evaluation = evaluate(
        |images| model.forward(images),
        &prepared,
        batch_size,
        &device,
    )?;
    let confusion = Confusion {
        classes: config.classes,
        matrix: evaluation.confusion,
    };
    Ok(EvalReport {
        loss: evaluation.loss,
        skipped: set.skipped.len(),
        summary: confusion.into(),
    })
}

/// Accuracy, loss and confusion matrix of a model on a prepared set.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    pub count: usize,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

/// The figures of the model whose logits `forward` gives, on `set`.
pub fn evaluate(
    forward: impl Fn(Tensor<4>) -> Tensor<2>,
    set: &PreparedSet,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation, TrainError> {
    let mut confusion: Vec<Vec<usize>> = Vec::new();
    let mut batcher = Batcher::new(&set.config)?;
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut rng = StdRng::seed_from_u64(0);
    let mut loss_sum = 0.0;
    let indices: Vec<usize> = (0..set.len()).collect();
    for chunk in indices.chunks(batch_size) {
        let (images, labels) = batcher.batch(&Source::Prepared(set), chunk, &mut rng, device)?;
        let logits = forward(images);
        let classes = logits.dims()[1];
        confusion.resize_with(classes, || vec![0; classes]);
        loss_sum += loss_fn.forward(logits.clone(), labels).into_scalar::<f32>() as f64
            * chunk.len() as f64;
        let predicted = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("argmax is int");
        for (&index, &p) in chunk.iter().zip(&predicted) {
            confusion[set.labels[index]][p as usize] += 1;
        }
    }
    let correct: usize = (0..confusion.len()).map(|c| confusion[c][c]).sum();
    let count = set.len();
    Ok(Evaluation {
        loss: loss_sum / count as f64,
        accuracy: correct as f64 / count as f64,
        count,
        confusion,
    })
}
