//! Loader order, resume and striping, on an in-memory source (no files, no decoding).

use omr_data::loader::{Loader, LoaderConfig, Rank};
use omr_data::quarantine::Reason;
use omr_data::sample::{Origin, Sample};
use omr_data::source::{BlockInfo, Source, SourceError};
use std::collections::{BTreeMap, HashSet};

struct Fake {
    name: String,
    shards: Vec<String>,
    blocks: Vec<BlockInfo>,
    /// Rows whose record is bad.
    bad_every: u64,
}

impl Fake {
    fn new(name: &str, block_sizes: &[usize], bad_every: u64) -> Self {
        let mut first = 0;
        let blocks = block_sizes
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
            .collect();
        Fake {
            name: name.into(),
            shards: vec!["f.parquet".into()],
            blocks,
            bad_every,
        }
    }
}

impl Source for Fake {
    fn name(&self) -> &str {
        &self.name
    }
    fn shards(&self) -> &[String] {
        &self.shards
    }
    fn blocks(&self) -> &[BlockInfo] {
        &self.blocks
    }
    fn read_block(&self, i: usize) -> Result<Vec<Result<Sample, (Origin, Reason)>>, SourceError> {
        let b = &self.blocks[i];
        Ok((0..b.rows as u64)
            .map(|r| {
                let origin = Origin {
                    source: self.name.clone(),
                    shard: self.shards[0].clone(),
                    row: b.first_row + r,
                };
                if self.bad_every > 0 && origin.row.is_multiple_of(self.bad_every) {
                    return Err((origin, Reason::ImageEmpty));
                }
                Ok(Sample {
                    origin,
                    images: vec![],
                    messages: vec![],
                    mcq: None,
                    reasoning: None,
                    rubric: None,
                    meta: BTreeMap::new(),
                })
            })
            .collect())
    }
}

fn key(r: &Result<Origin, String>) -> String {
    match r {
        Ok(o) => o.to_string(),
        Err(e) => e.clone(),
    }
}

fn loader(cfg: &LoaderConfig, rank: Rank, sources: &[(&str, &[usize], f64)]) -> Loader {
    let srcs = sources
        .iter()
        .map(|(n, b, w)| (Box::new(Fake::new(n, b, 5)) as Box<dyn Source>, *w))
        .collect();
    Loader::new(srcs, cfg.clone(), rank).unwrap()
}

fn take(l: &Loader, n: usize) -> Vec<(String, omr_data::loader::LoaderState)> {
    l.stream(|s: &Sample| Ok(s.origin.clone()))
        .take(n)
        .map(|i| {
            let i = i.unwrap();
            (
                key(&i.result.map_err(|b| format!("bad {}", b.origin))),
                i.state_after,
            )
        })
        .collect()
}

#[test]
fn same_seed_same_order_whatever_the_threads() {
    let mut cfg = LoaderConfig {
        seed: 3,
        window_blocks: 2,
        chunk_size: 5,
        ..Default::default()
    };
    let srcs: &[(&str, &[usize], f64)] = &[("a", &[7, 3, 9, 4], 1.0)];
    cfg.threads = 1;
    let one = take(&loader(&cfg, Rank::SINGLE, srcs), 60);
    cfg.threads = 2;
    cfg.chunk_size = 7;
    let two = take(&loader(&cfg, Rank::SINGLE, srcs), 60);
    assert_eq!(one, two);
    // An epoch is a permutation of the 23 rows; epoch 2 is a different permutation.
    let e0: HashSet<_> = one[..23].iter().map(|x| x.0.clone()).collect();
    assert_eq!(e0.len(), 23);
    assert_ne!(
        one[..23].iter().map(|x| &x.0).collect::<Vec<_>>(),
        one[23..46].iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    cfg.seed = 4;
    let other = take(&loader(&cfg, Rank::SINGLE, srcs), 23);
    assert_ne!(
        one[..23].iter().map(|x| &x.0).collect::<Vec<_>>(),
        other.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
}

#[test]
fn resume_continues_exactly_mid_epoch_and_at_boundary() {
    let cfg = LoaderConfig {
        seed: 11,
        window_blocks: 2,
        chunk_size: 4,
        ..Default::default()
    };
    let srcs: &[(&str, &[usize], f64)] = &[("a", &[7, 3, 9, 4], 2.0), ("b", &[5, 5], 1.0)];
    let full = take(&loader(&cfg, Rank::SINGLE, srcs), 90);
    for k in [1usize, 13, 22, 23, 24, 45, 46, 70] {
        let mut l = loader(&cfg, Rank::SINGLE, srcs);
        l.restore(full[k - 1].1.clone()).unwrap();
        let rest = take(&l, 90 - k);
        assert_eq!(&rest[..], &full[k..], "resume after {k} samples");
    }
}

#[test]
fn ranks_partition_each_epoch() {
    let cfg = LoaderConfig {
        seed: 1,
        window_blocks: 3,
        ..Default::default()
    };
    let srcs: &[(&str, &[usize], f64)] = &[("a", &[8, 8, 8, 7], 1.0)];
    let mut seen = HashSet::new();
    for r in 0..3 {
        let got = take(&loader(&cfg, Rank { rank: r, world: 3 }, srcs), 10);
        for (k, _) in got {
            assert!(seen.insert(k), "a sample went to two ranks");
        }
    }
    assert_eq!(seen.len(), 30, "floor(31/3) = 10 samples per rank");
}

#[test]
fn mixture_follows_weights_and_bad_records_pass_through() {
    let cfg = LoaderConfig {
        seed: 2,
        max_epochs: None,
        ..Default::default()
    };
    let srcs: &[(&str, &[usize], f64)] = &[("a", &[50, 50], 3.0), ("b", &[20], 1.0)];
    let got = take(&loader(&cfg, Rank::SINGLE, srcs), 400);
    let from_b = got
        .iter()
        .filter(|(k, _)| k.contains("b:f.parquet"))
        .count();
    assert_eq!(from_b, 100);
    let bad = got.iter().filter(|(k, _)| k.starts_with("bad")).count();
    assert_eq!(
        bad, 80,
        "every 5th row of each source is bad and still comes through as an item"
    );
}

#[test]
fn max_epochs_ends_the_stream_and_resume_rejects_changed_data() {
    let cfg = LoaderConfig {
        seed: 2,
        max_epochs: Some(2),
        ..Default::default()
    };
    let l = loader(&cfg, Rank::SINGLE, &[("a", &[4, 3], 1.0)]);
    assert_eq!(take(&l, 100).len(), 14);
    let state = l.state().clone();
    let mut other = loader(&cfg, Rank::SINGLE, &[("a", &[4, 4], 1.0)]);
    assert!(other
        .restore(state)
        .unwrap_err()
        .to_string()
        .contains("data changed"));
}

#[test]
fn rank_from_env_prefers_torchrun_then_slurm() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(a, _)| *a == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(
        Rank::from_lookup(env(&[("RANK", "1"), ("WORLD_SIZE", "4")])),
        Rank { rank: 1, world: 4 }
    );
    assert_eq!(
        Rank::from_lookup(env(&[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "3")])),
        Rank { rank: 2, world: 3 }
    );
    assert_eq!(
        Rank::from_lookup(env(&[("RANK", "5"), ("WORLD_SIZE", "4")])),
        Rank::SINGLE
    );
    assert_eq!(Rank::from_lookup(env(&[])), Rank::SINGLE);
}

fn fake_encode(s: &Sample) -> Result<omr_data::Encoded, Reason> {
    let n = 3 + (s.origin.row % 7) as usize;
    Ok(omr_data::Encoded {
        origin: s.origin.clone(),
        input_ids: vec![s.origin.row as u32; n],
        labels: vec![1; n],
        pixel_values: vec![],
        patch_dim: 0,
        image_grid_thw: vec![],
        image_sizes: vec![],
    })
}

#[test]
fn batches_resume_exactly_with_packing_carry_over() {
    use omr_data::batcher::{BatchConfig, Batcher};
    use omr_data::collate::CollateMode;
    use omr_data::quarantine::{Quarantine, QuarantineBudget};
    let cfg = LoaderConfig {
        seed: 5,
        window_blocks: 2,
        chunk_size: 3,
        ..Default::default()
    };
    let bcfg = BatchConfig {
        batch_size: 2,
        mode: CollateMode::Pack,
        max_length: 16,
        pad_to_multiple: 1,
    };
    let budget = QuarantineBudget {
        max_bad: None,
        max_bad_fraction: None,
        min_seen: 0,
    };
    let srcs: &[(&str, &[usize], f64)] = &[("a", &[7, 3, 9, 4], 1.0)];
    let run = |state: Option<omr_data::loader::LoaderState>, n: usize| {
        let mut l = loader(&cfg, Rank::SINGLE, srcs);
        if let Some(s) = state {
            l.restore(s).unwrap();
        }
        let mut q = Quarantine::new(None, budget.clone()).unwrap();
        let mut b = Batcher::new(l.stream(fake_encode), l.state().clone(), bcfg.clone(), 0);
        let mut samples = 0;
        (0..n)
            .map(|_| {
                let (batch, state) = b.next_batch(&mut q).unwrap().unwrap();
                // A sample carried over to the next batch is read again after a resume from
                // `state`: it counts as seen only once it is in a batch (bad records count
                // when read, and none is read past a carried sample).
                samples += batch.samples() as u64;
                assert_eq!(q.seen, samples + q.bad, "records seen");
                (batch, state)
            })
            .collect::<Vec<_>>()
    };
    let full = run(None, 12);
    assert!(full.iter().all(|(b, _)| b.seq_len <= 16 && b.rows <= 2));
    assert!(
        full.iter()
            .any(|(b, _)| b.seq_lens.iter().any(|r| r.len() > 1)),
        "something was packed"
    );
    for k in [1, 4, 7] {
        let rest = run(Some(full[k - 1].1.clone()), 12 - k);
        for (i, (b, s)) in rest.iter().enumerate() {
            assert_eq!(b, &full[k + i].0, "batch {} after resuming at {k}", k + i);
            assert_eq!(s, &full[k + i].1);
        }
    }
}
