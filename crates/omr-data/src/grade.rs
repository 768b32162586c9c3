//! Grading a model's reply against an item's reference answer: the accuracy rule of
//! OpenMedReason-Bench and of `omr eval`, and the accuracy reward of GRPO. One function for
//! both, so what training rewards is exactly what evaluation counts.
//!
//! The reply's answer is the content of its `<answer>…</answer>` block, read strictly, because
//! a policy under RL finds every loophole a loose reader leaves (the hacks named in
//! OPENMEDREASON.md): no answer block, an empty one, several blocks, an unclosed one, or text
//! after `</answer>` are [`Problem`]s and score as wrong.
//!
//! Three kinds of items:
//! - **choice** (options present): the answer must name exactly one option letter (`B`, `(B)`,
//!   `B.`, `b`, `B. Pneumothorax`); `B or C`, `A, B` or a letter that is not an option are
//!   [`Problem::NotAnOption`].
//! - **closed** (reference `yes` / `no`, VQA-RAD, SLAKE, PathVQA): the normalised answer must
//!   be exactly `yes` or `no`; `yes and no` is [`Problem::Ambiguous`].
//! - **open** (any other free-text reference): correct when the normalised answer equals the
//!   normalised reference (lower case, punctuation and the articles a/an/the removed, white
//!   space collapsed). [`Grade::score`] carries the token F1 against the reference as partial
//!   credit (the usual open-VQA metric), 1 or 0 for the other kinds.

use crate::sample::Mcq;

/// Why a reply's answer could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// No `<answer>` tag at all.
    NoAnswer,
    /// `<answer>` without `</answer>`.
    Unclosed,
    /// `<answer></answer>` with only white space inside.
    Empty,
    /// More than one `<answer>` block.
    Multiple,
    /// Something other than white space after `</answer>`.
    TextAfter,
    /// A choice item's answer that names no option, or more than one.
    NotAnOption(String),
    /// A closed item's answer that says both yes and no, or neither.
    Ambiguous(String),
}

impl Problem {
    /// Stable short name for metrics (`reward/accuracy/problem/<code>`).
    pub fn code(&self) -> &'static str {
        match self {
            Problem::NoAnswer => "no_answer",
            Problem::Unclosed => "unclosed",
            Problem::Empty => "empty",
            Problem::Multiple => "multiple",
            Problem::TextAfter => "text_after",
            Problem::NotAnOption(_) => "not_an_option",
            Problem::Ambiguous(_) => "ambiguous",
        }
    }
}

/// What kind of reference an item has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Choice,
    Closed,
    Open,
}

pub fn kind(item: &Mcq) -> Kind {
    if !item.options.is_empty() {
        Kind::Choice
    } else if matches!(normalize(&item.answer).as_str(), "yes" | "no") {
        Kind::Closed
    } else {
        Kind::Open
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Grade {
    /// The answer as read (a letter for choice items, the normalised text otherwise).
    pub answer: Option<String>,
    pub correct: bool,
    /// 1/0 for choice and closed items; token F1 in [0, 1] for open ones.
    pub score: f64,
    pub problem: Option<Problem>,
}

impl Grade {
    fn wrong(problem: Problem) -> Grade {
        Grade {
            answer: None,
            correct: false,
            score: 0.0,
            problem: Some(problem),
        }
    }
}

/// The content of the reply's single `<answer>…</answer>` block, trimmed.
pub fn extract_answer(reply: &str) -> Result<String, Problem> {
    const OPEN: &str = "<answer>";
    const CLOSE: &str = "</answer>";
    let Some(start) = reply.find(OPEN) else {
        return Err(Problem::NoAnswer);
    };
    let inner = &reply[start + OPEN.len()..];
    let Some(len) = inner.find(CLOSE) else {
        return Err(Problem::Unclosed);
    };
    let (answer, tail) = (&inner[..len], &inner[len + CLOSE.len()..]);
    if answer.contains(OPEN) || tail.contains(OPEN) || tail.contains(CLOSE) {
        return Err(Problem::Multiple);
    }
    if !tail.trim().is_empty() {
        return Err(Problem::TextAfter);
    }
    let answer = answer.trim();
    if answer.is_empty() {
        return Err(Problem::Empty);
    }
    Ok(answer.to_string())
}

/// Grades `reply` against `item` (see the module doc for the rules of each kind).
pub fn grade(reply: &str, item: &Mcq) -> Grade {
    let answer = match extract_answer(reply) {
        Ok(a) => a,
        Err(p) => return Grade::wrong(p),
    };
    match kind(item) {
        Kind::Choice => match crate::mcq::answer_letter(&answer, &item.options) {
            Some(letter) => {
                let correct = letter == item.answer;
                Grade {
                    answer: Some(letter),
                    correct,
                    score: f64::from(u8::from(correct)),
                    problem: None,
                }
            }
            None => Grade::wrong(Problem::NotAnOption(answer)),
        },
        Kind::Closed => {
            let norm = normalize(&answer);
            let words: Vec<&str> = norm.split(' ').collect();
            let yes = words.contains(&"yes");
            let no = words.contains(&"no");
            // A bare "yes"/"no", or one leading a short justification ("yes, a fracture").
            let said = match (yes, no, words.first()) {
                (true, false, Some(&"yes")) => "yes",
                (false, true, Some(&"no")) => "no",
                _ => return Grade::wrong(Problem::Ambiguous(answer)),
            };
            let correct = said == normalize(&item.answer);
            Grade {
                answer: Some(said.to_string()),
                correct,
                score: f64::from(u8::from(correct)),
                problem: None,
            }
        }
        Kind::Open => {
            let (got, want) = (normalize(&answer), normalize(&item.answer));
            let correct = got == want;
            let score = if correct { 1.0 } else { token_f1(&got, &want) };
            Grade {
                answer: Some(got),
                correct,
                score,
                problem: None,
            }
        }
    }
}

/// Lower case, punctuation → space, articles dropped, white space collapsed.
pub fn normalize(text: &str) -> String {
    let lower = text.to_lowercase();
    let spaced: String = lower
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    spaced
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Token-level F1 of two normalised strings (bag of words with multiplicity).
pub fn token_f1(got: &str, want: &str) -> f64 {
    let g: Vec<&str> = got.split_whitespace().collect();
    let w: Vec<&str> = want.split_whitespace().collect();
    if g.is_empty() || w.is_empty() {
        return 0.0;
    }
    let mut pool = w.clone();
    let mut common = 0usize;
    for t in &g {
        if let Some(i) = pool.iter().position(|x| x == t) {
            pool.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let p = common as f64 / g.len() as f64;
    let r = common as f64 / w.len() as f64;
    2.0 * p * r / (p + r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice() -> Mcq {
        crate::mcq::validate_mcq("Which?\nA. Effusion\nB. Pneumothorax\nC. Normal", "B", None)
            .expect("valid")
    }

    fn open(answer: &str) -> Mcq {
        crate::mcq::validate_open("What is shown?", answer).expect("valid")
    }

    #[test]
    fn strict_extraction() {
        assert_eq!(
            extract_answer("<think>x</think><answer> B </answer>\n"),
            Ok("B".into())
        );
        assert_eq!(extract_answer("B"), Err(Problem::NoAnswer));
        assert_eq!(extract_answer("<answer>B"), Err(Problem::Unclosed));
        assert_eq!(extract_answer("<answer>  </answer>"), Err(Problem::Empty));
        assert_eq!(
            extract_answer("<answer>A</answer><answer>B</answer>"),
            Err(Problem::Multiple)
        );
        assert_eq!(
            extract_answer("<answer>A<answer>B</answer>"),
            Err(Problem::Multiple)
        );
        assert_eq!(
            extract_answer("<answer>A</answer> actually B"),
            Err(Problem::TextAfter)
        );
    }

    #[test]
    fn choice_items() {
        let item = choice();
        for ok in [
            "<answer>B</answer>",
            "<answer>(b)</answer>",
            "<answer>B. Pneumothorax</answer>",
        ] {
            let g = grade(ok, &item);
            assert!(g.correct && g.score == 1.0, "{ok}: {g:?}");
        }
        let g = grade("<answer>A</answer>", &item);
        assert!(!g.correct && g.problem.is_none() && g.answer.as_deref() == Some("A"));
        for hack in [
            "<answer>E</answer>",
            "<answer>B or C</answer>",
            "<answer>A, B</answer>",
        ] {
            let g = grade(hack, &item);
            assert!(!g.correct, "{hack}");
            assert_eq!(g.problem.as_ref().map(Problem::code), Some("not_an_option"));
        }
        assert_eq!(
            grade("<answer>B</answer> wait, C", &item).problem,
            Some(Problem::TextAfter)
        );
    }

    #[test]
    fn closed_items() {
        let item = open("Yes");
        assert_eq!(kind(&item), Kind::Closed);
        assert!(grade("<answer>yes</answer>", &item).correct);
        assert!(grade("<answer>Yes, a fracture.</answer>", &item).correct);
        assert!(!grade("<answer>no</answer>", &item).correct);
        for amb in ["<answer>yes and no</answer>", "<answer>maybe</answer>"] {
            assert_eq!(
                grade(amb, &item).problem.as_ref().map(Problem::code),
                Some("ambiguous")
            );
        }
    }

    #[test]
    fn open_items() {
        let item = open("the left lower lobe");
        assert_eq!(kind(&item), Kind::Open);
        let g = grade("<answer>Left lower lobe.</answer>", &item);
        assert!(g.correct && g.score == 1.0);
        let g = grade("<answer>right lower lobe</answer>", &item);
        assert!(!g.correct);
        // 2 of 3 tokens in common both ways: F1 = 2/3.
        assert!((g.score - 2.0 / 3.0).abs() < 1e-12, "{}", g.score);
        assert_eq!(grade("<answer>kidney</answer>", &item).score, 0.0);
    }
}
