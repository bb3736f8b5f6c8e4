//! Fashion-MNIST (Zalando, MIT licence) from its IDX files to a folder-per-class PNG dataset.

use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where Debian's `dataset-fashion-mnist` installs the four files.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Class names in label order, as folder names (sorted order differs, which is fine: the
/// dataset reader sorts folders and the metadata carries the names).
pub const CLASSES: [&str; 10] = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
];

#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error(
        "cannot read {path}: {source} (install Debian's dataset-fashion-mnist or pass --from DIR)"
    )]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an IDX file of the expected kind: {reason}")]
    Format { path: String, reason: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
}

/// Images (`count × rows × cols` bytes) and labels of one IDX pair.
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

fn read_gz(path: &Path) -> Result<Vec<u8>, IdxError> {
    let io = |source| IdxError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    GzDecoder::new(file).read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

fn be_u32(bytes: &[u8], at: usize) -> usize {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
}

/// Parse `{prefix}-images-idx3-ubyte.gz` and `{prefix}-labels-idx1-ubyte.gz` from `dir`.
pub fn read_split(dir: &Path, prefix: &str) -> Result<IdxImages, IdxError> {
    let images_path = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels_path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let images = read_gz(&images_path)?;
    let labels = read_gz(&labels_path)?;
    let format = |path: &PathBuf, reason: &str| IdxError::Format {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    if images.len() < 16 || be_u32(&images, 0) != 0x0803 {
        return Err(format(
            &images_path,
            "bad magic number (expected 0x00000803)",
        ));
    }
    if labels.len() < 8 || be_u32(&labels, 0) != 0x0801 {
        return Err(format(
            &labels_path,
            "bad magic number (expected 0x00000801)",
        ));
    }
    let (count, rows, cols) = (be_u32(&images, 4), be_u32(&images, 8), be_u32(&images, 12));
    let pixels = count.checked_mul(rows).and_then(|n| n.checked_mul(cols));
    if pixels.and_then(|n| n.checked_add(16)) != Some(images.len()) {
        return Err(format(&images_path, "length does not match its header"));
    }
    if be_u32(&labels, 4) != count || labels.len() != 8 + count {
        return Err(format(
            &labels_path,
            "label count does not match the images",
        ));
    }
    if let Some(bad) = labels[8..].iter().find(|&&l| l as usize >= CLASSES.len()) {
        return Err(format(
            &labels_path,
            &format!("label {bad} is not a Fashion-MNIST class"),
        ));
    }
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels: images[16..].to_vec(),
        labels: labels[8..].to_vec(),
    })
}

/// Summary of a conversion.
#[derive(Debug, serde::Serialize)]
pub struct Converted {
    pub train: usize,
    pub test: usize,
    pub out: PathBuf,
}

/// Write `OUT/{train,test}/<class>/<index>.png`. Files are written atomically, and an
/// existing complete image is left as it is, so an interrupted conversion can be rerun.
pub fn convert(
    from: &Path,
    out: &Path,
    on_progress: &dyn Fn(usize),
) -> Result<Converted, IdxError> {
    let mut counts = [0usize; 2];
    for (slot, (prefix, split)) in [("train", "train"), ("t10k", "test")]
        .into_iter()
        .enumerate()
    {
        let data = read_split(from, prefix)?;
        for class in CLASSES {
            let dir = out.join(split).join(class);
            std::fs::create_dir_all(&dir).map_err(|e| IdxError::Write {
                path: dir.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        let size = data.rows * data.cols;
        for index in 0..data.count {
            let class = CLASSES[data.labels[index] as usize];
            let path = out.join(split).join(class).join(format!("{index:05}.png"));
            if !path.exists() {
                let pixels = &data.pixels[index * size..(index + 1) * size];
                write_png(&path, pixels, data.cols as u32, data.rows as u32).map_err(|reason| {
                    IdxError::Write {
                        path: path.display().to_string(),
                        reason,
                    }
                })?;
            }
            on_progress(1);
        }
        counts[slot] = data.count;
    }
    Ok(Converted {
        train: counts[0],
        test: counts[1],
        out: out.to_path_buf(),
    })
}

fn write_png(path: &Path, grey: &[u8], width: u32, height: u32) -> Result<(), String> {
    let mut encoded = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut encoded);
    image::ImageEncoder::write_image(encoder, grey, width, height, image::ExtendedColorType::L8)
        .map_err(|e| e.to_string())?;
    runtime::write_atomic(path, &encoded).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gz(path: &Path, bytes: &[u8]) {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(bytes).unwrap();
        std::fs::write(path, encoder.finish().unwrap()).unwrap();
    }

    fn idx_pair(dir: &Path, prefix: &str, labels: &[u8]) {
        let mut images = vec![0, 0, 8, 3];
        for v in [labels.len() as u32, 2, 3] {
            images.extend(v.to_be_bytes());
        }
        images.extend((0..labels.len() * 6).map(|i| i as u8));
        gz(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")), &images);
        let mut label_bytes = vec![0, 0, 8, 1];
        label_bytes.extend((labels.len() as u32).to_be_bytes());
        label_bytes.extend(labels);
        gz(
            &dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            &label_bytes,
        );
    }

    #[test]
    fn converts_idx_to_class_folders_of_pngs() {
        let dir = tempfile::tempdir().unwrap();
        idx_pair(dir.path(), "train", &[0, 9, 9]);
        idx_pair(dir.path(), "t10k", &[3]);
        let out = dir.path().join("out");
        let converted = convert(dir.path(), &out, &|_| {}).unwrap();
        assert_eq!((converted.train, converted.test), (3, 1));
        let boot = out.join("train/ankle_boot/00002.png");
        let image = runtime::decode_file(&boot).unwrap();
        assert_eq!(
            (image.width, image.height, image.format),
            (3, 2, runtime::PixelFormat::Gray8)
        );
        assert_eq!(image.pixels, vec![12, 13, 14, 15, 16, 17]);
        assert!(out.join("test/dress/00000.png").is_file());
    }

    #[test]
    fn wrong_magic_and_missing_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_split(dir.path(), "train").err().unwrap().to_string();
        assert!(err.contains("dataset-fashion-mnist"), "{err}");
        gz(
            &dir.path().join("train-images-idx3-ubyte.gz"),
            &[1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        gz(
            &dir.path().join("train-labels-idx1-ubyte.gz"),
            &[0, 0, 8, 1, 0, 0, 0, 0],
        );
        let err = read_split(dir.path(), "train").err().unwrap().to_string();
        assert!(err.contains("magic"), "{err}");
    }

    #[test]
    fn a_header_whose_sizes_overflow_is_a_format_error() {
        // count × rows × cols overflowed (a panic in debug builds, a wrapped size in release).
        let dir = tempfile::tempdir().unwrap();
        let mut images = vec![0, 0, 8, 3];
        images.extend([u32::MAX; 3].iter().flat_map(|v| v.to_be_bytes()));
        gz(&dir.path().join("train-images-idx3-ubyte.gz"), &images);
        gz(
            &dir.path().join("train-labels-idx1-ubyte.gz"),
            &[0, 0, 8, 1, 0, 0, 0, 0],
        );
        let err = read_split(dir.path(), "train").err().unwrap().to_string();
        assert!(err.contains("length does not match its header"), "{err}");
    }
}
