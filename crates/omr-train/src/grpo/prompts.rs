//! GRPO's prompt stream: training records → generation prompts with the answer their
//! completions are scored on.
//!
//! Notable choices:
//! - A record without a reference answer is bad data (quarantined), not an error: the rewards
//!   cannot score its completions.
//! - The caller's cursor becomes the loader state after the last record read, so the resume
//!   state names exactly the prompts a committed step consumed.

use crate::error::{Result, TrainError};
use crate::rollout::PromptItem;
use omr_data::loader::{Item, LoaderState, Stream};
use omr_data::pipeline::Processor;
use omr_data::quarantine::{Quarantine, QuarantineError, Reason};

/// A training record → its generation prompt and the answer its completions are scored on.
pub(super) fn prompt_item(
    p: &Processor,
    s: &omr_data::Sample,
) -> std::result::Result<PromptItem, Reason> {
    let item = s.mcq.clone().ok_or_else(|| {
        Reason::MissingField("answer (GRPO rewards need a reference answer)".into())
    })?;
    Ok(PromptItem {
        prompt: p.encode_prompt(s)?,
        item,
        id: format!("{}#{}", s.origin.shard, s.origin.row),
        meta: s.meta.clone(),
    })
}

/// The next `n` good prompts; bad records go to the quarantine. `cursor` becomes the loader
/// state after the last record read.
pub(super) fn next_prompts(
    stream: &mut Stream<PromptItem>,
    n: usize,
    q: &mut Quarantine,
    cursor: &mut LoaderState,
) -> Result<Vec<PromptItem>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let Some(item) = stream.next() else {
            break;
        };
        let Item {
            result,
            state_after,
        } = item.map_err(|e| TrainError::Usage(e.to_string()))?;
        *cursor = state_after;
        match result {
            Ok(p) => {
                q.record_good();
                out.push(p);
            }
            Err(bad) => q.record_bad(&bad).map_err(|e| match e {
                e @ QuarantineError::OverBudget { .. } => TrainError::BadData(e),
                other => TrainError::Usage(other.to_string()),
            })?,
        }
    }
    if out.is_empty() {
        return Err(TrainError::Usage(
            "the training data has no usable prompt (see quarantine.jsonl)".into(),
        ));
    }
    Ok(out)
}
