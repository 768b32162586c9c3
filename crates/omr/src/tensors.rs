//! Small writers for the data tools' outputs: safetensors for `pixel_values` (so anyone can
//! load them in torch and compare with transformers) and PNG for decoded images.

use omr_data::image::{Processed, RgbImage};
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

/// Writes `pixel_values` (f32, (N, patch_dim)) and `image_grid_thw` (i64, (1, 3)), the names
/// and dtypes transformers' processor returns.
pub fn write_processed(path: &Path, p: &Processed) -> anyhow::Result<()> {
    let n = p.pixel_values.len() / p.patch_dim.max(1);
    let pv: Vec<u8> = p
        .pixel_values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let grid: Vec<u8> = p
        .grid_thw
        .iter()
        .flat_map(|&v| (v as i64).to_le_bytes())
        .collect();
    let tensors = [
        (
            "pixel_values",
            TensorView::new(Dtype::F32, vec![n, p.patch_dim], &pv)?,
        ),
        (
            "image_grid_thw",
            TensorView::new(Dtype::I64, vec![1, 3], &grid)?,
        ),
    ];
    safetensors::serialize_to_file(tensors, None, path)?;
    Ok(())
}

pub fn write_png(img: &RgbImage, path: &Path) -> anyhow::Result<()> {
    img.save_with_format(path, image::ImageFormat::Png)?;
    Ok(())
}
