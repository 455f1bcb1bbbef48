//! SIGINT/SIGTERM capture and forwarding for the launcher, on `libc` directly.
//!
//! `libc` is already in the dependency graph (tokio/mio). A crate such as `signal-hook` would cover
//! catching signals but not sending them, so `libc` would be needed anyway.

use std::sync::atomic::{AtomicI32, Ordering};

/// The last signal caught and not yet taken; 0 for none.
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    PENDING.store(sig, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM while alive; restores the previous handlers when dropped.
pub(crate) struct Catch {
    previous: Vec<(libc::c_int, libc::sighandler_t)>,
}

impl Catch {
    pub(crate) fn install() -> Catch {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        let previous = [libc::SIGINT, libc::SIGTERM]
            .into_iter()
            .map(|sig| {
                #[allow(unsafe_code)]
                // SAFETY: `on_signal` only performs an atomic store, which is async-signal-safe, and has the
                // `extern "C" fn(c_int)` signature that `signal` expects.
                let old = unsafe { libc::signal(sig, handler) };
                (sig, old)
            })
            .collect();
        Catch { previous }
    }
}

impl Drop for Catch {
    fn drop(&mut self) {
        for &(sig, old) in &self.previous {
            if old != libc::SIG_ERR {
                #[allow(unsafe_code)]
                // SAFETY: restores the handler value `signal` returned earlier for this same signal.
                unsafe {
                    libc::signal(sig, old);
                }
            }
        }
    }
}

/// The signal caught since the last call, if any.
pub(crate) fn take() -> Option<i32> {
    match PENDING.swap(0, Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Sends `sig` to the process group led by `pid` (workers are started as group leaders).
pub(crate) fn send_to_group(pid: u32, sig: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) has no memory-safety preconditions; a stale pid at worst yields ESRCH.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

/// SIGTERM.
pub(crate) const TERM: i32 = libc::SIGTERM;
/// SIGKILL.
pub(crate) const KILL: i32 = libc::SIGKILL;
