//! SIGTERM/SIGINT during training: the first asks for a checkpoint and a clean exit after the
//! current step; the second exits at once (status 128 + signal number, as a shell reports it).
//!
//! Built on `signal-hook`'s flag API, which keeps `unsafe` out of bellows and registers the
//! "exit on the second signal" action in the handler itself (it works even if a step hangs).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::SigId;

use crate::{Error, Result};

/// Watches SIGTERM and SIGINT while alive; unregisters its handlers when dropped.
#[derive(Debug)]
pub struct StopSignal {
    flag: Arc<AtomicBool>,
    which: Arc<AtomicUsize>,
    released: Arc<AtomicBool>,
    ids: Vec<SigId>,
}

impl StopSignal {
    /// Installs the handlers.
    ///
    /// # Errors
    /// The operating system refuses a handler.
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        let which = Arc::new(AtomicUsize::new(0));
        let released = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::new();
        for sig in [SIGTERM, SIGINT] {
            let err =
                |e: std::io::Error| Error::Internal(format!("cannot watch signal {sig}: {e}"));
            // Kept for the life of the process: once this watcher is dropped, the signal's default
            // action (terminate) applies again, as signal-hook does not restore it on unregister.
            signal_hook::flag::register_conditional_default(sig, Arc::clone(&released))
                .map_err(err)?;
            // Order matters: the exit check runs before the flag is set, so only a second signal exits.
            ids.push(
                signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&flag))
                    .map_err(err)?,
            );
            ids.push(signal_hook::flag::register(sig, Arc::clone(&flag)).map_err(err)?);
            ids.push(
                signal_hook::flag::register_usize(sig, Arc::clone(&which), sig as usize)
                    .map_err(err)?,
            );
        }
        Ok(StopSignal {
            flag,
            which,
            released,
            ids,
        })
    }

    /// The name of the signal received, if one was.
    pub fn received(&self) -> Option<&'static str> {
        if !self.flag.load(Ordering::SeqCst) {
            return None;
        }
        Some(match self.which.load(Ordering::SeqCst) as i32 {
            SIGINT => "SIGINT",
            _ => "SIGTERM",
        })
    }
}

impl Drop for StopSignal {
    fn drop(&mut self) {
        self.released.store(true, Ordering::SeqCst);
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
