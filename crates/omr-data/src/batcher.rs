//! Batcher: turns the loader's item stream into batches, quarantining bad records on the way.
//!
//! The resume state of a batch is the loader state after the last sample the batch holds, or,
//! when packing carried a sample over to the next batch, the state *before* that carried
//! sample: restoring it reads the carried sample again, so no packing buffer needs saving.

use crate::collate::{collate, Batch, CollateMode};
use crate::loader::{Item, LoaderError, LoaderState, Stream};
use crate::quarantine::{Quarantine, QuarantineError};
use crate::sample::Encoded;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Rows per batch (samples when padding, packed rows when packing).
    pub batch_size: usize,
    pub mode: CollateMode,
    /// Row length when packing.
    pub max_length: usize,
    pub pad_to_multiple: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            batch_size: 8,
            mode: CollateMode::Pad,
            max_length: 2048,
            pad_to_multiple: 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Quarantine(#[from] QuarantineError),
}

pub struct Batcher {
    stream: Stream<Encoded>,
    cfg: BatchConfig,
    pad_id: u32,
    /// Carried sample and the loader state before it.
    pending: Option<(Encoded, LoaderState)>,
    last_state: LoaderState,
}

impl Batcher {
    /// `start`: the loader state the stream starts from (for a batch made only of a carry).
    pub fn new(stream: Stream<Encoded>, start: LoaderState, cfg: BatchConfig, pad_id: u32) -> Self {
        Batcher {
            stream,
            cfg,
            pad_id,
            pending: None,
            last_state: start,
        }
    }

    /// Next good sample and the state before it; bad ones go to the quarantine.
    fn next_good(
        &mut self,
        q: &mut Quarantine,
    ) -> Result<Option<(Encoded, LoaderState)>, BatchError> {
        if let Some(p) = self.pending.take() {
            return Ok(Some(p));
        }
        for item in self.stream.by_ref() {
            let Item {
                result,
                state_after,
            } = item?;
            let before = std::mem::replace(&mut self.last_state, state_after);
            match result {
                // Counted as seen when it joins a batch (`next_batch`): a sample carried over
                // to the next batch is read again after a resume and must count once.
                Ok(e) => return Ok(Some((e, before))),
                Err(bad) => q.record_bad(&bad)?,
            }
        }
        Ok(None)
    }

    /// The next batch and its resume state; None when the stream ended and nothing is left.
    /// A final partial batch is returned.
    pub fn next_batch(
        &mut self,
        q: &mut Quarantine,
    ) -> Result<Option<(Batch, LoaderState)>, BatchError> {
        let bs = self.cfg.batch_size.max(1);
        let mut rows: Vec<Vec<Encoded>> = Vec::new();
        let mut used = 0usize;
        let mut resume = self.last_state.clone();
        while let Some((e, before)) = self.next_good(q)? {
            let fits_row = !rows.is_empty()
                && self.cfg.mode == CollateMode::Pack
                && used + e.len() <= self.cfg.max_length;
            if fits_row {
                q.record_good();
                used += e.len();
                rows.last_mut().expect("non-empty").push(e);
            } else if rows.len() < bs {
                q.record_good();
                used = e.len();
                rows.push(vec![e]);
            } else {
                self.pending = Some((e, before.clone()));
                resume = before;
                break;
            }
            resume = self.last_state.clone();
            if self.cfg.mode == CollateMode::Pad && rows.len() == bs {
                break;
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let refs: Vec<Vec<&Encoded>> = rows.iter().map(|r| r.iter().collect()).collect();
        Ok(Some((
            collate(&refs, self.pad_id, self.cfg.pad_to_multiple),
            resume,
        )))
    }
}
