//! Pairwise preference between two models' traces on the same items (OpenMedReason reports
//! 86.1% for fine-tuned over base).
//!
//! Model A is the one evaluated, B the one it is compared with (`omr eval --model A --compare
//! B`), and counts are from A's side. A judge that compares traces itself (the HTTP judge,
//! which asks in both orders) decides each item; a judge that does not (the rule judge)
//! hands over to the items' PKR trace scores: the higher one wins, equal scores (within
//! 1e-9) tie, and items without a rubric are not compared.
//!
//! Preference rate = (wins + ½·ties) / compared items: the share of comparisons A wins,
//! a tie counting half, so 50% means no preference either way.

use crate::judge::{Judge, JudgeError, PairRef, Preference};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The judge compared the traces.
    Judge,
    /// The items' PKR trace scores were compared.
    Pkr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairwiseReport {
    pub a: String,
    pub b: String,
    pub method: Method,
    pub compared: usize,
    /// Items that could not be compared (no rubric for a PKR comparison).
    pub not_compared: usize,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub preference_rate: f64,
}

/// One item's pair and, for the PKR fallback, both traces' scores.
pub struct Pair<'a> {
    pub refs: PairRef<'a>,
    pub pkr_a: Option<f64>,
    pub pkr_b: Option<f64>,
}

/// Each item's preference (`None`: not compared) and the counts.
pub fn compare(
    judge: &dyn Judge,
    a: &str,
    b: &str,
    pairs: &[Pair],
) -> Result<(PairwiseReport, Vec<Option<Preference>>), JudgeError> {
    let judged: Vec<Option<Preference>> = pairs
        .par_iter()
        .map(|p| judge.prefer(&p.refs))
        .collect::<Result<_, _>>()?;
    let method = if judged.iter().all(Option::is_some) && !judged.is_empty() {
        Method::Judge
    } else {
        Method::Pkr
    };
    let prefs: Vec<Option<Preference>> = match method {
        Method::Judge => judged,
        Method::Pkr => pairs.iter().map(|p| by_pkr(p.pkr_a, p.pkr_b)).collect(),
    };
    let count = |want: Preference| prefs.iter().filter(|p| **p == Some(want)).count();
    let (wins, ties, losses) = (
        count(Preference::A),
        count(Preference::Tie),
        count(Preference::B),
    );
    let compared = wins + ties + losses;
    Ok((
        PairwiseReport {
            a: a.to_string(),
            b: b.to_string(),
            method,
            compared,
            not_compared: pairs.len() - compared,
            wins,
            ties,
            losses,
            preference_rate: (wins as f64 + 0.5 * ties as f64) / compared.max(1) as f64,
        },
        prefs,
    ))
}

fn by_pkr(a: Option<f64>, b: Option<f64>) -> Option<Preference> {
    let (a, b) = (a?, b?);
    Some(if (a - b).abs() <= 1e-9 {
        Preference::Tie
    } else if a > b {
        Preference::A
    } else {
        Preference::B
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::rules::RuleJudge;

    fn pair(pkr_a: Option<f64>, pkr_b: Option<f64>) -> Pair<'static> {
        Pair {
            refs: PairRef {
                item: "x",
                question: "",
                reference: None,
                a: "",
                b: "",
            },
            pkr_a,
            pkr_b,
        }
    }

    #[test]
    fn rule_judge_falls_back_to_pkr() {
        let pairs = [
            pair(Some(0.9), Some(0.1)),
            pair(Some(0.5), Some(0.5)),
            pair(Some(0.2), Some(0.7)),
            pair(Some(1.0), Some(0.0)),
            pair(None, Some(0.3)),
        ];
        let (r, prefs) = compare(&RuleJudge, "sft", "base", &pairs).unwrap();
        assert_eq!(r.method, Method::Pkr);
        assert_eq!(
            (r.wins, r.ties, r.losses, r.compared, r.not_compared),
            (2, 1, 1, 4, 1)
        );
        assert_eq!(r.preference_rate, 2.5 / 4.0);
        assert_eq!(prefs[4], None);
        assert_eq!(prefs[2], Some(Preference::B));
    }
}
