//! The offline rule-based judge: lexical matching of a rubric unit against the trace, for
//! tests, CI and the demo, where no LLM endpoint is available.
//!
//! **Weaker than an LLM judge.** It cannot follow paraphrase, synonyms, hedging or reasoning
//! spread over several sentences; it only sees words. Its numbers are comparable between
//! models scored by it on the same data, never with numbers from an LLM judge or the paper.
//!
//! How it answers, for one unit against one trace:
//! - The unit's key terms are the content words of its `claim` (and, separately, of its
//!   `source_quote`): lower-cased, number words as digits, stop words and single letters
//!   dropped. The trace is split into sentences (the `<think>`/`<answer>` tags are ignored).
//! - A term *matches* a sentence when the sentence has it, and *slot-matches* when the term
//!   belongs to a contrast set (left/right, upper/lower, numbers, benign/malignant, …) and the
//!   sentence has another member of that set: "in the left lung" addresses a unit about "the
//!   right lung", but says something else.
//! - The best sentence is the one covering most terms (matches + slot matches), ties going to
//!   more exact matches; the better of claim and quote is kept.
//! - Presence: coverage ≥ 0.75 → 2, ≥ 0.4 → 1, else 0.
//! - Correctness (asked where p ≥ 1): −1 when a contrast term differs or the sentence's
//!   negations (no, not, without, …) disagree in parity with the reference's; +1 when at
//!   least 0.75 of the terms match exactly; else 0.
//! - Pairwise preference is not judged (`prefer` is `None`): the evaluation compares the two
//!   traces' PKR scores instead.

use super::{Judge, JudgeError, PairRef, Preference, TraceRef};
use crate::pkr::{Axis, Correctness, Presence};
use omr_data::sample::RubricUnit;

#[derive(Clone, Copy, Debug, Default)]
pub struct RuleJudge;

const STOP: &[&str] = &[
    "a",
    "an",
    "the",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "of",
    "in",
    "on",
    "at",
    "to",
    "and",
    "or",
    "with",
    "for",
    "this",
    "that",
    "these",
    "those",
    "there",
    "it",
    "its",
    "as",
    "by",
    "from",
    "so",
    "than",
    "then",
    "which",
    "who",
    "has",
    "have",
    "had",
    "into",
    "image",
    "shows",
    "show",
    "shown",
    "seen",
    "trace",
    "rule",
    "answer",
    "option",
    "think",
    "about",
    "each",
    "also",
    "both",
    "because",
    "therefore",
    "thus",
    "here",
    "we",
    "can",
];

const NEGATIONS: &[&str] = &[
    "no", "not", "without", "never", "none", "neither", "nor", "absent", "isn", "aren", "wasn",
    "doesn", "don", "cannot",
];

/// Contrast sets: members address the same point and contradict each other.
const SLOTS: &[&[&str]] = &[
    &["left", "right", "bilateral"],
    &["upper", "lower", "middle"],
    &["benign", "malignant"],
    &["normal", "abnormal"],
    &[
        "increasing",
        "decreasing",
        "stable",
        "rising",
        "falling",
        "flat",
    ],
    &["increased", "decreased", "unchanged"],
    &["high", "low", "moderate"],
    &["mild", "severe"],
    &["small", "large"],
    &["positive", "negative"],
    &["single", "multiple"],
    &["first", "second", "third", "fourth", "fifth", "last"],
];

const NUMBER_WORDS: &[&str] = &[
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// Lower-cased word and number tokens; number words become digits; `3.5` stays one token.
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let decimal_point = c == '.'
            && cur.chars().last().is_some_and(|p| p.is_ascii_digit())
            && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if c.is_alphanumeric() || decimal_point {
            cur.extend(c.to_lowercase());
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    for t in &mut out {
        if let Some(n) = NUMBER_WORDS.iter().position(|w| w == t) {
            *t = n.to_string();
        }
    }
    out
}

fn is_number(t: &str) -> bool {
    t.chars().next().is_some_and(|c| c.is_ascii_digit())
}

/// The contrast set of a term (numbers form one), if any.
fn slot(t: &str) -> Option<usize> {
    if is_number(t) {
        return Some(SLOTS.len());
    }
    SLOTS.iter().position(|s| s.contains(&t))
}

fn key_terms(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in tokens(text) {
        let single_letter = t.chars().count() == 1 && !is_number(&t);
        if single_letter || STOP.contains(&t.as_str()) || NEGATIONS.contains(&t.as_str()) {
            continue;
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

fn negations(tokens: &[String]) -> usize {
    tokens
        .iter()
        .filter(|t| NEGATIONS.contains(&t.as_str()))
        .count()
}

/// Sentences of the trace, tags removed.
fn sentences(trace: &str) -> Vec<Vec<String>> {
    let text = ["<think>", "</think>", "<answer>", "</answer>"]
        .iter()
        .fold(trace.to_string(), |t, tag| t.replace(tag, "\n"));
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let next = chars.get(i + 1).copied();
        let ends = c == '\n'
            || matches!(c, '!' | '?' | ';')
            || (c == '.' && next.is_none_or(char::is_whitespace));
        if ends {
            if !cur.trim().is_empty() {
                out.push(tokens(&cur));
            }
            cur.clear();
        } else {
            cur.push(c);
        }
    }
    if !cur.trim().is_empty() {
        out.push(tokens(&cur));
    }
    out
}

/// How one reference text fares against the trace's best sentence.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Match {
    coverage: f64,
    exact: f64,
    conflicts: usize,
    negation_mismatch: bool,
}

fn best_match(reference: &str, trace: &[Vec<String>]) -> Option<Match> {
    let keys = key_terms(reference);
    if keys.is_empty() {
        return None;
    }
    let ref_neg = negations(&tokens(reference));
    let n = keys.len() as f64;
    trace
        .iter()
        .map(|s| {
            let mut exact = 0usize;
            let mut slotted = 0usize;
            for k in &keys {
                if s.contains(k) {
                    exact += 1;
                } else if let Some(set) = slot(k) {
                    if s.iter().any(|t| slot(t) == Some(set)) {
                        slotted += 1;
                    }
                }
            }
            Match {
                coverage: (exact + slotted) as f64 / n,
                exact: exact as f64 / n,
                conflicts: slotted,
                negation_mismatch: negations(s) % 2 != ref_neg % 2,
            }
        })
        .max_by(|a, b| {
            (a.coverage, a.exact)
                .partial_cmp(&(b.coverage, b.exact))
                .expect("finite")
        })
}

fn unit_match(trace: &str, unit: &RubricUnit) -> Option<Match> {
    let s = sentences(trace);
    [&unit.claim, &unit.source_quote]
        .iter()
        .filter_map(|r| best_match(r, &s))
        .max_by(|a, b| {
            (a.coverage, a.exact)
                .partial_cmp(&(b.coverage, b.exact))
                .expect("finite")
        })
}

fn presence_of(m: Option<Match>) -> Presence {
    match m {
        Some(m) if m.coverage >= 0.75 => Presence::Full,
        Some(m) if m.coverage >= 0.4 => Presence::Partial,
        _ => Presence::Absent,
    }
}

fn correctness_of(m: Option<Match>) -> Correctness {
    match m {
        Some(m) if m.conflicts > 0 || m.negation_mismatch => Correctness::Wrong,
        Some(m) if m.exact >= 0.75 => Correctness::Right,
        _ => Correctness::Unclear,
    }
}

impl Judge for RuleJudge {
    fn describe(&self) -> String {
        "rules".into()
    }

    fn presence(&self, t: &TraceRef, _: Axis, unit: &RubricUnit) -> Result<Presence, JudgeError> {
        Ok(presence_of(unit_match(t.trace, unit)))
    }

    fn correctness(
        &self,
        t: &TraceRef,
        _: Axis,
        unit: &RubricUnit,
    ) -> Result<Correctness, JudgeError> {
        Ok(correctness_of(unit_match(t.trace, unit)))
    }

    fn prefer(&self, _: &PairRef) -> Result<Option<Preference>, JudgeError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(claim: &str, quote: &str) -> RubricUnit {
        RubricUnit {
            unit_id: "P1".into(),
            claim: claim.into(),
            source_quote: quote.into(),
            ..Default::default()
        }
    }

    fn judge(trace: &str, u: &RubricUnit) -> (Presence, Correctness) {
        let t = TraceRef {
            item: "x",
            question: "",
            trace,
        };
        let j = RuleJudge;
        (
            j.presence(&t, Axis::Perception, u).unwrap(),
            j.correctness(&t, Axis::Perception, u).unwrap(),
        )
    }

    #[test]
    fn tokens_keep_decimals_and_read_number_words() {
        assert_eq!(
            tokens("About 3.5 cm, three nodules."),
            ["about", "3.5", "cm", "3", "nodules"]
        );
        assert_eq!(
            key_terms("The image shows a 5 cm opacity in the right lung."),
            ["5", "cm", "opacity", "right", "lung"]
        );
    }

    #[test]
    fn verdicts() {
        let u = unit(
            "There is a single round opacity about 5 cm wide in the right lower zone.",
            "The image shows a single round opacity about 5 cm wide in the right lower zone.",
        );
        let same = "<think>The image shows a single round opacity about 5 cm wide in the right lower zone. Rule: x.</think><answer>B</answer>";
        assert_eq!(judge(same, &u), (Presence::Full, Correctness::Right));
        let swapped = "<think>The image shows a single round opacity about 4 cm wide in the left upper zone.</think>";
        assert_eq!(judge(swapped, &u), (Presence::Full, Correctness::Wrong));
        let negated =
            "<think>There is no single round opacity 5 cm wide in the right lower zone.</think>";
        assert_eq!(judge(negated, &u).1, Correctness::Wrong);
        let partial = "<think>A single round opacity is seen in a lower zone.</think>";
        assert_eq!(
            judge(partial, &u),
            (Presence::Partial, Correctness::Unclear)
        );
        assert_eq!(
            judge("<think>The heart is normal.</think>", &u).0,
            Presence::Absent
        );
        assert_eq!(judge("", &u).0, Presence::Absent);
    }
}
