//! The parameters of a model: one `Var` per HF tensor name, in sorted (BTreeMap) order so
//! every process iterates them identically (candle's `VarMap` does not, CANDLE.md §5).
//!
//! Each parameter is either trainable or frozen. Modules are built from [`Params::get`], which
//! hands out the `Var` itself for a trainable parameter and a detached view of the same storage
//! for a frozen one, so frozen weights never enter candle's graph as variables and the
//! optimizer's in-place updates stay visible to every module. Changing what is trainable means
//! rebuilding the modules (cheap: tensors are shared, nothing is copied).

use crate::config::{Arch, ModelConfig};
use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// The three parts that can be frozen and given their own learning rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// `visual.*` except the merger.
    Vision,
    /// `visual.merger.*`: the projector into the language model.
    Merger,
    /// `model.*` and `lm_head.*`.
    Language,
}

impl Part {
    pub fn of(name: &str) -> Part {
        if name.starts_with("visual.merger.") {
            Part::Merger
        } else if name.starts_with("visual.") {
            Part::Vision
        } else {
            Part::Language
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Part::Vision => "vision",
            Part::Merger => "merger",
            Part::Language => "language_model",
        }
    }
}

/// Whether weight decay applies: matrices yes; norms, biases and embeddings no.
pub fn decays(name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2 && !name.contains("embed_tokens") && !name.ends_with(".bias")
}

struct Entry {
    var: Var,
    trainable: bool,
    /// With mixed precision, a trainable master's copy in the compute dtype: what modules
    /// compute with and where the gradient lands; the optimizer writes it with each update.
    copy: Option<Var>,
}

pub struct Params {
    entries: BTreeMap<String, Entry>,
    /// Set when LoRA adapters were added ([`crate::lora::apply`]): their rank, alpha, dropout.
    pub lora: Option<crate::lora::LoraConfig>,
    device: Device,
    dtype: DType,
    /// What modules compute in ([`Params::set_compute_dtype`]); `dtype` unless set.
    compute: DType,
}

impl Params {
    /// Builds from named tensors (all trainable until frozen).
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        device: &Device,
        dtype: DType,
    ) -> Result<Params> {
        let mut entries = BTreeMap::new();
        for (name, t) in tensors {
            let var = Var::from_tensor(&t.to_device(device)?.to_dtype(dtype)?)?;
            entries.insert(
                name,
                Entry {
                    var,
                    trainable: true,
                    copy: None,
                },
            );
        }
        Ok(Params {
            entries,
            lora: None,
            device: device.clone(),
            dtype,
            compute: dtype,
        })
    }

    /// Seeded initialisation of every parameter of `cfg` (see [`param_shapes`]): matrices
    /// N(0, std), biases 0, norm weights 1, as transformers' `_init_weights` does. Each tensor
    /// draws from its own ChaCha stream keyed by (seed, name), so adding a tensor never shifts
    /// the values of the others, and the result is the same on every machine.
    pub fn init(cfg: &ModelConfig, seed: u64, std: f64, device: &Device) -> Result<Params> {
        use rayon::prelude::*;
        // One tensor per task (a 7B model draws 8e9 normals: minutes on one core).
        let tensors = param_shapes(cfg).into_par_iter().map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if shape.len() == 1 {
                vec![1.0; n]
            } else {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(name.as_bytes()));
                (0..n).map(|_| (normal(&mut rng) * std) as f32).collect()
            };
            Ok((name, Tensor::from_vec(values, shape, &Device::Cpu)?))
        });
        let tensors = tensors.collect::<Result<Vec<_>>>()?;
        Params::from_tensors(tensors, device, DType::F32)
    }

    /// The tensor modules compute with: the `Var` when trainable, else a detached view; in
    /// the compute dtype. With mixed precision (compute ≠ the masters' dtype) a trainable
    /// parameter is its compute copy (a `Var` of its own, [`Params::copy_of`]: the gradient
    /// lands there in the compute dtype and the optimizer rewrites the copy with each update);
    /// one made trainable after [`Params::set_compute_dtype`] is a tracked cast of its master
    /// instead, a snapshot: modules must then be rebuilt after each optimizer step
    /// ([`Params::casts_on_get`]).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::Input(format!("the model has no parameter `{name}`")))?;
        if let (true, Some(c)) = (e.trainable, &e.copy) {
            return Ok(c.as_tensor().clone());
        }
        let t = if e.trainable {
            e.var.as_tensor().clone()
        } else {
            e.var.as_tensor().detach()
        };
        Ok(t.to_dtype(self.compute)?)
    }

    /// Mixed precision: modules compute in `compute` (bf16, say) while trainable parameters
    /// stay masters in their own dtype (f32) for the optimizer. Frozen parameters are
    /// converted to `compute` now (they are never stepped: half the memory in bf16), so set
    /// what is trainable first. Parameters made trainable later keep the compute dtype.
    ///
    /// Each trainable master gets its compute copy now ([`Params::copy_of`]).
    pub fn set_compute_dtype(&mut self, compute: DType) -> Result<()> {
        for e in self.entries.values_mut() {
            if !e.trainable && e.var.dtype() != compute {
                e.var = Var::from_tensor(&e.var.as_tensor().to_dtype(compute)?)?;
            }
            e.copy = if e.trainable && e.var.dtype() != compute {
                Some(Var::from_tensor(&e.var.as_tensor().to_dtype(compute)?)?)
            } else {
                None
            };
        }
        self.compute = compute;
        Ok(())
    }

    /// The compute copy of a trainable master (mixed precision), which the optimizer must
    /// keep equal to the master rounded to the compute dtype.
    pub fn copy_of(&self, name: &str) -> Option<&Var> {
        self.entries
            .get(name)
            .filter(|e| e.trainable)
            .and_then(|e| e.copy.as_ref())
    }

    /// Rewrites every compute copy from its master: after the masters were set other than by
    /// the optimizer (a checkpoint restored into them).
    pub fn sync_copies(&self) -> Result<()> {
        for e in self.entries.values() {
            if let Some(c) = &e.copy {
                c.set(&e.var.as_tensor().to_dtype(c.dtype())?)?;
            }
        }
        Ok(())
    }

    /// The dtype modules compute in.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// Whether [`Params::get`] casts some trainable parameter, i.e. modules hold copies of
    /// the masters and must be rebuilt to see an optimizer step.
    pub fn casts_on_get(&self) -> bool {
        self.entries
            .values()
            .any(|e| e.trainable && e.var.dtype() != self.compute && e.copy.is_none())
    }

    pub fn var(&self, name: &str) -> Option<&Var> {
        self.entries.get(name).map(|e| &e.var)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn insert(&mut self, name: String, t: &Tensor, trainable: bool) -> Result<()> {
        let var = Var::from_tensor(&t.to_device(&self.device)?.to_dtype(self.dtype)?)?;
        self.entries.insert(
            name,
            Entry {
                var,
                trainable,
                copy: None,
            },
        );
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Option<Var> {
        self.entries.remove(name).map(|e| e.var)
    }

    /// Marks every parameter whose name satisfies `pred` trainable (true) or frozen (false).
    pub fn set_trainable(&mut self, pred: impl Fn(&str) -> bool, trainable: bool) {
        for (name, e) in self.entries.iter_mut() {
            if pred(name) {
                e.trainable = trainable;
                if !trainable {
                    e.copy = None;
                }
            }
        }
    }

    /// Freezes or unfreezes one part.
    pub fn set_part_trainable(&mut self, part: Part, trainable: bool) {
        self.set_trainable(|n| Part::of(n) == part, trainable);
    }

    pub fn is_trainable(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|e| e.trainable)
    }

    /// All parameters in sorted name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|(n, e)| (n.as_str(), &e.var))
    }

    /// Trainable parameters in sorted name order: what the optimizer steps.
    pub fn trainable(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.trainable)
            .map(|(n, e)| (n.as_str(), &e.var))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of scalars, all and trainable.
    pub fn counts(&self) -> (usize, usize) {
        let mut all = 0;
        let mut train = 0;
        for e in self.entries.values() {
            let n = e.var.elem_count();
            all += n;
            if e.trainable {
                train += n;
            }
        }
        (all, train)
    }
}

/// Every parameter of a config with its shape, in the HF checkpoint names. The single list
/// that loading, initialisation and export agree on.
pub fn param_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut p = |name: String, shape: &[usize]| out.push((name, shape.to_vec()));
    let v = &cfg.vision;
    let hv = v.hidden_size;
    let iv = v.intermediate_size;
    p(
        "visual.patch_embed.proj.weight".into(),
        &[
            hv,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ],
    );
    for i in 0..v.depth {
        let b = format!("visual.blocks.{i}");
        p(format!("{b}.norm1.weight"), &[hv]);
        p(format!("{b}.norm2.weight"), &[hv]);
        if cfg.arch == Arch::Qwen2Vl {
            p(format!("{b}.norm1.bias"), &[hv]);
            p(format!("{b}.norm2.bias"), &[hv]);
        }
        p(format!("{b}.attn.qkv.weight"), &[3 * hv, hv]);
        p(format!("{b}.attn.qkv.bias"), &[3 * hv]);
        p(format!("{b}.attn.proj.weight"), &[hv, hv]);
        p(format!("{b}.attn.proj.bias"), &[hv]);
        match cfg.arch {
            Arch::Qwen25Vl => {
                for m in ["gate_proj", "up_proj"] {
                    p(format!("{b}.mlp.{m}.weight"), &[iv, hv]);
                    p(format!("{b}.mlp.{m}.bias"), &[iv]);
                }
                p(format!("{b}.mlp.down_proj.weight"), &[hv, iv]);
                p(format!("{b}.mlp.down_proj.bias"), &[hv]);
            }
            Arch::Qwen2Vl => {
                p(format!("{b}.mlp.fc1.weight"), &[iv, hv]);
                p(format!("{b}.mlp.fc1.bias"), &[iv]);
                p(format!("{b}.mlp.fc2.weight"), &[hv, iv]);
                p(format!("{b}.mlp.fc2.bias"), &[hv]);
            }
        }
    }
    let merged = hv * v.merge_unit();
    p("visual.merger.ln_q.weight".into(), &[hv]);
    if cfg.arch == Arch::Qwen2Vl {
        p("visual.merger.ln_q.bias".into(), &[hv]);
    }
    p("visual.merger.mlp.0.weight".into(), &[merged, merged]);
    p("visual.merger.mlp.0.bias".into(), &[merged]);
    p(
        "visual.merger.mlp.2.weight".into(),
        &[v.out_hidden_size, merged],
    );
    p("visual.merger.mlp.2.bias".into(), &[v.out_hidden_size]);

    let t = &cfg.text;
    let c = t.hidden_size;
    let q = t.num_attention_heads * t.head_dim;
    let kv = t.num_key_value_heads * t.head_dim;
    p("model.embed_tokens.weight".into(), &[t.vocab_size, c]);
    for i in 0..t.num_hidden_layers {
        let l = format!("model.layers.{i}");
        p(format!("{l}.input_layernorm.weight"), &[c]);
        p(format!("{l}.post_attention_layernorm.weight"), &[c]);
        p(format!("{l}.self_attn.q_proj.weight"), &[q, c]);
        p(format!("{l}.self_attn.q_proj.bias"), &[q]);
        p(format!("{l}.self_attn.k_proj.weight"), &[kv, c]);
        p(format!("{l}.self_attn.k_proj.bias"), &[kv]);
        p(format!("{l}.self_attn.v_proj.weight"), &[kv, c]);
        p(format!("{l}.self_attn.v_proj.bias"), &[kv]);
        p(format!("{l}.self_attn.o_proj.weight"), &[c, q]);
        p(
            format!("{l}.mlp.gate_proj.weight"),
            &[t.intermediate_size, c],
        );
        p(format!("{l}.mlp.up_proj.weight"), &[t.intermediate_size, c]);
        p(
            format!("{l}.mlp.down_proj.weight"),
            &[c, t.intermediate_size],
        );
    }
    p("model.norm.weight".into(), &[c]);
    if !cfg.tie_word_embeddings {
        p("lm_head.weight".into(), &[t.vocab_size, c]);
    }
    out.sort();
    out
}

/// One standard normal draw (Box–Muller), so the init needs no extra crate.
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
