//! The offline rule judge on the synthetic bench's own rubrics (test split of `omr data
//! synth`): the reference trace scores near the top, a trace written for another item of the
//! same task (another finding, another answer) scores far lower, an empty reply scores 0.
//! This is what makes the rule judge usable for the demo: its scores move with the trace.

use omr_data::synth::{synth_text, Split};
use omr_eval::judge::rules::RuleJudge;
use omr_eval::judge::{judge_trace, TraceRef};

fn trace_score(trace: &str, rubric: &omr_data::sample::Rubric) -> f64 {
    let t = TraceRef {
        item: "synth",
        question: "",
        trace,
    };
    judge_trace(&RuleJudge, &t, rubric)
        .unwrap()
        .score
        .trace
        .unwrap()
}

#[test]
fn good_traces_score_high_and_wrong_ones_low() {
    let rows: Vec<_> = (0..120).map(|i| synth_text(Split::Test, i, 0)).collect();
    let (mut good, mut bad, mut empty, mut n) = (0.0, 0.0, 0.0, 0usize);
    let mut worse = 0usize;
    for r in &rows {
        let units = r.rubric.perception.len() + r.rubric.knowledge.len() + r.rubric.rationale.len();
        assert!(units >= 2, "test rows carry rubric units: {:?}", r.rubric);
        // Another row of the same task whose answer differs: same template, other finding.
        let Some(other) = rows.iter().find(|o| {
            o.task == r.task
                && o.index != r.index
                && o.reasoning != r.reasoning
                && answer_text(o) != answer_text(r)
        }) else {
            continue;
        };
        let g = trace_score(&r.reasoning, &r.rubric);
        let b = trace_score(&other.reasoning, &r.rubric);
        let e = trace_score("", &r.rubric);
        good += g;
        bad += b;
        empty += e;
        worse += usize::from(b < g);
        n += 1;
    }
    assert!(n >= 60, "{n} pairs");
    let (good, bad, empty) = (good / n as f64, bad / n as f64, empty / n as f64);
    eprintln!("rule judge on {n} synthetic items: reference {good:.3}, other item's trace {bad:.3}, empty {empty:.3}; other < reference on {worse}");
    assert!(good > 0.95, "reference traces: {good}");
    assert!(bad < good - 0.3, "wrong traces {bad} vs reference {good}");
    assert_eq!(empty, 0.0);
    assert!(
        worse as f64 >= 0.9 * n as f64,
        "other < reference on {worse} of {n}"
    );
}

/// The option text of the answer (letters are shuffled per row).
fn answer_text(r: &omr_data::synth::SynthRow) -> &str {
    r.options
        .iter()
        .find(|(l, _)| *l == r.answer)
        .map(|(_, t)| t.as_str())
        .unwrap_or_default()
}
