//! Large sums between the ranks of one node through shared memory instead of loopback TCP.
//!
//! Each rank has a region (a file in the shared-memory directory, `/dev/shm` by default,
//! mapped by every rank of the job and unlinked as soon as all have mapped it, so nothing is
//! left behind). A sum: every rank copies its values into its region (all but its own chunk,
//! which only it reads); rank c adds chunk c of every region (the mesh's reduce-scatter, read
//! in place instead of received) into chunk c of its own region; every rank copies chunk c
//! from region c (the all-gather). Three barriers through the TCP hub order the phases. The
//! values are added by the same `fold` as the TCP paths: the same bits. A sum larger than
//! [`PIECE_BYTES`] (256 MiB, a gradient bucket) goes in pieces, one after the other.
//!
//! Regions grow (all ranks at once: every rank sums the same lengths) to the largest piece
//! seen.
//! Their pages are reserved with `posix_fallocate`, so a full directory (a container's 64 MB
//! `/dev/shm`) is an error at growth, not a SIGBUS at a write; every rank then falls back to
//! the TCP mesh for the rest of the run, together, with a warning naming the rank and why.

use super::link::{chunks, fold, Link, Segment};
use crate::error::{Result, TrainError};
use memmap2::{Mmap, MmapMut};
use std::fs::{File, OpenOptions};
use std::ops::AddAssign;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};

/// Regions grow in steps of this many bytes.
const GRAIN: usize = 1 << 20;
/// A sum goes through the regions in pieces of at most this many bytes, so that a region
/// never needs more (the node's `/dev/shm` holds W of them). Tests cut smaller pieces, so
/// that their few-MiB sums take several.
pub const PIECE_BYTES: usize = if cfg!(test) { 3 << 19 } else { 256 << 20 };

/// This rank's view of the job's regions.
pub struct Shm {
    dir: PathBuf,
    /// Names this job's files apart from another job's on the node.
    tag: String,
    rank: usize,
    world: usize,
    /// Bytes of every region.
    cap: usize,
    generation: u64,
    mine: Option<MmapMut>,
    /// The other ranks' regions, by rank (`None` at this rank's index).
    others: Vec<Option<Mmap>>,
}

impl Shm {
    pub fn new(dir: PathBuf, tag: String, rank: usize, world: usize) -> Shm {
        Shm {
            dir,
            tag,
            rank,
            world,
            cap: 0,
            generation: 0,
            mine: None,
            others: (0..world).map(|_| None).collect(),
        }
    }

    fn path(&self, generation: u64, rank: usize) -> PathBuf {
        self.dir
            .join(format!("omr-dp-{}-{generation}-r{rank}", self.tag))
    }

    /// Replaces `flat` by the sum over the ranks, as `Link::reduce`, in pieces of at most
    /// [`PIECE_BYTES`]. `Ok(false)`: the regions could not grow on some rank, nothing was
    /// summed, and every rank should use the TCP mesh from now on.
    pub fn reduce<T>(
        &mut self,
        link: &mut Link,
        flat: &mut [T],
        segments: &[Segment],
    ) -> Result<bool>
    where
        T: bytemuck::Pod + AddAssign,
    {
        let piece = (PIECE_BYTES / std::mem::size_of::<T>()).max(1);
        if !self.grow(link, std::mem::size_of_val(&flat[..flat.len().min(piece)]))? {
            return Ok(false);
        }
        for (i, values) in flat.chunks_mut(piece).enumerate() {
            self.reduce_piece(link, values, i * piece, segments)?;
        }
        Ok(true)
    }

    /// The sum of `flat`, the values from position `base` on of the whole sum.
    fn reduce_piece<T>(
        &mut self,
        link: &mut Link,
        flat: &mut [T],
        base: usize,
        segments: &[Segment],
    ) -> Result<()>
    where
        T: bytemuck::Pod + AddAssign,
    {
        let (bytes, size) = (std::mem::size_of_val(flat), std::mem::size_of::<T>());
        let (world, me) = (self.world, self.rank);
        let chunks = chunks(flat.len(), world);
        let at = |c: usize| chunks[c].start * size..chunks[c].end * size;
        let Some(mine) = self.mine.as_mut().filter(|m| m.len() >= bytes) else {
            return Err(TrainError::Internal(format!(
                "shared memory: no region of {bytes} bytes"
            )));
        };
        // Every chunk but this rank's own, which only this rank reads (from `flat`).
        let own = at(me);
        mine[..own.start].copy_from_slice(bytemuck::cast_slice(&flat[..chunks[me].start]));
        mine[own.end..bytes].copy_from_slice(bytemuck::cast_slice(&flat[chunks[me].end..]));
        barrier(link)?;
        // Chunk `me` of every rank, read in place, summed into this rank's own chunk.
        let parts: Vec<&[T]> = (0..world)
            .map(|r| match &self.others[r] {
                Some(region) => bytemuck::cast_slice(&region[at(me)]),
                None => &flat[chunks[me].clone()],
            })
            .collect();
        fold(
            bytemuck::cast_slice_mut(&mut mine[own.clone()]),
            base + chunks[me].start,
            &parts,
            segments,
        );
        barrier(link)?;
        for (c, region) in self.others.iter().enumerate() {
            if let Some(region) = region {
                flat[chunks[c].clone()].copy_from_slice(bytemuck::cast_slice(&region[at(c)]));
            }
        }
        flat[chunks[me].clone()].copy_from_slice(bytemuck::cast_slice(&mine[own]));
        // Nobody writes its region again before every rank has read it.
        barrier(link)
    }

    /// Makes every rank's region hold at least `bytes`: each rank creates and reserves a new
    /// file, all map every file, then each unlinks its own. `Ok(false)` where any rank failed
    /// (every rank learns it, and this rank's new files are gone).
    fn grow(&mut self, link: &mut Link, bytes: usize) -> Result<bool> {
        if bytes <= self.cap {
            return Ok(true);
        }
        let cap = bytes.div_ceil(GRAIN) * GRAIN;
        let generation = self.generation + 1;
        let own = self.path(generation, self.rank);
        let created = create(&own, cap);
        let failed = created.as_ref().err().cloned();
        // A peer gone here (an error) leaves no file behind either.
        let agreed = agree(link, self.rank, failed, &own);
        if !matches!(agreed, Ok(true)) {
            let _ = std::fs::remove_file(&own);
            return agreed;
        }
        let mine = created.map_err(TrainError::Internal)?;
        let mut others: Vec<Option<Mmap>> = (0..self.world).map(|_| None).collect();
        let mut failed = None;
        for (r, slot) in others.iter_mut().enumerate() {
            if r != self.rank {
                let path = self.path(generation, r);
                match open(&path, cap) {
                    Ok(m) => *slot = Some(m),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        // Every rank has mapped every file (or failed to): the names can go.
        let agreed = agree(link, self.rank, failed, &own);
        let _ = std::fs::remove_file(&own);
        if !agreed? {
            return Ok(false);
        }
        (self.mine, self.others) = (Some(mine), others);
        (self.cap, self.generation) = (cap, generation);
        Ok(true)
    }
}

/// Whether no rank failed (`failed`: this rank's reason); the first failing rank's reason is
/// logged by rank 0. Every rank calls it at the same point.
fn agree(link: &mut Link, rank: usize, failed: Option<String>, own: &Path) -> Result<bool> {
    let mut failures = [f64::from(u8::from(failed.is_some()))];
    let everyone = Segment {
        len: 1,
        holders: (0..link.world()).collect(),
    };
    link.reduce(&mut failures, &[everyone])?;
    if let Some(why) = &failed {
        tracing::warn!(
            "data parallel: no shared memory on rank {rank} ({why}); the ranks of this node \
             exchange over TCP instead. Raise the size of {} (docker run --shm-size, e.g. 1g) \
             or set OMR_DIST_SHM to a larger tmpfs directory",
            own.parent()
                .map_or("the directory".into(), |p| p.display().to_string())
        );
    }
    if failures[0] > 0.0 {
        let _ = std::fs::remove_file(own);
        return Ok(false);
    }
    Ok(true)
}

fn barrier(link: &mut Link) -> Result<()> {
    fence(Ordering::SeqCst);
    link.reduce::<f64>(&mut [], &[])?;
    fence(Ordering::SeqCst);
    Ok(())
}

/// A new file of `cap` bytes at `path` with its pages reserved, mapped for writing.
fn create(path: &Path, cap: usize) -> std::result::Result<MmapMut, String> {
    let what = |e: std::io::Error| format!("{}: {e}", path.display());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(what)?;
    reserve(&file, cap).map_err(|e| {
        let _ = std::fs::remove_file(path);
        what(e)
    })?;
    // SAFETY: the file is this job's own (created above, unlinked once mapped); other ranks
    // read it only between the barriers that order this rank's writes.
    unsafe { MmapMut::map_mut(&file) }.map_err(what)
}

/// Another rank's file at `path`, `cap` bytes, mapped for reading.
fn open(path: &Path, cap: usize) -> std::result::Result<Mmap, String> {
    let what = |e: std::io::Error| format!("{}: {e}", path.display());
    let file = File::open(path).map_err(what)?;
    let len = file.metadata().map_err(what)?.len();
    if len != cap as u64 {
        return Err(format!("{}: {len} bytes, {cap} expected", path.display()));
    }
    // SAFETY: as in `create`: written by its rank only between the barriers.
    unsafe { Mmap::map(&file) }.map_err(what)
}

/// Sizes `file` to `len` bytes with every page allocated (tmpfs: ENOSPC now rather than a
/// SIGBUS at the first write past the directory's size).
fn reserve(file: &File, len: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: a valid open file descriptor; posix_fallocate reads no memory of ours.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}
