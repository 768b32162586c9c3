//! Which keys a query may attend ([`AttnMask`]: causal, sliding window, segment ids of packed
//! samples and vision windows), and what the attention paths plan from a mask: the segments'
//! row ranges and the key span a block of queries can reach ([`segment_ranges`],
//! [`covering`]), cached per mask and shape ([`PlanCache`]).

use candle_core::{bail, DType, Device, Result, Tensor};
use std::borrow::Cow;
use std::collections::HashMap;

/// Which keys a query may attend.
#[derive(Clone, Debug, Default)]
pub struct AttnMask {
    pub causal: bool,
    /// Sliding window: keys strictly fewer than `window` positions before the query (0 = off).
    pub window: usize,
    /// Segment id of each query (B, T) and key (B, S), u32, 0 = padding.
    pub q_seg: Option<Tensor>,
    pub k_seg: Option<Tensor>,
    /// The same ids on the host, (B·T) and (B·S) row-major, when the mask's builder has them:
    /// the GEMM attention plans its blocks from them without reading the device (a read is a
    /// synchronisation per call).
    pub host: Option<std::sync::Arc<(Vec<u32>, Vec<u32>)>>,
    /// What the kernels derive from the mask (device segment ids, block spans), kept for the
    /// next call: every layer of a pass attends with one mask. Clones share it.
    pub plans: PlanCache,
}

/// A mask's cache of derived plans, keyed by what they depend on (shapes, tiles, the segment
/// tensors' ids, causal, window); at most [`PlanCache::CAP`] entries.
#[derive(Clone, Default)]
pub struct PlanCache(std::sync::Arc<std::sync::Mutex<Vec<(String, Plan)>>>);

/// One cached plan, of whatever type its maker gave.
type Plan = std::sync::Arc<dyn std::any::Any + Send + Sync>;

impl std::fmt::Debug for PlanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |v| v.len());
        write!(f, "PlanCache({n} entries)")
    }
}

impl PlanCache {
    const CAP: usize = 8;

    /// The plan under `key`, made by `make` on the first call.
    pub(crate) fn get<T: Send + Sync + 'static>(
        &self,
        key: String,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<std::sync::Arc<T>> {
        let hit = {
            let v = self
                .0
                .lock()
                .map_err(|_| candle_core::Error::Msg("plan cache poisoned".into()))?;
            v.iter().find(|(k, _)| *k == key).map(|(_, p)| p.clone())
        };
        if let Some(p) = hit.and_then(|p| p.downcast::<T>().ok()) {
            return Ok(p);
        }
        let p = std::sync::Arc::new(make()?);
        let mut v = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("plan cache poisoned".into()))?;
        if v.len() >= Self::CAP {
            v.remove(0);
        }
        v.push((key, p.clone()));
        Ok(p)
    }

    /// Number of plans held.
    pub fn len(&self) -> usize {
        self.0.lock().map_or(0, |v| v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl AttnMask {
    /// What a plan of this mask depends on besides shapes: causal, window, the segment
    /// tensors (by id) and the host ids (by address).
    pub(crate) fn plan_key(&self) -> String {
        format!(
            "causal {} window {} q {:?} k {:?} host {:?}",
            self.causal,
            self.window,
            self.q_seg.as_ref().map(|t| t.id()),
            self.k_seg.as_ref().map(|t| t.id()),
            self.host.as_ref().map(std::sync::Arc::as_ptr),
        )
    }

    /// The segment ids on `dev`, contiguous: the given ones, checked to be (B, T) and (B, S)
    /// u32, or all ones.
    pub(crate) fn segments(
        &self,
        b: usize,
        t: usize,
        s: usize,
        dev: &Device,
        op: &str,
    ) -> Result<(Tensor, Tensor)> {
        let seg = |x: &Option<Tensor>, n: usize| -> Result<Tensor> {
            match x {
                Some(x) if x.dims() == [b, n] && x.dtype() == DType::U32 => {
                    x.to_device(dev)?.contiguous()
                }
                Some(x) => bail!(
                    "{op}: segment ids must be ({b}, {n}) u32, got {:?} {:?}",
                    x.dims(),
                    x.dtype()
                ),
                None => Tensor::ones((b, n), DType::U32, dev),
            }
        };
        Ok((seg(&self.q_seg, t)?, seg(&self.k_seg, s)?))
    }
}

impl AttnMask {
    /// The segment ids on the host, (B·T) and (B·S) row-major, for planning which blocks to
    /// visit: the builder's host copy when it gave one, all ones when the mask has no ids,
    /// else read back from `q_seg` / `k_seg` (what [`AttnMask::segments`] gave; a device sync).
    pub(crate) fn host_ids<'a>(
        &'a self,
        (b, t, s): (usize, usize, usize),
        q_seg: &Tensor,
        k_seg: &Tensor,
    ) -> Result<(Cow<'a, [u32]>, Cow<'a, [u32]>)> {
        Ok(match self.host.as_deref() {
            Some((qs, ks)) if qs.len() == b * t && ks.len() == b * s => {
                (Cow::Borrowed(qs.as_slice()), Cow::Borrowed(ks.as_slice()))
            }
            _ if self.q_seg.is_none() && self.k_seg.is_none() => {
                (Cow::Owned(vec![1; b * t]), Cow::Owned(vec![1; b * s]))
            }
            _ => (
                Cow::Owned(q_seg.flatten_all()?.to_vec1()?),
                Cow::Owned(k_seg.flatten_all()?.to_vec1()?),
            ),
        })
    }
}

/// Per batch row, each segment id's [first, last + 1) over `ids` (B · n, row-major; 0, the
/// padding, has none). A segment id in several runs gets the range covering all of them.
pub(crate) fn segment_ranges(ids: &[u32], b: usize, n: usize) -> Vec<HashMap<u32, (usize, usize)>> {
    let mut out = vec![HashMap::new(); b];
    for (bi, m) in out.iter_mut().enumerate() {
        for (i, &id) in ids[bi * n..(bi + 1) * n].iter().enumerate() {
            if id == 0 {
                continue;
            }
            let e = m.entry(id).or_insert((i, i + 1));
            e.0 = e.0.min(i);
            e.1 = e.1.max(i + 1);
        }
    }
    out
}

/// The union `[lo, hi)` of the ranges (of the other side) of the segments among `ids`;
/// `(usize::MAX, 0)` when none has one.
pub(crate) fn covering(ids: &[u32], ranges: &HashMap<u32, (usize, usize)>) -> (usize, usize) {
    ids.iter()
        .filter_map(|id| ranges.get(id))
        .fold((usize::MAX, 0), |(lo, hi), &(a, z)| (lo.min(a), hi.max(z)))
}

#[cfg(test)]
mod plan_cache_tests {
    use super::*;

    #[test]
    fn plans_are_made_once_per_key_and_shared_by_clones() -> Result<()> {
        let mask = AttnMask {
            causal: true,
            ..AttnMask::default()
        };
        let made = std::cell::Cell::new(0);
        let make = || {
            made.set(made.get() + 1);
            Ok(made.get())
        };
        let a = mask.plans.get("a".into(), make)?;
        let again = mask.clone().plans.get("a".into(), make)?;
        assert_eq!((*a, *again, made.get()), (1, 1, 1));
        assert_eq!(*mask.plans.get("b".into(), make)?, 2);
        // The oldest plan leaves once the cache is full.
        for i in 0..PlanCache::CAP {
            mask.plans.get(format!("k{i}"), make)?;
        }
        assert_eq!(mask.plans.len(), PlanCache::CAP);
        assert_eq!(*mask.plans.get("a".into(), make)?, made.get());
        // A mask with other segments keys its plans apart.
        let other = AttnMask {
            q_seg: Some(Tensor::ones((1, 4), DType::U32, &Device::Cpu)?),
            ..mask.clone()
        };
        assert_ne!(other.plan_key(), mask.plan_key());
        Ok(())
    }
}
