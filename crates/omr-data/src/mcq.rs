//! Multiple-choice items: lettered options, answer letters and `<think>…</think><answer>…`
//! reference traces, checked against each other.
//!
//! OpenMedReason puts the options inside the question text, one per line (`A. …`, `B) …`,
//! `(C) …`, `D: …`), letters A–J. Only upper-case letters at the start of a line count, so
//! prose such as "a) first" or "Case A: …" is not mistaken for an option. An item is only
//! usable for rewards and accuracy when its answer is one of its option letters and its
//! reference trace (if any) ends in that same letter; anything else is a typed [`Reason`] so
//! the record goes to quarantine rather than into training with a wrong label.

use crate::quarantine::Reason;
use crate::sample::Mcq;

/// Option letters OpenMedReason and the usual medical MCQ sets use.
const LETTERS: &str = "ABCDEFGHIJ";

/// Lettered options of `question` as `(letter, text)` in order of appearance.
pub fn parse_options(question: &str) -> Result<Vec<(String, String)>, Reason> {
    let mut options: Vec<(String, String)> = Vec::new();
    for line in question.lines() {
        let Some((letter, text)) = option_line(line) else {
            continue;
        };
        if options.iter().any(|(l, _)| *l == letter) {
            return Err(Reason::DuplicateOption(letter));
        }
        options.push((letter, text.to_string()));
    }
    if options.is_empty() {
        return Err(Reason::QuestionWithoutOptions);
    }
    Ok(options)
}

/// `A. text`, `A) text`, `(A) text`, `A: text` → `("A", "text")`. The separator must be
/// followed by white space and some text, so `A.5 mg` or a bare `A.` are not options.
fn option_line(line: &str) -> Option<(String, &str)> {
    let line = line.trim_start();
    let (letter, rest) = if let Some(rest) = line.strip_prefix('(') {
        let mut chars = rest.chars();
        let letter = chars.next()?;
        let rest = chars.as_str().strip_prefix(')')?;
        (letter, rest)
    } else {
        let mut chars = line.chars();
        let letter = chars.next()?;
        let rest = chars.as_str();
        let rest = rest
            .strip_prefix('.')
            .or_else(|| rest.strip_prefix(')'))
            .or_else(|| rest.strip_prefix(':'))?;
        (letter, rest)
    };
    if !LETTERS.contains(letter) || !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let text = rest.trim();
    if text.is_empty() {
        return None;
    }
    Some((letter.to_string(), text))
}

/// Splits a reference trace `<think>…</think><answer>X</answer>` into `(think, answer)`, both
/// trimmed. White space around the tags is allowed; anything else outside them is not.
pub fn parse_trace(reasoning: &str) -> Result<(String, String), Reason> {
    let bad = |why: &str| Reason::MalformedTrace(why.to_string());
    let t = reasoning.trim();
    let rest = t
        .strip_prefix("<think>")
        .ok_or_else(|| bad("does not start with <think>"))?;
    let (think, rest) = rest
        .split_once("</think>")
        .ok_or_else(|| bad("no </think>"))?;
    if think.contains("<think>") || rest.contains("<think>") || rest.contains("</think>") {
        return Err(bad("more than one <think> block"));
    }
    let rest = rest.trim_start();
    let rest = rest
        .strip_prefix("<answer>")
        .ok_or_else(|| bad("no <answer> after </think>"))?;
    let (answer, tail) = rest
        .split_once("</answer>")
        .ok_or_else(|| bad("no </answer>"))?;
    if answer.contains("<answer>") || tail.contains("<answer>") {
        return Err(bad("more than one <answer>"));
    }
    if !tail.trim().is_empty() {
        return Err(bad("text after </answer>"));
    }
    let answer = answer.trim();
    if answer.is_empty() {
        return Err(bad("empty <answer>"));
    }
    Ok((think.trim().to_string(), answer.to_string()))
}

/// The content of the last `<answer>…</answer>` in free text, trimmed; `None` without one.
/// Looser than [`parse_trace`]: used to recognise MCQs in chat data whose answers are not
/// full traces.
pub fn answer_tag(text: &str) -> Option<String> {
    let start = text.rfind("<answer>")? + "<answer>".len();
    let len = text[start..].find("</answer>")?;
    let a = text[start..start + len].trim();
    (!a.is_empty()).then(|| a.to_string())
}

/// The option letter an answer names: `b`, `B`, `B.`, `(B)`, `B) text`, `B. text` → `B`.
pub(crate) fn answer_letter(answer: &str, options: &[(String, String)]) -> Option<String> {
    let a = answer.trim();
    let letter = if let Some((l, _)) = option_line(&a.to_ascii_uppercase()) {
        l
    } else {
        let bare = a.trim_start_matches('(').trim_end_matches([')', '.', ':']);
        let mut chars = bare.chars();
        let c = chars.next()?;
        if chars.next().is_some() {
            return None;
        }
        c.to_ascii_uppercase().to_string()
    };
    options.iter().any(|(l, _)| *l == letter).then_some(letter)
}

/// A validated multiple-choice item: options parsed from `question`, `answer` resolved to one
/// of their letters, and the trace's `<answer>` (when a trace is given) naming the same letter.
pub fn validate_mcq(question: &str, answer: &str, reasoning: Option<&str>) -> Result<Mcq, Reason> {
    let options = parse_options(question)?;
    if answer.trim().is_empty() {
        return Err(Reason::EmptyField("answer".into()));
    }
    let letter = answer_letter(answer, &options).ok_or_else(|| Reason::AnswerNotAnOption {
        answer: answer.trim().to_string(),
        options: options.iter().map(|(l, _)| l.clone()).collect(),
    })?;
    if let Some(trace) = reasoning {
        let (_, traced) = parse_trace(trace)?;
        if answer_letter(&traced, &options).as_deref() != Some(letter.as_str()) {
            return Err(Reason::TraceAnswerMismatch {
                trace: traced,
                answer: letter,
            });
        }
    }
    Ok(Mcq {
        question: question.to_string(),
        options,
        answer: letter,
    })
}

/// An open-ended VQA item (free-text or yes/no answer, no options). Only for sources the
/// caller declares open; OpenMedReason items always need options.
pub fn validate_open(question: &str, answer: &str) -> Result<Mcq, Reason> {
    if answer.trim().is_empty() {
        return Err(Reason::EmptyField("answer".into()));
    }
    Ok(Mcq {
        question: question.to_string(),
        options: Vec::new(),
        answer: answer.trim().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "A 54-year-old man has chest pain.\nWhich finding?\nA. Effusion\nB) Pneumothorax\n  (C) Normal\nD: Mass";

    #[test]
    fn options_in_every_style() {
        let o = parse_options(Q).expect("options");
        let letters: Vec<&str> = o.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(letters, ["A", "B", "C", "D"]);
        assert_eq!(o[1].1, "Pneumothorax");
        assert_eq!(o[2].1, "Normal");
    }

    #[test]
    fn option_failures() {
        assert_eq!(
            parse_options("What is shown?"),
            Err(Reason::QuestionWithoutOptions)
        );
        assert_eq!(
            parse_options("a) lower\nA.5 mg\nK. out of range"),
            Err(Reason::QuestionWithoutOptions)
        );
        assert_eq!(
            parse_options("Q\nA. x\nB. y\nA) z"),
            Err(Reason::DuplicateOption("A".into()))
        );
    }

    #[test]
    fn traces() {
        let (t, a) = parse_trace(" <think>look</think>\n<answer> B </answer>\n").expect("trace");
        assert_eq!((t.as_str(), a.as_str()), ("look", "B"));
        for bad in [
            "B",
            "<think>x</think>",
            "<think>x</think><answer>B</answer> extra",
            "<think>x</think><answer>B</answer><answer>C</answer>",
            "<think>x</think><answer> </answer>",
            "<think>x<answer>B</answer>",
        ] {
            assert_eq!(
                parse_trace(bad).map_err(|r| r.code()),
                Err("malformed_trace"),
                "{bad}"
            );
        }
    }

    #[test]
    fn answers() {
        let trace = "<think>t</think><answer>B</answer>";
        assert_eq!(validate_mcq(Q, " b ", Some(trace)).expect("ok").answer, "B");
        assert_eq!(
            validate_mcq(Q, "B. Pneumothorax", None).expect("ok").answer,
            "B"
        );
        assert_eq!(validate_mcq(Q, "(B)", None).expect("ok").answer, "B");
        assert_eq!(
            validate_mcq(Q, "E", None),
            Err(Reason::AnswerNotAnOption {
                answer: "E".into(),
                options: vec!["A".into(), "B".into(), "C".into(), "D".into()]
            })
        );
        assert_eq!(
            validate_mcq(Q, "Pneumothorax", None).map_err(|r| r.code()),
            Err("answer_not_an_option")
        );
        assert_eq!(
            validate_mcq(Q, "A", Some(trace)),
            Err(Reason::TraceAnswerMismatch {
                trace: "B".into(),
                answer: "A".into()
            })
        );
        assert_eq!(
            validate_mcq(Q, "", None),
            Err(Reason::EmptyField("answer".into()))
        );
        assert_eq!(answer_tag("so <answer>C</answer>"), Some("C".into()));
        assert_eq!(
            validate_open("Is there a fracture?", " yes ")
                .expect("ok")
                .answer,
            "yes"
        );
    }
}
