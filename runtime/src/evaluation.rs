//! Accuracy, per-class accuracy and the confusion matrix of a classifier on labelled images:
//! `runtime eval` on the tract model, and `exporter eval` on the burn one, count the same way.

use crate::classifier::{Classifier, ClassifyError};
use crate::dataset::{DatasetError, ImageFolder};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Counts of (true class, predicted class) pairs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Confusion {
    /// Class names, indexing both axes of `matrix`.
    pub classes: Vec<String>,
    /// `matrix[true][predicted]`.
    pub matrix: Vec<Vec<usize>>,
}

/// How one class fared: how many of its images were counted and how many came out right.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassAccuracy {
    /// The class's name.
    pub class: String,
    /// Images whose true class this is.
    pub count: usize,
    /// Fraction of those images predicted as this class, 0–1 (0 when there are none).
    pub accuracy: f64,
}

impl Confusion {
    /// An all-zero matrix over `classes`.
    pub fn new(classes: Vec<String>) -> Confusion {
        let n = classes.len();
        Confusion {
            classes,
            matrix: vec![vec![0; n]; n],
        }
    }

    /// Count one image of class `truth` predicted as `predicted`, both indices into `classes` (out
    /// of range panics).
    pub fn add(&mut self, truth: usize, predicted: usize) {
        self.matrix[truth][predicted] += 1;
    }

    /// Images counted so far.
    pub fn count(&self) -> usize {
        self.matrix.iter().flatten().sum()
    }

    /// Images predicted as their true class (the diagonal's sum).
    pub fn correct(&self) -> usize {
        (0..self.classes.len()).map(|c| self.matrix[c][c]).sum()
    }

    /// Fraction of images classified right (0 for no images).
    pub fn accuracy(&self) -> f64 {
        ratio(self.correct(), self.count())
    }

    /// Each class's image count and accuracy, in class order.
    pub fn per_class(&self) -> Vec<ClassAccuracy> {
        self.classes
            .iter()
            .zip(&self.matrix)
            .enumerate()
            .map(|(c, (class, row))| {
                let count = row.iter().sum();
                ClassAccuracy {
                    class: class.clone(),
                    count,
                    accuracy: ratio(row[c], count),
                }
            })
            .collect()
    }

    /// One line per class: name, accuracy, image count.
    pub fn per_class_text(&self) -> String {
        self.per_class()
            .iter()
            .map(|c| {
                format!(
                    "  {:<20} {:>6.2}%  ({} images)\n",
                    c.class,
                    c.accuracy * 100.0,
                    c.count
                )
            })
            .collect()
    }

    /// The matrix as aligned text: a row per true class, a column per prediction.
    pub fn text(&self) -> String {
        let width = self
            .matrix
            .iter()
            .flatten()
            .map(|c| c.to_string().len())
            .max()
            .unwrap_or(1)
            .max(3);
        let name_width = self.classes.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut out = format!("{:name_width$}  ", "");
        for c in 0..self.classes.len() {
            out.push_str(&format!(" {c:>width$}"));
        }
        out.push('\n');
        for (c, row) in self.matrix.iter().enumerate() {
            out.push_str(&format!("{:name_width$}  ", self.classes[c]));
            for count in row {
                out.push_str(&format!(" {count:>width$}"));
            }
            out.push_str(&format!("   ({c})\n"));
        }
        out
    }
}

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Why [`evaluate_folder`] produced no result.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The folder is no usable dataset, or a class folder is named after none of the model's
    /// labels.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// No image under the folder (the field) could be decoded: nothing was classified.
    #[error("no readable images in {0}")]
    Empty(String),
    /// A decoded image could not be classified; this ends the evaluation.
    #[error("{path}: {error}")]
    Classify {
        /// Path of the image.
        path: PathBuf,
        /// Why it could not be classified.
        error: ClassifyError,
    },
}

/// An image that could not be decoded, and why.
#[derive(Clone, Debug, Serialize)]
pub struct SkippedImage {
    /// Path of the image.
    pub path: PathBuf,
    /// The decoder's error message.
    pub reason: String,
}

/// A confusion matrix with the figures read off it, as reports print and serialise them.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Fraction of all counted images classified right, 0–1.
    pub accuracy: f64,
    /// Images counted (classified).
    pub count: usize,
    /// Count and accuracy of each class, in class order.
    pub per_class: Vec<ClassAccuracy>,
    /// The matrix the figures above were read from.
    pub confusion: Confusion,
}

impl From<Confusion> for Summary {
    fn from(confusion: Confusion) -> Summary {
        Summary {
            accuracy: confusion.accuracy(),
            count: confusion.count(),
            per_class: confusion.per_class(),
            confusion,
        }
    }
}

/// What [`evaluate_folder`] found: the figures, and the images it could not decode.
#[derive(Clone, Debug, Serialize)]
pub struct FolderEvaluation {
    /// Figures over the classified images (its fields sit at the top level of the JSON).
    #[serde(flatten)]
    pub summary: Summary,
    /// Images left out because they could not be decoded.
    pub skipped: Vec<SkippedImage>,
}

/// Classify every image of a folder-per-class dataset whose folder names are the model's
/// labels (all or some). Undecodable images are skipped and listed; `on_image` is called after
/// each image with the number done so far and the total.
pub fn evaluate_folder(
    classifier: &mut Classifier,
    root: &Path,
    mut on_image: impl FnMut(usize, usize),
) -> Result<FolderEvaluation, EvalError> {
    let folder = ImageFolder::scan(root)?.relabel(&classifier.model().labels)?;
    let mut confusion = Confusion::new(folder.classes.clone());
    let mut skipped = Vec::new();
    for (done, item) in folder.items.iter().enumerate() {
        match crate::decode_file(&item.path) {
            Ok(image) => {
                let top = classifier.classify_frame(&image.frame()).map_err(|error| {
                    EvalError::Classify {
                        path: item.path.clone(),
                        error,
                    }
                })?;
                confusion.add(item.label, top[0].class);
            }
            Err(error) => {
                log::warn!("skipping {}: {error}", item.path.display());
                skipped.push(SkippedImage {
                    path: item.path.clone(),
                    reason: error.to_string(),
                });
            }
        }
        on_image(done + 1, folder.items.len());
    }
    if confusion.count() == 0 {
        return Err(EvalError::Empty(root.display().to_string()));
    }
    Ok(FolderEvaluation {
        summary: confusion.into(),
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_accuracy_per_class_and_text() {
        let mut confusion = Confusion::new(vec!["a".into(), "bb".into(), "c".into()]);
        for (truth, predicted) in [(0, 0), (0, 1), (1, 1), (1, 1), (1, 2)] {
            confusion.add(truth, predicted);
        }
        assert_eq!(confusion.count(), 5);
        assert_eq!(confusion.correct(), 3);
        assert!((confusion.accuracy() - 0.6).abs() < 1e-12);
        let per_class = confusion.per_class();
        assert_eq!(per_class[0].count, 2);
        assert!((per_class[0].accuracy - 0.5).abs() < 1e-12);
        assert!((per_class[1].accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!((per_class[2].count, per_class[2].accuracy), (0, 0.0));
        let text = confusion.text();
        assert_eq!(text.lines().count(), 4);
        assert!(text.lines().nth(2).unwrap().starts_with("bb  "), "{text}");
    }
}
