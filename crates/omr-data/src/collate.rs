//! Collation: encoded samples → a padded or packed `Batch` with what packing needs downstream.
//!
//! Padding: rows are samples, right-padded to the longest row (rounded up to `pad_to_multiple`).
//! Packing: samples are laid end to end in rows of `max_length` tokens in arrival order (first
//! fit into the current row, a new row when it does not fit), and every row records its
//! sample boundaries (`seq_lens`) so that attention can be isolated per sample and M-RoPE
//! positions restarted. Arrival order is preserved either way, which keeps resumption exact:
//! a sample that did not fit is carried, never reordered (see [`Batcher`] in the pipeline).

use crate::sample::{Encoded, Origin};
use serde::{Deserialize, Serialize};

pub const IGNORE_INDEX: i64 = -100;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollateMode {
    #[default]
    Pad,
    Pack,
}

/// A training batch. Token tensors are row-major `(B, T)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// B
    pub rows: usize,
    /// T
    pub seq_len: usize,
    /// (B, T)
    pub input_ids: Vec<u32>,
    /// (B, T) 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// (B, T) IGNORE_INDEX outside assistant turns and on padding.
    pub labels: Vec<i64>,
    /// Per row, the lengths of the samples laid in it, in order (one entry when padding).
    pub seq_lens: Vec<Vec<usize>>,
    /// (N, patch_dim) for all images of the batch, in row order then sample order.
    pub pixel_values: Vec<f32>,
    pub patch_dim: usize,
    /// One per image, same order as `pixel_values`.
    pub image_grid_thw: Vec<[u32; 3]>,
    /// Per row, the samples it holds.
    pub origins: Vec<Vec<Origin>>,
}

impl Batch {
    pub fn samples(&self) -> usize {
        self.seq_lens.iter().map(Vec::len).sum()
    }
    pub fn tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m == 1).count()
    }
    pub fn supervised_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Groups samples into rows for packing: returns rows of sample indices, in order. A sample
/// longer than `max_length` gets a row of its own (the encoder already guarantees it fits).
pub fn pack_rows(lens: &[usize], max_length: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = usize::MAX;
    for (i, &l) in lens.iter().enumerate() {
        if used.saturating_add(l) > max_length {
            rows.push(vec![i]);
            used = l;
        } else {
            rows.last_mut()
                .expect("a row exists once used is finite")
                .push(i);
            used += l;
        }
    }
    rows
}

/// Builds a batch from `rows` of samples (each inner Vec one row). `pad_id` fills padding.
pub fn collate(rows: &[Vec<&Encoded>], pad_id: u32, pad_to_multiple: usize) -> Batch {
    let longest = rows
        .iter()
        .map(|r| r.iter().map(|e| e.len()).sum::<usize>())
        .max()
        .unwrap_or(0);
    let m = pad_to_multiple.max(1);
    let t = longest.div_ceil(m) * m;
    let b = rows.len();
    let mut batch = Batch {
        rows: b,
        seq_len: t,
        input_ids: vec![pad_id; b * t],
        attention_mask: vec![0; b * t],
        labels: vec![IGNORE_INDEX; b * t],
        seq_lens: Vec::with_capacity(b),
        pixel_values: Vec::new(),
        patch_dim: 0,
        image_grid_thw: Vec::new(),
        origins: Vec::with_capacity(b),
    };
    for (ri, row) in rows.iter().enumerate() {
        let mut at = ri * t;
        let mut lens = Vec::with_capacity(row.len());
        let mut origins = Vec::with_capacity(row.len());
        for e in row {
            let n = e.len();
            batch.input_ids[at..at + n].copy_from_slice(&e.input_ids);
            batch.labels[at..at + n].copy_from_slice(&e.labels);
            batch.attention_mask[at..at + n].fill(1);
            at += n;
            lens.push(n);
            origins.push(e.origin.clone());
            if !e.image_grid_thw.is_empty() {
                batch.patch_dim = e.patch_dim;
            }
            batch.pixel_values.extend_from_slice(&e.pixel_values);
            batch.image_grid_thw.extend_from_slice(&e.image_grid_thw);
        }
        batch.seq_lens.push(lens);
        batch.origins.push(origins);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(row: u64, n: usize, images: usize) -> Encoded {
        Encoded {
            origin: Origin {
                source: "s".into(),
                shard: "f".into(),
                row,
            },
            input_ids: (0..n as u32).map(|i| i + 10 * row as u32).collect(),
            labels: (0..n)
                .map(|i| if i + 1 == n { 7 } else { IGNORE_INDEX })
                .collect(),
            pixel_values: vec![row as f32; images * 4 * 6],
            patch_dim: 6,
            image_grid_thw: vec![[1, 2, 2]; images],
            image_sizes: vec![(28, 28); images],
        }
    }

    #[test]
    fn pack_rows_is_first_fit_in_order() {
        assert_eq!(
            pack_rows(&[3, 4, 2, 5, 1], 8),
            vec![vec![0, 1], vec![2, 3, 4]]
        );
        assert_eq!(pack_rows(&[9, 1], 8), vec![vec![0], vec![1]]);
        assert!(pack_rows(&[], 8).is_empty());
    }

    #[test]
    fn padded_and_packed_layouts() {
        let (a, b, c) = (enc(1, 3, 1), enc(2, 5, 0), enc(3, 2, 2));
        let pad = collate(&[vec![&a], vec![&b], vec![&c]], 0, 4);
        assert_eq!((pad.rows, pad.seq_len), (3, 8));
        assert_eq!(&pad.input_ids[0..4], &[10, 11, 12, 0]);
        assert_eq!(&pad.attention_mask[0..4], &[1, 1, 1, 0]);
        assert_eq!(pad.labels[2], 7);
        assert_eq!(pad.labels[3], IGNORE_INDEX);
        assert_eq!(pad.image_grid_thw.len(), 3);
        assert_eq!(pad.pixel_values.len(), 3 * 24);
        assert_eq!(pad.tokens(), 10);

        let packed = collate(&[vec![&a, &b], vec![&c]], 0, 1);
        assert_eq!((packed.rows, packed.seq_len), (2, 8));
        assert_eq!(packed.seq_lens, vec![vec![3, 5], vec![2]]);
        assert_eq!(&packed.input_ids[0..8], &[10, 11, 12, 20, 21, 22, 23, 24]);
        assert_eq!(packed.supervised_tokens(), 3);
        assert_eq!(packed.samples(), 3);
    }
}
