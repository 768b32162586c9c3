//! What the user sees of a run: one fixed-format line per step on stderr (STYLE.md rule 11),
//! the same values as one JSON record per line in `RUN/metrics.jsonl`, and as scalars in
//! TensorBoard under `RUN/tb/`.
//!
//! The names (`train/loss`, `time/step_s`, `memory/rss_mib`…) are the jsonl keys and the
//! TensorBoard tags, listed once in `StepStats::fields`; `omr plot` reads them, so they stay
//! stable. A record is `{"step":…,"wall_time":…,<name>:<value>…}` in that order, written with a
//! single `write` so that a crash leaves at most a torn last line. JSON has no NaN or infinity:
//! a non-finite value is written as `null` (the log line and TensorBoard still show NaN/inf).
//!
//! Resuming from a checkpoint at step k rewrites `metrics.jsonl` to the records with
//! `step <= k` (atomically, tmp + rename), so the file of a resumed run equals that of a run
//! that never stopped, `wall_time` aside. TensorBoard gets a new event file that starts with a
//! session start at k + 1, which makes it drop the stopped run's later points.

use crate::tensorboard::{unix_now, EventWriter, TbError};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const TB_DIR: &str = "tb";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: not a metrics record ({message}); fix or delete that line to resume")]
    Malformed {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(transparent)]
    Tensorboard(#[from] TbError),
}

type Result<T> = std::result::Result<T, MetricsError>;

/// One optimizer step as the user sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStats {
    pub step: u64,
    pub total_steps: u64,
    /// Fractional: 1.5 is half-way through the second pass over the data.
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub samples_per_s: f64,
    /// Wall time of the whole step, waiting for the batch included.
    pub step_time_s: f64,
    /// The part of `step_time_s` spent waiting for the batch.
    pub data_time_s: f64,
    /// Process resident memory, `rss_mib()`.
    pub mem_mib: f64,
    /// Non-finite steps skipped so far.
    pub skipped: u64,
    /// Samples quarantined so far.
    pub bad_samples: u64,
    /// Tokens with a loss in this step.
    pub supervised_tokens: u64,
}

/// A value as written to jsonl: counts stay integers there; TensorBoard gets both as floats.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl Value {
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Int(v) => v as f64,
            Value::Float(v) => v,
        }
    }

    /// JSON text; non-finite floats become `null`.
    fn json(self) -> String {
        match self {
            Value::Int(v) => v.to_string(),
            Value::Float(v) => serde_json::Value::from(v).to_string(),
        }
    }
}

impl StepStats {
    /// The stable names and values, in record order: the jsonl keys and the TensorBoard tags.
    pub fn fields(&self) -> [(&'static str, Value); 12] {
        use Value::{Float, Int};
        [
            ("train/loss", Float(self.loss)),
            ("train/lr", Float(self.lr)),
            ("train/grad_norm", Float(self.grad_norm)),
            ("train/epoch", Float(self.epoch)),
            ("train/skipped_steps", Int(self.skipped)),
            ("train/supervised_tokens", Int(self.supervised_tokens)),
            ("data/bad_samples", Int(self.bad_samples)),
            ("time/step_s", Float(self.step_time_s)),
            ("time/data_s", Float(self.data_time_s)),
            ("throughput/tokens_per_s", Float(self.tokens_per_s)),
            ("throughput/samples_per_s", Float(self.samples_per_s)),
            ("memory/rss_mib", Float(self.mem_mib)),
        ]
    }

    /// The step's log line. Every field is always there with a fixed width, so columns line up
    /// from step to step; `data` is the share of the step spent waiting for the batch.
    pub fn line(&self) -> String {
        let w = self.total_steps.to_string().len();
        let data_pct = if self.step_time_s > 0.0 {
            100.0 * self.data_time_s / self.step_time_s
        } else {
            0.0
        };
        format!(
            "step {:>w$}/{} | loss {:>7.4} | lr {} | gnorm {:>6.3} | tok/s {:>6.0} | \
             samples/s {:>6.1} | mem {:>6.0} MiB | data {:>3.0}% | skipped {} | bad {}",
            self.step,
            self.total_steps,
            self.loss,
            sci(self.lr),
            self.grad_norm,
            self.tokens_per_s,
            self.samples_per_s,
            self.mem_mib,
            data_pct,
            self.skipped,
            self.bad_samples,
        )
    }
}

/// `1.00e-04`: C-style exponent (sign, two digits), 8 characters, as learning rates are read.
fn sci(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x:>8}");
    }
    let s = format!("{x:.2e}");
    match s.split_once('e').map(|(m, e)| (m, e.parse::<i32>())) {
        Some((m, Ok(e))) => format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs()),
        _ => s,
    }
}

/// One jsonl record: `{"step":…,"wall_time":…,<name>:<value>…}` and a newline.
pub fn record<'a>(
    step: u64,
    wall_time: f64,
    fields: impl IntoIterator<Item = (&'a str, Value)>,
) -> String {
    let mut s = format!(
        "{{\"step\":{step},\"wall_time\":{}",
        Value::Float(wall_time).json()
    );
    for (name, v) in fields {
        s.push(',');
        s.push_str(&serde_json::Value::from(name).to_string());
        s.push(':');
        s.push_str(&v.json());
    }
    s.push_str("}\n");
    s
}

/// Resident memory of this process in MiB (`VmRSS` of `/proc/self/status`); 0 where that file
/// does not exist or cannot be read.
pub fn rss_mib() -> f64 {
    proc_kib("/proc/self/status", "VmRSS:").map_or(0.0, |kib| kib / 1024.0)
}

/// The value of `key` (e.g. `"VmRSS:"`) in a `/proc` file of `Key: N kB` lines, in KiB; None
/// where the file cannot be read or has no such line.
pub fn proc_kib(file: &str, key: &str) -> Option<f64> {
    fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

pub struct Metrics {
    jsonl_path: PathBuf,
    jsonl: File,
    tb: EventWriter,
    bar: Option<ProgressBar>,
}

impl Metrics {
    /// `run_dir/metrics.jsonl` and `run_dir/tb/`. `resume_step`: `Some(k)` when resuming from a
    /// checkpoint at step k (keeps the records with `step <= k`); `None` starts the file afresh.
    /// `progress`: show a progress bar with ETA under the log lines (the caller decides, from
    /// stderr being a terminal).
    pub fn open(
        run_dir: &Path,
        resume_step: Option<u64>,
        progress: bool,
        total_steps: u64,
    ) -> Result<Self> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MetricsError::Io { path, source }
        };
        fs::create_dir_all(run_dir).map_err(io_err(run_dir))?;
        let jsonl_path = run_dir.join(METRICS_FILE);
        let mut opts = OpenOptions::new();
        match resume_step {
            Some(k) => {
                keep_up_to(&jsonl_path, k)?;
                opts.create(true).append(true);
            }
            None => {
                opts.create(true).write(true).truncate(true);
            }
        }
        let jsonl = opts.open(&jsonl_path).map_err(io_err(&jsonl_path))?;
        let mut tb = EventWriter::create(&run_dir.join(TB_DIR))?;
        if let Some(k) = resume_step {
            tb.add_session_start(k + 1, unix_now())?;
            tb.flush()?;
        }
        let bar = progress.then(|| {
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} steps, eta {eta_precise}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            let bar = ProgressBar::new(total_steps).with_style(style);
            bar.set_position(resume_step.unwrap_or(0));
            bar.reset_eta();
            bar
        });
        Ok(Metrics {
            jsonl_path,
            jsonl,
            tb,
            bar,
        })
    }

    /// The step's line to stderr (above the bar when there is one), its record to jsonl, its
    /// scalars to TensorBoard.
    pub fn log_step(&mut self, s: &StepStats) -> Result<()> {
        let wall_time = unix_now();
        self.print(&s.line());
        if let Some(bar) = &self.bar {
            bar.set_position(s.step);
        }
        let fields = s.fields();
        self.append(&record(s.step, wall_time, fields))?;
        for (name, v) in fields {
            self.tb.add_scalar(name, v.as_f64(), s.step, wall_time)?;
        }
        self.tb.flush()?;
        Ok(())
    }

    /// Values measured at `step` outside the training step, e.g. `kind = "eval"`: a line
    /// `eval step 100 | eval/loss 1.2300 | eval/accuracy 0.4560`, one jsonl record, TensorBoard
    /// scalars. Names are prefixed with `kind/` unless they already start with it.
    pub fn log_scalars(&mut self, step: u64, kind: &str, values: &[(String, f64)]) -> Result<()> {
        let wall_time = unix_now();
        let prefix = format!("{kind}/");
        let named: Vec<(String, f64)> = values
            .iter()
            .map(|(name, v)| {
                if name.starts_with(&prefix) {
                    (name.clone(), *v)
                } else {
                    (format!("{prefix}{name}"), *v)
                }
            })
            .collect();
        let mut line = format!("{kind} step {step}");
        for (name, v) in &named {
            line.push_str(&format!(" | {name} {v:.4}"));
        }
        self.print(&line);
        let fields = named.iter().map(|(n, v)| (n.as_str(), Value::Float(*v)));
        self.append(&record(step, wall_time, fields))?;
        for (name, v) in &named {
            self.tb.add_scalar(name, *v, step, wall_time)?;
        }
        self.tb.flush()?;
        Ok(())
    }

    /// A recipe's own step record (GRPO): `line` to stderr, `values` (full names such as
    /// `grpo/reward_mean`) as one jsonl record and TensorBoard scalars, the bar moved to `step`.
    pub fn log_step_fields(
        &mut self,
        step: u64,
        line: &str,
        values: &[(String, f64)],
    ) -> Result<()> {
        let wall_time = unix_now();
        self.print(line);
        if let Some(bar) = &self.bar {
            bar.set_position(step);
        }
        let fields = values.iter().map(|(n, v)| (n.as_str(), Value::Float(*v)));
        self.append(&record(step, wall_time, fields))?;
        for (name, v) in values {
            self.tb.add_scalar(name, *v, step, wall_time)?;
        }
        self.tb.flush()?;
        Ok(())
    }

    /// Leaves the progress bar where the run stopped and flushes TensorBoard; the jsonl is
    /// written through already.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
        if let Err(e) = self.tb.flush() {
            tracing::warn!("{e}");
        }
    }

    /// A hidden bar (stderr not a terminal after all) would swallow `println`.
    fn print(&self, line: &str) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }

    fn append(&mut self, record: &str) -> Result<()> {
        self.jsonl
            .write_all(record.as_bytes())
            .map_err(|source| MetricsError::Io {
                path: self.jsonl_path.clone(),
                source,
            })
    }
}

/// Rewrites `path` (if it exists) to its records with `step <= k`, byte for byte, through a
/// temporary file and a rename so that a crash leaves the old file or the new one. A last line
/// without its newline that does not parse is a write torn by a crash and is dropped; any other
/// malformed line is an error naming it.
fn keep_up_to(path: &Path, k: u64) -> Result<()> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MetricsError::Io { path, source }
    };
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(io_err(path)(source)),
    };
    let mut kept = Vec::with_capacity(text.len());
    for (i, raw) in text.split_inclusive(|b| *b == b'\n').enumerate() {
        let complete = raw.ends_with(b"\n");
        let body = raw.strip_suffix(b"\n").unwrap_or(raw);
        if body.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match record_step(body) {
            Ok(step) if step <= k => {
                kept.extend_from_slice(raw);
                if !complete {
                    kept.push(b'\n');
                }
            }
            Ok(_) => {}
            Err(_) if !complete => {}
            Err(message) => {
                return Err(MetricsError::Malformed {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message,
                })
            }
        }
    }
    let tmp = path.with_extension("jsonl.tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&kept).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

fn record_step(line: &[u8]) -> std::result::Result<u64, String> {
    let v: serde_json::Value = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    v.get("step")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| "no integer \"step\"".to_string())
}
