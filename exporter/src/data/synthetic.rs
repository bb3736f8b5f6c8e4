//! Small synthetic folder-per-class datasets, for tests and smoke runs: in [`write_dataset`]
//! each class is a bright square in its own position over noise, so a model that learns
//! anything separates them; in [`write_stripes`] each class is a stripe width at a random
//! phase, for models that pool over positions (the CNN), to which the squares all look alike.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// Write `classes × per_class` grey PNGs of `width × height` to `root/class_<k>/<n>.png`.
pub fn write_dataset(
    root: &Path,
    classes: usize,
    per_class: usize,
    width: u32,
    height: u32,
    seed: u64,
) -> std::io::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let square = (width.min(height) / 2).max(1);
    let columns = classes.div_ceil(2) as u32;
    for class in 0..classes {
        let dir = root.join(format!("class_{class}"));
        std::fs::create_dir_all(&dir)?;
        // Classes tile the frame in two rows of `columns` cells.
        let cell_w = width / columns.max(1);
        let cell_h = height / 2;
        let (cx, cy) = (
            (class as u32 % columns) * cell_w,
            (class as u32 / columns) * cell_h,
        );
        for n in 0..per_class {
            let jitter_x = rng.random_range(0..=cell_w.saturating_sub(square));
            let jitter_y = rng.random_range(0..=cell_h.saturating_sub(square));
            let mut pixels = vec![0u8; (width * height) as usize];
            for (i, p) in pixels.iter_mut().enumerate() {
                let (x, y) = (i as u32 % width, i as u32 / width);
                let inside = x >= cx + jitter_x
                    && x < cx + jitter_x + square.min(cell_w)
                    && y >= cy + jitter_y
                    && y < cy + jitter_y + square.min(cell_h);
                let base = if inside { 200 } else { 40 };
                *p = (base + rng.random_range(0..40)) as u8;
            }
            write_png(&dir.join(format!("{n:03}.png")), &pixels, width, height)?;
        }
    }
    Ok(())
}

/// Write `classes × per_class` grey PNGs of `width × height` to `root/class_<k>/<n>.png`:
/// class `k` is vertical stripes `k + 1` pixels wide, at a random phase, over noise.
pub fn write_stripes(
    root: &Path,
    classes: usize,
    per_class: usize,
    width: u32,
    height: u32,
    seed: u64,
) -> std::io::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    for class in 0..classes {
        let dir = root.join(format!("class_{class}"));
        std::fs::create_dir_all(&dir)?;
        let stripe = class as u32 + 1;
        for n in 0..per_class {
            let phase = rng.random_range(0..2 * stripe);
            let pixels: Vec<u8> = (0..width * height)
                .map(|i| {
                    let bright = ((i % width + phase) / stripe).is_multiple_of(2);
                    (if bright { 200 } else { 40 } + rng.random_range(0..40)) as u8
                })
                .collect();
            write_png(&dir.join(format!("{n:03}.png")), &pixels, width, height)?;
        }
    }
    Ok(())
}

fn write_png(path: &Path, pixels: &[u8], width: u32, height: u32) -> std::io::Result<()> {
    let mut png = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut png);
    image::ImageEncoder::write_image(encoder, pixels, width, height, image::ExtendedColorType::L8)
        .map_err(std::io::Error::other)?;
    std::fs::write(path, png)
}
