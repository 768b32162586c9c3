//! What an evaluation reports: `eval.json` (everything, for scripts and the model card), a
//! markdown table a person reads at a glance (`eval.md`, also printed), and one JSON line per
//! item with the reply, its grade and its judged rubric (`replies.jsonl`).
//!
//! Accuracy is reported overall and per group tag the data carries (`task_family`,
//! `modality`, `task`), with the format rate (a readable `<answer>` block) and chance (mean of
//! 1/options). The trace score is reported per axis as presence / correctness / score, then
//! the trace (mean of the axes), as `pkr.rs` defines them. Percentages in the table, fractions
//! in the JSON.

use crate::judge::{JudgedTrace, Preference};
use crate::pairwise::PairwiseReport;
use crate::pkr::{Axis, PkrSummary};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One evaluated item: a line of `replies.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemRecord {
    /// `source:shard#row`.
    pub item: String,
    pub groups: BTreeMap<String, String>,
    pub reference_answer: String,
    /// The answer as read from the reply (a letter for multiple choice).
    pub answer: Option<String>,
    pub correct: bool,
    /// Why no answer could be read (`no_answer`, `multiple`, `not_an_option`, …).
    pub problem: Option<String>,
    /// The reply has one well-formed `<answer>…</answer>` block.
    pub formatted: bool,
    /// `eos` or `length`.
    pub finish: String,
    pub new_tokens: usize,
    pub reply: String,
    /// The rubric judged on the reply; `None` when the item has no rubric.
    pub pkr: Option<JudgedTrace>,
    /// Against the `--compare` model's reply to the same item (A = this model).
    pub preference: Option<Preference>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub correct: usize,
    pub total: usize,
    pub value: f64,
}

impl Rate {
    pub fn new(correct: usize, total: usize) -> Rate {
        Rate {
            correct,
            total,
            value: correct as f64 / total.max(1) as f64,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccuracyReport {
    pub overall: Rate,
    pub format_rate: f64,
    /// Mean of 1/options over the multiple-choice items.
    pub chance: f64,
    /// Group key (`task_family`, `modality`, `task`) → group value → accuracy.
    pub by_group: BTreeMap<String, BTreeMap<String, Rate>>,
}

impl AccuracyReport {
    pub fn from_records(records: &[ItemRecord], chance: f64) -> AccuracyReport {
        let mut by_group: BTreeMap<String, BTreeMap<String, (usize, usize)>> = BTreeMap::new();
        for r in records {
            for (k, v) in &r.groups {
                let e = by_group
                    .entry(k.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default();
                e.0 += usize::from(r.correct);
                e.1 += 1;
            }
        }
        AccuracyReport {
            overall: Rate::new(records.iter().filter(|r| r.correct).count(), records.len()),
            format_rate: records.iter().filter(|r| r.formatted).count() as f64
                / records.len().max(1) as f64,
            chance,
            by_group: by_group
                .into_iter()
                .map(|(k, m)| {
                    (
                        k,
                        m.into_iter()
                            .map(|(v, (c, n))| (v, Rate::new(c, n)))
                            .collect(),
                    )
                })
                .collect(),
        }
    }
}

/// One model's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    /// The folder or Hub id as given.
    pub model: String,
    pub accuracy: AccuracyReport,
    /// `None` when no item has a rubric (e.g. a train split, or data without rubric columns).
    pub pkr: Option<PkrSummary>,
    /// Replies that hit `max_new_tokens` before an end token.
    pub truncated: usize,
    pub mean_new_tokens: f64,
    pub generate_seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The dataset (folder or Hub id) and split.
    pub data: String,
    pub split: String,
    pub items: usize,
    /// Records left out, each with its reason.
    pub skipped: Vec<String>,
    /// `greedy`, with the token budget.
    pub decoding: String,
    pub judge: String,
    /// HTTP requests the judge sent and answers it read from its cache (0 and 0 for rules).
    pub judge_requests: usize,
    pub judge_cache_hits: usize,
    pub model: ModelReport,
    pub compare: Option<ModelReport>,
    pub pairwise: Option<PairwiseReport>,
    pub seconds: f64,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

impl Report {
    /// The table: one column per model, one row per metric.
    pub fn to_markdown(&self) -> String {
        let models: Vec<&ModelReport> = std::iter::once(&self.model).chain(&self.compare).collect();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "## omr eval: {} ({} items, {})\n",
            self.data, self.items, self.decoding
        );
        let mut row = |label: &str, cells: Vec<String>| {
            let _ = writeln!(out, "| {label} | {} |", cells.join(" | "));
        };
        let names: Vec<String> = models.iter().map(|m| format!("`{}`", m.model)).collect();
        row("", names);
        row("---", models.iter().map(|_| "---:".to_string()).collect());
        row(
            "**answer accuracy**",
            models
                .iter()
                .map(|m| {
                    let o = m.accuracy.overall;
                    format!("**{}** ({}/{})", pct(o.value), o.correct, o.total)
                })
                .collect(),
        );
        row(
            "chance",
            models.iter().map(|m| pct(m.accuracy.chance)).collect(),
        );
        row(
            "`<answer>` well formed",
            models.iter().map(|m| pct(m.accuracy.format_rate)).collect(),
        );
        row(
            "hit the token limit",
            models.iter().map(|m| m.truncated.to_string()).collect(),
        );
        for (key, title) in [("task_family", "task family"), ("modality", "modality")] {
            let Some(groups) = self.model.accuracy.by_group.get(key) else {
                continue;
            };
            row(
                &format!("*by {title}*"),
                models.iter().map(|_| String::new()).collect(),
            );
            for (value, rate) in groups {
                row(
                    &format!("&nbsp;&nbsp;{value} ({})", rate.total),
                    models
                        .iter()
                        .map(|m| {
                            m.accuracy
                                .by_group
                                .get(key)
                                .and_then(|g| g.get(value))
                                .map_or(String::new(), |r| pct(r.value))
                        })
                        .collect(),
                );
            }
        }
        if models.iter().any(|m| m.pkr.is_some()) {
            row(
                &format!("*trace score (PKR), judge {}*", self.judge),
                models.iter().map(|_| String::new()).collect(),
            );
            for axis in Axis::ALL {
                row(
                    &format!(
                        "&nbsp;&nbsp;{}: presence / correctness / score",
                        axis.as_str()
                    ),
                    models
                        .iter()
                        .map(|m| {
                            m.pkr
                                .as_ref()
                                .and_then(|p| p.axis(axis))
                                .map_or("–".into(), |a| {
                                    format!(
                                        "{} / {} / **{}**",
                                        pct(a.presence),
                                        a.correctness.map_or("–".into(), pct),
                                        pct(a.score)
                                    )
                                })
                        })
                        .collect(),
                );
            }
            row(
                "**trace (mean of P, K, R)**",
                models
                    .iter()
                    .map(|m| {
                        m.pkr.as_ref().map_or("–".into(), |p| {
                            format!("**{}** ({} items)", pct(p.trace), p.items)
                        })
                    })
                    .collect(),
            );
        }
        if let Some(p) = &self.pairwise {
            let by = match p.method {
                crate::pairwise::Method::Judge => "judged",
                crate::pairwise::Method::Pkr => "by PKR score",
            };
            let _ = writeln!(
                out,
                "\nPairwise, `{}` vs `{}` ({by}, {} items): {} wins, {} ties, {} losses; preference rate **{}**.",
                p.a,
                p.b,
                p.compared,
                p.wins,
                p.ties,
                p.losses,
                pct(p.preference_rate)
            );
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(
                out,
                "\n{} records skipped (see eval.json).",
                self.skipped.len()
            );
        }
        if self.judge == "rules" && models.iter().any(|m| m.pkr.is_some()) {
            let _ = writeln!(
                out,
                "\nThe rules judge is lexical and weaker than an LLM judge: compare its trace scores only with each other."
            );
        }
        out
    }
}
