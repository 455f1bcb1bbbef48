//! Sub-groups (`ProcessGroup::split`) and the hybrid-sharding mesh on the thread-backed harness.

mod common;

use std::time::{Duration, Instant};

use bellows_dist::{
    chunk_range, run_local, DistConfig, Error, HybridMesh, NodePlacement, ProcessGroup, ReduceOp,
};
use common::{data, with_timeout};

fn cfg(timeout_secs: u64) -> DistConfig {
    DistConfig {
        timeout_secs,
        ..DistConfig::default()
    }
}

/// The elementwise sum of `data(r, len)` over the global ranks `ranks`.
fn sum_of(ranks: &[usize], len: usize) -> Vec<f64> {
    (0..len)
        .map(|i| ranks.iter().map(|&r| data(r, len)[i]).sum())
        .collect()
}

/// What one rank saw of one group: members, rank, and the results of four collectives on it.
#[derive(Debug, PartialEq)]
struct Seen {
    members: Vec<usize>,
    rank: usize,
    all_reduce: Vec<f64>,
    all_gather: Vec<f64>,
    reduce_scatter: Vec<f64>,
    broadcast: Vec<f64>,
}

/// Runs all_reduce, all_gather, reduce_scatter and broadcast (from group rank 0) on `pg`, each rank
/// contributing `data(global rank, len)`.
fn exercise(pg: &ProcessGroup, len: usize) -> Result<Seen, Error> {
    let global = pg.members()[pg.rank()];
    let mut all_reduce = data(global, len);
    pg.all_reduce(&mut all_reduce, ReduceOp::Sum)?;
    let mut all_gather = vec![0.0; len * pg.world_size()];
    pg.all_gather(&data(global, len), &mut all_gather)?;
    let mut reduce_scatter = vec![0.0; chunk_range(len, pg.world_size(), pg.rank()).len()];
    pg.reduce_scatter(&data(global, len), &mut reduce_scatter, ReduceOp::Sum)?;
    let mut broadcast = data(global, len);
    pg.broadcast(&mut broadcast, 0)?;
    Ok(Seen {
        members: pg.members().to_vec(),
        rank: pg.rank(),
        all_reduce,
        all_gather,
        reduce_scatter,
        broadcast,
    })
}

/// What `exercise` must return on the member at group rank `rank` of the group `members`.
fn expected(members: &[usize], rank: usize, len: usize) -> Seen {
    let sum = sum_of(members, len);
    Seen {
        members: members.to_vec(),
        rank,
        all_gather: members.iter().flat_map(|&r| data(r, len)).collect(),
        reduce_scatter: sum[chunk_range(len, members.len(), rank)].to_vec(),
        all_reduce: sum,
        broadcast: data(members[0], len),
    }
}

/// The (shard, replicate) members of every global rank of a 2 x 2 mesh.
fn mesh_2x2(placement: impl Fn(usize) -> NodePlacement + Sync) -> Vec<(Seen, Seen, Vec<f64>)> {
    let len = 1003;
    run_local(4, &cfg(30), |pg| {
        let mesh = HybridMesh::new(&pg, placement(pg.rank()))?;
        let shard = exercise(&mesh.shard, len)?;
        let replicate = exercise(&mesh.replicate, len)?;
        // The parent group still works after the splits.
        let mut whole = data(pg.rank(), len);
        pg.all_reduce(&mut whole, ReduceOp::Sum)?;
        Ok::<_, Error>((shard, replicate, whole))
    })
    .expect("harness")
    .into_iter()
    .enumerate()
    .map(|(rank, r)| r.unwrap_or_else(|e| panic!("rank {rank}: {e}")))
    .collect()
}

#[test]
fn hybrid_mesh_2x2_sums_node_peers_in_shard_and_slot_peers_in_replicate() {
    with_timeout(120, || {
        let out = mesh_2x2(|rank| NodePlacement::contiguous(rank, 2));
        // Nodes {0, 1} and {2, 3}; slots {0, 2} and {1, 3}.
        for (rank, (shard, replicate, whole)) in out.into_iter().enumerate() {
            let node: Vec<usize> = vec![rank / 2 * 2, rank / 2 * 2 + 1];
            let slot: Vec<usize> = vec![rank % 2, rank % 2 + 2];
            assert_eq!(shard, expected(&node, rank % 2, 1003), "rank {rank} shard");
            assert_eq!(
                replicate,
                expected(&slot, rank / 2, 1003),
                "rank {rank} replicate"
            );
            assert_eq!(whole, sum_of(&[0, 1, 2, 3], 1003), "rank {rank} parent");
        }
    });
}

#[test]
fn hybrid_mesh_follows_placement_when_ranks_are_not_numbered_node_by_node() {
    with_timeout(120, || {
        // Round-robin placement (Slurm `--distribution=cyclic`): rank r on node r % 2, slot r / 2.
        let out = mesh_2x2(|rank| NodePlacement {
            node_rank: rank % 2,
            local_rank: rank / 2,
            local_world_size: 2,
        });
        for (rank, (shard, replicate, _)) in out.into_iter().enumerate() {
            let node: Vec<usize> = vec![rank % 2, rank % 2 + 2];
            let slot: Vec<usize> = vec![rank / 2 * 2, rank / 2 * 2 + 1];
            assert_eq!(shard, expected(&node, rank / 2, 1003), "rank {rank} shard");
            assert_eq!(
                replicate,
                expected(&slot, rank % 2, 1003),
                "rank {rank} replicate"
            );
        }
    });
}

#[test]
fn world_3_splits_into_a_pair_and_a_single_rank() {
    with_timeout(60, || {
        let out = run_local(3, &cfg(30), |pg| {
            let sub = pg.split(pg.rank() / 2, 0)?;
            sub.barrier()?;
            let mut bytes = vec![pg.rank() as u8; 3 - pg.rank()];
            sub.broadcast_bytes(&mut bytes, 0)?;
            let seen = exercise(&sub, 17)?;
            let mut whole = data(pg.rank(), 17);
            pg.all_reduce(&mut whole, ReduceOp::Sum)?;
            Ok::<_, Error>((seen, bytes, sub.backend_name(), whole))
        })
        .expect("harness");
        for (rank, r) in out.into_iter().enumerate() {
            let (seen, bytes, backend, whole) = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
            let members: &[usize] = if rank < 2 { &[0, 1] } else { &[2] };
            assert_eq!(seen, expected(members, rank % 2, 17), "rank {rank}");
            assert_eq!(bytes, if rank < 2 { vec![0; 3] } else { vec![2] });
            assert_eq!(backend, if rank < 2 { "cpu" } else { "single" });
            assert_eq!(whole, sum_of(&[0, 1, 2], 17), "rank {rank} parent");
        }
    });
}

#[test]
fn repeated_and_nested_splits_get_their_own_connections() {
    with_timeout(120, || {
        let out = run_local(4, &cfg(30), |pg| {
            // Two splits with the same colours must not meet each other's rings in the store.
            let a = pg.split(pg.rank() % 2, pg.rank())?;
            let again = pg.split(pg.rank() % 2, pg.rank())?;
            // Keys reverse the order: group rank 0 is the highest parent rank.
            let reversed = pg.split(0, 10 - pg.rank())?;
            // Sub-groups split again: pairs of `reversed`, and single ranks of `a`.
            let nested = reversed.split(reversed.rank() / 2, 0)?;
            let single = a.split(a.rank(), 0)?;
            // Use them interleaved.
            let seen = [
                exercise(&again, 9)?,
                exercise(&a, 9)?,
                exercise(&reversed, 9)?,
                exercise(&nested, 9)?,
                exercise(&single, 9)?,
            ];
            Ok::<_, Error>(seen)
        })
        .expect("harness");
        for (rank, r) in out.into_iter().enumerate() {
            let [again, a, reversed, nested, single] =
                r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
            let pair = [rank % 2, rank % 2 + 2];
            assert_eq!(again, expected(&pair, rank / 2, 9), "rank {rank} again");
            assert_eq!(a, expected(&pair, rank / 2, 9), "rank {rank} first");
            assert_eq!(
                reversed,
                expected(&[3, 2, 1, 0], 3 - rank, 9),
                "rank {rank} keys"
            );
            let quad: &[usize] = if rank >= 2 { &[3, 2] } else { &[1, 0] };
            assert_eq!(
                nested,
                expected(quad, 1 - rank % 2, 9),
                "rank {rank} nested"
            );
            assert_eq!(single, expected(&[rank], 0, 9), "rank {rank} single");
        }
    });
}

#[test]
fn groups_of_one_split_into_groups_of_one() {
    let pg = ProcessGroup::single();
    let sub = pg.split(7, 3).expect("split");
    assert_eq!(exercise(&sub, 5).expect("identity"), expected(&[0], 0, 5));
    let mesh = HybridMesh::new(&pg, NodePlacement::contiguous(0, 1)).expect("1 x 1 mesh");
    assert_eq!(
        (mesh.shard.world_size(), mesh.replicate.world_size()),
        (1, 1)
    );
    let err = HybridMesh::new(&pg, NodePlacement::contiguous(0, 2)).expect_err("1 % 2");
    assert!(err.to_string().contains("not a multiple"), "{err}");
}

#[test]
fn a_rank_calling_another_collective_instead_of_split_fails_everyone_quickly() {
    with_timeout(60, || {
        let t = Instant::now();
        let out = run_local(3, &cfg(5), |pg| {
            let r = if pg.rank() == 2 {
                pg.all_reduce(&mut [1f32; 2], ReduceOp::Sum)
            } else {
                pg.split(0, 0).map(|_| ())
            };
            r.map_err(|e| e.to_string())
        })
        .expect("harness");
        for (rank, r) in out.iter().enumerate() {
            let e = r.as_ref().expect_err("mismatch must fail");
            assert!(
                e.contains("mismatch") || e.contains("aborted"),
                "rank {rank}: {e}"
            );
        }
        let mismatch = out
            .iter()
            .filter_map(|r| r.as_ref().err())
            .find(|e| e.contains("mismatch"))
            .expect("some rank names the mismatch");
        assert!(
            mismatch.contains("split") && mismatch.contains("all_reduce"),
            "{mismatch}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "took {:?}",
            t.elapsed()
        );
    });
}

#[test]
fn a_rank_that_never_splits_is_named_within_the_timeout() {
    with_timeout(60, || {
        let out = run_local(3, &cfg(1), |pg| {
            if pg.rank() == 1 {
                std::thread::sleep(Duration::from_secs(3));
                return Ok(Duration::ZERO);
            }
            let t = Instant::now();
            match pg.split(pg.rank(), 0) {
                Ok(_) => Ok(t.elapsed()),
                Err(e) => Err((e.to_string(), t.elapsed())),
            }
        })
        .expect("harness");
        for rank in [0, 2] {
            let (e, took) = out[rank].as_ref().expect_err("must time out");
            assert!(
                e.contains("rank 1") && e.contains("split"),
                "rank {rank}: {e}"
            );
            assert!(*took < Duration::from_secs(3), "rank {rank} took {took:?}");
        }
    });
}

#[test]
fn sub_group_errors_name_global_ranks_and_leave_other_groups_working() {
    with_timeout(60, || {
        let out = run_local(4, &cfg(5), |pg| {
            let mesh = HybridMesh::new(&pg, NodePlacement::contiguous(pg.rank(), 2))
                .map_err(|e| e.to_string())?;
            // Slot 1's replicate group is global ranks {1, 3}: rank 3 passes a longer buffer.
            let len = if pg.rank() == 3 { 5 } else { 4 };
            let bad = mesh
                .replicate
                .all_reduce(&mut vec![1f64; len], ReduceOp::Sum);
            let mut whole = [1f64];
            pg.all_reduce(&mut whole, ReduceOp::Sum)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((bad, whole[0]))
        })
        .expect("harness");
        for (rank, r) in out.into_iter().enumerate() {
            let (bad, whole) = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
            assert_eq!(whole, 4.0, "rank {rank}: the parent survives");
            if rank % 2 == 0 {
                bad.unwrap_or_else(|e| panic!("rank {rank}: slot 0 is unaffected: {e}"));
                continue;
            }
            match bad.expect_err("slot 1 mismatches") {
                Error::Mismatch { rank: me, peer, .. } | Error::Peer { rank: me, peer, .. } => {
                    assert_eq!(
                        (me, peer),
                        (rank, 4 - rank),
                        "global ranks, not group ranks"
                    );
                }
                other => panic!("rank {rank}: {other}"),
            }
        }
    });
}

#[test]
fn uneven_node_layouts_are_rejected_on_every_rank() {
    with_timeout(60, || {
        // World 3 with 2 ranks per node, then rank 2 on a node of its own.
        for (name, local_of) in [("indivisible", [2, 2, 2]), ("uneven", [2, 2, 1])] {
            let out = run_local(3, &cfg(5), |pg| {
                let at = NodePlacement {
                    node_rank: pg.rank() / 2,
                    local_rank: pg.rank() % 2,
                    local_world_size: local_of[pg.rank()],
                };
                let err = HybridMesh::new(&pg, at).expect_err("not a grid");
                // The parent is still usable: the placements were exchanged, then checked.
                pg.barrier().map(|()| err)
            })
            .expect("harness");
            for (rank, r) in out.into_iter().enumerate() {
                let err = r.unwrap_or_else(|e| panic!("{name} rank {rank}: barrier: {e}"));
                let text = err.to_string();
                assert!(
                    matches!(err, Error::InvalidArgument { op: "hybrid_mesh", rank: me, .. } if me == rank),
                    "{name} rank {rank}: {text}"
                );
                let want = match name {
                    "indivisible" => "world size 3 is not a multiple of local_world_size 2",
                    _ => "rank 2 reports local_world_size 1 but rank 0 reports 2",
                };
                assert!(text.contains(want), "{name} rank {rank}: {text}");
            }
        }
    });
}
