//! A judge answers the rubric's questions about a trace: for one rubric unit, its presence
//! question (p ∈ {0, 1, 2}) and its correctness question (c ∈ {−1, 0, +1}); and, for two
//! traces of the same item, which one reasons better.
//!
//! Two judges: [`http::HttpJudge`] asks an OpenAI-compatible chat endpoint (a vLLM server, an
//! API), with timeouts, retries and an on-disk cache so a rerun costs nothing;
//! [`rules::RuleJudge`] is offline and lexical, for tests and the demo, and weaker (see its
//! module doc). [`judge_trace`] is the one place that turns a judge's answers into the PKR
//! score of a trace: correctness is asked only where p ≥ 1, as the bench defines it.
//!
//! Judges are `Sync`: the evaluation asks about many items at once (`run.rs`).

pub mod cache;
pub mod config;
pub mod http;
pub mod prompt;
pub mod rules;

use crate::pkr::{self, Axis, Correctness, Presence, TraceScore, UnitVerdict};
use omr_data::sample::{Rubric, RubricUnit};
use serde::{Deserialize, Serialize};

/// The trace being judged and what it answers.
#[derive(Clone, Copy, Debug)]
pub struct TraceRef<'a> {
    /// The item's name (`source:shard#row`), used in errors.
    pub item: &'a str,
    pub question: &'a str,
    /// The model's reply: `<think>…</think><answer>…</answer>` when it follows the format.
    pub trace: &'a str,
}

/// Two models' traces for the same item.
#[derive(Clone, Copy, Debug)]
pub struct PairRef<'a> {
    pub item: &'a str,
    pub question: &'a str,
    /// The reference trace, shown to the judge as a guide when the data has one.
    pub reference: Option<&'a str>,
    pub a: &'a str,
    pub b: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preference {
    A,
    B,
    Tie,
}

#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("judge config: {0}")]
    Config(String),
    #[error("judge {url}: HTTP {status}{hint}: {body}")]
    Http {
        url: String,
        status: u16,
        hint: String,
        body: String,
    },
    #[error("judge {url}: {detail} (after {attempts} attempts)")]
    Transport {
        url: String,
        detail: String,
        attempts: u32,
    },
    #[error("judge {url}: the response is not an OpenAI chat completion ({detail})")]
    BadResponse { url: String, detail: String },
    #[error("item {item}, unit {unit}: cannot read the judge's {question} answer from its reply {reply:?} (expected {expected})")]
    Unparsable {
        item: String,
        unit: String,
        question: &'static str,
        expected: &'static str,
        reply: String,
    },
    #[error("judge cache {path}: {source}")]
    Cache {
        path: String,
        source: std::io::Error,
    },
}

/// Requests sent and answers read from the cache, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: usize,
    pub cache_hits: usize,
}

pub trait Judge: Sync {
    /// What judged, for the report (`rules`, `http:MODEL@URL`).
    fn describe(&self) -> String;
    /// Requests so far (an offline judge sends none).
    fn stats(&self) -> Stats {
        Stats::default()
    }
    fn presence(&self, t: &TraceRef, axis: Axis, unit: &RubricUnit)
        -> Result<Presence, JudgeError>;
    fn correctness(
        &self,
        t: &TraceRef,
        axis: Axis,
        unit: &RubricUnit,
    ) -> Result<Correctness, JudgeError>;
    /// Which trace is better; `None` when this judge does not compare traces itself (the
    /// caller then compares their PKR scores).
    fn prefer(&self, pair: &PairRef) -> Result<Option<Preference>, JudgeError>;
}

/// Every unit of a rubric judged on one trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgedTrace {
    pub score: TraceScore,
    pub perception: Vec<UnitVerdict>,
    pub knowledge: Vec<UnitVerdict>,
    pub rationale: Vec<UnitVerdict>,
}

/// Asks `judge` every presence question of `rubric` about `t`, and the correctness question
/// of the units with p ≥ 1, and scores the trace.
pub fn judge_trace(
    judge: &dyn Judge,
    t: &TraceRef,
    rubric: &Rubric,
) -> Result<JudgedTrace, JudgeError> {
    let axis = |a: Axis| -> Result<Vec<UnitVerdict>, JudgeError> {
        a.units(rubric)
            .iter()
            .map(|u| {
                let presence = judge.presence(t, a, u)?;
                let correctness = match presence {
                    Presence::Absent => None,
                    _ => Some(judge.correctness(t, a, u)?),
                };
                Ok(UnitVerdict {
                    unit_id: u.unit_id.clone(),
                    presence,
                    correctness,
                })
            })
            .collect()
    };
    let (perception, knowledge, rationale) = (
        axis(Axis::Perception)?,
        axis(Axis::Knowledge)?,
        axis(Axis::Rationale)?,
    );
    let score = TraceScore::new(
        pkr::axis_score(&perception),
        pkr::axis_score(&knowledge),
        pkr::axis_score(&rationale),
    );
    Ok(JudgedTrace {
        score,
        perception,
        knowledge,
        rationale,
    })
}
