//! Every collective on the thread-backed harness (N ranks as threads on loopback), worlds 2 and 3.

mod common;

use std::time::{Duration, Instant};

use bellows_dist::{
    chunk_range, run_local, DistConfig, DistEnv, EnvSource, Error, ProcessGroup, ReduceOp,
};
use common::{data, fdata, with_timeout};

const SIZES: &[usize] = &[0, 1, 2, 3, 5, 1000, 65_537, 1 << 20];

fn cfg(timeout_secs: u64) -> DistConfig {
    DistConfig {
        timeout_secs,
        ..DistConfig::default()
    }
}

fn expected(world: usize, len: usize, op: ReduceOp) -> Vec<f64> {
    let per_rank: Vec<Vec<f64>> = (0..world).map(|r| data(r, len)).collect();
    (0..len)
        .map(|i| {
            let vals: Vec<f64> = per_rank.iter().map(|d| d[i]).collect();
            match op {
                ReduceOp::Sum => vals.iter().sum(),
                ReduceOp::Mean => vals.iter().sum::<f64>() / world as f64,
                ReduceOp::Max => vals.iter().cloned().fold(f64::MIN, f64::max),
            }
        })
        .collect()
}

#[test]
fn all_reduce_is_exact_for_every_size_and_op() {
    with_timeout(240, || {
        for world in [2, 3] {
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
                let out = run_local(world, &cfg(60), |pg| {
                    SIZES
                        .iter()
                        .map(|&n| {
                            let mut v = data(pg.rank(), n);
                            pg.all_reduce(&mut v, op).map(|()| v)
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .expect("harness");
                for (rank, res) in out.into_iter().enumerate() {
                    let res = res.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                    for (got, &n) in res.iter().zip(SIZES) {
                        assert_eq!(
                            got,
                            &expected(world, n, op),
                            "world {world} {op:?} len {n} rank {rank}"
                        );
                    }
                }
            }
        }
    });
}

#[test]
fn f32_all_reduce_gives_identical_bits_on_every_rank_and_every_run() {
    with_timeout(120, || {
        let run = || {
            run_local(3, &cfg(60), |pg| {
                let mut v = fdata(pg.rank(), 100_003);
                pg.all_reduce(&mut v, ReduceOp::Mean)
                    .map(|()| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            })
            .expect("harness")
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .expect("all_reduce")
        };
        let first = run();
        assert!(
            first.iter().all(|r| r == &first[0]),
            "ranks disagree bitwise"
        );
        assert_eq!(run(), first, "a rerun differs");
        // Close to the exact mean.
        let inputs: Vec<Vec<f32>> = (0..3).map(|r| fdata(r, 100_003)).collect();
        for (i, b) in first[0].iter().enumerate() {
            let exact = inputs.iter().map(|d| d[i] as f64).sum::<f64>() / 3.0;
            let got = f32::from_bits(*b) as f64;
            assert!(
                (got - exact).abs() <= 1e-6 * exact.abs().max(1.0),
                "{i}: {got} vs {exact}"
            );
        }
    });
}

#[test]
fn all_gather_reduce_scatter_broadcast_and_barrier() {
    with_timeout(240, || {
        for world in [2, 3] {
            let out = run_local(world, &cfg(60), |pg| -> Result<(), Error> {
                let (r, w) = (pg.rank(), pg.world_size());
                for &n in SIZES {
                    // all_gather
                    let local = data(r, n);
                    let mut all = vec![0.0; n * w];
                    pg.all_gather(&local, &mut all)?;
                    let want: Vec<f64> = (0..w).flat_map(|q| data(q, n)).collect();
                    assert_eq!(all, want, "all_gather len {n}");
                    // reduce_scatter with uneven chunks
                    let mut mine = vec![0.0; chunk_range(n, w, r).len()];
                    pg.reduce_scatter(&data(r, n), &mut mine, ReduceOp::Sum)?;
                    assert_eq!(
                        mine,
                        expected(w, n, ReduceOp::Sum)[chunk_range(n, w, r)],
                        "reduce_scatter len {n}"
                    );
                    // broadcast from every root
                    for root in 0..w {
                        let mut b = if r == root {
                            data(root, n)
                        } else {
                            vec![0.0; n]
                        };
                        pg.broadcast(&mut b, root)?;
                        assert_eq!(b, data(root, n), "broadcast len {n} root {root}");
                    }
                    pg.barrier()?;
                }
                let mut bytes = if r == w - 1 {
                    b"hello from the last rank".to_vec()
                } else {
                    Vec::new()
                };
                pg.broadcast_bytes(&mut bytes, w - 1)?;
                assert_eq!(bytes, b"hello from the last rank");
                let mut ints = vec![r as i64 + 1; 3];
                pg.all_reduce(&mut ints, ReduceOp::Sum)?;
                assert_eq!(ints, vec![(w * (w + 1) / 2) as i64; 3]);
                Ok(())
            })
            .expect("harness");
            for (rank, r) in out.into_iter().enumerate() {
                r.unwrap_or_else(|e| panic!("world {world} rank {rank}: {e}"));
            }
        }
    });
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    with_timeout(60, || {
        let out = run_local(2, &cfg(10), |pg| {
            let mut out = vec![0f32; 3];
            let gather = pg
                .all_gather(&[1f32, 2.0], &mut out)
                .expect_err("wrong out length");
            let scatter = pg
                .reduce_scatter(&[1f32; 5], &mut [0f32; 1], ReduceOp::Sum)
                .expect_err("rank 0 owns 3");
            let root = pg.broadcast(&mut [0f32], 2).expect_err("root out of range");
            (gather.to_string(), scatter.to_string(), root.to_string())
        })
        .expect("harness");
        assert!(out[0].0.contains("all_gather"), "{}", out[0].0);
        assert!(out[0].2.contains("root 2"), "{}", out[0].2);
        let pg = ProcessGroup::single();
        assert!(pg.broadcast(&mut [0f32], 1).is_err());
    });
}

#[test]
fn mismatched_collectives_are_detected_and_break_the_group() {
    with_timeout(60, || {
        let out = run_local(2, &cfg(5), |pg| {
            let first = if pg.rank() == 0 {
                pg.all_reduce(&mut [1f32; 4], ReduceOp::Sum)
            } else {
                pg.all_gather(&[1f32; 4], &mut [0f32; 8])
            };
            let after = pg.barrier();
            (
                first.map_err(|e| e.to_string()),
                after.map_err(|e| e.to_string()),
            )
        })
        .expect("harness");
        for (rank, (first, after)) in out.iter().enumerate() {
            let e = first.as_ref().expect_err("mismatch must fail");
            assert!(
                e.contains("mismatch") || e.contains("aborted"),
                "rank {rank}: {e}"
            );
            assert!(
                after.as_ref().expect_err("broken").contains("broken"),
                "rank {rank}"
            );
        }
        let lengths = run_local(2, &cfg(5), |pg| {
            pg.all_reduce(&mut vec![0f64; 3 + pg.rank()], ReduceOp::Sum)
                .map_err(|e| e.to_string())
        })
        .expect("harness");
        assert!(
            lengths
                .iter()
                .any(|r| r.as_ref().is_err_and(|e| e.contains("mismatch"))),
            "{lengths:?}"
        );
    });
}

#[test]
fn a_peer_that_leaves_mid_job_fails_the_others_quickly_naming_it() {
    with_timeout(90, || {
        for world in [2, 3, 4] {
            let out = run_local(world, &cfg(5), |pg| {
                let mut v = vec![1f32; 1 << 20];
                pg.all_reduce(&mut v, ReduceOp::Sum)
                    .map_err(|e| (e.to_string(), Duration::ZERO))?;
                if pg.rank() == 1 {
                    drop(pg); // rank 1 "dies" between collectives
                    return Ok(());
                }
                let t = Instant::now();
                pg.all_reduce(&mut v, ReduceOp::Sum)
                    .map_err(|e| (e.to_string(), t.elapsed()))
            })
            .expect("harness");
            for (rank, r) in out.iter().enumerate().filter(|(r, _)| *r != 1) {
                let (e, took) = r.as_ref().expect_err("survivors must fail");
                assert!(e.contains("rank 1"), "world {world} rank {rank}: {e}");
                // Detected from the closed connection, well before the 5 s timeout.
                assert!(
                    *took < Duration::from_secs(3),
                    "world {world} rank {rank} took {took:?}: {e}"
                );
            }
        }
    });
}

#[test]
fn a_hung_peer_times_out_within_the_configured_timeout() {
    with_timeout(60, || {
        let out = run_local(3, &cfg(1), |pg| {
            if pg.rank() == 2 {
                std::thread::sleep(Duration::from_secs(4));
                return Ok(Duration::ZERO);
            }
            let t = Instant::now();
            let r = pg.all_reduce(&mut [1f64; 10], ReduceOp::Sum);
            match r {
                Ok(()) => Ok(t.elapsed()),
                Err(e) => Err((e.to_string(), t.elapsed())),
            }
        })
        .expect("harness");
        for (rank, r) in out.iter().enumerate().take(2) {
            let (e, took) = r.as_ref().expect_err("must time out");
            assert!(
                e.contains("rank 2") && e.contains("timed out"),
                "rank {rank}: {e}"
            );
            assert!(*took < Duration::from_secs(3), "rank {rank} took {took:?}");
        }
    });
}

#[test]
fn different_job_hashes_are_refused_naming_the_rank() {
    with_timeout(60, || {
        let token = "hash-test";
        let server = bellows_dist::store::StoreServer::bind("127.0.0.1:0", token).expect("bind");
        let port = server.local_addr().port();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let env = DistEnv {
                        rank,
                        world_size: 3,
                        local_rank: rank,
                        local_world_size: 3,
                        node_rank: 0,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        source: EnvSource::Bellows,
                        job_token: Some(token.into()),
                    };
                    let hash = if rank == 1 { "other" } else { "same" };
                    ProcessGroup::init(&env, &cfg(10), hash).map(|_| ())
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let err = h.join().expect("thread").expect_err("must refuse");
            let text = err.to_string();
            assert!(
                matches!(err, Error::JobHashMismatch { peer: 1, .. }),
                "rank {rank}: {text}"
            );
            assert!(text.contains("rank 1"), "rank {rank}: {text}");
        }
    });
}

#[test]
fn a_rank_that_never_arrives_is_named_by_everyone_else() {
    with_timeout(60, || {
        let token = "missing-test";
        let server = bellows_dist::store::StoreServer::bind("127.0.0.1:0", token).expect("bind");
        let port = server.local_addr().port();
        let t0 = Instant::now();
        // Ranks 0 and 1 of 3 join; rank 2 never does.
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let env = DistEnv {
                        rank,
                        world_size: 3,
                        local_rank: rank,
                        local_world_size: 3,
                        node_rank: 0,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        source: EnvSource::Bellows,
                        job_token: Some(token.into()),
                    };
                    ProcessGroup::init(&env, &cfg(1), "h").map(|_| ())
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let err = h.join().expect("thread").expect_err("must time out");
            assert!(
                matches!(
                    err,
                    Error::Timeout {
                        op: "init",
                        peer: 2,
                        ..
                    }
                ),
                "rank {rank}: {err}"
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t0.elapsed()
        );
    });
}
