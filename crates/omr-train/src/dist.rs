//! Data parallelism: one process per GPU, gradients summed between the processes before each
//! optimizer step, so that W processes with `grad_accum` A train as one process with A·W.
//!
//! Launch: torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or
//! `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`; `MASTER_ADDR` from the batch
//! script on several nodes). [`Launch::from_env`] reads them; a world of one (nothing set) is
//! the single-process run, which goes through the same code with every collective a no-op.
//!
//! Notable choices:
//! - **TCP between every pair of ranks** ([`rendezvous`], [`tcp`]): rank 0 listens on
//!   `MASTER_PORT`; every other rank connects to it, then to the others on ports the system
//!   picks. Sums are added *in rank order* over the ranks that hold each value ([`link`]), so
//!   every rank holds the same bits, and with one micro-batch per rank they are the sums a
//!   single process makes with `grad_accum` = W (rank r's batch is that process's micro-batch
//!   r). Small sums (loss totals, flags) go through rank 0; from 1 MiB on a sum goes through
//!   the mesh (reduce-scatter, then all-gather: each rank sends and receives 2·(W−1)/W copies,
//!   all peers at once), or through shared memory when every rank is on one node ([`shm`]).
//!   Gradients travel in buckets of up to 256 MiB of f32 ([`buckets`]), one copy off the
//!   device each, in their own dtype (bf16 at half the bytes, widened on the host). Other
//!   messages (data cursors, rollout summaries, eval counts) travel as postcard bytes through
//!   rank 0, every f64 with its bits.
//! - **No hang on a dead peer.** A process that exits (an error, a kill) closes its sockets; its
//!   peers' next collective fails naming its rank (exit 1), so the whole job stops instead of
//!   waiting. A live but stuck peer fails the others after `OMR_DIST_TIMEOUT_S` (default 3600
//!   s) with exit 67 (watchdog).
//! - **The same config everywhere.** The rendezvous compares a hash of each rank's resolved
//!   config with rank 0's and refuses a mismatch, before any model is loaded.

pub mod bench;
mod buckets;
mod link;
mod rendezvous;
mod shm;
mod tcp;

use crate::error::{Result, TrainError};
pub use buckets::BUCKET_FLOATS;
pub use link::Segment;
use omr_data::loader::Rank;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

/// Where the ranks of one node share memory by default.
pub const SHM_DIR: &str = "/dev/shm";
/// How long the rendezvous waits for all ranks, and a collective for its peers, by default.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(300);
pub const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where this process sits in its job, read from the launcher's environment.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// The GPU of this process on its node (`LOCAL_RANK`, `SLURM_LOCALID`; 0 if neither).
    pub local_rank: usize,
    /// The CUDA ordinal this process trains on: its local rank, or 0 where the launcher left
    /// it one visible GPU (`CUDA_VISIBLE_DEVICES` of one entry, as `srun --gpus-per-task=1`
    /// sets it).
    pub gpu: usize,
    /// Processes of the job on this node (`LOCAL_WORLD_SIZE`, which torchrun sets; 1 if unset).
    pub local_world: usize,
    /// Rank 0's host and port (`MASTER_ADDR`, `MASTER_PORT`).
    pub addr: String,
    pub port: u16,
    /// Silence from a peer longer than this fails the collective (`OMR_DIST_TIMEOUT_S`).
    pub timeout: Duration,
    /// The variables rank and world came from, for messages.
    pub vars: (&'static str, &'static str),
    /// Where ranks of one node put the files of their shared-memory exchange (`OMR_DIST_SHM`:
    /// `/dev/shm` unless set; `0` or `off`: none, every sum over TCP).
    pub shm: Option<PathBuf>,
}

impl Launch {
    pub fn single() -> Launch {
        Launch {
            rank: 0,
            world: 1,
            local_rank: 0,
            gpu: 0,
            local_world: 1,
            addr: String::new(),
            port: 0,
            timeout: COLLECTIVE_TIMEOUT,
            vars: ("", ""),
            shm: None,
        }
    }

    /// Rank `rank` of `world` with rank 0 on this machine's `port` (each rank on GPU 0): for
    /// a caller that starts its ranks itself, as threads or processes (benchmarks, tests).
    pub fn loopback(rank: usize, world: usize, port: u16) -> Launch {
        Launch {
            rank,
            world,
            local_rank: rank,
            gpu: 0,
            local_world: world,
            addr: "127.0.0.1".into(),
            port,
            timeout: COLLECTIVE_TIMEOUT,
            vars: ("", ""),
            shm: Some(PathBuf::from(SHM_DIR)),
        }
    }

    pub fn from_env() -> Result<Launch> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`Launch::from_env`] over any lookup (tests). A variable that is set but does not parse
    /// is an error naming it; so is a multi-node SLURM job without `MASTER_ADDR`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Launch> {
        let parse =
            |name: &str| -> Result<Option<u64>> {
                match get(name) {
                    None => Ok(None),
                    Some(v) => v.trim().parse().map(Some).map_err(|_| {
                        TrainError::Usage(format!("{name}={v:?} is not a whole number"))
                    }),
                }
            };
        // Every pair that is set must be valid; the first one set is this process's.
        let mut found = None;
        for (r, w) in Rank::VARS {
            if let (Some(rank), Some(world)) = (parse(r)?, parse(w)?) {
                if world == 0 || rank >= world {
                    return Err(TrainError::Usage(format!(
                        "{r}={rank} and {w}={world}: a rank must be below the world size"
                    )));
                }
                found.get_or_insert((rank as usize, world as usize, (r, w)));
            }
        }
        let Some((rank, world, vars)) = found.filter(|&(_, world, _)| world > 1) else {
            return Ok(Launch::single());
        };
        let local_rank = match parse("LOCAL_RANK")? {
            Some(l) => l,
            None => parse("SLURM_LOCALID")?.unwrap_or(0),
        } as usize;
        let one_visible =
            get("CUDA_VISIBLE_DEVICES").is_some_and(|v| !v.trim().is_empty() && !v.contains(','));
        let gpu = if one_visible { 0 } else { local_rank };
        let local_world = parse("LOCAL_WORLD_SIZE")?.unwrap_or(1).max(1) as usize;
        let nodes = parse("SLURM_NNODES")?.unwrap_or(1);
        let addr = match get("MASTER_ADDR") {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            _ if nodes > 1 => {
                return Err(TrainError::Usage(format!(
                    "{}={} over {nodes} nodes, but MASTER_ADDR is not set: the other ranks \
                     cannot find rank 0. Add `export MASTER_ADDR=$(scontrol show hostnames \
                     \"$SLURM_JOB_NODELIST\" | head -n 1)` to the batch script",
                    vars.1, world
                )))
            }
            _ => "127.0.0.1".to_string(),
        };
        // torchrun always sets MASTER_PORT; under srun a port from the job id keeps two jobs
        // sharing a node apart.
        let port = match parse("MASTER_PORT")? {
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| TrainError::Usage(format!("MASTER_PORT={p} is not a TCP port")))?,
            None => match parse("SLURM_JOB_ID")? {
                Some(job) => 20000 + (job % 20000) as u16,
                None => 29500,
            },
        };
        let timeout = match parse("OMR_DIST_TIMEOUT_S")? {
            Some(0) | None => COLLECTIVE_TIMEOUT,
            Some(s) => Duration::from_secs(s),
        };
        let shm = match get("OMR_DIST_SHM").map(|v| v.trim().to_string()) {
            None => Some(PathBuf::from(SHM_DIR)),
            Some(v) if ["", "0", "off", "false", "no"].contains(&v.as_str()) => None,
            Some(v) => Some(PathBuf::from(v)),
        };
        Ok(Launch {
            rank,
            world,
            local_rank,
            gpu,
            local_world,
            addr,
            port,
            timeout,
            vars,
            shm,
        })
    }

    /// "rank 1 of 4 (RANK/WORLD_SIZE), local rank 1 on GPU 1, rank 0 at 10.0.0.1:29500".
    pub fn describe(&self) -> String {
        format!(
            "rank {} of {} ({}/{}), local rank {} on GPU {}, rank 0 at {}:{}",
            self.rank,
            self.world,
            self.vars.0,
            self.vars.1,
            self.local_rank,
            self.gpu,
            self.addr,
            self.port
        )
    }
}

/// The processes of one job, connected. Every collective must be called by every rank, in the
/// same order; each returns the same result on every rank.
pub struct Group {
    rank: usize,
    world: usize,
    local_world: usize,
    link: Option<link::Link>,
}

impl Group {
    /// The world of one: every collective returns its input.
    pub fn single() -> Group {
        Group {
            rank: 0,
            world: 1,
            local_world: 1,
            link: None,
        }
    }

    /// Connects the ranks of `launch` (a no-op for a world of one). `fingerprint` is what
    /// must be equal on every rank (a hash of the resolved config): a mismatch is refused on
    /// all of them.
    pub fn connect(launch: &Launch, fingerprint: [u8; 32]) -> Result<Group> {
        if launch.world <= 1 {
            return Ok(Group::single());
        }
        let link = rendezvous::connect(launch, fingerprint, CONNECT_TIMEOUT)?;
        let mut group = Group {
            rank: launch.rank,
            world: launch.world,
            local_world: launch.local_world,
            link: Some(link),
        };
        // Returns once every rank holds all its connections.
        group.barrier()?;
        tracing::info!(
            "data parallel: {}; large sums {}",
            launch.describe(),
            match group.shared_memory() {
                true => "through shared memory (one node)",
                false => "over TCP",
            }
        );
        Ok(group)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Whether this group's large sums go through shared memory (all ranks on one node).
    pub fn shared_memory(&self) -> bool {
        self.link.as_ref().is_some_and(link::Link::shared_memory)
    }

    /// The loader's stripe for this process.
    pub fn data_rank(&self) -> Rank {
        Rank {
            rank: self.rank,
            world: self.world,
        }
    }

    /// Data loader threads for `configured` (`data.loader.threads`): as given, or for 0 (all
    /// cores) this node's cores shared among its processes (torchrun starts them all with
    /// every core in reach; srun binds each task to its own).
    pub fn loader_threads(&self, configured: usize) -> usize {
        if configured > 0 || self.local_world <= 1 {
            return configured;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / self.local_world).max(1)
    }

    /// Rank 0: the process that logs, evaluates, checkpoints and exports.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Sums `values` over the ranks, in place, in rank order (f64 sums).
    pub fn sum_f64(&mut self, values: &mut [f64]) -> Result<()> {
        let segments = [self.everyone(values.len())];
        self.sum_segments(values, &segments)
    }

    /// Whether `flag` holds on any rank.
    pub fn any(&mut self, flag: bool) -> Result<bool> {
        let mut v = [f64::from(u8::from(flag))];
        self.sum_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// Waits until every rank got here.
    pub fn barrier(&mut self) -> Result<()> {
        self.sum_f64(&mut [])
    }

    /// The f32 sum over the ranks that have `values` (`None`: this rank has none, e.g. a
    /// parameter its batches did not reach), added in rank order starting from the first
    /// rank that has them: with one rank holding values, the result is those bits. `None`
    /// when no rank has any. `len` is the length every rank's values must have.
    pub fn sum_f32(&mut self, values: Option<Vec<f32>>, len: usize) -> Result<Option<Vec<f32>>> {
        if let Some(v) = &values {
            if v.len() != len {
                return Err(TrainError::Internal(format!(
                    "sum_f32: {} values, {len} expected",
                    v.len()
                )));
            }
        }
        if self.link.is_none() {
            return Ok(values);
        }
        let holders = self.holders(&[values.is_some()])?.remove(0);
        if holders.is_empty() {
            return Ok(None);
        }
        let mut flat = values.unwrap_or_else(|| vec![0.0; len]);
        self.sum_segments(&mut flat, &[Segment { len, holders }])?;
        Ok(Some(flat))
    }

    /// Sums `flat` over the ranks, in place: each segment over its holders, in rank order
    /// (the others' values there are ignored). Every rank passes the same segments. Sums of
    /// 1 MiB and more go through the mesh (each rank sends and receives 2·(W−1)/W copies),
    /// smaller ones through rank 0; the bits are the same either way.
    pub fn sum_segments<T>(&mut self, flat: &mut [T], segments: &[Segment]) -> Result<()>
    where
        T: bytemuck::Pod + std::ops::AddAssign + Send + Sync,
    {
        match &mut self.link {
            None => Ok(()),
            Some(link) => link.reduce(flat, segments),
        }
    }

    /// For each of this rank's `held` flags, the ranks where it is set, in rank order.
    pub fn holders(&mut self, held: &[bool]) -> Result<Vec<Vec<usize>>> {
        let all: Vec<Vec<bool>> = self.all_gather_value(&held.to_vec())?;
        if let Some(r) = all.iter().position(|h| h.len() != held.len()) {
            return Err(TrainError::Internal(format!(
                "rank {r} sums {} tensors, rank {} {}: the ranks train different parameters",
                all[r].len(),
                self.rank,
                held.len()
            )));
        }
        Ok((0..held.len())
            .map(|i| (0..all.len()).filter(|&r| all[r][i]).collect())
            .collect())
    }

    fn everyone(&self, len: usize) -> Segment {
        Segment {
            len,
            holders: (0..self.world).collect(),
        }
    }

    /// Every rank's `bytes`, in rank order, on rank 0; an empty list on the others.
    pub fn gather(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        match &mut self.link {
            None => Ok(vec![bytes]),
            Some(link) => link.gather(bytes),
        }
    }

    /// Rank 0's `bytes` on every rank (the others' are ignored).
    pub fn broadcast(&mut self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        match &mut self.link {
            None => Ok(bytes),
            Some(link) => link.broadcast(bytes),
        }
    }

    /// Every rank's `value` on rank 0, in rank order; an empty list on the others. Values
    /// travel as postcard bytes: every f64 keeps its bits, NaN included.
    pub fn gather_value<T: Serialize + DeserializeOwned>(&mut self, value: &T) -> Result<Vec<T>> {
        self.gather(encode(value)?)?
            .iter()
            .map(|b| decode(b))
            .collect()
    }

    /// Every rank's `value` on every rank, in rank order.
    pub fn all_gather_value<T: Serialize + DeserializeOwned>(
        &mut self,
        value: &T,
    ) -> Result<Vec<T>> {
        let all = self.gather_value(value)?;
        self.broadcast_value(&all)
    }

    /// Rank 0's `value` on every rank (the others' are ignored).
    pub fn broadcast_value<T: Serialize + DeserializeOwned>(&mut self, value: &T) -> Result<T> {
        let back = self.broadcast(encode(value)?)?;
        decode(&back)
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(value).map_err(|e| TrainError::Internal(format!("a message: {e}")))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| TrainError::Internal(format!("a rank's message: {e}")))
}

#[cfg(test)]
mod tests;
