//! One collective's traffic on the ring: a sender thread writing to the next rank while the caller
//! reads from the previous one, so large messages never deadlock and reduction overlaps transfer.
//!
//! Every message has a 24-byte header: kind `u8` (1 data, 2 abort), op `u8`, dtype `u8`, reserved `u8`,
//! payload length `u32`, collective sequence number `u64`, total element count `u64`; all little-endian.
//! The receiver checks op, dtype, sequence, total and length, so ranks calling different collectives
//! fail with [`Error::Mismatch`] instead of corrupting data.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Element;
use crate::error::{Error, Result};

pub(crate) const HEADER: usize = 24;
const KIND_DATA: u8 = 1;
const KIND_ABORT: u8 = 2;
/// The longest abort text forwarded.
const MAX_ABORT: usize = 2000;
/// How long a rank that timed out keeps listening for an abort from upstream (at most half the timeout).
const ABORT_GRACE: Duration = Duration::from_millis(500);
/// How often a blocked reader checks whether the sender thread has failed.
const SEND_POLL: Duration = Duration::from_millis(50);

/// Why a read from the previous rank stopped.
pub(crate) enum ReadFail {
    Timeout {
        filled: usize,
    },
    /// The sender thread failed (its error is in the shared slot).
    SendFailed {
        filled: usize,
    },
    Closed,
    Io(std::io::Error),
}

/// Collective ids on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    Broadcast = 4,
    BroadcastLen = 5,
    Barrier = 6,
    /// The all-gather of colours and keys that starts every sub-group split.
    Split = 7,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::ReduceScatter => "reduce_scatter",
            Op::Broadcast | Op::BroadcastLen => "broadcast",
            Op::Barrier => "barrier",
            Op::Split => "split",
        }
    }

    /// The name of the op whose wire id is `id`, for messages about what a peer sent.
    fn name_of(id: u8) -> String {
        [
            Op::AllReduce,
            Op::AllGather,
            Op::ReduceScatter,
            Op::Broadcast,
            Op::BroadcastLen,
            Op::Barrier,
            Op::Split,
        ]
        .into_iter()
        .find(|op| *op as u8 == id)
        .map_or_else(|| format!("unknown op {id}"), |op| op.name().to_string())
    }
}

/// What identifies one collective call on every rank.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call {
    pub op: Op,
    pub dtype: u8,
    pub seq: u64,
    pub total: u64,
    pub rank: usize,
    pub prev: usize,
    pub next: usize,
    pub deadline: Instant,
    pub timeout: Duration,
}

fn header(kind: u8, call: &Call, len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = kind;
    h[1] = call.op as u8;
    h[2] = call.dtype;
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h[8..16].copy_from_slice(&call.seq.to_le_bytes());
    h[16..24].copy_from_slice(&call.total.to_le_bytes());
    h
}

/// The caller's side of one collective: queue messages for the sender thread, read from `prev`.
pub(crate) struct Io<'a> {
    pub call: Call,
    tx: Option<Sender<Vec<u8>>>,
    prev: &'a TcpStream,
    buf: &'a mut Vec<u8>,
    send_error: &'a Mutex<Option<Error>>,
    /// Set once the caller has seen the sender's failure (then reads only look for an abort).
    send_failed: bool,
}

impl<'a> Io<'a> {
    pub(crate) fn new(
        call: Call,
        tx: Sender<Vec<u8>>,
        prev: &'a TcpStream,
        buf: &'a mut Vec<u8>,
        send_error: &'a Mutex<Option<Error>>,
    ) -> Self {
        Io {
            call,
            tx: Some(tx),
            prev,
            buf,
            send_error,
            send_failed: false,
        }
    }

    /// Queues `values` as one data message to the next rank.
    pub(crate) fn send<T: Element>(&mut self, values: &[T]) -> Result<()> {
        let mut msg = Vec::with_capacity(HEADER + values.len() * T::SIZE);
        msg.extend_from_slice(&header(KIND_DATA, &self.call, values.len() * T::SIZE));
        T::encode(values, &mut msg);
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.send(msg).is_ok())
            .unwrap_or(false);
        if sent {
            Ok(())
        } else {
            // The sender thread has stopped after a failed write.
            Err(self.explain(ReadFail::SendFailed { filled: 0 }))
        }
    }

    /// Reads the next data message from the previous rank, which must carry `count` values of `T`.
    pub(crate) fn recv<T: Element>(&mut self, count: usize) -> Result<&[u8]> {
        let c = self.call;
        let mut h = [0u8; HEADER];
        match self.read_until(&mut h, c.deadline) {
            Ok(()) => {}
            // Nothing arrived in time. A peer further up the ring may have timed out at the same moment
            // and be about to tell us why: listen briefly so the error names the rank at fault.
            Err(ReadFail::Timeout { filled: 0 }) => {
                // Tell the next rank now, so that it hears about it within its own grace period.
                self.queue_abort(&format!(
                    "rank {} timed out after {:.1} s waiting for rank {}",
                    c.rank,
                    c.timeout.as_secs_f64(),
                    c.prev
                ));
                return Err(self.explain(ReadFail::Timeout { filled: 0 }));
            }
            // Sending to the next rank failed, most likely because it has already failed itself. The
            // previous rank may be about to explain, or may be gone: prefer what it tells us.
            Err(ReadFail::SendFailed { filled: 0 }) => {
                return Err(self.explain(ReadFail::SendFailed { filled: 0 }));
            }
            Err(f) => return Err(self.fail(f)),
        }
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if h[0] == KIND_ABORT && len <= MAX_ABORT {
            let text = self.abort_text(len);
            return Err(self.aborted(&text));
        }
        let seq = u64::from_le_bytes(h[8..16].try_into().expect("8-byte slice"));
        let total = u64::from_le_bytes(h[16..24].try_into().expect("8-byte slice"));
        let want = count * T::SIZE;
        if h[0] != KIND_DATA
            || h[1] != c.op as u8
            || h[2] != c.dtype
            || seq != c.seq
            || total != c.total
            || len != want
        {
            let message = format!(
                "it sent collective #{seq} ({}, dtype {}, {total} elements, {len}-byte message) but this rank \
                 expects #{} ({}, {}, {} elements, {want}-byte message)",
                Op::name_of(h[1]), h[2], c.seq, c.op.name(), T::NAME, c.total
            );
            return Err(Error::Mismatch {
                op: c.op.name(),
                rank: c.rank,
                peer: c.prev,
                message,
            });
        }
        self.buf.resize(want, 0);
        let mut buf = std::mem::take(self.buf);
        let r = self.read_until(&mut buf, c.deadline);
        *self.buf = buf;
        r.map_err(|f| self.fail(f))?;
        Ok(&self.buf[..])
    }

    /// After a timeout or a failed send, listens to the previous rank for up to [`ABORT_GRACE`]:
    /// an abort message or a closed connection explains the failure better than `why` does.
    fn explain(&mut self, why: ReadFail) -> Error {
        self.send_failed = true; // From here on only the previous rank matters.
        let grace = Instant::now() + (self.call.timeout / 2).min(ABORT_GRACE);
        let mut h = [0u8; HEADER];
        loop {
            match self.read_until(&mut h, grace) {
                Ok(()) => {}
                Err(ReadFail::Closed) => return self.fail(ReadFail::Closed),
                Err(_) => return self.fail(why),
            }
            let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            if h[0] == KIND_ABORT && len <= MAX_ABORT {
                let text = self.abort_text(len);
                return self.aborted(&text);
            }
            // Data still in flight from before the failure: skip it.
            let mut skip = vec![0u8; len.min(1 << 20)];
            let mut left = len;
            while left > 0 {
                let n = left.min(skip.len());
                if self.read_until(&mut skip[..n], grace).is_err() {
                    return self.fail(why);
                }
                left -= n;
            }
        }
    }

    fn abort_text(&mut self, len: usize) -> String {
        let mut text = vec![0u8; len];
        self.send_failed = true; // Failing anyway: read the text even if the sender has failed too.
        let _ = self.read_until(&mut text, Instant::now() + ABORT_GRACE);
        String::from_utf8_lossy(&text).into_owned()
    }

    fn aborted(&self, text: &str) -> Error {
        let c = self.call;
        Error::Peer {
            op: c.op.name(),
            rank: c.rank,
            peer: c.prev,
            message: format!("aborted: {text}"),
        }
    }

    fn read_until(
        &mut self,
        out: &mut [u8],
        deadline: Instant,
    ) -> std::result::Result<(), ReadFail> {
        let mut filled = 0;
        while filled < out.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadFail::Timeout { filled });
            }
            if !self.send_failed && lock(self.send_error).is_some() {
                return Err(ReadFail::SendFailed { filled });
            }
            // set_read_timeout rejects zero; `left` is non-zero here. Wake up now and then to notice a
            // failed sender.
            let _ = self.prev.set_read_timeout(Some(left.min(SEND_POLL)));
            match (&*self.prev).read(&mut out[filled..]) {
                Ok(0) => return Err(ReadFail::Closed),
                Ok(n) => filled += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(ReadFail::Io(e)),
            }
        }
        Ok(())
    }

    /// The error for a failed read; for a failed sender, the sender's own error.
    fn fail(&self, f: ReadFail) -> Error {
        let c = self.call;
        let (op, rank, peer) = (c.op.name(), c.rank, c.prev);
        let e = match f {
            ReadFail::SendFailed { .. } => {
                return lock(self.send_error).take().unwrap_or_else(|| Error::Peer {
                    op,
                    rank,
                    peer: c.next,
                    message: "send failed".to_string(),
                })
            }
            ReadFail::Timeout { .. } => Error::Timeout {
                op,
                rank,
                peer,
                secs: c.timeout.as_secs_f64(),
            },
            ReadFail::Closed => {
                let message =
                    "connection closed (the process exited or dropped its group)".to_string();
                Error::Peer {
                    op,
                    rank,
                    peer,
                    message,
                }
            }
            ReadFail::Io(e) => Error::Peer {
                op,
                rank,
                peer,
                message: format!("receive failed: {e}"),
            },
        };
        e
    }

    /// Queues an abort message behind any queued data.
    fn queue_abort(&mut self, why: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(abort_message(&self.call, why));
        }
    }

    /// Stops queueing; the sender thread drains what is queued and exits.
    pub(crate) fn close(&mut self) {
        self.tx = None;
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How the sender thread ended.
#[derive(Clone, Copy)]
pub(crate) enum SendEnd {
    /// Every queued message was written (or it was told to stop between messages).
    Clean,
    /// A write failed (the error is in the shared slot).
    Failed,
}

/// The sender thread: writes queued messages to `next` until the queue closes or `stop` is set.
pub(crate) fn send_loop(
    call: Call,
    next: &TcpStream,
    rx: Receiver<Vec<u8>>,
    stop: &AtomicBool,
    send_error: &Mutex<Option<Error>>,
) -> SendEnd {
    let _ = next.set_write_timeout(Some(call.timeout));
    for msg in rx {
        // Aborts are always written; data is dropped once the caller has failed.
        if stop.load(Ordering::Relaxed) && msg.first() != Some(&KIND_ABORT) {
            return SendEnd::Clean;
        }
        if let Err(e) = (&*next).write_all(&msg) {
            let error = if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                Error::Timeout {
                    op: call.op.name(),
                    rank: call.rank,
                    peer: call.next,
                    secs: call.timeout.as_secs_f64(),
                }
            } else {
                let message = format!("send failed: {e}");
                Error::Peer {
                    op: call.op.name(),
                    rank: call.rank,
                    peer: call.next,
                    message,
                }
            };
            *lock(send_error) = Some(error);
            return SendEnd::Failed;
        }
    }
    SendEnd::Clean
}

/// Best effort: tells the next rank why this collective failed, so the failure travels round the ring.
pub(crate) fn send_abort(call: &Call, next: &TcpStream, why: &str) {
    let msg = abort_message(call, why);
    let _ = next.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = (&*next).write_all(&msg);
}

fn abort_message(call: &Call, why: &str) -> Vec<u8> {
    let mut text = why.as_bytes().to_vec();
    text.truncate(MAX_ABORT);
    let mut msg = header(KIND_ABORT, call, text.len()).to_vec();
    msg.extend_from_slice(&text);
    msg
}
