//! Folder-per-class image datasets: scanning, a deterministic split, decoding, batching and
//! light augmentation. Pixels go through the runtime crate's [`PatchPipeline`], the same code
//! that serves the model, so training and serving see identical inputs.

pub mod fashion_mnist;
pub mod synthetic;

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
pub use runtime::dataset::{DatasetError, ImageFolder, Item};
pub use runtime::evaluation::SkippedImage;
use runtime::{DecodedImage, PatchPipeline, PreprocessConfig, PreprocessError, Region};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("train and validation folders have different classes: {train:?} vs {val:?}")]
    ClassMismatch {
        train: Vec<String>,
        val: Vec<String>,
    },
    #[error("validation fraction {0} is not in [0, 1)")]
    BadFraction(f64),
    #[error("no readable images in {0}")]
    Empty(String),
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
}

/// Training and validation items with their shared class names.
#[derive(Clone, Debug)]
pub struct Splits {
    pub classes: Vec<String>,
    pub train: Vec<Item>,
    pub val: Vec<Item>,
}

impl Splits {
    /// `ROOT/train` + `ROOT/val` (or `validation`) when both exist; otherwise a stratified
    /// split of `ROOT/<class>` keeping `val_fraction` of each class, fixed by `seed`. A fraction
    /// of 0 puts every image in training and leaves validation empty.
    pub fn from_folder(root: &Path, val_fraction: f64, seed: u64) -> Result<Self, DataError> {
        let train_dir = root.join("train");
        let val_dir = ["val", "validation"]
            .map(|n| root.join(n))
            .into_iter()
            .find(|d| d.is_dir());
        if let (true, Some(val_dir)) = (train_dir.is_dir(), val_dir) {
            let train = ImageFolder::scan(&train_dir)?;
            let val = ImageFolder::scan(&val_dir)?;
            if train.classes != val.classes {
                return Err(DataError::ClassMismatch {
                    train: train.classes,
                    val: val.classes,
                });
            }
            return Ok(Splits {
                classes: train.classes,
                train: train.items,
                val: val.items,
            });
        }
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(DataError::BadFraction(val_fraction));
        }
        let folder = ImageFolder::scan(root)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for label in 0..folder.classes.len() {
            let mut items: Vec<Item> = folder
                .items
                .iter()
                .filter(|i| i.label == label)
                .cloned()
                .collect();
            items.shuffle(&mut rng);
            // Every class with two or more images gets at least one validation image, unless
            // there is to be no validation at all.
            let n_val = match items.len() {
                _ if val_fraction == 0.0 => 0,
                0 | 1 => 0,
                n => ((n as f64 * val_fraction).round() as usize).clamp(1, n - 1),
            };
            val.extend(items.drain(..n_val));
            train.extend(items);
        }
        Ok(Splits {
            classes: folder.classes,
            train,
            val,
        })
    }

    /// Keep `fraction` of each class's training images (at least one), chosen by `seed`;
    /// validation is untouched, so runs on less data are scored on the same images.
    pub fn keep_training_fraction(mut self, fraction: f64, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7261_696e_6672_6163);
        let mut keep = vec![false; self.train.len()];
        for label in 0..self.classes.len() {
            let mut indices: Vec<usize> = (0..self.train.len())
                .filter(|&i| self.train[i].label == label)
                .collect();
            indices.shuffle(&mut rng);
            let n = ((indices.len() as f64 * fraction).round() as usize).max(1);
            for &i in indices.iter().take(n) {
                keep[i] = true;
            }
        }
        let mut kept = keep.into_iter();
        self.train.retain(|_| kept.next().unwrap_or(false));
        self
    }
}

/// Decoded images of one split.
#[derive(Debug, Default)]
pub struct ImageSet {
    pub frames: Vec<DecodedImage>,
    pub labels: Vec<usize>,
    pub paths: Vec<PathBuf>,
    pub skipped: Vec<SkippedImage>,
}

impl ImageSet {
    /// Decode every item (on all cores); unreadable files are logged and counted, not fatal.
    pub fn load(items: &[Item], on_progress: &(dyn Fn(usize) + Sync)) -> ImageSet {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = items.len().div_ceil(threads).max(1);
        let decoded: Vec<Vec<(usize, Result<DecodedImage, String>)>> =
            std::thread::scope(|scope| {
                let handles: Vec<_> = items
                    .chunks(chunk)
                    .enumerate()
                    .map(|(c, part)| {
                        scope.spawn(move || {
                            part.iter()
                                .enumerate()
                                .map(|(i, item)| {
                                    let result =
                                        runtime::decode_file(&item.path).map_err(|e| e.to_string());
                                    on_progress(1);
                                    (c * chunk + i, result)
                                })
                                .collect()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("decoder thread panicked"))
                    .collect()
            });
        let mut set = ImageSet::default();
        for (index, result) in decoded.into_iter().flatten() {
            let item = &items[index];
            match result {
                Ok(frame) => {
                    set.frames.push(frame);
                    set.labels.push(item.label);
                    set.paths.push(item.path.clone());
                }
                Err(reason) => {
                    log::warn!("skipping {}: {reason}", item.path.display());
                    set.skipped.push(SkippedImage {
                        path: item.path.clone(),
                        reason,
                    });
                }
            }
        }
        set
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// True when every image is single-channel (the model then takes 1 channel).
    pub fn all_grey(&self) -> bool {
        self.frames
            .iter()
            .all(|f| f.format == runtime::PixelFormat::Gray8)
    }
}

/// Random-resized crop and horizontal flip, mild enough for small datasets, and optionally
/// random erasing.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augmentation {
    /// Range of the crop's area as a fraction of the image.
    pub min_area: f32,
    pub flip: bool,
    /// Probability of random erasing (Zhong et al., 2017): a rectangle covering 2–40 % of the
    /// image, of aspect 0.3–3.3, set to 0, the mean pixel once normalised.
    #[serde(default)]
    pub erase: f32,
}

impl Default for Augmentation {
    fn default() -> Self {
        Augmentation {
            min_area: 0.5,
            flip: true,
            erase: 0.0,
        }
    }
}

/// Smallest and largest area of an erased rectangle, as a fraction of the image.
const ERASE_AREA: (f32, f32) = (0.02, 0.4);
/// Smallest aspect ratio of an erased rectangle; the largest is its inverse.
const ERASE_MIN_ASPECT: f32 = 0.3;

impl Augmentation {
    fn crop(&self, width: u32, height: u32, rng: &mut StdRng) -> Region {
        let (w, h) = (width as f32, height as f32);
        for _ in 0..10 {
            let area = w * h * rng.random_range(self.min_area..=1.0);
            let aspect = (rng.random_range((3.0f32 / 4.0).ln()..=(4.0f32 / 3.0).ln())).exp();
            let cw = (area * aspect).sqrt();
            let ch = (area / aspect).sqrt();
            if cw <= w && ch <= h {
                let left = rng.random_range(0.0..=(w - cw));
                let top = rng.random_range(0.0..=(h - ch));
                return Region {
                    left,
                    top,
                    width: cw,
                    height: ch,
                };
            }
        }
        Region::whole(width, height)
    }

    /// Erase a random rectangle of the `size`×`size` planes in `pixels`, with probability
    /// [`Augmentation::erase`]. Every channel loses the same rectangle.
    fn erase(&self, pixels: &mut [f32], size: usize, rng: &mut StdRng) {
        // No draw at all without erasing: runs made before it existed keep their random stream,
        // so resuming them stays exact.
        if self.erase <= 0.0 || !rng.random_bool(f64::from(self.erase.min(1.0))) {
            return;
        }
        let image_area = (size * size) as f32;
        for _ in 0..10 {
            let area = image_area * rng.random_range(ERASE_AREA.0..=ERASE_AREA.1);
            let aspect = rng
                .random_range(ERASE_MIN_ASPECT.ln()..=(1.0 / ERASE_MIN_ASPECT).ln())
                .exp();
            let height = (area * aspect).sqrt().round() as usize;
            let width = (area / aspect).sqrt().round() as usize;
            if (1..size).contains(&height) && (1..size).contains(&width) {
                let top = rng.random_range(0..=size - height);
                let left = rng.random_range(0..=size - width);
                for plane in pixels.chunks_mut(size * size) {
                    for row in plane.chunks_mut(size).skip(top).take(height) {
                        row[left..left + width].fill(0.0);
                    }
                }
                return;
            }
        }
    }
}

/// Preprocessed pixels of a whole set, computed once when it is not augmented.
#[derive(Debug)]
pub struct PreparedSet {
    pub config: PreprocessConfig,
    pub pixels: Vec<f32>,
    pub labels: Vec<usize>,
    per_image: usize,
}

impl PreparedSet {
    pub fn new(set: &ImageSet, config: &PreprocessConfig) -> Result<Self, DataError> {
        let mut pipeline = PatchPipeline::new(config.clone())?;
        let per_image = config.tensor_len();
        let mut pixels = vec![0.0; per_image * set.len()];
        for (frame, out) in set.frames.iter().zip(pixels.chunks_mut(per_image)) {
            pipeline.run(&frame.frame(), out)?;
        }
        Ok(PreparedSet {
            config: config.clone(),
            pixels,
            labels: set.labels.clone(),
            per_image,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, index: usize) -> &[f32] {
        &self.pixels[index * self.per_image..(index + 1) * self.per_image]
    }
}

/// Where a batch's pixels come from.
pub enum Source<'a> {
    Prepared(&'a PreparedSet),
    Augmented {
        set: &'a ImageSet,
        augmentation: Augmentation,
    },
}

impl Source<'_> {
    pub fn len(&self) -> usize {
        match self {
            Source::Prepared(p) => p.len(),
            Source::Augmented { set, .. } => set.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds batches as burn tensors, reusing its buffers.
pub struct Batcher {
    pipeline: PatchPipeline,
    pixels: Vec<f32>,
    labels: Vec<i64>,
}

impl Batcher {
    pub fn new(config: &PreprocessConfig) -> Result<Self, DataError> {
        Ok(Batcher {
            pipeline: PatchPipeline::new(config.clone())?,
            pixels: Vec::new(),
            labels: Vec::new(),
        })
    }

    /// The images at `indices` as `[batch, C, H, W]` plus their labels.
    pub fn batch(
        &mut self,
        source: &Source,
        indices: &[usize],
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<(Tensor<4>, Tensor<1, Int>), DataError> {
        let config = self.pipeline.config();
        let (size, channels) = (config.image_size as usize, config.channels as usize);
        let per_image = config.tensor_len();
        self.pixels.resize(per_image * indices.len(), 0.0);
        self.labels.clear();
        for (&index, out) in indices.iter().zip(self.pixels.chunks_mut(per_image)) {
            match source {
                Source::Prepared(prepared) => {
                    out.copy_from_slice(prepared.image(index));
                    self.labels.push(prepared.labels[index] as i64);
                }
                Source::Augmented { set, augmentation } => {
                    let frame = set.frames[index].frame();
                    let region = augmentation.crop(frame.width, frame.height, rng);
                    self.pipeline.run_region(&frame, region, out)?;
                    if augmentation.flip && rng.random_bool(0.5) {
                        out.chunks_mut(size).for_each(|row| row.reverse());
                    }
                    augmentation.erase(out, size, rng);
                    self.labels.push(set.labels[index] as i64);
                }
            }
        }
        let images = Tensor::from_data(
            TensorData::new(self.pixels.clone(), [indices.len(), channels, size, size]),
            device,
        );
        let labels = Tensor::from_data(
            TensorData::new(self.labels.clone(), [indices.len()]),
            device,
        );
        Ok((images, labels))
    }
}

/// A permutation of `0..len` fixed by `(seed, epoch)`, so a resumed run sees the same order.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut StdRng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_training_fraction_keeps_that_share_of_each_class_and_all_validation() {
        let dir = tempfile::tempdir().unwrap();
        crate::synthetic::write_dataset(dir.path(), 3, 20, 8, 8, 1).unwrap();
        let full = Splits::from_folder(dir.path(), 0.25, 7).unwrap();
        let kept = full.clone().keep_training_fraction(0.3, 7);
        assert_eq!(kept.val, full.val);
        for label in 0..3 {
            let count = |items: &[Item]| items.iter().filter(|i| i.label == label).count();
            assert_eq!(
                (count(&full.train), count(&kept.train)),
                (15, 5),
                "class {label}"
            );
        }
        assert!(kept.train.iter().all(|item| full.train.contains(item)));
        let again = full.clone().keep_training_fraction(0.3, 7);
        assert_eq!(
            again.train, kept.train,
            "the same seed keeps the same images"
        );
        let tiny = full.keep_training_fraction(0.01, 7);
        assert_eq!(tiny.train.len(), 3, "at least one image per class");
    }

    fn erased(augmentation: Augmentation, seed: u64) -> Vec<f32> {
        let mut pixels = vec![1.0; 2 * 28 * 28];
        augmentation.erase(&mut pixels, 28, &mut StdRng::seed_from_u64(seed));
        pixels
    }

    #[test]
    fn erasing_zeroes_one_rectangle_in_every_channel() {
        let always = Augmentation {
            erase: 1.0,
            ..Augmentation::default()
        };
        for seed in 0..50 {
            let pixels = erased(always, seed);
            let (red, green) = pixels.split_at(28 * 28);
            assert_eq!(red, green, "channels erased differently");
            let zeros: Vec<(usize, usize)> = (0..28 * 28)
                .filter(|&i| red[i] == 0.0)
                .map(|i| (i / 28, i % 28))
                .collect();
            let rows = zeros.iter().map(|z| z.0);
            let cols = zeros.iter().map(|z| z.1);
            let height = rows.clone().max().unwrap() - rows.min().unwrap() + 1;
            let width = cols.clone().max().unwrap() - cols.min().unwrap() + 1;
            assert_eq!(
                zeros.len(),
                height * width,
                "not one rectangle (seed {seed})"
            );
            let area = zeros.len() as f32 / (28.0 * 28.0);
            assert!(
                (0.01..=0.45).contains(&area),
                "erased {area} of the image (seed {seed})"
            );
        }
    }

    #[test]
    fn erasing_is_off_by_default_and_follows_its_probability() {
        assert!(erased(Augmentation::default(), 1).iter().all(|&p| p == 1.0));
        let half = Augmentation {
            erase: 0.5,
            ..Augmentation::default()
        };
        let erased_count = (0..400)
            .filter(|&seed| erased(half, seed).contains(&0.0))
            .count();
        assert!(
            (140..=260).contains(&erased_count),
            "{erased_count} of 400 erased at p = 0.5"
        );
    }
}
