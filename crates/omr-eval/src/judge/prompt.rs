//! What the LLM judge is asked and how its replies are read: one prompt per rubric question
//! (the question given to the model, its trace, the rubric unit's claim and quote, the unit's
//! presence or correctness question, and the exact answer format), one per pairwise
//! comparison, and strict parsers for the replies.
//!
//! Strict means: after trimming, dropping a leading `<think>…</think>` block (reasoning models
//! emit one) and one trailing period, the reply must be exactly one allowed answer. A judge
//! that says "probably 2" is not guessed at; the caller reports it naming the item.

use super::{PairRef, Preference, TraceRef};
use crate::pkr::{Axis, Correctness, Presence};
use omr_data::sample::RubricUnit;

pub const SYSTEM: &str = "You grade medical reasoning traces against a rubric written by experts. \
You answer one question about one trace, with exactly the answer format asked for and nothing else.";

/// The presence question of `unit` about `t`: answer 0, 1 or 2.
pub fn presence(t: &TraceRef, axis: Axis, u: &RubricUnit) -> String {
    unit(
        t,
        axis,
        u,
        &u.presence_question,
        "Reply 2 if the trace addresses this point explicitly, 1 if only partly or vaguely, \
         0 if not at all. Reply with the single digit only.",
    )
}

/// The correctness question of `unit` about `t`: answer -1, 0 or 1.
pub fn correctness(t: &TraceRef, axis: Axis, u: &RubricUnit) -> String {
    unit(
        t,
        axis,
        u,
        &u.correctness_question,
        "Reply 1 if what the trace says about this point agrees with the rubric unit, -1 if \
         it contradicts it, 0 if it cannot be told. Reply with the number only.",
    )
}

fn unit(t: &TraceRef, axis: Axis, unit: &RubricUnit, question: &str, how: &str) -> String {
    format!(
        "Question given to the model:\n{}\n\nThe model's reasoning trace:\n<<<\n{}\n>>>\n\n\
         Rubric unit ({} axis, {}): {}\nReference wording: \"{}\"\n\n{}\n{}",
        t.question.trim(),
        t.trace.trim(),
        axis.as_str(),
        unit.importance,
        unit.claim.trim(),
        unit.source_quote.trim(),
        question.trim(),
        how
    )
}

pub fn pair(p: &PairRef, first: &str, second: &str) -> String {
    let reference = p
        .reference
        .map(|r| {
            format!(
                "Reference reasoning (a guide for you, not a candidate):\n<<<\n{}\n>>>\n\n",
                r.trim()
            )
        })
        .unwrap_or_default();
    format!(
        "Question given to two models:\n{}\n\n{reference}Trace A:\n<<<\n{}\n>>>\n\nTrace B:\n<<<\n{}\n>>>\n\n\
         Which trace reasons better: correct image findings, correct medical knowledge, and a \
         rationale that connects them to the right answer? Reply A, B or TIE only.",
        p.question.trim(),
        first.trim(),
        second.trim()
    )
}

/// The reply with white space, a leading `<think>…</think>` block and one trailing period
/// removed: what must then be exactly one allowed answer.
fn answer_text(reply: &str) -> &str {
    let mut r = reply.trim();
    if let Some(rest) = r.strip_prefix("<think>") {
        if let Some((_, after)) = rest.split_once("</think>") {
            r = after.trim();
        }
    }
    r.strip_suffix('.').unwrap_or(r).trim()
}

pub fn parse_presence(reply: &str) -> Option<Presence> {
    match answer_text(reply) {
        "0" => Some(Presence::Absent),
        "1" => Some(Presence::Partial),
        "2" => Some(Presence::Full),
        _ => None,
    }
}

pub fn parse_correctness(reply: &str) -> Option<Correctness> {
    match answer_text(reply) {
        "-1" | "\u{2212}1" => Some(Correctness::Wrong),
        "0" => Some(Correctness::Unclear),
        "1" | "+1" => Some(Correctness::Right),
        _ => None,
    }
}

pub fn parse_preference(reply: &str) -> Option<Preference> {
    match answer_text(reply).to_ascii_uppercase().as_str() {
        "A" => Some(Preference::A),
        "B" => Some(Preference::B),
        "TIE" => Some(Preference::Tie),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parses() {
        assert_eq!(parse_presence(" 2\n"), Some(Presence::Full));
        assert_eq!(parse_presence("1."), Some(Presence::Partial));
        assert_eq!(
            parse_presence("<think>hmm, 1 or 2</think>\n0"),
            Some(Presence::Absent)
        );
        for bad in ["3", "two", "2 (explicit)", "The answer is 2", "", "1/2"] {
            assert_eq!(parse_presence(bad), None, "{bad:?}");
        }
        assert_eq!(parse_correctness("+1"), Some(Correctness::Right));
        assert_eq!(parse_correctness("−1"), Some(Correctness::Wrong));
        assert_eq!(parse_correctness("0"), Some(Correctness::Unclear));
        assert_eq!(parse_correctness("2"), None);
        assert_eq!(parse_preference("tie"), Some(Preference::Tie));
        assert_eq!(parse_preference("B."), Some(Preference::B));
        assert_eq!(parse_preference("Trace B"), None);
    }
}
