//! Bad records: typed reasons, the `quarantine.jsonl` sink, counters and the budget.
//!
//! A bad record never stops a run by itself (RELIABILITY.md): every stage that can reject a
//! sample returns a [`Reason`]; the loader wraps it in a [`BadRecord`] with the record's
//! [`Origin`], appends it to `quarantine.jsonl` and counts it. Only when the configured budget
//! is exceeded does the run stop, with exit code 64.

use crate::sample::Origin;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Why a record was rejected. `code()` is the stable snake_case key used in
/// `quarantine.jsonl`, metrics and `omr data validate`; the fields carry the human detail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    // --- images ---
    #[error("image bytes could not be decoded ({0}); re-encode the image as JPEG or PNG")]
    ImageUndecodable(String),
    #[error("image data is truncated ({0}); the file was cut short, re-export it")]
    ImageTruncated(String),
    #[error("image is empty (0 bytes); the record has no image data")]
    ImageEmpty,
    #[error("image too large: {width}x{height} exceeds the {limit}-pixel decode limit (decompression-bomb guard); raise data.max_image_pixels if it is genuine")]
    ImageTooLarge { width: u64, height: u64, limit: u64 },
    #[error("image has unusable dimensions {width}x{height} ({why})")]
    ImageBadDimensions {
        width: u64,
        height: u64,
        why: String,
    },
    #[error("record has no image although it needs one")]
    ImageMissing,
    #[error("image file not found: {0}")]
    ImageNotFound(String),
    #[error("path {0:?} escapes the dataset root; use a relative path inside the dataset folder")]
    PathEscapesRoot(String),
    #[error("DICOM could not be read ({0})")]
    DicomUnreadable(String),
    // --- fields and structure ---
    #[error("required field `{0}` is missing or null")]
    MissingField(String),
    #[error("field `{0}` is empty")]
    EmptyField(String),
    #[error("field `{field}` has the wrong type: expected {expected}")]
    WrongType { field: String, expected: String },
    #[error("line is not valid JSON ({0})")]
    MalformedJson(String),
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    #[error("conversation is malformed ({0})")]
    BadConversation(String),
    #[error("{placeholders} image placeholders but {images} images")]
    ImageCountMismatch { placeholders: usize, images: usize },
    #[error(
        "tar member {0} has no partner (an image without its .json or a .json without an image)"
    )]
    OrphanMember(String),
    // --- multiple choice ---
    #[error("question has no lettered options (expected lines like `A. …` or `B) …`)")]
    QuestionWithoutOptions,
    #[error("option letter {0} appears more than once")]
    DuplicateOption(String),
    #[error("answer {answer:?} is not one of the options {options:?}")]
    AnswerNotAnOption {
        answer: String,
        options: Vec<String>,
    },
    #[error("the reference trace answers {trace:?} but the answer column says {answer:?}")]
    TraceAnswerMismatch { trace: String, answer: String },
    #[error("reference trace is not `<think>…</think><answer>…</answer>` ({0})")]
    MalformedTrace(String),
    // --- tokens ---
    #[error("{image_tokens} image tokens alone exceed max_length {max_length}; lower max_pixels or raise max_length")]
    TooManyImageTokens {
        image_tokens: usize,
        max_length: usize,
    },
    #[error("sample is {tokens} tokens, over max_length {max_length}, and truncation is off (or it is a prompt, which is never cut); raise max_length or set truncation = \"right\"")]
    TooLong { tokens: usize, max_length: usize },
    #[error("sample is {tokens} tokens, over max_length {max_length}, and truncating it would cut image tokens")]
    TruncationCutsImage { tokens: usize, max_length: usize },
    #[error("no supervised tokens left (no assistant turn, or truncation removed all of it)")]
    NoSupervisedTokens,
    #[error("chat template failed on this record ({0})")]
    TemplateError(String),
    #[error("tokenizer failed on this record ({0})")]
    TokenizerError(String),
}

impl Reason {
    /// Stable key for counters and `quarantine.jsonl`.
    pub fn code(&self) -> &'static str {
        use Reason::*;
        match self {
            ImageUndecodable(_) => "image_undecodable",
            ImageTruncated(_) => "image_truncated",
            ImageEmpty => "image_empty",
            ImageTooLarge { .. } => "image_too_large",
            ImageBadDimensions { .. } => "image_bad_dimensions",
            ImageMissing => "image_missing",
            ImageNotFound(_) => "image_not_found",
            PathEscapesRoot(_) => "path_escapes_root",
            DicomUnreadable(_) => "dicom_unreadable",
            MissingField(_) => "missing_field",
            EmptyField(_) => "empty_field",
            WrongType { .. } => "wrong_type",
            MalformedJson(_) => "malformed_json",
            InvalidUtf8 => "invalid_utf8",
            BadConversation(_) => "bad_conversation",
            ImageCountMismatch { .. } => "image_count_mismatch",
            OrphanMember(_) => "orphan_member",
            QuestionWithoutOptions => "question_without_options",
            DuplicateOption(_) => "duplicate_option",
            AnswerNotAnOption { .. } => "answer_not_an_option",
            TraceAnswerMismatch { .. } => "trace_answer_mismatch",
            MalformedTrace(_) => "malformed_trace",
            TooManyImageTokens { .. } => "too_many_image_tokens",
            TooLong { .. } => "too_long",
            TruncationCutsImage { .. } => "truncation_cuts_image",
            NoSupervisedTokens => "no_supervised_tokens",
            TemplateError(_) => "template_error",
            TokenizerError(_) => "tokenizer_error",
        }
    }
}

/// A rejected record: where it is and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRecord {
    pub origin: Origin,
    pub reason: Reason,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.origin, self.reason)
    }
}

/// One line of `quarantine.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    pub source: String,
    pub shard: String,
    pub row: u64,
    pub reason: String,
    pub detail: String,
}

impl From<&BadRecord> for QuarantineEntry {
    fn from(b: &BadRecord) -> Self {
        QuarantineEntry {
            source: b.origin.source.clone(),
            shard: b.origin.shard.clone(),
            row: b.origin.row,
            reason: b.reason.code().to_string(),
            detail: b.reason.to_string(),
        }
    }
}

/// How many bad records a run tolerates before it stops (exit 64). Both limits apply; a
/// fraction is checked only once `min_seen` records were seen so that one early bad record
/// does not read as 100 %.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineBudget {
    pub max_bad: Option<u64>,
    pub max_bad_fraction: Option<f64>,
    pub min_seen: u64,
}

impl Default for QuarantineBudget {
    fn default() -> Self {
        QuarantineBudget {
            max_bad: None,
            max_bad_fraction: Some(0.01),
            min_seen: 1000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("bad-data budget exceeded: {bad} bad of {seen} records (budget: {budget}); see {path} for every rejected record")]
    OverBudget {
        bad: u64,
        seen: u64,
        budget: String,
        path: String,
    },
    #[error("cannot write quarantine file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Counts good and bad records, writes bad ones to `quarantine.jsonl`, enforces the budget.
pub struct Quarantine {
    budget: QuarantineBudget,
    path: Option<PathBuf>,
    sink: Option<BufWriter<File>>,
    pub seen: u64,
    pub bad: u64,
    pub by_reason: BTreeMap<String, u64>,
}

impl Quarantine {
    /// `path = None` keeps counts only (benchmarks, tests).
    pub fn new(path: Option<&Path>, budget: QuarantineBudget) -> Result<Self, QuarantineError> {
        let sink = match path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| QuarantineError::Io {
                        path: p.display().to_string(),
                        source,
                    })?;
                }
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| QuarantineError::Io {
                        path: p.display().to_string(),
                        source,
                    })?;
                Some(BufWriter::new(f))
            }
            None => None,
        };
        Ok(Quarantine {
            budget,
            path: path.map(Path::to_path_buf),
            sink,
            seen: 0,
            bad: 0,
            by_reason: BTreeMap::new(),
        })
    }

    pub fn record_good(&mut self) {
        self.seen += 1;
    }

    /// Records a bad record; errors only on I/O failure or when the budget is exceeded.
    pub fn record_bad(&mut self, bad: &BadRecord) -> Result<(), QuarantineError> {
        self.seen += 1;
        self.bad += 1;
        *self
            .by_reason
            .entry(bad.reason.code().to_string())
            .or_default() += 1;
        tracing::warn!(target: "omr::quarantine", "quarantined {bad}");
        if let Some(sink) = self.sink.as_mut() {
            let line =
                serde_json::to_string(&QuarantineEntry::from(bad)).expect("entry serializes");
            let path = self
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            writeln!(sink, "{line}")
                .and_then(|_| sink.flush())
                .map_err(|source| QuarantineError::Io { path, source })?;
        }
        self.check()
    }

    pub fn over_budget(&self) -> bool {
        if let Some(max) = self.budget.max_bad {
            if self.bad > max {
                return true;
            }
        }
        if let Some(frac) = self.budget.max_bad_fraction {
            if self.seen >= self.budget.min_seen.max(1)
                && (self.bad as f64) > frac * self.seen as f64
            {
                return true;
            }
        }
        false
    }

    /// Final check at the end of a pass, when `seen` may be below `min_seen`.
    pub fn check_final(&self) -> Result<(), QuarantineError> {
        let frac_over = self
            .budget
            .max_bad_fraction
            .is_some_and(|f| self.seen > 0 && (self.bad as f64) > f * self.seen as f64);
        if self.over_budget() || frac_over {
            return Err(self.over_budget_error());
        }
        Ok(())
    }

    fn check(&self) -> Result<(), QuarantineError> {
        if self.over_budget() {
            return Err(self.over_budget_error());
        }
        Ok(())
    }

    fn over_budget_error(&self) -> QuarantineError {
        let mut b = Vec::new();
        if let Some(m) = self.budget.max_bad {
            b.push(format!("max_bad={m}"));
        }
        if let Some(f) = self.budget.max_bad_fraction {
            b.push(format!("max_bad_fraction={f}"));
        }
        QuarantineError::OverBudget {
            bad: self.bad,
            seen: self.seen,
            budget: b.join(", "),
            path: self
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(no quarantine file)".into()),
        }
    }

    pub fn flush(&mut self) {
        if let Some(s) = self.sink.as_mut() {
            let _ = s.flush();
        }
    }
}
