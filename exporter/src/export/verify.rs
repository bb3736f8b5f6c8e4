//! Before an export is written: tract runs the graph on real validation images at batch 1 and
//! 3, and its outputs must match burn's.

use super::{ExportError, values};
use crate::data::{ImageSet, PreparedSet, Splits};
use crate::model::TrainedModel;
use crate::training::TrainingConfig;
use burn::prelude::*;
use runtime::tract_onnx::prelude::Tensor as TractTensor;
use runtime::tract_onnx::prelude::{DatumExt, IntoRunnable};
use runtime::tract_onnx::prelude::{Framework, InferenceModelExt, TractError, tvec};
use std::path::Path;

/// Up to 4 preprocessed validation images (training images for a run without validation) of the
/// run's data (or of `data`).
pub(super) fn verification_images(
    config: &TrainingConfig,
    data: Option<&Path>,
) -> Result<PreparedSet, ExportError> {
    let root = data.unwrap_or(&config.data);
    let no_images = |why: String| ExportError::NoImages(why);
    let splits = Splits::from_folder(root, config.val_fraction, config.seed)
        .map_err(|e| no_images(format!("{}: {e}", root.display())))?;
    let items = match splits.val.is_empty() {
        true => &splits.train,
        false => &splits.val,
    };
    let set = ImageSet::load(&items[..items.len().min(4)], &|_| {});
    if set.is_empty() {
        return Err(no_images(format!(
            "{} has no readable images",
            root.display()
        )));
    }
    PreparedSet::new(&set, &config.preprocess).map_err(|e| no_images(e.to_string()))
}

/// Max |tract − burn| over the outputs (logits, then attention maps) of the first `batch`
/// images.
pub(super) fn verify(
    bytes: &[u8],
    model: &TrainedModel,
    images: &PreparedSet,
    batch: usize,
    device: &Device,
    with_attention: bool,
) -> Result<f32, ExportError> {
    let p = &images.config;
    let (c, s) = (p.channels as usize, p.image_size as usize);
    let pixels: Vec<f32> = (0..batch).flat_map(|i| images.image(i).to_vec()).collect();
    let tract = |e: TractError| ExportError::Tract(format!("{e:#}"));
    let runnable = runtime::tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .map_err(tract)?
        .with_input_fact(0, f32::fact([batch, c, s, s]).into())
        .map_err(tract)?
        .into_optimized()
        .map_err(tract)?
        .into_runnable()
        .map_err(tract)?;
    let input = TractTensor::from_shape(&[batch, c, s, s], &pixels).map_err(tract)?;
    let outputs = runnable.run(tvec!(input.into())).map_err(tract)?;
    let input = Tensor::<4>::from_data(TensorData::new(pixels, [batch, c, s, s]), device);
    let reference: Vec<Vec<f32>> = match model {
        TrainedModel::Vit(vit) if with_attention => {
            let (logits, maps) = vit.forward_with_attention(input);
            std::iter::once(values(logits))
                .chain(maps.into_iter().map(values))
                .collect()
        }
        _ => vec![values(model.forward(input))],
    };
    if outputs.len() != reference.len() {
        return Err(ExportError::Tract(format!(
            "the graph has {} outputs, burn's model {}",
            outputs.len(),
            reference.len()
        )));
    }
    let mut max_diff = 0.0f32;
    for (ours, reference) in outputs.iter().zip(&reference) {
        let ours = ours.to_plain_array_view::<f32>().map_err(tract)?;
        if ours.len() != reference.len() {
            return Err(ExportError::Tract(format!(
                "an output has {} values, burn's {}",
                ours.len(),
                reference.len()
            )));
        }
        max_diff = ours
            .iter()
            .zip(reference)
            .map(|(a, b)| (a - b).abs())
            .fold(max_diff, f32::max);
    }
    Ok(max_diff)
}
