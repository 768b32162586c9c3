//! GRPO rewards: functions that score completions, their weights, and the rule for a reward
//! that cannot score a completion.
//!
//! Built in (weights in the `[rewards]` TOML table, 0 switches one off):
//! - `accuracy`: [`omr_data::grade`], the same rule as `omr eval`: the option letter inside a
//!   single, closed, non-empty `<answer>` with nothing after it; yes/no and short free-text
//!   answers for open VQA data (token F1 as partial credit). Every hack is a 0.
//! - `format`: 1 when the completion is exactly `<think>…</think><answer>…</answer>` (white
//!   space around the tags allowed, a non-empty think), else 0.
//! - `overlong`: DAPO's soft overlong punishment over the last `overlong_buffer` tokens before
//!   the generation limit: 0 up to `L − buffer`, then falling linearly to −1 at `L`, and −1
//!   for a completion cut at the limit.
//!
//! A reward function returns one value per completion. A wrong number of values is an error
//! (a bug in the reward, never guessed around). A value that is not finite, or an `Err` for the
//! whole batch, marks those completions as unscored *by that reward*: the completion's total is
//! the weighted sum of the rewards that did score it, and the failures are counted and logged
//! per reward. A completion no reward could score gets no total ([`Scored::total`] is `None`)
//! and the caller drops its group: it is never silently scored 0.

use omr_data::{grade, mcq, Mcq};
use serde::{Deserialize, Serialize};

/// One completion as the reward functions see it.
pub struct RewardInput<'a> {
    pub completion: &'a str,
    pub item: &'a Mcq,
    /// Completion length in tokens (eos included).
    pub tokens: usize,
    /// Cut at the generation limit (no eos).
    pub truncated: bool,
}

pub trait Reward: Send + Sync {
    /// Metric name: `reward/<name>/mean`.
    fn name(&self) -> &str;
    /// One value per input, in order. NaN (or Err for all) marks what cannot be scored.
    fn score(&self, items: &[RewardInput]) -> Result<Vec<f64>, String>;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardsConfig {
    /// Weight of the accuracy reward.
    pub accuracy: f64,
    /// Weight of the format reward.
    pub format: f64,
    /// Weight of the overlong penalty (0 = off).
    pub overlong: f64,
    /// Tokens before the generation limit where the overlong penalty ramps from 0 to −1.
    pub overlong_buffer: usize,
}

impl Default for RewardsConfig {
    fn default() -> Self {
        RewardsConfig {
            accuracy: 1.0,
            format: 0.5,
            overlong: 0.0,
            overlong_buffer: 32,
        }
    }
}

impl RewardsConfig {
    /// The enabled built-in rewards with their weights, in a fixed order.
    pub fn build(&self, max_completion_length: usize) -> Vec<(Box<dyn Reward>, f64)> {
        let mut out: Vec<(Box<dyn Reward>, f64)> = Vec::new();
        if self.accuracy != 0.0 {
            out.push((Box::new(Accuracy), self.accuracy));
        }
        if self.format != 0.0 {
            out.push((Box::new(Format), self.format));
        }
        if self.overlong != 0.0 {
            out.push((
                Box::new(Overlong {
                    max_len: max_completion_length,
                    buffer: self.overlong_buffer,
                }),
                self.overlong,
            ));
        }
        out
    }

    pub fn check(&self, max_completion_length: usize) -> Result<(), String> {
        for (k, w) in [
            ("accuracy", self.accuracy),
            ("format", self.format),
            ("overlong", self.overlong),
        ] {
            if !w.is_finite() {
                return Err(format!("rewards.{k} = {w}: weights must be finite"));
            }
        }
        if self.accuracy == 0.0 && self.format == 0.0 && self.overlong == 0.0 {
            return Err("[rewards]: every weight is 0, there is nothing to learn from".into());
        }
        if self.overlong != 0.0 && self.overlong_buffer >= max_completion_length {
            return Err(format!(
                "rewards.overlong_buffer = {} must be below grpo.max_completion_length = {max_completion_length}",
                self.overlong_buffer
            ));
        }
        Ok(())
    }
}

pub struct Accuracy;

impl Reward for Accuracy {
    fn name(&self) -> &str {
        "accuracy"
    }
    fn score(&self, items: &[RewardInput]) -> Result<Vec<f64>, String> {
        Ok(items
            .iter()
            .map(|x| grade::grade(x.completion, x.item).score)
            .collect())
    }
}

pub struct Format;

impl Reward for Format {
    fn name(&self) -> &str {
        "format"
    }
    fn score(&self, items: &[RewardInput]) -> Result<Vec<f64>, String> {
        Ok(items
            .iter()
            .map(|x| match mcq::parse_trace(x.completion) {
                Ok((think, _)) if !think.is_empty() => 1.0,
                _ => 0.0,
            })
            .collect())
    }
}

pub struct Overlong {
    pub max_len: usize,
    pub buffer: usize,
}

impl Reward for Overlong {
    fn name(&self) -> &str {
        "overlong"
    }
    fn score(&self, items: &[RewardInput]) -> Result<Vec<f64>, String> {
        let free = self.max_len.saturating_sub(self.buffer);
        Ok(items
            .iter()
            .map(|x| {
                if x.truncated || x.tokens > self.max_len {
                    -1.0
                } else if x.tokens <= free {
                    0.0
                } else {
                    (free as f64 - x.tokens as f64) / self.buffer.max(1) as f64
                }
            })
            .collect())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RewardError {
    #[error("reward {name} returned {got} values for {want} completions")]
    WrongCount {
        name: String,
        got: usize,
        want: usize,
    },
}

/// Rewards of a batch of completions.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub names: Vec<String>,
    /// `[reward][completion]`; `None` where that reward could not score that completion.
    pub per_reward: Vec<Vec<Option<f64>>>,
    /// Weighted sum over the rewards that scored each completion; `None` when none did.
    pub total: Vec<Option<f64>>,
    /// Per reward: completions it could not score.
    pub failures: Vec<u64>,
}

/// Runs every reward over `inputs` and combines them (see the module doc).
pub fn score_all(
    rewards: &[(Box<dyn Reward>, f64)],
    inputs: &[RewardInput],
) -> Result<Scored, RewardError> {
    let n = inputs.len();
    let mut names = Vec::with_capacity(rewards.len());
    let mut per_reward = Vec::with_capacity(rewards.len());
    let mut failures = Vec::with_capacity(rewards.len());
    for (r, _) in rewards {
        names.push(r.name().to_string());
        let column: Vec<Option<f64>> = match r.score(inputs) {
            Ok(v) if v.len() != n => {
                return Err(RewardError::WrongCount {
                    name: r.name().to_string(),
                    got: v.len(),
                    want: n,
                })
            }
            Ok(v) => v.into_iter().map(|x| x.is_finite().then_some(x)).collect(),
            Err(e) => {
                tracing::warn!("reward {} failed for a batch of {n}: {e}", r.name());
                vec![None; n]
            }
        };
        failures.push(column.iter().filter(|x| x.is_none()).count() as u64);
        per_reward.push(column);
    }
    let total = (0..n)
        .map(|i| {
            let mut any = false;
            let mut sum = 0.0;
            for (col, (_, w)) in per_reward.iter().zip(rewards) {
                if let Some(v) = col[i] {
                    any = true;
                    sum += w * v;
                }
            }
            any.then_some(sum)
        })
        .collect();
    Ok(Scored {
        names,
        per_reward,
        total,
        failures,
    })
}

/// Mean and (population) std of the scored values of one reward column.
pub fn mean_std(xs: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = xs.collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> Mcq {
        mcq::validate_mcq("Which?\nA. Effusion\nB. Pneumothorax\nC. Normal", "B", None)
            .expect("valid")
    }

    fn inputs<'a>(texts: &'a [&'a str], item: &'a Mcq) -> Vec<RewardInput<'a>> {
        texts
            .iter()
            .map(|t| RewardInput {
                completion: t,
                item,
                tokens: t.len(),
                truncated: false,
            })
            .collect()
    }

    #[test]
    fn accuracy_and_format_resist_hacks() {
        let it = item();
        let texts = [
            "<think>air in the pleura</think><answer>B</answer>",
            "<think>x</think><answer>A</answer>",
            "<answer>B</answer>", // no think: format 0, accuracy 1
            "<think>x</think><answer></answer>", // empty
            "<think>x</think><answer>B</answer><answer>C</answer>", // several
            "<think>x</think><answer>E</answer>", // not an option
            "<think>x</think><answer>B</answer> or C", // text after
            "<think>x</think><answer>B or C</answer>",
        ];
        let rewards = RewardsConfig::default().build(64);
        let s = score_all(&rewards, &inputs(&texts, &it)).unwrap();
        assert_eq!(s.names, ["accuracy", "format"]);
        let acc: Vec<f64> = s.per_reward[0].iter().map(|x| x.unwrap()).collect();
        let fmt: Vec<f64> = s.per_reward[1].iter().map(|x| x.unwrap()).collect();
        assert_eq!(acc, [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(fmt, [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]);
        assert_eq!(s.total[0], Some(1.5));
        assert_eq!(s.total[2], Some(1.0));
        assert_eq!(s.failures, [0, 0]);
    }

    #[test]
    fn overlong_ramp() {
        let it = item();
        let r = Overlong {
            max_len: 100,
            buffer: 20,
        };
        let mk = |tokens, truncated| RewardInput {
            completion: "",
            item: &it,
            tokens,
            truncated,
        };
        let v = r
            .score(&[
                mk(50, false),
                mk(80, false),
                mk(90, false),
                mk(100, false),
                mk(100, true),
            ])
            .unwrap();
        assert_eq!(v, [0.0, 0.0, -0.5, -1.0, -1.0]);
    }

    struct Flaky;
    impl Reward for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        fn score(&self, items: &[RewardInput]) -> Result<Vec<f64>, String> {
            Ok((0..items.len())
                .map(|i| if i == 1 { f64::NAN } else { 2.0 })
                .collect())
        }
    }
    struct Broken;
    impl Reward for Broken {
        fn name(&self) -> &str {
            "broken"
        }
        fn score(&self, _: &[RewardInput]) -> Result<Vec<f64>, String> {
            Err("judge unreachable".into())
        }
    }
    struct Short;
    impl Reward for Short {
        fn name(&self) -> &str {
            "short"
        }
        fn score(&self, _: &[RewardInput]) -> Result<Vec<f64>, String> {
            Ok(vec![1.0])
        }
    }

    #[test]
    fn failures_are_excluded_and_counted_never_zero() {
        let it = item();
        let texts = ["<answer>B</answer>", "<answer>B</answer>"];
        let rewards: Vec<(Box<dyn Reward>, f64)> =
            vec![(Box::new(Accuracy), 1.0), (Box::new(Flaky), 0.5)];
        let s = score_all(&rewards, &inputs(&texts, &it)).unwrap();
        // Completion 1: flaky is excluded (not 0): the total is accuracy alone.
        assert_eq!(s.total, [Some(2.0), Some(1.0)]);
        assert_eq!(s.failures, [0, 1]);
        // Only failing rewards: no total at all.
        let rewards: Vec<(Box<dyn Reward>, f64)> =
            vec![(Box::new(Broken), 1.0), (Box::new(Flaky), 1.0)];
        let s = score_all(&rewards, &inputs(&texts, &it)).unwrap();
        assert_eq!(s.total, [Some(2.0), None]);
        assert_eq!(s.failures, [2, 1]);
        // A wrong count is an error.
        let rewards: Vec<(Box<dyn Reward>, f64)> = vec![(Box::new(Short), 1.0)];
        assert_eq!(
            score_all(&rewards, &inputs(&texts, &it)),
            Err(RewardError::WrongCount {
                name: "short".into(),
                got: 1,
                want: 2
            })
        );
    }

    #[test]
    fn open_and_closed_answers() {
        let yes = mcq::validate_open("Is there a fracture?", "yes").unwrap();
        let organ = mcq::validate_open("Which organ?", "left kidney").unwrap();
        let r = Accuracy;
        let mk = |t, item| RewardInput {
            completion: t,
            item,
            tokens: 1,
            truncated: false,
        };
        let v = r
            .score(&[
                mk("<answer>Yes.</answer>", &yes),
                mk("<answer>no</answer>", &yes),
                mk("<answer>The left kidney</answer>", &organ),
                mk("<answer>kidney</answer>", &organ),
            ])
            .unwrap();
        assert_eq!(v[..3], [1.0, 0.0, 1.0]);
        assert!((v[3] - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn config_checks() {
        let mut c = RewardsConfig::default();
        assert!(c.check(64).is_ok());
        c.overlong = 1.0;
        c.overlong_buffer = 64;
        assert!(c.check(64).unwrap_err().contains("overlong_buffer"));
        let z = RewardsConfig {
            accuracy: 0.0,
            format: 0.0,
            overlong: 0.0,
            overlong_buffer: 1,
        };
        assert!(z.check(64).is_err());
    }
}
