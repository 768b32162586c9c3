//! Large sums through shared memory (`dist::shm`): the TCP mesh's bits, regions that grow and
//! leave no files, a fallback to TCP that every rank takes together, a rank that dies.

use super::*;
use std::path::PathBuf;

/// Sums of three lengths from the mesh threshold on (the regions grow, then a smaller one
/// reuses them), rank 1 absent from the odd ones, then eight more of one length with other
/// values each time (a rank that wrote its next values before the others read its sums
/// would show), then one of segments with different holders; with each rank's
/// shared-memory state after. Sums from 1.5 MiB on go in pieces (`shm::PIECE_BYTES` in tests).
fn sums(g: &mut Group) -> Result<(bool, Vec<Option<Vec<u32>>>)> {
    let r = g.rank();
    let q = link::MESH_BYTES / 4;
    let mut out = Vec::new();
    let value = |i: usize, k: usize| ([1.0f32, 1e8, -1e8][r] + i as f32) * (1 + k % 5) as f32;
    for (i, len) in [q, 3 * q + 5, q + 7].into_iter().enumerate() {
        let values = (r != 1 || len % 2 == 0).then(|| (0..len).map(|k| value(i, k)).collect());
        let sum = g.sum_f32(values, len)?;
        out.push(sum.map(|v| v.iter().map(|x| x.to_bits()).collect()));
    }
    // Back to back, as a step's buckets go (no other collective between them).
    let everyone = [Segment {
        len: 2 * q,
        holders: vec![0, 1, 2],
    }];
    for i in 3..11 {
        let mut values: Vec<f32> = (0..2 * q).map(|k| value(i, k)).collect();
        g.sum_segments(&mut values, &everyone)?;
        out.push(Some(values.iter().map(|x| x.to_bits()).collect()));
    }
    // Segments of other holders across the pieces' bounds (a sum of several pieces adds each
    // piece's values over the holders of their own positions).
    let segments: Vec<Segment> = [(q / 3, vec![0, 1, 2]), (q * 2, vec![1]), (q, vec![0, 2])]
        .into_iter()
        .map(|(len, holders)| Segment { len, holders })
        .collect();
    let len = segments.iter().map(|s| s.len).sum();
    let mut values: Vec<f32> = (0..len).map(|k| value(11, k)).collect();
    g.sum_segments(&mut values, &segments)?;
    out.push(Some(values.iter().map(|x| x.to_bits()).collect()));
    Ok((g.shared_memory(), out))
}

/// Where two lists of sums first differ (the lists are too long to print).
fn first_difference(a: &[Option<Vec<u32>>], b: &[Option<Vec<u32>>]) -> Option<(usize, usize)> {
    a.iter()
        .zip(b)
        .enumerate()
        .find_map(|(i, (x, y))| match (x, y) {
            (Some(x), Some(y)) if x.len() == y.len() => {
                x.iter().zip(y).position(|(p, q)| p != q).map(|k| (i, k))
            }
            (None, None) => None,
            _ => Some((i, usize::MAX)),
        })
}

fn tcp_sums() -> Vec<Option<Vec<u32>>> {
    let results = on_ranks(3, |_| [8; 32], sums);
    let (shared, first) = results[0].as_ref().unwrap().clone();
    assert!(!shared);
    for r in &results {
        let diff = first_difference(&r.as_ref().unwrap().1, &first);
        assert_eq!(diff, None, "the same bits on every rank");
    }
    first
}

#[test]
fn shared_memory_sums_are_the_tcp_sums_and_leave_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let results = on_ranks_sharing(3, move |_| Some(d.clone()), |_| [8; 32], sums);
    let want = tcp_sums();
    // 1 + 1e8 − 1e8 in rank order is 0; the odd lengths skip rank 1.
    assert_eq!(want[0].as_ref().unwrap()[0], 0f32.to_bits());
    assert_eq!(
        want[1].as_ref().unwrap()[0],
        (2.0f32 + (-1e8 + 1.0)).to_bits()
    );
    for (r, got) in results.into_iter().enumerate() {
        let (shared, got) = got.unwrap();
        assert!(shared, "rank {r} still sums through shared memory");
        assert_eq!(first_difference(&got, &want), None, "rank {r}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files are unlinked once mapped: {left:?}");
}

/// Rank 1's directory is another one than the others' (they cannot map each other's files),
/// or is gone by the first large sum (its file cannot be made): every rank falls back to TCP
/// at that sum, with the same sums, and no file stays.
#[test]
fn a_rank_without_shared_memory_takes_every_rank_to_tcp() {
    let want = tcp_sums();
    for remove in [false, true] {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
        let dirs = move |r: usize| Some(if r == 1 { pb.clone() } else { pa.clone() });
        let gone = b.path().to_path_buf();
        let results = on_ranks_sharing(
            3,
            dirs,
            |_| [8; 32],
            move |g| {
                assert!(
                    g.shared_memory(),
                    "every rank has its directory at the start"
                );
                if remove && g.rank() == 1 {
                    std::fs::remove_dir_all(&gone).unwrap();
                }
                sums(g)
            },
        );
        for (r, got) in results.into_iter().enumerate() {
            let (shared, got) = got.unwrap();
            assert!(!shared, "rank {r} fell back (remove {remove})");
            let diff = first_difference(&got, &want);
            assert_eq!(diff, None, "rank {r} (remove {remove})");
        }
        for d in [a.path(), b.path()] {
            if d.exists() {
                assert_eq!(std::fs::read_dir(d).unwrap().count(), 0, "{}", d.display());
            }
        }
    }
}

/// A rank that exits before the regions grow, or between two sums through them: its peers'
/// next barrier fails naming a rank that is gone (exit 1), nothing waits forever, and no
/// file is left.
#[test]
fn a_rank_gone_during_shared_memory_sums_fails_the_others() {
    for sums_before in [0, 1] {
        let dir = tempfile::tempdir().unwrap();
        let d: PathBuf = dir.path().to_path_buf();
        let len = link::MESH_BYTES / 4 + 1;
        let results = on_ranks_sharing(
            3,
            move |_| Some(d.clone()),
            |_| [2; 32],
            move |g| {
                let everyone = [Segment {
                    len,
                    holders: vec![0, 1, 2],
                }];
                for _ in 0..sums_before {
                    g.sum_segments(&mut vec![1.0f32; len], &everyone)?;
                }
                if g.rank() == 2 {
                    return Ok(());
                }
                g.sum_segments(&mut vec![1.0f32; len], &everyone)
            },
        );
        assert_ranks_0_and_1_failed(&results, "is gone");
        // Gone while the regions grow (the first case): the others' new files go too.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{sums_before} sums before: {left:?}");
    }
}
