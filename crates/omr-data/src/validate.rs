//! `omr data validate`: the pre-flight pass that finds bad data before any GPU time is spent.
//!
//! It runs the exact training pipeline (same readers, decoders, processor and encoder) over
//! every record once, in file order, and reports counts by rejection reason plus histograms of
//! token lengths, image sizes and image tokens. Bad records go to `quarantine.jsonl` exactly
//! as they would during training; the budget decides the exit code (64 when exceeded).

use crate::loader::{Loader, LoaderConfig, LoaderError, Rank};
use crate::quarantine::{Quarantine, QuarantineError, Reason};
use crate::sample::{Encoded, Sample};
use crate::source::Source;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Power-of-two histogram: bucket `k` counts values in `[2^k, 2^(k+1))`, bucket 0 also holds 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub buckets: BTreeMap<u32, u64>,
    pub count: u64,
    pub sum: f64,
    pub min: Option<u64>,
    pub max: Option<u64>,
}

impl Histogram {
    pub fn add(&mut self, v: u64) {
        let k = if v == 0 { 0 } else { 63 - v.leading_zeros() };
        *self.buckets.entry(k).or_default() += 1;
        self.count += 1;
        self.sum += v as f64;
        self.min = Some(self.min.map_or(v, |m| m.min(v)));
        self.max = Some(self.max.map_or(v, |m| m.max(v)));
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    /// Text rendering: one line per bucket with a bar scaled to the largest bucket.
    pub fn render(&self, unit: &str) -> String {
        let top = self.buckets.values().copied().max().unwrap_or(0).max(1);
        let mut out = String::new();
        for (&k, &n) in &self.buckets {
            let lo = if k == 0 { 0 } else { 1u64 << k };
            let hi = (1u64 << (k + 1)) - 1;
            let bar = "#".repeat(((n * 40).div_ceil(top)) as usize);
            out.push_str(&format!("  {lo:>9}..{hi:<9} {unit:<6} {n:>8}  {bar}\n"));
        }
        out
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ValidateReport {
    pub sources: Vec<String>,
    pub records: u64,
    pub good: u64,
    pub bad: u64,
    pub bad_by_reason: BTreeMap<String, u64>,
    pub tokens: Histogram,
    pub supervised_tokens: Histogram,
    pub image_tokens: Histogram,
    /// Source image size in kilopixels (before resizing).
    pub image_kilopixels: Histogram,
    pub images: u64,
    pub over_budget: bool,
}

impl ValidateReport {
    pub fn render(&self) -> String {
        let mut s = format!(
            "records {}  good {}  bad {}  images {}\n",
            self.records, self.good, self.bad, self.images
        );
        if !self.bad_by_reason.is_empty() {
            s.push_str("bad records by reason:\n");
            for (r, n) in &self.bad_by_reason {
                s.push_str(&format!("  {r:<26} {n:>8}\n"));
            }
        }
        let stats = |h: &Histogram| {
            format!(
                "min {} mean {:.1} max {}",
                h.min.unwrap_or(0),
                h.mean(),
                h.max.unwrap_or(0)
            )
        };
        s.push_str(&format!(
            "tokens per sample ({}):\n{}",
            stats(&self.tokens),
            self.tokens.render("tok")
        ));
        s.push_str(&format!(
            "supervised tokens per sample ({}):\n{}",
            stats(&self.supervised_tokens),
            self.supervised_tokens.render("tok")
        ));
        s.push_str(&format!(
            "image tokens per sample ({}):\n{}",
            stats(&self.image_tokens),
            self.image_tokens.render("tok")
        ));
        s.push_str(&format!(
            "source image size ({}):\n{}",
            stats(&self.image_kilopixels),
            self.image_kilopixels.render("kpx")
        ));
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Quarantine(#[from] QuarantineError),
}

/// Runs `encode` over every record of every source once. Over budget is reported in the
/// report (`over_budget`), not as an error, so the caller prints the full picture first.
pub fn validate<F>(
    sources: Vec<Box<dyn Source>>,
    encode: F,
    image_token_id: u32,
    threads: usize,
    q: &mut Quarantine,
) -> Result<ValidateReport, ValidateError>
where
    F: Fn(&Sample) -> Result<Encoded, Reason> + Send + Sync + Clone + 'static,
{
    let mut report = ValidateReport::default();
    for source in sources {
        report.sources.push(source.name().to_string());
        let cfg = LoaderConfig {
            shuffle: false,
            max_epochs: Some(1),
            threads,
            ..Default::default()
        };
        let loader = Loader::new(vec![(source, 1.0)], cfg, Rank::SINGLE)?;
        for item in loader.stream(encode.clone()) {
            let item = item?;
            report.records += 1;
            match item.result {
                Ok(e) => {
                    q.record_good();
                    report.good += 1;
                    report.tokens.add(e.len() as u64);
                    report.supervised_tokens.add(e.supervised_tokens() as u64);
                    let img_tok = e.input_ids.iter().filter(|&&t| t == image_token_id).count();
                    report.image_tokens.add(img_tok as u64);
                    for &(h, w) in &e.image_sizes {
                        report.images += 1;
                        report.image_kilopixels.add((h as u64 * w as u64) / 1000);
                    }
                }
                Err(bad) => {
                    report.bad += 1;
                    *report
                        .bad_by_reason
                        .entry(bad.reason.code().to_string())
                        .or_default() += 1;
                    // Validation always finishes the pass: the budget is judged at the end.
                    if let Err(QuarantineError::Io { path, source }) = q.record_bad(&bad) {
                        return Err(QuarantineError::Io { path, source }.into());
                    }
                }
            }
        }
    }
    q.flush();
    report.over_budget = q.check_final().is_err();
    Ok(report)
}
