//! `exporter eval`: accuracy, per-class accuracy and a confusion matrix of a trained run.

use crate::data::{DataError, ImageFolder, ImageSet, PreparedSet};
use crate::training::{TrainError, evaluate, load_run};
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
    let evaluation = evaluate(&model, &prepared, batch_size, &device)?;
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
