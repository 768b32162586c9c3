//! `omr bench dist`: what the gradient exchange of a data-parallel step costs on this machine.
//! W ranks (threads, each with its own sockets, as W processes would have) sum `floats` f32
//! values split into tensors of `tensor` values on loopback, through the path
//! `Group::sum_grads` takes once per step (CPU tensors, buckets, shared memory or the TCP mesh
//! for large buckets),
//! and the same values already flat (the exchange alone: sockets and sums); the reference,
//! measured in the same run, is the same sums done in memory on one thread (rank order, no
//! sockets). One step before the timed ones warms the allocator and the sockets.

use super::{Group, Launch};
use crate::error::{Result, TrainError};
use candle_core::{DType, Device, Tensor, Var};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct DistBench {
    pub world: usize,
    /// Gradient values per rank per step (f32).
    pub floats: usize,
    /// Values per tensor.
    pub tensor: usize,
    pub steps: usize,
    /// The gradient tensors' dtype (the flat exchange is f32 either way).
    pub dtype: DType,
    /// Values per bucket (training's is `BUCKET_FLOATS`); with several buckets each one's
    /// exchange overlaps its neighbours' copies.
    pub bucket: usize,
    /// Large sums through shared memory (the default between the ranks of a node) or TCP.
    pub shm: bool,
}

#[derive(Clone, Debug)]
pub struct DistReport {
    pub bench: DistBench,
    /// Median over the steps, seconds: `sum_tensors` (tensors in, tensors out), the exchange
    /// of the flat values alone, and the in-memory sums.
    pub tensors_s: f64,
    pub exchange_s: f64,
    pub in_memory_s: f64,
}

impl DistReport {
    /// Gradient bytes per rank per step over the exchange's time.
    pub fn gb_per_s(&self) -> f64 {
        self.bench.floats as f64 * 4.0 / self.exchange_s / 1e9
    }

    pub fn format(&self) -> String {
        let b = &self.bench;
        format!(
            "gradient exchange, {} ranks on one node, {} ({:?} gradients, tensors of {} values, buckets of {:.1} MiB)\n\
             gradients per rank   {:>10.1} MB\n\
             exchange per step    {:>10.1} ms   {:.2} GB/s of gradients (flat values: sockets, sums)\n\
             with the tensors     {:>10.1} ms   (sum_grads' path: flatten, copy out, sum, copy back)\n\
             sums in memory       {:>10.1} ms   (1 thread, rank order)\n\
             in memory / exchange {:>10.2}x\n",
            b.world,
            if b.shm { "shared memory" } else { "TCP (loopback)" },
            b.dtype,
            b.tensor,
            (b.bucket * 4) as f64 / 1048576.0,
            b.floats as f64 * 4.0 / 1e6,
            self.exchange_s * 1e3,
            self.gb_per_s(),
            self.tensors_s * 1e3,
            self.in_memory_s * 1e3,
            self.in_memory_s / self.exchange_s,
        )
    }
}

pub fn run(b: &DistBench) -> Result<DistReport> {
    if b.world < 2 || b.floats == 0 || b.tensor == 0 || b.steps == 0 || b.bucket == 0 {
        return Err(TrainError::Usage(
            "omr bench dist needs --world >= 2 and positive --mfloats, --tensor, --steps, \
             --bucket-mfloats"
                .into(),
        ));
    }
    let sizes: Vec<usize> = (0..b.floats)
        .step_by(b.tensor)
        .map(|at| b.tensor.min(b.floats - at))
        .collect();
    let grads = |rank: usize| -> Vec<Vec<f32>> {
        sizes
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|i| ((i * 7 + rank * 13) % 101) as f32 * 1e-3)
                    .collect()
            })
            .collect()
    };

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| TrainError::Internal(format!("a free port: {e}")))?;
    let threads: Vec<_> = (0..b.world)
        .map(|rank| {
            let (world, steps, dtype, bucket) = (b.world, b.steps, b.dtype, b.bucket);
            let mut launch = Launch::loopback(rank, world, port);
            if !b.shm {
                launch.shm = None;
            }
            let mine = grads(rank);
            std::thread::spawn(move || -> Result<(Vec<f64>, Vec<f64>)> {
                let mut g = Group::connect(&launch, [0; 32])?;
                let vars = mine
                    .iter()
                    .map(|v| Var::zeros(v.len(), DType::F32, &Device::Cpu))
                    .collect::<candle_core::Result<Vec<Var>>>()?;
                let flat: Vec<f32> = mine.concat();
                let sums = mine
                    .into_iter()
                    .map(|v| {
                        let t = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?;
                        Ok(Some(t.to_dtype(dtype)?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let everyone = [g.everyone(flat.len())];
                let (mut tensors, mut exchange) = (Vec::new(), Vec::new());
                for _ in 0..=steps {
                    g.barrier()?;
                    let t = Instant::now();
                    g.sum_tensors(&vars, sums.clone(), bucket)?;
                    tensors.push(t.elapsed().as_secs_f64());
                    let mut values = flat.clone();
                    g.barrier()?;
                    let t = Instant::now();
                    g.sum_segments(&mut values, &everyone)?;
                    exchange.push(t.elapsed().as_secs_f64());
                }
                // The first step warms up.
                Ok((tensors.split_off(1), exchange.split_off(1)))
            })
        })
        .collect();
    let (mut tensors, mut exchange) = (Vec::new(), Vec::new());
    for (rank, t) in threads.into_iter().enumerate() {
        let times = t
            .join()
            .map_err(|_| TrainError::Internal(format!("bench rank {rank} panicked")))??;
        if rank == 0 {
            (tensors, exchange) = times;
        }
    }

    let all: Vec<Vec<Vec<f32>>> = (0..b.world).map(grads).collect();
    let mut in_memory = Vec::new();
    for _ in 0..b.steps {
        let t = Instant::now();
        for (i, &n) in sizes.iter().enumerate() {
            let mut acc = all[0][i].clone();
            for r in &all[1..] {
                acc.iter_mut().zip(&r[i]).for_each(|(a, x)| *a += x);
            }
            std::hint::black_box(&acc);
            debug_assert_eq!(acc.len(), n);
        }
        in_memory.push(t.elapsed().as_secs_f64());
    }
    Ok(DistReport {
        bench: b.clone(),
        tensors_s: median(tensors),
        exchange_s: median(exchange),
        in_memory_s: median(in_memory),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
