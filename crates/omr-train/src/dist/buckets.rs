//! Gradients summed over the ranks in buckets: flattened on the device, copied to the host
//! once per bucket, summed ([`Group::sum_segments`]) and made into tensors again.

use super::{Group, Segment};
use crate::error::{Result, TrainError};
use crate::optim::GradAccum;
use candle_core::{DType, Tensor, Var};

/// Gradients are summed in buckets of at most this many values (256 MiB of f32; a larger
/// parameter is a bucket of its own): one copy from the device and one exchange each.
pub const BUCKET_FLOATS: usize = 64 << 20;

impl Group {
    /// Sums every parameter's accumulated gradient over the ranks: each rank then holds the
    /// gradient of all micro-batches of the step, as f32. A parameter no rank has a gradient
    /// for stays without; one that some ranks lack is summed over the others
    /// ([`Group::sum_f32`]'s rule, so the bits are those of one process adding its
    /// micro-batches in order).
    pub fn sum_grads(&mut self, acc: &mut GradAccum) -> Result<()> {
        if self.link.is_none() {
            return Ok(());
        }
        acc.map_all_sums(|vars, sums| self.sum_tensors(vars, sums, BUCKET_FLOATS))
    }

    /// The sums over the ranks of `sums` (one per var, `None` where this rank has none), as f32
    /// tensors, in buckets of at most `bucket` values. Of each bucket, this rank's gradients
    /// are flattened and concatenated on the device in their own dtype (f32 if the bucket
    /// mixes dtypes) and copied to the host at once: bf16 gradients cross at half the bytes
    /// and widen to f32 on the host, exactly as a device cast would. Where this rank holds
    /// none its values are never read ([`Group::sum_segments`]' rule), so nothing is copied
    /// for them. The bucket's originals are freed before its sums are made on the device, so
    /// bf16 gradients never hold more than their f32 sums will (`plan::exchange_bytes`).
    /// Each bucket's exchange overlaps the device copies of its neighbours.
    pub fn sum_tensors(
        &mut self,
        vars: &[Var],
        mut sums: Vec<Option<Tensor>>,
        bucket: usize,
    ) -> Result<Vec<Option<Tensor>>> {
        let held: Vec<bool> = sums.iter().map(Option::is_some).collect();
        let holders = self.holders(&held)?;
        let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
        let plan = buckets(&sizes, &holders, bucket);
        let mut out: Vec<Option<Tensor>> = vec![None; vars.len()];
        // Bucket k, copied off the device: this rank's gradients at their offsets.
        let mut copy_out = |k: usize| {
            let (mut mine, mut at) = (Vec::new(), 0);
            for &i in &plan[k] {
                if let Some(t) = sums[i].take() {
                    mine.push((at, t));
                }
                at += sizes[i];
            }
            bucket_to_host(mine, at)
        };
        // Bucket k's sums, made on the device tensor by tensor.
        let mut copy_in = |k: usize, flat: Vec<f32>| -> Result<()> {
            let mut at = 0;
            for &i in &plan[k] {
                let (v, n) = (&vars[i], sizes[i]);
                out[i] = Some(Tensor::from_slice(&flat[at..at + n], v.dims(), v.device())?);
                at += n;
            }
            Ok(())
        };
        // While bucket k is exchanged (a helper thread: sockets and host sums only), this
        // thread makes bucket k − 1's sums on the device and copies bucket k + 1 off it.
        let mut next = if plan.is_empty() {
            None
        } else {
            Some(copy_out(0)?)
        };
        let mut summed: Option<(usize, Vec<f32>)> = None;
        for k in 0..plan.len() {
            let Some(mut flat) = next.take() else {
                return Err(TrainError::Internal(format!(
                    "bucket {k} was not copied out"
                )));
            };
            let segments: Vec<Segment> = plan[k]
                .iter()
                .map(|&i| Segment {
                    len: sizes[i],
                    holders: holders[i].clone(),
                })
                .collect();
            let link = &mut self.link;
            let (exchanged, copied_in, copied_out) = std::thread::scope(|s| {
                let exchange = s.spawn(|| match link {
                    Some(link) => link.reduce(&mut flat, &segments),
                    None => Ok(()),
                });
                let copied_in = summed.take().map_or(Ok(()), |(j, f)| copy_in(j, f));
                let copied_out = (k + 1 < plan.len()).then(|| copy_out(k + 1)).transpose();
                let exchanged = exchange.join().unwrap_or_else(|_| {
                    Err(TrainError::Internal(
                        "the gradient exchange panicked".into(),
                    ))
                });
                (exchanged, copied_in, copied_out)
            });
            exchanged?;
            copied_in?;
            next = copied_out?;
            summed = Some((k, flat));
        }
        if let Some((k, flat)) = summed {
            copy_in(k, flat)?;
        }
        Ok(out)
    }
}

/// The parameters that some rank holds, packed in order into buckets of at most `bucket`
/// values (a larger one alone).
fn buckets(sizes: &[usize], holders: &[Vec<usize>], bucket: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut size = 0;
    for i in (0..sizes.len()).filter(|&i| !holders[i].is_empty()) {
        match out.last_mut() {
            Some(last) if size + sizes[i] <= bucket => last.push(i),
            _ => {
                out.push(vec![i]);
                size = 0;
            }
        }
        size += sizes[i];
    }
    out
}

/// A bucket of `len` f32 values on the host: each `(offset, tensor)` of `parts` at its offset,
/// zeros elsewhere, with one copy from the device. The tensors are concatenated there in their
/// common dtype (f32 where they differ) and widened on the host; f32 tensors that fill the
/// bucket are copied straight into it. The tensors are dropped before this returns.
fn bucket_to_host(parts: Vec<(usize, Tensor)>, len: usize) -> Result<Vec<f32>> {
    let Some((_, first)) = parts.first() else {
        return Ok(vec![0.0; len]);
    };
    let dtype = match first.dtype() {
        d @ (DType::BF16 | DType::F16 | DType::F32)
            if parts.iter().all(|(_, t)| t.dtype() == d) =>
        {
            d
        }
        _ => DType::F32,
    };
    let (offsets, tensors): (Vec<usize>, Vec<Tensor>) = parts
        .into_iter()
        .map(|(at, t)| Ok((at, t.to_dtype(dtype)?.flatten_all()?)))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let lens: Vec<usize> = tensors.iter().map(Tensor::elem_count).collect();
    let all = Tensor::cat(&tensors, 0)?;
    drop(tensors);
    if dtype == DType::F32 && all.elem_count() == len {
        return Ok(all.to_vec1::<f32>()?);
    }
    fn widen<T: candle_core::WithDType>(
        all: Tensor,
        to_f32: impl Fn(T) -> f32,
        offsets: &[usize],
        lens: &[usize],
        len: usize,
    ) -> Result<Vec<f32>> {
        let host = all.to_vec1::<T>()?;
        drop(all);
        let mut flat = vec![0.0; len];
        let mut from = 0;
        for (&at, &n) in offsets.iter().zip(lens) {
            for (d, &x) in flat[at..at + n].iter_mut().zip(&host[from..from + n]) {
                *d = to_f32(x);
            }
            from += n;
        }
        Ok(flat)
    }
    match dtype {
        DType::BF16 => widen(all, half::bf16::to_f32, &offsets, &lens, len),
        DType::F16 => widen(all, half::f16::to_f32, &offsets, &lens, len),
        _ => widen(all, |x: f32| x, &offsets, &lens, len),
    }
}
