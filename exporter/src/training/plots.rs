//! PNG plots: accuracy/loss curves of a run and confusion matrices.
//!
//! Drawn into memory and written atomically, like every other artifact.

use crate::training::EpochMetrics;
use plotters::prelude::*;
use std::path::Path;

const WIDTH: u32 = 960;
const HEIGHT: u32 = 480;
const DARK_GREEN: RGBColor = RGBColor(0, 150, 0);

/// The plots' text is drawn with this font (a Latin subset of DejaVu Sans, `assets/`), so that
/// no system font or fontconfig is needed.
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-latin.ttf");

fn register_font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    ok.then_some(())
        .ok_or_else(|| "the plot font is unreadable".into())
}

fn save_rgb(path: &Path, rgb: Vec<u8>, width: u32, height: u32) -> Result<(), String> {
    let mut png = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new(&mut png);
    image::ImageEncoder::write_image(encoder, &rgb, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| e.to_string())?;
    runtime::write_atomic(path, &png).map_err(|e| format!("{}: {e}", path.display()))
}

/// One line of the curves plot: a metric per epoch, absent on epochs that lack it.
struct Curve {
    label: &'static str,
    colour: RGBColor,
    value: fn(&EpochMetrics) -> Option<f64>,
}

/// Train/validation accuracy (left) and loss (right) per epoch, plus the weight average's
/// validation figures when the run kept one.
pub fn accuracy_curves(metrics: &[EpochMetrics], path: &Path) -> Result<(), String> {
    if metrics.is_empty() {
        return Err("no finished epoch to plot".into());
    }
    register_font()?;
    let accuracy_curves = [
        Curve {
            label: "train",
            colour: BLUE,
            value: |m| Some(m.train_accuracy * 100.0),
        },
        Curve {
            label: "validation",
            colour: RED,
            value: |m| m.val_accuracy.map(|a| a * 100.0),
        },
        Curve {
            label: "validation, weight average",
            colour: DARK_GREEN,
            value: |m| m.ema_val_accuracy.map(|a| a * 100.0),
        },
    ];
    let loss_curves = [
        Curve {
            label: "train",
            colour: BLUE,
            value: |m| Some(m.train_loss),
        },
        Curve {
            label: "validation",
            colour: RED,
            value: |m| m.val_loss,
        },
        Curve {
            label: "validation, weight average",
            colour: DARK_GREEN,
            value: |m| m.ema_val_loss,
        },
    ];
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (left, right) = root.split_horizontally(WIDTH / 2);
        let epochs = metrics.len() as f64;
        for (area, caption, curves) in [
            (left, "accuracy (%)", &accuracy_curves),
            (right, "loss", &loss_curves),
        ] {
            let lines: Vec<(&Curve, Vec<(f64, f64)>)> = curves
                .iter()
                .map(|curve| {
                    let points = metrics
                        .iter()
                        .filter_map(|m| (curve.value)(m).map(|v| (m.epoch as f64, v)))
                        .collect();
                    (curve, points)
                })
                .filter(|(_, points): &(_, Vec<_>)| !points.is_empty())
                .collect();
            let (lo, hi) = lines
                .iter()
                .flat_map(|(_, points)| points.iter().map(|&(_, v)| v))
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(v), hi.max(v))
                });
            let pad = ((hi - lo) * 0.1).max(1e-3);
            let mut chart = ChartBuilder::on(&area)
                .caption(caption, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(48)
                .build_cartesian_2d(0.5..epochs + 0.5, (lo - pad)..(hi + pad))
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .draw()
                .map_err(|e| e.to_string())?;
            for (curve, points) in lines {
                let colour = curve.colour;
                chart
                    .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(curve.label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                    });
                chart
                    .draw_series(
                        points
                            .into_iter()
                            .map(|p| Circle::new(p, 3, colour.filled())),
                    )
                    .map_err(|e| e.to_string())?;
            }
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    save_rgb(path, rgb, WIDTH, HEIGHT)
}

/// A confusion matrix as a heat map with counts; rows are true classes, columns predictions.
pub fn confusion_matrix(
    confusion: &[Vec<usize>],
    classes: &[String],
    path: &Path,
) -> Result<(), String> {
    let n = classes.len();
    if n == 0 || confusion.len() != n {
        return Err("confusion matrix and class list disagree".into());
    }
    register_font()?;
    let cell = (720 / n as u32).clamp(12, 72);
    let label_space = 150;
    let side = cell * n as u32;
    let (width, height) = (side + label_space + 20, side + label_space + 40);
    let mut rgb = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let title = ("sans-serif", 18).into_font();
        root.draw(&Text::new(
            "true class (rows) vs predicted (columns)",
            (10, 8),
            title,
        ))
        .map_err(|e| e.to_string())?;
        let origin = (label_space as i32, 40 + label_space as i32 - 110);
        let font_size = (cell as f64 * 0.35).clamp(8.0, 14.0);
        for (t, row) in confusion.iter().enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f64;
            for (p, &count) in row.iter().enumerate() {
                let share = count as f64 / total;
                let x = origin.0 + (p as u32 * cell) as i32;
                let y = origin.1 + (t as u32 * cell) as i32;
                let shade = (255.0 * (1.0 - share)) as u8;
                let fill = if t == p {
                    RGBColor(shade, shade, 255)
                } else {
                    RGBColor(255, shade, shade)
                };
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell as i32, y + cell as i32)],
                    fill.filled(),
                ))
                .map_err(|e| e.to_string())?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell as i32, y + cell as i32)],
                    BLACK.mix(0.2),
                ))
                .map_err(|e| e.to_string())?;
                if cell >= 24 {
                    let text_colour = if share > 0.6 { WHITE } else { BLACK };
                    let style = ("sans-serif", font_size).into_font().color(&text_colour);
                    root.draw(&Text::new(
                        count.to_string(),
                        (x + 3, y + cell as i32 / 3),
                        style,
                    ))
                    .map_err(|e| e.to_string())?;
                }
            }
            let style = ("sans-serif", font_size).into_font();
            let name: String = classes[t].chars().take(18).collect();
            root.draw(&Text::new(
                name,
                (6, origin.1 + (t as u32 * cell + cell / 3) as i32),
                style,
            ))
            .map_err(|e| e.to_string())?;
        }
        for (p, class) in classes.iter().enumerate() {
            let style = ("sans-serif", font_size)
                .into_font()
                .transform(FontTransform::Rotate90);
            let name: String = class.chars().take(18).collect();
            let x = origin.0 + (p as u32 * cell + cell / 2) as i32;
            root.draw(&Text::new(name, (x, origin.1 + side as i32 + 4), style))
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    save_rgb(path, rgb, width, height)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The title is drawn with the bundled font: no fontconfig, no system font.
    #[test]
    fn text_is_drawn_without_system_fonts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confusion.png");
        let classes = ["shirt".to_string(), "café".to_string()];
        confusion_matrix(&[vec![3, 1], vec![0, 4]], &classes, &path).unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        let title_ink = (10..300)
            .flat_map(|x| (8..26).map(move |y| (x, y)))
            .filter(|&(x, y)| image.get_pixel(x, y).0.iter().all(|&c| c < 128))
            .count();
        assert!(title_ink > 200, "{title_ink} dark pixels in the title");
    }
}
