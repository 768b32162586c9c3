//! The loader: a deterministic, resumable, rank-striped stream of processed samples.
//!
//! Reading is sequential on one producer thread (block by block, one shuffle window of blocks
//! in memory per source); decoding, image processing and tokenization run on a worker pool in
//! chunks whose output order is the input order, so the stream is the same whatever the thread
//! count. Every item carries the loader state *after* it: a trainer checkpoints the state of
//! the last item it consumed and `Loader::restore` continues with exactly the next sample.

use crate::mixture::{epoch_order, next_source, per_rank_len, RowRef, SourceCursor};
use crate::quarantine::{BadRecord, Reason};
use crate::sample::{Origin, Sample};
use crate::source::{Source, SourceError};
use crossbeam_channel::{bounded, Receiver};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    pub seed: u64,
    pub shuffle: bool,
    /// Blocks shuffled together; memory holds one window of blocks per source.
    pub window_blocks: usize,
    /// Samples processed per parallel chunk.
    pub chunk_size: usize,
    /// Processed chunks buffered ahead of the consumer.
    pub prefetch_chunks: usize,
    /// Worker threads for decode + preprocessing (0 = all cores).
    pub threads: usize,
    /// Stop before any source starts this epoch (None = endless).
    pub max_epochs: Option<u64>,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            seed: 0,
            shuffle: true,
            window_blocks: 8,
            chunk_size: 32,
            prefetch_chunks: 4,
            threads: 0,
            max_epochs: None,
        }
    }
}

/// Rank and world of this process, resolved once from the environment (torchrun or SLURM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rank {
    pub rank: usize,
    pub world: usize,
}

impl Rank {
    pub const SINGLE: Rank = Rank { rank: 0, world: 1 };

    /// The launchers' (rank, world) variables, in the order they are read: torchrun's, then
    /// SLURM's.
    pub const VARS: [(&'static str, &'static str); 2] =
        [("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")];

    /// `RANK`/`WORLD_SIZE` (torchrun) first, then `SLURM_PROCID`/`SLURM_NTASKS`.
    pub fn from_env() -> Rank {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// The first pair of [`Rank::VARS`] that holds a valid rank; a single process if none.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Rank {
        let pair = |(r, w): (&str, &str)| -> Option<Rank> {
            let rank = get(r)?.parse().ok()?;
            let world: usize = get(w)?.parse().ok()?;
            (world > 0 && rank < world).then_some(Rank { rank, world })
        };
        Self::VARS
            .into_iter()
            .find_map(pair)
            .unwrap_or(Rank::SINGLE)
    }
}

/// Everything that decides which sample comes next. Serialize it into checkpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub seed: u64,
    pub rank: usize,
    pub world: usize,
    pub sources: Vec<SourceCursor>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("no source has any sample for rank {rank} of {world}")]
    Empty { rank: usize, world: usize },
}

/// One element of the stream: a processed sample or the record it was rejected for.
pub struct Item<T> {
    pub result: Result<T, BadRecord>,
    pub state_after: LoaderState,
}

pub struct Loader {
    sources: Vec<Arc<dyn Source>>,
    weights: Vec<f64>,
    cfg: LoaderConfig,
    state: LoaderState,
}

impl Loader {
    /// `sources`: opened sources with their mixture weights.
    pub fn new(
        sources: Vec<(Box<dyn Source>, f64)>,
        cfg: LoaderConfig,
        rank: Rank,
    ) -> Result<Loader, LoaderError> {
        let mut srcs: Vec<Arc<dyn Source>> = Vec::new();
        let mut weights = Vec::new();
        let mut cursors = Vec::new();
        for (s, w) in sources {
            cursors.push(SourceCursor {
                name: s.name().to_string(),
                len: s.len(),
                epoch: 0,
                pos: 0,
                emitted: 0,
            });
            srcs.push(Arc::from(s));
            weights.push(w);
        }
        if next_source(&cursors, &weights, rank.world).is_none() {
            return Err(LoaderError::Empty {
                rank: rank.rank,
                world: rank.world,
            });
        }
        let state = LoaderState {
            seed: cfg.seed,
            rank: rank.rank,
            world: rank.world,
            sources: cursors,
        };
        Ok(Loader {
            sources: srcs,
            weights,
            cfg,
            state,
        })
    }

    pub fn state(&self) -> &LoaderState {
        &self.state
    }

    /// Continues from a checkpointed state. Refuses if the data or the striping changed.
    pub fn restore(&mut self, saved: LoaderState) -> Result<(), LoaderError> {
        let cur = &self.state;
        if saved.seed != cur.seed || saved.world != cur.world || saved.rank != cur.rank {
            return Err(LoaderError::Resume(format!(
                "checkpoint has seed {} rank {}/{}, this run has seed {} rank {}/{}",
                saved.seed, saved.rank, saved.world, cur.seed, cur.rank, cur.world
            )));
        }
        if saved.sources.len() != cur.sources.len() {
            return Err(LoaderError::Resume(format!(
                "checkpoint has {} data sources, this run has {}",
                saved.sources.len(),
                cur.sources.len()
            )));
        }
        for (s, c) in saved.sources.iter().zip(&cur.sources) {
            if s.name != c.name || s.len != c.len {
                return Err(LoaderError::Resume(format!(
                    "source {:?} had {} samples in the checkpoint, now {:?} has {}: the data changed",
                    s.name, s.len, c.name, c.len
                )));
            }
        }
        self.state = saved;
        Ok(())
    }

    /// The unprocessed stream, in order, on the calling thread.
    pub fn raw(&self) -> RawStream {
        RawStream {
            sources: self.sources.clone(),
            weights: self.weights.clone(),
            cfg: self.cfg.clone(),
            state: self.state.clone(),
            orders: vec![None; self.sources.len()],
            cache: (0..self.sources.len()).map(|_| VecDeque::new()).collect(),
        }
    }

    /// The processed stream: `f` runs on a worker pool, results come back in stream order.
    pub fn stream<T, F>(&self, f: F) -> Stream<T>
    where
        T: Send + 'static,
        F: Fn(&Sample) -> Result<T, Reason> + Send + Sync + 'static,
    {
        let mut raw = self.raw();
        let chunk = self.cfg.chunk_size.max(1);
        let (tx, rx) =
            bounded::<Result<Vec<Item<T>>, LoaderError>>(self.cfg.prefetch_chunks.max(1));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.cfg.threads)
            .thread_name(|i| format!("omr-data-{i}"))
            .build();
        std::thread::Builder::new()
            .name("omr-data-reader".into())
            .spawn(move || {
                let pool = match pool {
                    Ok(p) => p,
                    Err(_) => return,
                };
                loop {
                    let mut raw_chunk = Vec::with_capacity(chunk);
                    let mut failed = None;
                    while raw_chunk.len() < chunk {
                        match raw.next() {
                            None => break,
                            Some(Ok(x)) => raw_chunk.push(x),
                            Some(Err(e)) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    let done = raw_chunk.len() < chunk;
                    if !raw_chunk.is_empty() {
                        let items: Vec<Item<T>> = pool.install(|| {
                            raw_chunk
                                .into_par_iter()
                                .map(|(r, state_after)| {
                                    let result = r.and_then(|s| {
                                        f(&s).map_err(|reason| BadRecord {
                                            origin: s.origin.clone(),
                                            reason,
                                        })
                                    });
                                    Item {
                                        result,
                                        state_after,
                                    }
                                })
                                .collect()
                        });
                        if tx.send(Ok(items)).is_err() {
                            return;
                        }
                    }
                    if let Some(e) = failed {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    if done {
                        return;
                    }
                }
            })
            .expect("spawning the reader thread");
        Stream {
            rx,
            buf: VecDeque::new(),
        }
    }
}

pub struct Stream<T> {
    rx: Receiver<Result<Vec<Item<T>>, LoaderError>>,
    buf: VecDeque<Item<T>>,
}

impl<T> Iterator for Stream<T> {
    type Item = Result<Item<T>, LoaderError>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(i) = self.buf.pop_front() {
                return Some(Ok(i));
            }
            match self.rx.recv() {
                Ok(Ok(items)) => self.buf.extend(items),
                Ok(Err(e)) => return Some(Err(e)),
                Err(_) => return None,
            }
        }
    }
}

type RawItem = (Result<Sample, BadRecord>, LoaderState);

/// Sequential reader behind [`Loader::stream`]; also usable directly (tests, tools).
pub struct RawStream {
    sources: Vec<Arc<dyn Source>>,
    weights: Vec<f64>,
    cfg: LoaderConfig,
    state: LoaderState,
    /// Per source: (epoch, order) of the epoch currently being read.
    orders: Vec<Option<(u64, Arc<Vec<RowRef>>)>>,
    /// Per source: loaded blocks, most recent last; holds at most one window.
    cache: Vec<VecDeque<(u32, Vec<Option<Result<Sample, (Origin, Reason)>>>)>>,
}

impl RawStream {
    pub fn state(&self) -> &LoaderState {
        &self.state
    }

    fn take(&mut self, si: usize, at: RowRef) -> Result<Result<Sample, BadRecord>, LoaderError> {
        let cache = &mut self.cache[si];
        let slot = match cache.iter().position(|(b, _)| *b == at.block) {
            Some(p) => p,
            None => {
                let rows = self.sources[si].read_block(at.block as usize)?;
                if cache.len() >= self.cfg.window_blocks.max(1) {
                    cache.pop_front();
                }
                cache.push_back((at.block, rows.into_iter().map(Some).collect()));
                cache.len() - 1
            }
        };
        let src = &self.sources[si];
        let entry = cache[slot]
            .1
            .get_mut(at.row as usize)
            .and_then(Option::take);
        Ok(match entry {
            Some(Ok(s)) => Ok(s),
            Some(Err((origin, reason))) => Err(BadRecord { origin, reason }),
            // A row asked twice in one window cannot happen with a valid order; read it again.
            None => {
                let mut rows = src.read_block(at.block as usize)?;
                if (at.row as usize) >= rows.len() {
                    return Err(LoaderError::Source(SourceError::Schema {
                        path: src.shards().get(src.blocks()[at.block as usize].shard).cloned().unwrap_or_default(),
                        detail: format!(
                            "block {} now has {} rows, {} when the source was opened: the file changed during the run",
                            at.block,
                            rows.len(),
                            src.blocks()[at.block as usize].rows
                        ),
                    }));
                }
                let r = rows.swap_remove(at.row as usize);
                r.map_err(|(origin, reason)| BadRecord { origin, reason })
            }
        })
    }
}

impl Iterator for RawStream {
    type Item = Result<RawItem, LoaderError>;
    fn next(&mut self) -> Option<Self::Item> {
        let world = self.state.world;
        let si = next_source(&self.state.sources, &self.weights, world)?;
        let per_rank = per_rank_len(self.state.sources[si].len, world);
        {
            let c = &mut self.state.sources[si];
            if c.pos >= per_rank {
                c.epoch += 1;
                c.pos = 0;
            }
            if self.cfg.max_epochs.is_some_and(|m| c.epoch >= m) {
                return None;
            }
        }
        let (epoch, pos) = (self.state.sources[si].epoch, self.state.sources[si].pos);
        let order = match &self.orders[si] {
            Some((e, o)) if *e == epoch => o.clone(),
            _ => {
                let o = Arc::new(epoch_order(
                    self.sources[si].blocks(),
                    self.state.seed,
                    epoch,
                    si,
                    self.cfg.shuffle,
                    self.cfg.window_blocks,
                ));
                self.cache[si].clear();
                self.orders[si] = Some((epoch, o.clone()));
                o
            }
        };
        let at = order[(pos * world as u64 + self.state.rank as u64) as usize];
        let r = match self.take(si, at) {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        let c = &mut self.state.sources[si];
        c.pos += 1;
        c.emitted += 1;
        Some(Ok((r, self.state.clone())))
    }
}
