//! Packing changes the layout of a batch, never what the model computes for a sample.
//!
//! The data goes through the real pipeline: a synthetic OpenMedReason set and the tiny
//! processor written into a tempdir, read from parquet, encoded (images and chat template),
//! collated once packed (six samples in two rows) and once padded (one sample per row), and
//! turned into model input by `batch::to_input`, the one seam the training loop uses. A tiny
//! Qwen2.5-VL then scores both batches: each sample's loss, the batch totals and the gradients
//! must agree. A label is attributed to its sample through the batch's own `seq_lens`, so a
//! label scored across a sample boundary, or attention leaking between packed samples, shows up
//! as a per-sample difference rather than being averaged away.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use omr_data::collate::{collate, pack_rows, Batch};
use omr_data::pipeline::{ProcessConfig, Processor};
use omr_data::source::{self, SourceSpec};
use omr_data::synth::SynthConfig;
use omr_data::{Encoded, Origin};
use omr_model::loss::{causal_lm_loss, shifted_targets, token_nll};
use omr_model::tiny::{TinySpec, TokenIds};
use omr_model::{Ctx, Params, Qwen2VL};
use omr_train::batch::to_input;

const SAMPLES: usize = 6;
const PAD_TO: usize = 8;

/// Six encoded training samples of a fresh synthetic set, the pad id, and a tiny model for its
/// tokenizer. The tempdir is returned so that it outlives the test body.
fn setup() -> (tempfile::TempDir, Vec<Encoded>, u32, Qwen2VL, Params) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth");
    omr_data::synth::generate(&SynthConfig {
        out: out.clone(),
        train: 40,
        test: 8,
        seed: 0,
        ..Default::default()
    })
    .unwrap();
    let processor_dir = out.join("processor");
    omr_data::tiny::write_tiny_processor(&processor_dir, 40, 0, 2048).unwrap();
    let processor = Processor::from_model_dir(&processor_dir, &ProcessConfig::default()).unwrap();

    let src = source::open(&SourceSpec::local(&out, "train")).unwrap();
    let mut samples = Vec::new();
    'blocks: for b in 0..src.blocks().len() {
        for rec in src.read_block(b).unwrap() {
            let s = rec.unwrap_or_else(|(o, r)| panic!("synthetic record {o} is bad: {r}"));
            samples.push(processor.encode(&s).unwrap());
            if samples.len() == SAMPLES {
                break 'blocks;
            }
        }
    }
    assert_eq!(samples.len(), SAMPLES, "the synthetic set is too small");

    let ids = TokenIds::from_tokenizer_dir(&processor_dir).unwrap();
    let (cfg, params) = TinySpec::default().build(&ids, 0, &Device::Cpu).unwrap();
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    (dir, samples, processor.pad_id(), model, params)
}

/// Index, in batch order, of the sample holding position `j` of a row with samples `lens`.
fn sample_at(lens: &[usize], first: usize, j: usize) -> Option<usize> {
    let mut end = 0;
    for (k, &l) in lens.iter().enumerate() {
        end += l;
        if j < end {
            return Some(first + k);
        }
    }
    None
}

/// Per sample, in batch order (row, then place in the row): the sum of −log p(label) and the
/// number of labelled tokens. logits: (B, T, V)
fn per_sample_losses(logits: &Tensor, labels: &[Vec<i64>], batch: &Batch) -> Vec<(f64, usize)> {
    let (b, t, v) = logits.dims3().unwrap();
    let (rows, targets) = shifted_targets(labels, v).unwrap();
    let idx = Tensor::new(rows.as_slice(), logits.device()).unwrap();
    let picked = logits
        .reshape((b * t, v))
        .unwrap()
        .index_select(&idx, 0)
        .unwrap();
    let nll: Vec<f32> = token_nll(&picked, &targets).unwrap().to_vec1().unwrap();

    let mut first = 0;
    let mut firsts = Vec::with_capacity(b);
    for lens in &batch.seq_lens {
        firsts.push(first);
        first += lens.len();
    }
    let mut out = vec![(0.0f64, 0usize); batch.samples()];
    for (&r, &x) in rows.iter().zip(&nll) {
        let r = r as usize;
        // Flattened row r holds the logits of position r % t, which score the label at the
        // next position; both must lie in the same sample.
        let (row, j) = (r / t, r % t + 1);
        let lens = &batch.seq_lens[row];
        let k = sample_at(lens, firsts[row], j)
            .unwrap_or_else(|| panic!("label at row {row}, position {j} lies in padding"));
        assert_eq!(
            sample_at(lens, firsts[row], j - 1),
            Some(k),
            "label at row {row}, position {j} is scored by the previous sample's last logits"
        );
        out[k].0 += f64::from(x);
        out[k].1 += 1;
    }
    out
}

fn origins(batch: &Batch) -> Vec<Origin> {
    batch.origins.iter().flatten().cloned().collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(f64::MIN_POSITIVE)
}

fn l2(t: &Tensor) -> f64 {
    let sq = t.sqr().unwrap().sum_all().unwrap();
    f64::from(sq.to_scalar::<f32>().unwrap()).sqrt()
}

/// ‖a − b‖ / ‖b‖ over all elements.
fn rel_norm(a: &Tensor, b: &Tensor) -> f64 {
    let norm = l2(b);
    assert!(norm > 0.0, "a zero gradient proves nothing");
    l2(&(a - b).unwrap()) / norm
}

struct Scored {
    per_sample: Vec<(f64, usize)>,
    total: (f64, usize),
    grads: GradStore,
}

fn score(model: &Qwen2VL, batch: &Batch) -> Scored {
    let (input, labels) = to_input(batch, &Device::Cpu).unwrap();
    let logits = model.forward(&input, &Ctx::default()).unwrap();
    let per_sample = per_sample_losses(&logits, &labels, batch);
    let (sum, n) = causal_lm_loss(&logits, &labels).unwrap();
    let total = (f64::from(sum.to_scalar::<f32>().unwrap()), n);
    Scored {
        per_sample,
        total,
        grads: sum.backward().unwrap(),
    }
}

#[test]
fn packed_losses_and_gradients_equal_padded() {
    let (_dir, samples, pad_id, model, params) = setup();
    assert!(
        samples.iter().all(|e| !e.image_grid_thw.is_empty()),
        "every synthetic sample carries an image, so the vision path is exercised"
    );

    let lens: Vec<usize> = samples.iter().map(Encoded::len).collect();
    let total_len: usize = lens.iter().sum();
    // The shortest rows that hold all six samples in two.
    let max_length = (*lens.iter().max().unwrap()..=total_len)
        .find(|&m| pack_rows(&lens, m).len() == 2)
        .unwrap();
    let packed_rows: Vec<Vec<&Encoded>> = pack_rows(&lens, max_length)
        .iter()
        .map(|r| r.iter().map(|&i| &samples[i]).collect())
        .collect();
    let packed = collate(&packed_rows, pad_id, PAD_TO);
    let padded_rows: Vec<Vec<&Encoded>> = samples.iter().map(|e| vec![e]).collect();
    let padded = collate(&padded_rows, pad_id, PAD_TO);
    assert_eq!(packed.rows, 2);
    assert_eq!(padded.rows, SAMPLES);
    assert_eq!(
        origins(&packed),
        origins(&padded),
        "same samples, same order"
    );
    assert_eq!(packed.image_grid_thw, padded.image_grid_thw);
    assert_eq!(packed.supervised_tokens(), padded.supervised_tokens());

    let a = score(&model, &packed);
    let b = score(&model, &padded);

    for (k, (p, q)) in a.per_sample.iter().zip(&b.per_sample).enumerate() {
        assert!(q.1 > 0, "sample {k} has no labelled token");
        assert_eq!(p.1, q.1, "sample {k}: labelled tokens");
        assert!(
            rel(p.0, q.0) <= 1e-5,
            "sample {k}: packed loss {} vs padded {} (rel {:.2e})",
            p.0,
            q.0,
            rel(p.0, q.0)
        );
    }
    assert_eq!(a.total.1, b.total.1, "labelled tokens of the batch");
    assert!(
        rel(a.total.0, b.total.0) <= 1e-5,
        "loss sum: packed {} vs padded {}",
        a.total.0,
        b.total.0
    );
    let summed: f64 = b.per_sample.iter().map(|s| s.0).sum();
    assert!(
        rel(summed, b.total.0) <= 1e-5,
        "per-sample sums add up to causal_lm_loss"
    );

    // The tied embedding (input and LM head), a decoder projection that mixes positions through
    // attention, and a vision block reached only through the image features.
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "visual.blocks.0.attn.qkv.weight",
    ] {
        let var = params
            .var(name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        let ga = a.grads.get(var.as_tensor()).unwrap();
        let gb = b.grads.get(var.as_tensor()).unwrap();
        let r = rel_norm(ga, gb);
        assert!(r <= 1e-4, "{name}: gradient differs by {r:.2e} (relative)");
    }
}
