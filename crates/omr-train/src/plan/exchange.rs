//! The gradient exchange of a data-parallel job in the plan: what `dist::Group::sum_grads`
//! holds on the device between backward and the optimizer step.

use super::{PlanInput, Row, F32};

/// Values in the largest bucket of a gradient exchange (`dist::Group::sum_tensors`): the
/// gradients, `train_n` values in all, are packed in order into buckets of at most `bucket`
/// values, a larger tensor in one of its own.
pub fn exchange_bucket(train_n: u64, largest: u64, bucket: u64) -> u64 {
    bucket.max(largest).min(train_n)
}

/// The device bytes of the gradients at the exchange's peak: `dist::Group::sum_tensors`
/// concatenates a bucket's gradients on the device in their dtype, copies that to the host
/// and frees it with the bucket's gradients, then makes the bucket's sums anew in f32. At a
/// bucket's concatenation the earlier buckets' f32 sums, the later buckets' gradients and the
/// concatenation come to at most every gradient in f32 when the gradients are bf16 (the sums
/// after the last bucket are that), and to that plus one bucket when they are f32 (sums of
/// several micro-batches, or an f32 run).
pub fn exchange_bytes(train_n: u64, largest: u64, bucket: u64, f32_grads: bool) -> u64 {
    let concatenated = if f32_grads {
        exchange_bucket(train_n, largest, bucket)
    } else {
        0
    };
    (train_n + concatenated) * F32
}

/// The exchange phase's rows beyond the resident state. `f32_sums`: backward's gradients were
/// already summed in f32 (several micro-batches).
pub(super) fn rows(p: &PlanInput, train_n: u64, largest: u64, f32_sums: bool) -> Vec<Row> {
    let f32_grads = f32_sums || p.compute_bytes == F32;
    let bucket = crate::dist::BUCKET_FLOATS as u64;
    let all = exchange_bytes(train_n, largest, bucket, f32_grads);
    let grads = train_n * F32;
    vec![
        Row {
            category: "gradients".into(),
            bytes: grads,
            note: format!("f32 sums over the {} ranks", p.world),
        },
        Row {
            category: "exchange bucket".into(),
            bytes: all - grads,
            note: if f32_grads {
                "the largest bucket, concatenated to copy it out".into()
            } else {
                "none beyond the sums: bf16 goes out, f32 comes back".into()
            },
        },
    ]
}
