//! `omr_data::Batch` → `omr_model::Input` + labels: the one seam between the data crate and the
//! model crate on the training path.
//!
//! Padded and packed batches go through the same call: a padded row is a packed row holding one
//! sample, so `Input::packed` with the batch's `seq_lens` gives per-sample attention isolation
//! and per-sample M-RoPE restarts in both cases. Images stay in the batch's order (row, then
//! sample), which is the order the model scatters their features into the image-pad tokens.

use candle_core::{Device, Tensor};
use omr_data::collate::Batch;
use omr_model::model::Input;

/// Model input and `(B, T)` labels of a batch.
pub fn to_input(batch: &Batch, device: &Device) -> omr_model::Result<(Input, Vec<Vec<i64>>)> {
    let t = batch.seq_len;
    let ids: Vec<Vec<u32>> = batch.input_ids.chunks(t).map(<[u32]>::to_vec).collect();
    let labels: Vec<Vec<i64>> = batch.labels.chunks(t).map(<[i64]>::to_vec).collect();
    let grids: Vec<[usize; 3]> = batch
        .image_grid_thw
        .iter()
        .map(|g| g.map(|x| x as usize))
        .collect();
    let pixel_values = if grids.is_empty() {
        None
    } else {
        let n = batch.pixel_values.len() / batch.patch_dim;
        // (N, C·T·P·P)
        Some(Tensor::from_slice(
            &batch.pixel_values,
            (n, batch.patch_dim),
            device,
        )?)
    };
    let input = Input::packed(ids, &batch.seq_lens, pixel_values, grids)?;
    Ok((input, labels))
}
