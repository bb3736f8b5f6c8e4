//! `runtime explain`: attention heat maps over the frame, as PNG.

use super::{Loaded, ModelArgs};
use anyhow::{Context, Result};
use runtime::explain::{Explainer, Method, Token};
use serde_json::json;
use std::path::Path;

pub(super) fn run(
    image_path: &Path,
    args: &ModelArgs,
    method: Method,
    token: Token,
    out: &Path,
    grid: Option<&Path>,
    json: bool,
) -> Result<()> {
    let image = runtime::decode_file(image_path)
        .with_context(|| format!("reading {}", image_path.display()))?;
    let Loaded { model, source, .. } = args.load_with(true)?;
    let mut explainer = Explainer::new(model)?;
    let explanation = explainer.explain(&image.frame())?;
    let best = explanation.top(1)[0];
    let label = &explainer.model().labels[best.class];
    let caption = format!("{label} {:.0}%", best.probability * 100.0);
    let resize = explainer.model().preprocess.resize;
    let region = runtime::Region::for_mode(resize, image.width, image.height);
    let map = explanation.map_for(method, token)?;
    let overlay = runtime::overlay::render(&image, region, &map, Some(&caption));
    write_png(out, &overlay)?;
    if let Some(grid) = grid {
        let pictures: Vec<_> = explanation
            .layer_maps_for(token)?
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                let caption = format!("block {i}");
                runtime::overlay::render(&image, region, layer, Some(&caption))
            })
            .collect();
        write_png(grid, &runtime::overlay::tile(&pictures))?;
    }
    if json {
        println!(
            "{}",
            json!({
                "image": image_path, "model": source, "method": method.name(), "token": token.name(),
                "top": {"label": label, "class": best.class, "probability": best.probability},
                "overlay": out, "grid": grid, "layers": explanation.layers.len(),
                "map": {"side": map.side, "values": map.values},
            })
        );
    } else {
        println!(
            "{}: {caption} · {method} over {} blocks → {}{}",
            image_path.display(),
            explanation.layers.len(),
            out.display(),
            grid.map_or(String::new(), |g| format!(", per block → {}", g.display()))
        );
    }
    Ok(())
}

fn write_png(path: &Path, picture: &image::RgbImage) -> Result<()> {
    runtime::write_atomic_with(path, |file| {
        picture
            .write_to(file, image::ImageFormat::Png)
            .map_err(std::io::Error::other)
    })
    .with_context(|| format!("writing {}", path.display()))
}
