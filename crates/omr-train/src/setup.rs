//! Building the model a run trains from its `[model]` section: a pretrained folder / Hub id or
//! a seeded tiny model, then freezing and LoRA. Shared by `sft::run`, resume and
//! `omr export --checkpoint`, so a checkpoint's trainable tensors always land on the same
//! parameter set they were saved from.

use crate::config::{ModelInit, ModelSection};
use crate::error::{Result, TrainError};
use crate::optim::{param_specs, AdamW, OptimConfig};
use crate::runtime::Runtime;
use crate::state::TrainState;
use candle_core::{DType, Device, Tensor};
use omr_data::config::DataConfig;
use omr_data::loader::{Loader, Rank};
use omr_data::source;
use omr_model::config::ModelConfig;
use omr_model::params::{Params, Part};
use omr_model::tiny::TokenIds;
use omr_model::{lora, pretrained, Qwen2VL};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct Built {
    pub cfg: ModelConfig,
    pub params: Params,
    /// Tokenizer, chat template and preprocessor config.
    pub processor_dir: PathBuf,
    /// Where the base weights came from (a Hub id, a folder, or the tiny spec): the model
    /// card's `base_model` and the PEFT adapter's `base_model_name_or_path`.
    pub base_id: String,
    pub eos_token_ids: Vec<u32>,
}

/// Loads or initialises the model of `m`, in fp32 on `device`, with `seed` for LoRA's `A`.
pub fn build(m: &ModelSection, seed: u64, device: &Device) -> Result<Built> {
    let (cfg, mut params, processor_dir, base_id, eos) = match m.init {
        ModelInit::Pretrained => {
            let p = pretrained::load(&m.path, DType::F32, device)
                .map_err(|e| TrainError::Usage(format!("model.path = {:?}: {e}", m.path)))?;
            if !p.unexpected.is_empty() {
                tracing::warn!(
                    "{} tensors of {} are not used by the model (first: {})",
                    p.unexpected.len(),
                    p.dir.display(),
                    p.unexpected[0]
                );
            }
            let proc = if m.processor.is_empty() {
                p.dir.clone()
            } else {
                PathBuf::from(&m.processor)
            };
            let eos = omr_model::generate::eos_ids(&p.dir, &p.config.eos_token_ids);
            (p.config, p.params, proc, m.path.clone(), eos)
        }
        ModelInit::Tiny => {
            let proc = PathBuf::from(&m.processor);
            let ids = TokenIds::from_tokenizer_dir(&proc)
                .map_err(|e| TrainError::Usage(format!("model.processor: {e}")))?;
            let (cfg, params) = m.tiny.build(&ids, m.seed, device)?;
            let id = format!("omr tiny Qwen2.5-VL (seed {})", m.seed);
            (cfg, params, proc, id, ids.eos.clone())
        }
    };
    for (part, frozen) in [
        (Part::Vision, m.freeze_vision),
        (Part::Merger, m.freeze_merger),
        (Part::Language, m.freeze_language),
    ] {
        params.set_part_trainable(part, !frozen);
    }
    if let Some(l) = &m.lora {
        lora::apply(&mut params, &cfg, l, seed)
            .map_err(|e| TrainError::Usage(format!("model.lora: {e}")))?;
    }
    if params.trainable().next().is_none() {
        return Err(TrainError::Usage(
            "nothing to train: every part is frozen (model.freeze_*) and no LoRA".into(),
        ));
    }
    Ok(Built {
        cfg,
        params,
        processor_dir,
        base_id,
        eos_token_ids: eos,
    })
}

impl Built {
    /// The modules, running `rt`'s kernels. With mixed precision they hold the masters'
    /// compute copies, which the optimizer and a resume rewrite in place; only parameters
    /// without a copy are casts, and then (`params.casts_on_get()`) a run builds the modules
    /// again after every change of the masters.
    pub fn model(&self, rt: &Runtime) -> Result<Qwen2VL> {
        Ok(Qwen2VL::new(&self.cfg, &self.params)?.with_kernels(rt.kernels))
    }
}

/// AdamW over the trainable parameters of `params` (the fused update when `rt` uses the fused
/// kernels), and those parameters as tensors: what `Qwen2VL::forward_backward` differentiates.
pub fn optimizer(params: &Params, cfg: &OptimConfig, rt: &Runtime) -> Result<(AdamW, Vec<Tensor>)> {
    let trainable: Vec<_> = params
        .trainable()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    // With mixed precision the modules compute with the masters' compute copies: the
    // gradients are taken there.
    let wrt = trainable
        .iter()
        .map(|(n, v)| params.copy_of(n).unwrap_or(v).as_tensor().clone())
        .collect();
    let mut specs = param_specs(trainable, cfg);
    for s in &mut specs {
        s.copy = params.copy_of(&s.name).cloned();
    }
    let mut opt = AdamW::new(specs, cfg).map_err(|e| TrainError::Usage(format!("[optim]: {e}")))?;
    opt.set_fused(rt.fused_optimizer());
    Ok((opt, wrt))
}

/// The trainable tensors, by name (what a checkpoint's `weights.safetensors` holds).
pub fn trainable_tensors(params: &Params) -> Vec<(String, Tensor)> {
    params
        .trainable()
        .map(|(n, v)| (n.to_string(), v.as_tensor().detach()))
        .collect()
}

/// Sets every trainable parameter from `path` (shape-checked; a missing one is an error).
pub fn restore_trainable(params: &Params, path: &Path, device: &Device) -> Result<()> {
    let saved: HashMap<String, Tensor> = candle_core::safetensors::load(path, device)?;
    for (name, var) in params.trainable() {
        let t = saved.get(name).ok_or_else(|| {
            TrainError::Usage(format!(
                "{}: no tensor {name}; the checkpoint was made with another model or LoRA setup",
                path.display()
            ))
        })?;
        if t.dims() != var.dims() {
            return Err(TrainError::Usage(format!(
                "{}: {name} has shape {:?}, the model expects {:?}",
                path.display(),
                t.dims(),
                var.dims()
            )));
        }
        var.set(t)?;
    }
    params.sync_copies()?;
    Ok(())
}

/// sha256 of a resolved config: what every rank of a data-parallel run must agree on.
pub fn fingerprint(resolved: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(resolved.as_bytes()).into()
}

/// A checkpoint's resume state for rank `rank` of `world`: rank 0 keeps it; another rank takes
/// its own data cursor and counters from `ranks`. A checkpoint of another number of
/// processes is refused: the data stripes would not line up.
pub fn rank_state(mut st: TrainState, rank: usize, world: usize, dir: &Path) -> Result<TrainState> {
    let saved_world = st.ranks.len() + 1;
    if saved_world != world {
        return Err(TrainError::Usage(format!(
            "{}: written by a run of {saved_world} process(es), this run has {world}; resume with \
             {saved_world} (WORLD_SIZE / SLURM_NTASKS), or start a new run directory",
            dir.display()
        )));
    }
    if rank > 0 {
        st.stripe = st.ranks[rank - 1].clone();
    }
    Ok(st)
}

/// The loader over every source of `data`, reading the stripe of `rank` with `threads`
/// workers (`data.loader.threads` or what a data-parallel process takes for 0).
pub fn open_loader(data: &DataConfig, rank: Rank, threads: usize) -> Result<Loader> {
    let mut sources = Vec::new();
    for spec in &data.sources {
        let src = source::open(spec).map_err(|e| TrainError::Usage(e.to_string()))?;
        sources.push((src, spec.weight));
    }
    let cfg = omr_data::loader::LoaderConfig {
        threads,
        ..data.loader.clone()
    };
    Loader::new(sources, cfg, rank).map_err(|e| TrainError::Usage(e.to_string()))
}
