//! An in-process harness: N ranks as threads on loopback, for fast tests (like Accelerate's `debug_launcher`).

use crate::config::DistConfig;
use crate::env::{DistEnv, EnvSource};
use crate::error::{Error, Result};
use crate::group::ProcessGroup;
use crate::store::StoreServer;

/// Runs `f` on `world` threads, each with its own [`ProcessGroup`] joined over 127.0.0.1, and returns
/// the results in rank order.
///
/// The harness hosts the store on an ephemeral port (as `bellows launch` does), so tests never race for ports.
///
/// # Errors
/// The first rank's init error, or [`Error::WorkerFailed`] naming the rank whose `f` panicked.
///
/// ```
/// use bellows_dist::{run_local, DistConfig, ReduceOp};
/// let sums = run_local(3, &DistConfig::default(), |pg| {
///     let mut v = vec![pg.rank() as f64; 5];
///     pg.all_reduce(&mut v, ReduceOp::Sum).map(|()| v)
/// }).unwrap();
/// assert!(sums.iter().all(|r| r.as_ref().unwrap() == &vec![3.0; 5]));
/// ```
pub fn run_local<T, F>(world: usize, cfg: &DistConfig, f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(ProcessGroup) -> T + Sync,
{
    let token = format!(
        "local-{}-{:?}",
        std::process::id(),
        std::time::Instant::now()
    );
    let server = StoreServer::bind("127.0.0.1:0", &token)?;
    let port = server.local_addr().port();
    let outcomes: Vec<Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let env = DistEnv {
                    rank,
                    world_size: world,
                    local_rank: rank,
                    local_world_size: world,
                    node_rank: 0,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    source: EnvSource::Bellows,
                    job_token: Some(token.clone()),
                };
                let f = &f;
                s.spawn(move || ProcessGroup::init(&env, cfg, "local").map(f))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|panic| {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(Error::WorkerFailed {
                        rank,
                        status: format!("panicked: {msg}"),
                        restarts: String::new(),
                    })
                })
            })
            .collect()
    });
    drop(server);
    outcomes.into_iter().collect()
}
