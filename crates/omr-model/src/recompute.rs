//! Forward + backward with activation checkpointing: the decoder layers and/or the vision
//! blocks keep only their inputs in the forward and are recomputed, one at a time, in the
//! backward.
//!
//! candle has no checkpointing hook (its backward walks one graph built by the forward), so the
//! backward is run segment by segment instead. The forward runs each checkpointed block on a
//! detached input and detaches its output, so the block's graph (its activations) is dropped
//! as soon as the next block starts; only the block inputs are kept. The backward then goes
//! through the segments in reverse: the head (final norm + the caller's loss) on the last
//! block's output as a leaf variable gives `dL/dx_L`; block i is recomputed from its saved input
//! (a leaf variable again) and `Σ(out · dL/dout)` is back-propagated, which yields the block's
//! parameter gradients and `dL/dx_{i-1}`. The gradients of the trainable tensors are summed
//! over the segments into one [`GradStore`].
//!
//! The recomputed forward is the same computation on the same values, with the same dropout
//! masks (they depend on (seed, layer name), see [`Ctx`]), so the gradients equal those of the
//! plain backward (tests/recompute.rs). The cost is one more forward of every checkpointed
//! block; the saving is all of its activations but its input. On the fused path the first
//! forward also keeps each block's attention output and log-sum-exp, and the recompute replays
//! them ([`crate::kept_attn`]) unless [`Recompute::attention`] asks for the attention again.

use crate::error::Result;
use crate::kept_attn::{self, Kept};
use crate::linear::Ctx;
use crate::model::{Input, Qwen2VL};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Which stacks recompute their blocks in the backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recompute {
    pub vision: bool,
    pub decoder: bool,
    /// Recompute the attentions of those blocks too. Off (the default), a recomputed block
    /// replays the attention outputs its first forward kept ([`crate::kept_attn`], fused path):
    /// one attention forward less per block, for its output and row log-sum-exp kept.
    pub attention: bool,
    /// With `decoder`: the last `decoder_kept` decoder layers keep their activations and are
    /// not recomputed (the rest are). 0: every layer is recomputed; the layer count or more:
    /// none is (as without `decoder`). Memory left over by full checkpointing buys back the
    /// recompute of that many layers.
    pub decoder_kept: usize,
}

impl Recompute {
    pub const NONE: Recompute = Recompute {
        vision: false,
        decoder: false,
        attention: false,
        decoder_kept: 0,
    };
    pub const ALL: Recompute = Recompute {
        vision: true,
        decoder: true,
        attention: false,
        decoder_kept: 0,
    };

    /// The same, keeping the last `n` decoder layers' activations (not recomputed).
    pub fn keeping_decoder_layers(self, n: usize) -> Recompute {
        Recompute {
            decoder_kept: n,
            ..self
        }
    }

    /// The same stacks, recomputing their attentions too (`true`) or keeping them.
    pub fn with_attention(self, recompute: bool) -> Recompute {
        Recompute {
            attention: recompute,
            ..self
        }
    }

    /// Runs a checkpointed block's first forward: recording its attentions unless they are
    /// recomputed.
    fn first_forward<R>(self, f: impl FnOnce() -> R) -> (R, Vec<Kept>) {
        if self.attention {
            (f(), Vec::new())
        } else {
            kept_attn::record(f)
        }
    }

    /// Runs a checkpointed block's recompute with what [`Self::first_forward`] kept.
    fn again<R>(
        self,
        kept: Vec<Kept>,
        f: impl FnOnce() -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        if self.attention {
            f()
        } else {
            kept_attn::replay(kept, f)
        }
    }
}

/// What one forward + backward gives back.
pub struct Backward {
    /// The loss value (the scalar `head` returned).
    pub loss: f64,
    /// The gradients of the `wrt` tensors that took part; `None` when the loss is not finite
    /// (no backward was run).
    pub grads: Option<GradStore>,
}

/// Gradients of `wrt`, summed over segments.
struct Collected<'a> {
    wrt: &'a [Tensor],
    store: GradStore,
}

impl Collected<'_> {
    fn take(&mut self, mut part: GradStore) -> Result<()> {
        for t in self.wrt {
            if let Some(g) = part.remove(t) {
                let g = g.detach();
                let sum = match self.store.remove(t) {
                    Some(s) => (s + g)?,
                    None => g,
                };
                self.store.insert(t, sum);
            }
        }
        Ok(())
    }
}

/// What a recomputing vision tower keeps from its forward for the backward.
struct VisionSaved {
    /// The patch embedding (with its graph, when it trains).
    x0: Tensor,
    run: crate::vision::VisionRun,
    /// Each block's input and the attentions its forward kept.
    blocks: Vec<(Tensor, Vec<Kept>)>,
    /// The merger's input as a leaf: its gradient starts the tower's backward.
    merge_in: Var,
    recompute: Recompute,
}

/// Back-propagates `Σ(out · g)` from a recomputed `out`: the gradient `g` flowing into `out`.
fn backward_through(out: &Tensor, g: &Tensor) -> Result<GradStore> {
    Ok(omr_kernels::grad_sink::backward(
        &(out * g.to_dtype(out.dtype())?)?.sum_all()?,
    )?)
}

fn leaf(t: &Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t.detach())?)
}

impl Qwen2VL {
    /// The loss `head(final hidden states (B, T, C))` and, when it is finite, its gradients
    /// with respect to `wrt` (the trainable tensors), recomputing the stacks `recompute` names.
    /// With [`Recompute::NONE`] this is `head(hidden(input))` and one `backward()`.
    /// `head` must return a scalar; it may be called with a leaf in place of the hidden states.
    pub fn forward_backward<E>(
        &self,
        input: &Input,
        ctx: &Ctx,
        recompute: Recompute,
        wrt: &[Tensor],
        mut head: impl FnMut(&Tensor) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Backward, E>
    where
        E: From<crate::ModelError>,
    {
        let mut out = Collected {
            wrt,
            store: GradStore::default(),
        };
        let mut prof = Prof::new(self.device());

        // ---- vision: features, keeping only the block inputs when recomputing --------------
        let mut vision_saved = None;
        let feats = match &input.pixel_values {
            None => None,
            Some(pv) if !recompute.vision => Some(self.image_features(pv, &input.grids, ctx)?),
            Some(pv) => {
                let (x0, run) = self
                    .vision
                    .embed(pv, &input.grids, ctx)
                    .map_err(crate::ModelError::from)?;
                let mut trains = x0.track_op();
                let mut saved = Vec::with_capacity(self.vision.num_blocks() + 1);
                let mut x = x0.detach();
                for i in 0..self.vision.num_blocks() {
                    let (y, kept) = recompute.first_forward(|| self.vision.block(i, &x, &run, ctx));
                    let y = y.map_err(crate::ModelError::from)?;
                    trains |= y.track_op();
                    saved.push((x, kept));
                    x = y.detach();
                }
                // Below the merger only when something there trains: then the merger runs on a
                // leaf whose gradient continues the backward.
                let (feats, merge_in) = if trains {
                    let v = leaf(&x)?;
                    (
                        self.vision
                            .merge(v.as_tensor(), &run, ctx)
                            .map_err(crate::ModelError::from)?,
                        Some(v),
                    )
                } else {
                    (
                        self.vision
                            .merge(&x, &run, ctx)
                            .map_err(crate::ModelError::from)?,
                        None,
                    )
                };
                if let Some(v) = merge_in {
                    vision_saved = Some(VisionSaved {
                        x0,
                        run,
                        blocks: saved,
                        merge_in: v,
                        recompute,
                    });
                }
                Some(feats)
            }
        };
        mark(&mut prof, "vision forward");
        let h0 = self.embed_with(input, feats.as_ref())?;

        // ---- decoder -------------------------------------------------------------------------
        let p = input.positions(&self.cfg)?;
        let tables = self.decoder_tables(&p.pos, &input.segments, &h0, ctx)?;
        mark(&mut prof, "embedding + rotary tables");
        let text = &self.text;
        let head_from =
            |x: &Tensor, head: &mut dyn FnMut(&Tensor) -> std::result::Result<Tensor, E>| {
                let h = text.final_norm(x, ctx).map_err(crate::ModelError::from)?;
                head(&h)
            };
        let mut g; // dL/d(h0)
        if !recompute.decoder {
            let mut x = h0.clone();
            for i in 0..text.num_layers() {
                x = text
                    .layer(i, &x, &tables, ctx)
                    .map_err(crate::ModelError::from)?;
            }
            let loss = head_from(&x, &mut head)?;
            let value = scalar(&loss)?;
            if !value.is_finite() {
                return Ok(Backward {
                    loss: value,
                    grads: None,
                });
            }
            let mut grads =
                omr_kernels::grad_sink::backward(&loss).map_err(crate::ModelError::from)?;
            let Some(VisionSaved { merge_in: v, .. }) = &vision_saved else {
                out.take(grads)?;
                return Ok(Backward {
                    loss: value,
                    grads: Some(out.store),
                });
            };
            g = grads.remove(v.as_tensor());
            out.take(grads)?;
            return self
                .vision_backward(vision_saved, g, ctx, &mut out)
                .map(|()| Backward {
                    loss: value,
                    grads: Some(out.store),
                })
                .map_err(E::from);
        }
        // Layers [0, n) are recomputed; the last decoder_kept keep their graph and go with the
        // head into the first backward.
        let n = text.num_layers() - recompute.decoder_kept.min(text.num_layers());
        let mut saved = Vec::with_capacity(n);
        let mut x = h0.detach();
        for i in 0..n {
            let (y, kept) = recompute.first_forward(|| text.layer(i, &x, &tables, ctx));
            let y = y.map_err(crate::ModelError::from)?;
            saved.push((x, kept));
            x = y.detach();
        }
        mark(&mut prof, "decoder forward (inputs kept)");
        let last = leaf(&x)?;
        drop(x);
        let mut top = last.as_tensor().clone();
        for i in n..text.num_layers() {
            top = text
                .layer(i, &top, &tables, ctx)
                .map_err(crate::ModelError::from)?;
        }
        if n < text.num_layers() {
            mark(&mut prof, "decoder forward (activations kept)");
        }
        let loss = head_from(&top, &mut head)?;
        drop(top);
        let value = scalar(&loss)?;
        mark(&mut prof, "head forward (norm, lm head, loss)");
        if !value.is_finite() {
            return Ok(Backward {
                loss: value,
                grads: None,
            });
        }
        let mut grads = omr_kernels::grad_sink::backward(&loss).map_err(crate::ModelError::from)?;
        drop(loss);
        g = grads.remove(last.as_tensor());
        out.take(grads)?;
        drop(last);
        mark(
            &mut prof,
            if n < text.num_layers() {
                "head + kept layers backward"
            } else {
                "head backward"
            },
        );
        while let Some((x, kept)) = saved.pop() {
            let i = saved.len();
            let Some(gi) = g.take() else { break };
            let v = leaf(&x)?;
            drop(x);
            let y = recompute
                .again(kept, || text.layer(i, v.as_tensor(), &tables, ctx))
                .map_err(crate::ModelError::from)?;
            mark(&mut prof, "decoder layers: recompute");
            let mut grads = backward_through(&y, &gi)?;
            g = grads.remove(v.as_tensor());
            out.take(grads)?;
            mark(&mut prof, "decoder layers: backward");
        }
        // The embedding (and, without vision recompute, the whole tower) kept its graph.
        if let Some(gi) = g {
            if h0.track_op() {
                let mut grads = backward_through(&h0, &gi)?;
                let gv = vision_saved
                    .as_ref()
                    .and_then(|s| grads.remove(s.merge_in.as_tensor()));
                out.take(grads)?;
                mark(&mut prof, "embedding backward");
                self.vision_backward(vision_saved, gv, ctx, &mut out)?;
                mark(&mut prof, "vision backward");
            }
        }
        Ok(Backward {
            loss: value,
            grads: Some(out.store),
        })
    }

    /// The vision half of a recomputing backward: merger, blocks in reverse, patch embedding,
    /// from `g` = dL/d(merger input).
    fn vision_backward(
        &self,
        saved: Option<VisionSaved>,
        g: Option<Tensor>,
        ctx: &Ctx,
        out: &mut Collected<'_>,
    ) -> Result<()> {
        let (Some(saved), Some(mut g)) = (saved, g) else {
            return Ok(());
        };
        let VisionSaved {
            x0,
            run,
            mut blocks,
            recompute,
            ..
        } = saved;
        while let Some((x, kept)) = blocks.pop() {
            let i = blocks.len();
            let v = leaf(&x)?;
            drop(x);
            let y = recompute.again(kept, || self.vision.block(i, v.as_tensor(), &run, ctx))?;
            let mut grads = backward_through(&y, &g)?;
            let next = grads.remove(v.as_tensor());
            out.take(grads)?;
            match next {
                Some(n) => g = n,
                None => return Ok(()),
            }
        }
        if x0.track_op() {
            out.take(backward_through(&x0, &g)?)?;
        }
        Ok(())
    }
}

thread_local! {
    static PROFILE: std::cell::RefCell<Option<Vec<(&'static str, f64)>>> =
        const { std::cell::RefCell::new(None) };
}

/// Time each segment of [`Qwen2VL::forward_backward`] from now on this thread (device
/// synchronised at each boundary: slower, for benchmarks), or stop (`false`).
pub fn profile_segments(on: bool) {
    PROFILE.with(|p| *p.borrow_mut() = on.then(Vec::new));
}

/// Seconds per segment kind since the last call, summed over segments of a kind, in first-seen
/// order (empty when not profiling).
pub fn take_profile() -> Vec<(&'static str, f64)> {
    PROFILE.with(|p| {
        p.borrow_mut()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    })
}

/// Marks the end of a segment when profiling.
struct Prof {
    device: candle_core::Device,
    at: std::time::Instant,
}

impl Prof {
    fn new(device: &candle_core::Device) -> Option<Prof> {
        PROFILE.with(|p| p.borrow().is_some()).then(|| Prof {
            device: device.clone(),
            at: std::time::Instant::now(),
        })
    }
    fn mark(&mut self, what: &'static str) {
        let _ = self.device.synchronize();
        let dt = self.at.elapsed().as_secs_f64();
        PROFILE.with(|p| {
            if let Some(v) = p.borrow_mut().as_mut() {
                match v.iter_mut().find(|(n, _)| *n == what) {
                    Some((_, t)) => *t += dt,
                    None => v.push((what, dt)),
                }
            }
        });
        self.at = std::time::Instant::now();
    }
}

fn mark(p: &mut Option<Prof>, what: &'static str) {
    if let Some(p) = p {
        p.mark(what);
    }
}

fn scalar(loss: &Tensor) -> Result<f64> {
    Ok(loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}
