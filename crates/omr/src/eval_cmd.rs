//! `omr eval`: OpenMedReason-Bench on a model folder or Hub id. Parses flags, builds the judge
//! (`--judge rules|http`, the `[judge]` table of `--config`, `OMR_JUDGE_*` variables), calls
//! `omr_eval::evaluate`, prints the markdown table and writes `eval.json`, `eval.md` and
//! `replies.jsonl` into `--out`.

use crate::data::DataArgs;
use crate::exit::{Exit, Tag};
use anyhow::anyhow;
use clap::Args;
use omr_eval::judge::http::{HttpJudge, JudgeConfig};
use omr_eval::judge::rules::RuleJudge;
use omr_eval::judge::Judge;
use omr_eval::{EvalError, EvalOptions};
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// Model folder (an `omr export`, a transformers save_pretrained) or Hub id.
    #[arg(long)]
    pub model: String,
    /// Dataset folder or file (a Hub id `ORG/NAME` here works too when no such path exists).
    #[arg(long, conflicts_with = "hub")]
    pub data: Option<String>,
    /// Hugging Face Hub dataset id (HF_TOKEN, HF_HOME, HF_HUB_OFFLINE are honoured).
    #[arg(long)]
    pub hub: Option<String>,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// auto | parquet | llava | messages | wds
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Image folder for JSONL formats (default: the JSONL file's folder).
    #[arg(long)]
    pub image_root: Option<PathBuf>,
    /// Evaluate only the first N items (file order).
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Longest prompt in tokens, image tokens included.
    #[arg(long, default_value_t = 4096)]
    pub max_length: usize,
    /// rules (offline, lexical, weaker) | http (an OpenAI-compatible endpoint); default: the
    /// config's `[judge] kind`, else rules.
    #[arg(long)]
    pub judge: Option<String>,
    /// TOML file with a `[judge]` table (url, model, api_key, timeouts, retries, cache_dir…).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A second model evaluated on the same items, for pairwise preference (this one = A).
    #[arg(long)]
    pub compare: Option<String>,
    /// Writes eval.json, eval.md and replies.jsonl (+ replies-compare.jsonl) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// auto | cpu | cuda (auto: the first GPU of a CUDA build when there is one).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto | fp32 | bf16 (auto: bf16 on a GPU, fp32 on the CPU).
    #[arg(long, default_value = "auto")]
    pub precision: String,
}

/// `[runtime]` from the command line's words.
fn runtime(device: &str, precision: &str) -> crate::Result<omr_train::runtime::Runtime> {
    let words = |e: String| Exit::usage(anyhow!(e));
    omr_train::runtime::RuntimeConfig {
        device: device.parse().map_err(words)?,
        precision: precision.parse().map_err(words)?,
        ..Default::default()
    }
    .resolve()
    .map_err(|e| Exit::usage(anyhow!("{e}")))
}

pub fn run(a: EvalArgs) -> crate::Result<()> {
    let mut cfg = match &a.config {
        Some(path) => JudgeConfig::from_toml_file(path).usage()?,
        None => JudgeConfig::default(),
    };
    if let Some(kind) = &a.judge {
        cfg.kind = kind.clone();
    }
    let env = |k: &str| std::env::var(k).ok();
    let judge: Box<dyn Judge> = match cfg.kind.as_str() {
        "rules" => Box::new(RuleJudge),
        "http" => Box::new(HttpJudge::new(&cfg, &env).usage()?),
        other => {
            return Err(Exit::usage(anyhow!(
                "unknown --judge {other:?}; use rules or http"
            )))
        }
    };

    let as_hub = match (&a.data, &a.hub) {
        (Some(d), None) if !std::path::Path::new(d).exists() && looks_like_hub_id(d) => {
            Some(d.clone())
        }
        _ => None,
    };
    let (data, hub) = match &as_hub {
        Some(id) => (None, Some(id.clone())),
        None => (a.data.as_ref().map(PathBuf::from), a.hub.clone()),
    };
    let spec = DataArgs {
        data,
        hub,
        split: a.split.clone(),
        format: a.format.clone(),
        image_root: a.image_root.clone(),
    }
    .spec()?;
    if a.batch_size == 0 || a.max_new_tokens == 0 {
        return Err(Exit::usage(anyhow!(
            "--batch-size and --max-new-tokens must be at least 1"
        )));
    }
    let rt = runtime(&a.device, &a.precision)?;
    eprintln!("runtime: {}", rt.describe());
    let opts = EvalOptions {
        device: rt.device.clone(),
        dtype: rt.compute,
        kernels: rt.kernels,
        split: a.split.clone(),
        limit: a.limit,
        batch_size: a.batch_size,
        max_new_tokens: a.max_new_tokens,
        max_length: a.max_length,
        compare: a.compare.clone(),
        judge_threads: cfg.concurrency,
        progress: true,
        ..Default::default()
    };
    eprintln!("judge: {}", judge.describe());
    let ev = omr_eval::evaluate(&a.model, &spec, &opts, judge.as_ref()).map_err(|e| {
        let hub_guess = matches!(e, EvalError::Source(_)) && as_hub.is_some();
        let mut x = exit(e);
        if hub_guess {
            x.err = x.err.context(format!(
                "--data {:?} is not a local path, so it was read as a Hub dataset id",
                a.data.as_deref().unwrap_or_default()
            ));
        }
        x
    })?;
    println!("{}", ev.report.to_markdown());
    if let Some(out) = &a.out {
        ev.write(out).map_err(exit)?;
        eprintln!(
            "wrote {}, {} and {}",
            out.join("eval.json").display(),
            out.join("eval.md").display(),
            out.join("replies.jsonl").display()
        );
    }
    let r = &ev.report;
    eprintln!(
        "{} items in {:.0}s; judge requests {} (cache hits {})",
        r.items, r.seconds, r.judge_requests, r.judge_cache_hits
    );
    Ok(())
}

fn exit(e: EvalError) -> Exit {
    let code = if e.is_usage() { 2 } else { 1 };
    Exit {
        code,
        err: e.into(),
    }
}

/// `ORG/NAME`: one slash, no leading dot or slash, no spaces.
fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}
