//! Per-source epoch order and the weighted mixture of several sources.
//!
//! Order within one source, for one epoch: shuffle the blocks (parquet row groups, JSONL line
//! runs, tar sample runs) with a seed derived from `(seed, epoch, source)`, cut that block list
//! into windows of `window_blocks`, and shuffle the rows inside each window. A reader then needs
//! only one window of blocks in memory, and the whole order is a pure function of the seed, so
//! a cursor `(epoch, position)` is enough to resume exactly. Rank `r` of `world` takes
//! positions `r, r + world, …` and every rank gets `floor(len / world)` samples per epoch, so
//! ranks stay in step and no sample is seen twice in an epoch.
//!
//! Mixing uses stride scheduling instead of random draws: the next sample comes from the source
//! with the smallest `(emitted + 1) / weight`. Proportions are exact at every prefix, and the
//! only state is the per-source count already in the cursor.

use crate::source::BlockInfo;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Where a sample lives: block index within its source and row within that block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowRef {
    pub block: u32,
    pub row: u32,
}

/// Derives an independent stream seed (SplitMix64 finaliser over the inputs).
pub fn derive_seed(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

/// The full order of one source for one epoch (all ranks), length = source length.
/// `shuffle = false` keeps file order (evaluation, validation).
pub fn epoch_order(
    blocks: &[BlockInfo],
    seed: u64,
    epoch: u64,
    source_index: usize,
    shuffle: bool,
    window_blocks: usize,
) -> Vec<RowRef> {
    let mut block_ids: Vec<u32> = (0..blocks.len() as u32).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(&[seed, epoch, source_index as u64]));
    if shuffle {
        block_ids.shuffle(&mut rng);
    }
    let total: usize = blocks.iter().map(|b| b.rows).sum();
    let mut order = Vec::with_capacity(total);
    for window in block_ids.chunks(window_blocks.max(1)) {
        let start = order.len();
        for &b in window {
            for r in 0..blocks[b as usize].rows as u32 {
                order.push(RowRef { block: b, row: r });
            }
        }
        if shuffle {
            order[start..].shuffle(&mut rng);
        }
    }
    order
}

/// Samples one rank sees per epoch of a source of `len` samples.
pub fn per_rank_len(len: u64, world: usize) -> u64 {
    len / world.max(1) as u64
}

/// Resumable position in one source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCursor {
    pub name: String,
    /// Source length when the cursor was made; a different length on resume means the data
    /// changed underneath the run.
    pub len: u64,
    pub epoch: u64,
    /// Position within this rank's share of the epoch.
    pub pos: u64,
    /// Samples this rank has taken from the source over the whole run (drives the mixture).
    pub emitted: u64,
}

/// Picks the source of the next sample (stride scheduling). Sources with zero per-rank length
/// are never picked; returns None when every source is empty.
pub fn next_source(cursors: &[SourceCursor], weights: &[f64], world: usize) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, (c, &w)) in cursors.iter().zip(weights).enumerate() {
        if w <= 0.0 || per_rank_len(c.len, world) == 0 {
            continue;
        }
        let pass = (c.emitted as f64 + 1.0) / w;
        if best.is_none_or(|(_, p)| pass < p) {
            best = Some((i, pass));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(sizes: &[usize]) -> Vec<BlockInfo> {
        let mut first = 0;
        sizes
            .iter()
            .map(|&rows| {
                let b = BlockInfo {
                    shard: 0,
                    first_row: first,
                    rows,
                };
                first += rows as u64;
                b
            })
            .collect()
    }

    #[test]
    fn epoch_order_is_a_permutation_and_depends_on_epoch() {
        let b = blocks(&[5, 7, 3, 9]);
        let o0 = epoch_order(&b, 1, 0, 0, true, 2);
        let o1 = epoch_order(&b, 1, 1, 0, true, 2);
        let mut s0 = o0.clone();
        s0.sort_by_key(|r| (r.block, r.row));
        assert_eq!(s0.len(), 24);
        s0.dedup();
        assert_eq!(s0.len(), 24);
        assert_ne!(o0, o1);
        assert_eq!(o0, epoch_order(&b, 1, 0, 0, true, 2));
        // Without shuffle: file order.
        let plain = epoch_order(&b, 1, 0, 0, false, 2);
        assert_eq!(plain[0], RowRef { block: 0, row: 0 });
        assert_eq!(plain[5], RowRef { block: 1, row: 0 });
    }

    #[test]
    fn windows_keep_rows_of_few_blocks_together() {
        let b = blocks(&[4; 10]);
        let o = epoch_order(&b, 7, 0, 0, true, 2);
        for w in o.chunks(8) {
            let mut ids: Vec<u32> = w.iter().map(|r| r.block).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), 2, "a window of 2 blocks spans exactly 2 blocks");
        }
    }

    #[test]
    fn stride_scheduling_matches_weights_exactly() {
        let mut c = vec![
            SourceCursor {
                name: "a".into(),
                len: 100,
                epoch: 0,
                pos: 0,
                emitted: 0,
            },
            SourceCursor {
                name: "b".into(),
                len: 100,
                epoch: 0,
                pos: 0,
                emitted: 0,
            },
            SourceCursor {
                name: "c".into(),
                len: 0,
                epoch: 0,
                pos: 0,
                emitted: 0,
            },
        ];
        let w = [3.0, 1.0, 5.0];
        for _ in 0..400 {
            let i = next_source(&c, &w, 1).unwrap();
            c[i].emitted += 1;
        }
        assert_eq!((c[0].emitted, c[1].emitted, c[2].emitted), (300, 100, 0));
    }
}
