//! Grading, judging and reporting on real synthetic shards (`omr data synth` parquet, whose
//! test split carries the rubric columns), with replies we choose instead of a model's: the
//! reference traces themselves (an oracle) and each item answered with the next item's trace
//! (a model that reasons about the wrong image). The oracle must get every answer right and a
//! rule-judged trace score of 1; the shifted one far less of both, and lose the pairwise
//! comparison on nearly every item.

use omr_data::pipeline::{ProcessConfig, Processor};
use omr_data::source::SourceSpec;
use omr_data::synth::{generate, SynthConfig};
use omr_eval::judge::rules::RuleJudge;
use omr_eval::judge::PairRef;
use omr_eval::pairwise::{self, Method, Pair};
use omr_eval::run::{model_report, score, Generated, Reply};
use omr_model::generate::Finish;
use omr_train::eval::load_eval_set;

#[test]
fn oracle_and_shifted_replies_on_synthetic_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        out: tmp.path().to_path_buf(),
        train: 4,
        test: 40,
        image_size: (56, 56),
        ..Default::default()
    };
    generate(&cfg).unwrap();
    let proc_dir = tmp.path().join("processor");
    omr_data::tiny::write_tiny_processor(&proc_dir, 4, 0, 600).unwrap();
    let processor = Processor::from_model_dir(&proc_dir, &ProcessConfig::default()).unwrap();
    let spec = SourceSpec::local(tmp.path(), "test");
    let set = load_eval_set(&[spec], "test", &processor, 0, usize::MAX).unwrap();
    assert_eq!(set.gen_items.len(), 40, "skipped: {:?}", set.skipped);
    for it in &set.gen_items {
        let r = it.rubric.as_ref().expect("test rows carry a rubric");
        assert!(
            !r.perception.is_empty() && !r.rationale.is_empty(),
            "{}",
            it.origin
        );
        assert!(it.reference.is_some());
    }

    let with_replies = |name: &str, shift: usize| {
        let n = set.gen_items.len();
        let replies = (0..n)
            .map(|i| Reply {
                text: set.gen_items[(i + shift) % n].reference.clone().unwrap(),
                finish: Finish::Eos,
                new_tokens: 1,
            })
            .collect();
        Generated {
            model: name.into(),
            items: load_eval_set(
                &[SourceSpec::local(tmp.path(), "test")],
                "test",
                &processor,
                0,
                usize::MAX,
            )
            .unwrap()
            .gen_items,
            replies,
            skipped: Vec::new(),
            seconds: 0.0,
        }
    };
    let oracle = with_replies("oracle", 0);
    let shifted = with_replies("shifted", 1);
    let (ro, rs) = (
        score(&oracle, &RuleJudge, false).unwrap(),
        score(&shifted, &RuleJudge, false).unwrap(),
    );
    let (mo, ms) = (model_report(&oracle, &ro), model_report(&shifted, &rs));

    assert_eq!(mo.accuracy.overall.correct, 40);
    assert_eq!(mo.accuracy.format_rate, 1.0);
    for groups in mo.accuracy.by_group.values() {
        assert!(groups.values().all(|r| r.value == 1.0));
    }
    let po = mo.pkr.as_ref().unwrap();
    assert_eq!((po.items, po.trace), (40, 1.0));
    let ps = ms.pkr.as_ref().unwrap();
    eprintln!(
        "oracle: accuracy {:.3}, trace {:.3}; shifted: accuracy {:.3}, trace {:.3} (P {:.3} K {:.3} R {:.3})",
        mo.accuracy.overall.value,
        po.trace,
        ms.accuracy.overall.value,
        ps.trace,
        ps.perception.unwrap().score,
        ps.knowledge.unwrap().score,
        ps.rationale.unwrap().score
    );
    assert!(ms.accuracy.overall.value < 0.6, "{:?}", ms.accuracy.overall);
    assert!(ps.trace < 0.3, "shifted traces: {}", ps.trace);

    let pairs: Vec<Pair> = ro
        .iter()
        .zip(&rs)
        .zip(&oracle.items)
        .map(|((a, b), it)| Pair {
            refs: PairRef {
                item: &a.item,
                question: &it.mcq.question,
                reference: it.reference.as_deref(),
                a: &a.reply,
                b: &b.reply,
            },
            pkr_a: a.pkr.as_ref().and_then(|j| j.score.trace),
            pkr_b: b.pkr.as_ref().and_then(|j| j.score.trace),
        })
        .collect();
    let (p, _) = pairwise::compare(&RuleJudge, "oracle", "shifted", &pairs).unwrap();
    assert_eq!(p.method, Method::Pkr);
    assert_eq!(p.compared, 40);
    assert!(p.wins >= 36 && p.losses == 0, "{p:?}");
}
