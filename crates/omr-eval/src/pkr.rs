//! The PKR trace score of OpenMedReason-Bench (OPENMEDREASON.md), exactly as defined there.
//!
//! For one trace and one axis a ∈ {perception, knowledge, rationale}, a judge answers each
//! rubric unit's presence question, p ∈ {0, 1, 2}, and, only where p ≥ 1, its correctness
//! question, c ∈ {−1, 0, +1}:
//!
//! - Presence_a = mean over the axis' units of p/2
//! - Correctness_a = |{p ≥ 1 and c = +1}| / |{p ≥ 1}|
//! - Score_a = Presence_a × Correctness_a
//! - Trace = the **mean** of the axis scores (the paper's numbers are the mean, not ½·Σ).
//!
//! Edge cases, decided here once:
//! - An axis with no rubric units is *undefined* for that item (`None`): it is left out of
//!   that axis' bench mean and of the item's trace mean, rather than counted as 0 or 1.
//! - An axis whose units all have p = 0 has no defined correctness (`None`, 0/0); its score
//!   is 0, which it would be anyway since Presence_a = 0. Bench-level correctness is the mean
//!   over the items where it is defined, so such items do not drag it to 0 twice.
//!
//! Bench level: each axis' presence and score are means over the items that have the axis;
//! the bench Trace is the mean of the three axis scores (over the axes any item has), which
//! reproduces the paper's (34.3 + 34.5 + 43.5)/3 = 37.4.

use omr_data::sample::{Rubric, RubricUnit};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    Perception,
    Knowledge,
    Rationale,
}

impl Axis {
    pub const ALL: [Axis; 3] = [Axis::Perception, Axis::Knowledge, Axis::Rationale];

    pub fn as_str(self) -> &'static str {
        match self {
            Axis::Perception => "perception",
            Axis::Knowledge => "knowledge",
            Axis::Rationale => "rationale",
        }
    }

    pub fn units(self, rubric: &Rubric) -> &[RubricUnit] {
        match self {
            Axis::Perception => &rubric.perception,
            Axis::Knowledge => &rubric.knowledge,
            Axis::Rationale => &rubric.rationale,
        }
    }
}

/// The judge's answer to a presence question: p ∈ {0, 1, 2}.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Presence {
    Absent = 0,
    Partial = 1,
    Full = 2,
}

impl Presence {
    pub fn value(self) -> u8 {
        self as u8
    }
}

impl From<Presence> for u8 {
    fn from(p: Presence) -> u8 {
        p.value()
    }
}

impl TryFrom<u8> for Presence {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            0 => Ok(Presence::Absent),
            1 => Ok(Presence::Partial),
            2 => Ok(Presence::Full),
            _ => Err(format!("presence must be 0, 1 or 2, not {v}")),
        }
    }
}

/// The judge's answer to a correctness question: c ∈ {−1, 0, +1}.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "i8", try_from = "i8")]
pub enum Correctness {
    Wrong = -1,
    Unclear = 0,
    Right = 1,
}

impl Correctness {
    pub fn value(self) -> i8 {
        self as i8
    }
}

impl From<Correctness> for i8 {
    fn from(c: Correctness) -> i8 {
        c.value()
    }
}

impl TryFrom<i8> for Correctness {
    type Error = String;
    fn try_from(v: i8) -> Result<Self, String> {
        match v {
            -1 => Ok(Correctness::Wrong),
            0 => Ok(Correctness::Unclear),
            1 => Ok(Correctness::Right),
            _ => Err(format!("correctness must be -1, 0 or +1, not {v}")),
        }
    }
}

/// One rubric unit judged on one trace. `correctness` is asked only where p ≥ 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnitVerdict {
    pub unit_id: String,
    pub presence: Presence,
    pub correctness: Option<Correctness>,
}

/// Score of one axis of one trace.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AxisScore {
    pub units: usize,
    pub presence: f64,
    /// `None` when no unit has p ≥ 1.
    pub correctness: Option<f64>,
    pub score: f64,
}

/// Presence_a, Correctness_a and Score_a of one axis; `None` for an axis without units.
pub fn axis_score(verdicts: &[UnitVerdict]) -> Option<AxisScore> {
    if verdicts.is_empty() {
        return None;
    }
    let n = verdicts.len() as f64;
    let presence = verdicts
        .iter()
        .map(|v| v.presence.value() as f64 / 2.0)
        .sum::<f64>()
        / n;
    let addressed = verdicts
        .iter()
        .filter(|v| v.presence != Presence::Absent)
        .count();
    let right = verdicts
        .iter()
        .filter(|v| v.presence != Presence::Absent && v.correctness == Some(Correctness::Right))
        .count();
    let correctness = (addressed > 0).then(|| right as f64 / addressed as f64);
    Some(AxisScore {
        units: verdicts.len(),
        presence,
        correctness,
        score: presence * correctness.unwrap_or(0.0),
    })
}

/// The three axes of one trace and their mean (over the axes the rubric has).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceScore {
    pub perception: Option<AxisScore>,
    pub knowledge: Option<AxisScore>,
    pub rationale: Option<AxisScore>,
    /// `None` when the rubric has no units at all.
    pub trace: Option<f64>,
}

impl TraceScore {
    pub fn new(
        perception: Option<AxisScore>,
        knowledge: Option<AxisScore>,
        rationale: Option<AxisScore>,
    ) -> Self {
        let scores: Vec<f64> = [perception, knowledge, rationale]
            .iter()
            .flatten()
            .map(|a| a.score)
            .collect();
        let trace = (!scores.is_empty()).then(|| mean(&scores));
        TraceScore {
            perception,
            knowledge,
            rationale,
            trace,
        }
    }

    pub fn axis(&self, a: Axis) -> Option<&AxisScore> {
        match a {
            Axis::Perception => self.perception.as_ref(),
            Axis::Knowledge => self.knowledge.as_ref(),
            Axis::Rationale => self.rationale.as_ref(),
        }
    }
}

/// One axis over the bench.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AxisSummary {
    /// Items whose rubric has this axis.
    pub items: usize,
    pub presence: f64,
    /// Mean over the `correctness_items` items with at least one unit present.
    pub correctness: Option<f64>,
    pub correctness_items: usize,
    pub score: f64,
}

/// The bench's PKR: per-axis means over items and the trace score (mean of the axis scores).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PkrSummary {
    /// Items with a rubric.
    pub items: usize,
    pub perception: Option<AxisSummary>,
    pub knowledge: Option<AxisSummary>,
    pub rationale: Option<AxisSummary>,
    pub trace: f64,
}

impl PkrSummary {
    pub fn axis(&self, a: Axis) -> Option<&AxisSummary> {
        match a {
            Axis::Perception => self.perception.as_ref(),
            Axis::Knowledge => self.knowledge.as_ref(),
            Axis::Rationale => self.rationale.as_ref(),
        }
    }
}

/// Bench-level PKR of per-item trace scores; `None` when no item has any rubric unit.
pub fn summarize(items: &[TraceScore]) -> Option<PkrSummary> {
    let axis = |a: Axis| -> Option<AxisSummary> {
        let scored: Vec<&AxisScore> = items.iter().filter_map(|t| t.axis(a)).collect();
        if scored.is_empty() {
            return None;
        }
        let corr: Vec<f64> = scored.iter().filter_map(|s| s.correctness).collect();
        Some(AxisSummary {
            items: scored.len(),
            presence: mean(&scored.iter().map(|s| s.presence).collect::<Vec<_>>()),
            correctness: (!corr.is_empty()).then(|| mean(&corr)),
            correctness_items: corr.len(),
            score: mean(&scored.iter().map(|s| s.score).collect::<Vec<_>>()),
        })
    };
    let (p, k, r) = (
        axis(Axis::Perception),
        axis(Axis::Knowledge),
        axis(Axis::Rationale),
    );
    let scores: Vec<f64> = [p, k, r].iter().flatten().map(|a| a.score).collect();
    if scores.is_empty() {
        return None;
    }
    Some(PkrSummary {
        items: items.iter().filter(|t| t.trace.is_some()).count(),
        perception: p,
        knowledge: k,
        rationale: r,
        trace: mean(&scores),
    })
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(p: u8, c: Option<i8>) -> UnitVerdict {
        UnitVerdict {
            unit_id: "u".into(),
            presence: Presence::try_from(p).unwrap(),
            correctness: c.map(|c| Correctness::try_from(c).unwrap()),
        }
    }

    #[test]
    fn axis_by_hand() {
        // p = 2, 1, 0, 2 → presence (1 + .5 + 0 + 1)/4 = 0.625; p ≥ 1 on three units, of
        // which c = +1 on two (the p = 0 unit's +1 does not count) → 2/3; score 0.41666…
        let s = axis_score(&[v(2, Some(1)), v(1, Some(-1)), v(0, Some(1)), v(2, Some(1))]).unwrap();
        assert_eq!(s.units, 4);
        assert_eq!(s.presence, 0.625);
        assert_eq!(s.correctness, Some(2.0 / 3.0));
        assert!((s.score - 0.625 * 2.0 / 3.0).abs() < 1e-15);
        // c = 0 (unclear) is not correct.
        let s = axis_score(&[v(2, Some(0)), v(2, Some(1))]).unwrap();
        assert_eq!((s.presence, s.correctness, s.score), (1.0, Some(0.5), 0.5));
    }

    #[test]
    fn empty_axis_and_nothing_present() {
        assert_eq!(axis_score(&[]), None);
        let s = axis_score(&[v(0, None), v(0, None)]).unwrap();
        assert_eq!((s.presence, s.correctness, s.score), (0.0, None, 0.0));
        // An item without a knowledge axis: the trace is the mean of the two it has.
        let p = axis_score(&[v(2, Some(1))]);
        let r = axis_score(&[v(1, Some(1))]);
        let t = TraceScore::new(p, None, r);
        assert_eq!(t.trace, Some(0.75));
        assert_eq!(TraceScore::new(None, None, None).trace, None);
    }

    #[test]
    fn bench_trace_is_the_mean_of_the_axes_as_in_the_paper() {
        // OPENMEDREASON.md: base model P/K/R 34.3 / 34.5 / 43.5 → trace 37.4 (the mean, not ½·Σ).
        let axis = |score: f64| AxisScore {
            units: 1,
            presence: score,
            correctness: Some(1.0),
            score,
        };
        let t = TraceScore::new(Some(axis(0.343)), Some(axis(0.345)), Some(axis(0.435)));
        let s = summarize(&[t]).unwrap();
        assert_eq!(format!("{:.1}", 100.0 * s.trace), "37.4");
        let fine_tuned = TraceScore::new(Some(axis(0.652)), Some(axis(0.850)), Some(axis(0.831)));
        assert_eq!(
            format!("{:.1}", 100.0 * summarize(&[fine_tuned]).unwrap().trace),
            "77.8"
        );
    }

    #[test]
    fn bench_means_over_items() {
        // Item 1: P 1.0, K 0.0 (nothing present), no R. Item 2: P 0.25·1, K 0.5, R 1.
        let a = TraceScore::new(
            axis_score(&[v(2, Some(1))]),
            axis_score(&[v(0, None)]),
            None,
        );
        let b = TraceScore::new(
            axis_score(&[v(1, Some(1)), v(0, None)]),
            axis_score(&[v(2, Some(1)), v(2, Some(-1))]),
            axis_score(&[v(2, Some(1))]),
        );
        assert_eq!(a.trace, Some(0.5));
        assert_eq!(b.trace, Some((0.25 + 0.5 + 1.0) / 3.0));
        let s = summarize(&[a, b]).unwrap();
        let p = s.perception.unwrap();
        assert_eq!((p.items, p.presence, p.score), (2, 0.625, 0.625));
        let k = s.knowledge.unwrap();
        // Correctness over the one item with a present unit; score over both items.
        assert_eq!(
            (k.items, k.correctness, k.correctness_items, k.score),
            (2, Some(0.5), 1, 0.25)
        );
        let r = s.rationale.unwrap();
        assert_eq!((r.items, r.score), (1, 1.0));
        assert_eq!(s.trace, (0.625 + 0.25 + 1.0) / 3.0);
        assert_eq!(s.items, 2);
    }

    #[test]
    fn verdicts_serialize_as_numbers_and_reject_out_of_range() {
        let j = serde_json::to_string(&v(1, Some(-1))).unwrap();
        assert_eq!(j, r#"{"unit_id":"u","presence":1,"correctness":-1}"#);
        assert!(serde_json::from_str::<UnitVerdict>(
            r#"{"unit_id":"u","presence":3,"correctness":null}"#
        )
        .is_err());
        assert!(Correctness::try_from(2).is_err());
    }
}
