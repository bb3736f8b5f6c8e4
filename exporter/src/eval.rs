//! `exporter eval`: accuracy, per-class accuracy and a confusion matrix of a trained run.

use crate::data::{DataError, ImageFolder, ImageSet, PreparedSet};
use crate::training::{TrainError, evaluate, load_run};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct ClassAccuracy {
    pub class: String,
    pub count: usize,
    pub accuracy: f64,
}

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub accuracy: f64,
    pub loss: f64,
    pub count: usize,
    pub skipped: usize,
    pub classes: Vec<String>,
    pub per_class: Vec<ClassAccuracy>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

/// Evaluate the run's best weights on a folder-per-class dataset whose class names are the
/// run's (all of them or a subset).
pub fn eval_run(run_dir: &Path, data: &Path, batch_size: usize) -> Result<EvalReport, TrainError> {
    let device = crate::backend::device();
    let (config, model) = load_run(run_dir, &device)?;
    let mut folder = ImageFolder::scan(data)?;
    let mut mapping = Vec::with_capacity(folder.classes.len());
    for name in &folder.classes {
        match config.classes.iter().position(|c| c == name) {
            Some(index) => mapping.push(index),
            None => {
                return Err(DataError::ClassMismatch {
                    train: config.classes.clone(),
                    val: folder.classes.clone(),
                }
                .into());
            }
        }
    }
    folder
        .items
        .iter_mut()
        .for_each(|item| item.label = mapping[item.label]);
    let set = ImageSet::load(&folder.items, &|_| {});
    if set.is_empty() {
        return Err(DataError::Empty(data.display().to_string()).into());
    }
    let prepared = PreparedSet::new(&set, &config.preprocess)?;
    let evaluation = evaluate(&model, &prepared, batch_size, &device)?;
    let per_class = config
        .classes
        .iter()
        .enumerate()
        .map(|(c, class)| {
            let count: usize = evaluation.confusion[c].iter().sum();
            let accuracy = if count == 0 {
                0.0
            } else {
                evaluation.confusion[c][c] as f64 / count as f64
            };
            ClassAccuracy {
                class: class.clone(),
                count,
                accuracy,
            }
        })
        .collect();
    Ok(EvalReport {
        accuracy: evaluation.accuracy,
        loss: evaluation.loss,
        count: evaluation.count,
        skipped: set.skipped.len(),
        classes: config.classes,
        per_class,
        confusion: evaluation.confusion,
    })
}

impl EvalReport {
    /// The confusion matrix as aligned text, rows = true class.
    pub fn confusion_text(&self) -> String {
        let width = self
            .confusion
            .iter()
            .flatten()
            .map(|c| c.to_string().len())
            .max()
            .unwrap_or(1)
            .max(3);
        let name_width = self.classes.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut out = format!("{:name_width$}  ", "");
        for c in 0..self.classes.len() {
            out.push_str(&format!(" {:>width$}", c));
        }
        out.push('\n');
        for (c, row) in self.confusion.iter().enumerate() {
            out.push_str(&format!("{:name_width$}  ", self.classes[c]));
            for count in row {
                out.push_str(&format!(" {count:>width$}"));
            }
            out.push_str(&format!("   ({c})\n"));
        }
        out
    }
}
