//! `omr data batches`: what the trainer will see, without training. Streams batches from a
//! `[data]` config (weighted mixture, seeded shuffle, rank striping from the environment,
//! padding or packing) and prints one fixed-format line per batch, then the per-source mix.

use crate::data::BatchesArgs;
use crate::exit::{Exit, Tag};
use omr_data::batcher::{BatchError, Batcher};
use omr_data::config::DataConfig;
use omr_data::loader::{Loader, Rank};
use omr_data::pipeline::Processor;
use omr_data::quarantine::{Quarantine, QuarantineError};
use omr_data::source;
use std::collections::BTreeMap;
use std::sync::Arc;

pub fn run(a: &BatchesArgs) -> crate::Result<()> {
    let cfg = DataConfig::from_file(&a.config).usage()?;
    let processor = Arc::new(Processor::from_model_dir(&a.model, &cfg.process).usage()?);
    let mut sources = Vec::new();
    for spec in &cfg.sources {
        sources.push((source::open(spec).usage()?, spec.weight));
    }
    let rank = Rank::from_env();
    let loader = Loader::new(sources, cfg.loader.clone(), rank).usage()?;
    let mut q = Quarantine::new(Some(&a.quarantine), cfg.quarantine.clone())?;
    let p = processor.clone();
    let stream = loader.stream(move |s| p.encode(s));
    let mut batcher = Batcher::new(
        stream,
        loader.state().clone(),
        cfg.batch.clone(),
        processor.pad_id(),
    );
    let mut per_source: BTreeMap<String, u64> = BTreeMap::new();
    println!(
        "rank {}/{}  mode {:?}  batch_size {}",
        rank.rank, rank.world, cfg.batch.mode, cfg.batch.batch_size
    );
    for step in 1..=a.steps {
        let next = batcher.next_batch(&mut q).map_err(|e| match e {
            BatchError::Quarantine(QuarantineError::OverBudget { .. }) => Exit::bad_data(e),
            other => Exit::from(other),
        })?;
        let Some((batch, state)) = next else {
            println!("data exhausted after {} batches", step - 1);
            break;
        };
        for row in &batch.origins {
            for o in row {
                *per_source.entry(o.source.clone()).or_default() += 1;
            }
        }
        let fill = batch.tokens() as f64 / (batch.rows * batch.seq_len).max(1) as f64;
        let epochs: Vec<String> = state
            .sources
            .iter()
            .map(|c| format!("{}:{}", c.epoch, c.pos))
            .collect();
        println!(
            "batch {step:>4} | rows {} | T {} | samples {:>3} | tokens {:>6} | fill {:>5.1}% | supervised {:>6} | images {:>3} | bad {} | cursor {}",
            batch.rows,
            batch.seq_len,
            batch.samples(),
            batch.tokens(),
            fill * 100.0,
            batch.supervised_tokens(),
            batch.image_grid_thw.len(),
            q.bad,
            epochs.join(",")
        );
    }
    let total: u64 = per_source.values().sum();
    println!(
        "samples by source (weights {:?}):",
        cfg.sources.iter().map(|s| s.weight).collect::<Vec<_>>()
    );
    for (s, n) in &per_source {
        println!(
            "  {s:<50} {n:>6} ({:.1}%)",
            100.0 * *n as f64 / total.max(1) as f64
        );
    }
    Ok(())
}
