//! Reading batches ahead on a background thread.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use crate::{Batch, Error, Result, TokenLoader};

/// Runs a [`TokenLoader`] on its own thread, keeping up to `depth` batches ready in a bounded channel.
///
/// Same [`next_batch`](Prefetcher::next_batch) as the loader. Errors are forwarded in order and end
/// the stream; a panic on the thread becomes [`Error::Prefetch`]. Checkpoint
/// [`Batch::state_after`] of the last batch you consumed, not a state of the loader, which runs ahead.
/// Dropping the prefetcher stops and joins the thread.
///
/// ```no_run
/// # use bellows_data::*;
/// # let cfg = DataConfig::new(Files::One("train.parquet".into()));
/// # let spec = LoaderSpec { split: Split::Train, shard: Shard::single(), seed: 0, vocab_size: 256 };
/// let mut batches = Prefetcher::new(TokenLoader::new(&cfg, spec)?, 4);
/// while let Some(batch) = batches.next_batch()? {
///     let _resume_from = batch.state_after;
///     # break;
/// }
/// # Ok::<(), bellows_data::Error>(())
/// ```
pub struct Prefetcher {
    rx: Option<Receiver<Result<Option<Batch>>>>,
    thread: Option<JoinHandle<()>>,
    done: bool,
}

impl Prefetcher {
    /// Starts the thread. `depth` is the number of batches held ready (0 is treated as 1).
    pub fn new(mut loader: TokenLoader, depth: usize) -> Self {
        let (tx, rx) = sync_channel(depth.max(1));
        let thread = std::thread::Builder::new()
            .name("bellows-data-prefetch".into())
            .spawn(move || loop {
                let item = loader.next_batch();
                let last = !matches!(item, Ok(Some(_)));
                if tx.send(item).is_err() || last {
                    break;
                }
            });
        match thread {
            Ok(t) => Prefetcher {
                rx: Some(rx),
                thread: Some(t),
                done: false,
            },
            Err(e) => {
                // No thread: report it on the first call.
                let (tx, rx) = sync_channel(1);
                let _ = tx.send(Err(Error::Prefetch(format!("cannot spawn thread: {e}"))));
                Prefetcher {
                    rx: Some(rx),
                    thread: None,
                    done: false,
                }
            }
        }
    }

    /// The next batch, as [`TokenLoader::next_batch`] would return it.
    ///
    /// # Errors
    /// The loader's errors; [`Error::Prefetch`] if the thread died or was already stopped by an error.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.done {
            return Ok(None);
        }
        let Some(rx) = &self.rx else {
            return Err(Error::Prefetch("stopped after an earlier error".into()));
        };
        match rx.recv() {
            Ok(Ok(Some(b))) => Ok(Some(b)),
            Ok(Ok(None)) => {
                self.done = true;
                Ok(None)
            }
            Ok(Err(e)) => {
                self.rx = None;
                Err(e)
            }
            Err(_) => {
                self.rx = None;
                let why = match self.thread.take().map(JoinHandle::join) {
                    Some(Err(p)) => p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panicked".into()),
                    _ => "exited without a result".into(),
                };
                Err(Error::Prefetch(why))
            }
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Dropping the receiver makes a blocked send fail, so the thread ends after its current batch.
        self.rx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
