//! Attention outputs kept across activation checkpointing's recompute (on the fused path).
//!
//! A checkpointed block (decoder layer or vision block) runs its forward twice: once keeping
//! only its input, and again in the backward to rebuild its graph. Its attention is the one op
//! whose recompute costs FLOPs quadratic in the sequence (at T 8192 on the 3B shape, 0.28
//! TFLOP a layer against 1.26 for its seven linears, but at the 111 TFLOP/s of run 8's
//! attention forward about as long as they take), while what its backward needs is small: its
//! output (B·T·H·D, the size of q) and the (B, H, T) f32 row log-sum-exp. So the first forward
//! records each attention's output and saved state on a per-thread tape ([`record`]), and the
//! recompute replays them in order ([`replay`]) instead of running the attention again. The
//! recomputed q, k and v are the same values (the same ops on the same input, with the same
//! dropout masks), so the backward gets what a full recompute would give it: on the CPU the
//! gradients are bit for bit those of a full recompute (tests/fused.rs, tests/block.rs).
//!
//! Off the tape (no checkpointing, generation, `recompute_attention = true`) the attention
//! runs as before.

use crate::ops::attach_grad3;
use candle_core::{Result, Tensor};
use omr_kernels::{AttnMask, AttnSaved};
use std::cell::RefCell;
use std::sync::Arc;

/// One attention of a block's first forward: its output and what its backward needs.
pub struct Kept {
    o: Tensor,
    saved: Arc<AttnSaved>,
}

impl Kept {
    /// Device bytes held (the output; the saved row log-sum-exp is B·H·T f32 besides).
    pub fn bytes(&self) -> usize {
        self.o.elem_count() * self.o.dtype().size_in_bytes()
    }
}

enum Tape {
    Record(Vec<Kept>),
    Replay(std::vec::IntoIter<Kept>),
}

thread_local! {
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

/// Puts `tape` on this thread for the guard's life, and what was there back after.
struct OnTape(Option<Tape>);

impl OnTape {
    fn start(tape: Tape) -> OnTape {
        OnTape(TAPE.with(|t| t.borrow_mut().replace(tape)))
    }
    fn finish(mut self) -> Option<Tape> {
        let before = self.0.take();
        TAPE.with(|t| std::mem::replace(&mut *t.borrow_mut(), before))
    }
}

impl Drop for OnTape {
    fn drop(&mut self) {
        // Reached only when `f` panicked before `finish`: restore what was there.
        if let Some(before) = self.0.take() {
            TAPE.with(|t| *t.borrow_mut() = Some(before));
        }
    }
}

/// Runs `f` (a block's first forward), keeping every attention it computes on this thread.
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Vec<Kept>) {
    let on = OnTape::start(Tape::Record(Vec::new()));
    let r = f();
    let kept = match on.finish() {
        Some(Tape::Record(v)) => v,
        _ => Vec::new(),
    };
    (r, kept)
}

/// Runs `f` (the block's recompute), handing it the attentions `kept` in order instead of
/// computing them. An error when `f` asked for more or fewer attentions than were kept (the
/// recompute must be the same computation).
pub fn replay<R>(kept: Vec<Kept>, f: impl FnOnce() -> Result<R>) -> Result<R> {
    let n = kept.len();
    let on = OnTape::start(Tape::Replay(kept.into_iter()));
    let r = f();
    let left = match on.finish() {
        Some(Tape::Replay(it)) => it.len(),
        _ => 0,
    };
    let r = r?;
    if left != 0 {
        candle_core::bail!(
            "kept attention: the recompute used {} of the {n} attentions its forward kept",
            n - left
        )
    }
    Ok(r)
}

/// Whether a tape is on this thread (then [`attention`] takes over from the plain op).
pub fn active() -> bool {
    TAPE.with(|t| t.borrow().is_some())
}

/// The attention forward without autograd and what its backward needs: the next kept one
/// when replaying, else [`omr_kernels::attention_forward`] (kept when recording; counted in
/// [`crate::fused::calls`] then, and only then).
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<(Tensor, Arc<AttnSaved>)> {
    let replayed = TAPE.with(|t| match t.borrow_mut().as_mut() {
        Some(Tape::Replay(it)) => Some(it.next()),
        _ => None,
    });
    if let Some(next) = replayed {
        let Some(kept) = next else {
            candle_core::bail!(
                "kept attention: the recompute asked for more attentions than its forward kept"
            )
        };
        if kept.o.dims() != q.dims() {
            candle_core::bail!(
                "kept attention: kept output {:?}, recomputed queries {:?}",
                kept.o.dims(),
                q.dims()
            )
        }
        return Ok((kept.o, kept.saved));
    }
    crate::fused::count_attention();
    let (o, saved) = omr_kernels::attention_forward(q, k, v, mask, scale)?;
    let saved = Arc::new(saved);
    TAPE.with(|t| {
        if let Some(Tape::Record(v)) = t.borrow_mut().as_mut() {
            v.push(Kept {
                o: o.clone(),
                saved: saved.clone(),
            });
        }
    });
    Ok((o, saved))
}

/// Attention with autograd through [`forward`]: q (B, T, H, D), k/v (B, S, KV, D) → (B, T, H, D).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor> {
    let (o, saved) = forward(q, k, v, mask, scale)?;
    let (qd, kd, vd, od) = (q.detach(), k.detach(), v.detach(), o.clone());
    attach_grad3([q, k, v], o, move |dout| {
        // Each AttnSaved::backward takes dO in any dtype and layout.
        let (dq, dk, dv) = saved.backward(&qd, &kd, &vd, &od, dout)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn qkv(t: usize, seed: f32) -> [Var; 3] {
        let dev = Device::Cpu;
        let v = |n: usize, s: f32| {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + s).sin()).collect();
            Var::from_tensor(&Tensor::from_vec(x, (1, t, n / (t * 8), 8), &dev).unwrap()).unwrap()
        };
        [
            v(t * 4 * 8, seed),
            v(t * 2 * 8, seed + 1.0),
            v(t * 2 * 8, seed + 2.0),
        ]
    }

    fn attend(x: &[Var; 3], mask: &AttnMask) -> Result<Tensor> {
        attention(
            x[0].as_tensor(),
            x[1].as_tensor(),
            x[2].as_tensor(),
            mask,
            0.25,
        )
    }

    /// Replayed attention: the kept output, and the plain op's gradients bit for bit.
    #[test]
    fn replay_gives_the_plain_attention_and_gradients() -> Result<()> {
        let x = qkv(6, 0.0);
        let mask = crate::fused::text_mask(&[vec![1, 1, 2, 2, 2, 0]], 6, &Device::Cpu)?;
        let plain = omr_kernels::flash_attn(
            x[0].as_tensor(),
            x[1].as_tensor(),
            x[2].as_tensor(),
            &mask,
            0.25,
        )?;
        let grads = |o: &Tensor| -> Result<Vec<Vec<f32>>> {
            let g = (o * o)?.sum_all()?.backward()?;
            x.iter()
                .map(|v| g.get(v.as_tensor()).unwrap().flatten_all()?.to_vec1())
                .collect()
        };
        let want = grads(&plain)?;
        let (o1, kept) = record(|| attend(&x, &mask));
        let o1 = o1?;
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].bytes(), 6 * 4 * 8 * 4);
        let o2 = replay(kept, || attend(&x, &mask))?;
        for o in [&o1, &o2] {
            assert_eq!(
                o.flatten_all()?.to_vec1::<f32>()?,
                plain.flatten_all()?.to_vec1::<f32>()?
            );
            assert_eq!(grads(o)?, want);
        }
        assert!(!active(), "the tape is off again");
        Ok(())
    }

    /// A recompute that asks for more or fewer attentions than were kept, or another shape,
    /// is an error, not a silent wrong gradient.
    #[test]
    fn replay_refuses_a_different_recompute() -> Result<()> {
        let (x, y) = (qkv(6, 0.0), qkv(5, 0.5));
        let mask = crate::fused::text_mask(&[vec![1; 6]], 6, &Device::Cpu)?;
        let mask5 = crate::fused::text_mask(&[vec![1; 5]], 5, &Device::Cpu)?;
        let keep = || record(|| attend(&x, &mask).map(drop)).1;
        let more = replay(keep(), || {
            attend(&x, &mask)?;
            attend(&x, &mask)
        });
        assert!(more.unwrap_err().to_string().contains("more attentions"));
        let fewer = replay(keep(), || Ok(()));
        assert!(fewer.unwrap_err().to_string().contains("used 0 of the 1"));
        let other = replay(keep(), || attend(&y, &mask5));
        assert!(other
            .unwrap_err()
            .to_string()
            .contains("recomputed queries"));
        assert!(!active());
        // Outside a tape, nothing is kept.
        let (_, kept) = record(|| ());
        assert!(kept.is_empty());
        Ok(())
    }
}
