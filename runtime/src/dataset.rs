//! Folder-per-class image datasets (`ROOT/<class>/<image>`), as the exporter trains on and
//! `runtime eval` measures on: one scanner, so both agree on which files and which classes.

use std::path::{Path, PathBuf};

/// File extensions read as images (lower case).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"];

/// Why a dataset folder could not be scanned, or not be matched to a model's classes.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A folder could not be listed.
    #[error("cannot read dataset folder {path}: {error}")]
    Io {
        /// The folder being listed.
        path: String,
        /// The underlying I/O error.
        error: std::io::Error,
    },
    /// The root (the field) has no sub-folder holding an image.
    #[error("{0} has no class sub-folders with images (expected ROOT/<class>/<image>)")]
    NoClasses(String),
    /// Only one sub-folder of the root (the field) holds images.
    #[error("{0} has a single class; a classifier needs at least two")]
    SingleClass(String),
    /// A class folder is named after none of the model's labels ([`ImageFolder::relabel`]).
    #[error("class folder {class:?} is not one of the model's classes ({known})")]
    UnknownClass {
        /// The folder's name.
        class: String,
        /// The model's labels, comma-separated.
        known: String,
    },
}

/// One labelled image file.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// Path of the image file.
    pub path: PathBuf,
    /// Index of its class in [`ImageFolder::classes`].
    pub label: usize,
}

/// A folder whose sub-folders are classes (sorted by name) holding images.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    /// Class names: the folder names, sorted, after [`ImageFolder::scan`]; the model's labels after
    /// [`ImageFolder::relabel`].
    pub classes: Vec<String>,
    /// Every image, grouped by class folder (in folder-name order) and sorted by path within each.
    pub items: Vec<Item>,
}

impl ImageFolder {
    /// Class sub-folders with at least one image, sorted by name; their images sorted by path.
    pub fn scan(root: &Path) -> Result<Self, DatasetError> {
        let io = |error| DatasetError::Io {
            path: root.display().to_string(),
            error,
        };
        let mut classes: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(root).map_err(io)? {
            let entry = entry.map_err(io)?;
            if entry.file_type().map_err(io)?.is_dir() {
                classes.push((
                    entry.file_name().to_string_lossy().into_owned(),
                    entry.path(),
                ));
            }
        }
        classes.sort();
        let mut names = Vec::new();
        let mut items = Vec::new();
        for (name, dir) in classes {
            let mut files = image_files(&dir)?;
            if files.is_empty() {
                continue;
            }
            files.sort();
            let label = names.len();
            names.push(name);
            items.extend(files.into_iter().map(|path| Item { path, label }));
        }
        match names.len() {
            0 => Err(DatasetError::NoClasses(root.display().to_string())),
            1 => Err(DatasetError::SingleClass(root.display().to_string())),
            _ => Ok(ImageFolder {
                classes: names,
                items,
            }),
        }
    }

    /// Relabel the items by the index of their folder's name in `classes` (a model's labels),
    /// so a test set may hold all of a model's classes or only some. A folder named after no
    /// class is an error: its images could never be counted right.
    pub fn relabel(mut self, classes: &[String]) -> Result<Self, DatasetError> {
        let mut mapping = Vec::with_capacity(self.classes.len());
        for name in &self.classes {
            let index = classes.iter().position(|c| c == name).ok_or_else(|| {
                DatasetError::UnknownClass {
                    class: name.clone(),
                    known: classes.join(", "),
                }
            })?;
            mapping.push(index);
        }
        self.items
            .iter_mut()
            .for_each(|item| item.label = mapping[item.label]);
        self.classes = classes.to_vec();
        Ok(self)
    }
}

/// Every image file under `root` (any depth), sorted by path, thinned evenly to at most `max`
/// so a folder-per-class tree keeps all its classes.
pub fn images_under(root: &Path, max: usize) -> Result<Vec<PathBuf>, DatasetError> {
    let mut files = image_files(root)?;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let io = |error| DatasetError::Io {
            path: dir.display().to_string(),
            error,
        };
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            // Symlinked folders are not followed (as in `ImageFolder::scan`): a link back up
            // the tree would make the walk endless.
            if entry.file_type().map_err(io)?.is_dir() {
                let path = entry.path();
                files.extend(image_files(&path)?);
                dirs.push(path);
            }
        }
    }
    files.sort();
    if files.len() > max {
        let step = files.len() as f64 / max as f64;
        files = (0..max)
            .map(|i| files[(i as f64 * step) as usize].clone())
            .collect();
    }
    Ok(files)
}

fn image_files(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let io = |error| DatasetError::Io {
        path: dir.display().to_string(),
        error,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if is_image && path.is_file() {
            files.push(path);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn classes_are_sorted_folders_with_images() {
        let root = tempfile::tempdir().unwrap();
        touch(&root.path().join("dog/b.png"));
        touch(&root.path().join("dog/a.JPG"));
        touch(&root.path().join("cat/x.png"));
        touch(&root.path().join("cat/notes.txt"));
        std::fs::create_dir(root.path().join("empty")).unwrap();
        let folder = ImageFolder::scan(root.path()).unwrap();
        assert_eq!(folder.classes, ["cat", "dog"]);
        let names: Vec<_> = folder
            .items
            .iter()
            .map(|i| (i.path.file_name().unwrap().to_str().unwrap(), i.label))
            .collect();
        assert_eq!(names, [("x.png", 0), ("a.JPG", 1), ("b.png", 1)]);
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_loop_does_not_make_the_walk_endless() {
        let root = tempfile::tempdir().unwrap();
        touch(&root.path().join("a/x.png"));
        std::os::unix::fs::symlink(root.path(), root.path().join("a/loop")).unwrap();
        let files = images_under(root.path(), 100).unwrap();
        assert_eq!(files, [root.path().join("a/x.png")]);
    }

    #[test]
    fn images_under_walks_subfolders_and_thins_evenly() {
        let root = tempfile::tempdir().unwrap();
        for class in ["a", "b"] {
            for n in 0..4 {
                touch(&root.path().join(format!("{class}/{n}.png")));
            }
        }
        touch(&root.path().join("top.jpg"));
        touch(&root.path().join("a/readme.txt"));
        assert_eq!(images_under(root.path(), 100).unwrap().len(), 9);
        let thinned = images_under(root.path(), 4).unwrap();
        let names: Vec<_> = thinned
            .iter()
            .map(|p| p.strip_prefix(root.path()).unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a/0.png", "a/2.png", "b/0.png", "b/2.png"]);
    }

    #[test]
    fn relabel_maps_folders_onto_model_classes() {
        let root = tempfile::tempdir().unwrap();
        touch(&root.path().join("dog/a.png"));
        touch(&root.path().join("cat/b.png"));
        let classes: Vec<String> = ["bird", "dog", "cat"].map(String::from).to_vec();
        let folder = ImageFolder::scan(root.path())
            .unwrap()
            .relabel(&classes)
            .unwrap();
        let labels: Vec<usize> = folder.items.iter().map(|i| i.label).collect();
        assert_eq!(labels, [2, 1]);
        assert_eq!(folder.classes, classes);

        let error = ImageFolder::scan(root.path())
            .unwrap()
            .relabel(&classes[..2])
            .unwrap_err();
        assert!(error.to_string().contains("\"cat\""), "{error}");
    }
}
