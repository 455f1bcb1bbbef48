//! Every collective across real processes: this test binary re-runs itself as the workers, with the
//! bellows launch environment, against a store the test hosts.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bellows_dist::store::StoreServer;
use bellows_dist::{chunk_range, DistConfig, DistEnv, ProcessGroup, ReduceOp};
use common::{data, fdata, with_timeout};

const SIZES: &[usize] = &[1, 2, 3, 1001, 1 << 20]; // up to 8 MB of f64

/// Starts `world` copies of this binary running `mp_worker`; returns each rank's report file.
fn spawn_world(world: usize, mode: &str, timeout_secs: u64) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = format!("mp-{}", std::process::id());
    let server = StoreServer::bind("127.0.0.1:0", &token).expect("bind");
    let port = server.local_addr().port().to_string();
    let exe = std::env::current_exe().expect("test binary");
    let mut children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args(["--exact", "mp_worker", "--nocapture", "--test-threads=1"])
                .env("BELLOWS_MP_OUT", dir.path())
                .env("BELLOWS_MP_MODE", mode)
                .env("BELLOWS_MP_TIMEOUT", timeout_secs.to_string())
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("NODE_RANK", "0")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("BELLOWS_JOB_TOKEN", &token)
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn worker")
        })
        .collect();
    for c in &mut children {
        let _ = c.wait();
    }
    (0..world)
        .map(|r| {
            std::fs::read_to_string(dir.path().join(format!("rank{r}.txt")))
                .unwrap_or_else(|_| "no report".into())
        })
        .collect()
}

fn report(out: &Path, rank: usize, text: &str) {
    std::fs::write(out.join(format!("rank{rank}.txt")), text).expect("write report");
}

fn all_ops(pg: &ProcessGroup) -> Result<String, String> {
    let (r, w) = (pg.rank(), pg.world_size());
    let e = |e: bellows_dist::Error| e.to_string();
    for &n in SIZES {
        let mut v = data(r, n);
        pg.all_reduce(&mut v, ReduceOp::Sum).map_err(e)?;
        let inputs: Vec<Vec<f64>> = (0..w).map(|q| data(q, n)).collect();
        let want: Vec<f64> = (0..n).map(|i| inputs.iter().map(|d| d[i]).sum()).collect();
        if v != want {
            return Err(format!("all_reduce len {n} wrong"));
        }
        let mut all = vec![0.0; n * w];
        pg.all_gather(&data(r, n), &mut all).map_err(e)?;
        if all != (0..w).flat_map(|q| data(q, n)).collect::<Vec<_>>() {
            return Err(format!("all_gather len {n} wrong"));
        }
        let mut mine = vec![0.0; chunk_range(n, w, r).len()];
        pg.reduce_scatter(&data(r, n), &mut mine, ReduceOp::Sum)
            .map_err(e)?;
        if mine != want[chunk_range(n, w, r)] {
            return Err(format!("reduce_scatter len {n} wrong"));
        }
        let mut b = if r == w - 1 { data(9, n) } else { vec![0.0; n] };
        pg.broadcast(&mut b, w - 1).map_err(e)?;
        if b != data(9, n) {
            return Err(format!("broadcast len {n} wrong"));
        }
        pg.barrier().map_err(e)?;
    }
    let mut bytes = if r == 0 { b"payload".to_vec() } else { vec![] };
    pg.broadcast_bytes(&mut bytes, 0).map_err(e)?;
    if bytes != b"payload" {
        return Err("broadcast_bytes wrong".into());
    }
    // f32 with order-dependent rounding: report a digest of the bits, which must agree across ranks.
    let mut f = fdata(r, 300_001);
    pg.all_reduce(&mut f, ReduceOp::Mean).map_err(e)?;
    let digest = f
        .iter()
        .fold(0u64, |h, x| h.rotate_left(5) ^ u64::from(x.to_bits()));
    Ok(format!("ok {digest:x}"))
}

/// The worker side; a no-op when run as a normal test.
#[test]
fn mp_worker() {
    let Some(out) = std::env::var_os("BELLOWS_MP_OUT") else {
        return;
    };
    let out = Path::new(&out);
    let mode = std::env::var("BELLOWS_MP_MODE").unwrap_or_default();
    let timeout_secs = std::env::var("BELLOWS_MP_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let env = DistEnv::from_env().expect("bellows env");
    let cfg = DistConfig {
        timeout_secs,
        ..DistConfig::default()
    };
    let pg = match ProcessGroup::init(&env, &cfg, "mp") {
        Ok(pg) => pg,
        Err(e) => return report(out, env.rank, &format!("init failed: {e}")),
    };
    let text = match mode.as_str() {
        "die" => {
            let mut v = vec![1f32; 1 << 20];
            if let Err(e) = pg.all_reduce(&mut v, ReduceOp::Sum) {
                return report(out, env.rank, &format!("first all_reduce failed: {e}"));
            }
            if pg.rank() == 2 {
                std::process::exit(7); // dies between collectives, sockets torn down by the OS
            }
            let t = Instant::now();
            match pg.all_reduce(&mut v, ReduceOp::Sum) {
                Ok(()) => "unexpected success".to_string(),
                Err(e) => format!("failed after {} ms: {e}", t.elapsed().as_millis()),
            }
        }
        _ => all_ops(&pg).unwrap_or_else(|e| format!("error: {e}")),
    };
    report(out, env.rank, &text);
}

#[test]
fn every_collective_across_processes_worlds_2_and_3() {
    with_timeout(300, || {
        for world in [2, 3] {
            let reports = spawn_world(world, "all", 60);
            for (rank, r) in reports.iter().enumerate() {
                assert!(r.starts_with("ok "), "world {world} rank {rank}: {r}");
            }
            assert!(
                reports.iter().all(|r| r == &reports[0]),
                "f32 bits differ across ranks: {reports:?}"
            );
        }
    });
}

#[test]
fn a_process_dying_mid_job_fails_the_others_within_the_timeout() {
    with_timeout(120, || {
        let t0 = Instant::now();
        let reports = spawn_world(3, "die", 5);
        for (rank, r) in reports.iter().enumerate().take(2) {
            assert!(r.starts_with("failed after"), "rank {rank}: {r}");
            assert!(r.contains("rank 2"), "rank {rank}: {r}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
    });
}
