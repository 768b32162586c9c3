//! The collectives of [`super::Group`] over its connections ([`super::tcp`]): every pair of
//! ranks holds one, set up by [`super::rendezvous`].
//!
//! - **Sums** of fewer than [`MESH_BYTES`] go through rank 0 (the *hub*): every rank sends its
//!   values to rank 0, which adds them and sends the sums back. One round trip: right for
//!   the loss totals and flags of every micro-batch.
//! - **Larger sums** go through the *mesh*: the values are cut into W chunks, rank c adds
//!   chunk c of every rank (a reduce-scatter) and sends its sums to every rank (an
//!   all-gather). Each rank sends and receives 2·(W−1)/W copies of the values, all peers at
//!   once, instead of rank 0 moving 2·(W−1) copies; over a network every node's link carries
//!   its share.
//! - Either way the sum of each value is added **in rank order** over the ranks that hold it
//!   ([`Segment::holders`]), so every rank gets the same bits, the bits a single process gets
//!   adding its micro-batches in order, whichever path ran.
//! - Between ranks of one node, large sums go through shared memory instead ([`super::shm`]):
//!   the mesh's phases with each rank's values read in place.
//! - Gather and broadcast (postcard messages) go through the hub.

use super::shm::Shm;
use super::tcp::Peer;
use crate::error::{Result, TrainError};
use std::ops::{AddAssign, Range};
use std::path::Path;

/// Sums from this many bytes on go through the mesh.
pub const MESH_BYTES: usize = 1 << 20;

/// A run of consecutive values of a sum and the ranks that hold them, in rank order (the
/// others send zeros there, which the sum skips). The first holder's values start the sum,
/// so a value held by one rank keeps its bits.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub len: usize,
    pub holders: Vec<usize>,
}

pub struct Link {
    rank: usize,
    /// The connection to every other rank, indexed by rank (`None` at this rank's own index).
    peers: Vec<Option<Peer>>,
    /// Large sums through shared memory, when every rank is on this node.
    shm: Option<Shm>,
}

impl Link {
    pub fn new(rank: usize, peers: Vec<Option<Peer>>) -> Link {
        Link {
            rank,
            peers,
            shm: None,
        }
    }

    pub(super) fn world(&self) -> usize {
        self.peers.len()
    }

    /// Sends large sums through files in `dir` (a tmpfs: `/dev/shm`) when every rank runs on
    /// this node (the same host name and boot id) and has `dir`: rank 0 decides and names the
    /// files. Every rank calls it, once, after connecting.
    pub fn use_shared_memory(&mut self, dir: &Path) -> Result<()> {
        let here = node_id().filter(|_| dir.is_dir()).unwrap_or_default();
        let all = self.gather(here.into_bytes())?;
        let tag = match self.rank {
            0 if all.iter().all(|n| !n.is_empty() && *n == all[0]) => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                format!("{}-{nanos:08x}", std::process::id())
            }
            _ => String::new(),
        };
        let tag = String::from_utf8_lossy(&self.broadcast(tag.into_bytes())?).into_owned();
        if !tag.is_empty() {
            self.shm = Some(Shm::new(dir.to_path_buf(), tag, self.rank, self.world()));
        }
        Ok(())
    }

    /// Whether large sums go through shared memory (until a region cannot grow).
    pub fn shared_memory(&self) -> bool {
        self.shm.is_some()
    }

    /// Replaces `flat` by the sum over the ranks of their `flat`, segment by segment.
    pub fn reduce<T>(&mut self, flat: &mut [T], segments: &[Segment]) -> Result<()>
    where
        T: bytemuck::Pod + AddAssign + Send + Sync,
    {
        let covered: usize = segments.iter().map(|s| s.len).sum();
        if covered != flat.len() {
            return Err(TrainError::Internal(format!(
                "a sum of {} values with segments covering {covered}",
                flat.len()
            )));
        }
        if std::mem::size_of_val(flat) >= MESH_BYTES {
            if let Some(mut shm) = self.shm.take() {
                if shm.reduce(self, flat, segments)? {
                    self.shm = Some(shm);
                    return Ok(());
                }
            }
            self.mesh_reduce(flat, segments)
        } else {
            self.hub_reduce(flat, segments)
        }
    }

    fn hub_reduce<T>(&mut self, flat: &mut [T], segments: &[Segment]) -> Result<()>
    where
        T: bytemuck::Pod + AddAssign,
    {
        if self.rank != 0 {
            let root = self.root();
            root.tx.write_values(flat)?;
            return root.rx.read_into(flat);
        }
        let mut parts = Vec::with_capacity(self.world() - 1);
        for p in self.workers() {
            let mut v = vec![T::zeroed(); flat.len()];
            p.rx.read_into(&mut v)?;
            parts.push(v);
        }
        let mut sum = vec![T::zeroed(); flat.len()];
        let all: Vec<&[T]> = std::iter::once(&*flat)
            .chain(parts.iter().map(Vec::as_slice))
            .collect();
        fold(&mut sum, 0, &all, segments);
        for p in self.workers() {
            p.tx.write_values(&sum)?;
        }
        flat.copy_from_slice(&sum);
        Ok(())
    }

    fn mesh_reduce<T>(&mut self, flat: &mut [T], segments: &[Segment]) -> Result<()>
    where
        T: bytemuck::Pod + AddAssign + Send + Sync,
    {
        let (world, me) = (self.world(), self.rank);
        let chunks = chunks(flat.len(), world);
        let mine = chunks[me].clone();
        // Reduce-scatter: chunk c to rank c; chunk `me` of every rank here.
        let mut received: Vec<Vec<T>> = (0..world)
            .map(|r| match r == me {
                true => Vec::new(),
                false => vec![T::zeroed(); mine.len()],
            })
            .collect();
        let sends = chunks.iter().map(|c| Some(&flat[c.clone()])).collect();
        let recvs = received.iter_mut().map(|v| Some(&mut v[..])).collect();
        exchange(&mut self.peers, sends, recvs)?;
        let mut sum = vec![T::zeroed(); mine.len()];
        let parts: Vec<&[T]> = (0..world)
            .map(|r| match r == me {
                true => &flat[mine.clone()],
                false => &received[r][..],
            })
            .collect();
        fold(&mut sum, mine.start, &parts, segments);
        drop(received);
        // All-gather: these sums to every rank; chunk c from rank c.
        let sends = (0..world).map(|_| Some(&sum[..])).collect();
        let mut recvs = Vec::with_capacity(world);
        let mut rest = &mut flat[..];
        for c in &chunks {
            let (head, tail) = rest.split_at_mut(c.len());
            recvs.push(Some(head));
            rest = tail;
        }
        recvs[me] = None;
        exchange(&mut self.peers, sends, recvs)?;
        flat[mine].copy_from_slice(&sum);
        Ok(())
    }

    /// Every rank's `own`, in rank order, on rank 0; an empty list on the others.
    pub fn gather(&mut self, own: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        if self.rank != 0 {
            self.root().tx.write_values(&own)?;
            return Ok(Vec::new());
        }
        let mut all = vec![own];
        for p in self.workers() {
            all.push(p.rx.read_bytes()?);
        }
        Ok(all)
    }

    /// Rank 0's `own` on every rank.
    pub fn broadcast(&mut self, own: Vec<u8>) -> Result<Vec<u8>> {
        if self.rank != 0 {
            return self.root().rx.read_bytes();
        }
        for p in self.workers() {
            p.tx.write_values(&own)?;
        }
        Ok(own)
    }

    /// A worker's connection to rank 0.
    fn root(&mut self) -> &mut Peer {
        self.peers[0]
            .as_mut()
            .expect("a worker is connected to rank 0")
    }

    /// Rank 0's connections, in rank order.
    fn workers(&mut self) -> impl Iterator<Item = &mut Peer> {
        self.peers.iter_mut().flatten()
    }
}

/// Sends `sends[r]` to and receives `recvs[r]` from every rank r at once: each direction of
/// each connection in a thread of its own, so that the copies through the sockets overlap
/// and no rank blocks writing to a peer that is writing too. The first error in rank order.
fn exchange<T: bytemuck::Pod + Send + Sync>(
    peers: &mut [Option<Peer>],
    sends: Vec<Option<&[T]>>,
    recvs: Vec<Option<&mut [T]>>,
) -> Result<()> {
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for ((peer, send), recv) in peers.iter_mut().zip(sends).zip(recvs) {
            let Some(Peer { rx, tx }) = peer else {
                continue;
            };
            if let Some(values) = send {
                handles.push(s.spawn(move || tx.write_values(values)));
            }
            if let Some(out) = recv {
                handles.push(s.spawn(move || rx.read_into(out)));
            }
        }
        let results: Vec<Result<()>> = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(TrainError::Internal("a socket thread panicked".into()))
                })
            })
            .collect();
        results.into_iter().collect()
    })
}

/// The W chunks of a sum of `len` values, rank c's the c-th (the mesh's and shared memory's
/// reduce-scatter).
pub(super) fn chunks(len: usize, world: usize) -> Vec<Range<usize>> {
    (0..world)
        .map(|c| c * len / world..(c + 1) * len / world)
        .collect()
}

/// What tells one node from another: its host name and boot id (`None` where either cannot
/// be read).
fn node_id() -> Option<String> {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    Some(format!(
        "{}/{}",
        read("/proc/sys/kernel/hostname")?,
        read("/proc/sys/kernel/random/boot_id")?
    ))
}

/// `out` = the sum, over each segment's holders in rank order, of the values at positions
/// `at..at + out.len()` of the whole sum; `parts[r]` holds rank r's values of those positions.
pub(super) fn fold<T: bytemuck::Pod + AddAssign>(
    out: &mut [T],
    at: usize,
    parts: &[&[T]],
    segments: &[Segment],
) {
    let end = at + out.len();
    let mut start = 0;
    for seg in segments {
        let (lo, hi) = (start.max(at), (start + seg.len).min(end));
        start += seg.len;
        if lo < hi {
            let (lo, hi) = (lo - at, hi - at);
            let dst = &mut out[lo..hi];
            let mut holders = seg.holders.iter();
            match holders.next() {
                Some(&r) => dst.copy_from_slice(&parts[r][lo..hi]),
                None => dst.fill(T::zeroed()),
            }
            for &r in holders {
                dst.iter_mut()
                    .zip(&parts[r][lo..hi])
                    .for_each(|(a, &b)| *a += b);
            }
        }
        if start >= end {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_adds_each_segments_holders_in_rank_order_within_any_window() {
        let parts: Vec<Vec<f32>> = vec![
            vec![1.0, 1.0, 5.0, 0.0, 7.0],
            vec![1e8, 1e8, 6.0, -0.0, 8.0],
            vec![-1e8, -1e8, 0.0, 0.0, 9.0],
        ];
        let segs = [
            Segment {
                len: 2,
                holders: vec![0, 1, 2],
            },
            Segment {
                len: 2,
                holders: vec![1],
            },
            Segment {
                len: 1,
                holders: vec![0, 2],
            },
        ];
        let want = [
            (1.0f32 + 1e8) + -1e8,
            (1.0f32 + 1e8) + -1e8,
            6.0,
            -0.0,
            16.0,
        ];
        // Every window, as a mesh chunk of any bounds sees it.
        for at in 0..5 {
            for end in at..=5 {
                let views: Vec<&[f32]> = parts.iter().map(|p| &p[at..end]).collect();
                let mut out = vec![f32::NAN; end - at];
                fold(&mut out, at, &views, &segs);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&out), bits(&want[at..end]), "{at}..{end}");
            }
        }
    }
}
