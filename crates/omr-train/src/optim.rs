//! AdamW with fp32 master weights and moments, per-part learning rates, gradient
//! accumulation and global-norm clipping: torch's `clip_grad_norm_` + `torch.optim.AdamW`.
//!
//! Why it is ours and not `candle_nn::AdamW` (CANDLE.md §4): candle keeps the moments in the
//! parameter's dtype, so bf16 updates below bf16 resolution vanish, and it has no parameter
//! groups or clipping. Here every moment is an f32 tensor and the update runs in f32.
//!
//! Notable choices:
//! - **Masters.** On the CPU the trainable `Var`s are f32 and *are* the masters: the update is
//!   written into them with `Var::set`, so every module sees it. A bf16 compute copy (CUDA,
//!   later) becomes a second field of `Slot` written after the master; until then a non-f32
//!   `Var` is refused with [`OptimError::Dtype`].
//! - **Candle ops or fused ops, one parameter at a time** ([`update`]). The reference update is
//!   plain elementwise candle ops (about ten allocating ops per parameter, any device); with
//!   [`AdamW::set_fused`] it is omr-kernels' `adamw_step` (one CUDA kernel per parameter) and
//!   the norm its `global_grad_norm`. Same bits on the CPU; the default is fused on CUDA only
//!   ([`AdamW::fused_default`]).
//! - **Determinism.** Parameters are visited in the order given (sorted HF names from
//!   `Params::trainable`), micro-batch gradients are summed in arrival order, and the global
//!   norm is an f64 sum in that same order: the same inputs give the same bits.
//! - **Non-finite gradients** (norm NaN or ∞) skip the step and touch nothing, so a trainer can
//!   log and carry on; no loss scaling is needed in bf16.
//! - **A parameter without a gradient** in a micro-batch counts as a zero gradient: its moments
//!   decay and its weight still moves (momentum, decay). torch instead skips a parameter whose
//!   `.grad` is `None`; with every trainable parameter in the graph the two agree.

mod accum;
mod config;
mod update;

pub use accum::GradAccum;
pub use config::{param_specs, OptimConfig, OptimError, ParamSpec, Result};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use omr_kernels::AdamWHyper;
use omr_model::params::Part;
use std::collections::{BTreeMap, HashMap};

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepOutcome {
    /// Weights updated. `grad_norm` is the global norm of the scaled gradients before clipping.
    Applied { grad_norm: f64, clipped: bool },
    /// The gradient norm was NaN or infinite: nothing changed, the step count included.
    NonFinite { grad_norm: f64 },
}

/// One parameter's optimizer state. The `Var` is the f32 master.
struct Slot {
    name: String,
    var: Var,
    /// The master's compute copy (see [`ParamSpec::copy`]).
    copy: Option<Var>,
    lr: f64,
    weight_decay: f64,
    /// exp_avg, f32, the parameter's shape. Replaced each step, except by the fused update on
    /// a GPU, which writes it in place: clones handed out by `state_tensors` are snapshots
    /// only until the next step.
    m: Tensor,
    /// exp_avg_sq, f32, the parameter's shape.
    v: Tensor,
}

pub struct AdamW {
    slots: Vec<Slot>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    max_grad_norm: f64,
    /// Applied steps so far (torch's `state["step"]`); bias corrections use it.
    t: u64,
    /// Update with omr-kernels' fused ops instead of candle ops.
    fused: bool,
    /// Calls of the fused ops so far (updates + norms): how a test tells which path ran.
    fused_calls: u64,
}

impl Slot {
    /// The tensor the gradient arrives on: the compute copy when there is one.
    fn grad_var(&self) -> &Var {
        self.copy.as_ref().unwrap_or(&self.var)
    }
}

impl AdamW {
    pub fn new(specs: Vec<ParamSpec>, cfg: &OptimConfig) -> Result<Self> {
        cfg.validate()?;
        let mut slots = Vec::with_capacity(specs.len());
        for s in specs {
            if s.var.dtype() != DType::F32 {
                return Err(OptimError::Dtype {
                    name: s.name,
                    dtype: s.var.dtype(),
                });
            }
            if !(s.lr.is_finite() && s.lr >= 0.0 && s.weight_decay.is_finite()) {
                return Err(OptimError::Arg(format!(
                    "parameter `{}`: lr {} / weight decay {} must be finite and lr >= 0",
                    s.name, s.lr, s.weight_decay
                )));
            }
            let m = s.var.as_tensor().zeros_like()?;
            let v = s.var.as_tensor().zeros_like()?;
            slots.push(Slot {
                name: s.name,
                var: s.var,
                copy: s.copy,
                lr: s.lr,
                weight_decay: s.weight_decay,
                m,
                v,
            });
        }
        let fused = slots
            .first()
            .is_some_and(|s| Self::fused_default(s.var.device()));
        Ok(AdamW {
            slots,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            max_grad_norm: cfg.max_grad_norm,
            t: 0,
            fused,
            fused_calls: 0,
        })
    }

    /// Whether parameters on `device` are best updated by the fused ops: on CUDA when this
    /// build has the kernels (feature `cuda`); on the CPU the candle ops are the reference and
    /// the fused CPU path only copies more. [`AdamW::new`] starts with this for its parameters'
    /// device.
    pub fn fused_default(device: &Device) -> bool {
        cfg!(feature = "cuda") && device.is_cuda()
    }

    /// Use omr-kernels' fused ops (`adamw_step`, `global_grad_norm`) for the following steps,
    /// or the candle ops. Either gives the same state format, so a run may switch at a resume.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    pub fn is_fused(&self) -> bool {
        self.fused
    }

    /// Calls of the fused ops so far: per applied step one norm and one update per non-empty
    /// parameter (a non-finite step: the norm only). 0 on the candle path.
    pub fn fused_calls(&self) -> u64 {
        self.fused_calls
    }

    /// An empty gradient accumulator for this optimizer's parameters, summing with the fused
    /// ops when the optimizer is fused now ([`AdamW::set_fused`]).
    pub fn grad_accum(&self) -> GradAccum {
        GradAccum::new(
            self.slots.iter().map(|s| s.name.clone()).collect(),
            self.slots.iter().map(|s| s.grad_var().clone()).collect(),
            self.fused,
        )
    }

    /// One step on the gradients of a single backward pass: an accumulator with one add.
    pub fn step(
        &mut self,
        grads: &GradStore,
        lr_factor: f64,
        grad_scale: f64,
    ) -> Result<StepOutcome> {
        let mut acc = self.grad_accum();
        acc.add(grads)?;
        self.step_accumulated(&mut acc, lr_factor, grad_scale)
    }

    /// One optimizer step on accumulated gradients, which it consumes: `acc` is left empty
    /// after an applied or a non-finite step, and as it was after an argument error.
    ///
    /// `lr_factor` is the schedule's multiplier in [0, 1]. `grad_scale` multiplies every
    /// gradient first (e.g. 1 / micro-batches, or 1 / tokens). Then, as torch: the global L2
    /// norm of all scaled gradients (f64 sums); NaN or ∞ → [`StepOutcome::NonFinite`] and no
    /// change at all. Else clip with coefficient `max_norm / (norm + 1e-6)` when that is below
    /// 1 (`clip_grad_norm_`, which thus clips from `max_norm - 1e-6` up), then AdamW:
    /// `p -= lr·wd·p; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
    ///  p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)`.
    pub fn step_accumulated(
        &mut self,
        acc: &mut GradAccum,
        lr_factor: f64,
        grad_scale: f64,
    ) -> Result<StepOutcome> {
        if !(0.0..=1.0).contains(&lr_factor) {
            return Err(OptimError::Arg(format!(
                "lr factor {lr_factor} is not in [0, 1]"
            )));
        }
        if !(grad_scale.is_finite() && grad_scale > 0.0) {
            return Err(OptimError::Arg(format!(
                "grad scale {grad_scale} is not finite and > 0"
            )));
        }
        if !acc.is_for(self.slots.iter().map(|s| s.grad_var())) {
            return Err(OptimError::Arg(
                "the gradient accumulator belongs to another optimizer".into(),
            ));
        }
        if acc.micro_batches() == 0 {
            return Err(OptimError::Arg("no gradients were accumulated".into()));
        }
        let sums = acc.take();

        let norm = if self.fused {
            self.fused_calls += 1;
            update::fused_norm(&sums)?
        } else {
            update::candle_norm(&sums)?
        };
        let grad_norm = norm * grad_scale;
        if !grad_norm.is_finite() {
            return Ok(StepOutcome::NonFinite { grad_norm });
        }
        let mut coef = grad_scale;
        let mut clipped = false;
        if self.max_grad_norm > 0.0 {
            let clip = self.max_grad_norm / (grad_norm + 1e-6);
            if clip < 1.0 {
                coef *= clip;
                clipped = true;
            }
        }

        self.t += 1;
        for (slot, sum) in self.slots.iter_mut().zip(sums) {
            if slot.var.elem_count() == 0 {
                continue;
            }
            let h = AdamWHyper {
                lr: slot.lr * lr_factor,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: slot.weight_decay,
                step: self.t,
                grad_coef: coef,
            };
            let p = slot.var.as_detached_tensor();
            if self.fused && p.device().is_cuda() {
                // One pass: master, moments and compute copy written where they are.
                self.fused_calls += 1;
                let copy = slot.copy.as_ref().map(|c| c.as_tensor());
                omr_kernels::adamw_step_in_place(&p, &slot.m, &slot.v, sum.as_ref(), &h, copy)?;
                continue;
            }
            let (p, m, v) = if self.fused {
                self.fused_calls += 1;
                update::fused_update(&p, &slot.m, &slot.v, sum.as_ref(), &h)?
            } else {
                update::candle_update(&p, &slot.m, &slot.v, sum.as_ref(), &h)?
            };
            slot.var.set(&p)?;
            if let Some(c) = &slot.copy {
                c.set(&p.to_dtype(c.dtype())?)?;
            }
            slot.m = m;
            slot.v = v;
        }
        Ok(StepOutcome::Applied { grad_norm, clipped })
    }

    /// Applied steps so far.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// The moments as `exp_avg.<name>` and `exp_avg_sq.<name>` (f32), for a checkpoint; with
    /// [`AdamW::steps`] they are the whole optimizer state. Snapshots: later steps do not
    /// change them.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            out.push((format!("exp_avg.{}", s.name), s.m.clone()));
            out.push((format!("exp_avg_sq.{}", s.name), s.v.clone()));
        }
        out
    }

    /// Restores what [`AdamW::state_tensors`] and [`AdamW::steps`] gave. Every moment must be
    /// present with the parameter's shape, and no moment may name a parameter this optimizer
    /// does not train; other keys are ignored. Checks everything before changing anything.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        let known: std::collections::HashSet<&str> =
            self.slots.iter().map(|s| s.name.as_str()).collect();
        let mut unknown: Vec<&String> = tensors
            .keys()
            .filter(|k| {
                let name = k
                    .strip_prefix("exp_avg.")
                    .or_else(|| k.strip_prefix("exp_avg_sq."));
                name.is_some_and(|n| !known.contains(n))
            })
            .collect();
        unknown.sort();
        if let Some(k) = unknown.first() {
            return Err(OptimError::UnexpectedState((*k).clone()));
        }
        let mut loaded = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let get = |key: String| -> Result<Tensor> {
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| OptimError::MissingState(key.clone()))?;
                if t.dims() != s.var.dims() || t.dtype() != DType::F32 {
                    return Err(OptimError::StateShape {
                        name: key,
                        expected: s.var.dims().to_vec(),
                        found: t.dims().to_vec(),
                        found_dtype: t.dtype(),
                    });
                }
                Ok(t.to_device(s.var.device())?.detach())
            };
            let m = get(format!("exp_avg.{}", s.name))?;
            let v = get(format!("exp_avg_sq.{}", s.name))?;
            loaded.push((m, v));
        }
        for (s, (m, v)) in self.slots.iter_mut().zip(loaded) {
            s.m = m;
            s.v = v;
        }
        self.t = steps;
        Ok(())
    }

    /// Peak learning rate of a parameter, `None` if it is not trained.
    pub fn lr_of(&self, name: &str) -> Option<f64> {
        self.slots.iter().find(|s| s.name == name).map(|s| s.lr)
    }

    /// Peak learning rate of each part that has trainable parameters (the first parameter's,
    /// which is every parameter's of that part when built by [`param_specs`]). Multiply by the
    /// schedule's factor for the current rate.
    pub fn group_lrs(&self) -> BTreeMap<Part, f64> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            out.entry(Part::of(&s.name)).or_insert(s.lr);
        }
        out
    }
}
