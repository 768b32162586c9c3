//! The record every reader produces and every later stage consumes.
//!
//! One `Sample` is one training/eval example in a format-neutral shape: a conversation whose
//! image parts refer, in order, to `images`. OpenMedReason's multiple-choice fields (question,
//! options, answer letter, reference trace, rubric) are kept alongside because rewards and the
//! bench need them; LLaVA / `messages` data leaves them empty.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a record came from: enough to find it again by hand and to key quarantine entries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// Source name from the run config (or the dataset path/id when unnamed).
    pub source: String,
    /// File within the source (parquet shard, JSONL file, tar shard), relative to its root.
    pub shard: String,
    /// 0-based row (parquet row, JSONL line, tar sample key index) within `shard`.
    pub row: u64,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}#{}", self.source, self.shard, self.row)
    }
}

/// Encoded image bytes as stored (JPEG/PNG/DICOM/...), not yet decoded. Decoding happens on
/// worker threads so readers stay cheap and streaming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBytes {
    pub bytes: Vec<u8>,
    /// Original path or file name if the format carries one (HF Image `path`, JSONL path).
    pub path: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One part of a message. Image parts refer to the next unused entry of `Sample::images`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Content {
    Image,
    Text { text: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Content>,
}

impl Message {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: vec![Content::Text { text: text.into() }],
        }
    }
    pub fn image_count(&self) -> usize {
        self.content
            .iter()
            .filter(|c| matches!(c, Content::Image))
            .count()
    }
}

/// A multiple-choice item: `options` are `(letter, text)` in the order they appear.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mcq {
    pub question: String,
    pub options: Vec<(String, String)>,
    /// The correct option letter (or the free-text answer for open VQA data, where `options`
    /// is empty).
    pub answer: String,
}

/// Rubric unit fields, in OpenMedReason's column order (the struct fields below).
pub const UNIT_FIELDS: [&str; 7] = [
    "unit_id",
    "topic",
    "claim",
    "source_quote",
    "importance",
    "presence_question",
    "correctness_question",
];

/// One OpenMedReason rubric unit (test split only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RubricUnit {
    pub unit_id: String,
    pub topic: String,
    pub claim: String,
    pub source_quote: String,
    /// `core` or `supporting`.
    pub importance: String,
    pub presence_question: String,
    pub correctness_question: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rubric {
    pub perception: Vec<RubricUnit>,
    pub knowledge: Vec<RubricUnit>,
    pub rationale: Vec<RubricUnit>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub origin: Origin,
    pub images: Vec<ImageBytes>,
    /// The conversation, assistant turns included (they are the SFT targets).
    pub messages: Vec<Message>,
    pub mcq: Option<Mcq>,
    /// Reference trace `<think>…</think><answer>X</answer>` when the format has one.
    pub reasoning: Option<String>,
    pub rubric: Option<Rubric>,
    /// Free-form tags (task family, modality, …) used for per-group metrics.
    pub meta: BTreeMap<String, String>,
}

/// A sample after image processing and tokenization: what the collator consumes.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub origin: Origin,
    /// (T,)
    pub input_ids: Vec<u32>,
    /// (T,) -100 where no loss is taken (everything outside assistant turns).
    pub labels: Vec<i64>,
    /// (N, C·T·P·P) row-major, all images of the sample concatenated in order.
    pub pixel_values: Vec<f32>,
    /// Width of one `pixel_values` row (C·temporal_patch·patch·patch, 1176 for Qwen2-VL).
    pub patch_dim: usize,
    /// One `[t, h, w]` per image, in patches.
    pub image_grid_thw: Vec<[u32; 3]>,
    /// Source image sizes before resizing, `(height, width)`, for the validate histograms.
    pub image_sizes: Vec<(u32, u32)>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    pub fn num_patches(&self) -> usize {
        if self.patch_dim == 0 {
            0
        } else {
            self.pixel_values.len() / self.patch_dim
        }
    }
    pub fn supervised_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != -100).count()
    }
}
