//! Active waiting for the CPU pool's threads during training steps (issue 11).
//!
//! A step is hundreds of short parallel passes (every product, the fused element-wise kernels)
//! with short serial stretches between them on the loop's thread. An idle rayon thread spins for
//! a few dozen microseconds and then sleeps on a futex, so nearly every pass started by waking it
//! again: on the small LoRA step (2 threads) the other thread slept ~420 times a step and each
//! wake-up cost it tens of microseconds before it ran its share, while the loop's thread ran its
//! half and then waited (docs/BENCHMARKS.md). Intel's OpenMP runtime, under PyTorch's CPU
//! kernels, keeps its threads spinning for 200 ms after each parallel region for the same reason.
//!
//! [`keep_warm`] gives every other thread of the pool a job that looks for work with
//! [`rayon::yield_now`] in a loop — running whatever the pool has as soon as it is there — until
//! it has found none for [`IDLE`], or the pool's [`on_pool`](crate::on_pool) call ends. The loops
//! call it at each step's start; a long serial stretch (saving a checkpoint, evaluation) lets
//! the threads go back to sleep after `IDLE`.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a thread keeps looking for work after it last found some.
pub const IDLE: Duration = Duration::from_millis(20);

/// The active-waiting state of one pool, held by its first thread.
#[derive(Debug, Default)]
pub(crate) struct Warm {
    /// Whether the pool's threads may wait actively at all.
    enabled: bool,
    /// Threads now in their waiting loop.
    spinning: AtomicUsize,
    /// Set when the pool's work is done: every loop returns.
    stop: AtomicBool,
}

impl Warm {
    /// The state of a pool of `threads` threads in one of `processes` processes of this machine
    /// that run such pools: enabled where all their threads fit the machine's cores. Measured
    /// on 2 cores, two ranks of 2 threads each: 3.67 s for 100 quickstart steps with active
    /// waiting, 3.16 s without (docs/BENCHMARKS.md).
    pub(crate) fn for_pool(threads: usize, processes: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Warm {
            enabled: threads.saturating_mul(processes.max(1)) <= cores,
            ..Warm::default()
        }
    }
}

thread_local! {
    /// The pool this thread is the first thread of, inside [`on_pool`](crate::on_pool).
    static CURRENT: RefCell<Option<Arc<Warm>>> = const { RefCell::new(None) };
}

/// Makes `warm` the calling thread's pool state until the returned guard drops; the guard
/// then stops every waiting loop.
pub(crate) fn enter(warm: Arc<Warm>) -> impl Drop {
    struct Guard(Option<Arc<Warm>>);
    impl Drop for Guard {
        fn drop(&mut self) {
            let prev = self.0.take();
            CURRENT.with(|c| {
                if let Some(w) = c.replace(prev) {
                    w.stop.store(true, Ordering::Release);
                }
            });
        }
    }
    Guard(CURRENT.with(|c| c.replace(Some(warm))))
}

/// Puts the other threads of the calling thread's pool into their waiting loop (those not
/// already in it). Does nothing outside [`on_pool`](crate::on_pool), off the pool's first
/// thread, in a pool of one thread, or where the node's pools together have more threads than
/// it has cores ([`on_node_pool`](crate::on_node_pool)).
pub fn keep_warm() {
    keep_warm_for(IDLE);
}

/// [`keep_warm`] with loops that leave after `idle` without work.
fn keep_warm_for(idle: Duration) {
    let Some(warm) = CURRENT.with(|c| c.borrow().clone()) else {
        return;
    };
    if !warm.enabled {
        return;
    }
    let others = rayon::current_num_threads().saturating_sub(1);
    if rayon::current_thread_index() != Some(0) || others == 0 {
        return;
    }
    // Only when no loop is running: a loop that is still waiting keeps its thread.
    if warm
        .spinning
        .compare_exchange(0, others, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    rayon::spawn_broadcast(move |ctx| {
        if ctx.index() != 0 {
            wait_for_work(&warm, idle);
            warm.spinning.fetch_sub(1, Ordering::AcqRel);
        }
    });
}

/// Runs the pool's jobs as they come until none came for `idle` or the pool is done.
fn wait_for_work(warm: &Warm, idle: Duration) {
    let mut last = Instant::now();
    while !warm.stop.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => last = Instant::now(),
            _ if last.elapsed() > idle => return,
            // An OS yield, not a busy spin: a thread of another process (or rank) that wants
            // this core gets it; on an idle core it returns at once.
            _ => std::thread::yield_now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{keep_warm, keep_warm_for, IDLE};
    use rayon::prelude::*;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    fn wait_until_none_spin(warm: &super::Warm, within: Duration) {
        let t = Instant::now();
        while warm.spinning.load(Ordering::Acquire) > 0 {
            assert!(t.elapsed() < within, "the waiting loops never returned");
            std::thread::yield_now();
        }
    }

    /// A pool with active waiting on whatever the machine's cores.
    fn warm_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        let warm = super::Warm {
            enabled: true,
            ..super::Warm::default()
        };
        crate::pool_run(threads, warm, f)
    }

    #[test]
    fn passes_compute_beside_the_loops_which_leave_after_idle() {
        let sum = warm_pool(3, || {
            let warm = super::CURRENT
                .with(|c| c.borrow().clone())
                .expect("inside on_pool");
            let mut sum = 0;
            for _ in 0..3 {
                keep_warm();
                // The passes' jobs run while the loops wait (nested passes included).
                sum = (0..100_000u64)
                    .into_par_iter()
                    .map(|x| (0..3u64).into_par_iter().map(|y| x * y).sum::<u64>())
                    .sum::<u64>();
                // With nothing to run, they return after IDLE (not before the pool ends).
                wait_until_none_spin(&warm, IDLE + Duration::from_secs(5));
                assert!(!warm.stop.load(Ordering::Acquire));
            }
            sum
        });
        assert_eq!(sum, 3 * 99_999 * 100_000 / 2);
    }

    #[test]
    fn the_loops_end_with_the_pool() {
        let warm = warm_pool(2, || {
            // Only the pool's end can stop these loops within the test's time.
            keep_warm_for(Duration::from_secs(3600));
            super::CURRENT
                .with(|c| c.borrow().clone())
                .expect("inside on_pool")
        });
        assert!(
            warm.stop.load(Ordering::Acquire),
            "on_pool's end stops the loops"
        );
        wait_until_none_spin(&warm, Duration::from_secs(5));
        assert!(super::CURRENT.with(|c| c.borrow().is_none()));
    }

    #[test]
    fn oversubscribed_pools_do_not_wait_actively() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (enabled, spinning) = crate::on_node_pool(2, cores, || {
            keep_warm();
            let warm = super::CURRENT
                .with(|c| c.borrow().clone())
                .expect("inside on_node_pool");
            (warm.enabled, warm.spinning.load(Ordering::Acquire))
        });
        assert!(
            !enabled,
            "2 threads in each of {cores} processes exceed {cores} cores"
        );
        assert_eq!(spinning, 0, "no waiting loop was started");
        assert!(super::Warm::for_pool(cores, 1).enabled);
        assert!(!super::Warm::for_pool(cores + 1, 1).enabled);
    }

    #[test]
    fn outside_a_pool_it_does_nothing() {
        keep_warm();
        assert!(super::CURRENT.with(|c| c.borrow().is_none()));
    }
}
