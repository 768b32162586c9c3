//! GRPO objective against plain-torch goldens (TRL 1.16.0 formulas) from
//! `scripts/fixtures/make_grpo_fixtures.py`: advantages for every `ScaleRewards`, and loss,
//! d loss / d logp and stats for every `LossType` × beta ∈ {0, 0.04} × mask_truncated on/off.

use candle_core::{DType, Device, Tensor, Var};
use omr_train::grpo_loss::{
    advantages, policy_loss, AdvantageError, LossType, ObjectiveConfig, ScaleRewards,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    group_size: usize,
    epsilon: f64,
    epsilon_high: f64,
    max_completion_length: usize,
    rewards: Vec<f64>,
    advantages: std::collections::BTreeMap<String, Vec<f64>>,
    logp: Vec<Vec<f64>>,
    old_logp: Vec<Vec<f64>>,
    ref_logp: Vec<Vec<f64>>,
    lengths: Vec<usize>,
    truncated: Vec<bool>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    loss_type: LossType,
    beta: f64,
    mask_truncated_completions: bool,
    loss: f64,
    grad: Vec<Vec<f64>>,
    clip_low: f64,
    clip_high: f64,
    clip_region: f64,
    kl: Option<f64>,
    num_tokens: f64,
}

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/grpo/loss.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn t2(rows: &[Vec<f64>]) -> Tensor {
    let (n, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, t), &Device::Cpu).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn advantages_match_trl() {
    let f = fixture();
    let mut worst: f64 = 0.0;
    for (name, scale) in [
        ("group", ScaleRewards::Group),
        ("batch", ScaleRewards::Batch),
        ("none", ScaleRewards::None),
    ] {
        let got = advantages(&f.rewards, f.group_size, scale).unwrap();
        for (g, w) in got.iter().zip(&f.advantages[name]) {
            worst = worst.max(rel(*g, *w));
        }
    }
    println!("advantages: max rel diff {worst:e}");
    assert!(worst < 1e-6, "advantages max rel diff {worst:e}");
}

#[test]
fn advantages_reject_bad_input() {
    assert_eq!(
        advantages(&[1.0, 2.0, 3.0], 2, ScaleRewards::Group),
        Err(AdvantageError::PartialGroup {
            len: 3,
            group_size: 2
        })
    );
    assert_eq!(
        advantages(&[1.0], 0, ScaleRewards::Group),
        Err(AdvantageError::ZeroGroupSize)
    );
    assert!(matches!(
        advantages(&[1.0, f64::NAN], 2, ScaleRewards::None),
        Err(AdvantageError::NonFinite { index: 1, .. })
    ));
    // Equal rewards in a group: zero advantage, not NaN.
    assert_eq!(
        advantages(&[0.5, 0.5], 2, ScaleRewards::Group).unwrap(),
        vec![0.0, 0.0]
    );
}

#[test]
fn policy_loss_matches_trl() {
    let f = fixture();
    let t = f.logp[0].len();
    let mask_rows: Vec<Vec<f64>> = f
        .lengths
        .iter()
        .map(|&l| (0..t).map(|j| if j < l { 1.0 } else { 0.0 }).collect())
        .collect();
    let mask = t2(&mask_rows).to_dtype(DType::F32).unwrap(); // the caller's f32 mask
    let (old, reference) = (t2(&f.old_logp), t2(&f.ref_logp));
    let adv = &f.advantages["group"];
    let (mut worst_loss, mut worst_grad, mut worst_stat): (f64, f64, f64) = (0.0, 0.0, 0.0);
    for c in &f.cases {
        let cfg = ObjectiveConfig {
            loss_type: c.loss_type,
            scale_rewards: ScaleRewards::Group,
            epsilon: f.epsilon,
            epsilon_high: f.epsilon_high,
            beta: c.beta,
            mask_truncated_completions: c.mask_truncated_completions,
            max_completion_length: f.max_completion_length,
        };
        let logp = Var::from_tensor(&t2(&f.logp)).unwrap();
        let (loss, stats) = policy_loss(
            logp.as_tensor(),
            &old,
            Some(&reference),
            adv,
            &mask,
            &f.truncated,
            &cfg,
        )
        .unwrap();
        let value = loss.to_scalar::<f64>().unwrap();
        let grads = loss.backward().unwrap();
        let grad = grads
            .get(logp.as_tensor())
            .expect("logp has a gradient")
            .to_vec2::<f64>()
            .unwrap();
        let tag = format!(
            "{:?} beta={} mask_truncated={}",
            c.loss_type, c.beta, c.mask_truncated_completions
        );

        let dl = rel(value, c.loss);
        assert!(dl < 1e-6, "{tag}: loss {value} vs {} (rel {dl:e})", c.loss);
        worst_loss = worst_loss.max(dl);
        for (i, (row, want_row)) in grad.iter().zip(&c.grad).enumerate() {
            for (j, (g, w)) in row.iter().zip(want_row).enumerate() {
                let d = (g - w).abs();
                assert!(d < 1e-5, "{tag}: grad[{i}][{j}] {g} vs {w}");
                worst_grad = worst_grad.max(d);
            }
        }
        for (got, want) in [
            (stats.clip_low, c.clip_low),
            (stats.clip_high, c.clip_high),
            (stats.clip_region, c.clip_region),
            (stats.num_tokens, c.num_tokens),
        ] {
            assert!((got - want).abs() < 1e-12, "{tag}: stat {got} vs {want}");
        }
        match (stats.kl, c.kl) {
            (None, None) => {}
            (Some(g), Some(w)) => {
                assert!(rel(g, w) < 1e-6, "{tag}: kl {g} vs {w}");
                worst_stat = worst_stat.max(rel(g, w));
            }
            (g, w) => panic!("{tag}: kl {g:?} vs {w:?}"),
        }
    }
    println!("{} cases: loss max rel diff {worst_loss:e}, grad max abs diff {worst_grad:e}, kl max rel diff {worst_stat:e}", f.cases.len());
}

/// dapo over an accumulation window = (each micro-batch's loss × its num_tokens / window tokens)
/// summed, which is the whole batch's dapo loss; bnpo has no such identity.
#[test]
fn dapo_rescaled_micro_batches_equal_full_batch() {
    let f = fixture();
    let cfg = ObjectiveConfig {
        max_completion_length: f.max_completion_length,
        ..Default::default()
    };
    assert_eq!(cfg.loss_type, LossType::Dapo);
    let t = f.logp[0].len();
    let mask_rows: Vec<Vec<f64>> = f
        .lengths
        .iter()
        .map(|&l| (0..t).map(|j| if j < l { 1.0 } else { 0.0 }).collect())
        .collect();
    let adv = &f.advantages["group"];
    let run = |r: std::ops::Range<usize>| {
        policy_loss(
            &t2(&f.logp[r.clone()]),
            &t2(&f.old_logp[r.clone()]),
            None,
            &adv[r.clone()],
            &t2(&mask_rows[r.clone()]),
            &f.truncated[r],
            &cfg,
        )
        .unwrap()
    };
    let (full, _) = run(0..4);
    let (l1, s1) = run(0..2);
    let (l2, s2) = run(2..4);
    let window = s1.num_tokens + s2.num_tokens;
    let acc = l1.to_scalar::<f64>().unwrap() * s1.num_tokens / window
        + l2.to_scalar::<f64>().unwrap() * s2.num_tokens / window;
    let full = full.to_scalar::<f64>().unwrap();
    assert!(rel(acc, full) < 1e-12, "{acc} vs {full}");
}

#[test]
fn config_defaults_and_names() {
    let cfg: ObjectiveConfig =
        toml::from_str("loss_type = \"dr_grpo\"\nscale_rewards = \"none\"").unwrap();
    assert_eq!(
        (
            cfg.loss_type,
            cfg.scale_rewards,
            cfg.epsilon,
            cfg.epsilon_high,
            cfg.beta
        ),
        (LossType::DrGrpo, ScaleRewards::None, 0.2, 0.28, 0.0)
    );
    assert!(toml::from_str::<ObjectiveConfig>("epsilon_low = 0.1").is_err());
}
