//! GRPO's training batches pack their sequences (`rollout::seq_batch`): several `prompt +
//! completion` sequences share a row, each its own segment. The completion log-probs of a
//! packed batch must be each sequence's own, as a batch of that sequence alone computes them
//! (same positions, attention only within the sequence), in the (N, Tc) layout; and the packed
//! batch must really hold fewer rows than sequences.

use candle_core::{DType, Device};
use omr_data::pipeline::Prompt;
use omr_model::generate::{Completion, Finish};
use omr_model::{Ctx, Kernels, ModelConfig, Params, Qwen2VL};
use omr_train::bench_step::SyntheticBatch;
use omr_train::rollout::{completion_logps, seq_batch};

/// Prompts of different lengths, the first two with a 56² image (packed into one row in the
/// other order), and completions of different lengths.
fn sequences(cfg: &ModelConfig) -> Vec<(Prompt, Completion)> {
    let mut out = Vec::new();
    for (i, (t, px, new)) in [
        (25, 56, 3),
        (28, 56, 2),
        (48, 0, 10),
        (16, 0, 4),
        (12, 0, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let b = SyntheticBatch::new(cfg, 1, t, px, 5 + i as u64).unwrap();
        let prompt = Prompt {
            input_ids: b.input_ids[0].clone(),
            pixel_values: b.pixel_values.clone(),
            patch_dim: b.patch_dim,
            image_grid_thw: b.grids.iter().map(|g| g.map(|x| x as u32)).collect(),
        };
        let tokens: Vec<u32> = (0..new).map(|j| (7 + 13 * j + i) as u32 % 200).collect();
        let completion = Completion {
            logprobs: vec![-1.0; tokens.len()],
            tokens,
            finish: Finish::Eos,
            logits: Vec::new(),
        };
        out.push((prompt, completion));
    }
    out
}

#[test]
fn packed_batches_score_each_sequence_as_alone() {
    let cfg = ModelConfig::from_file(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models/tiny.json"),
    )
    .unwrap();
    let params = Params::init(&cfg, 3, 0.02, &Device::Cpu).unwrap();
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let seqs = sequences(&cfg);
    let pairs: Vec<(&Prompt, &Completion)> = seqs.iter().map(|(p, c)| (p, c)).collect();
    for kernels in [Kernels::Candle, Kernels::Fused] {
        let ctx = Ctx {
            kernels,
            ..Ctx::default()
        };
        let packed = seq_batch(&pairs, 0, &Device::Cpu).unwrap();
        // Sequences of 28, 30, 58, 20 and 13 tokens in rows of 58, longest first: [58],
        // [30, 28] (both images, the second sequence's first), [20, 13]: 3 rows, not 5.
        assert_eq!(packed.input.batch(), 3, "{kernels:?}");
        assert_eq!(packed.input.segments[1].iter().max(), Some(&2));
        assert_eq!(packed.input.grids.len(), 2);
        let (logp, _) = completion_logps(&model, &packed, 0.9, &[], &ctx).unwrap();
        let logp = logp.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let mut worst = 0f32;
        for (i, pair) in pairs.iter().enumerate() {
            let alone = seq_batch(std::slice::from_ref(pair), 0, &Device::Cpu).unwrap();
            let (want, _) = completion_logps(&model, &alone, 0.9, &[], &ctx).unwrap();
            let want = want.to_vec2::<f32>().unwrap();
            let n = pair.1.tokens.len();
            for j in 0..packed.tc {
                if j < n {
                    worst = worst.max((logp[i][j] - want[0][j]).abs());
                } else {
                    assert_eq!(logp[i][j], 0.0, "padding of sequence {i}");
                }
            }
        }
        println!("{kernels:?}: packed vs alone, completion log-probs within {worst:.1e}");
        assert!(worst < 1e-5, "{kernels:?}: {worst}");
    }
}
