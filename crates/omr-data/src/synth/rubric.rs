//! The reference trace and its rubric, built from the same statements so they always agree.
//!
//! A trace is `<think>{findings} {rules} {link}</think><answer>X</answer>`: what the image
//! shows, the rule (prefixed "Rule:"), and the link that names the answer and its letter.
//! Each statement becomes one rubric unit whose `source_quote` is the sentence verbatim (so a
//! rule-based judge can find it by matching), whose `claim` is the same content as a plain
//! clause, and whose questions follow fixed templates per axis: perception units ("P1", …)
//! from findings, knowledge units ("K1", …) from rules, rationale units ("R1") from the link.

use super::tasks::{Fact, Importance};
use crate::sample::{Rubric, RubricUnit};

/// `<think>…</think><answer>{letter}</answer>` from the statements in reading order.
pub(crate) fn trace(findings: &[Fact], rules: &[Fact], link: &Fact, letter: &str) -> String {
    let body = findings
        .iter()
        .chain(rules)
        .chain(std::iter::once(link))
        .map(|f| f.sentence.as_str())
        .collect::<Vec<_>>();
    format!("<think>{}</think><answer>{letter}</answer>", body.join(" "))
}

pub(crate) fn rubric(findings: &[Fact], rules: &[Fact], link: &Fact) -> Rubric {
    Rubric {
        perception: units('P', findings, |t| {
            format!("Does the trace mention the {t}?")
        }),
        knowledge: units('K', rules, |t| format!("Does the trace state the {t}?")),
        rationale: units('R', std::slice::from_ref(link), |_| {
            "Does the trace connect the image finding to the chosen answer?".to_string()
        }),
    }
}

fn units(prefix: char, facts: &[Fact], presence: impl Fn(&str) -> String) -> Vec<RubricUnit> {
    facts
        .iter()
        .enumerate()
        .map(|(i, f)| RubricUnit {
            unit_id: format!("{prefix}{}", i + 1),
            topic: f.topic.to_string(),
            claim: sentence_case(&f.claim),
            source_quote: f.sentence.clone(),
            importance: match f.importance {
                Importance::Core => "core",
                Importance::Supporting => "supporting",
            }
            .to_string(),
            presence_question: presence(f.topic),
            correctness_question: format!("Does the trace correctly state that {}?", f.claim),
        })
        .collect()
}

/// "the lesion is 5 cm" → "The lesion is 5 cm."
fn sentence_case(clause: &str) -> String {
    let mut chars = clause.chars();
    match chars.next() {
        Some(first) => format!("{}{}.", first.to_uppercase(), chars.as_str()),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> (Vec<Fact>, Vec<Fact>, Fact) {
        let f = vec![
            Fact::core(
                "size",
                "The image shows a 5 cm opacity.".into(),
                "there is a 5 cm opacity".into(),
            ),
            Fact::supporting(
                "other lung",
                "The left lung is clear.".into(),
                "the left lung is clear".into(),
            ),
        ];
        let r = vec![Fact::rule(
            "diagnostic rule",
            "a lesion over 3 cm is a mass",
            Importance::Core,
        )];
        let l = Fact::core(
            "link",
            "It is over 3 cm, so the answer is mass, option B.".into(),
            "it is over 3 cm".into(),
        );
        (f, r, l)
    }

    #[test]
    fn trace_is_the_sentences_in_order_inside_the_tags() {
        let (f, r, l) = facts();
        assert_eq!(
            trace(&f, &r, &l, "B"),
            "<think>The image shows a 5 cm opacity. The left lung is clear. Rule: a lesion over 3 cm is a mass. \
             It is over 3 cm, so the answer is mass, option B.</think><answer>B</answer>"
        );
    }

    #[test]
    fn units_quote_the_trace_and_number_per_axis() {
        let (f, r, l) = facts();
        let rub = rubric(&f, &r, &l);
        let ids: Vec<_> = rub
            .perception
            .iter()
            .chain(&rub.knowledge)
            .chain(&rub.rationale)
            .map(|u| u.unit_id.as_str())
            .collect();
        assert_eq!(ids, ["P1", "P2", "K1", "R1"]);
        assert_eq!(rub.perception[1].importance, "supporting");
        assert_eq!(
            rub.knowledge[0].source_quote,
            "Rule: a lesion over 3 cm is a mass."
        );
        assert_eq!(rub.knowledge[0].claim, "A lesion over 3 cm is a mass.");
        assert_eq!(
            rub.perception[0].correctness_question,
            "Does the trace correctly state that there is a 5 cm opacity?"
        );
        assert_eq!(
            rub.perception[0].presence_question,
            "Does the trace mention the size?"
        );
    }
}
