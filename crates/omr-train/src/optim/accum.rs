//! Gradient accumulation: the gradients of several micro-batches summed into owned f32 tensors,
//! one per trainable parameter, consumed by one optimizer step.
//!
//! Gradients are detached before they are kept (CANDLE.md §4: otherwise a later backward pass
//! leaks gradient into them) and summed in arrival order, so the sums are the same bits on
//! every run. The first micro-batch's gradient is kept as it came (no copy; bf16 on a compute
//! copy); the second makes a new f32 sum; from the third on, a fused accumulator on CUDA adds
//! into that sum where it is (`omr_kernels::grad_add_in_place`: 10 bytes per element of a bf16
//! gradient against the 18 of candle's cast, add and new tensor). Candle ops and the fused
//! ops give the same bits (exact casts, one f32 addition). A step takes the sums and leaves
//! the accumulator empty.

use super::{OptimError, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Gradients summed over the micro-batches of one optimizer step: one owned f32 tensor per
/// trainable parameter, in the optimizer's order. Made by [`super::AdamW::grad_accum`].
pub struct GradAccum {
    names: Vec<String>,
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    /// Per parameter: whether its sum is a tensor this accumulator made (two or more
    /// gradients), which it may then write in place; a single gradient is the backward's.
    owned: Vec<bool>,
    micro_batches: usize,
    /// Sum with omr-kernels' `grad_sum` / `grad_add_in_place` instead of candle ops.
    fused: bool,
    fused_adds: u64,
}

impl GradAccum {
    pub(super) fn new(names: Vec<String>, vars: Vec<Var>, fused: bool) -> GradAccum {
        GradAccum {
            sums: vec![None; vars.len()],
            owned: vec![false; vars.len()],
            names,
            vars,
            micro_batches: 0,
            fused,
            fused_adds: 0,
        }
    }

    /// Additions done by the fused ops so far (0 on the candle path): how a test tells which
    /// path ran.
    pub fn fused_adds(&self) -> u64 {
        self.fused_adds
    }

    /// Whether this accumulator was made for exactly these parameters, in this order.
    pub(super) fn is_for<'a>(&self, vars: impl ExactSizeIterator<Item = &'a Var>) -> bool {
        self.vars.len() == vars.len() && self.vars.iter().zip(vars).all(|(a, b)| a.id() == b.id())
    }

    /// The sums (`None`: no micro-batch had a gradient for that parameter), leaving it empty.
    pub(super) fn take(&mut self) -> Vec<Option<Tensor>> {
        self.micro_batches = 0;
        self.owned.iter_mut().for_each(|o| *o = false);
        std::mem::replace(&mut self.sums, vec![None; self.vars.len()])
    }

    /// Adds one micro-batch's gradients (from `loss.backward()`), detached, in call order. A
    /// gradient of the wrong shape is an error that leaves the accumulator as it was.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        let mut found = Vec::with_capacity(self.vars.len());
        for (name, var) in self.names.iter().zip(&self.vars) {
            let g = grads.get(var.as_tensor());
            if let Some(g) = g {
                if g.dims() != var.dims() {
                    return Err(OptimError::GradShape {
                        name: name.clone(),
                        expected: var.dims().to_vec(),
                        found: g.dims().to_vec(),
                    });
                }
            }
            found.push(g);
        }
        for ((sum, owned), g) in self.sums.iter_mut().zip(&mut self.owned).zip(found) {
            let Some(g) = g else { continue };
            // A single micro-batch's gradient stays in its dtype (bf16 on a compute copy: the
            // update reads it as is, exactly as its f32 cast); sums are f32.
            let g = g.detach();
            let prev = sum.take();
            let was_owned = std::mem::replace(owned, prev.is_some());
            *sum = Some(match prev {
                None => g,
                Some(s) if !self.fused => s.to_dtype(DType::F32)?.add(&g.to_dtype(DType::F32)?)?,
                Some(s) if was_owned && s.device().is_cuda() => {
                    self.fused_adds += 1;
                    omr_kernels::grad_add_in_place(&s, &g)?;
                    s
                }
                Some(s) => {
                    self.fused_adds += 1;
                    omr_kernels::grad_sum(&s, &g)?
                }
            });
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Replaces the parameters' sums by `f(vars, sums)`, both in the optimizer's order (e.g.
    /// the sums over the processes of a data-parallel run); the results count as this
    /// accumulator's.
    pub fn map_all_sums<E>(
        &mut self,
        f: impl FnOnce(&[Var], Vec<Option<Tensor>>) -> std::result::Result<Vec<Option<Tensor>>, E>,
    ) -> std::result::Result<(), E> {
        let taken = std::mem::replace(&mut self.sums, vec![None; self.vars.len()]);
        let sums = f(&self.vars, taken)?;
        assert_eq!(sums.len(), self.vars.len(), "one sum per parameter");
        self.owned = sums.iter().map(Option::is_some).collect();
        self.sums = sums;
        // Sums that came from elsewhere count, even where this process had no micro-batch.
        if self.sums.iter().any(Option::is_some) {
            self.micro_batches = self.micro_batches.max(1);
        }
        Ok(())
    }

    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Drops the sums (e.g. after a skipped step); the optimizer's steps do this themselves.
    pub fn clear(&mut self) {
        self.sums.iter_mut().for_each(|s| *s = None);
        self.micro_batches = 0;
    }
}
