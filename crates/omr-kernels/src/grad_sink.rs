//! Parameter gradients that bypass candle's `GradStore` accumulation.
//!
//! candle's backward starts every gradient it accumulates from `zeros_like` and adds the
//! contribution into it (`GradStore::or_insert`, then `add`): for a weight of the model that is
//! a memset and an add kernel over the whole weight, every step, to produce a copy of the one
//! gradient its op computed (run 7's profile of the 3B step: `badd_bf16`, 24% of kernel time,
//! about half of it on weights). Inside [`backward`], ops whose backward computes a parameter's
//! gradient themselves (`omr_model::ops::linear_op`, its attach ops, the fused linear
//! cross-entropy and log-probabilities) hand it here with [`route`] instead of returning it to
//! candle, and [`backward`] puts it in the `GradStore` afterwards: summed with what candle
//! accumulated for the same tensor, if anything, else inserted as it is.
//!
//! Only leaves (`Var`s) are routed: a gradient of an interior tensor (a cast of a master) must
//! flow on through candle's graph. The values are candle's: `0 + g = g` (the sign of a zero
//! aside), and a tensor with one contribution routed and one accumulated by candle gets the sum
//! of the two, which does not depend on their order. Outside [`backward`] (a plain
//! `loss.backward()`) nothing is routed and everything is as before; `OMR_GRAD_SINK=0` turns
//! the routing off everywhere (candle accumulates every gradient, as before it existed).

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId};
use std::cell::RefCell;

thread_local! {
    static SINK: RefCell<Option<Vec<(TensorId, Tensor)>>> = const { RefCell::new(None) };
    static ROUTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// `loss.backward()` with parameter gradients routed past the `GradStore`'s zeros + add, then
/// merged into it: the gradients `loss.backward()` gives.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("OMR_GRAD_SINK").is_ok_and(|v| v == "0")) {
        return loss.backward();
    }
    struct Disarm(Option<Vec<(TensorId, Tensor)>>);
    impl Drop for Disarm {
        fn drop(&mut self) {
            SINK.with(|s| *s.borrow_mut() = self.0.take());
        }
    }
    // A backward inside a backward (none today) keeps its own sink.
    let outer = SINK.with(|s| s.borrow_mut().replace(Vec::new()));
    let guard = Disarm(outer);
    let result = loss.backward();
    let routed = SINK.with(|s| s.borrow_mut().take()).unwrap_or_default();
    drop(guard);
    let mut grads = result?;
    for (id, g) in routed {
        let sum = match grads.get_id(id) {
            Some(acc) => (acc + &g)?,
            None => g,
        };
        grads.insert_id(id, sum);
    }
    Ok(grads)
}

/// For an op's backward: the gradient `grad` of its argument `arg`. Inside [`backward`] and
/// when `arg` is a leaf, it is kept here (summed with an earlier one of the same tensor) and
/// `None` goes back to candle; otherwise `grad` itself.
pub fn route(arg: &Tensor, grad: Option<Tensor>) -> Result<Option<Tensor>> {
    let Some(g) = grad else { return Ok(None) };
    if !arg.is_variable() {
        return Ok(Some(g));
    }
    SINK.with(|s| {
        let mut s = s.borrow_mut();
        let Some(sink) = s.as_mut() else {
            return Ok(Some(g));
        };
        match sink.iter_mut().find(|(id, _)| *id == arg.id()) {
            Some((_, acc)) => *acc = (&*acc + &g)?,
            None => sink.push((arg.id(), g)),
        }
        ROUTED.with(|c| c.set(c.get() + 1));
        Ok(None)
    })
}

/// How many gradients this thread has routed past the `GradStore` so far (for tests).
#[doc(hidden)]
pub fn routed() -> u64 {
    ROUTED.with(|c| c.get())
}
