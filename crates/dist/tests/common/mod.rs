//! Shared test helpers.
#![allow(dead_code)]

use std::time::Duration;

/// Runs `f` on a thread and fails the test if it takes longer than `secs`.
pub fn with_timeout<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        // The closure panicked (dropping the sender): re-raise its panic.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("test thread ended without a result"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("test exceeded its hard timeout of {secs} s")
        }
    }
}

/// Deterministic integer-valued data, exact in f64 sums.
pub fn data(rank: usize, len: usize) -> Vec<f64> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 101) as f64 - 50.0)
        .collect()
}

/// Deterministic non-integer f32 data, so summation order matters for the bits.
pub fn fdata(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 2654435761usize + rank * 40503) % 1_000_003) as f32) * 1.37e-3 - 0.5)
        .collect()
}
