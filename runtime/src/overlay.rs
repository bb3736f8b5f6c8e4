//! Drawing a patch-grid heat map over a frame, with a caption: what `runtime explain` writes.

use crate::decode::DecodedImage;
use crate::preprocess::{PixelFormat, Region};

/// How strongly the heat colours cover the frame.
const OPACITY: f32 = 0.5;

/// Control points of a perceptually ordered dark-to-bright map (close to matplotlib's inferno).
const HEAT: [(f32, [f32; 3]); 5] = [
    (0.0, [0.0, 0.0, 4.0]),
    (0.25, [87.0, 16.0, 110.0]),
    (0.5, [188.0, 55.0, 84.0]),
    (0.75, [249.0, 142.0, 9.0]),
    (1.0, [252.0, 255.0, 164.0]),
];

/// Values over a square grid of patches, row-major, scaled to [0, 1] for drawing.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchMap {
    /// Patches per side of the grid.
    pub side: usize,
    /// One value per patch, row-major: `side × side` of them.
    pub values: Vec<f32>,
}

impl PatchMap {
    /// `values` (one per patch, row-major) on a square grid; `None` if their count is not a
    /// square.
    pub fn new(values: Vec<f32>) -> Option<PatchMap> {
        let side = (values.len() as f64).sqrt().round() as usize;
        (side * side == values.len() && side > 0).then_some(PatchMap { side, values })
    }

    /// Min-max scaled to [0, 1]; a uniform map becomes all zeros.
    pub fn normalised(&self) -> PatchMap {
        let min = self.values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = self
            .values
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let range = max - min;
        let values = self
            .values
            .iter()
            .map(|v| if range > 0.0 { (v - min) / range } else { 0.0 })
            .collect();
        PatchMap {
            side: self.side,
            values,
        }
    }

    /// Bilinear sample at grid coordinates (patch centres at `i + 0.5`), clamped at the edges.
    fn sample(&self, gx: f32, gy: f32) -> f32 {
        let last = (self.side - 1) as f32;
        let (x, y) = ((gx - 0.5).clamp(0.0, last), (gy - 0.5).clamp(0.0, last));
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(self.side - 1), (y0 + 1).min(self.side - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let at = |x: usize, y: usize| self.values[y * self.side + x];
        let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
        let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
        top * (1.0 - fy) + bottom * fy
    }
}

/// The heat colour of `t` in [0, 1].
pub fn heat_colour(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let upper = HEAT
        .iter()
        .position(|(at, _)| *at >= t)
        .unwrap_or(HEAT.len() - 1)
        .max(1);
    let ((a, ca), (b, cb)) = (HEAT[upper - 1], HEAT[upper]);
    let f = (t - a) / (b - a);
    [0, 1, 2].map(|c| (ca[c] + (cb[c] - ca[c]) * f).round() as u8)
}

/// An RGB picture of the frame's size: the map upsampled over `region` (what the model saw),
/// the rest of the frame dimmed, and `caption` in the top-left corner when it fits.
pub fn render(
    image: &DecodedImage,
    region: Region,
    map: &PatchMap,
    caption: Option<&str>,
) -> image::RgbImage {
    let (width, height) = (image.width, image.height);
    let map = map.normalised();
    let mut out = image::RgbImage::new(width, height);
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        let source = source_rgb(image, x, y);
        let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
        let inside = cx >= region.left
            && cx < region.left + region.width
            && cy >= region.top
            && cy < region.top + region.height;
        pixel.0 = if inside {
            let gx = (cx - region.left) / region.width * map.side as f32;
            let gy = (cy - region.top) / region.height * map.side as f32;
            let heat = heat_colour(map.sample(gx, gy));
            [0, 1, 2].map(|c| {
                (source[c] as f32 * (1.0 - OPACITY) + heat[c] as f32 * OPACITY).round() as u8
            })
        } else {
            source.map(|v| v / 3)
        };
    }
    if let Some(text) = caption {
        draw_caption(&mut out, text);
    }
    out
}

fn source_rgb(image: &DecodedImage, x: u32, y: u32) -> [u8; 3] {
    let i = (y * image.width + x) as usize;
    match image.format {
        PixelFormat::Gray8 => [image.pixels[i]; 3],
        PixelFormat::Rgb8 => [0, 1, 2].map(|c| image.pixels[3 * i + c]),
        PixelFormat::Bgr8 => [2, 1, 0].map(|c| image.pixels[3 * i + c]),
    }
}

/// White 8×8 bitmap text on a dark band, scaled with the picture; skipped if it cannot fit.
fn draw_caption(out: &mut image::RgbImage, text: &str) {
    let scale = (out.width() / 240).clamp(1, 4);
    let glyph = 8 * scale;
    let chars = text.chars().count() as u32;
    let (band_w, band_h) = (chars * glyph + 2 * scale, glyph + 2 * scale);
    if band_w > out.width() || band_h > out.height() {
        return;
    }
    for y in 0..band_h {
        for x in 0..band_w {
            let p = out.get_pixel_mut(x, y);
            p.0 = p.0.map(|v| v / 4);
        }
    }
    for (i, ch) in text.chars().enumerate() {
        let rows = font8x8::legacy::BASIC_LEGACY
            .get(ch as usize)
            .copied()
            .unwrap_or(font8x8::legacy::BASIC_LEGACY[b'?' as usize]);
        for (row, bits) in rows.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let x = scale + i as u32 * glyph + col * scale + dx;
                        let y = scale + row as u32 * scale + dy;
                        out.put_pixel(x, y, image::Rgb([255, 255, 255]));
                    }
                }
            }
        }
    }
}

/// Pictures side by side, top-aligned, on black.
pub fn tile(pictures: &[image::RgbImage]) -> image::RgbImage {
    let width = pictures.iter().map(|p| p.width()).sum();
    let height = pictures.iter().map(|p| p.height()).max().unwrap_or(0);
    let mut out = image::RgbImage::new(width, height);
    let mut left = 0;
    for picture in pictures {
        image::imageops::replace(&mut out, picture, i64::from(left), 0);
        left += picture.width();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_colours_run_dark_to_bright() {
        assert_eq!(heat_colour(0.0), [0, 0, 4]);
        assert_eq!(heat_colour(1.0), [252, 255, 164]);
        let brightness = |t: f32| heat_colour(t).iter().map(|&c| c as u32).sum::<u32>();
        assert!((0..10).all(|i| brightness(i as f32 / 10.0) < brightness((i + 1) as f32 / 10.0)));
    }

    #[test]
    fn maps_need_a_square_count() {
        assert!(PatchMap::new(vec![0.0; 16]).is_some());
        assert!(PatchMap::new(vec![0.0; 15]).is_none());
        assert!(PatchMap::new(Vec::new()).is_none());
    }

    #[test]
    fn the_hot_patch_lands_where_it_belongs() {
        // 2×2 grid, top-right hot, on a 40×20 grey frame squashed whole.
        let map = PatchMap::new(vec![0.0, 1.0, 0.0, 0.0]).unwrap();
        let image = DecodedImage {
            pixels: vec![128; 40 * 20],
            width: 40,
            height: 20,
            format: PixelFormat::Gray8,
        };
        let out = render(&image, Region::whole(40, 20), &map, None);
        assert_eq!(out.dimensions(), (40, 20));
        let brightness = |x, y| out.get_pixel(x, y).0.iter().map(|&c| c as u32).sum::<u32>();
        assert!(brightness(35, 3) > brightness(5, 3));
        assert!(brightness(35, 3) > brightness(35, 17));
    }
}
