use super::*;
use std::net::TcpListener;
use std::thread;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A rank on loopback whose sums all go over TCP (`shm_tests` covers shared memory).
fn launch(rank: usize, world: usize, port: u16) -> Launch {
    Launch {
        timeout: Duration::from_secs(20),
        shm: None,
        ..Launch::loopback(rank, world, port)
    }
}

/// Runs `body` on `world` connected ranks (threads), each with its own fingerprint; returns
/// their results in rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    fingerprint: impl Fn(usize) -> [u8; 32],
    body: impl Fn(&mut Group) -> Result<T> + Send + Sync + Clone + 'static,
) -> Vec<Result<T>> {
    on_ranks_sharing(world, |_| None, fingerprint, body)
}

/// [`on_ranks`] with rank r's shared-memory directory `shm(r)`.
fn on_ranks_sharing<T: Send + 'static>(
    world: usize,
    shm: impl Fn(usize) -> Option<std::path::PathBuf>,
    fingerprint: impl Fn(usize) -> [u8; 32],
    body: impl Fn(&mut Group) -> Result<T> + Send + Sync + Clone + 'static,
) -> Vec<Result<T>> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let body = body.clone();
            let fp = fingerprint(r);
            let launch = Launch {
                shm: shm(r),
                ..launch(r, world, port)
            };
            thread::spawn(move || {
                let mut g = Group::connect(&launch, fp)?;
                body(&mut g)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Rank 2 of three ended well, and ranks 0 and 1 failed with exit 1 and `want` in the message.
fn assert_ranks_0_and_1_failed<T>(results: &[Result<T>], want: &str) {
    assert!(results[2].is_ok());
    for (r, result) in results[..2].iter().enumerate() {
        let e = result.as_ref().err().expect("ranks 0 and 1 fail");
        assert!(e.to_string().contains(want), "rank {r}: {e}");
        assert_eq!(e.exit_code(), 1);
    }
}

#[test]
fn sums_are_in_rank_order_and_equal_on_every_rank() {
    // 1 + 1e8 + (-1e8) in f32 is 0 in rank order; from the last rank on it is 1.
    let results = on_ranks(
        3,
        |_| [7; 32],
        |g| {
            let mine = [1.0f32, 1e8, -1e8][g.rank()];
            let a = g.sum_f32(Some(vec![mine, g.rank() as f32]), 2)?;
            let mut s = [g.rank() as f64 + 0.5, 1.0];
            g.sum_f64(&mut s)?;
            let any = g.any(g.rank() == 2)?;
            let none = g.any(false)?;
            g.barrier()?;
            Ok((a, s, any, none))
        },
    );
    for r in results {
        let (a, s, any, none) = r.unwrap();
        assert_eq!(a, Some(vec![(1.0f32 + 1e8) + -1e8, 3.0]));
        assert_eq!(s, [4.5, 3.0]);
        assert!(any && !none);
    }
}

#[test]
fn large_sums_exchanged_with_all_peers_at_once_are_the_same_sums() {
    // From link::MESH_BYTES on, sums go through the mesh (each rank adds a chunk): still
    // rank order, absent ranks skipped, and the chunks need not divide the length.
    let len = (link::MESH_BYTES / 4) * 3 + 5;
    let results = on_ranks(
        4,
        |_| [9; 32],
        move |g| {
            let r = g.rank();
            let mine = [1.0f32, 1e8, -1e8, 0.5][r];
            let v = (r != 3).then(|| vec![mine; len]);
            let sum = g.sum_f32(v, len)?;
            let only2 = g.sum_f32((r == 2).then(|| vec![-0.0f32; len]), len)?;
            Ok((sum, only2))
        },
    );
    for r in results {
        let (sum, only2) = r.unwrap();
        let sum = sum.unwrap();
        assert_eq!(sum.len(), len);
        assert!(
            sum.iter().all(|&x| x == (1.0f32 + 1e8) + -1e8),
            "{}",
            sum[0]
        );
        assert!(only2
            .unwrap()
            .iter()
            .all(|x| x.to_bits() == (-0.0f32).to_bits()));
    }
}

#[test]
fn gradients_summed_in_buckets_are_the_per_tensor_sums() {
    use candle_core::{DType, Device, Tensor, Var};
    // Sizes across the mesh threshold; buckets that cut the list in several ways.
    let sizes = [5usize, (link::MESH_BYTES / 4) + 3, 7, 1, 40_000, 3];
    let results = on_ranks(
        3,
        |_| [5; 32],
        move |g| {
            let r = g.rank();
            let vars: Vec<Var> = sizes
                .iter()
                .map(|&n| Var::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap())
                .collect();
            // Tensor i is on the ranks whose bit is set in `mask[i]`: all, one, none, two.
            let mask = [0b111, 0b010, 0b000, 0b101, 0b110, 0b001];
            let values = |i: usize| -> Option<Vec<f32>> {
                (mask[i] >> r & 1 == 1).then(|| {
                    (0..sizes[i])
                        .map(|k| [1.0f32, 1e8, -1e8][r] * (1.0 + (k % 7) as f32) + i as f32)
                        .collect()
                })
            };
            // The gradients' dtypes: all f32, all bf16 (one micro-batch of a bf16 run), or
            // mixed within a bucket and between the ranks (a parameter reached by only one
            // micro-batch keeps backward's bf16 next to others' f32 sums).
            let dtype = |scheme: usize, i: usize| match scheme {
                0 => DType::F32,
                1 => DType::BF16,
                _ if (i + r) % 2 == 0 => DType::BF16,
                _ => DType::F32,
            };
            let tensor = |scheme: usize, i: usize| {
                values(i).map(|v| {
                    Tensor::from_vec(v, sizes[i], &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype(scheme, i))
                        .unwrap()
                })
            };
            let mut out = Vec::new();
            for scheme in 0..3 {
                // The reference: each tensor's own sum of its f32 values (a bf16 value widened).
                let mut per_tensor = Vec::new();
                for i in 0..sizes.len() {
                    let mine = tensor(scheme, i)
                        .map(|t| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap());
                    per_tensor.push(g.sum_f32(mine, sizes[i])?);
                }
                let mut bucketed = Vec::new();
                for bucket in [1, 12, 50_000, usize::MAX] {
                    let all = (0..sizes.len()).map(|i| tensor(scheme, i)).collect();
                    let sums = g.sum_tensors(&vars, all, bucket)?;
                    let sums: Vec<Option<Vec<f32>>> = sums
                        .into_iter()
                        .map(|t| t.map(|t| t.to_vec1::<f32>().unwrap()))
                        .collect();
                    bucketed.push((scheme, bucket, sums));
                }
                out.push((per_tensor, bucketed));
            }
            Ok(out)
        },
    );
    let bits = |v: &Option<Vec<f32>>| {
        v.as_ref()
            .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    };
    let mut first = None;
    for r in results {
        let mut all = Vec::new();
        for (per_tensor, bucketed) in r.unwrap() {
            assert!(per_tensor[2].is_none(), "nobody holds tensor 2");
            for (scheme, bucket, sums) in &bucketed {
                for i in 0..sizes.len() {
                    assert_eq!(
                        bits(&sums[i]),
                        bits(&per_tensor[i]),
                        "dtypes {scheme}, bucket {bucket}, tensor {i}"
                    );
                }
            }
            all.push(per_tensor.iter().map(bits).collect::<Vec<_>>());
        }
        assert_ne!(all[0], all[1], "bf16 gradients are not the f32 ones");
        assert_eq!(
            first.get_or_insert_with(|| all.clone()),
            &all,
            "the same bits on every rank"
        );
    }
}

#[test]
fn a_rank_gone_before_a_mesh_sum_fails_the_others() {
    let len = link::MESH_BYTES; // four times the threshold's floats: the mesh
    let results = on_ranks(
        3,
        |_| [4; 32],
        move |g| {
            if g.rank() == 2 {
                return Ok(());
            }
            let mut flat = vec![1.0f32; len];
            let everyone = Segment {
                len,
                holders: vec![0, 1, 2],
            };
            g.sum_segments(&mut flat, &[everyone])
        },
    );
    assert_ranks_0_and_1_failed(&results, "rank 2 is gone");
}

/// A rank that dies between the holders' flags and the buckets: the others' exchange (on its
/// helper thread, next to the device copies) fails naming it, and no thread is left waiting.
#[test]
fn a_rank_gone_during_a_bucketed_sum_fails_the_others() {
    use candle_core::{DType, Device, Tensor, Var};
    let sizes = [link::MESH_BYTES / 4 + 1, 7, link::MESH_BYTES / 4];
    let results = on_ranks(
        3,
        |_| [6; 32],
        move |g| {
            let held = [true; 3];
            if g.rank() == 2 {
                g.holders(&held)?;
                return Ok(());
            }
            let vars: Vec<Var> = sizes
                .iter()
                .map(|&n| Var::zeros(n, DType::F32, &Device::Cpu).unwrap())
                .collect();
            let sums = sizes
                .iter()
                .map(|&n| Some(Tensor::ones(n, DType::BF16, &Device::Cpu).unwrap()))
                .collect();
            g.sum_tensors(&vars, sums, 8).map(drop)
        },
    );
    assert_ranks_0_and_1_failed(&results, "rank 2 is gone");
}

#[test]
fn absent_values_are_skipped_and_a_single_holder_keeps_its_bits() {
    let results = on_ranks(
        3,
        |_| [0; 32],
        |g| {
            // Only rank 1 has the first; nobody the second; ranks 0 and 2 the third.
            let only1 = g.sum_f32((g.rank() == 1).then(|| vec![-0.0f32, 2.5]), 2)?;
            let nobody = g.sum_f32(None, 3)?;
            let some = g.sum_f32((g.rank() != 1).then(|| vec![g.rank() as f32]), 1)?;
            Ok((only1, nobody, some))
        },
    );
    for r in results {
        let (only1, nobody, some) = r.unwrap();
        let only1 = only1.unwrap();
        assert_eq!(only1[0].to_bits(), (-0.0f32).to_bits(), "not 0.0 + -0.0");
        assert_eq!(only1[1], 2.5);
        assert_eq!(nobody, None);
        assert_eq!(some, Some(vec![2.0]));
    }
}

#[test]
fn gather_and_broadcast() {
    let results = on_ranks(
        3,
        |_| [1; 32],
        |g| {
            let all = g.gather(vec![g.rank() as u8; g.rank() + 1])?;
            let b = g.broadcast_value(&format!("from {}", g.rank()))?;
            // Floats keep their bits, NaN and the last ulp included.
            let odd = [f64::NAN, 0.1 + 0.2, -0.0, g.rank() as f64];
            let floats = g.all_gather_value(&odd.to_vec())?;
            for (r, v) in floats.iter().enumerate() {
                let want = [f64::NAN, 0.1 + 0.2, -0.0, r as f64];
                assert!(v.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
            Ok((g.rank(), all, b))
        },
    );
    for r in results {
        let (rank, all, b) = r.unwrap();
        if rank == 0 {
            assert_eq!(all, vec![vec![0], vec![1, 1], vec![2, 2, 2]]);
        } else {
            assert!(all.is_empty());
        }
        assert_eq!(b, "from 0");
    }
}

#[test]
fn another_config_on_one_rank_is_refused_on_both() {
    let results = on_ranks(2, |r| [r as u8; 32], |_| Ok(()));
    for r in results {
        let e = r.unwrap_err();
        assert!(matches!(e, TrainError::Usage(_)), "{e}");
        assert!(e.to_string().contains("another config"), "{e}");
    }
}

#[test]
fn a_rank_that_exits_fails_its_peers_instead_of_hanging() {
    let results = on_ranks(
        3,
        |_| [3; 32],
        |g| {
            g.barrier()?;
            if g.rank() == 2 {
                return Ok(()); // drops its connection, as a process that exits
            }
            g.barrier()?; // rank 0 finds rank 2 gone; rank 1 then finds rank 0 gone
            Ok(())
        },
    );
    assert!(results[2].is_ok());
    for (r, want) in [(0, "rank 2 is gone"), (1, "rank 0 is gone")] {
        let e = results[r].as_ref().unwrap_err();
        assert!(e.to_string().contains(want), "rank {r}: {e}");
        assert_eq!(e.exit_code(), 1);
    }
}

#[test]
fn a_silent_rank_times_out_with_the_watchdog_code() {
    let port = free_port();
    let worker = thread::spawn(move || {
        let mut g = Group::connect(&launch(1, 2, port), [0; 32]).unwrap();
        thread::sleep(Duration::from_millis(1500));
        drop(g.barrier());
    });
    let mut l = launch(0, 2, port);
    l.timeout = Duration::from_millis(300);
    let mut g = Group::connect(&l, [0; 32]).unwrap();
    let e = g.barrier().unwrap_err();
    assert_eq!(e.exit_code(), 67, "{e}");
    assert!(e.to_string().contains("no word from rank 1"), "{e}");
    drop(g);
    worker.join().unwrap();
}

#[test]
fn launch_variables() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(Launch::from_lookup(env(&[])).unwrap(), Launch::single());
    let l = Launch::from_lookup(env(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "3"),
        ("MASTER_ADDR", "node7"),
        ("MASTER_PORT", "29400"),
        ("LOCAL_WORLD_SIZE", "8"),
    ]))
    .unwrap();
    assert_eq!((l.rank, l.world, l.local_rank, l.local_world), (3, 8, 3, 8));
    assert_eq!((l.addr.as_str(), l.port), ("node7", 29400));
    let l = Launch::from_lookup(env(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_JOB_ID", "123456"),
    ]))
    .unwrap();
    assert_eq!((l.rank, l.world, l.local_rank, l.gpu), (5, 8, 1, 1));
    assert_eq!((l.addr.as_str(), l.port), ("127.0.0.1", 23456));
    // srun --gpus-per-task=1: each task sees its one GPU as device 0.
    let l = Launch::from_lookup(env(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("CUDA_VISIBLE_DEVICES", "1"),
    ]))
    .unwrap();
    assert_eq!((l.local_rank, l.gpu), (1, 0));
    // Shared memory between the ranks of a node: /dev/shm unless OMR_DIST_SHM says otherwise.
    assert_eq!(l.shm.as_deref(), Some(std::path::Path::new("/dev/shm")));
    for (value, want) in [("off", None), ("0", None), ("/run/omr", Some("/run/omr"))] {
        let get = |k: &str| match k {
            "RANK" => Some("1".to_string()),
            "WORLD_SIZE" => Some("2".to_string()),
            "OMR_DIST_SHM" => Some(value.to_string()),
            _ => None,
        };
        let l = Launch::from_lookup(get).unwrap();
        assert_eq!(l.shm, want.map(std::path::PathBuf::from), "{value}");
    }
    for (vars, want) in [
        (&[("RANK", "x"), ("WORLD_SIZE", "2")][..], "RANK=\"x\""),
        (&[("RANK", "2"), ("WORLD_SIZE", "2")][..], "below the world"),
        (
            &[
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "8"),
                ("SLURM_NNODES", "2"),
            ][..],
            "MASTER_ADDR",
        ),
        (
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")][..],
            "not a TCP port",
        ),
    ] {
        let vars: &'static [(&'static str, &'static str)] = Box::leak(vars.to_vec().into());
        let e = Launch::from_lookup(env(vars)).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        assert_eq!(e.exit_code(), 2);
    }
}

#[test]
fn the_exchange_benchmark_times_both_sides() {
    let r = bench::run(&bench::DistBench {
        world: 3,
        floats: 10_000,
        tensor: 3_000,
        steps: 2,
        dtype: candle_core::DType::BF16,
        bucket: 4_000,
        shm: true,
    })
    .unwrap();
    assert!(
        r.exchange_s > 0.0 && r.tensors_s > 0.0 && r.in_memory_s > 0.0,
        "{r:?}"
    );
    assert!(r.format().contains("3 ranks"), "{}", r.format());
    assert!(r.format().contains("BF16 gradients"), "{}", r.format());
    assert!(bench::run(&bench::DistBench {
        world: 1,
        ..r.bench
    })
    .is_err());
}

#[test]
fn processes_of_one_node_share_its_cores_for_data_loading() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = Group::single();
    assert_eq!(g.loader_threads(0), 0, "one process: all cores (0)");
    g.local_world = 4;
    assert_eq!(g.loader_threads(0), (cores / 4).max(1));
    assert_eq!(g.loader_threads(3), 3, "a configured count stays");
}

mod shm_tests;
