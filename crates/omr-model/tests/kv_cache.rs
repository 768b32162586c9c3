//! The key/value cache's preallocated buffers (`omr_model::text::KvCache`), on the tiny random
//! Qwen2.5-VL of the fixtures, for candle's ops and the fused ones:
//! - a cache that grows pass by pass (each reallocation doubles it) gives the same hidden
//!   states, bit for bit, as one sized for every pass up front, and either equals a pass over
//!   the whole sequence without a cache;
//! - a pass whose keys and values carry a graph gets their gradient (the pass attends to its
//!   own tensors, not only to the buffers): the gradient of a cached pass's input equals the
//!   one through a pass over the whole sequence.

mod common;

use candle_core::{Tensor, Var};
use common::{flat, model_params, rel, Inputs};
use omr_model::text::KvCache;
use omr_model::{Ctx, Input, Kernels, Qwen2VL};

fn ctx(kernels: Kernels, no_grad: bool) -> Ctx {
    Ctx {
        kernels,
        no_grad,
        ..Ctx::default()
    }
}

/// One new position per row after the prompt: positions `next`, every row's segment 1.
struct Step {
    pos: [Vec<Vec<i64>>; 3],
    segments: Vec<Vec<u32>>,
}

/// `n` steps after `prompts`: their positions and the segments over prompt + steps so far.
fn steps(model: &Qwen2VL, prompts: &Input, n: usize) -> Vec<Step> {
    let pos = prompts.positions(&model.cfg).unwrap();
    let mut segments = prompts.segments.clone();
    (0..n)
        .map(|i| {
            segments.iter_mut().for_each(|s| s.push(1));
            let p: Vec<Vec<i64>> = pos
                .deltas
                .iter()
                .map(|d| vec![d + (prompts.len() + i) as i64])
                .collect();
            Step {
                pos: [p.clone(), p.clone(), p],
                segments: segments.clone(),
            }
        })
        .collect()
}

#[test]
fn growing_and_reserved_caches_give_the_same_passes() {
    let (cfg, params) = model_params("qwen25vl");
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let prompts = Inputs::load("qwen25vl").padded();
    let t = prompts.len();
    const N: usize = 5;
    for kernels in [Kernels::Candle, Kernels::Fused] {
        let cx = ctx(kernels, true);
        let x = model.embed(&prompts, &cx).unwrap().detach();
        let pos = prompts.positions(&cfg).unwrap();
        let mut grown = KvCache::default();
        let mut sized = KvCache::with_capacity(t + N);
        for cache in [&mut grown, &mut sized] {
            model
                .decode_hidden(&x, &pos.pos, &prompts.segments, cache, &cx)
                .unwrap();
        }
        // The prefill's keys are the buffers as they are.
        assert_eq!((grown.capacity(), sized.capacity()), (t, t));
        // Each step feeds the prompt's last embeddings again (any input does).
        let xs = x.narrow(1, t - 1, 1).unwrap();
        let mut last = None;
        for (i, s) in steps(&model, &prompts, N).iter().enumerate() {
            let a = model
                .decode_hidden(&xs, &s.pos, &s.segments, &mut grown, &cx)
                .unwrap();
            let b = model
                .decode_hidden(&xs, &s.pos, &s.segments, &mut sized, &cx)
                .unwrap();
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{kernels:?} step {i}"
            );
            assert_eq!((grown.len(), sized.len()), (t + i + 1, t + i + 1));
            last = Some(a);
        }
        // The first step doubled the grown one (the prompt is longer than N).
        assert_eq!((grown.capacity(), sized.capacity()), (2 * t, t + N));

        // The whole sequence in one pass, without a cache: its last position is the last step's.
        let whole = Tensor::cat(&[x.clone(), xs.repeat((1, N, 1)).unwrap()], 1).unwrap();
        let s = steps(&model, &prompts, N);
        let mut wpos = pos.pos.clone();
        for (axis, w) in wpos.iter_mut().enumerate() {
            for (row, r) in w.iter_mut().enumerate() {
                r.extend(s.iter().map(|st| st.pos[axis][row][0]));
            }
        }
        let full = model
            .decode_hidden(
                &whole,
                &wpos,
                &s[N - 1].segments,
                &mut KvCache::default(),
                &cx,
            )
            .unwrap();
        let want = full.narrow(1, t + N - 1, 1).unwrap();
        let err = rel(&flat(&last.unwrap()), &flat(&want));
        println!("{kernels:?}: cached step vs whole pass {err:.2e}");
        assert!(err < 1e-5, "{kernels:?}: {err}");
    }
}

#[test]
fn a_cached_pass_with_a_graph_backpropagates_through_its_keys() {
    let (cfg, params) = model_params("qwen25vl");
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let prompts = Inputs::load("qwen25vl").padded();
    let t = prompts.len();
    let step = &steps(&model, &prompts, 1)[0];
    for kernels in [Kernels::Candle, Kernels::Fused] {
        let x = model.embed(&prompts, &ctx(kernels, true)).unwrap().detach();
        let pos = prompts.positions(&cfg).unwrap();
        let new = Var::from_tensor(&x.narrow(1, t - 1, 1).unwrap().contiguous().unwrap()).unwrap();
        let cx = ctx(kernels, false);

        // Cached: the prompt's pass, then the new position's with a graph.
        let mut cache = KvCache::with_capacity(t + 1);
        model
            .decode_hidden(
                &x,
                &pos.pos,
                &prompts.segments,
                &mut cache,
                &ctx(kernels, true),
            )
            .unwrap();
        let h = model
            .decode_hidden(new.as_tensor(), &step.pos, &step.segments, &mut cache, &cx)
            .unwrap();
        let g_cached = h.sum_all().unwrap().backward().unwrap();
        let g_cached = g_cached.get(new.as_tensor()).unwrap().clone();

        // Whole: prompt (detached) and the new position in one pass.
        let whole = Tensor::cat(&[&x, new.as_tensor()], 1).unwrap();
        let mut wpos = pos.pos.clone();
        for (axis, w) in wpos.iter_mut().enumerate() {
            for (row, r) in w.iter_mut().enumerate() {
                r.push(step.pos[axis][row][0]);
            }
        }
        let full = model
            .decode_hidden(&whole, &wpos, &step.segments, &mut KvCache::default(), &cx)
            .unwrap();
        let g_full = full
            .narrow(1, t, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_full = g_full.get(new.as_tensor()).unwrap().clone();
        let err = rel(&flat(&g_cached), &flat(&g_full));
        println!("{kernels:?}: gradient of a cached pass vs a whole pass {err:.2e}");
        assert!(err < 1e-5, "{kernels:?}: {err}");
    }
}
