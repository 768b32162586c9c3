//! `omr eval` as a library call: [`evaluate`] reads top to bottom: load the model and the bench
//! items → generate greedily in left-padded batches → grade the answers → judge the traces
//! against their rubrics (PKR) → the same for the `compare` model → pairwise preference →
//! [`Report`]. Its pieces are public for callers with a model already in memory (the demo's
//! seeded base model): [`answer_bench`] → [`score`] → [`model_report`].
//!
//! Notable choices:
//! - The bench items are read with `omr_train::eval::load_eval_set` (file order, no shuffle),
//!   with each model's own processor, so the prompts are exactly what that model was trained
//!   on. Records that cannot be used are listed in the report, not fatal.
//! - Generation is greedy (temperature 0) with `omr_model::generate` in batches of
//!   `batch_size`; a reply is decoded without its end token, special tokens kept.
//! - Answers are graded by `omr_data::grade` (the same rule as the GRPO accuracy reward):
//!   one `<answer>` block naming exactly one option (or yes/no, or the open answer).
//! - Judging runs `judge_threads` items at once on a private rayon pool (judge calls are
//!   network-bound; the global pool is sized for the CPU). A judge failure stops the
//!   evaluation naming the item; judged answers already cached make the rerun cheap.

use crate::judge::{self, Judge, JudgedTrace, PairRef, TraceRef};
use crate::pairwise::{self, Pair};
use crate::pkr;
use crate::report::{AccuracyReport, ItemRecord, ModelReport, Report};
use crate::EvalError;
use candle_core::{DType, Device};
use omr_data::grade;
use omr_data::pipeline::{ProcessConfig, Processor};
use omr_data::source::SourceSpec;
use omr_model::generate::{eos_ids, generate, Finish, SamplingConfig};
use omr_model::model::Qwen2VL;
use omr_model::pretrained;
use omr_train::eval::{chance, left_padded, load_eval_set, GenItem};
use rayon::prelude::*;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub split: String,
    /// At most this many items (in file order); `None`: all.
    pub limit: Option<usize>,
    pub batch_size: usize,
    pub max_new_tokens: usize,
    /// Longest prompt, image tokens included.
    pub max_length: usize,
    /// A second model (folder or Hub id) evaluated on the same items, for pairwise preference.
    pub compare: Option<String>,
    pub device: Device,
    pub dtype: DType,
    /// Ops of the generation (fused kernels on a GPU).
    pub kernels: omr_model::Kernels,
    /// Items judged at once.
    pub judge_threads: usize,
    /// One progress line per batch on stderr.
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            split: "test".into(),
            limit: None,
            batch_size: 8,
            max_new_tokens: 512,
            max_length: 4096,
            compare: None,
            device: Device::Cpu,
            dtype: DType::F32,
            kernels: omr_model::Kernels::Candle,
            judge_threads: 8,
            progress: false,
        }
    }
}

/// The report and the per-item records of both models.
pub struct Evaluation {
    pub report: Report,
    pub items: Vec<ItemRecord>,
    pub compare_items: Vec<ItemRecord>,
}

/// One model's greedy replies to the bench.
pub struct Generated {
    pub model: String,
    pub items: Vec<GenItem>,
    pub replies: Vec<Reply>,
    pub skipped: Vec<String>,
    pub seconds: f64,
}

pub struct Reply {
    pub text: String,
    pub finish: Finish,
    pub new_tokens: usize,
}

/// Evaluates `model` (a folder or Hub id) on `data` (its `split` is replaced by
/// `opts.split`), judging traces with `judge`.
pub fn evaluate(
    model: &str,
    data: &SourceSpec,
    opts: &EvalOptions,
    judge: &dyn Judge,
) -> Result<Evaluation, EvalError> {
    let t0 = Instant::now();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.judge_threads.max(1))
        .build()
        .map_err(|e| EvalError::Internal(format!("judge thread pool: {e}")))?;

    let a = generate_replies(model, data, opts)?;
    let mut items = pool.install(|| score(&a, judge, opts.progress))?;
    let a_report = model_report(&a, &items);

    let mut compare_items = Vec::new();
    let mut b_report = None;
    let mut pairwise_report = None;
    if let Some(other) = &opts.compare {
        let b = generate_replies(other, data, opts)?;
        compare_items = pool.install(|| score(&b, judge, opts.progress))?;
        b_report = Some(model_report(&b, &compare_items));
        // Pair by record: both models read the same data, but a processor may reject
        // different records (e.g. a shorter max length).
        let index: std::collections::HashMap<&str, usize> = compare_items
            .iter()
            .enumerate()
            .map(|(i, r)| (r.item.as_str(), i))
            .collect();
        let mut pairs = Vec::new();
        let mut which = Vec::new();
        for (i, (ra, item)) in items.iter().zip(&a.items).enumerate() {
            let Some(&j) = index.get(ra.item.as_str()) else {
                continue;
            };
            let rb = &compare_items[j];
            pairs.push(Pair {
                refs: PairRef {
                    item: &ra.item,
                    question: &item.mcq.question,
                    reference: item.reference.as_deref(),
                    a: &ra.reply,
                    b: &rb.reply,
                },
                pkr_a: trace_of(&ra.pkr),
                pkr_b: trace_of(&rb.pkr),
            });
            which.push(i);
        }
        let (report, prefs) = pool.install(|| pairwise::compare(judge, model, other, &pairs))?;
        drop(pairs);
        for (i, p) in which.into_iter().zip(prefs) {
            items[i].preference = p;
        }
        pairwise_report = Some(report);
    }

    let stats = judge.stats();
    let report = Report {
        data: data.display_name(),
        split: opts.split.clone(),
        items: a.items.len(),
        skipped: a.skipped.clone(),
        decoding: format!("greedy, ≤{} new tokens", opts.max_new_tokens),
        judge: judge.describe(),
        judge_requests: stats.requests,
        judge_cache_hits: stats.cache_hits,
        model: a_report,
        compare: b_report,
        pairwise: pairwise_report,
        seconds: t0.elapsed().as_secs_f64(),
    };
    Ok(Evaluation {
        report,
        items,
        compare_items,
    })
}

impl Evaluation {
    /// `DIR/eval.json`, `DIR/eval.md`, `DIR/replies.jsonl` (and `replies-compare.jsonl`).
    pub fn write(&self, dir: &Path) -> Result<(), EvalError> {
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |source| EvalError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let json = serde_json::to_string_pretty(&self.report).expect("reports serialize");
        let p = dir.join("eval.json");
        std::fs::write(&p, json + "\n").map_err(io(&p))?;
        let p = dir.join("eval.md");
        std::fs::write(&p, self.report.to_markdown()).map_err(io(&p))?;
        let mut files = vec![("replies.jsonl", &self.items)];
        if self.report.compare.is_some() {
            files.push(("replies-compare.jsonl", &self.compare_items));
        }
        for (name, records) in files {
            let p = dir.join(name);
            let mut f = std::io::BufWriter::new(std::fs::File::create(&p).map_err(io(&p))?);
            for r in records {
                let line = serde_json::to_string(r).expect("records serialize");
                writeln!(f, "{line}").map_err(io(&p))?;
            }
            f.flush().map_err(io(&p))?;
        }
        Ok(())
    }
}

/// Loads `model` (a folder or Hub id), reads the bench items with its processor, and answers
/// them greedily.
pub fn generate_replies(
    model: &str,
    data: &SourceSpec,
    opts: &EvalOptions,
) -> Result<Generated, EvalError> {
    let m = pretrained::load(model, opts.dtype, &opts.device).map_err(|source| {
        EvalError::ModelLoad {
            model: model.to_string(),
            source,
        }
    })?;
    let pcfg = ProcessConfig {
        max_length: opts.max_length,
        ..Default::default()
    };
    let processor = Processor::from_model_dir(&m.dir, &pcfg).map_err(|e| EvalError::Processor {
        dir: m.dir.display().to_string(),
        detail: e.to_string(),
    })?;
    let net = Qwen2VL::new(&m.config, &m.params)?.with_kernels(opts.kernels);
    let eos = eos_ids(&m.dir, &m.config.eos_token_ids);
    answer_bench(model, &net, &processor, &eos, data, opts)
}

/// Answers the bench with a model already in memory (e.g. a seeded init that was never
/// saved): `name` labels it in the report, `eos` ends a reply.
pub fn answer_bench(
    name: &str,
    net: &Qwen2VL,
    processor: &Processor,
    eos: &[u32],
    data: &SourceSpec,
    opts: &EvalOptions,
) -> Result<Generated, EvalError> {
    let t0 = Instant::now();
    let set = load_eval_set(
        std::slice::from_ref(data),
        &opts.split,
        processor,
        0,
        opts.limit.unwrap_or(usize::MAX),
    )?;
    if set.gen_items.is_empty() {
        let shown: Vec<&str> = set.skipped.iter().take(3).map(String::as_str).collect();
        return Err(EvalError::NoItems {
            data: data.display_name(),
            split: opts.split.clone(),
            skipped: if shown.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} records skipped, e.g. {})",
                    set.skipped.len(),
                    shown.join("; ")
                )
            },
        });
    }
    let sampling = SamplingConfig {
        max_new_tokens: opts.max_new_tokens,
        eos_token_ids: eos.to_vec(),
        ..Default::default()
    };
    let tok = processor.encoder().tokenizer();
    let mut replies = Vec::with_capacity(set.gen_items.len());
    let batch = opts.batch_size.max(1);
    for (k, chunk) in set.gen_items.chunks(batch).enumerate() {
        let input = left_padded(
            chunk.iter().map(|g| &g.prompt),
            processor.pad_id(),
            net.device(),
        )?;
        for (item, out) in chunk.iter().zip(generate(net, &input, &sampling)?) {
            let mut ids = out.tokens.as_slice();
            if let Some((last, rest)) = ids.split_last() {
                if eos.contains(last) {
                    ids = rest;
                }
            }
            let text = tok.decode(ids, false).map_err(|e| {
                EvalError::Internal(format!("{}: cannot decode the reply: {e}", item.origin))
            })?;
            replies.push(Reply {
                text,
                finish: out.finish,
                new_tokens: out.tokens.len(),
            });
        }
        if opts.progress {
            eprintln!(
                "{name}: {}/{} items answered ({:.0}s)",
                ((k + 1) * batch).min(set.gen_items.len()),
                set.gen_items.len(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(Generated {
        model: name.to_string(),
        items: set.gen_items,
        replies,
        skipped: set.skipped,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Grades and judges every reply (in parallel on the current rayon pool); with `progress`, a
/// line on stderr every tenth of the items.
pub fn score(
    g: &Generated,
    judge: &dyn Judge,
    progress: bool,
) -> Result<Vec<ItemRecord>, EvalError> {
    let t0 = Instant::now();
    let done = AtomicUsize::new(0);
    let n = g.items.len();
    let every = n.div_ceil(10).max(1);
    g.items
        .par_iter()
        .zip(&g.replies)
        .map(|(item, reply)| {
            let record = score_one(item, reply, judge)?;
            let k = done.fetch_add(1, Ordering::Relaxed) + 1;
            if progress && (k.is_multiple_of(every) || k == n) {
                eprintln!(
                    "{}: {k}/{n} items judged ({:.0}s)",
                    g.model,
                    t0.elapsed().as_secs_f64()
                );
            }
            Ok(record)
        })
        .collect()
}

fn score_one(item: &GenItem, reply: &Reply, judge: &dyn Judge) -> Result<ItemRecord, EvalError> {
    let name = item.origin.to_string();
    let graded = grade::grade(&reply.text, &item.mcq);
    let pkr = match &item.rubric {
        Some(r) if pkr::Axis::ALL.iter().any(|a| !a.units(r).is_empty()) => {
            let t = TraceRef {
                item: &name,
                question: &item.mcq.question,
                trace: &reply.text,
            };
            Some(judge::judge_trace(judge, &t, r)?)
        }
        _ => None,
    };
    Ok(ItemRecord {
        groups: item.groups.iter().cloned().collect(),
        reference_answer: item.answer.clone(),
        answer: graded.answer,
        correct: graded.correct,
        problem: graded.problem.as_ref().map(|p| p.code().to_string()),
        formatted: grade::extract_answer(&reply.text).is_ok(),
        finish: match reply.finish {
            Finish::Eos => "eos",
            Finish::Length => "length",
        }
        .into(),
        new_tokens: reply.new_tokens,
        reply: reply.text.clone(),
        pkr,
        preference: None,
        item: name,
    })
}

/// One model's accuracy, PKR and generation statistics from its scored records.
pub fn model_report(g: &Generated, records: &[ItemRecord]) -> ModelReport {
    let scores: Vec<pkr::TraceScore> = records
        .iter()
        .filter_map(|r| r.pkr.as_ref().map(|j| j.score.clone()))
        .collect();
    ModelReport {
        model: g.model.clone(),
        accuracy: AccuracyReport::from_records(records, chance(&g.items)),
        pkr: pkr::summarize(&scores),
        truncated: records.iter().filter(|r| r.finish == "length").count(),
        mean_new_tokens: records.iter().map(|r| r.new_tokens as f64).sum::<f64>()
            / records.len().max(1) as f64,
        generate_seconds: g.seconds,
    }
}

fn trace_of(j: &Option<JudgedTrace>) -> Option<f64> {
    j.as_ref().and_then(|j| j.score.trace)
}
